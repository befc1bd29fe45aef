"""Placement search: site structure, vmapped evaluation/training equal to sequential, search finds the noisy site."""


import jax
import numpy as np
import pytest

from jaxnoise import denoise, noise, placement, robustness
from jaxnoise.models import get_model


@pytest.fixture(scope="module")
def setup(trained_digits_cnn):
    model, variables, ref = trained_digits_cnn
    dmodel = denoise.denoised(model)
    dvars = denoise.init_variables(dmodel, variables, jax.random.key(0))
    return model, variables, ref, dmodel, dvars


def test_site_groups():
    groups = placement.site_groups(get_model("resnet20"))
    assert groups["stem"] == ("conv1",)
    assert groups["layer2/0"] == ("layer2/0/conv1", "layer2/0/conv2")
    assert groups["pre_logits"] == ()
    assert placement.site_groups(get_model("mlp", input_shape=(8, 8, 1)))["hidden1"] == ("fc1",)


def test_evaluate_placements_equals_sequential_and_compiles_once(digits, setup):
    model, variables, ref, dmodel, dvars = setup
    flat = jax.tree.map(lambda a: a, dvars)
    # non-trivial blocks so that placements differ
    blocks = jax.tree.map(lambda a: a + 0.05, denoise.split_params(flat["params"])[1])
    dvars_b = {**dvars, "params": {**denoise.split_params(dvars["params"])[0], denoise.DENOISE_KEY: blocks}}
    spec = noise.NoiseSpec(weight_kind=None, act_kind="additive", act_ref=ref, act_eta=0.5)
    placements = np.eye(4, dtype=np.float32)
    kw = dict(key=3, n_chips=3, batch_size=300, preprocess=digits.preprocess)
    images, labels = digits.test.images, digits.test.labels
    traces = robustness.trace_count()
    vm = placement.evaluate_placements(dmodel, dvars_b, placements, images, labels, spec, **kw)
    assert robustness.trace_count() == traces + 1   # every placement in one compiled program
    for k, p in enumerate(placements):
        seq = robustness.evaluate(dmodel, denoise.with_placement(dmodel, dvars_b, p), images, labels, spec, **kw)
        np.testing.assert_allclose(vm[k], seq.per_chip, atol=1.5 / len(labels))
    traces = robustness.trace_count()
    again = placement.evaluate_placements(dmodel, dvars_b, placements[::-1].copy(), images, labels, spec, **kw)
    assert robustness.trace_count() == traces   # other placements: the same compiled program
    np.testing.assert_array_equal(again, vm[::-1])


def test_removal_sensitivity_finds_the_noisy_site(digits, setup):
    model, variables, ref, _, _ = setup
    mask = {s: (1.0 if s == "conv2" else 0.0) for s in model.sites}  # noise only at conv2 -> feature block2
    spec = noise.NoiseSpec(weight_kind=None, act_kind="additive", act_ref=ref, act_eta=1.5, act_mask=mask)
    out = placement.removal_sensitivity(model, variables, digits.test.images, digits.test.labels, spec, key=1,
                                        n_chips=4, preprocess=digits.preprocess)
    gains = {s: v["gain"] for s, v in out["sites"].items()}
    assert max(gains, key=gains.get) == "block2"
    assert gains["block1"] == 0.0 and gains["block3"] == 0.0  # exactly: no noise there, same chips
    assert out["sites"]["block2"]["ci95"][0] > 0
    grads = placement.gradient_sensitivity(model, variables, digits.test.images, digits.test.labels, spec, key=2,
                                           n_draws=2, preprocess=digits.preprocess)
    assert set(grads) == set(model.feature_names) and all(v > 0 for v in grads.values())


@pytest.mark.slow  # ~16 s
def test_train_candidates_vmapped_equals_one_by_one(digits, setup):
    model, variables, ref, dmodel, dvars = setup
    loss_fn = denoise.denoiser_loss(dmodel, act_eta_train=0.5, act_ref=ref)
    placements = np.asarray([[1, 0, 0, 0], [0, 1, 1, 0]], np.float32)
    kw = dict(steps=3, key=5, batch_size=32, learning_rate=0.05)
    together, losses = placement.train_candidates(dmodel, dvars, placements, digits, loss_fn, **kw)
    for k in range(2):
        alone, loss_k = placement.train_candidates(dmodel, dvars, placements[k:k + 1], digits, loss_fn, **kw)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a)[k], np.asarray(b)[0], rtol=2e-4,
                                                             atol=2e-5), together, alone)
        np.testing.assert_allclose(losses[k], loss_k[0], rtol=1e-4)
    # one compiled step per number of candidates, whatever the placements, learning rate or steps
    step = placement._candidate_step(dmodel, loss_fn, digits, 0.9)
    size = step._cache_size()
    placement.train_candidates(dmodel, dvars, placements[::-1].copy(), digits, loss_fn,
                               **{**kw, "learning_rate": 0.01, "steps": 2})
    assert step._cache_size() == size
    # blocks whose gate is 0 get no gradient: unchanged
    fresh = denoise.split_params(dvars["params"])[1]
    np.testing.assert_array_equal(np.asarray(together["block3"]["up"]["w"][0]), np.asarray(fresh["block3"]["up"]["w"]))


@pytest.mark.slow  # ~23 s; test_removal_sensitivity_finds_the_noisy_site covers the ranking in the default set
def test_search_finds_the_site_where_noise_was_injected(digits, setup):
    model, variables, ref, dmodel, dvars = setup
    # Noise only at conv1 (feature block1). A block upstream of the noise could also help under additive noise by
    # amplifying the signal ahead of a noisy MVM (seen in development), so the noise goes first.
    mask = {s: (1.0 if s == "conv1" else 0.0) for s in model.sites}
    spec = noise.NoiseSpec(weight_kind=None, act_kind="additive", act_ref=ref, act_eta=0.8, act_mask=mask)
    loss_fn = denoise.denoiser_loss(dmodel, act_eta_train=0.8, act_ref=ref, act_mask=mask)
    result = placement.search(dmodel, dvars, digits, loss_fn, digits.test.images[:600],
                              digits.test.labels[:600], spec, budget=0.1, key=0, steps=150, batch_size=64,
                              learning_rate=0.05, n_chips=4, max_rounds=1,
                              candidates=("block1", "block2", "block3"))
    assert result.evaluated[0]["sites"] == []
    assert result.best["sites"] == ["block1"], [(r["sites"], r["mean"]) for r in result.evaluated]
    assert result.best["mean"] > result.evaluated[0]["mean"]
    front = result.pareto
    assert front[0]["param_overhead"] == 0 and all(a["mean"] < b["mean"] for a, b in zip(front, front[1:]))


def test_baselines_respect_the_budget(setup):
    _, _, _, dmodel, _ = setup
    costs = placement.site_params(dmodel)
    total = dmodel.backbone.param_count()
    for seed in range(5):
        gates = placement.random_placement(dmodel, 0.1, seed=seed)
        assert np.dot(gates, costs) <= 0.1 * total
    np.testing.assert_array_equal(placement.every_block_placement(dmodel), [1, 1, 1, 0])
    g = placement.most_sensitive_placement(dmodel, {"block1": 0.1, "block2": 0.3, "block3": 0.2}, 0.1)
    np.testing.assert_array_equal(g, [0, 1, 0, 0])
    with pytest.raises(ValueError, match="within the budget"):
        placement.most_sensitive_placement(dmodel, {"block2": 1.0}, 1e-5)
    with pytest.raises(ValueError, match="budget"):
        placement.search(dmodel, None, None, None, None, None, None, budget=0.0, key=0)
    with pytest.raises(ValueError, match="strategy"):
        placement.search(dmodel, None, None, None, None, None, None, budget=0.1, key=0, strategy="anneal")


def test_pareto_front():
    pts = [{"param_overhead": 0.0, "mean": 0.5}, {"param_overhead": 0.01, "mean": 0.7},
           {"param_overhead": 0.02, "mean": 0.6}, {"param_overhead": 0.03, "mean": 0.8}]
    front = placement.pareto_front(pts)
    assert [p["mean"] for p in front] == [0.5, 0.7, 0.8]


def test_removal_sensitivity_with_one_chip_and_negative_gains(digits):
    """Gains are paired differences (they can be negative: the CI is clipped to [-1, 1], not [0, 1]); with one chip
    every ``ci95`` is None instead of a zero-width interval."""
    from _helpers import he_variables
    model = get_model("mlp")
    variables = he_variables(model)
    spec = noise.NoiseSpec(weight_kind=None, act_kind="multiplicative", act_eta=2.0)
    kw = dict(key=0, batch_size=60, preprocess=digits.preprocess)
    x, y = digits.test.images[:60], digits.test.labels[:60]
    one = placement.removal_sensitivity(model, variables, x, y, spec, n_chips=1, **kw)
    assert one["noisy"]["ci95"] is None and all(v["ci95"] is None for v in one["sites"].values())
    many = placement.removal_sensitivity(model, variables, x, y, spec, n_chips=3, **kw)
    for v in many["sites"].values():
        lo, hi = v["ci95"]
        assert -1.0 <= lo <= v["gain"] <= hi <= 1.0
