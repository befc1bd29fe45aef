"""Weight/activation quantization (jaxnoise.quant) and noise on quantized weights."""

import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import traverse_util

from jaxnoise import checkpoint, cli, noise, quant, robustness, train
from jaxnoise.models import get_model

Q4 = quant.QuantSpec(weight_bits=4)


def test_levels_and_quantizer_grid_with_clipping():
    assert quant.levels(4) == (7, 7) and quant.levels(4, signed=False) == (0, 15) and quant.levels(2) == (1, 1)
    w = jnp.linspace(-2.0, 2.0, 401)
    step = jnp.float32(0.1)
    q = np.asarray(quant.fake_quant(w, step, 7, 7))
    k = q / 0.1
    np.testing.assert_allclose(k, np.round(k), atol=1e-4)          # on the grid of the step
    assert k.min() == pytest.approx(-7) and k.max() == pytest.approx(7)   # clipped at the outer levels
    inside = np.abs(np.asarray(w)) < 0.65
    np.testing.assert_array_less(np.abs(q - np.asarray(w))[inside], 0.05 + 1e-6)   # round to nearest
    assert len(np.unique(np.round(k))) == 15
    # unsigned levels after a ReLU: 0 .. 15
    u = np.asarray(quant.fake_quant(jnp.linspace(-1, 3, 101), jnp.float32(0.125), 0, 15)) / 0.125
    assert u.min() == 0 and u.max() == pytest.approx(15)


def test_straight_through_gradient_inside_the_range_zero_outside():
    w = jnp.array([-1.0, -0.69, -0.2, 0.0, 0.33, 0.71, 2.0])
    g = jax.grad(lambda w: jnp.sum(quant.fake_quant(w, 0.1, 7, 7)))(w)
    np.testing.assert_array_equal(g, [0, 1, 1, 1, 1, 0, 0])


def test_lsq_step_gradient_matches_the_hand_derivation():
    """Esser et al. eq. 3 and 5: dq/ds = round(v) - v inside (v = w/s), -Q_n below, Q_p above; times 1/sqrt(N Q_p)."""
    w = jax.random.normal(jax.random.key(0), (300,)) * 0.5
    c = jax.random.normal(jax.random.key(1), (300,))
    s = jnp.float32(0.09)
    qn, qp = quant.levels(4)
    got = jax.grad(lambda s: jnp.sum(c * quant.lsq(w, s, qn, qp, w.size)), argnums=0)(s)
    v = np.asarray(w) / float(s)
    d = np.where(v <= -qn, -qn, np.where(v >= qp, qp, np.round(v) - v))
    want = np.sum(np.asarray(c) * d) / np.sqrt(w.size * qp)
    assert abs(float(got) - want) < 1e-4 * max(1.0, abs(want))
    # the weight gradient is straight-through inside, 0 outside
    gw = jax.grad(lambda w: jnp.sum(c * quant.lsq(w, s, qn, qp, w.size)))(w)
    np.testing.assert_allclose(gw, np.where((v > -qn) & (v < qp), np.asarray(c), 0.0), atol=1e-6)
    # unchanged value: the gradient scale changes only the gradient
    np.testing.assert_array_equal(quant.lsq(w, s, qn, qp, w.size), quant.fake_quant(w, s, qn, qp))


@pytest.mark.parametrize("rule", ["max", "percentile", "std", "lsq"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_step_rules(rule, per_channel):
    w = np.asarray(jax.random.normal(jax.random.key(2), (3, 3, 8, 6))) * np.arange(1, 7)
    s = np.asarray(quant.step_statistic(jnp.asarray(w), rule, 7, per_channel=per_channel, percentile=80, k_std=3))
    a = np.abs(w).reshape(-1, 6) if per_channel else np.abs(w).reshape(-1)
    axis = 0 if per_channel else None
    want = {"max": a.max(axis) / 7, "percentile": np.percentile(a, 80, axis=axis) / 7,
            "std": 3 * (w.reshape(-1, 6) if per_channel else w.reshape(-1)).std(axis) / 7,
            "lsq": 2 * a.mean(axis) / np.sqrt(7)}[rule]
    np.testing.assert_allclose(s, want, rtol=1e-5)
    assert s.shape == ((6,) if per_channel else ())
    if rule == "max":   # nothing clipped
        q = np.asarray(quant.fake_quant(jnp.asarray(w), jnp.asarray(s), 7, 7))
        np.testing.assert_allclose(np.abs(q).reshape(-1, 6).max(0) if per_channel else np.abs(q).max(),
                                   a.max(axis), rtol=1e-6)


@pytest.mark.parametrize("bits, match", [(1, "from 2 to 16"), (17, "from 2 to 16"), (3.5, "integer"),
                                         (4.0, "write 4"), (True, "integer"), ("4", "integer")])
def test_bad_bit_widths_are_rejected(bits, match):
    with pytest.raises(ValueError, match=match):
        quant.QuantSpec(weight_bits=bits)
    with pytest.raises(ValueError, match=match):
        quant.QuantSpec(act_bits=bits)


@pytest.mark.parametrize("kwargs, match", [({"weight_step": "median"}, "weight_step"),
                                           ({"percentile": 0}, "percentile"), ({"per_channel": 1}, "per_channel"),
                                           ({"weight_paths": "kernel"}, "tuple"), ({"act_paths": ("(",)}, "regular")])
def test_bad_quant_fields_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quant.QuantSpec(**kwargs)


def _dense_params(n=(64, 48)):
    k = jax.random.normal(jax.random.key(3), n) * 0.1
    return {"fc": {"kernel": k, "bias": jnp.zeros(n[1])}}


def test_noise_on_quantized_weights_is_relative_to_max_of_the_quantized_weights():
    """sigma = eta * max|W_q| of each layer's quantized weights (the authors' group's convention), one draw per chip."""
    spec = quant.QuantSpec(weight_bits=4, weight_step="percentile", percentile=80)
    params = _dense_params((256, 192))
    wq = quant.quantize_params(params, spec)["fc"]["kernel"]
    ns = noise.NoiseSpec(weight_eta=0.2)
    noisy = noise.perturb_weights(noise.weight_key(jax.random.key(4)), {"fc": {"kernel": wq}}, ns)["fc"]["kernel"]
    z = np.asarray(noisy - wq).reshape(-1) / (0.2 * float(jnp.max(jnp.abs(wq))))
    n = z.size
    assert abs(z.mean()) < 4 / np.sqrt(n)
    assert abs(z.std() - 1) < 4 / np.sqrt(2 * n)
    assert scipy.stats.kstest(z, "norm").pvalue > 1e-3
    # 4-bit levels clipped at the 80th percentile: the noise is about 0.25-0.35 rms(W), far from 0.2 max|W| of float
    rms = float(jnp.sqrt(jnp.mean(params["fc"]["kernel"] ** 2)))
    assert 0.2 < 0.2 * float(jnp.max(jnp.abs(wq))) / rms < 0.4


def test_truncated_noise_is_bounded_with_the_clipped_normal_std():
    w = jnp.ones((400, 300))
    spec = noise.NoiseSpec(weight_eta=0.1, weight_truncate=3.0)
    d = np.asarray(noise.perturb_weights(noise.weight_key(jax.random.key(5)), {"kernel": w}, spec)["kernel"] - w)
    z = d.reshape(-1) / 0.1
    assert np.abs(z).max() <= 3.0 + 1e-6
    assert np.mean(np.abs(z) >= 3.0 - 1e-6) == pytest.approx(2 * scipy.stats.norm.sf(3), abs=4e-4)
    k = noise.clipped_normal_std(3.0)
    assert k == pytest.approx(0.99750, abs=1e-4)   # E[z^2] = 0.9707 inside + 9 x 0.0027 at the clip
    assert abs(z.std() - k) < 4 * k / np.sqrt(2 * z.size)
    assert spec.describe()["weight_noise"]["truncate"] == 3.0
    assert "truncate" not in noise.NoiseSpec(weight_eta=0.1).describe()["weight_noise"]
    # the same draw, clipped: truncation changes only the tails
    plain = noise.perturb_weights(noise.weight_key(jax.random.key(5)), {"kernel": w},
                                  noise.NoiseSpec(weight_eta=0.1))["kernel"] - w
    small = np.abs(np.asarray(plain)) < 0.29
    np.testing.assert_array_equal(d[small], np.asarray(plain)[small])
    for bad in (0, -1, float("inf"), True):
        with pytest.raises(ValueError, match="weight_truncate"):
            noise.NoiseSpec(weight_eta=0.1, weight_truncate=bad)


def _quant_cnn(digits, **kw):
    q = quant.QuantSpec(**{"weight_bits": 4, "act_bits": 4, "act_signed_paths": ("^conv1$",), **kw})
    return get_model("cnn", input_shape=digits.image_shape, num_classes=10, quant=q)


# Slow set: among the default suite's heaviest (2026-12-03 --durations); CI runs it in the slow pass.
@pytest.mark.slow
def test_model_quantizes_weights_and_inputs_with_learned_steps(trained_digits_cnn, digits):
    model, variables, _ = trained_digits_cnn
    qm = _quant_cnn(digits)
    images = digits.preprocess(digits.train.images[:256])
    with pytest.raises(ValueError, match="init_steps"):
        qm.apply(variables, images[:4])
    qv = quant.init_steps(qm, variables, images)
    flat = traverse_util.flatten_dict(qv["params"], sep="/")
    kernels = [p for p in flat if p.endswith("/kernel")]
    assert all(p[:-len("kernel")] + "w_step" in flat for p in kernels)
    assert all(s + "/a_step" in flat for s in qm.sites)
    # the abstract structure of a fresh quantized model is the one init_steps builds (checkpoints check it)
    fresh = traverse_util.flatten_dict(qm.init(jax.random.key(0))["params"], sep="/")
    assert set(fresh) == set(flat)
    # the MVM inputs are on the 4-bit grid of their steps (unsigned after a ReLU, signed for the first layer)
    inputs = qm.apply(qv, images[:32], capture_mvm=True).captured.inputs
    for site, x in inputs.items():
        s = float(flat[site + "/a_step"])
        k = np.asarray(x) / s
        np.testing.assert_allclose(k, np.round(k), atol=2e-3)
        lo, hi = (-7, 7) if site == "conv1" else (0, 15)
        assert k.min() >= lo - 1e-3 and k.max() <= hi + 1e-3
    # before any quantization-aware training: 8 bits without clipping keep the float accuracy; 4 bits clipped at
    # the 80th percentile lose part of it (training the steps and weights recovers it) but stay far above chance
    def acc(m, v):
        return robustness.evaluate(m, v, digits.test.images, digits.test.labels, preprocess=digits.preprocess).mean
    q8 = _quant_cnn(digits, weight_bits=8, act_bits=8, weight_step_init="max")
    acc_f, acc_8, acc_4 = acc(model, variables), acc(q8, quant.init_steps(q8, variables, images)), acc(qm, qv)
    assert acc_8 > acc_f - 0.02
    assert 0.3 < acc_4 < acc_8
    # gradients reach the learned steps
    g = jax.grad(lambda p: jnp.sum(qm.apply({**qv, "params": p}, images[:32])[0] ** 2))(qv["params"])
    gflat = traverse_util.flatten_dict(g, sep="/")
    assert all(float(jnp.abs(gflat[p])) > 0 for p in gflat if p.endswith("a_step") or p.endswith("w_step"))


def test_unsigned_layer_with_negative_inputs_is_refused(trained_digits_cnn, digits):
    _, variables, _ = trained_digits_cnn
    qm = _quant_cnn(digits, act_signed_paths=())
    with pytest.raises(ValueError, match=r"'conv1' gets negative inputs.*act_signed_paths"):
        quant.init_steps(qm, variables, digits.preprocess(digits.train.images[:64]) - 0.5)   # centred images
    with pytest.raises(ValueError, match="calibration images"):
        quant.init_steps(_quant_cnn(digits), variables)


def test_quantized_weight_noise_sweep_compiles_once_and_records_the_quantization(trained_digits_cnn, digits):
    _, variables, _ = trained_digits_cnn
    qm = _quant_cnn(digits)
    qv = quant.init_steps(qm, variables, digits.preprocess(digits.train.images[:256]))
    x, y = digits.test.images[:200], digits.test.labels[:200]
    spec = noise.NoiseSpec(weight_eta=0.0, weight_truncate=3.0)
    before = robustness.trace_count()
    res = robustness.sweep(qm, qv, x, y, spec, weight_etas=[0.0, 0.1, 0.2, 0.3], key=0, n_chips=4,
                           preprocess=digits.preprocess)
    assert robustness.trace_count() - before == 1
    means = [r.mean for r in res]
    assert means[0] > means[-1]   # more noise, lower accuracy
    w = res[1].to_dict()["weight_noise"]
    assert w["truncate"] == 3.0 and w["quant"]["weight_bits"] == 4 and w["quant"]["granularity"] == "tensor"
    assert w["quant"]["act_bits"] == 4
    # the truncation is array data too: specs that differ only in it share one compiled program
    before = robustness.trace_count()
    truncs = robustness.evaluate_many(qm, qv, x, y, [spec.replace(weight_eta=0.2, weight_truncate=k)
                                                     for k in (1.0, 2.0, 3.0)], key=0, n_chips=2,
                                      preprocess=digits.preprocess)
    assert robustness.trace_count() - before == 1
    assert [r.to_dict()["weight_noise"]["truncate"] for r in truncs] == [1.0, 2.0, 3.0]
    clean = robustness.evaluate(qm, qv, x, y, preprocess=digits.preprocess).to_dict()
    assert clean["quant"]["weight_bits"] == 4 if "quant" in clean else clean["noise"]["quant"]["weight_bits"] == 4
    json.dumps(res[1].to_dict())


@pytest.mark.parametrize("step", ["lsq", "percentile"])
def test_monte_carlo_chip_is_one_noise_draw_on_the_quantized_weights(trained_digits_cnn, digits, step):
    """Every evaluator counts what ``Model.apply`` computes for chip key fold_in(K, i): noise added to W_q (relative
    to max|W_q|), never to the float weights before quantizing (which is a different, far noisier network)."""
    _, variables, _ = trained_digits_cnn
    qm = _quant_cnn(digits, weight_step=step)
    qv = quant.init_steps(qm, variables, digits.preprocess(digits.train.images[:256]))
    x, y = digits.test.images[:300], digits.test.labels[:300]
    spec = noise.NoiseSpec(weight_eta=0.3, weight_truncate=3.0)
    key = jax.random.key(11)

    def by_apply(sp):
        out = []
        for i in range(3):
            logits = qm.apply(qv, digits.preprocess(x), key=jax.random.fold_in(key, i), noise=sp)[0]
            out.append(int(np.sum(np.argmax(np.asarray(logits), -1) == y)))
        return out

    expected = by_apply(spec)
    mc = robustness.evaluate(qm, qv, x, y, spec, key=key, n_chips=3, batch_size=100, preprocess=digits.preprocess)
    assert [round(a * len(y)) for a in mc.per_chip] == expected
    swept = robustness.sweep(qm, qv, x, y, spec, weight_etas=[0.3], key=key, n_chips=3, batch_size=100,
                             preprocess=digits.preprocess)[0]
    assert [round(a * len(y)) for a in swept.per_chip] == expected
    # the old mistake (noise on the float weights, then quantized) gives other networks
    w_float = noise.perturb_weights(noise.weight_key(jax.random.fold_in(key, 0)), qv["params"], spec)
    q_weights = qm.chip_weights(qv["params"], jax.random.fold_in(key, 0), spec)
    flat_q = traverse_util.flatten_dict(q_weights, sep="/")
    flat_f = traverse_util.flatten_dict(quant.quantize_params(w_float, qm.quant), sep="/")
    assert any(not np.array_equal(flat_q[p], flat_f[p]) for p in flat_q if p.endswith("kernel"))


def test_learned_steps_train_save_and_restore_and_eval_loads_them(trained_digits_cnn, digits, tmp_path):
    _, variables, _ = trained_digits_cnn
    qm = _quant_cnn(digits)
    qv = quant.init_steps(qm, variables, digits.preprocess(digits.train.images[:256]))
    with tempfile.TemporaryDirectory() as wd:
        out, _ = train.train(qm, digits, train.TrainConfig(epochs=1, batch_size=64, learning_rate=0.01),
                             workdir=wd, progress=False, variables=qv, max_steps=5)
        before = traverse_util.flatten_dict(qv["params"], sep="/")
        after = traverse_util.flatten_dict(out["params"], sep="/")
        moved = [p for p in after if p.endswith("_step") and not np.array_equal(after[p], before[p])]
        assert len(moved) == sum(p.endswith("_step") for p in after)   # every step learned
        meta = checkpoint.read_metadata(wd)
        assert meta["model_config"]["quant"]["weight_bits"] == 4
        rebuilt = get_model("cnn", **{k: v for k, v in meta["model_config"].items()
                                       if k in ("quant", "num_classes")}, input_shape=digits.image_shape)
        assert rebuilt.quant == qm.quant
        loaded = checkpoint.load_variables(wd, rebuilt)
        flat = traverse_util.flatten_dict(loaded["params"], sep="/")
        for p in after:
            np.testing.assert_array_equal(flat[p], after[p])
        # `jaxnoise eval` rebuilds the quantized model from the checkpoint and records the quantization
        out = tmp_path / "eval"
        assert cli.main(["eval", "--checkpoint", wd, "--weight-eta", "0.1", "--n-chips", "2", "--out", str(out)]) == 0
        entry = json.loads((out / "results.json").read_text())["arms"][0]["eval"][0]
        assert entry["weight_noise"]["quant"]["weight_bits"] == 4 and entry["weight_noise"]["eta"] == 0.1
        if os.path.exists("../shared/check_results.py"):   # the shared result format still validates
            checked = subprocess.run([sys.executable, "../shared/check_results.py", str(out / "results.json")],
                                     capture_output=True, text=True)
            assert checked.returncode == 0, checked.stdout + checked.stderr


def test_noise_ratios_describe_the_clip_and_the_noise_against_the_quantized_weights():
    params = _dense_params((256, 192))
    spec = quant.QuantSpec(weight_bits=4, weight_step="percentile", percentile=80)
    r = quant.noise_ratios(params, spec, 0.2)["fc/kernel"]
    wq = np.asarray(quant.quantize_params(params, spec)["fc"]["kernel"])
    assert r["clip_over_percentile"] == pytest.approx(1.0, abs=1e-5)       # the rule clips at the 80th percentile
    assert r["clipped_fraction"] == pytest.approx(0.2, abs=0.002)
    assert r["sigma_over_rms"] == pytest.approx(0.2 * np.abs(wq).max() / np.sqrt(np.mean(wq ** 2)), rel=1e-6)
    learned = quant.QuantSpec(weight_bits=4)
    p2 = quant.init_weight_steps(params, learned)
    assert quant.noise_ratios(p2, learned, 0.2)["fc/kernel"]["clip_over_percentile"] == pytest.approx(1.0, abs=1e-5)
