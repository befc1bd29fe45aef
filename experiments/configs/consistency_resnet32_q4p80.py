"""Consistency regularisation vs forward-noise on a 4-bit ResNet-32 whose weight clip is held at the 80th percentile.

Command (resumes where it stopped; each stage's outputs land in experiments/results/consistency_resnet32_q4p80/):

  jaxnoise run experiments/configs/consistency_resnet32_q4p80.py
  jaxnoise run experiments/configs/consistency_resnet32_q4p80.py --set tiny=True   # seconds, digits CNN (the tests)

Protocol ``consistency_quantized`` (jaxnoise/protocols/consistency_quantized.py), the same stages as
``consistency_resnet32_q4`` with one change: the weight quantizer's step is not learned but recomputed from the
current weights every forward pass as P80(|W|) / 7 (``quant.weight_step="percentile"``), the group's LSQ
initialisation held fixed. Why: in ``consistency_resnet32_q4`` LSQ grew the clip to a median 2.2x the 80th
percentile during QAT, so sigma = 0.2 max|W_q| became 0.55 rms(W_q) (``quant.noise_ratios``) and forward-noise at
0.2 ended 44 points below the reference's noise-free accuracy; with the clip at P80 the same scale is 0.32
rms(W_q), the regime issue 16 asks for (forward-noise within 10 points of the reference). Activations stay 4-bit
LSQ. The search adds lambda 10 (lambda 3, the edge of the q4 grid, won there).

Expected: not measured yet. ``python experiments/quant_noise_ratio.py
experiments/results/consistency_resnet32_q4/weights/qat.npz --weight-step percentile`` gives the 0.32 above (0.55
with the learned steps, without the flag). Clipping 20% of every layer's weights costs clean accuracy that LSQ
avoided by growing the clip, so the QAT stage has more to recover than in ``consistency_resnet32_q4`` (85.76%).
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "consistency_resnet32_q4p80"
    c.protocol = "consistency_quantized"
    c.tiny = False
    c.model = "resnet32"
    c.pretrained = "../shared/pretrained/resnet32_cifar10.npz"
    c.dataset = "cifar10"
    c.data_dir = ""                      # "" = $TFDS_DATA_DIR, ../shared/tfds, ...
    c.held_out = 5000                    # last training images, kept for searches
    c.seed = 0
    c.max_steps = 0                      # 0 = no limit (tests stop early)
    c.calib_images = 1024
    c.quant = ml_collections.ConfigDict(dict(
        weight_bits=4, weight_step="percentile", weight_step_init="percentile", percentile=80.0, per_channel=False,
        act_bits=4, act_signed_paths=("^conv1$",), act_step_init="lsq"))
    c.qat = ml_collections.ConfigDict(dict(epochs=5, lr=0.01, batch_size=128, weight_decay=1e-4,
                                           schedule="cosine"))
    c.noise = ml_collections.ConfigDict(dict(eta=0.2, truncate=3.0))
    c.eval = ml_collections.ConfigDict(dict(n_chips=32, batch_size=500, key=0,
                                            grid=(0.0, 0.05, 0.1, 0.15, 0.25, 0.3), grid_chips=8))
    # The noise-aware arms, from the QAT weights, equal budgets; seed = data order and noise keys.
    c.arms = ml_collections.ConfigDict(dict(methods=("forward_noise", "consistency"), seeds=(0, 1, 2), epochs=3,
                                            lr=0.005, batch_size=128, weight_decay=1e-4, schedule="cosine"))
    # Consistency's lambda / sites / distance: a short proxy on the held-out training images.
    c.search = ml_collections.ConfigDict(dict(steps=150, n_chips=8, candidates=(
        dict(lam=1.0, sites="all", distance="nmse"), dict(lam=0.3, sites="all", distance="nmse"),
        dict(lam=3.0, sites="all", distance="nmse"), dict(lam=10.0, sites="all", distance="nmse"),
        dict(lam=1.0, sites="stages", distance="nmse"),
        dict(lam=1.0, sites="all", distance="cosine"))))
    return c
