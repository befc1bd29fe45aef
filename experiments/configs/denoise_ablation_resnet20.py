"""Denoising blocks on the frozen ResNet-20: which loss, block, width and training noise work best (issue 17, part 1).

Command (resumes where it stopped; each stage's outputs land in experiments/results/denoise_ablation_resnet20/):

  jaxnoise run experiments/configs/denoise_ablation_resnet20.py
  jaxnoise run experiments/configs/denoise_ablation_resnet20.py --set tiny=True   # seconds, digits CNN (the tests)

Protocol ``denoise_ablation`` (jaxnoise/protocols/denoise_ablation.py). Noise: additive activation noise at every
MVM output, sigma = eta * r_site (r_site: the site's clean output std on 1024 training images), the CPU default
sampler. ``level`` picks the eta where the plain model loses ~30 points on the last 1000 training images (4 chips)
and the side levels 0.67x / 1.33x. Every variant places a block after every residual block (bottleneck C/10,
widths 4/4/7 at 16/32/64 channels: 2.39% of the backbone's parameters, the committed ``every_block`` arm's)
unless it says otherwise, trains one epoch a chunk (SGD 0.02, momentum 0.9,
cosine over at most 10 epochs, batch 128) until 2 chunks in a row do not beat its best held-out score (8 chips on
the 1000 held-out images) by 0.2 points, and is evaluated with its best chunk's blocks on the full test split:
32 chips at the target, 8 at each side level; every arm sees the same chips.

Variants (each changes one thing against ``ce``):
  ce: cross-entropy under noise (the committed ``denoise_resnet20`` run's loss, there for 300 steps)
  feature: + feature matching of every block output to the clean backbone's (nmse, weight 1)
  kl: + KL of the clean backbone's predictions to the noisy ones (weight 1)
  feature_kl: both
  probabilistic: probabilistic blocks, + feature matching (1) + their noise likelihood (0.1)
  spread: the training scale drawn per step from target x [0.67, 1.33] (the side levels' range)
  wide_half: bottleneck C/6 (widths 4/6/11) after every other residual block (2.41%: about the same budget)
  inside: the blocks inside every residual branch, between its two convolutions (``layerS/B/mid``: after conv1,
    before conv2; the shortcut path untouched) instead of after the block's sum (2.39%, the same widths)
  feature_kl_full, probabilistic_full: feature_kl and probabilistic over the whole schedule (patience 10: the curve
    rule stopped both at epoch 3, before the cosine learning rate had fallen)
  inside_lr005: inside at learning rate 0.005 over the whole schedule (at 0.02 it fell to chance after one epoch)
  ce_seed1, ce_seed2, spread_seed1, spread_seed2: ce and spread at training seeds 1 and 2 (block init, data order,
    training noise; the same chips), so the winner's lead is measured over training seeds, not only over chips
Feature matching (feature, feature_kl, probabilistic) compares each placed block's output with the clean
backbone's value at that point.

Expected (measured 2026-12-04, training seed 0; experiments/README.md#denoise_ablation_resnet20): target eta 0.3,
plain 56.31% (noise-free 81.03%); on the test split at eta 0.3 (32 chips) ce 79.74% [79.63, 79.85], spread 80.05%
[79.94, 80.15] (+0.31 [+0.24, +0.37] paired; the winner), feature 78.45%, kl 78.39%, wide_half 78.50%, feature_kl
72.45% and probabilistic 73.93% (both stopped at epoch 3), inside 54.18%; the reruns feature_kl_full 77.28%,
probabilistic_full 78.83%, inside_lr005 78.13%. Over training seeds 0-2: ce 79.74, 79.94, 79.65%, spread 80.05,
80.06, 80.19%; spread - ce +0.31, +0.13, +0.54 points (mean +0.32 [-0.19, +0.84], t over 3 seeds).
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "denoise_ablation_resnet20"
    c.protocol = "denoise_ablation"
    c.tiny = False
    c.model = "resnet20"
    c.pretrained = "../shared/pretrained/resnet20_cifar10.npz"
    c.dataset = "cifar10"
    c.data_dir = ""                      # "" = $TFDS_DATA_DIR, ../shared/tfds, ...
    c.held_out = 1000                    # last training images: level and training curves
    c.seed = 0                           # every key: key(seed), named per use
    c.noise = ml_collections.ConfigDict(dict(calib_images=1024, sampler=""))
    c.level = ml_collections.ConfigDict(dict(grid=(0.2, 0.25, 0.3, 0.35, 0.4), n_chips=4, target_drop=0.30,
                                             side_factors=(0.67, 1.33)))
    c.denoiser = ml_collections.ConfigDict(dict(kind="residual", reduction=10, feature_weight=0.0))
    # chunk_steps 0 = one epoch of the 49,000 training images.
    c.train = ml_collections.ConfigDict(dict(batch_size=128, lr=0.02, chunk_steps=0, max_epochs=10))
    c.curve = ml_collections.ConfigDict(dict(n_chips=8, patience=2, min_delta=0.002))
    c.eval = ml_collections.ConfigDict(dict(n_chips=32, side_chips=8, batch_size=500))
    c.baseline = "ce"
    c.variants = ml_collections.ConfigDict()
    c.variants.ce = ml_collections.ConfigDict()
    c.variants.feature = ml_collections.ConfigDict(dict(feature_weight=1.0))
    c.variants.kl = ml_collections.ConfigDict(dict(kl_weight=1.0))
    c.variants.feature_kl = ml_collections.ConfigDict(dict(feature_weight=1.0, kl_weight=1.0))
    c.variants.probabilistic = ml_collections.ConfigDict(dict(kind="probabilistic", feature_weight=1.0,
                                                              nll_weight=0.1))
    c.variants.spread = ml_collections.ConfigDict(dict(act_eta_spread=0.33))
    c.variants.wide_half = ml_collections.ConfigDict(dict(reduction=6, sites="every_other_block"))
    c.variants.inside = ml_collections.ConfigDict(dict(sites="inside_every_block"))
    # Reruns of variants the curve rule cut short (stopped at epoch 3, lr still 0.016) or that trained too slowly:
    # the whole 10-epoch cosine schedule.
    c.variants.feature_kl_full = ml_collections.ConfigDict(dict(feature_weight=1.0, kl_weight=1.0, patience=10))
    c.variants.probabilistic_full = ml_collections.ConfigDict(dict(kind="probabilistic", feature_weight=1.0,
                                                                   nll_weight=0.1, patience=10))
    c.variants.inside_lr005 = ml_collections.ConfigDict(dict(sites="inside_every_block", lr=0.005, patience=10))
    # Training seeds 1 and 2 of the baseline and the winner: the report's "over training seeds" table.
    for seed in (1, 2):
        c.variants[f"ce_seed{seed}"] = ml_collections.ConfigDict(dict(seed=seed))
        c.variants[f"spread_seed{seed}"] = ml_collections.ConfigDict(dict(act_eta_spread=0.33, seed=seed))
    return c
