"""``consistency_resnet32_q4p80`` with the group's 6-epoch noise fine-tune instead of 3 (issue 16's regime condition).

Command (resumes where it stopped; each stage's outputs land in experiments/results/consistency_resnet32_q4p80_e6/):

  jaxnoise run experiments/configs/consistency_resnet32_q4p80_e6.py
  jaxnoise run experiments/configs/consistency_resnet32_q4p80_e6.py --set tiny=True   # seconds, digits CNN (the tests)

Why: with 3 epochs, consistency - forward-noise at 0.2 max|W_q| is +2.29 points [+1.69, +2.88] over 3 seeds
(``consistency_resnet32_q4p80``), but forward-noise at 0.2 (71.89-72.15%) stays 13.0-13.3 points below the 4-bit
reference's noise-free 85.14%, outside the issue's regime (within 10 points). The group's recipe fine-tunes for 6
epochs. Only ``arms.epochs`` changes, so the QAT, its evaluation and the search are those of
``consistency_resnet32_q4p80`` (``reuse_from``: copied with their records, same settings); every arm and seed is
trained again for 6 epochs (cosine over 6) and evaluated on the same 32 chips.

Expected (measured, ``results.md``): at 0.2 max|W_q|, 32 chips per arm and seed, full test split, the same chips
in every arm: forward-noise 72.86 / 73.58 / 73.51% and consistency 75.79 / 75.87 / 75.97% for seeds 0 / 1 / 2;
consistency - forward-noise, paired over chips, +2.93 [+2.11, +3.75] / +2.29 [+1.57, +3.01] / +2.46 [+1.73,
+3.19] points (``python experiments/paired_differences.py
experiments/results/consistency_resnet32_q4p80_e6/eval/consistency_s0.json forward_noise_s0 --reference-file
experiments/results/consistency_resnet32_q4p80_e6/eval/forward_noise_s0.json --entry 1``, ``_s1``, ``_s2``); mean
over the 3 seeds **+2.56 [+1.74, +3.38]** (t interval over seeds). Noise-free: forward-noise 85.98-86.23%,
consistency 84.83-85.01%. Forward-noise at 0.2 is 11.6-12.3 points below the 4-bit reference's noise-free 85.14%
(the issue's regime asks for within 10): 6 epochs moved it by 0.7-1.6 points from the 3-epoch run (71.89-72.15%).
~40-50 min per training here, ~10 min per 32-chip evaluation (the machine alone).
"""

import os

from jaxnoise.experiment import load_config


def get_config():
    c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "consistency_resnet32_q4p80.py"))
    c.name = "consistency_resnet32_q4p80_e6"
    c.arms.epochs = 6
    c.reuse_from = "consistency_resnet32_q4p80"
    return c
