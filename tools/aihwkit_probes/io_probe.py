import torch
from aihwkit.nn import AnalogLinear
from aihwkit.simulator.configs import InferenceRPUConfig
from aihwkit.simulator.parameters.enums import BoundManagementType, NoiseManagementType

torch.manual_seed(0)
def mk(nin, nout, **fw):
    c = InferenceRPUConfig()
    for k,v in fw.items(): setattr(c.forward, k, v)
    m = AnalogLinear(nin, nout, bias=False, rpu_config=c)
    m.eval()
    return m
# (a) DAC step & rounding: out ideal ADC
m = mk(2,1, out_noise=0.0, out_res=-1, out_bound=-1)
m.set_weights(torch.tensor([[1.0, 0.0]]))
xs = torch.tensor([[0.3, 1.0],[0.5/63,1.0],[1.5/63,1.0],[2.5/63,1.0],[0.3,0.6]])
print("DAC:", m(xs).flatten().tolist(), "expect 0.3->", round(0.3*63)/63, "0.3/0.6 ->", round(0.5*63)/63*0.6)
# (b) ADC step
m = mk(1,1, out_noise=0.0, inp_res=-1, bound_management=BoundManagementType.NONE)
m.set_weights(torch.tensor([[0.1]]))
print("ADC: y(x=1)=", m(torch.tensor([[1.0]])).item(), "step 24/510=", 24/510, "round(0.1/step)*step=", round(0.1/(24/510))*24/510)
m.set_weights(torch.tensor([[20.0]]))
print("ADC clip:", m(torch.tensor([[1.0]])).item())
# (c) BM
for n in [64, 512]:
    m = mk(n,1, out_noise=0.0)
    m.set_weights(torch.ones(1,n))
    print("BM n=",n, m(torch.ones(1,n)).item())
    m.set_weights(-torch.ones(1,n))
    print("BM neg n=",n, m(torch.ones(1,n)).item())
m = mk(64,1, out_noise=0.0, bm_test_negative_bound=False)
m.set_weights(-torch.ones(1,64)); print("BM neg no-test:", m(torch.ones(1,64)).item())
# (d) out noise std: units (after NM rescale): x scaled by amax
m = mk(4,1, out_res=-1)
m.set_weights(torch.zeros(1,4))
for amax in [1.0, 10.0]:
    y = m(amax*torch.ones(20000,4)); print("out noise std amax=",amax, y.std().item())
# (e) NM per row
m = mk(2,1, out_noise=0.0, out_res=-1, out_bound=-1)
m.set_weights(torch.tensor([[1.0,0.0]]))
print("NM per row:", m(torch.tensor([[0.3,1.0],[0.3,100.0]])).flatten().tolist())
