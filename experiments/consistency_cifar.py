#!/usr/bin/env python3
r"""Replaced by the config ``experiments/configs/consistency_resnet20.py`` (clean vs forward-noise vs consistency).

This script's stages, settings and result files moved to the protocol ``consistency_float``
(``jaxnoise/protocols/consistency_float.py``); the config's defaults are the settings of the committed results in
``experiments/results/consistency_resnet20/``. Run::

  jaxnoise run experiments/configs/consistency_resnet20.py                 # resumes where it stopped
  jaxnoise run experiments/configs/consistency_resnet20.py --list          # the stages and their state
  jaxnoise run experiments/configs/consistency_resnet20.py \
      --set model=resnet32 \
      --set pretrained=../shared/pretrained/resnet32_cifar10.npz \
      --set name=consistency_resnet32 \
      --set train.epochs=30 \
      --set eval.grid_chips=32

(other settings: ``--set key=value``, the keys of the config file).
"""

import sys

if __name__ == "__main__":
    print(__doc__.strip(), file=sys.stderr)
    sys.exit(2)
