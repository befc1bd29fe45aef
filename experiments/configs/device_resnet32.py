"""ResNet-32 over time on PCM (aihwkit's inference model): pretrained vs clean fine-tune vs hardware-aware fine-tune.

Command (resumes where it stopped; each stage's outputs land in experiments/results/device_resnet32/):

  jaxnoise run experiments/configs/device_resnet32.py
  jaxnoise run experiments/configs/device_resnet32.py --set tiny=True   # seconds, digits CNN (the tests)

Protocol ``device_drift`` (jaxnoise/protocols/device_drift.py): ``train_clean_ft`` and ``train_hwa`` (100 SGD steps
at a constant lr 0.005 from the pretrained ResNet-32, batch 128, weight decay 5e-4, seed 0; hwa under
hwa_standard's training view, input ranges = max|x| of the clean layer inputs on 1024 training images),
``eval_<arm>`` (pretrained, clean_ft, hwa under aihwkit_inference_default at 1 s, 1 h, 1 day, 1 month, 1 year,
with and without global drift compensation: 8 chips on the first 500 test images) and ``report``.

The defaults are the settings of the committed run, `python experiments/device_cifar.py --model resnet32
--hwa-steps 100 --n-chips 8 --n-images 500` (the full protocol: --set eval.n_chips=32 --set eval.n_images=0).
``io_numerics`` are the analog MVM's I/O numerics of that run, which predates ``IOParams.sampler``,
``conv_sum`` and ``semantics`` (``jaxnoise.analog.LEGACY_IO``): ``sampler="threefry/erfinv"`` (jax.random.normal;
the CPU default is now "threefry/icdf16"), ``conv_sum="taps"`` (one dot per kernel tap; now "patch") and
``semantics="v0"`` (bound management and zero inputs as jaxnoise did before aihwkit 1.2.0's semantics, and the whole
layer as then: one tile per layer holding W / max|W|, both programmed devices drifted), bit for bit the old code
(tests/test_device.py). For new results set each to "" (the preset's value: the backend's sampler, "patch",
"aihwkit": aihwkit's tiles, raw tile weights and read step, docs/aihwkit_presets.md).

Expected (experiments/results/device_resnet32/results.json), mean % over 8 chips with global compensation:
pretrained 74.60 (1 s), 62.05 (1 h), 49.78 (1 day), 26.82 (1 month), 17.05 (1 year); clean_ft 82.58, 73.25, 61.20,
35.85, 22.43; hwa 83.72, 77.28, 68.08, 43.07, 25.37; without compensation every arm is at chance (10-14%) from 1 h
on; clean accuracy on the 500 images 85.60 / 89.40 / 88.40%.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "device_resnet32"
    c.protocol = "device_drift"
    c.tiny = False
    c.model = "resnet32"
    c.pretrained = "../shared/pretrained/resnet32_cifar10.npz"
    c.dataset = "cifar10"
    c.data_dir = ""                      # "" = $TFDS_DATA_DIR, ../shared/tfds, ...
    c.seed = 0                           # data order and noise keys of training; chip keys key(seed)
    c.arms = ("pretrained", "clean_ft", "hwa")
    # IOParams fields of every analog MVM's I/O numerics (training and inference; "" = the preset's value): the
    # legacy ones of the committed run.
    c.io_numerics = ml_collections.ConfigDict(dict(sampler="threefry/erfinv", conv_sum="taps", semantics="v0"))
    c.train = ml_collections.ConfigDict(dict(steps=100, lr=0.005, batch_size=128, weight_decay=5e-4,
                                             checkpoint_every=100))
    c.hwa = ml_collections.ConfigDict(dict(preset="hwa_standard", range_statistic="absmax", range_alpha=1.0,
                                           calib_images=1024))
    # n_images 0 = the whole test split; chip_batch_size 0 = the backend's default.
    c.eval = ml_collections.ConfigDict(dict(preset="aihwkit_inference_default",
                                            times=(1.0, 3600.0, 86400.0, 2592000.0, 31536000.0), n_chips=8,
                                            n_images=500, batch_size=500, chip_batch_size=0))
    return c
