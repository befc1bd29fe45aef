"""Consistency regularisation vs forward-noise on a 4-bit quantized ResNet-32, in the authors' group's convention.

Command (resumes where it stopped; each stage's outputs land in experiments/results/consistency_resnet32_q4/):

  jaxnoise run experiments/configs/consistency_resnet32_q4.py
  jaxnoise run experiments/configs/consistency_resnet32_q4.py --set tiny=True   # seconds, digits CNN (the tests)

Protocol ``consistency_quantized`` (jaxnoise/protocols/consistency_quantized.py). Stages so far: ``qat`` (clean
4-bit LSQ weights + 4-bit LSQ activations fine-tune of the pretrained ResNet-32, on training images 0-44999) and
``eval_qat`` (noise-free test accuracy; 32 chips at sigma = 0.2 max|W_q|, normal clipped at +-3). The noise-aware
arms (forward-noise, consistency, 3 seeds each) follow as further stages.

Expected: not measured yet; the group's recipe reports the 4-bit ResNet-32 near its float accuracy after 60 QAT
epochs; this config's 5 epochs from the pretrained model are what the CPU budget allows (~7-8 min an epoch).
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "consistency_resnet32_q4"
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
        weight_bits=4, weight_step="lsq", weight_step_init="percentile", percentile=80.0, per_channel=False,
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
        dict(lam=3.0, sites="all", distance="nmse"), dict(lam=1.0, sites="stages", distance="nmse"),
        dict(lam=1.0, sites="all", distance="cosine"))))
    return c
