"""Denoising blocks (Azizi et al. 2024) on a frozen ImageNet ResNet-50 under additive activation noise.

Command (resumes where it stopped; each stage's outputs land in experiments/results/imagenet_denoise_resnet50/):

  jaxnoise run experiments/configs/imagenet_denoise_resnet50.py --set data_dir=/path/to/tfds
  jaxnoise run experiments/configs/imagenet_denoise_resnet50.py --set tiny=True   # the mock imagenet2012, 32 px

Data: ``imagenet2012`` prepared as array_record (``tfds build imagenet2012 --manual_dir MANUAL_DIR --data_dir DIR
--file_format array_record``, see docs/concepts.md, "Streamed datasets"), streamed by ``jaxnoise.stream``; the
selection set (the last ``held_out`` training images, evaluation preprocessing) is decoded into memory (10,000 x 224
x 224 x 3 bytes = 1.5 GB). ``pretrained``: torchvision's ResNet-50 converted with ``jaxnoise convert-torch resnet50.pth
resnet50_imagenet.npz --model resnet50``.

Protocol ``denoise_placement`` (jaxnoise/protocols/denoise_placement.py): ``level`` (the eta where the plain model
loses ~30 points on the selection set), ``sensitivity``, ``search`` (greedy, budget 2.5% of the backbone's
parameters), ``train_<arm>`` (blocks on the frozen backbone: searched, every_block, random, most_sensitive),
``eval_plain`` / ``eval_<arm>`` (the 50,000 validation images: 32 chips for plain and searched at the target level,
4 elsewhere) and ``report``. In tiny mode every stage runs on the mock imagenet2012 with a small CNN at 32 px.

Expected cost (an ESTIMATE from FLOPs, not measured; no GPU or TPU was available): ResNet-50 is 8.2 GFLOP per
224 px image forward, ~25 GFLOP per step image with the frozen backbone. Level and sensitivity ~6e15 FLOP, search
~1.2e16, the four trained arms 2.6e16, evaluation 3.6e16: ~8e16 in all. One H200 at an assumed 100 TFLOP/s
sustained: ~15 min of compute, ~30-45 min with decoding. TPU v4-8: the runner uses one of its 4 chips (no mesh),
at an assumed 80 TFLOP/s: ~20 min of compute, ~30-45 min in all.

Expected accuracy: not measured yet.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "imagenet_denoise_resnet50"
    c.protocol = "denoise_placement"
    c.tiny = False
    c.model = "resnet50"
    c.pretrained = "../shared/pretrained/resnet50_imagenet.npz"   # torchvision's, via jaxnoise convert-torch
    c.dataset = "imagenet2012"
    c.data_dir = ""                      # "" = $TFDS_DATA_DIR, ../shared/tfds, ~/tensorflow_datasets
    c.resolution = 224
    c.workers = -1                       # grain worker processes; -1 = min(8, CPUs - 1)
    c.held_out = 10000                   # last training images: the selection set (level, sensitivity, search)
    c.seed = 0
    c.arms = ("searched", "every_block", "random", "most_sensitive")
    c.noise = ml_collections.ConfigDict(dict(calib_images=1024, sampler=""))
    c.level = ml_collections.ConfigDict(dict(grid=(0.2, 0.25, 0.3, 0.35, 0.4), n_chips=2, target_drop=0.30,
                                             side_factors=(0.67, 1.33)))
    c.denoiser = ml_collections.ConfigDict(dict(kind="residual", reduction=4, feature_weight=0.0))
    c.search = ml_collections.ConfigDict(dict(budget=0.025, top_k=6, steps=200, batch_size=64, n_chips=4,
                                              grad_draws=4, max_rounds=0))
    c.train = ml_collections.ConfigDict(dict(steps=2000, batch_size=128, lr=0.02))
    c.eval = ml_collections.ConfigDict(dict(n_chips=32, side_chips=4, level_chips=4, batch_size=250))
    return c
