"""Tests of the device models (jaxnoise.analog): statistics, NumPy transcriptions, keys, compensation, sweeps.

Statistical tolerances come from the sample sizes: a sample mean of n draws is checked within 5 standard errors,
a sample std within 5 * sigma / sqrt(2 (n - 1)) (its normal-approximation standard error). False failures then
have probability below 1e-6 per check, and a wrong constant (e.g. a 5% error in a coefficient) fails.
"""

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate

from jaxnoise import analog as analog_lib
from jaxnoise import methods, noise, robustness
from jaxnoise.models import get_model

PCM = analog_lib.PCMModel()
G_MAX = 25.0
Z = 5.0  # standard errors allowed


# ----------------------------------------------------------------------------------------------------------------
# NumPy transcriptions of DEVICE-MODELS.md (written independently of the library)


def np_map(w, g_max=25.0, g_min=0.0, per_column=False):
    a = np.max(np.abs(w), axis=tuple(range(w.ndim - 1))) if per_column else np.max(np.abs(w))
    s = (g_max - g_min) / a
    return np.clip(w * s, 0, g_max) + g_min, np.clip(-w * s, 0, g_max) + g_min, s


def np_sigma_prog(g, g_max=25.0):
    x = g / g_max
    return (0.26348 + 1.9650 * x - 1.1731 * x ** 2) * g_max / 25


def np_nu_stats(g, g_max=25.0):
    g_rel = np.maximum(np.abs(g) / g_max, 1e-7)
    mu = np.clip(-0.0155 * np.log(g_rel) + 0.0244, 0.049, 0.1)
    sig = np.clip(-0.0125 * np.log(g_rel) - 0.0059, 0.008, 0.045)
    return mu, sig


def np_sigma_read(g_prog, t_inf, g_max=25.0):
    q_s = np.minimum(0.0088 / np.maximum((np.abs(g_prog) / g_max) ** 0.65, 1e-3), 0.2)
    t = t_inf + 20.0
    return q_s * np.sqrt(np.log((t + 250e-9) / (2 * 250e-9)))


def np_quantize(x, res, bound):
    step = res * 2 * bound
    return np.clip(np.round(x / step) * step, -bound, bound)  # np.round: half to even


def np_mvm_dense(x, w, inp_res, inp_bound, out_res, out_bound):
    """aihwkit forward without noise or bound management: abs-max per row, DAC, W, ADC, rescale."""
    s = np.max(np.abs(x), axis=-1, keepdims=True)
    s = np.where(s > 0, s, 1.0)
    xq = np_quantize(x / s, inp_res, inp_bound)
    return np_quantize(xq @ w, out_res, out_bound) * s


# ----------------------------------------------------------------------------------------------------------------
# Mapping and the PCM model


@pytest.mark.parametrize("per_column", [False, True])
@pytest.mark.parametrize("g_min", [0.0, 2.0])
def test_mapping_matches_numpy_and_round_trips(per_column, g_min):
    w = np.asarray(jax.random.normal(jax.random.key(0), (7, 5)), np.float32)
    gp, gm, s = analog_lib.weights_to_conductances(jnp.asarray(w), 25.0, g_min, per_column=per_column)
    npp, npm, nps = np_map(w.astype(np.float64), 25.0, g_min, per_column)
    np.testing.assert_allclose(gp, npp, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(gm, npm, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(s, nps, rtol=1e-6)
    back = analog_lib.conductances_to_weights(gp, gm, s)
    np.testing.assert_allclose(back, w, rtol=0, atol=1e-6 * np.max(np.abs(w)))
    assert float(jnp.max(jnp.maximum(gp, gm))) <= 25.0 + 1e-5


@pytest.mark.parametrize("g_target", [2.0, 5.0, 12.5, 25.0])
def test_programming_noise_std_matches_polynomial(g_target):
    n = 200_000
    g = jnp.full((n,), g_target, jnp.float32)
    draws = np.asarray(analog_lib.program_conductances(jax.random.key(1), g, PCM, G_MAX), np.float64)
    sigma = np_sigma_prog(g_target)
    assert abs(draws.mean() - g_target) < Z * sigma / math.sqrt(n)
    assert abs(draws.std(ddof=1) - sigma) < Z * sigma / math.sqrt(2 * (n - 1))
    np.testing.assert_allclose(analog_lib.programming_noise_std(g[:1], PCM, G_MAX), [sigma], rtol=1e-5)


def test_programming_draw_is_the_formula_with_the_keys_normal():
    g = jnp.linspace(0.0, 25.0, 11)
    key = jax.random.key(2)
    z = np.asarray(jax.random.normal(jax.random.clone(key), g.shape), np.float64)
    got = analog_lib.program_conductances(key, g, PCM, G_MAX)
    want = np.maximum(np.asarray(g) + np_sigma_prog(np.asarray(g, np.float64)) * z, 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_drift_exponent_stats_match_numpy():
    g = np.array([0.0, 1e-6, 0.1, 1.0, 5.0, 12.0, 25.0], np.float32)
    mu, sig = analog_lib.drift_exponent_stats(jnp.asarray(g), PCM, G_MAX)
    np_mu, np_sig = np_nu_stats(g.astype(np.float64))
    np.testing.assert_allclose(mu, np_mu, rtol=1e-5)
    np.testing.assert_allclose(sig, np_sig, rtol=1e-5)


@pytest.mark.parametrize("t_inf", [3600.0, 31536000.0])
def test_mean_drift_factor_matches_folded_normal_expectation(t_inf):
    """E[((t_inf + t0)/t0)^-nu] with nu = |mu + sigma Z|, by numerical integration over Z."""
    g_target = 5.0
    n = 200_000
    mu, sig = np_nu_stats(np.float64(g_target))
    r = (t_inf + 20.0) / 20.0
    pdf = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    f = lambda z: r ** (-abs(mu + sig * z)) * pdf(z)  # noqa: E731
    f2 = lambda z: r ** (-2 * abs(mu + sig * z)) * pdf(z)  # noqa: E731
    mean = scipy.integrate.quad(f, -12, 12, points=[-mu / sig])[0]
    var = scipy.integrate.quad(f2, -12, 12, points=[-mu / sig])[0] - mean ** 2
    g = jnp.full((n,), g_target, jnp.float32)
    nu = analog_lib.drift_exponents(jax.random.key(3), g, PCM, G_MAX)
    factor = np.asarray(analog_lib.drift(jnp.ones((n,)), nu, t_inf, PCM), np.float64)
    assert abs(factor.mean() - mean) < Z * math.sqrt(var / n)
    assert float(jnp.min(nu)) >= 0.0


def test_drift_and_read_match_numpy_on_a_small_layer():
    """A 4x3 dense layer's conductances through drift and one read, against the formulas with the same normals."""
    w = np.asarray(jax.random.normal(jax.random.key(30), (4, 3)), np.float64)
    g_plus, _, _ = np_map(w)
    g = jnp.asarray(g_plus, jnp.float32)
    nu = analog_lib.drift_exponents(jax.random.key(31), g, PCM, G_MAX)
    z_nu = np.asarray(jax.random.normal(jax.random.key(31), g.shape), np.float64)
    mu, sig = np_nu_stats(g_plus)
    np.testing.assert_allclose(nu, np.abs(mu + sig * z_nu), rtol=1e-5, atol=1e-7)
    t_inf = 86400.0
    g_d = g_plus * ((t_inf + 20.0) / 20.0) ** (-np.asarray(nu, np.float64))
    np.testing.assert_allclose(analog_lib.drift(g, nu, t_inf, PCM), g_d, rtol=1e-5)
    z_rd = np.asarray(jax.random.normal(jax.random.key(32), g.shape), np.float64)
    want = np.maximum(g_d + np.abs(g_d) * np_sigma_read(g_plus, t_inf) * z_rd, 0.0)
    got = analog_lib.read_conductances(jax.random.key(32), g, nu, t_inf, PCM, G_MAX)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_compensation_readout_matches_numpy():
    """The identity readout through an exact MVM is mean|W| (global) or mean|W| per column."""
    w = np.asarray(jax.random.normal(jax.random.key(33), (5, 3)), np.float32)
    glob = analog_lib.compensation_readout(None, jnp.asarray(w), analog_lib.AnalogSpec(compensation="global"))
    col = analog_lib.compensation_readout(None, jnp.asarray(w), analog_lib.AnalogSpec(compensation="column"))
    np.testing.assert_allclose(glob, np.mean(np.abs(w)), rtol=1e-6)
    np.testing.assert_allclose(col, np.mean(np.abs(w), axis=0), rtol=1e-6)
    io = analog_lib.IOParams(out_noise=0.0, bound_management="none")   # through the quantisers of the defaults
    q = analog_lib.compensation_readout(None, jnp.asarray(w), analog_lib.AnalogSpec(io=io, compensation="global"))
    want = np.mean(np.abs(np_mvm_dense(np.eye(5), w.astype(np.float64), 1 / 126, 1.0, 1 / 510, 12.0)))
    np.testing.assert_allclose(q, max(want, 1e-4), rtol=1e-5)


def test_drift_is_identity_at_time_zero_and_monotone():
    nu = jnp.array([0.0, 0.05, 0.1])
    g = jnp.array([10.0, 10.0, 10.0])
    np.testing.assert_array_equal(analog_lib.drift(g, nu, 0.0, PCM), g)
    later = analog_lib.drift(g, nu, 86400.0, PCM)
    assert float(later[0]) == 10.0 and float(later[2]) < float(later[1]) < 10.0


@pytest.mark.parametrize("t_inf", [1.0, 86400.0])
def test_read_noise_std_matches_sigma_rd(t_inf):
    n = 200_000
    g_prog = 20.0
    sigma_rd = float(np_sigma_read(np.float64(g_prog), t_inf))
    np.testing.assert_allclose(analog_lib.read_noise_std(jnp.asarray([g_prog]), t_inf, PCM, G_MAX), [sigma_rd],
                               rtol=1e-5)
    g = jnp.full((n,), g_prog)
    reads = np.asarray(analog_lib.read_conductances(jax.random.key(4), g, jnp.zeros((n,)), t_inf, PCM, G_MAX),
                       np.float64)
    rel = reads / g_prog - 1.0
    assert abs(rel.mean()) < Z * sigma_rd / math.sqrt(n)
    assert abs(rel.std(ddof=1) - sigma_rd) < Z * sigma_rd / math.sqrt(2 * (n - 1))


# ----------------------------------------------------------------------------------------------------------------
# Quantisers and the analog MVM


def test_quantize_levels_half_to_even_clipping_and_identity():
    res, bound = 0.25, 2.0            # step = 0.25 * 2 * 2 = 1
    x = jnp.array([0.5, 1.5, 2.5, -0.5, -1.5, 0.49, 0.51, 7.0, -7.0])
    got = analog_lib.quantize(x, res, bound)
    np.testing.assert_array_equal(got, [0.0, 2.0, 2.0, -0.0, -2.0, 0.0, 1.0, 2.0, -2.0])
    y = jax.random.normal(jax.random.key(5), (1000,)) * 3
    q = np.asarray(analog_lib.quantize(y, 1 / 126, 1.0))
    steps = q / (2 / 126)
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-4)        # on the grid
    assert np.max(np.abs(q)) <= 1.0
    np.testing.assert_array_equal(analog_lib.quantize(y, None, None), y)   # infinite resolution, no bound
    np.testing.assert_allclose(analog_lib.quantize(y, 1e-7, None), y, atol=1e-5)
    np.testing.assert_allclose(q, np_quantize(np.asarray(y, np.float64), 1 / 126, 1.0), atol=1e-6)


def test_quantize_gradient_is_straight_through():
    g = jax.grad(lambda x: jnp.sum(analog_lib.quantize(x, 1 / 10, 1.0) * jnp.arange(4.0)))(jnp.array([0.3, 5, -5, 0]))
    np.testing.assert_array_equal(g, [0.0, 1.0, 2.0, 3.0])


def test_analog_mvm_dense_matches_numpy_without_noise():
    x = np.asarray(jax.random.normal(jax.random.key(6), (16, 12)), np.float32)
    w = np.asarray(jax.random.uniform(jax.random.key(7), (12, 6), minval=-1, maxval=1), np.float32)
    io = analog_lib.IOParams(out_noise=0.0, bound_management="none")
    got = analog_lib.analog_mvm(None, jnp.asarray(x), jnp.asarray(w), io)
    want = np_mvm_dense(x.astype(np.float64), w.astype(np.float64), 1 / 126, 1.0, 1 / 510, 12.0)
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_analog_mvm_output_noise_std():
    """Without quantisation, analog - exact = s * out_noise * N per output (s = max|x| of the row)."""
    n_rows = 4000
    x = jax.random.normal(jax.random.key(8), (n_rows, 10))
    w = jax.random.uniform(jax.random.key(9), (10, 8), minval=-1, maxval=1)
    io = analog_lib.IOParams(inp_res=None, out_res=None, out_bound=None, out_noise=0.06)
    s = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    z = np.asarray((analog_lib.analog_mvm(jax.random.key(10), x, w, io) - x @ w) / s, np.float64).ravel()
    n = z.size
    assert abs(z.mean()) < Z * 0.06 / math.sqrt(n)
    assert abs(z.std(ddof=1) - 0.06) < Z * 0.06 / math.sqrt(2 * (n - 1))


def test_analog_mvm_pcm_read_output_noise_std():
    """w_noise: the per-output std is w_noise * sqrt(sum_j |w_ij| x'_j^2) (in units of the scaled input)."""
    x = jnp.tile(jnp.array([[1.0, -0.5, 0.25, 0.0]]), (20000, 1))
    w = jnp.array([[0.5], [-1.0], [0.25], [1.0]])
    io = analog_lib.IOParams(inp_res=None, out_res=None, out_bound=None, out_noise=0.0, w_noise=0.1)
    y = np.asarray(analog_lib.analog_mvm(jax.random.key(11), x, w, io), np.float64).ravel()
    sigma = 0.1 * math.sqrt(0.5 * 1 + 1.0 * 0.25 + 0.25 * 0.0625)
    n = y.size
    assert abs(y.mean() - float((x @ w)[0, 0])) < Z * sigma / math.sqrt(n)
    assert abs(y.std(ddof=1) - sigma) < Z * sigma / math.sqrt(2 * (n - 1))


def test_bound_management_rescales_clipped_vectors():
    """A vector whose output clips is re-run at half the input scale: no clipping, the exact result."""
    x = jnp.ones((2, 40)) * jnp.array([[1.0], [0.01]])   # sum of 40 ones = 40 > out_bound 12
    w = jnp.ones((40, 1))
    base = dict(inp_res=None, out_res=None, out_noise=0.0)
    none = analog_lib.analog_mvm(None, x, w, analog_lib.IOParams(bound_management="none", **base))
    it = analog_lib.analog_mvm(None, x, w, analog_lib.IOParams(bound_management="iterative", **base))
    np.testing.assert_allclose(none[:, 0], [12.0, 0.12], rtol=1e-6)    # clipped at the ADC bound
    np.testing.assert_allclose(it[:, 0], [40.0, 0.4], rtol=1e-6)       # 4x down-scaled, exact


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("nm", ["abs_max", "constant"])
def test_analog_conv_equals_analog_dense_on_im2col_patches(stride, nm):
    x = jax.random.normal(jax.random.key(12), (2, 9, 9, 3))
    w = jax.random.uniform(jax.random.key(13), (3, 3, 3, 4), minval=-1, maxval=1)
    io = analog_lib.IOParams(out_noise=0.0, bound_management="none", noise_management=nm, nm_scale=4.0)
    got = analog_lib.analog_mvm(None, x, w, io, geometry={"stride": stride, "padding": 1})
    patches = analog_lib.conv_patches(x, w.shape, stride, 1)
    want = analog_lib.analog_mvm(None, patches, w.reshape(-1, 4), io)
    np.testing.assert_allclose(got, want, atol=1e-5)
    exact = jax.lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(patches @ w.reshape(-1, 4), exact, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Chips, reads, compensation


def _dense_params(key, n_in=6, n_out=4):
    return {"fc": {"kernel": jax.random.normal(key, (n_in, n_out)), "bias": jnp.zeros((n_out,))}}


def test_compensation_restores_mean_output_scale_of_a_noiseless_drifted_layer():
    quiet = analog_lib.PCMModel(prog_noise_scale=0.0, read_noise_scale=0.0)
    spec = analog_lib.AnalogSpec(pcm=quiet, compensation="global")
    params = _dense_params(jax.random.key(14))
    chip = analog_lib.program_chip(jax.random.key(15), params, spec)
    layer = analog_lib.read_chip(jax.random.key(16), chip, 31536000.0, spec)["fc"]
    drifted = layer["w_tile"]
    assert float(jnp.mean(jnp.abs(drifted))) < 0.8 * float(jnp.mean(jnp.abs(chip["fc"]["w_target"])))
    # the readout of the compensated layer equals the reference exactly
    np.testing.assert_allclose(jnp.mean(jnp.abs(layer["alpha"] * drifted)), chip["fc"]["r0"], rtol=1e-6)
    # equal drift exponents (all |w| equal, sigma_nu = 0): compensation restores every output exactly
    flat = analog_lib.PCMModel(prog_noise_scale=0.0, read_noise_scale=0.0, drift_sigma=(0.0, 0.0),
                           drift_sigma_clip=(0.0, 0.0))
    spec = analog_lib.AnalogSpec(pcm=flat, compensation="global")
    signs = {"fc": {"kernel": jnp.sign(params["fc"]["kernel"]), "bias": params["fc"]["bias"]}}
    chip = analog_lib.program_chip(jax.random.key(17), signs, spec)
    layer = analog_lib.read_chip(jax.random.key(18), chip, 86400.0, spec)["fc"]
    np.testing.assert_allclose(layer["alpha"] * layer["w_tile"], chip["fc"]["w_target"], rtol=1e-5)


def test_column_compensation_per_output_column():
    quiet = analog_lib.PCMModel(prog_noise_scale=0.0, read_noise_scale=0.0)
    spec = analog_lib.AnalogSpec(pcm=quiet, compensation="column")
    params = _dense_params(jax.random.key(19))
    chip = analog_lib.program_chip(jax.random.key(20), params, spec)
    layer = analog_lib.read_chip(jax.random.key(21), chip, 3600.0, spec)["fc"]
    assert layer["alpha"].shape == (1, 1, 1, 4)   # one tile, one factor per output column
    np.testing.assert_allclose(jnp.mean(jnp.abs(layer["alpha"] * layer["w_tile"]), axis=2, keepdims=True),
                               chip["fc"]["r0"], rtol=1e-6)


def test_chip_is_fixed_and_reads_are_fresh():
    spec = analog_lib.preset("aihwkit_inference_default")
    params = _dense_params(jax.random.key(22))
    a = analog_lib.program_chip(jax.random.key(23), params, spec)
    b = analog_lib.program_chip(jax.random.key(23), params, spec)
    for k in ("g_plus", "g_minus", "nu_plus", "nu_minus"):
        np.testing.assert_array_equal(a["fc"][k], b["fc"][k])
    r1 = analog_lib.read_chip(jax.random.key(24), a, 3600.0, spec)["fc"]["w_tile"]
    r2 = analog_lib.read_chip(jax.random.key(25), a, 3600.0, spec)["fc"]["w_tile"]
    r1_again = analog_lib.read_chip(jax.random.key(24), a, 3600.0, spec)["fc"]["w_tile"]
    np.testing.assert_array_equal(r1, r1_again)           # same key -> same read
    assert float(jnp.max(jnp.abs(r1 - r2))) > 0           # a new read draws new read noise
    c = analog_lib.program_chip(jax.random.key(26), params, spec)
    assert float(jnp.max(jnp.abs(c["fc"]["g_plus"] - a["fc"]["g_plus"]))) > 0   # another chip


def test_keys_come_from_layer_names():
    """Adding a layer leaves the programming draws of the others unchanged."""
    spec = analog_lib.preset("aihwkit_inference_default")
    params = _dense_params(jax.random.key(27))
    more = {**params, "aaa_new": {"kernel": jnp.ones((3, 3))}}
    a = analog_lib.program_chip(jax.random.key(28), params, spec)["fc"]
    b = analog_lib.program_chip(jax.random.key(28), more, spec)["fc"]
    np.testing.assert_array_equal(a["g_plus"], b["g_plus"])
    np.testing.assert_array_equal(a["nu_minus"], b["nu_minus"])


def test_layer_selection_by_path():
    params = {"conv1": {"kernel": jnp.ones((3, 3, 1, 2))}, "layer1": {"conv": {"kernel": jnp.ones((3, 3, 2, 2))}},
              "fc": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}
    spec = analog_lib.AnalogSpec(pcm=analog_lib.PCMModel())
    assert analog_lib.analog_sites(params, spec) == ("conv1", "layer1/conv", "fc")
    spec = spec.replace(digital_layers=("^conv1$", "^fc$"))
    assert analog_lib.analog_sites(params, spec) == ("layer1/conv",)


def test_weight_modifiers_match_formulas():
    w = jnp.array([[0.5, -1.0], [0.25, 2.0]])
    a = 2.0
    key = jax.random.key(29)
    z = jax.random.normal(jax.random.clone(key), w.shape)
    cases = {
        "add_normal": w + 0.1 * a * z,
        "mult_normal": w * (1 + 0.1 * z),
        "poly": w + a * 0.1 * (1.0 + 0.5 * jnp.abs(w) / a + 0.25 * (w / a) ** 2) * z,
    }
    for kind, want in cases.items():
        mod = analog_lib.WeightModifier(kind=kind, std=0.1, coeffs=(1.0, 0.5, 0.25))
        np.testing.assert_allclose(analog_lib.modify_weights(jax.random.clone(key), w, mod), want, rtol=1e-6)
    d = analog_lib.modify_weights(key, w, analog_lib.WeightModifier(kind="discretize", res=0.25))
    np.testing.assert_allclose(d, a * 0.25 * np.round(np.asarray(w) / (a * 0.25)))


# ----------------------------------------------------------------------------------------------------------------
# Models, evaluation, training


@pytest.fixture(scope="module")
def cnn(digits):
    model = get_model("cnn", input_shape=digits.image_shape, num_classes=10)
    return model, model.init(jax.random.key(0))


# Slow set: among the default suite's heaviest (2026-12-03 --durations); CI runs it in the slow pass.
@pytest.mark.slow
def test_ideal_preset_is_the_exact_model_and_a_chip_runs_once_read(cnn, digits):
    model, variables = cnn
    x = digits.preprocess(digits.test.images[:8])
    exact = model.apply(variables, x).logits
    k = jax.random.key(1)
    ideal = model.apply(variables, x, key=k, chip=model.pass_chip(k, variables["params"], None,
                                                                  analog_lib.preset("ideal"))).logits
    np.testing.assert_array_equal(ideal, exact)
    spec = analog_lib.preset("aihwkit_inference_default")
    with pytest.raises(ValueError, match="programmed but not read"):
        model.apply(variables, x, key=k, chip=model.sample_chip(k, variables["params"], None, spec))
    with pytest.raises(TypeError, match="model.sample_chip"):
        model.apply(variables, x, key=k, chip=spec)
    read = model.pass_chip(k, variables["params"], None, spec)
    a = model.apply(variables, x, chip=read).logits   # no pass key: analog MVMs without I/O noise
    np.testing.assert_array_equal(a, model.apply(variables, x, chip=read)[0])
    assert not np.array_equal(a, exact)
    noisy = model.apply(variables, x, key=k, chip=read).logits
    assert not np.array_equal(noisy, a)


def test_noise_free_io_matches_exact_model_and_gradient(cnn, digits):
    model, variables = cnn
    x = digits.preprocess(digits.test.images[:8])
    y = jnp.asarray(digits.test.labels[:8])
    spec = analog_lib.AnalogSpec(io=analog_lib.IOParams(inp_res=None, out_res=None, out_bound=None, out_noise=0.0),
                             mapping="column")

    def loss(params, dev):
        key = None if dev is None else jax.random.key(2)
        chip = None if dev is None else model.pass_chip(key, params, None, dev)
        logits = model.apply({**variables, "params": params}, x, key=key, chip=chip).logits
        return methods.cross_entropy(logits, y)

    np.testing.assert_allclose(loss(variables["params"], spec), loss(variables["params"], None), rtol=1e-5)
    g_dev = jax.grad(loss)(variables["params"], spec)
    g_exact = jax.grad(loss)(variables["params"], None)
    for a, b in zip(jax.tree.leaves(g_dev), jax.tree.leaves(g_exact)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_time_sweep_compiles_once_and_chips_are_fixed_across_times(trained_digits_cnn, digits):
    model, variables, _ = trained_digits_cnn
    x, y = digits.test.images[:60], digits.test.labels[:60]
    quiet = analog_lib.AnalogSpec(pcm=analog_lib.PCMModel(read_noise_scale=0.0), compensation=None, name="quiet")
    kw = dict(key=0, n_chips=3, batch_size=30, preprocess=digits.preprocess)
    before = robustness.trace_count()
    both = robustness.evaluate_analog(model, variables, x, y, quiet, times=[1.0, 1e8], **kw)
    other = robustness.evaluate_analog(model, variables, x, y, quiet, times=[10.0, 1e6], **kw)
    assert robustness.trace_count() - before == 1
    # read noise off and no I/O: a chip's accuracy at t depends only on its programming, whatever the sweep
    again = robustness.evaluate_analog(model, variables, x, y, quiet, times=[1e8, 1.0], **kw)
    np.testing.assert_array_equal(both[0].per_chip, again[1].per_chip)
    np.testing.assert_array_equal(both[1].per_chip, again[0].per_chip)
    assert both[0].noise["weight_noise"]["eta"] == 1.0 and other[1].noise["device"]["t_inference"] == 1e6
    assert [r.to_dict()["swept"] for r in other] == [{"t_inference_s": 10.0}, {"t_inference_s": 1e6}]
    assert both[1].mean < both[0].mean   # 3 years of uncompensated drift costs accuracy


@pytest.mark.slow  # ~40 s: the full I/O chain compiles slowly on CPU; cheaper device tests cover the parts
def test_device_evaluation_with_full_preset_and_compensation(trained_digits_cnn, digits):
    model, variables, _ = trained_digits_cnn
    x, y = digits.test.images[:60], digits.test.labels[:60]
    spec = analog_lib.preset("aihwkit_inference_default")
    res = robustness.evaluate_analog(model, variables, x, y, spec, times=[1.0, 31536000.0], key=1, n_chips=3,
                                     batch_size=30, preprocess=digits.preprocess)
    nocomp = robustness.evaluate_analog(model, variables, x, y, spec.replace(compensation=None),
                                        times=[1.0, 31536000.0], key=1, n_chips=3, batch_size=30,
                                        preprocess=digits.preprocess)
    assert all(0.0 <= r.mean <= 1.0 for r in res + nocomp)
    assert res[1].mean > nocomp[1].mean   # global compensation recovers the drifted year
    d = res[0].to_dict()
    assert d["weight_noise"]["kind"] == "device:aihwkit_inference_default" and d["device"]["compensation"] == "global"


@pytest.mark.slow  # ~17 s; tests/test_cli.py also trains under hwa_standard
def test_hardware_aware_training_step_under_a_device(cnn, digits):
    model, variables = cnn
    x = digits.preprocess(digits.train.images[:16])
    y = jnp.asarray(digits.train.labels[:16])
    spec = analog_lib.preset("hwa_standard").training()
    loss_fn = methods.forward_noise(model, weight_kind=None, device=spec)
    assert loss_fn.hparams == {} and loss_fn.config["device"]["name"] == "hwa_standard"
    (loss, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        variables["params"], variables["batch_stats"], x, y, jax.random.key(3), {})
    assert np.isfinite(float(loss))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert float(jnp.linalg.norm(grads["conv1"]["kernel"])) > 0
    mod = methods.forward_noise(model, weight_kind=None, device=analog_lib.AnalogSpec(
        modifier=analog_lib.WeightModifier(kind="poly", std=0.05, coeffs=(0.5, 0.3, 0.2))))
    grads = jax.jit(jax.grad(lambda p: mod(p, variables["batch_stats"], x, y, jax.random.key(5), {})[0]))(
        variables["params"])
    assert float(jnp.linalg.norm(grads["conv1"]["kernel"])) > 0
    pcm = methods.consistency(model, weight_kind=None, device=analog_lib.AnalogSpec(pcm=analog_lib.PCMModel()), lam=0.5)
    loss2, _ = jax.jit(pcm)(variables["params"], variables["batch_stats"], x, y, jax.random.key(4), pcm.hparams)
    assert np.isfinite(float(loss2))


def test_calibrate_input_ranges(cnn, digits):
    model, variables = cnn
    x = digits.preprocess(digits.train.images[:64])
    std = analog_lib.calibrate_input_ranges(model.apply, variables, x, statistic="std", alpha=3.0)
    amax = analog_lib.calibrate_input_ranges(model.apply, variables, x, statistic="absmax", alpha=1.0)
    assert set(std) == set(model.sites)
    np.testing.assert_allclose(amax["conv1"], np.max(np.abs(np.asarray(x))), rtol=1e-6)
    np.testing.assert_allclose(std["conv1"], 3 * np.std(np.asarray(x, np.float64)), rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("make, match", [
    (lambda: analog_lib.read_conductances(jax.random.key(0), jnp.ones(2), jnp.zeros(2), -1.0, PCM), "negative"),
    (lambda: analog_lib.AnalogSpec(t_inference=-5.0), "negative"),
    (lambda: analog_lib.weights_to_conductances(jnp.ones(2), g_max=0.0), "g_max"),
    (lambda: analog_lib.AnalogSpec(g_max=-1.0), "g_max"),
    (lambda: analog_lib.AnalogSpec(g_min=30.0), "smaller than g_max"),
    (lambda: analog_lib.IOParams(inp_res=0.0), "infinite resolution"),
    (lambda: analog_lib.IOParams(out_res=-1 / 510), "inp_res|out_res"),
    (lambda: analog_lib.quantize(jnp.ones(2), 0.0, 1.0), "res"),
    (lambda: analog_lib.preset("aihwkit_default"), "unknown device preset"),
    (lambda: analog_lib.IOParams(noise_management="absmax"), "noise_management"),
    (lambda: analog_lib.AnalogSpec(compensation="local"), "drift compensation"),
    (lambda: analog_lib.WeightModifier(kind="discretize", res=0.0), "bin width"),
])
def test_bad_input_gets_a_clear_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_evaluate_analog_rejects_bad_times(trained_digits_cnn, digits):
    model, variables, _ = trained_digits_cnn
    spec = analog_lib.preset("aihwkit_inference_default")
    for times, match in (([1.0, -3.0], "negative"), ([], "empty"), ([float("nan")], "not finite")):
        with pytest.raises(ValueError, match=match):
            robustness.evaluate_analog(model, variables, digits.test.images[:10], digits.test.labels[:10], spec,
                                       times=times, key=0, preprocess=digits.preprocess)


# ----------------------------------------------------------------------------------------------------------------
# Before/after equality with the device code before the speed-up (chunked per-patch MVM, bound management that
# re-runs only what clipped, batched chip draws). The functions below are that code, frozen (jaxnoise/analog.py as
# of 2026-12-02, docstrings dropped): the analog MVM, the drift-compensation readout, program_chip and read_chip.
# Unchanged helpers (quantize, _linear, _noise_flags, _tile, the PCM formulas) are taken from the library.
# With IOParams(**analog_lib.LEGACY_IO) the new code must give the same bits.

LEGACY_IO = analog_lib.LEGACY_IO


def _ref_conv_views(x, kernel_shape, stride, padding):
    kh, kw = kernel_shape[0], kernel_shape[1]
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    h = (x.shape[1] + 2 * padding - kh) // stride + 1
    w = (x.shape[2] + 2 * padding - kw) // stride + 1
    return [xp[:, i:i + stride * (h - 1) + 1:stride, j:j + stride * (w - 1) + 1:stride, :]
            for i in range(kh) for j in range(kw)]


def _ref_patch_absmax(x, kernel_shape, stride, padding):
    kh, kw = kernel_shape[0], kernel_shape[1]
    m = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    return jax.lax.reduce_window(m, -jnp.inf, jax.lax.max, (1, kh, kw, 1), (1, stride, stride, 1),
                                 ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def _ref_analog_mvm(key, x, w_tile, io, *, geometry=None, inp_scale=None, noise_flags=None):
    dt = x.dtype
    w_tile = w_tile.astype(dt)
    w_abs = jnp.abs(w_tile)
    use_w_noise, use_out_noise = analog_lib._noise_flags(key, io) if noise_flags is None else noise_flags
    views = None
    if io.noise_management == "abs_max":
        if geometry is not None:
            s = _ref_patch_absmax(x, w_tile.shape, geometry["stride"], geometry["padding"])
            views = _ref_conv_views(x, w_tile.shape, geometry["stride"], geometry["padding"])
            taps = [(i, j) for i in range(w_tile.shape[0]) for j in range(w_tile.shape[1])]
        else:
            s = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
        s = jnp.where(s > 0, s, jnp.ones_like(s))
    else:
        s = jnp.asarray(io.nm_scale if inp_scale is None else inp_scale, dt)

    def dac(v, factor):
        return analog_lib.quantize(v / (s * factor), io.inp_res, io.inp_bound)

    def products(factor):
        if views is None:
            xq = dac(x, factor)
            return (analog_lib._linear(xq, w_tile, geometry),
                    (analog_lib._linear(xq * xq, w_abs, geometry) if use_w_noise else None))
        y = spread = None
        for (i, j), v in zip(taps, views):
            q = dac(v, factor)
            y = q @ w_tile[i, j] if y is None else y + q @ w_tile[i, j]
            if use_w_noise:
                spread = (q * q) @ w_abs[i, j] if spread is None else spread + (q * q) @ w_abs[i, j]
        return y, spread

    def one_round(factor, round_key):
        y, spread = products(factor)
        if use_w_noise:
            y = y + jnp.asarray(io.w_noise, dt) * jnp.sqrt(jnp.maximum(spread, 0.0)) * jax.random.normal(
                noise.name_key(round_key, "w_noise"), y.shape, dt)
        if use_out_noise:
            y = y + jnp.asarray(io.out_noise, dt) * jax.random.normal(
                noise.name_key(round_key, "out_noise"), y.shape, dt)
        clipped = (jnp.any(jnp.abs(y) >= io.out_bound, axis=-1, keepdims=True) if io.out_bound is not None
                   else jnp.zeros(y.shape[:-1] + (1,), bool))
        return analog_lib.quantize(y, io.out_res, io.out_bound), clipped

    y0, clipped0 = one_round(jnp.asarray(1.0, dt), None if key is None else jax.random.fold_in(key, 0))
    if io.bound_management == "none" or io.out_bound is None:
        return y0 * s
    max_factor = jnp.asarray(io.max_bm_factor, dt)

    def body(carry):
        r, out, done, factor = carry
        y, clipped = one_round(factor, None if key is None else jax.random.fold_in(key, r))
        accept = ~done & (~clipped | (factor * 2 > max_factor))
        out = jnp.where(accept, y * factor, out)
        done = done | accept
        factor = jnp.where(done, factor, factor * 2)
        return r + 1, out, done, factor

    done0 = ~clipped0 | (2 > max_factor)
    factor0 = jnp.where(done0, 1.0, 2.0).astype(dt)
    _, out, _, _ = jax.lax.while_loop(lambda c: ~jnp.all(c[2]), body, (jnp.uint32(1), y0, done0, factor0))
    return out * s


def _ref_key(key, *names):
    for n in names:
        key = noise.name_key(key, n)
    return key


def _ref_readout(key, w_tile, spec, site):
    w = w_tile.reshape(-1, w_tile.shape[-1])
    eye = jnp.eye(w.shape[0], dtype=w.dtype)
    if spec.io is None:
        y = eye @ w
    else:
        scale = None if spec.io.inp_ranges is None else spec.io.inp_ranges.get(site)
        y = _ref_analog_mvm(key, eye, w, spec.io, inp_scale=scale)
    axis = 0 if spec.compensation == "column" else None
    return jnp.maximum(jnp.mean(jnp.abs(y), axis=axis), analog_lib.COMPENSATION_FLOOR)


def _ref_program_chip(key, params, spec, layers=None):
    from flax import traverse_util
    flat = traverse_util.flatten_dict(params, sep="/")
    chip = {}
    for site in analog_lib.analog_sites(params, spec, layers):   # the registered analog layers (not numerics)
        w = jax.lax.stop_gradient(flat[f"{site}/kernel" if site else "kernel"])
        if spec.modifier is not None:
            w = analog_lib.modify_weights(_ref_key(key, "jaxnoise/device/modifier", site), w, spec.modifier)
        g_plus, g_minus, scale = analog_lib.weights_to_conductances(w, spec.g_max, spec.g_min,
                                                                per_column=spec.mapping == "column")
        target = analog_lib._tile(g_plus, g_minus, spec)
        if spec.pcm is not None:
            kp = _ref_key(key, "jaxnoise/device/program", site)
            kd = _ref_key(key, "jaxnoise/device/drift", site)
            nu_plus = analog_lib.drift_exponents(noise.name_key(kd, "g_plus"), g_plus, spec.pcm, spec.g_max)
            nu_minus = analog_lib.drift_exponents(noise.name_key(kd, "g_minus"), g_minus, spec.pcm, spec.g_max)
            g_plus = analog_lib.program_conductances(noise.name_key(kp, "g_plus"), g_plus, spec.pcm, spec.g_max)
            g_minus = analog_lib.program_conductances(noise.name_key(kp, "g_minus"), g_minus, spec.pcm, spec.g_max)
        else:
            nu_plus = nu_minus = jnp.zeros_like(g_plus)
        if spec.compensation is not None:
            r0 = _ref_readout(_ref_key(key, "jaxnoise/device/compensation", site),
                              analog_lib._tile(g_plus, g_minus, spec), spec, site)
        else:
            r0 = jnp.ones((), w.dtype)
        chip[site] = {"g_plus": g_plus, "g_minus": g_minus, "nu_plus": nu_plus, "nu_minus": nu_minus,
                      "scale": scale, "w_target": target, "r0": r0}
    return chip


def _ref_read_chip(key, chip, t_inference, spec):
    analog_lib.check_times(t_inference)
    out = {}
    for site, c in chip.items():
        g_plus, g_minus = c["g_plus"], c["g_minus"]
        if spec.pcm is not None:
            kr = _ref_key(key, "jaxnoise/device/read", site)
            g_plus = analog_lib.read_conductances(noise.name_key(kr, "g_plus"), g_plus, c["nu_plus"], t_inference,
                                              spec.pcm, spec.g_max)
            g_minus = analog_lib.read_conductances(noise.name_key(kr, "g_minus"), g_minus, c["nu_minus"], t_inference,
                                               spec.pcm, spec.g_max)
        w_tile = analog_lib._tile(g_plus, g_minus, spec)
        if spec.compensation is not None:
            r_t = _ref_readout(_ref_key(key, "jaxnoise/device/compensation", site), w_tile, spec, site)
            alpha = analog_lib.drift_compensation_factor(c["r0"], r_t)
        else:
            alpha = jnp.ones((), w_tile.dtype)
        dt = w_tile.dtype
        w_scale = (jnp.asarray(spec.g_max, dt) - jnp.asarray(spec.g_min, dt)) / c["scale"]
        out[site] = {"w_tile": w_tile, "w_scale": w_scale, "alpha": alpha}
    return out


@contextlib.contextmanager
def _reference_device():
    """Every device computation (evaluate_analog, Model.apply(chip=Model.pass_chip(...))) runs the frozen code above. Traces are
    cached per function, so the caches are cleared on the way in and out."""
    saved = analog_lib.analog_mvm, analog_lib.program_chip, analog_lib.read_chip
    analog_lib.analog_mvm, analog_lib.program_chip, analog_lib.read_chip = _ref_analog_mvm, _ref_program_chip, _ref_read_chip
    jax.clear_caches()
    try:
        yield
    finally:
        analog_lib.analog_mvm, analog_lib.program_chip, analog_lib.read_chip = saved
        jax.clear_caches()


def _legacy(spec):
    """``spec`` on the legacy pipeline, which predates learned input ranges (hwa_standard's are dropped)."""
    return spec.replace(io=analog_lib.legacy_io(spec.io))


@pytest.fixture(scope="module")
def digits_ranges(trained_digits_cnn, digits):
    model, variables, _ = trained_digits_cnn
    return analog_lib.calibrate_input_ranges(model.apply, variables, digits.preprocess(digits.train.images[:128]))


EQUALITY_SPECS = {
    "aihwkit_inference_default": lambda ranges: analog_lib.preset("aihwkit_inference_default"),
    "hwa_standard": lambda ranges: analog_lib.preset("hwa_standard").replace(
        io=analog_lib.preset("hwa_standard").io.replace(inp_ranges=ranges)),
    "no_compensation": lambda ranges: analog_lib.preset("aihwkit_inference_default").replace(compensation=None),
    "digital_layers": lambda ranges: analog_lib.preset("aihwkit_inference_default").replace(
        digital_layers=("^conv1$", "^head$")),
}


@pytest.mark.slow  # ~25-45 s each: the old code's device program compiles slowly (the reason for the change)
@pytest.mark.parametrize("name", sorted(EQUALITY_SPECS))
def test_per_chip_results_and_logits_equal_the_code_before_the_speedup(name, trained_digits_cnn, digits,
                                                                        digits_ranges):
    """Per-chip accuracies (2 chips x 2 times), one chip's read and one forward pass: bit for bit."""
    model, variables, _ = trained_digits_cnn
    spec = _legacy(EQUALITY_SPECS[name](digits_ranges))
    x, y = digits.test.images[:40], digits.test.labels[:40]
    kw = dict(times=[60.0, 31536000.0], key=3, n_chips=2, batch_size=20, preprocess=digits.preprocess)
    xb = digits.preprocess(x[:20])
    k = jax.random.key(4)

    def run():
        per_chip = [r.per_chip for r in robustness.evaluate_analog(model, variables, x, y, spec, **kw)]
        layers = jax.jit(lambda v: analog_lib.read(k, v["params"], spec, 86400.0).layers)(variables)
        logits = jax.jit(lambda v, xb: model.apply(v, xb, key=k, chip=model.pass_chip(k, v["params"], None,
                                                                                     spec))[0])(variables, xb)
        return per_chip, layers, logits

    new = run()
    with _reference_device():
        old = run()
    for a, b in zip(new[0], old[0]):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(new[1]), jax.tree.leaves(old[1])):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(new[2], old[2])


def _mvm_case(nm, bm, w_noise, gain, stride, cin=6):
    # Inputs on a grid of 1/16 (like the digits' pixels): many DAC inputs fall exactly on a rounding tie, so a
    # division computed any other way (e.g. as a product with a reciprocal) shows up as a one-step difference.
    x = jnp.round(jnp.maximum(jax.random.normal(jax.random.key(30), (5, 9, 9, cin)), -0.5) * 8) / 16
    w = jax.random.uniform(jax.random.key(31), (3, 3, cin, 5), minval=-1, maxval=1) * gain
    io = analog_lib.IOParams(noise_management=nm, bound_management=bm, w_noise=w_noise, nm_scale=2.0,
                         max_bm_factor=64.0, **LEGACY_IO)
    return x, w, io, {"stride": stride, "padding": 1}


def _speedup_cases():
    """Every combination; the default suite runs two that cover each value of w_noise/gain and stride/cin and
    the two noise managements (the rest, "abs_max"/"none" among them, are marked slow)."""
    default = {("abs_max", "iterative", 0.02, 3.0, 2, 6), ("constant", "none", 0.0, 0.3, 1, 1)}
    for nm, bm in [("abs_max", "iterative"), ("abs_max", "none"), ("constant", "none")]:
        for w_noise, gain in [(0.0, 0.3), (0.02, 3.0)]:
            for stride, cin in [(1, 1), (2, 6)]:
                case = (nm, bm, w_noise, gain, stride, cin)
                yield pytest.param(*case, marks=() if case in default else pytest.mark.slow)


@pytest.mark.parametrize("nm, bm, w_noise, gain, stride, cin", list(_speedup_cases()))
def test_analog_mvm_equals_the_code_before_the_speedup(nm, bm, w_noise, gain, stride, cin):
    """Conv and dense (its im2col patches) MVMs, with and without clipping (gain 3: many re-runs), noise on and
    off, the I/O parameters as constants and as traced arrays (as evaluate_analog passes them): bit for bit."""
    x, w, io, geo = _mvm_case(nm, bm, w_noise, gain, stride, cin)
    patches = analog_lib.conv_patches(x, w.shape, stride, 1)
    w2 = w.reshape(-1, w.shape[-1])
    traced = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), io)
    for key in (jax.random.key(32), None):
        new = [jax.jit(lambda x, w, io: analog_lib.analog_mvm(key, x, w, io, geometry=geo))(x, w, io),
               jax.jit(lambda p, w, io: analog_lib.analog_mvm(key, p, w, io))(patches, w2, io),
               jax.jit(lambda x, w, io: analog_lib.analog_mvm(key, x, w, io, geometry=geo))(x, w, traced)]
        old = [jax.jit(lambda x, w, io: _ref_analog_mvm(key, x, w, io, geometry=geo))(x, w, io),
               jax.jit(lambda p, w, io: _ref_analog_mvm(key, p, w, io))(patches, w2, io),
               jax.jit(lambda x, w, io: _ref_analog_mvm(key, x, w, io, geometry=geo))(x, w, traced)]
        for a, b in zip(new, old):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("stride", [1, 2])
def test_constant_scale_conv_bound_management_rescales_each_patch(stride):
    """noise_management="constant" with iterative bound management re-runs each clipped *patch* at its own factor
    (the code before scaled input pixels by the factor of the output position at the same index, and failed at
    stride 2): the conv equals the dense MVM of its im2col patches."""
    x = jnp.maximum(jax.random.normal(jax.random.key(33), (3, 9, 9, 5)), 0.0)
    w = jax.random.uniform(jax.random.key(34), (3, 3, 5, 4), minval=-1, maxval=1) * 3
    io = analog_lib.IOParams(noise_management="constant", nm_scale=0.5, inp_res=None, out_res=None, out_noise=0.0)
    conv = analog_lib.analog_mvm(None, x, w, io, geometry={"stride": stride, "padding": 1})
    dense = analog_lib.analog_mvm(None, analog_lib.conv_patches(x, w.shape, stride, 1), w.reshape(-1, 4), io)
    assert float(jnp.max(jnp.abs(dense))) > 2 * 12.0 * 0.5   # outputs beyond the bound: re-runs happened
    np.testing.assert_allclose(conv, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nm", ["abs_max", "constant"])
def test_conv_sum_orders_agree_to_float_rounding(nm):
    """"patch" (one dot per patch) and "taps" (one dot per tap, summed) differ only by float rounding: without
    quantisers and noise they agree to float precision."""
    x, w, io, geo = _mvm_case(nm, "iterative", 0.02, 3.0, 1)
    io = io.replace(inp_res=None, out_res=None, out_noise=0.0, w_noise=0.0)
    a = analog_lib.analog_mvm(None, x, w, io.replace(conv_sum="patch"), geometry=geo)
    b = analog_lib.analog_mvm(None, x, w, io.replace(conv_sum="taps"), geometry=geo)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_batched_normals_equal_jax_random_normal():
    keys = [jax.random.fold_in(jax.random.key(35), i) for i in range(4)] + [jax.random.PRNGKey(36)]
    shapes = [(3, 3, 16, 16), (7,), (), (64, 10), (5, 3)]
    z = jax.jit(lambda ks: analog_lib._normals(list(zip(ks, shapes)), jnp.float32))(keys)
    for got, k, s in zip(z, keys, shapes):
        np.testing.assert_array_equal(got, jax.random.normal(k, s, jnp.float32))
    assert analog_lib._fast_normals(keys, jnp.float32) and not analog_lib._fast_normals(keys, jnp.float16)
    # an array of keys (a layer's tiles): one draw per key, as that key alone draws it
    data = jax.random.key_data(jax.random.split(jax.random.key(39), (2, 3)))
    tiles = jax.random.wrap_key_data

    zt = jax.jit(lambda d: analog_lib._normals([(tiles(d), (4, 5)), (jax.random.key(40), (3,))], jnp.float32))(data)
    assert zt[0].shape == (2, 3, 4, 5)
    for i in range(2):
        for j in range(3):
            np.testing.assert_array_equal(zt[0][i, j], jax.random.normal(tiles(data[i, j]), (4, 5), jnp.float32))
    np.testing.assert_array_equal(analog_lib._normals([(tiles(data), (4, 5))], jnp.float16)[0][1, 2],
                                  jax.random.normal(tiles(data[1, 2]), (4, 5), jnp.float16))
    k16 = jax.random.key(38)   # float16: jax.random.normal itself
    np.testing.assert_array_equal(analog_lib._normals([(jax.random.clone(k16), (4,))], jnp.float16)[0],
                                  jax.random.normal(k16, (4,), jnp.float16))


def test_io_sampler_default_and_record():
    io = analog_lib.IOParams()
    assert io.resolved_sampler() == noise.default_sampler()
    assert io.resolved_sampler("gpu") == "threefry/erfinv"
    assert analog_lib.preset("aihwkit_inference_default").describe()["io"]["sampler"] == noise.default_sampler()
    legacy = analog_lib.IOParams(**LEGACY_IO)
    assert legacy.resolved_sampler() == "threefry/erfinv"
    for bad, match in ((dict(sampler="philox"), "sampler"), (dict(conv_sum="tap"), "conv_sum")):
        with pytest.raises(ValueError, match=match):
            analog_lib.IOParams(**bad)


def test_traced_zero_noise_scale_draws_nothing_and_changes_nothing():
    """A noise scale passed as array data (robustness.evaluate_analog does) that is 0 is skipped at run time: the
    result equals the one with that noise statically off."""
    x, w, io, geo = _mvm_case("abs_max", "iterative", 0.0, 3.0, 1)
    traced = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), io)
    k = jax.random.key(37)
    f = jax.jit(lambda io, flags: analog_lib.analog_mvm(k, x, w, io, geometry=geo, noise_flags=flags),
                static_argnums=1)
    np.testing.assert_array_equal(f(traced, (True, True)), f(traced, (False, True)))
    np.testing.assert_array_equal(f(traced.replace(out_noise=jnp.float32(0.0)), (True, True)),
                                  f(traced, (False, False)))




# ----------------------------------------------------------------------------------------------------------------
# aihwkit 1.2.0's I/O semantics (docs/aihwkit_presets_audit.md, probes in tools/aihwkit_probes/io_probe.py)

def test_bound_management_stops_at_max_bm_res_over_the_dac_step_like_aihwkit():
    """512 ones x ones: aihwkit returns 192 = 12 x 16 (factors 1, 2, 4, 8, 16; 16 > 0.25 x 63 stops it)."""
    x, w = jnp.ones((1, 512)), jnp.ones((512, 1))
    io = analog_lib.IOParams(out_noise=0.0)
    assert float(io.last_bm_factor_bound()) == pytest.approx(15.75)
    assert float(analog_lib.analog_mvm(None, x, w, io)[0, 0]) == pytest.approx(192.0)
    assert float(analog_lib.analog_mvm(None, -x, w, io)[0, 0]) == pytest.approx(-192.0)   # both signs are tested
    # 64 ones: 8 x ADC(64 x rint(63 / 8) / 63) = 65.13 (aihwkit's figure)
    y64 = float(analog_lib.analog_mvm(None, jnp.ones((1, 64)), jnp.ones((64, 1)), io)[0, 0])
    assert y64 == pytest.approx(8 * round(64 * round(63 / 8) / 63 / (24 / 510)) * (24 / 510), abs=1e-5)
    assert y64 == pytest.approx(65.13, abs=0.01)
    # without the resolution limit the last factor is the first above max_bm_factor (1024), in v0 max_bm_factor/2
    assert float(analog_lib.IOParams(max_bm_res=None).last_bm_factor_bound()) == 1000.0
    assert float(analog_lib.IOParams(semantics="v0").last_bm_factor_bound()) == 500.0


def test_bound_management_tests_the_adc_output_not_the_analog_value():
    """y = 12.01 rounds to the ADC's top level 12.0, which aihwkit does not count as clipped; v0 re-ran it."""
    x, w = jnp.ones((1, 1)), jnp.full((1, 1), 12.01)
    step = 24 / 510
    y = float(analog_lib.analog_mvm(None, x, w, analog_lib.IOParams(out_noise=0.0, inp_res=None))[0, 0])
    assert y == pytest.approx(12.0, abs=1e-5)
    y0 = float(analog_lib.analog_mvm(None, x, w, analog_lib.IOParams(out_noise=0.0, inp_res=None, semantics="v0"))[0, 0])
    assert y0 == pytest.approx(2 * round(6.005 / step) * step, abs=1e-5)


@pytest.mark.parametrize("semantics", ["aihwkit", "v0"])
def test_all_zero_input_vectors_read_exactly_zero_like_aihwkit(semantics):
    key = jax.random.key(3)
    io = analog_lib.IOParams(semantics=semantics)
    w = jax.random.normal(jax.random.key(0), (8, 5)) * 0.3
    x = jnp.zeros((4, 8)).at[1].set(jnp.linspace(-1, 1, 8))
    y = analog_lib.analog_mvm(key, x, w, io)
    zero_rows = np.asarray(y)[[0, 2, 3]]
    if semantics == "aihwkit":
        np.testing.assert_array_equal(zero_rows, 0.0)
    else:   # v0 read a zero vector at scale 1: ADC of the output noise
        assert np.any(zero_rows != 0.0)
    # conv: patches that see only zeros (a zero image region) read 0, the others do not
    xc = jnp.zeros((2, 6, 6, 3)).at[:, :2, :2, :].set(1.0)
    wc = jax.random.normal(jax.random.key(1), (3, 3, 3, 4)) * 0.3
    yc = np.asarray(analog_lib.analog_mvm(key, xc, wc, io, geometry={"stride": 1, "padding": 1}))
    far = yc[:, 4:, 4:, :]   # patches 2 pixels away from the ones
    if semantics == "aihwkit":
        np.testing.assert_array_equal(far, 0.0)
    else:
        assert np.any(far != 0.0)
    assert np.mean(yc[:, :2, :2, :] != 0) > 0.8   # patches that see the ones read their products


@pytest.mark.parametrize("kwargs, match", [({"max_bm_res": 0.0}, "max_bm_res"), ({"max_bm_res": -1.0}, "max_bm_res"),
                                           ({"semantics": "aihwkit2"}, "semantics")])
def test_bad_bound_management_fields_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        analog_lib.IOParams(**kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Tiles, tile units and the read step of semantics "aihwkit" (docs/aihwkit_presets_audit.md section 6, items 1, 5-7)


def np_patches_torch_order(x, kh, kw, stride, padding):
    """im2col as torch's unfold: one row per output position, features ordered (cin, kh, kw)."""
    xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    n, h, w, _ = xp.shape
    ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
    out = np.zeros((n, ho, wo, x.shape[-1] * kh * kw), x.dtype)
    for i in range(ho):
        for j in range(wo):
            out[:, i, j] = xp[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :].transpose(0, 3, 1, 2) \
                .reshape(n, -1)
    return out


def np_split(size, max_size):
    n = -(-size // max_size)
    return [size // n + (i < size % n) for i in range(n)]


def np_tiled_mvm(x, m, in_sizes, out_sizes, inp_res=1 / 126, out_res=1 / 510, out_bound=12.0, last_factor=15.75,
                 bm=True):
    """aihwkit's TileModuleArray forward without noise, written from the audit: per tile its own abs-max, DAC, ADC
    and bound management (factors 1, 2, 4, ... until nothing clips or the factor passes last_factor); outputs of
    the input tiles summed, output tiles concatenated. x: (vectors, n_in), m: (n_in, n_out), inputs torch order."""
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    dstep, ostep = inp_res * 2, out_res * 2 * out_bound
    cols = []
    o0 = 0
    for o in out_sizes:
        acc = np.zeros((len(x), o))
        i0 = 0
        for i in in_sizes:
            xs, w = x[:, i0:i0 + i], m[i0:i0 + i, o0:o0 + o].astype(np.float64)
            s = np.max(np.abs(xs), axis=1, keepdims=True)
            out = np.zeros((len(x), o))
            for r in range(len(x)):
                if s[r, 0] == 0:
                    continue   # an all-zero vector reads exactly 0
                f = 1.0
                while True:
                    xq = np.clip(np.round(xs[r] / (s[r, 0] * f) / dstep) * dstep, -1, 1)
                    yq = np.round(xq @ w / ostep) * ostep
                    if not bm or not np.any(np.abs(yq) > out_bound) or f > last_factor:
                        break
                    f *= 2
                out[r] = np.clip(yq, -out_bound, out_bound) * s[r, 0] * f
            acc += out
            i0 += i
        cols.append(acc)
        o0 += o
    return np.concatenate(cols, axis=1)


def test_split_sizes_are_aihwkits():
    """aihwkit TileModuleArray.get_split_sizes (probed: 576 -> [288, 288], 1152 -> 3 x 384, 600 -> [300, 300])."""
    assert analog_lib.split_sizes(576, 512) == (288, 288)
    assert analog_lib.split_sizes(1152, 512) == (384, 384, 384)
    assert analog_lib.split_sizes(600, 512) == (300, 300)
    assert analog_lib.split_sizes(512, 512) == (512,)
    assert analog_lib.split_sizes(513, 512) == (257, 256)
    assert analog_lib.split_sizes(80, 32) == (27, 27, 26)
    assert analog_lib.split_sizes(700, 0) == (700,)
    for size, most in [(80, 32), (1000, 512), (7, 3)]:
        assert list(analog_lib.split_sizes(size, most)) == np_split(size, most)


@pytest.mark.parametrize("shape, max_in, max_out", [((80, 24), 32, 16), ((3, 3, 8, 6), 32, 4), ((3, 3, 8, 6), 36, 0)])
def test_tiles_round_trip_and_hold_the_torch_order_matrix(shape, max_in, max_out):
    w = jax.random.normal(jax.random.key(40), shape)
    spec = analog_lib.AnalogSpec(max_input_size=max_in, max_output_size=max_out)
    lay = analog_lib.tile_layout(shape, spec)
    tiles = analog_lib.to_tiles(w, lay)
    assert tiles.shape == lay.shape
    np.testing.assert_array_equal(analog_lib.from_tiles(tiles, lay), w)
    np.testing.assert_array_equal(np.asarray(tiles)[~lay.mask()], 0.0)   # padding is zero
    m = np.asarray(analog_lib.layer_matrix(w))
    if len(shape) == 4:   # torch's weight.reshape(cout, -1).T: inputs (cin, kh, kw)
        np.testing.assert_array_equal(m, np.asarray(w).transpose(3, 2, 0, 1).reshape(shape[-1], -1).T)
    i0 = sum(lay.in_sizes[:1])
    np.testing.assert_array_equal(np.asarray(tiles)[1, 0, :lay.in_sizes[1], :lay.out_sizes[0]],
                                  m[i0:i0 + lay.in_sizes[1], :lay.out_sizes[0]])


def _tile_io(**kw):
    return analog_lib.IOParams(out_noise=0.0, **kw)


@pytest.mark.parametrize("case", ["dense", "conv_groups", "conv_patches"])
def test_tiled_mvm_matches_numpy_per_tile_io(case):
    """Noise-free tiles with abs-max scaling, DAC, ADC and bound management (weights large enough that vectors
    clip and re-run): the NumPy transcription of aihwkit's TileModuleArray of tiles."""
    k1, k2 = jax.random.key(41), jax.random.key(42)
    if case == "dense":
        shape, max_in, max_out, geo = (80, 24), 32, 16, None
        x = jax.random.normal(k1, (6, 80))
    else:
        shape, max_out, geo = (3, 3, 8, 6), 4, {"stride": 2, "padding": 1}
        max_in = 36 if case == "conv_groups" else 32   # 72 -> 2 x 36 (4 channels each) or 3 x 24 (mid-channel)
        x = jax.random.normal(k1, (2, 5, 5, 8)).at[0, :3, :3, :].set(0.0)   # some all-zero patches
    w = jax.random.normal(k2, shape) * 1.5
    spec = analog_lib.AnalogSpec(io=_tile_io(), max_input_size=max_in, max_output_size=max_out)
    lay = analog_lib.tile_layout(shape, spec)
    assert lay.channel_groups == (case == "conv_groups")
    tiles = analog_lib.to_tiles(w, lay)
    ones = jnp.ones(lay.shape[:2] + (1, 1))
    got = np.asarray(analog_lib.tiled_mvm(None, x, tiles, ones, spec.io, lay, geometry=geo))
    xv = np.asarray(x) if geo is None else np_patches_torch_order(np.asarray(x), 3, 3, 2, 1)
    want = np_tiled_mvm(xv, np.asarray(analog_lib.layer_matrix(w)), lay.in_sizes, lay.out_sizes)
    assert np.max(np.abs(want)) > 12.0   # bound management re-ran vectors
    np.testing.assert_allclose(got.reshape(want.shape), want, atol=1e-4)
    if geo is not None:   # all-zero patches read exactly 0 in every tile
        np.testing.assert_array_equal(got[0, 0, 0], 0.0)


def test_a_tiles_noise_comes_from_the_layer_key_and_its_index_by_name():
    """Tile (1, 0) of a layer draws its I/O noise from name_key(layer key, "tile/1/0"); a tile whose input slice
    is all zero reads exactly 0, so the layer's output is tile (1, 0)'s alone."""
    spec = analog_lib.AnalogSpec(io=analog_lib.IOParams(out_res=None), max_input_size=32, max_output_size=0)
    w = jax.random.normal(jax.random.key(43), (64, 5)) * 0.3
    lay = analog_lib.tile_layout(w.shape, spec)
    tiles = analog_lib.to_tiles(w, lay)
    x = jnp.zeros((7, 64)).at[:, 32:].set(jax.random.normal(jax.random.key(44), (7, 32)))
    key = jax.random.key(45)
    y = analog_lib.tiled_mvm(key, x, tiles, jnp.full(lay.shape[:2] + (1, 1), 2.0), spec.io, lay)
    alone = analog_lib.analog_mvm(noise.name_key(jax.random.clone(key), "tile/1/0"), x[:, 32:], tiles[1, 0], spec.io)
    np.testing.assert_allclose(y, 2.0 * alone, rtol=1e-6, atol=1e-6)
    assert float(jnp.std(y - 2.0 * x @ w)) > 0.01   # output noise is on


@pytest.mark.parametrize("omega, columnwise", [(0.0, False), (1.0, False), (0.5, True)])
def test_weight_scaling_omega_sets_the_tile_units(omega, columnwise):
    """omega 0 (aihwkit's default): the raw weights on the tile, no output scale; omega > 0: w / a with
    a = max|W_tile| / omega per tile or per tile column, the output times a. Conductances per tile."""
    w = jax.random.normal(jax.random.key(46), (40, 6)) * 0.2
    spec = analog_lib.AnalogSpec(weight_scaling_omega=omega, weight_scaling_columnwise=columnwise, max_input_size=20)
    chip = analog_lib.program_chip(jax.random.key(47), {"fc": {"kernel": w}}, spec)["fc"]
    tiles = np.asarray(analog_lib.to_tiles(w, analog_lib.tile_layout(w.shape, spec)))
    amax = np.max(np.abs(tiles), axis=2 if columnwise else (2, 3), keepdims=True)
    a = amax / omega if omega > 0 else np.ones_like(amax)
    np.testing.assert_allclose(chip["w_scale"], a, rtol=1e-6)
    np.testing.assert_allclose(chip["w_target"], tiles / a, rtol=1e-6)
    if omega == 0:
        np.testing.assert_array_equal(chip["w_target"], tiles)
    np.testing.assert_allclose(chip["scale"], 25.0 / np.max(np.abs(tiles / a), axis=(2, 3), keepdims=True),
                               rtol=1e-5)
    layers = analog_lib.read_chip(jax.random.key(48), {"fc": chip}, 0.0, spec)
    x = jax.random.normal(jax.random.key(49), (3, 40))
    y = analog_lib.AnalogContext(analog_lib.ChipRead(spec, layers), None).mvm("fc", x, w, None)
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-5)   # exact MVM, no PCM: the layer's own output


def test_read_step_reconverts_the_programmed_weights_onto_one_device():
    """aihwkit apply_drift_noise: w_p is converted again (one device of each pair non-zero), so an entry drifts
    with nu+ where w_p > 0 and nu- where w_p < 0, whatever programming noise put on the other device."""
    pcm = analog_lib.PCMModel(read_noise_scale=0.0)
    spec = analog_lib.AnalogSpec(pcm=pcm, max_input_size=16)
    w = jax.random.normal(jax.random.key(50), (24, 5))
    chip = analog_lib.program_chip(jax.random.key(51), {"fc": {"kernel": w}}, spec)
    c = dict(chip["fc"])
    assert float(jnp.min(jnp.minimum(c["g_plus"], c["g_minus"])[c["mask"]])) >= 0
    assert float(jnp.max(jnp.minimum(c["g_plus"], c["g_minus"]))) > 0   # programming noise on both devices
    c["nu_plus"] = jnp.full_like(c["nu_plus"], 0.05)
    c["nu_minus"] = jnp.full_like(c["nu_minus"], 0.1)
    t = 86400.0
    w_t = analog_lib.read_chip(jax.random.key(52), {"fc": c}, t, spec)["fc"]["w_tile"]
    w_p = np.asarray((c["g_plus"] - c["g_minus"]) / c["scale"], np.float64)
    r = (t + 20.0) / 20.0
    want = np.where(np.asarray(c["mask"]), w_p * np.where(w_p > 0, r ** -0.05, r ** -0.1), 0.0)
    np.testing.assert_allclose(w_t, want, rtol=1e-5, atol=1e-7)


def test_read_noise_uses_the_reconverted_conductance():
    """Read noise of the one non-zero device g' = |w_p| 25 / max|w_p|: all |w| equal gives g' = 25 (Q_s = 0.0088)."""
    pcm = analog_lib.PCMModel(prog_noise_scale=0.0, drift_scale=0.0)
    spec = analog_lib.AnalogSpec(pcm=pcm, g_max=25.0)
    w = jnp.sign(jax.random.normal(jax.random.key(53), (16, 8))) * 0.3
    chip = analog_lib.program_chip(jax.random.key(54), {"fc": {"kernel": w}}, spec)
    t = 3600.0
    keys = jax.random.split(jax.random.key(55), 200)
    w_t = jax.jit(jax.vmap(lambda k: analog_lib.read_chip(k, chip, t, spec)["fc"]["w_tile"]))(keys)
    rel = np.asarray(w_t / chip["fc"]["w_target"] - 1.0, np.float64).ravel()
    sigma = float(np_sigma_read(np.float64(25.0), t))
    n = rel.size
    assert abs(rel.mean()) < Z * sigma / math.sqrt(n)
    assert abs(rel.std(ddof=1) - sigma) < Z * sigma / math.sqrt(2 * (n - 1))


def test_compensation_readout_is_per_tile_at_input_one():
    """r0 of each tile is the identity at input 1.0 through that tile's I/O (aihwkit reads the raw tile: no input
    range), the mean over the tile's real entries."""
    io = analog_lib.IOParams(out_noise=0.0, noise_management="constant", nm_scale=1.0, bound_management="none",
                         inp_ranges={"fc": 4.0})
    spec = analog_lib.AnalogSpec(io=io, compensation="global", max_input_size=11, max_output_size=3)
    w = jax.random.uniform(jax.random.key(56), (21, 5), minval=-0.5, maxval=0.5)
    chip = analog_lib.program_chip(jax.random.key(57), {"fc": {"kernel": w}}, spec)["fc"]
    lay = analog_lib.tile_layout(w.shape, spec)   # in (11, 10), out (3, 2)
    m = np.asarray(w, np.float64)
    i0 = 0
    for i, ni in enumerate(lay.in_sizes):
        o0 = 0
        for j, nj in enumerate(lay.out_sizes):
            y = np_quantize(np_quantize(np.ones(1), 1 / 126, 1.0) * m[i0:i0 + ni, o0:o0 + nj], 1 / 510, 12.0)
            np.testing.assert_allclose(chip["r0"][i, j, 0, 0], np.mean(np.abs(y)), rtol=1e-5)
            o0 += nj
        i0 += ni


def test_exact_reference_compensation_reads_the_target_weights():
    """compensation="global_exact" (aihwkit GlobalDriftCompensationWithExactReference): r0 = max(mean|w_target|,
    1e-4) per tile, no I/O and no programming noise; the readout at t is "global"'s (same keys, same r_t)."""
    io = analog_lib.IOParams(out_noise=0.2)   # a noisy readout, which the exact reference does not see
    base = analog_lib.AnalogSpec(io=io, pcm=analog_lib.PCMModel(), compensation="global", max_input_size=11,
                             max_output_size=3, weight_scaling_omega=1.0, weight_scaling_columnwise=True)
    exact = base.replace(compensation="global_exact")
    w = jax.random.uniform(jax.random.key(58), (21, 5), minval=-0.5, maxval=0.5)
    params = {"fc": {"kernel": w}}
    chip_g = analog_lib.program_chip(jax.random.key(59), params, base)
    chip_e = analog_lib.program_chip(jax.random.key(59), params, exact)
    lay = analog_lib.tile_layout(w.shape, exact)
    target, mask = np.asarray(chip_e["fc"]["w_target"], np.float64), np.asarray(chip_e["fc"]["mask"])
    want = np.array([[np.mean(np.abs(target[i, j][mask[i, j]])) for j in range(2)] for i in range(2)])
    np.testing.assert_allclose(np.asarray(chip_e["fc"]["r0"])[..., 0, 0], want, rtol=1e-6)
    assert lay.shape[:2] == (2, 2) and not np.allclose(chip_g["fc"]["r0"], chip_e["fc"]["r0"], rtol=1e-3)
    for name in ("g_plus", "g_minus", "nu_plus", "nu_minus"):   # the same chip otherwise
        np.testing.assert_array_equal(chip_g["fc"][name], chip_e["fc"][name])
    read_g = analog_lib.read_chip(jax.random.key(60), chip_g, 86400.0, base)["fc"]
    read_e = analog_lib.read_chip(jax.random.key(60), chip_e, 86400.0, exact)["fc"]
    r_t = np.asarray(chip_g["fc"]["r0"]) / np.asarray(read_g["alpha"])
    np.testing.assert_allclose(np.asarray(read_e["alpha"]), np.asarray(chip_e["fc"]["r0"]) / r_t, rtol=1e-5)
    with pytest.raises(ValueError, match=r"global_exact.*needs IOParams\(semantics='aihwkit'\)"):
        analog_lib.AnalogSpec(io=analog_lib.IOParams(**analog_lib.LEGACY_IO), compensation="global_exact")


@pytest.mark.parametrize("shape, geo, max_in", [
    pytest.param((30, 7), None, 8, id="dense"),
    pytest.param((3, 3, 4, 5), {"stride": 1, "padding": 1}, 10, id="conv_patches"),
    pytest.param((3, 3, 4, 5), {"stride": 1, "padding": 1}, 18, id="conv_groups", marks=pytest.mark.slow)])
def test_tiled_layer_gradient_is_the_exact_maps(shape, geo, max_in):
    """Straight-through: with noise-free, unquantised I/O the tiled layer's value and gradients are the exact
    layer's (dense and both conv paths)."""
    io = analog_lib.IOParams(inp_res=None, out_res=None, out_bound=None, out_noise=0.0)
    spec = analog_lib.AnalogSpec(io=io, max_input_size=max_in, max_output_size=3, weight_scaling_omega=1.0)
    w = jax.random.normal(jax.random.key(58), shape)
    x = jax.random.normal(jax.random.key(59), (4, 30) if geo is None else (2, 5, 5, 4))
    layers = analog_lib.read_chip(None, analog_lib.program_chip(jax.random.key(60), {"l": {"kernel": w}}, spec), 0.0,
                              spec)
    ctx = analog_lib.AnalogContext(analog_lib.ChipRead(spec, layers), jax.random.key(61))

    def f(x, w, analog):
        y = ctx.mvm("l", x, w, geo) if analog else analog_lib._linear(x, w, geo)
        return jnp.sum(jnp.sin(y))

    both = jax.jit(jax.value_and_grad(f, (0, 1)), static_argnums=2)
    (va, ga), (vb, gb) = both(x, w, True), both(x, w, False)
    np.testing.assert_allclose(va, vb, rtol=1e-5)
    for a, b in zip(ga, gb):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("io", [pytest.param(False, id="pcm"),
                                pytest.param(True, id="pcm_io", marks=pytest.mark.slow)])   # ~20 s: I/O compiles
def test_tiled_time_sweep_compiles_once(io, trained_digits_cnn, digits):
    """Tiles (conv2: 144 inputs -> 2 channel groups; conv3: 288 -> 3 mid-channel tiles; 32 outputs -> 2 tiles):
    per-tile programming, reads and compensation (and I/O); a second sweep over other times reuses the program;
    the chip is fixed across times."""
    model, variables, _ = trained_digits_cnn
    x, y = digits.test.images[:40], digits.test.labels[:40]
    spec = analog_lib.preset("aihwkit_inference_default").replace(max_input_size=100, max_output_size=20)
    # I/O without bound management (its loops compile slowly); the tiles' own scaling, DAC and ADC stay.
    spec = spec.replace(io=spec.io.replace(bound_management="none") if io else None)
    lay = analog_lib.tile_layout((3, 3, 32, 32), spec)
    assert lay.shape == (3, 2, 96, 16) and not lay.channel_groups
    kw = dict(key=0, n_chips=2, batch_size=40, preprocess=digits.preprocess)
    before = robustness.trace_count()
    a = robustness.evaluate_analog(model, variables, x, y, spec, times=[1.0, 86400.0], **kw)
    b = robustness.evaluate_analog(model, variables, x, y, spec, times=[3600.0, 86400.0], **kw)
    assert robustness.trace_count() - before == 1
    np.testing.assert_array_equal(a[1].per_chip, b[1].per_chip)   # same chips, same time, same read keys
    assert all(0.0 <= r.mean <= 1.0 for r in a + b)


def test_presets_use_aihwkits_mapping_and_tiles():
    default, hwa = analog_lib.preset("aihwkit_inference_default"), analog_lib.preset("hwa_standard")
    assert (default.weight_scaling_omega, default.max_input_size, default.max_output_size) == (0.0, 512, 512)
    assert not default.weight_scaling_columnwise and default.mapping == "tensor"
    assert (hwa.weight_scaling_omega, hwa.weight_scaling_columnwise) == (1.0, True)
    assert (hwa.max_input_size, hwa.max_output_size) == (512, 0)
    assert analog_lib.tile_layout((3, 3, 64, 64), default).shape == (2, 1, 288, 64)
    assert analog_lib.tile_layout((3, 3, 64, 600), hwa).shape == (2, 1, 288, 600)
    assert default.describe()["max_input_size"] == 512 and not default.v0
    assert default.replace(io=default.io.replace(**LEGACY_IO)).v0


def test_legacy_io_sets_the_legacy_numerics_and_drops_the_learned_input_range():
    io = analog_lib.preset("hwa_standard").io
    assert io.input_range is not None
    legacy = analog_lib.legacy_io(io)
    assert legacy.input_range is None and legacy.semantics == "v0"
    assert {k: getattr(legacy, k) for k in LEGACY_IO} == LEGACY_IO
    assert legacy.replace(input_range=io.input_range, **{k: getattr(io, k) for k in LEGACY_IO}) == io   # nothing else
    assert analog_lib.legacy_io(io, sampler="rbg/icdf16").sampler == "rbg/icdf16"
    assert analog_lib.legacy_io(None) is None


@pytest.mark.parametrize("kwargs, match", [({"weight_scaling_omega": -1.0}, "weight_scaling_omega"),
                                           ({"max_input_size": -1}, "max_input_size"),
                                           ({"max_output_size": 2.5}, "max_output_size"),
                                           ({"weight_scaling_columnwise": "yes"}, "weight_scaling_columnwise")])
def test_bad_tile_fields_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        analog_lib.AnalogSpec(**kwargs)


def test_a_chip_is_read_under_the_semantics_it_was_programmed_with():
    spec = analog_lib.preset("aihwkit_inference_default")
    params = _dense_params(jax.random.key(62))
    chip = analog_lib.program_chip(jax.random.key(63), params, spec)
    legacy = spec.replace(io=spec.io.replace(**LEGACY_IO))
    with pytest.raises(ValueError, match="same spec"):
        analog_lib.read_chip(jax.random.key(64), chip, 0.0, legacy)
    with pytest.raises(ValueError, match="same spec"):
        analog_lib.read_chip(jax.random.key(64), analog_lib.program_chip(jax.random.key(63), params, legacy), 0.0, spec)



def test_a_tiles_programming_draw_comes_from_the_layer_key_and_its_index_by_name():
    """Tile (1, 0)'s programming noise: name_key(name_key(name_key(name_key(K, "jaxnoise/device/program"), site),
    "tile/1/0"), "g_plus"); another layer added leaves it unchanged."""
    pcm = analog_lib.PCMModel()
    spec = analog_lib.AnalogSpec(pcm=pcm, max_input_size=10)
    w = jax.random.normal(jax.random.key(68), (20, 3))
    params = {"fc": {"kernel": w}}
    key = jax.random.key(69)
    chip = analog_lib.program_chip(jax.random.clone(key), params, spec)["fc"]
    more = analog_lib.program_chip(jax.random.clone(key), {**params, "aaa": {"kernel": jnp.ones((4, 2))}}, spec)["fc"]
    np.testing.assert_array_equal(chip["g_plus"], more["g_plus"])
    k = key
    for name in ("jaxnoise/device/program", "fc", "tile/1/0", "g_plus"):
        k = noise.name_key(k, name)
    z = np.asarray(jax.random.normal(k, (10, 3)), np.float64)
    target = np.clip(np.asarray(w)[10:] * 25.0 / np.max(np.abs(np.asarray(w)[10:])), 0, 25)
    want = np.maximum(target + np_sigma_prog(target) * z, 0.0)
    np.testing.assert_allclose(chip["g_plus"][1, 0], want, rtol=1e-5, atol=1e-5)
