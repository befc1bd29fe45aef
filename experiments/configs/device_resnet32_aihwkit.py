"""ResNet-32 over time on PCM, redone with the presets that mean what they say (issue 18, ask 3).

Command (resumes where it stopped; each stage's outputs land in experiments/results/device_resnet32_aihwkit/;
the evaluations are ~1.7 CPU-hours per arm here, so run them one arm at a time, e.g. ``--only eval_pretrained``):

  jaxnoise run experiments/configs/device_resnet32_aihwkit.py
  jaxnoise run experiments/configs/device_resnet32_aihwkit.py --set tiny=True   # seconds, digits CNN (the tests)

Protocol ``device_drift`` (jaxnoise/protocols/device_drift.py), as ``device_resnet32`` (pretrained, clean
fine-tune and hardware-aware fine-tune of the pretrained ResNet-32: 100 SGD steps at lr 0.005, batch 128, weight
decay 5e-4, seed 0; hwa under hwa_standard's training view with input ranges = max|x| of the clean layer inputs on
1024 training images), with two changes:

* ``io_numerics`` all "": every analog MVM uses its preset's numerics, i.e. ``aihwkit_inference_default`` is
  aihwkit 1.2.0's ``InferenceRPUConfig()`` (tiles of at most 512 x 512, raw tile weights, its read step and
  compensation; docs/aihwkit_presets.md, cross-checked in tools/aihwkit_crosscheck.py and
  tools/aihwkit_network_check.py) and ``hwa_standard`` its ``StandardHWATrainingPreset()`` (IR drop aside);
  the committed ``device_resnet32`` ran jaxnoise's earlier pipeline (one tile per layer holding W / max|W|, which
  is aihwkit with ``weight_scaling_omega = 1``);
* the full protocol: 32 chips on the whole test split (10,000 images) at 1 s, 1 h, 1 day, 1 month, 1 year, with
  and without global drift compensation.

Expected: not measured yet. From the ResNet-20 cross-check (issue 18: aihwkit's default falls ~10 points lower
at 1 day than the omega-1 pipeline), every arm should sit below ``device_resnet32``'s curve from 1 h on.
"""
import os

import ml_collections

from jaxnoise.experiment import load_config


def get_config():
    c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "device_resnet32.py"))
    c.name = "device_resnet32_aihwkit"
    # IOParams fields of every analog MVM's I/O numerics (training and inference): "" = the preset's value.
    c.io_numerics = ml_collections.ConfigDict(dict(sampler="", conv_sum="", semantics=""))
    c.eval.n_chips = 32
    c.eval.n_images = 0                  # the whole test split
    return c
