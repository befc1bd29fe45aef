"""Statistical and key-handling tests of the noise core.

Tolerances: with n independent N(0,1) draws, the sample mean has sd 1/sqrt(n) and the sample std has sd about
1/sqrt(2n); tests allow 5 of those (false-alarm probability < 1e-6 per check).
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnoise import noise
from jaxnoise.models import get_model

N = 256 * 256


def _w(seed=0, shape=(256, 256)):
    return jax.random.normal(jax.random.key(seed + 1000), shape) * 0.05


def _check_standard_normal(z):
    z = np.asarray(z, np.float64).ravel()
    n = z.size
    assert abs(z.mean()) < 5 / np.sqrt(n), z.mean()
    assert abs(z.std() - 1) < 5 / np.sqrt(2 * n), z.std()


def test_stable_hash_is_fixed_across_processes():
    # Changing the hash would change every chip draw users have recorded: pin it.
    assert noise.stable_hash("layer1/0/conv1/kernel") == 3832212287
    code = "from jaxnoise.noise import stable_hash; print(stable_hash('layer1/0/conv1/kernel'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert int(out.stdout) == 3832212287


@pytest.mark.parametrize("kind", sorted(noise.WEIGHT_KINDS))
def test_weight_noise_statistics(kind):
    w = _w()
    eta = 0.1
    d = noise.weight_delta(jax.random.key(0), w, eta, kind)
    if kind == "additive_rel_max":
        z = d / (eta * jnp.max(jnp.abs(w)))
    elif kind == "additive_rel_max_channel":
        z = d / (eta * jnp.max(jnp.abs(w), axis=0, keepdims=True))
    elif kind == "multiplicative":
        z = d / (eta * w)
    else:  # lognormal: W_noisy = W exp(eta z)
        z = jnp.log1p(d / w) / eta
    _check_standard_normal(z)


def test_channel_sigma_differs_per_channel():
    w = _w().at[:, 0].multiply(10.0)  # channel 0 has a 10x larger max
    d = noise.weight_delta(jax.random.key(1), w, 0.1, "additive_rel_max_channel")
    ratio = float(jnp.std(d[:, 0]) / jnp.std(d[:, 1:]))
    assert 7 < ratio < 14


@pytest.mark.parametrize("kind", sorted(noise.WEIGHT_KINDS))
def test_zero_scale_and_no_key_are_exact(kind):
    params = {"a": {"kernel": _w(), "bias": jnp.ones(256)}}
    spec = noise.NoiseSpec(weight_eta=0.0, weight_kind=kind)
    out = noise.perturb_weights(jax.random.key(0), params, spec)
    np.testing.assert_array_equal(out["a"]["kernel"], params["a"]["kernel"])
    assert noise.perturb_weights(None, params, noise.NoiseSpec(weight_eta=0.3)) is params
    assert noise.perturb_weights(jax.random.key(0), params, None) is params


def test_same_key_same_draw_different_key_different_draw():
    params = {"a": {"kernel": _w()}}
    spec = noise.NoiseSpec(weight_eta=0.1)
    k = jax.random.key(7)
    a = noise.perturb_weights(k, params, spec)["a"]["kernel"]
    b = noise.perturb_weights(k, params, spec)["a"]["kernel"]
    c = noise.perturb_weights(jax.random.key(8), params, spec)["a"]["kernel"]
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_sites_are_independent_and_bias_exact():
    w = _w()
    params = {"a": {"kernel": w, "bias": jnp.ones(256)}, "b": {"kernel": w}}
    out = noise.perturb_weights(jax.random.key(3), params, noise.NoiseSpec(weight_eta=0.1))
    da = np.asarray(out["a"]["kernel"] - w).ravel()
    db = np.asarray(out["b"]["kernel"] - w).ravel()
    assert abs(np.corrcoef(da, db)[0, 1]) < 5 / np.sqrt(N)
    np.testing.assert_array_equal(out["a"]["bias"], params["a"]["bias"])  # biases stay digital


def test_name_keyed_noise_unchanged_when_a_layer_is_added():
    base = {"layer1": {"kernel": _w(0)}, "layer3": {"kernel": _w(1)}}
    grown = {"layer1": {"kernel": _w(0)}, "layer2": {"kernel": _w(2)}, "layer3": {"kernel": _w(1)}}
    spec = noise.NoiseSpec(weight_eta=0.2)
    a = noise.perturb_weights(jax.random.key(0), base, spec)
    b = noise.perturb_weights(jax.random.key(0), grown, spec)
    for name in ("layer1", "layer3"):
        np.testing.assert_array_equal(a[name]["kernel"], b[name]["kernel"])

    # Activation sites likewise: inserting a site leaves the others' draws unchanged.
    spec = noise.NoiseSpec(weight_kind=None, act_kind="multiplicative", act_eta=0.1)
    y = jnp.ones((4, 8))
    c1, c2 = noise.SiteContext(jax.random.key(1), spec), noise.SiteContext(jax.random.key(1), spec)
    first = [c1("s1", y), c1("s3", y)]
    second = [c2("s1", y), c2("new", y), c2("s3", y)]
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[2])


def test_weight_mask_selects_layers_and_rejects_unknown_paths():
    params = {"a": {"kernel": _w(0)}, "b": {"kernel": _w(1)}}
    spec = noise.NoiseSpec(weight_eta=0.1, weight_mask={"a/kernel": jnp.float32(0.0)})
    out = noise.perturb_weights(jax.random.key(0), params, spec)
    np.testing.assert_array_equal(out["a"]["kernel"], params["a"]["kernel"])
    assert not np.allclose(out["b"]["kernel"], params["b"]["kernel"])
    with pytest.raises(ValueError, match="weight_mask names parameters that do not exist"):
        noise.perturb_weights(jax.random.key(0), params, spec.replace(weight_mask={"nope/kernel": 1.0}))


def test_weight_paths_select_leaves():
    params = {"a": {"kernel": _w(0), "bias": jnp.ones(256)}}
    spec = noise.NoiseSpec(weight_eta=0.1, weight_paths=(r"bias$",))
    out = noise.perturb_weights(jax.random.key(0), params, spec)
    np.testing.assert_array_equal(out["a"]["kernel"], params["a"]["kernel"])
    assert not np.allclose(out["a"]["bias"], 1.0)


def test_weight_noise_gradient_is_straight_through():
    w = _w(shape=(8, 8))
    spec = noise.NoiseSpec(weight_eta=0.5, weight_kind="multiplicative")
    g = jax.grad(lambda w: jnp.sum(noise.perturb_weights(jax.random.key(0), {"k": {"kernel": w}}, spec)
                                   ["k"]["kernel"] * 3.0))(w)
    np.testing.assert_allclose(g, 3.0 * np.ones((8, 8)))


@pytest.mark.parametrize("kind", sorted(noise.ACTIVATION_KINDS))
def test_activation_noise_statistics(kind):
    y = jnp.full((N,), 2.0)
    ref = 0.7
    out = noise.activation_noise(jax.random.key(0), y, 0.1, kind, ref)
    z = (out - y) / (0.1 * (ref if kind == "additive" else y))
    _check_standard_normal(z)
    np.testing.assert_array_equal(noise.activation_noise(jax.random.key(0), y, 0.0, kind, ref), y)


def test_activation_noise_fresh_per_pass_and_same_for_same_key():
    spec = noise.NoiseSpec(weight_kind=None, act_kind="additive", act_eta=0.1, act_ref={"s": 1.0})
    y = jnp.zeros((1000,))
    a = noise.SiteContext(jax.random.key(0), spec)("s", y)
    b = noise.SiteContext(jax.random.key(0), spec)("s", y)
    c = noise.SiteContext(jax.random.key(1), spec)("s", y)
    np.testing.assert_array_equal(a, b)
    assert abs(np.corrcoef(a, c)[0, 1]) < 5 / np.sqrt(1000)


def test_activation_mask_switches_sites_off():
    spec = noise.NoiseSpec(weight_kind=None, act_kind="multiplicative", act_eta=0.5,
                           act_mask={"off": jnp.float32(0.0)})
    ctx = noise.SiteContext(jax.random.key(0), spec)
    y = jnp.ones((100,))
    np.testing.assert_array_equal(ctx("off", y), y)
    assert not np.allclose(ctx("on", y), y)


@pytest.mark.parametrize("bad, match", [
    (dict(weight_kind="gaussian"), "unknown weight noise kind 'gaussian'"),
    (dict(act_kind="shot"), "unknown activation noise kind 'shot'"),
    (dict(weight_eta=-0.1), "negative"),
    (dict(weight_eta=float("nan")), "not finite"),
    (dict(act_kind="additive", act_eta=np.inf), "not finite"),
    (dict(act_eta=0.1), "act_kind is None"),
    (dict(weight_kind=None, weight_eta=0.1), "weight_kind is None"),
    (dict(weight_paths=("(",)), "not a valid regular expression"),
])
def test_bad_specs_are_rejected_with_clear_messages(bad, match):
    with pytest.raises(ValueError, match=match):
        noise.NoiseSpec(**bad)


def test_additive_activation_noise_without_calibration_names_the_fix():
    spec = noise.NoiseSpec(weight_kind=None, act_kind="additive", act_eta=0.1)
    with pytest.raises(ValueError, match="calibrate_activations"):
        noise.SiteContext(jax.random.key(0), spec)("s", jnp.ones(3))


def test_duplicate_site_name_is_an_error():
    ctx = noise.SiteContext()
    ctx("a", jnp.ones(2))
    with pytest.raises(ValueError, match="used twice"):
        ctx("a", jnp.ones(2))


def test_scale_sweep_traces_once():
    traces = []
    params = {"a": {"kernel": _w()}}

    @jax.jit
    def noisy_norm(spec, key):
        traces.append(1)
        return jnp.sum(noise.perturb_weights(key, params, spec)["a"]["kernel"] ** 2)

    base = noise.NoiseSpec(weight_eta=0.0)
    values = [noisy_norm(base.replace(weight_eta=jnp.float32(e)), jax.random.key(0))
              for e in (0.0, 0.05, 0.1, 0.2, 0.3)]
    assert len(traces) == 1
    assert values[0] < values[-1]


def test_vmap_over_keys_and_scales_matches_loop():
    params = {"a": {"kernel": _w(shape=(16, 16))}}
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(4))
    etas = jnp.array([0.0, 0.1, 0.2, 0.3], jnp.float32)

    def one(key, eta):
        return noise.perturb_weights(key, params, noise.NoiseSpec(weight_eta=eta))["a"]["kernel"]

    batched = jax.vmap(one)(keys, etas)
    for i in range(4):
        k = jax.random.fold_in(jax.random.key(0), i)
        np.testing.assert_allclose(batched[i], one(k, etas[i]), rtol=1e-6, atol=1e-7)


def test_calibration_matches_numpy():
    model = get_model("cnn")
    variables = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (37, 8, 8, 1))
    for statistic in noise.ACTIVATION_STATISTICS:
        ref = noise.calibrate_activations(model.apply, variables, x, statistic=statistic, batch_size=10)
        assert set(ref) == set(model.sites)
        captured = model.apply(variables, x, capture_mvm=True).captured
        for site, y in captured.outputs.items():
            y = np.asarray(y, np.float64)
            want = y.std() if statistic == "std" else np.abs(y).max()
            np.testing.assert_allclose(float(ref[site]), want, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown calibration statistic"):
        noise.calibrate_activations(model.apply, variables, x, statistic="rms")


def test_one_pooled_pass_behind_both_calibrations():
    """calibrate_activations (MVM outputs) and analog.calibrate_input_ranges (MVM inputs) read pooled_statistics;
    its values match numpy over batches that do not divide the images."""
    from jaxnoise import analog as analog_lib
    model = get_model("cnn")
    variables = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (37, 8, 8, 1))
    captured = model.apply(variables, x, capture_mvm=True).captured
    for of in noise.MVM_VALUES:
        pooled = noise.pooled_statistics(model.apply, variables, x, of=of, batch_size=10)
        values = captured.outputs if of == "mvm" else captured.inputs
        assert list(pooled) == list(values)
        for site, v in values.items():
            v = np.asarray(v, np.float64)
            np.testing.assert_allclose(pooled[site].std, v.std(), rtol=1e-4)
            np.testing.assert_allclose(pooled[site].absmax, np.abs(v).max(), rtol=1e-5)   # batched forward rounding
            assert pooled[site].count == v.size
    outputs = noise.pooled_statistics(model.apply, variables, x, of="mvm", batch_size=10)
    inputs = noise.pooled_statistics(model.apply, variables, x, of="mvm_inputs", batch_size=10)
    ref = noise.calibrate_activations(model.apply, variables, x, statistic="absmax", batch_size=10)
    assert {s: float(r) for s, r in ref.items()} == {s: float(np.float32(p.absmax)) for s, p in outputs.items()}
    ranges = analog_lib.calibrate_input_ranges(model.apply, variables, x, statistic="std", alpha=3.0, batch_size=10)
    assert {s: float(r) for s, r in ranges.items()} == {s: float(np.float32(3.0 * p.std)) for s, p in inputs.items()}
    with pytest.raises(ValueError, match="of="):
        noise.pooled_statistics(model.apply, variables, x, of="features")


def test_model_activation_noise_has_calibrated_std_at_every_site():
    model = get_model("mlp")
    variables = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (512, 8, 8, 1))
    ref = noise.calibrate_activations(model.apply, variables, x)
    # Noise only at the head, so the head output's deviation is the injected noise itself.
    spec = noise.NoiseSpec(weight_kind=None, act_kind="additive", act_eta=0.2, act_ref=ref,
                           act_mask={s: jnp.float32(s == "head") for s in model.sites})
    clean = model.apply(variables, x).logits
    noisy = model.apply(variables, x, key=jax.random.key(2), noise=spec).logits
    z = (noisy - clean) / (0.2 * ref["head"])
    n = z.size
    assert abs(float(jnp.std(z)) - 1) < 5 / np.sqrt(2 * n)


def test_default_chip_batch_size_per_backend():
    assert noise.default_chip_batch_size("cpu") == 1
    assert noise.default_chip_batch_size("gpu") > 1
