"""Issue 16's ablation of the consistency target: the clean features of the same weights vs a frozen teacher.

Command (the search, after the QAT stages it reuses; each candidate lands in
experiments/results/consistency_resnet32_q4p80_target/search.json as it finishes, so a stopped run resumes):

  jaxnoise run experiments/configs/consistency_resnet32_q4p80_target.py --only qat,eval_qat,search
  jaxnoise run experiments/configs/consistency_resnet32_q4p80_target.py --set tiny=True   # seconds, digits CNN (the tests)

``consistency_resnet32_q4p80`` with other search candidates. Its search compared lambda, sites and distance, all
with the default target (the trained weights themselves with the noise off, in train mode: a target that moves as
training goes). Here lambda 3 / 10 / 30 (all sites, nmse) pull the noisy features toward the frozen, noise-free
QAT reference instead (``target="teacher"``, inference mode: the distillation form of Noisy Machines, Zhou et al.
2020), beside forward-noise and the q4p80 winner (lambda 10, same weights) re-run as a check. Everything else is
q4p80's: the QAT and its evaluation are reused from it (``reuse_from``), every proxy is ``search.steps`` = 150 steps
from the QAT weights at 0.2 max|W_q| and is scored over 8 chips on the 5000 held-out training images (the same chips
for every candidate, so they pair by chip: ``python experiments/paired_differences.py
experiments/results/consistency_resnet32_q4p80_target/search.json forward_noise``).

Expected (measured, ``search.json``; 8 chips at 0.2 on the 5000 held-out images, one seed): forward-noise 74.41%
and lambda 10 same weights 76.09% (q4p80's figures exactly), teacher lambda 3 / 10 / 30: 74.92 / 75.55 / 76.89%;
paired per chip against forward-noise +0.52 [-0.62, +1.66], +1.14 [-0.14, +2.43], +2.48 [+1.28, +3.68] points,
against lambda 10 same weights -1.16 [-2.54, +0.21], -0.54 [-2.29, +1.22], +0.80 [-0.91, +2.51] (``python
experiments/paired_differences.py experiments/results/consistency_resnet32_q4p80_target/search.json
"distance=nmse, lam=10.0, sites=all"``). The teacher needs about 3x the lambda for the same gain, and at its best
is within the proxy's resolution of the same-weights target. ~4.5-7 min per proxy here (the machine alone).
"""

import os

from jaxnoise.experiment import load_config


def get_config():
    c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "consistency_resnet32_q4p80.py"))
    c.name = "consistency_resnet32_q4p80_target"
    c.reuse_from = "consistency_resnet32_q4p80"
    c.search.candidates = (
        dict(lam=10.0, sites="all", distance="nmse", target="teacher"),   # first: the tiny run's one candidate
        dict(lam=10.0, sites="all", distance="nmse"),
        dict(lam=3.0, sites="all", distance="nmse", target="teacher"),
        dict(lam=30.0, sites="all", distance="nmse", target="teacher"),
    )
    return c
