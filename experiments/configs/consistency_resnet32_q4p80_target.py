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

Expected: not measured yet. The forward-noise and lambda-10 same-weights proxies repeat q4p80's (74.41% and 76.09%,
``experiments/results/consistency_resnet32_q4p80/search.json``). ~6 min per proxy here (the machine alone).
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
