"""Denoising blocks (Azizi et al. 2024) on the frozen pretrained ResNet-20 under additive activation noise.

Command (resumes where it stopped; each stage's outputs land in experiments/results/denoise_resnet20/):

  jaxnoise run experiments/configs/denoise_resnet20.py
  jaxnoise run experiments/configs/denoise_resnet20.py --set tiny=True   # seconds, digits CNN (the tests)

Protocol ``denoise_placement`` (jaxnoise/protocols/denoise_placement.py): ``level`` (the noise level where the
plain model loses ~30 points on the last 1000 training images, 2 chips, and the side levels 0.67x / 1.33x),
``sensitivity`` (per-site removal gain, 4 chips, and gradient norm), ``search`` (greedy, budget 2.5% of the
backbone's parameters, the 6 most sensitive sites, 40 steps per candidate, 4 chips), ``train_<arm>`` (residual
blocks, bottleneck C/4, 300 steps, batch 128, SGD 0.02 cosine, backbone frozen: searched, every_block, random,
most_sensitive), ``eval_plain`` / ``eval_<arm>`` (full test split: 32 chips for plain and searched at the target
level, 4 for the baselines and the side levels) and ``report``.

The defaults are the settings of the committed run, `python experiments/denoise_cifar.py --model resnet20
--n-chips-levels 4 --n-chips-side 4`. ``noise.sampler = "threefry/erfinv"`` keeps its activation-noise draws:
that run predates ``NoiseSpec.sampler``, whose CPU default is now ``"threefry/icdf16"`` ("" = the backend's
default, for new results).

Expected (experiments/results/denoise_resnet20/results.json): target eta 0.3 (plain drop 29.4 points on the
held-out images), clean 81.03%; at eta 0.3 on the test split: plain 56.31% [56.17, 56.45] (32 chips), searched
(stem, layer1/0-2, layer3/0; 2.09% params) 74.09% [73.98, 74.20] (32 chips), every_block 76.02% [75.54, 76.49],
random 75.26% [74.93, 75.59], most_sensitive (stem) 70.63% [70.29, 70.97] (4 chips each).
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "denoise_resnet20"
    c.protocol = "denoise_placement"
    c.tiny = False
    c.model = "resnet20"
    c.pretrained = "../shared/pretrained/resnet20_cifar10.npz"
    c.dataset = "cifar10"
    c.data_dir = ""                      # "" = $TFDS_DATA_DIR, ../shared/tfds, ...
    c.held_out = 1000                    # last training images: the selection set (level, sensitivity, search)
    c.seed = 0                           # every key: key(seed), named per use
    c.arms = ("searched", "every_block", "random", "most_sensitive")
    # Additive activation noise, sigma = eta * std of the site's clean output on calib_images training images.
    c.noise = ml_collections.ConfigDict(dict(calib_images=1024, sampler="threefry/erfinv"))
    c.level = ml_collections.ConfigDict(dict(grid=(0.2, 0.25, 0.3, 0.35, 0.4), n_chips=2, target_drop=0.30,
                                             side_factors=(0.67, 1.33)))
    c.denoiser = ml_collections.ConfigDict(dict(kind="residual", reduction=4, feature_weight=0.0))
    # n_chips: the sensitivity's and the search's chips; max_rounds 0 = until the budget or no gain.
    c.search = ml_collections.ConfigDict(dict(budget=0.025, top_k=6, steps=40, batch_size=64, n_chips=4,
                                              grad_draws=4, max_rounds=0))
    c.train = ml_collections.ConfigDict(dict(steps=300, batch_size=128, lr=0.02))   # lr also the search's
    c.eval = ml_collections.ConfigDict(dict(n_chips=32, side_chips=4, level_chips=4, batch_size=500))
    return c
