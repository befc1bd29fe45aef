import torch
from aihwkit.inference.noise.pcm import PCMLikeNoiseModel
from aihwkit.nn import AnalogLinear
from aihwkit.simulator.configs import InferenceRPUConfig

torch.manual_seed(0)
c = InferenceRPUConfig()
m = AnalogLinear(8, 3, bias=True, rpu_config=c); m.eval()
# zero input
print("zero input out:", m(torch.zeros(2,8)).tolist(), "bias", m.analog_module.bias.tolist())
t = next(m.analog_tiles())
w0 = t.tile.get_weights().clone(); print("tile weights == set weights (omega=0):", torch.allclose(w0, m.get_weights()[0]), "max|W|", w0.abs().max().item())
rec = []
orig = PCMLikeNoiseModel.apply_drift_noise_to_conductance
def spy(self, g, nu, ti):
    rec.append(g.clone()); return orig(self, g, nu, ti)
PCMLikeNoiseModel.apply_drift_noise_to_conductance = spy
m.program_analog_weights()
wp = t.tile.get_weights().clone()
print("baseline:", t.drift_baseline, " mean|Wp|=", wp.abs().mean().item())
m.drift_analog_weights(3600.0)
gp, gm = rec
print("collapsed pair (min(g+,g-) all zero):", torch.all(torch.minimum(gp, gm) == 0).item(), "max g:", max(gp.max().item(), gm.max().item()))
print("alpha:", t.alpha, "mapping_scales", t.mapping_scales, "out_scaling_alpha", t.out_scaling_alpha)
print("split sizes 576:", [len(x) for x in [1]], end=" ")
from aihwkit.simulator.tiles.array import TileModuleArray

print(TileModuleArray.get_split_sizes(None, 576, 512), TileModuleArray.get_split_sizes(None, 1152, 512), TileModuleArray.get_split_sizes(None, 512, 512))
m2 = AnalogLinear(600, 10, rpu_config=c); print(type(m2.analog_module).__name__, m2.analog_module.in_sizes, m2.analog_module.out_sizes)
