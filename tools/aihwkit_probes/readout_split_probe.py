import torch
from aihwkit.nn import AnalogLinear
from aihwkit.simulator.configs import InferenceRPUConfig
from aihwkit.simulator.tiles.array import TileModuleArray

torch.manual_seed(0)
c = InferenceRPUConfig()
m = AnalogLinear(64, 32, bias=False, rpu_config=c); m.eval()
t = next(m.analog_tiles())
m.program_analog_weights()
wp = t.tile.get_weights().clone()
out = t._forward_drift_readout_tensor(True)
print("readout shape", tuple(out.shape), "baseline %.6f mean|Wp| %.6f" % (t.drift_baseline.item(), wp.abs().mean().item()))
print("readout - W^T max dev:", (out - wp.T).abs().max().item(), " distinct vals sample:", out.flatten()[:6].tolist(), wp.T.flatten()[:6].tolist())
print(TileModuleArray.get_split_sizes(None, 576, 512), TileModuleArray.get_split_sizes(None, 1152, 512), TileModuleArray.get_split_sizes(None, 512, 512))
m2 = AnalogLinear(600, 10, rpu_config=c); print(type(m2.analog_module).__name__, m2.analog_module.in_sizes, m2.analog_module.out_sizes)
