#!/usr/bin/env python3
r"""Replaced by the config ``experiments/configs/denoise_resnet20.py`` (denoising blocks with a placement search).

This script's stages, settings and result files moved to the protocol ``denoise_placement``
(``jaxnoise/protocols/denoise_placement.py``); the config's defaults are the settings of the committed results in
``experiments/results/denoise_resnet20/``. Run::

  jaxnoise run experiments/configs/denoise_resnet20.py                 # resumes where it stopped
  jaxnoise run experiments/configs/denoise_resnet20.py --list          # the stages and their state
  jaxnoise run experiments/configs/denoise_resnet20.py \
      --set model=resnet32 \
      --set pretrained=../shared/pretrained/resnet32_cifar10.npz \
      --set name=denoise_resnet32

(other settings: ``--set key=value``, the keys of the config file).
"""

import sys

if __name__ == "__main__":
    print(__doc__.strip(), file=sys.stderr)
    sys.exit(2)
