"""Clean fine-tune vs forward-noise vs consistency regularisation (Hou et al. 2024) on the float ResNet-20.

Command (resumes where it stopped; each stage's outputs land in experiments/results/consistency_resnet20/):

  jaxnoise run experiments/configs/consistency_resnet20.py
  jaxnoise run experiments/configs/consistency_resnet20.py --set tiny=True   # seconds, digits CNN (the tests)

Protocol ``consistency_float`` (jaxnoise/protocols/consistency_float.py): ``search`` (eta_train of forward-noise
among 0.1, 0.2, 0.3: 100 steps on training images 0-44999, 16 chips at additive_rel_max 0.2 on 45000-49999),
``train_<arm>`` (clean, forward_noise, consistency: 1 epoch from the pretrained ResNet-20, SGD lr 0.02 cosine, batch
128, weight decay 5e-4, seed 0; consistency lambda 1, nmse, every feature, K = 1), ``eval_<arm>`` (full test
split, additive_rel_max and multiplicative weight noise: 32 chips at 0.2, 4 at the other scales), ``ablation``
(lambda 0.3 / 1 / 3, stage outputs, logits with KL, K = 2, under the search protocol) and ``report``.

The defaults are the settings of the committed run, `python experiments/consistency_cifar.py --model resnet20
--epochs 1 --search-steps 100 --n-chips 32 --n-chips-grid 4 --kinds multiplicative,additive_rel_max --etas
0,0.05,0.1,0.2,0.3,0.15,0.25` (then `--stages ablation`, then `--stages report`); that run stopped before
additive_rel_max 0.15, 0.25 and 0.3, which this config evaluates too.

Expected (experiments/results/consistency_resnet20/results_additive_rel_max.json and results_multiplicative.json):
eta_train 0.2 chosen (15.60% [13.58, 17.61] on the held-out images); at eta 0.2 on the test split, 32 chips:
additive_rel_max clean 10.05%, forward_noise 16.89% [15.23, 18.54], consistency 20.65% [18.25, 23.05]
(consistency - forward_noise +3.76 points, Welch [+0.89, +6.63]); multiplicative clean 78.66%, forward_noise
43.99% [42.61, 45.37], consistency 46.52% [45.37, 47.66] (+2.53, Welch [+0.77, +4.28]); noise-free 86.64 / 47.56 /
49.17%.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "consistency_resnet20"
    c.protocol = "consistency_float"
    c.tiny = False
    c.model = "resnet20"
    c.pretrained = "../shared/pretrained/resnet20_cifar10.npz"
    c.dataset = "cifar10"
    c.data_dir = ""                      # "" = $TFDS_DATA_DIR, ../shared/tfds, ...
    c.held_out = 5000                    # last training images: the search's selection set
    c.seed = 0                           # data order, noise keys of training; eval chip keys key(seed)
    c.max_steps = 0                      # 0 = no limit (tests stop early)
    c.arms = ("clean", "forward_noise", "consistency")
    # Every arm (and the search's short runs, at a constant lr) from the pretrained weights.
    c.train = ml_collections.ConfigDict(dict(epochs=1, lr=0.02, batch_size=128, weight_decay=5e-4,
                                             schedule="cosine"))
    # The noise-aware arms' loss: consistency lambda / sites ("" = every feature) / distance; K draws for both.
    c.loss = ml_collections.ConfigDict(dict(lam=1.0, sites="", distance="nmse", num_draws=1))
    c.search = ml_collections.ConfigDict(dict(etas=(0.1, 0.2, 0.3), steps=100, n_chips=16))
    c.eval = ml_collections.ConfigDict(dict(
        kinds=("multiplicative", "additive_rel_max"), etas=(0.0, 0.05, 0.1, 0.2, 0.3, 0.15, 0.25), target_eta=0.2,
        n_chips=32, grid_chips=4, batch_size=500))
    # Consistency variants under the search protocol at the chosen eta_train; fields override c.loss.
    c.ablation = ml_collections.ConfigDict(dict(runs=(
        dict(name="consistency lam=1 sites=all", method="consistency"),
        dict(name="consistency lam=0.3 sites=all", method="consistency", lam=0.3),
        dict(name="consistency lam=3 sites=all", method="consistency", lam=3.0),
        dict(name="consistency lam=1 sites=stage outputs", method="consistency", sites="stages"),
        dict(name="consistency lam=1 sites=logits (logit_kl)", method="consistency", sites="logits",
             distance="logit_kl"),
        dict(name="consistency lam=1 sites=all K=2", method="consistency", num_draws=2))))
    return c
