"""The normal samplers of the noise core (``noise.SAMPLERS``): statistics, keys, transformations, recording.

Every test runs for every sampler offered. Tolerances: with n independent N(0, 1) draws the sample mean has sd
1/sqrt(n), the sample std about 1/sqrt(2n), a proportion p has sd sqrt(p(1-p)/n) and a correlation about 1/sqrt(n);
the tests allow 5 of those. The Kolmogorov-Smirnov bound is the 1e-6 critical value plus the transform's resolution
(icdf16 has 65536 equally likely values: its distribution function is within 1.1e-5 of the normal's). Keys are
fixed, so the tests are deterministic. tests/conftest.py turns ``jax_debug_key_reuse`` on for all of them.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from jaxnoise import noise, report, robustness
from jaxnoise.data import load_dataset
from jaxnoise.models import get_model

SAMPLERS = sorted(noise.SAMPLERS)
SHAPE = (1025, 1023)  # 1,048,575 draws: >= 1e6, and odd (the icdf16 padding of the last word)
N = math.prod(SHAPE)
RESOLUTION = {"erfinv": 1e-6, "icdf16": 1.1e-5}  # sup |F_sampler - Phi| of the transform
MAX_ABS = {"erfinv": 5.42, "icdf16": 4.325}
CHECK_RESULTS = os.path.join("..", "shared", "check_results.py")


def _draw(sampler, key=0, shape=SHAPE, dtype=jnp.float32):
    return noise.standard_normal(jax.random.key(key), shape, dtype, sampler)


def _corr(a, b):
    return float(np.corrcoef(np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel())[0, 1])


@pytest.fixture(scope="module", params=SAMPLERS)
def sampler(request):
    return request.param


@pytest.fixture(scope="module")
def draws(sampler):
    return np.asarray(jax.jit(lambda k: noise.standard_normal(k, SHAPE, jnp.float32, sampler))(jax.random.key(0)),
                      np.float64).ravel()


# ----------------------------------------------------------------------------------------------------------------
# Statistics


def test_mean_and_std(draws):
    assert abs(draws.mean()) < 5 / math.sqrt(N), draws.mean()
    assert abs(draws.std() - 1) < 5 / math.sqrt(2 * N), draws.std()


def test_kolmogorov_smirnov(draws, sampler):
    d = scipy.stats.kstest(draws, "norm").statistic
    critical = math.sqrt(-math.log(1e-6 / 2) / 2) / math.sqrt(N)
    assert d < critical + RESOLUTION[sampler.split("/")[1]], (d, critical)


def test_chi_square_over_equiprobable_bins(draws):
    edges = scipy.stats.norm.ppf(np.linspace(0, 1, 101))
    counts, _ = np.histogram(draws, edges)
    assert counts.sum() == N
    assert scipy.stats.chisquare(counts).pvalue > 1e-6


def test_tail_mass_and_range(draws, sampler):
    p3 = 2 * scipy.stats.norm.sf(3)  # 0.0026998
    tail = float(np.mean(np.abs(draws) > 3))
    assert abs(tail - p3) < 5 * math.sqrt(p3 * (1 - p3) / N), tail
    assert np.abs(draws).max() <= MAX_ABS[sampler.split("/")[1]] + 1e-6


def test_neighbouring_draws_are_uncorrelated(draws):
    # icdf16 puts the two halves of a word next to each other: they must be independent too.
    for lag in (1, 2, 3):
        assert abs(_corr(draws[:-lag], draws[lag:])) < 5 / math.sqrt(N)
    assert abs(_corr(draws[0:-1:2], draws[1::2])) < 5 / math.sqrt(N // 2)
    assert abs(_corr(draws[:-1] ** 2, draws[1:] ** 2)) < 5 * math.sqrt(2) / math.sqrt(N)  # also in magnitude


def test_icdf16_table():
    t = noise.icdf16_table().astype(np.float64)
    assert t.shape == (65536,) and np.all(np.diff(t) > 0)
    np.testing.assert_array_equal(t, -t[::-1])                          # exactly symmetric: mean 0
    assert abs(np.mean(t * t) - 1) < 1e-6                               # unit variance
    assert abs(t.max() - 4.325) < 1e-3
    k = np.arange(65536)
    phi = scipy.stats.norm.cdf(t)  # the sampler's CDF jumps from k/65536 to (k+1)/65536 at t[k]
    assert max(np.max(np.abs(phi - k / 65536)), np.max(np.abs(phi - (k + 1) / 65536))) < 1.1e-5


# ----------------------------------------------------------------------------------------------------------------
# Keys: names, sites, chips


def _act_spec(sampler, **kw):
    return noise.NoiseSpec(weight_kind=None, act_kind="additive", act_eta=1.0,
                           act_ref={s: 1.0 for s in ("a", "b", "c", "new")}, sampler=sampler, **kw)


def _site_noise(key, sampler, sites, shape=(100_003,)):
    """The activation noise of each site (eta 1, ref 1, y 0) in one pass with key ``key``, in call order."""
    ctx = noise.SiteContext(key, _act_spec(sampler))
    y = jnp.zeros(shape)
    return [np.asarray(ctx(s, y)) for s in sites]


def test_site_key_derives_from_names(sampler):
    key = jax.random.key(3)
    (a,) = _site_noise(key, sampler, ["a"], shape=(64, 33))
    site_key = noise.name_key(noise.activation_key(jax.random.key(3)), "a")
    np.testing.assert_array_equal(a, noise.standard_normal(site_key, (64, 33), jnp.float32, sampler))


def test_same_key_same_draw_different_sites_differ(sampler):
    a1, b1 = _site_noise(jax.random.key(0), sampler, ["a", "b"])
    a2, b2 = _site_noise(jax.random.key(0), sampler, ["a", "b"])
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(b1, b2)
    assert not np.array_equal(a1, b1)
    assert abs(_corr(a1, b1)) < 5 / math.sqrt(a1.size)  # independent across sites


def test_inserting_a_site_keeps_the_others(sampler):
    a, c = _site_noise(jax.random.key(1), sampler, ["a", "c"])
    a2, new, c2 = _site_noise(jax.random.key(1), sampler, ["a", "new", "c"])
    np.testing.assert_array_equal(a, a2)
    np.testing.assert_array_equal(c, c2)


def test_chips_and_batches_are_independent(sampler):
    base = jax.random.key(7)
    chip0, chip1 = (jax.random.fold_in(base, i) for i in (0, 1))   # robustness.chip_keys
    (x0,) = _site_noise(jax.random.fold_in(chip0, 0), sampler, ["a"])  # batch 0 of chip 0 (make_chip_eval)
    (x1,) = _site_noise(jax.random.fold_in(chip1, 0), sampler, ["a"])  # batch 0 of chip 1
    (x0b,) = _site_noise(jax.random.fold_in(jax.random.fold_in(base, 0), 1), sampler, ["a"])  # batch 1 of chip 0
    bound = 5 / math.sqrt(x0.size)
    assert abs(_corr(x0, x1)) < bound
    assert abs(_corr(x0, x0b)) < bound
    assert abs(_corr(x0 ** 2, x1 ** 2)) < math.sqrt(2) * bound


def test_a_consumed_key_is_reported(sampler):
    # The sampler consumes its key once: the key-reuse checker (on in every test) accepts a draw and rejects reuse.
    assert jax.config.jax_debug_key_reuse
    key = jax.random.key(0)
    noise.standard_normal(key, (8,), jnp.float32, sampler)
    with pytest.raises(jax.errors.KeyReuseError):
        noise.standard_normal(key, (8,), jnp.float32, sampler)


# ----------------------------------------------------------------------------------------------------------------
# Transformations: jit, vmap, lax.map, grad, dtypes


def test_jit_vmap_and_chunked_map_give_each_key_its_own_draw(sampler):
    def draw(k):
        return noise.standard_normal(k, (5, 7), jnp.float32, sampler)

    def keys():
        return robustness.chip_keys(jax.random.key(2), 5)

    eager = np.stack([np.asarray(draw(jax.random.fold_in(jax.random.key(2), i))) for i in range(5)])
    np.testing.assert_array_equal(jax.jit(jax.vmap(draw))(keys()), eager)
    np.testing.assert_array_equal(jax.jit(lambda ks: jax.lax.map(draw, ks, batch_size=2))(keys()), eager)
    np.testing.assert_array_equal(jax.jit(lambda ks: jax.lax.map(draw, ks))(keys()), eager)
    # vmapped over scales with one key (as evaluate_many maps settings): every setting sees the same normals
    scaled = jax.jit(jax.vmap(lambda e, k: e * draw(k), in_axes=(0, None)))(jnp.array([1.0, 2.0]),
                                                                             jax.random.fold_in(jax.random.key(2), 0))
    np.testing.assert_array_equal(scaled[0], eager[0])
    np.testing.assert_allclose(scaled[1], 2 * eager[0], rtol=1e-6)
    # nested vmap (chips x batches)
    nested = jax.jit(jax.vmap(jax.vmap(draw)))(jax.vmap(lambda i: jax.vmap(
        lambda j: jax.random.fold_in(jax.random.fold_in(jax.random.key(2), i), j))(jnp.arange(3)))(jnp.arange(2)))
    for i in range(2):
        for j in range(3):
            np.testing.assert_array_equal(
                nested[i, j], draw(jax.random.fold_in(jax.random.fold_in(jax.random.key(2), i), j)))


def test_gradient_through_activation_noise(sampler):
    spec = noise.NoiseSpec(weight_kind=None, act_kind="multiplicative", act_eta=0.5, sampler=sampler)

    def f(y, key):
        return jnp.sum(noise.SiteContext(key, spec)("s", y))

    y = jnp.linspace(-1, 1, 64)
    g = jax.grad(f)(y, jax.random.key(0))
    z = noise.standard_normal(noise.name_key(noise.activation_key(jax.random.key(0)), "s"), (64,), jnp.float32,
                              sampler)
    np.testing.assert_allclose(g, 1 + 0.5 * z, rtol=1e-6)
    batched = jax.jit(jax.vmap(jax.grad(f), in_axes=(None, 0)))(y, robustness.chip_keys(0, 2))
    assert batched.shape == (2, 64) and not np.array_equal(batched[0], batched[1])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_dtypes(sampler, dtype):
    z = _draw(sampler, shape=(3, 5), dtype=dtype)
    assert z.dtype == dtype and z.shape == (3, 5)
    if sampler != noise.LEGACY_SAMPLER:
        np.testing.assert_array_equal(z, _draw(sampler, shape=(3, 5)).astype(dtype))


def test_empty_and_scalar_shapes(sampler):
    assert _draw(sampler, shape=(0, 4)).shape == (0, 4)
    assert _draw(sampler, shape=()).shape == ()


# ----------------------------------------------------------------------------------------------------------------
# The legacy sampler and the defaults


def test_legacy_sampler_is_jax_random_normal():
    for dtype in (jnp.float32, jnp.bfloat16):
        np.testing.assert_array_equal(_draw(noise.LEGACY_SAMPLER, key=4, shape=(9, 11), dtype=dtype),
                                      jax.random.normal(jax.random.key(4), (9, 11), dtype))
    # the erfinv transform is jax.random.normal's float32 transform, bit for bit
    np.testing.assert_array_equal(noise.erfinv_normals(jax.random.bits(jax.random.key(6), (10_000,), jnp.uint32)),
                                  jax.random.normal(jax.random.key(6), (10_000,)))


def test_legacy_sampler_reproduces_the_pre_sampler_noise():
    y = jnp.linspace(-2, 2, 300).reshape(20, 15)
    spec = noise.NoiseSpec(weight_kind=None, act_kind="additive", act_eta=0.3, act_ref={"s": 0.7},
                           sampler="threefry/erfinv")
    got = noise.SiteContext(jax.random.key(9), spec)("s", y)
    z = jax.random.normal(noise.name_key(noise.activation_key(jax.random.key(9)), "s"), y.shape, y.dtype)
    np.testing.assert_array_equal(got, y + jnp.float32(0.3) * jnp.float32(0.7) * z)
    # weight noise: the default sampler is jax.random.normal on every backend
    w = jax.random.normal(jax.random.key(1), (4, 4, 8, 16))
    for sampler in (None, "threefry/erfinv"):
        out = noise.perturb_weights(jax.random.key(2), {"c": {"kernel": w}}, noise.NoiseSpec(weight_eta=0.1,
                                                                                              sampler=sampler))
        z = jax.random.normal(noise.name_key(jax.random.key(2), "c/kernel"), w.shape, w.dtype)
        np.testing.assert_array_equal(out["c"]["kernel"], w + jnp.float32(0.1) * jnp.max(jnp.abs(w)) * z)


def test_default_sampler_per_backend():
    assert noise.default_sampler("cpu") == noise.DEFAULT_CPU_ACTIVATION_SAMPLER == "threefry/icdf16"
    for backend in ("gpu", "cuda", "rocm", "tpu"):
        assert noise.default_sampler(backend) == "threefry/erfinv"
    for backend in ("cpu", "gpu", "tpu"):
        assert noise.default_sampler(backend, "weight") == "threefry/erfinv"
    assert noise.default_sampler() == noise.default_sampler(jax.default_backend())
    with pytest.raises(ValueError, match="choose 'activation' or 'weight'"):
        noise.default_sampler("cpu", "device")


@pytest.mark.parametrize("bad", ["mt19937", "unsafe_rbg/erfinv", "threefry", "THREEFRY/ERFINV", 3, ("rbg", "erfinv")])
def test_unknown_samplers_are_rejected(bad):
    with pytest.raises(ValueError, match="unknown sampler"):
        noise.NoiseSpec(sampler=bad)
    with pytest.raises(ValueError, match="unknown sampler"):
        noise.standard_normal(jax.random.key(0), (2,), jnp.float32, bad)


# ----------------------------------------------------------------------------------------------------------------
# Recording


def test_describe_records_the_sampler():
    act = dict(act_kind="multiplicative", act_eta=0.1)
    d = noise.NoiseSpec(weight_eta=0.1, **act).describe("cpu")
    assert d["weight_noise"] == {"kind": "additive_rel_max", "eta": 0.1}  # threefry/erfinv: no "prng" (as before)
    assert d["activation_noise"] == {"kind": "multiplicative", "eta": 0.1, "prng": "threefry/icdf16"}
    assert noise.NoiseSpec(**act).describe("gpu")["activation_noise"]["prng"] == "threefry/erfinv"
    d = noise.NoiseSpec(weight_eta=0.1, sampler="rbg/icdf16", **act).describe("gpu")
    assert d["weight_noise"]["prng"] == d["activation_noise"]["prng"] == "rbg/icdf16"
    d = noise.NoiseSpec(weight_eta=0.1, sampler="threefry/erfinv", **act).describe("cpu")
    assert "prng" not in d["weight_noise"] and d["activation_noise"]["prng"] == "threefry/erfinv"
    assert noise.NoiseSpec(**act).describe() == noise.NoiseSpec(**act).describe(jax.default_backend())


@pytest.fixture(scope="module")
def mlp_setup():
    digits = load_dataset("digits")
    images, labels = digits.test.images[:60], digits.test.labels[:60]
    return images, labels, digits.preprocess


def test_sweep_compiles_once_and_records_the_sampler(sampler, mlp_setup, tmp_path):
    images, labels, pre = mlp_setup
    model = get_model("mlp")  # a model object of its own: its programs are compiled by this test only
    variables = model.init(jax.random.key(0))
    ref = noise.calibrate_activations(model.apply, variables, pre(images))
    spec = noise.NoiseSpec(weight_kind=None, act_kind="additive", act_ref=ref, sampler=sampler)
    kw = dict(key=jax.random.key(1), n_chips=3, batch_size=25, chip_batch_size=1, preprocess=pre)
    before = robustness.trace_count()
    results = robustness.sweep(model, variables, images, labels, spec, act_etas=[0.0, 0.5, 2.0], **kw)
    assert robustness.trace_count() - before == 1
    single = robustness.evaluate(model, variables, images, labels, spec.replace(act_eta=2.0), **kw)
    np.testing.assert_array_equal(single.per_chip, results[2].per_chip)  # same program, same chips
    assert robustness.trace_count() - before == 1
    for r in results:
        assert r.noise["activation_noise"]["prng"] == sampler and r.noise["weight_noise"] is None
    # chips batched by vmap draw the same noise as chips one after another (up to float rounding of the model)
    batched = robustness.evaluate(model, variables, images, labels, spec.replace(act_eta=2.0),
                                  **{**kw, "chip_batch_size": 3})
    assert np.max(np.abs(batched.per_chip - single.per_chip)) <= 1 / len(labels) + 1e-12
    # a result file carries it and still passes the shared validator
    record = report.result_record("prng_test", "pytest", [report.arm("mlp", "mlp", "none", 0, results)],
                                  {"name": "digits", "split": "test", "n_images": len(labels)})
    assert [e["activation_noise"]["prng"] for e in record["arms"][0]["eval"]] == [sampler] * 3
    if os.path.exists(CHECK_RESULTS):
        import importlib.util
        spec_ = importlib.util.spec_from_file_location("check_results", CHECK_RESULTS)
        check = importlib.util.module_from_spec(spec_)
        spec_.loader.exec_module(check)
        path = tmp_path / "r.json"
        path.write_text(json.dumps(record))
        _, errors = check.validate(str(path))
        assert errors == []


def test_padding_rows_does_not_change_the_first_rows(sampler):
    # A padded last data batch (robustness pads it to the batch size) must see the noise of the unpadded one.
    small = _draw(sampler, key=5, shape=(10, 7, 3))
    for rows in (11, 40):
        np.testing.assert_array_equal(_draw(sampler, key=5, shape=(rows, 7, 3))[:10], small)
