"""The consistency_quantized protocol's own rules (its config runs end to end in tests/test_experiment.py, slow)."""

import os

import jax
import jax.numpy as jnp
import pytest

from jaxnoise import experiment, methods
from jaxnoise.models import get_model
from jaxnoise.protocols import consistency_quantized as cq

TARGET = os.path.join("experiments", "configs", "consistency_resnet32_q4p80_target.py")


def _config(*overrides):
    return experiment.apply_overrides(experiment.load_config(TARGET), list(overrides))


def test_a_teacher_target_pulls_toward_the_frozen_variables_and_the_default_toward_the_same_weights():
    config = _config("tiny=True")
    model = get_model("cnn", input_shape=(8, 8, 1))
    student, teacher = model.init(jax.random.key(0)), model.init(jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (4, 8, 8, 1))
    y = jnp.arange(4) % 10
    cand = dict(lam=1.0, sites="all", distance="nmse")
    same = cq.make_arm_loss(config, model, "consistency", cand, teacher=teacher)
    taught = cq.make_arm_loss(config, model, "consistency", {**cand, "target": "teacher"}, teacher=teacher)
    assert same.config["target"] == "same weights, noise off" and taught.config["target"] == "teacher"
    hp = {**taught.hparams, "eta_train": 0.0}   # noise off: the noisy network is the student itself
    args = (student["params"], student.get("batch_stats", {}), x, y, jax.random.key(3))
    reg_same = float(same.fn(*args, {**same.hparams, "eta_train": 0.0})[1][2]["consistency"])
    reg_teacher = float(taught.fn(*args, hp)[1][2]["consistency"])
    assert reg_same == pytest.approx(0.0, abs=1e-6)   # its own clean features
    assert reg_teacher > 1e-3                           # another network's features
    # by hand: the student's train-mode features against the teacher's inference-mode ones, mean over sites
    mine = model.apply(student, x, train=True)
    theirs = model.apply(teacher, x)
    sites = model.feature_names
    want = sum(float(methods.feature_distance(mine.features[s], theirs.features[s], "nmse")) for s in sites)
    assert reg_teacher == pytest.approx(want / len(sites), rel=1e-5)


@pytest.mark.parametrize("candidate, match", [
    (dict(lam=1.0, target="pretrained"), "target='pretrained'"),
    (dict(lam=1.0, weight=2.0), r"unknown keys \['weight'\]"),
])
def test_bad_search_candidates_are_refused_before_anything_runs(candidate, match):
    config = _config()
    config.search.candidates = (candidate,)
    with pytest.raises(ValueError, match=match):
        experiment.stages_of(config)


def test_a_teacher_target_without_the_teacher_is_an_error():
    model = get_model("cnn", input_shape=(8, 8, 1))
    with pytest.raises(ValueError, match="needs the QAT variables"):
        cq.make_arm_loss(_config("tiny=True"), model, "consistency", {"target": "teacher"})
