"""Tests of the Monte Carlo evaluator (jaxnoise.robustness).

Most tests share one trained MLP on the digits dataset and one data layout (the first 90 test images, data batches
of 40, so the last batch is padded) so that they reuse compiled programs; XLA compilation dominates the runtime.
Per-chip accuracies from differently vmapped/chunked programs may differ by float rounding; a rounding difference
can flip at most a near-tied prediction, so those comparisons allow one image per chip.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

from jaxnoise import noise, robustness
from jaxnoise.data import load_dataset
from jaxnoise.models import get_model

N_IMAGES = 90
BATCH = 40          # 90 = 2 * 40 + 10: the last batch is padded and masked
N_CHIPS = 5
W_SPEC = noise.NoiseSpec(weight_eta=0.3)   # additive_rel_max, strong enough to change predictions


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def trained_mlp(digits):
    """An MLP trained for 150 full-batch Adam steps on digits (about 95% test accuracy)."""
    model = get_model("mlp")
    variables = model.init(jax.random.key(0))
    x = digits.preprocess(digits.train.images)
    y = jnp.asarray(digits.train.labels)
    opt = optax.adam(1e-2)

    def loss(params):
        logits = model.apply({**variables, "params": params}, x).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def train(params):
        def step(carry, _):
            params, state = carry
            grads = jax.grad(loss)(params)
            updates, state = opt.update(grads, state)
            return (optax.apply_updates(params, updates), state), None
        (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=150)
        return params

    variables = {**variables, "params": train(variables["params"])}
    return model, variables


@pytest.fixture(scope="module")
def data(digits):
    return digits.test.images[:N_IMAGES], digits.test.labels[:N_IMAGES], digits.preprocess


def _eval(trained_mlp, data, spec=W_SPEC, **kw):
    model, variables = trained_mlp
    images, labels, pre = data
    kw = {"key": jax.random.key(1), "n_chips": N_CHIPS, "batch_size": BATCH, "chip_batch_size": 1, **kw}
    return robustness.evaluate(model, variables, images, labels, spec, preprocess=pre, **kw)


def _manual(model, variables, images, labels, spec, key, n_chips, batch_size, pre=None, *,
            redraw_weights_per_batch=False, same_act_key_every_batch=False):
    """The documented semantics as a plain Python loop (eager, unjitted), with two deliberate deviations."""
    out = []
    for i in range(n_chips):
        chip_key = jax.random.fold_in(key, i)
        params = noise.perturb_weights(noise.weight_key(chip_key), variables["params"], spec)
        noisy = {**variables, "params": params}
        correct = 0
        for b, start in enumerate(range(0, len(labels), batch_size)):
            x = jnp.asarray(images[start:start + batch_size])
            x = pre(x) if pre is not None else x
            batch_key = jax.random.fold_in(chip_key, 0 if same_act_key_every_batch else b)
            if redraw_weights_per_batch:
                logits = model.apply(variables, x, key=batch_key, noise=spec).logits
            else:
                logits = model.apply(noisy, x, key=batch_key, noise=spec.activation_only()).logits
            correct += int(jnp.sum(jnp.argmax(logits, -1) == jnp.asarray(labels[start:start + batch_size])))
        out.append(correct / len(labels))
    return np.array(out)


# ------------------------------------------------------------------------------------------------------------------
# Keys and semantics


def test_chip_keys_are_fold_in_of_the_index():
    key = jax.random.key(7)
    keys = robustness.chip_keys(key, 4, start=3)
    assert keys.shape == (4,)
    for j in range(4):
        np.testing.assert_array_equal(jax.random.key_data(keys[j]),
                                      jax.random.key_data(jax.random.fold_in(key, 3 + j)))
    assert robustness.chip_keys(key, 0).shape == (0,)
    # int seeds and raw uint32 keys work too
    np.testing.assert_array_equal(jax.random.key_data(robustness.chip_keys(7, 2)),
                                  jax.random.key_data(robustness.chip_keys(key, 2)))
    raw = robustness.chip_keys(jax.random.PRNGKey(7), 2)
    np.testing.assert_array_equal(raw[1], jax.random.fold_in(jax.random.PRNGKey(7), 1))


def test_cnn_weight_and_activation_noise_match_python_loop():
    # Conv + BatchNorm model, weight and activation noise together, random labels (uneven batches: MLP tests).
    model = get_model("cnn")
    variables = model.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(40, 8, 8, 1)).astype(np.float32)
    labels = rng.integers(0, 10, 40).astype(np.int32)
    spec = noise.NoiseSpec(weight_eta=0.2, act_kind="multiplicative", act_eta=0.5)
    key = jax.random.key(3)
    res = robustness.evaluate(model, variables, images, labels, spec, key=key, n_chips=3, batch_size=20)
    manual = _manual(model, variables, images, labels, spec, key, 3, 20)
    np.testing.assert_allclose(res.per_chip, manual, atol=1.01 / 40)
    assert res.n_images == 40 and res.n_chips == 3


def test_weights_fixed_per_chip_and_activation_noise_fresh_per_batch(trained_mlp, data):
    # Observable through make_chip_eval: feed the same batch twice. With weight noise only (fixed per chip) the
    # count doubles exactly, for every chip. With activation noise only, each batch gets a fresh draw, so the
    # count differs from twice the one-batch count for some chip. One spec whose scales are vmapped over
    # (weight_eta, act_eta) pairs: this also checks that chip_correct vmaps over chips and scale leaves.
    model, variables = trained_mlp
    images, labels, pre = data
    x, y = jnp.asarray(images[:40])[None], jnp.asarray(labels[:40])[None]
    valid = jnp.ones((1, 40), bool)
    twice = lambda a: jnp.concatenate([a, a])  # noqa: E731
    chip_correct = robustness.make_chip_eval(model, batch_size=40, preprocess=pre)
    keys = robustness.chip_keys(jax.random.key(5), 8)
    scales = jnp.array([[0.0, 0.0], [0.3, 0.0], [0.0, 1.0]], jnp.float32)  # clean, weight only, act only

    def grid(xb, yb, vb):
        def one(scale, chip_key):
            spec = noise.NoiseSpec(weight_eta=scale[0], act_kind="multiplicative", act_eta=scale[1])
            return chip_correct(variables, xb, yb, vb, spec, chip_key)
        return jax.vmap(lambda s: jax.vmap(lambda k: one(s, k))(keys))(scales)  # (scale, chip)

    counts = jax.jit(lambda: (grid(x, y, valid), grid(twice(x), twice(y), twice(valid))))()
    once, two = (np.asarray(c) for c in counts)
    clean = int(jnp.sum(jnp.argmax(model.apply(variables, pre(x[0]))[0], -1) == y[0]))
    np.testing.assert_array_equal(once[0], clean)
    np.testing.assert_array_equal(two[1], 2 * once[1])          # weight draw fixed per chip
    assert len(set(once[1].tolist())) > 1                       # chips differ
    assert np.any(two[2] != 2 * once[2])                         # activation noise fresh per batch
    # chip 0 of the weight-only row is the documented chip: weights from weight_key(chip_key)
    manual = _manual(model, variables, images[:40], labels[:40], noise.NoiseSpec(weight_eta=0.3),
                     jax.random.key(5), 1, 40, pre)
    assert abs(once[1, 0] / 40 - manual[0]) <= 1.01 / 40


def test_evaluate_matches_semantics_and_not_the_deviations(trained_mlp, data):
    # The manual loop of the documented semantics matches; the two wrong variants (weights re-drawn per batch,
    # activation noise reused across batches) do not, so the comparison has the power to catch them.
    model, variables = trained_mlp
    images, labels, pre = data
    spec = noise.NoiseSpec(weight_eta=0.3, act_kind="multiplicative", act_eta=1.0)
    key = jax.random.key(1)
    res = _eval(trained_mlp, data, spec)
    right = _manual(model, variables, images, labels, spec, key, N_CHIPS, BATCH, pre)
    np.testing.assert_allclose(res.per_chip, right, atol=1.01 / N_IMAGES)
    for deviation in ("redraw_weights_per_batch", "same_act_key_every_batch"):
        wrong = _manual(model, variables, images, labels, spec, key, N_CHIPS, BATCH, pre, **{deviation: True})
        assert np.sum(np.abs(wrong - res.per_chip)) > 2.5 / N_IMAGES, deviation


@pytest.mark.parametrize("chip_batch_size", [2, 3])
def test_chunked_equals_unchunked(trained_mlp, data, chip_batch_size):
    ref = _eval(trained_mlp, data)
    res = _eval(trained_mlp, data, chip_batch_size=chip_batch_size)  # 5 chips: uneven chunks + remainder
    np.testing.assert_allclose(res.per_chip, ref.per_chip, atol=1.01 / N_IMAGES)


def test_padded_last_batch_is_masked(trained_mlp, data):
    ref = _eval(trained_mlp, data, batch_size=N_IMAGES)   # one batch, no padding
    res = _eval(trained_mlp, data)                         # 40 + 40 + 10 (30 padded)
    np.testing.assert_allclose(res.per_chip, ref.per_chip, atol=1.01 / N_IMAGES)
    # clean accuracy too
    model, variables = trained_mlp
    images, labels, pre = data
    clean = np.mean(np.argmax(model.apply(variables, pre(images))[0], -1) == labels)
    assert _eval(trained_mlp, data, spec=None).mean == pytest.approx(clean)


def test_zero_scale_is_clean_and_a_spec_without_key_is_an_error(trained_mlp, data):
    clean = _eval(trained_mlp, data, spec=None)
    assert clean.n_chips == 1 and clean.per_chip.shape == (1,)
    assert clean.std is None and clean.se is None and clean.ci95 is None  # undefined from one chip
    assert clean.noise == {"weight_noise": None, "activation_noise": None}
    assert clean.mean > 0.8  # trained
    with pytest.raises(ValueError, match=r"a noise spec needs key=.*a clean evaluation is spec=None"):
        _eval(trained_mlp, data, key=None)  # used to return the clean accuracy silently
    zero = _eval(trained_mlp, data, spec=W_SPEC.replace(weight_eta=0.0))
    assert zero.n_chips == N_CHIPS
    np.testing.assert_array_equal(zero.per_chip, np.full(N_CHIPS, clean.mean))


def test_chips_differ_same_key_reproduces_and_chips_independent_of_n_chips(trained_mlp, data):
    a = _eval(trained_mlp, data)
    assert len(set(a.per_chip.tolist())) > 1
    np.testing.assert_array_equal(_eval(trained_mlp, data).per_chip, a.per_chip)
    other = _eval(trained_mlp, data, key=jax.random.key(2))
    assert not np.array_equal(other.per_chip, a.per_chip)
    first3 = _eval(trained_mlp, data, n_chips=3)
    np.testing.assert_allclose(first3.per_chip, a.per_chip[:3], atol=1.01 / N_IMAGES)


# ------------------------------------------------------------------------------------------------------------------
# Sweep


def test_sweep_compiles_once_and_matches_evaluate(trained_mlp, data):
    model, variables = trained_mlp
    images, labels, pre = data
    etas = [0.0, 0.1, 0.2, 0.4, 0.8]
    kw = dict(key=jax.random.key(1), n_chips=N_CHIPS, batch_size=45, chip_batch_size=1, preprocess=pre)
    before = robustness.trace_count()
    results = robustness.sweep(model, variables, images, labels, W_SPEC, weight_etas=etas, **kw)
    assert robustness.trace_count() - before == 1  # batch_size 45: a layout no other test compiles
    assert [r.weight_eta for r in results] == etas and all(r.act_eta is None for r in results)
    assert [r.to_dict()["swept"] for r in results] == [{"weight_eta": e} for e in etas]   # the axis, explicit
    # same program, same chips (common random numbers) as evaluate at each scale
    for eta, r in zip(etas, results):
        single = robustness.evaluate(model, variables, images, labels, W_SPEC.replace(weight_eta=eta), **kw)
        np.testing.assert_array_equal(single.per_chip, r.per_chip)
    assert robustness.trace_count() - before == 1
    means = [r.mean for r in results]
    assert means[0] > means[-1] + 0.2                                   # accuracy falls with noise
    assert all(b <= a + 0.03 for a, b in zip(means, means[1:]))          # monotone up to MC noise


def test_one_evaluator_gives_the_adapters_numbers_and_reuses_their_programs(trained_mlp, data):
    """MonteCarlo batches the data once; its methods give the one-call functions' per-chip values bit for bit,
    through the same compiled programs (other variables of the model included)."""
    model, variables = trained_mlp
    images, labels, pre = data
    kw = dict(batch_size=BATCH, chip_batch_size=1, preprocess=pre)
    mc = robustness.MonteCarlo(model, images, labels, **kw)
    assert mc.n_images == N_IMAGES
    key = jax.random.key(1)
    spec = W_SPEC.replace(act_kind="multiplicative", act_eta=0.2)
    one = robustness.evaluate(model, variables, images, labels, spec, key=key, n_chips=N_CHIPS, **kw)
    before = robustness.trace_count()
    np.testing.assert_array_equal(mc.evaluate(variables, spec, key=key, n_chips=N_CHIPS).per_chip, one.per_chip)
    untrained = model.init(jax.random.key(5))   # other variables of the architecture
    assert mc.evaluate(untrained, spec, key=key, n_chips=N_CHIPS).mean < one.mean - 0.1
    assert robustness.trace_count() == before
    assert mc.clean(variables).mean == robustness.evaluate(model, variables, images, labels, **kw).mean
    etas = [0.1, 0.3]
    swept = mc.sweep(variables, W_SPEC, weight_etas=etas, key=key, n_chips=N_CHIPS)
    ref = robustness.sweep(model, variables, images, labels, W_SPEC, weight_etas=etas, key=key, n_chips=N_CHIPS, **kw)
    for a, b in zip(swept, ref):
        np.testing.assert_array_equal(a.per_chip, b.per_chip)
    specs = [W_SPEC.replace(weight_eta=e) for e in etas]
    many = mc.evaluate_many(variables, specs, key=key, n_chips=N_CHIPS)
    ref = robustness.evaluate_many(model, variables, images, labels, specs, key=key, n_chips=N_CHIPS, **kw)
    for a, b in zip(many, ref):
        np.testing.assert_array_equal(a.per_chip, b.per_chip)


def test_an_evaluator_checks_its_data_at_once_and_each_call_before_the_data_moves(trained_mlp, data, monkeypatch):
    model, variables = trained_mlp
    images, labels, pre = data
    with pytest.raises(ValueError, match="same length"):
        robustness.MonteCarlo(model, images, labels[:-1], preprocess=pre)
    with pytest.raises(ValueError, match="chip_batch_size"):
        robustness.MonteCarlo(model, images, labels, preprocess=pre, chip_batch_size=0)
    mc = robustness.MonteCarlo(model, images, labels, preprocess=pre, batch_size=BATCH)
    with pytest.raises(ValueError, match="^MonteCarlo.evaluate: a noise spec needs key"):
        mc.evaluate(variables, W_SPEC)
    monkeypatch.setattr(robustness, "available_memory_bytes", lambda device=None: 1)
    with pytest.raises(robustness.InsufficientMemoryError, match="^MonteCarlo.evaluate: this call needs"):
        mc.evaluate(variables, W_SPEC, key=0, n_chips=2)
    assert "images_b" not in vars(mc._data)   # refused before the images were put on the device


def test_what_is_cached_for_a_model_dies_with_it():
    """The memory guard's and the checks' per-model caches live on the model, not in global id()-keyed tables."""
    import gc
    import weakref
    model = get_model("mlp", input_shape=(8, 8, 1), hidden=(7,))
    variables = model.init(jax.random.key(0))
    assert robustness.estimate_memory_bytes(model, variables, 10, 1, 2) > 0   # fills the caches
    robustness.check_inputs(model, variables, [None])
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_sweep_grids(trained_mlp, data):
    model, variables = trained_mlp
    images, labels, pre = data
    spec = noise.NoiseSpec(act_kind="multiplicative")
    kw = dict(key=0, n_chips=2, batch_size=BATCH, preprocess=pre)
    prod = robustness.sweep(model, variables, images, labels, spec, weight_etas=[0.0, 0.2], act_etas=[0.0, 0.5],
                            **kw)
    assert [(r.weight_eta, r.act_eta) for r in prod] == [(0.0, 0.0), (0.0, 0.5), (0.2, 0.0), (0.2, 0.5)]
    zipped = robustness.sweep(model, variables, images, labels, spec, weight_etas=[0.0, 0.2], act_etas=[0.0, 0.5],
                              grid="zip", **kw)
    assert [(r.weight_eta, r.act_eta) for r in zipped] == [(0.0, 0.0), (0.2, 0.5)]
    np.testing.assert_array_equal(zipped[1].per_chip, prod[3].per_chip)
    np.testing.assert_array_equal(prod[0].per_chip, np.full(2, _eval(trained_mlp, data, spec=None).mean))


# ------------------------------------------------------------------------------------------------------------------
# Statistics


def test_summarize_against_numpy_scipy():
    a = np.array([0.71, 0.69, 0.74, 0.70, 0.66, 0.72, 0.68])
    s = robustness.summarize(a)
    n = len(a)
    mean, std = a.sum() / n, np.sqrt(((a - a.mean()) ** 2).sum() / (n - 1))
    lo, hi = scipy.stats.t.interval(0.95, n - 1, loc=mean, scale=std / np.sqrt(n))
    assert s["n_chips"] == n
    assert s["mean"] == pytest.approx(mean) and s["std"] == pytest.approx(std)
    assert s["se"] == pytest.approx(std / np.sqrt(n))
    assert s["ci95"] == pytest.approx([lo, hi])
    sorted_a = np.sort(a)  # linear-interpolation percentile by hand: rank 0.05 * (n - 1)
    r = 0.05 * (n - 1)
    assert s["p5"] == pytest.approx(sorted_a[0] + (r - 0) * (sorted_a[1] - sorted_a[0]))
    one = robustness.summarize([0.5])
    assert one == {"n_chips": 1, "mean": 0.5, "std": None, "se": None, "ci95": None, "p5": 0.5}
    with pytest.raises(ValueError, match="at least one"):
        robustness.summarize([])


def test_mc_result_to_dict():
    r = robustness.MCResult.from_per_chip([0.5, 0.7], 10, noise.NoiseSpec(weight_eta=0.1).describe())
    d = r.to_dict()
    assert d["weight_noise"] == {"kind": "additive_rel_max", "eta": 0.1} and d["activation_noise"] is None
    assert d["n_chips"] == 2 and d["per_chip"] == [0.5, 0.7] and d["mean"] == pytest.approx(0.6)
    assert isinstance(d["ci95"], list) and d["ci95"][0] < 0.6 < d["ci95"][1]


# ------------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_raises_clear_errors(trained_mlp, data):
    model, variables = trained_mlp
    images, labels, pre = data
    before = robustness.trace_count()
    with pytest.raises(ValueError, match="negative"):
        robustness.sweep(model, variables, images, labels, W_SPEC, weight_etas=[0.1, -0.1], key=0, preprocess=pre)
    with pytest.raises(ValueError, match="not finite"):
        robustness.sweep(model, variables, images, labels, W_SPEC, weight_etas=[float("nan")], key=0,
                         preprocess=pre)
    with pytest.raises(ValueError, match="empty"):
        robustness.sweep(model, variables, images, labels, W_SPEC, weight_etas=[], key=0, preprocess=pre)
    with pytest.raises(ValueError, match="act_kind is None"):
        robustness.sweep(model, variables, images, labels, W_SPEC, act_etas=[0.1], key=0, preprocess=pre)
    with pytest.raises(ValueError, match="equally long"):
        robustness.sweep(model, variables, images, labels, W_SPEC.replace(act_kind="multiplicative"),
                         weight_etas=[0.1], act_etas=[0.1, 0.2], grid="zip", key=0, preprocess=pre)
    with pytest.raises(ValueError, match="not finite"):
        _eval(trained_mlp, data, spec=noise.NoiseSpec(weight_eta=float("nan")))
    with pytest.raises(ValueError, match="n_chips=0"):
        _eval(trained_mlp, data, n_chips=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        _eval(trained_mlp, data, batch_size=0)
    with pytest.raises(ValueError, match="chip_batch_size=0"):
        _eval(trained_mlp, data, chip_batch_size=0)
    with pytest.raises(ValueError, match="same length"):
        robustness.evaluate(model, variables, images, labels[:-1], W_SPEC, key=0, preprocess=pre)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        robustness.evaluate(model, variables, images, labels + 5, W_SPEC, key=0, preprocess=pre)
    with pytest.raises(ValueError, match="no preprocess"):
        robustness.evaluate(model, variables, images, labels, W_SPEC, key=0)
    with pytest.raises(ValueError, match="zero images"):
        robustness.evaluate(model, variables, images[:0], labels[:0], key=0, preprocess=pre)
    assert robustness.trace_count() == before  # everything rejected before compiling


# ----------------------------------------------------------------------------------------------------------------
# Adaptive Monte Carlo


def _threshold_model(n_images: int = 100):
    """The synthetic model with a known per-chip accuracy distribution (``jaxnoise.testing``)."""
    from jaxnoise.testing import threshold_problem
    return threshold_problem(n_images)


THRESHOLD_SPEC = noise.NoiseSpec(weight_kind="multiplicative", weight_eta=1.0)


def test_threshold_model_has_the_known_distribution():
    model, variables, images, labels, true_mean = _threshold_model()
    res = robustness.evaluate(model, variables, images, labels, THRESHOLD_SPEC, key=0, n_chips=4000)
    assert abs(res.mean - true_mean) < 4 * res.se
    assert abs(res.std - np.sqrt(1 / 18)) < 0.01  # sqrt(U): variance 1/2 - 4/9


def test_adaptive_stops_at_target_and_keeps_every_chip():
    model, variables, images, labels, _ = _threshold_model()
    kw = dict(key=7, n_chips=10)
    res = robustness.evaluate(model, variables, images, labels, THRESHOLD_SPEC, target_ci_halfwidth=0.05,
                              max_chips=1000, **kw)
    st = res.stopping
    assert st["met_target"] and st["ci_halfwidth"] <= 0.05 and st["round_chips"] == 10
    assert res.n_chips == 10 * st["rounds"] and len(res.per_chip) == res.n_chips
    # The previous round had not met the target; the chips are chips 0..n-1 of a fixed run.
    assert robustness.ci_halfwidth(res.per_chip[:-10]) > 0.05
    fixed = robustness.evaluate(model, variables, images, labels, THRESHOLD_SPEC, key=7, n_chips=res.n_chips)
    np.testing.assert_array_equal(res.per_chip, fixed.per_chip)
    assert res.to_dict()["stopping"] == st
    # (t * sigma / h)^2 ~ 86 chips for sigma = sqrt(1/18), h = 0.05.
    assert 40 <= res.n_chips <= 160


def test_adaptive_cap_and_one_compilation():
    model, variables, images, labels, _ = _threshold_model()
    robustness.evaluate(model, variables, images, labels, THRESHOLD_SPEC, key=0, n_chips=8)  # compile
    before = robustness.trace_count()
    res = robustness.evaluate(model, variables, images, labels, THRESHOLD_SPEC, key=1, n_chips=8,
                              target_ci_halfwidth=1e-4, max_chips=30)
    assert robustness.trace_count() == before  # every round reuses the 8-chip program
    assert res.n_chips == 30 and res.stopping["rounds"] == 4 and not res.stopping["met_target"]


def test_adaptive_ci_coverage_on_known_answer():
    """Over 200 independent adaptive runs, the reported 95% CI covers the known mean in >= 90% of runs.

    The nominal level is 95%; sequential stopping on the estimated spread lowers it slightly (see the docstring of
    ``evaluate``). With 200 runs the binomial standard error is ~1.5 points.
    """
    model, variables, images, labels, true_mean = _threshold_model()
    covered, chips = [], []
    for seed in range(200):
        res = robustness.evaluate(model, variables, images, labels, THRESHOLD_SPEC, key=1000 + seed, n_chips=10,
                                  target_ci_halfwidth=0.05, max_chips=1000)
        assert res.stopping["met_target"]
        covered.append(res.ci95[0] <= true_mean <= res.ci95[1])
        chips.append(res.n_chips)
    coverage = float(np.mean(covered))
    assert coverage >= 0.90, (coverage, np.mean(chips))


@pytest.mark.parametrize("kw, match", [
    (dict(target_ci_halfwidth=0.0), "positive"),
    (dict(target_ci_halfwidth=float("nan")), "positive"),
    (dict(target_ci_halfwidth=0.01, n_chips=1), ">= 2"),
    (dict(target_ci_halfwidth=0.01, n_chips=8, max_chips=4), "max_chips"),
    (dict(max_chips=100), "target_ci_halfwidth"),
])
def test_adaptive_bad_arguments(kw, match):
    model, variables, images, labels, _ = _threshold_model()
    with pytest.raises(ValueError, match=match):
        robustness.evaluate(model, variables, images, labels, THRESHOLD_SPEC, key=0, **kw)


def test_evaluate_many_bad_inputs_name_the_problem():
    model, variables, images, labels, _ = _threshold_model()
    kw = dict(key=0, n_chips=2)
    with pytest.raises(ValueError, match="at least one NoiseSpec"):
        robustness.evaluate_many(model, variables, images, labels, [], **kw)
    with pytest.raises(ValueError, match="not a NoiseSpec"):
        robustness.evaluate_many(model, variables, images, labels, [THRESHOLD_SPEC, {"weight_eta": 1.0}], **kw)
    with pytest.raises(ValueError, match="differs in structure"):
        robustness.evaluate_many(model, variables, images, labels,
                                 [THRESHOLD_SPEC, THRESHOLD_SPEC.replace(weight_mask={"w/kernel": 1.0})], **kw)
    with pytest.raises(ValueError, match="setting_batch_size"):
        robustness.evaluate_many(model, variables, images, labels, [THRESHOLD_SPEC], setting_batch_size=0, **kw)
    with pytest.raises(ValueError, match="needs key="):
        robustness.evaluate_many(model, variables, images, labels, [THRESHOLD_SPEC], key=None, n_chips=2)


def test_evaluate_many_equals_separate_evaluations_and_vmapped_settings():
    model, variables, images, labels, _ = _threshold_model()
    specs = [THRESHOLD_SPEC.replace(weight_eta=e) for e in (0.5, 1.0, 2.0)]
    many = robustness.evaluate_many(model, variables, images, labels, specs, key=3, n_chips=4)
    vmapped = robustness.evaluate_many(model, variables, images, labels, specs, key=3, n_chips=4,
                                       setting_batch_size=3)
    for sp, a, b in zip(specs, many, vmapped):
        ref = robustness.evaluate(model, variables, images, labels, sp, key=3, n_chips=4)
        np.testing.assert_array_equal(a.per_chip, ref.per_chip)
        np.testing.assert_array_equal(b.per_chip, ref.per_chip)
        assert a.weight_eta == sp.weight_eta


# ----------------------------------------------------------------------------------------------------------------
# Streamed splits (jaxnoise.stream over the mock imagenet2012 of conftest.py)


def _stream_setup(mock_imagenet):
    import dataclasses as dc

    from jaxnoise import data as data_lib
    ds = data_lib.load_dataset("imagenet2012", data_dir=mock_imagenet, resolution=32, workers=0)
    model = get_model("cnn", input_shape=(32, 32, 3), num_classes=1000, channels=(8,))
    v = model.init(jax.random.key(0))
    v["params"]["head"]["bias"] = v["params"]["head"]["bias"].at[:10].set(3.0)   # predictions among the used labels
    return dc, ds, ds.test.materialize(), model, v


def test_streamed_split_gives_the_in_memory_per_chip_results(mock_imagenet):
    dc, ds, mem, model, v = _stream_setup(mock_imagenet)
    spec = noise.NoiseSpec(weight_kind="additive_rel_max", weight_eta=0.3, act_kind="multiplicative", act_eta=0.3)
    kw = dict(batch_size=10, preprocess=ds.preprocess)
    for args in (dict(), dict(spec=spec, key=0, n_chips=3)):
        a = robustness.evaluate(model, v, mem.images, mem.labels, **args, **kw)
        b = robustness.evaluate(model, v, ds.test, None, **args, **kw)
        np.testing.assert_array_equal(a.per_chip, b.per_chip)
        assert b.n_images == 32
    assert len(set(b.per_chip)) > 1   # the chips differ


@pytest.mark.slow
def test_streamed_sweep_and_chip_groups(mock_imagenet):
    dc, ds, mem, model, v = _stream_setup(mock_imagenet)
    spec = noise.NoiseSpec(weight_kind="additive_rel_max", weight_eta=0.3, act_kind="multiplicative", act_eta=0.3)
    kw = dict(batch_size=10, preprocess=ds.preprocess)
    b = robustness.evaluate(model, v, ds.test, None, spec, key=0, n_chips=3, **kw)
    # chip groups: chip i keeps its key whatever group it streams in
    grouped = robustness.evaluate(model, v, dc.replace(ds.test, chips_per_pass=2), None, spec, key=0, n_chips=3, **kw)
    np.testing.assert_array_equal(grouped.per_chip, b.per_chip)
    a = robustness.sweep(model, v, mem.images, mem.labels, spec, weight_etas=[0.1, 0.5], key=1, n_chips=2, **kw)
    b = robustness.sweep(model, v, ds.test, None, spec, weight_etas=[0.1, 0.5], key=1, n_chips=2, **kw)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.per_chip, y.per_chip)
        assert x.to_dict()["weight_noise"] == y.to_dict()["weight_noise"]


def test_streamed_bad_input_is_refused(mock_imagenet):
    dc, ds, mem, model, v = _stream_setup(mock_imagenet)
    kw = dict(batch_size=16, preprocess=ds.preprocess)
    with pytest.raises(ValueError, match="carries its labels"):
        robustness.evaluate(model, v, ds.test, mem.labels, **kw)
    with pytest.raises(ValueError, match="resolution=8 or build the model with input_shape"):
        robustness.evaluate(get_model("cnn"), get_model("cnn").init(jax.random.key(0)), ds.test, None, **kw)
    with pytest.raises(ValueError, match="preprocess=dataset.preprocess"):
        robustness.evaluate(model, v, ds.test, None, batch_size=16)
    with pytest.raises(ValueError, match="mesh= with a streamed split"):
        robustness.evaluate(model, v, ds.test, None, noise.NoiseSpec(weight_eta=0.1), key=0, n_chips=2,
                            mesh=jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("chips", "data")),
                            **kw)


@pytest.mark.slow
def test_streamed_device_and_many(mock_imagenet):
    from jaxnoise import analog as analog_lib
    dc, ds, mem, model, v = _stream_setup(mock_imagenet)
    kw = dict(batch_size=16, preprocess=ds.preprocess)
    dev = analog_lib.preset("aihwkit_inference_default")
    a = robustness.evaluate_analog(model, v, mem.images, mem.labels, dev, times=[1, 3600], key=0, n_chips=2, **kw)
    b = robustness.evaluate_analog(model, v, ds.test, None, dev, times=[1, 3600], key=0, n_chips=2, **kw)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.per_chip, y.per_chip)
    specs = [noise.NoiseSpec(weight_eta=e) for e in (0.2, 0.4)]
    a = robustness.evaluate_many(model, v, mem.images, mem.labels, specs, key=2, n_chips=2, **kw)
    b = robustness.evaluate_many(model, v, ds.test, None, specs, key=2, n_chips=2, **kw)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.per_chip, y.per_chip)


@pytest.mark.slow
def test_streamed_sensitivity_map_equals_the_in_memory_one(mock_imagenet):
    from jaxnoise import sensitivity
    dc, ds, mem, model, v = _stream_setup(mock_imagenet)
    kw = dict(noise="weight", scales=[0.3], key=0, n_chips=2, batch_size=10, preprocess=ds.preprocess)
    a = sensitivity.sensitivity_map(model, v, mem.images, mem.labels, **kw)
    b = sensitivity.sensitivity_map(model, v, ds.test, None, **kw)
    assert a.layers == b.layers and len(a.layers) > 1
    for ra, rb in zip([r for row in a.results for r in row] + a.all_layers + [a.clean],
                      [r for row in b.results for r in row] + b.all_layers + [b.clean]):
        np.testing.assert_array_equal(ra.per_chip, rb.per_chip)
        assert rb.n_images == 32
