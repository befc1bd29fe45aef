"""Consistency regularisation vs forward-noise on a 4-bit quantized ImageNet ResNet-18 at sigma = 0.2 max|W_q|.

Command (resumes where it stopped; each stage's outputs land in experiments/results/imagenet_consistency_resnet18/):

  jaxnoise run experiments/configs/imagenet_consistency_resnet18.py --set data_dir=/path/to/tfds
  jaxnoise run experiments/configs/imagenet_consistency_resnet18.py --set tiny=True   # the mock imagenet2012, 32 px

Data: ``imagenet2012`` prepared as array_record (``tfds build imagenet2012 --manual_dir MANUAL_DIR --data_dir DIR
--file_format array_record``, see docs/concepts.md, "Streamed datasets"), streamed by ``jaxnoise.stream`` at
``resolution`` (train: random-resized crop + flip; evaluation: the validation split, resize 256, centre crop 224). ``pretrained``: torchvision's
ResNet-18 weights converted with ``jaxnoise convert-torch resnet18.pth resnet18_imagenet.npz --model resnet18``.

Protocol ``consistency_quantized`` (jaxnoise/protocols/consistency_quantized.py), the authors' group's convention:
``qat`` (clean 4-bit LSQ fine-tune), ``eval_qat``, ``search`` (lambda / sites / distance on the last ``held_out``
training images), ``train_<arm>_s<seed>`` (forward-noise and consistency at ``noise.eta`` = 0.2, the same budget),
``eval_<arm>_s<seed>`` (32 chips on the 50,000 validation images, the grid on seed 0) and ``report``. In tiny mode
every stage runs on the mock imagenet2012 (``jaxnoise.stream.write_mock_tfds``) with a small CNN at 32 px.

Expected cost (an ESTIMATE from FLOPs, not measured; no GPU or TPU was available): ResNet-18 is 3.6 GFLOP per
224 px image forward, ~11 GFLOP per trained image (~22 with consistency's two passes). The stages add up to
~3.5e17 FLOP: QAT 2 epochs 2.8e16, search 1.7e16, the six arms 2.5e17, Monte Carlo evaluation 5.7e16. One H200
at an assumed 100 TFLOP/s sustained in float32/TF32: ~1 h of compute, and ~19M training images to decode and
augment (16 CPU cores, ~5,000 images/s assumed): about 1.5-2.5 h in all. TPU v4-8: the runner uses one device
(no mesh), so one of the 4 chips at an assumed 80 TFLOP/s: ~1.2 h of compute, about 1.5-2 h in all.

Expected accuracy: not measured yet (the group reports its 4-bit ResNet-18 near its float accuracy after QAT).
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "imagenet_consistency_resnet18"
    c.protocol = "consistency_quantized"
    c.tiny = False
    c.model = "resnet18"
    c.pretrained = "../shared/pretrained/resnet18_imagenet.npz"   # torchvision's, via jaxnoise convert-torch
    c.dataset = "imagenet2012"
    c.data_dir = ""                      # "" = $TFDS_DATA_DIR, ../shared/tfds, ~/tensorflow_datasets
    c.resolution = 224
    c.workers = -1                       # grain worker processes; -1 = min(8, CPUs - 1)
    c.held_out = 10000                   # last training images, kept for the search
    c.seed = 0
    c.max_steps = 0                      # 0 = no limit (tests stop early)
    c.calib_images = 1024
    c.quant = ml_collections.ConfigDict(dict(
        weight_bits=4, weight_step="lsq", weight_step_init="percentile", percentile=80.0, per_channel=False,
        act_bits=4, act_signed_paths=("^conv1$",), act_step_init="lsq"))
    c.qat = ml_collections.ConfigDict(dict(epochs=2, lr=0.01, batch_size=256, weight_decay=1e-4,
                                           schedule="cosine"))
    c.noise = ml_collections.ConfigDict(dict(eta=0.2, truncate=3.0))
    c.eval = ml_collections.ConfigDict(dict(n_chips=32, batch_size=250, key=0,
                                            grid=(0.0, 0.05, 0.1, 0.15, 0.25, 0.3), grid_chips=8))
    c.arms = ml_collections.ConfigDict(dict(methods=("forward_noise", "consistency"), seeds=(0, 1, 2), epochs=2,
                                            lr=0.005, batch_size=256, weight_decay=1e-4, schedule="cosine"))
    c.search = ml_collections.ConfigDict(dict(steps=500, n_chips=8, candidates=(
        dict(lam=1.0, sites="all", distance="nmse"), dict(lam=0.3, sites="all", distance="nmse"),
        dict(lam=3.0, sites="all", distance="nmse"), dict(lam=1.0, sites="stages", distance="nmse"),
        dict(lam=1.0, sites="all", distance="cosine"))))
    return c
