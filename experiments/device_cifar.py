#!/usr/bin/env python3
r"""Replaced by the config ``experiments/configs/device_resnet32.py`` (accuracy over time on PCM).

This script's stages, settings and result files moved to the protocol ``device_drift``
(``jaxnoise/protocols/device_drift.py``); the config's defaults are the settings of the committed results in
``experiments/results/device_resnet32/``. Run::

  jaxnoise run experiments/configs/device_resnet32.py                 # resumes where it stopped
  jaxnoise run experiments/configs/device_resnet32.py --list          # the stages and their state
  jaxnoise run experiments/configs/device_resnet32.py \
      --set eval.n_chips=32 \
      --set eval.n_images=0 \
      --set name=device_resnet32_full

(other settings: ``--set key=value``, the keys of the config file).
"""

import sys

if __name__ == "__main__":
    print(__doc__.strip(), file=sys.stderr)
    sys.exit(2)
