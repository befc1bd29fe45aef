"""Consistency regularisation vs forward-noise on a 4-bit ResNet-32 whose weight clip is held at the 80th percentile.

Command (resumes where it stopped; each stage's outputs land in experiments/results/consistency_resnet32_q4p80/):

  jaxnoise run experiments/configs/consistency_resnet32_q4p80.py
  jaxnoise run experiments/configs/consistency_resnet32_q4p80.py --set tiny=True   # seconds, digits CNN (the tests)

Protocol ``consistency_quantized`` (jaxnoise/protocols/consistency_quantized.py), the same stages as
``consistency_resnet32_q4`` with one change: the weight quantizer's step is not learned but recomputed from the
current weights every forward pass as P80(|W|) / 7 (``quant.weight_step="percentile"``), the group's LSQ
initialisation held fixed. Why: in ``consistency_resnet32_q4`` LSQ grew the clip to a median 2.2x the 80th
percentile during QAT, so sigma = 0.2 max|W_q| became 0.55 rms(W_q) (``quant.noise_ratios``) and forward-noise at
0.2 ended 44 points below the reference's noise-free accuracy; with the clip at P80 the same scale is 0.32
rms(W_q), the regime issue 16 asks for (forward-noise within 10 points of the reference). Activations stay 4-bit
LSQ. The search adds lambda 10 (lambda 3, the edge of the q4 grid, won there) and
30 (added after 10 led the first six candidates, to bracket it).

Expected (measured, ``results.md``): the 4-bit reference 85.14% noise-free, 67.15% [64.75, 69.55] at 0.2 (32
chips); consistency - forward-noise at 0.2, paired over the same 32 chips, +2.28 / +2.05 / +2.53 points for seeds
0 / 1 / 2, mean over the 3 seeds **+2.29 [+1.69, +2.88]** (t interval over seeds); forward-noise at 0.2 is
71.89-72.15%, 13.0-13.3 points below the reference's noise-free accuracy (the issue asks for within 10:
``consistency_resnet32_q4p80_e6`` trains 6 epochs). ``python experiments/quant_noise_ratio.py
experiments/results/consistency_resnet32_q4/weights/qat.npz --weight-step percentile`` gives the 0.32 above (0.55
with the learned steps, without the flag).
"""

import os

from jaxnoise.experiment import load_config


def get_config():
    c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "consistency_resnet32_q4.py"))
    c.name = "consistency_resnet32_q4p80"
    c.quant.weight_step = "percentile"   # P80(|W|) / 7 from the current weights (quant.percentile = 80)
    c.search.candidates = (
        dict(lam=1.0, sites="all", distance="nmse"), dict(lam=0.3, sites="all", distance="nmse"),
        dict(lam=3.0, sites="all", distance="nmse"), dict(lam=10.0, sites="all", distance="nmse"),
        dict(lam=30.0, sites="all", distance="nmse"),
        dict(lam=1.0, sites="stages", distance="nmse"), dict(lam=1.0, sites="all", distance="cosine"))
    return c
