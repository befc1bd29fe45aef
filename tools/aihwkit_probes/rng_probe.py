# aihwkit's CPU tile draws its output noise from a fixed list of Gaussian numbers (rpucuda/rng.h, RNG::sampleGauss:
# gauss_numbers_list_[rand() % 32768]): count the distinct noise values and the list's mean and std.
import numpy as np
import torch
from aihwkit.nn import AnalogLinear
from aihwkit.simulator.configs import InferenceRPUConfig
from aihwkit.simulator.parameters.enums import BoundManagementType

torch.manual_seed(0)
for trial in range(3):
    c = InferenceRPUConfig()
    c.forward.inp_res = -1; c.forward.out_res = -1; c.forward.out_bound = -1
    c.forward.bound_management = BoundManagementType.NONE; c.forward.out_noise = 1.0
    m = AnalogLinear(4, 8, bias=False, rpu_config=c); m.eval(); m.set_weights(torch.zeros(8, 4))
    with torch.no_grad():
        z = m(torch.ones(100000, 4)).numpy().astype(np.float64).ravel()
    n = z.size
    print(f"layer {trial}: {n} draws, {len(np.unique(z))} distinct values; mean {z.mean():+.5f} (iid se {1/np.sqrt(n):.5f}), "
          f"std {z.std():.5f} (iid se {1/np.sqrt(2*n):.5f})")
