"""Learned input ranges (aihwkit ``InputRangeParameter``): forward, the hand-derived range gradient, the data-driven
init, guards, and a tiny HWA training run whose ranges move and come back from its checkpoint.

The comparison with aihwkit itself is tests/test_aihwkit_input_ranges.py (skipped without aihwkit)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnoise import analog as analog_lib
from jaxnoise import checkpoint, cli
from jaxnoise.models import get_model


def _spec(max_in=0, max_out=0, **ir):
    """hwa_standard's training view without output noise and w_noise (deterministic), given tile sizes."""
    spec = analog_lib.preset("hwa_standard")
    io = spec.io.replace(out_noise=0.0, w_noise=0.0, input_range=analog_lib.InputRange(init_from_data=0, **ir))
    return spec.replace(io=io, max_input_size=max_in, max_output_size=max_out).training()


def _layer(spec, w, x, r, geo=None, key=None):
    """``(y, grads)`` of ``sum(y * c)`` for the one analog layer ``"layer"``, c fixed; grads in (r, x, kernel)."""
    params = {"layer": {"kernel": jnp.asarray(w)}}
    chip = analog_lib.read(analog_lib.chip_key(jax.random.key(0)), params, spec, 0.0)
    c = jnp.asarray(np.random.default_rng(7).normal(0, 1, jax.eval_shape(
        lambda: analog_lib.AnalogContext(chip, None).mvm("layer", jnp.asarray(x), params["layer"]["kernel"], geo,
                                                     jnp.asarray(r))).shape), jnp.float32)

    def f(r_, x_, k_):
        y = analog_lib.AnalogContext(chip, key).mvm("layer", x_, k_, geo, r_)
        return jnp.sum(y * c), y

    (_, y), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(
        jnp.asarray(r, jnp.float32), jnp.asarray(x), params["layer"]["kernel"])
    return np.asarray(y), [np.asarray(g) for g in grads], np.asarray(c)


def _rule(x, d, r, ir, clipped=0, entries=None):
    """aihwkit's range gradient of one tile (TileWithPeriphery.post_backward) in numpy float64."""
    g = np.sum(np.where(x >= r, np.minimum(d, 0), 0)) - np.sum(np.where(x <= -r, np.maximum(d, 0), 0))
    if ir.gradient_relative:
        g *= r * ir.gradient_scale
    n = x.size if entries is None else entries
    if ir.manage_output_clipping:
        p_out = 1 - clipped / n
        g -= (1 - p_out) * r * (p_out < ir.output_min_percentage)
    return g + ir.decay * r * (np.mean(np.abs(x) < r) > ir.input_min_percentage)


def _quant(v, res, bound=1.0):
    step = res * 2 * bound
    return np.clip(np.round(v / step) * step, -bound, bound)


# ----------------------------------------------------------------------------------------------------------------
# Forward


def test_forward_is_the_clamp_and_scale_per_tile():
    """Tile (i, j): r_ij * ADC(DAC(clip(x_i, -r_ij, r_ij) / r_ij) @ W_ij), summed over i (aihwkit pre/post_forward)."""
    rng = np.random.default_rng(0)
    w = rng.uniform(-0.5, 0.5, (20, 6)).astype(np.float32)
    x = (rng.normal(0, 1.5, (16, 20))).astype(np.float32)
    r = np.array([[1.2, 0.7], [2.0, 3.0]], np.float32)   # 2 input tiles x 2 output tiles
    spec = _spec(max_in=10, max_out=3)
    y, _, _ = _layer(spec, w, x, r)
    io = spec.io
    ref = np.zeros((16, 6))
    for i in range(2):
        for j in range(2):
            xs, ws = x[:, 10 * i:10 * (i + 1)].astype(np.float64), w[10 * i:10 * (i + 1), 3 * j:3 * (j + 1)]
            q = _quant(np.clip(xs, -r[i, j], r[i, j]) / r[i, j], io.inp_res)
            # omega 1 columnwise: tile weights W / a, output times a (a = max|column|)
            a = np.max(np.abs(ws), axis=0)
            ref[:, 3 * j:3 * (j + 1)] += _quant(q @ (ws / a), io.out_res, io.out_bound) * a * r[i, j]
    np.testing.assert_allclose(y, ref, atol=1e-5)


def test_without_io_input_range_the_leaves_are_ignored():
    """IOParams.input_range None (aihwkit enable=False): the layer runs at its constant scale, as without leaves."""
    rng = np.random.default_rng(1)
    w, x = rng.uniform(-0.5, 0.5, (8, 4)).astype(np.float32), rng.normal(0, 2, (5, 8)).astype(np.float32)
    spec = _spec()
    off = spec.replace(io=spec.io.replace(input_range=None))
    params = {"layer": {"kernel": jnp.asarray(w)}}
    chip = analog_lib.read(analog_lib.chip_key(jax.random.key(0)), params, off, 0.0)
    ctx = analog_lib.AnalogContext(chip, None)
    ignored = ctx.mvm("layer", jnp.asarray(x), params["layer"]["kernel"], None, jnp.full((1, 1), 0.5))
    plain = ctx.mvm("layer", jnp.asarray(x), params["layer"]["kernel"], None)
    np.testing.assert_array_equal(np.asarray(ignored), np.asarray(plain))


# ----------------------------------------------------------------------------------------------------------------
# Gradients, derived by hand


@pytest.mark.parametrize("ir", [dict(), dict(gradient_relative=False), dict(gradient_scale=0.3),
                                dict(decay=0.05, input_min_percentage=0.5)], ids=["default", "absolute", "scaled",
                                                                                  "decay"])
def test_range_gradient_is_aihwkits_rule_dense(ir):
    rng = np.random.default_rng(2)
    w = rng.uniform(-0.5, 0.5, (20, 6)).astype(np.float32)
    x = rng.normal(0, 1.5, (16, 20)).astype(np.float32)
    r = np.array([[1.2, 0.7], [2.0, 3.0]], np.float32)
    spec = _spec(max_in=10, max_out=3, **ir)
    _, (g_r, g_x, g_k), c = _layer(spec, w, x, r)
    ref = np.zeros((2, 2))
    dk = np.zeros_like(w, np.float64)
    for i in range(2):
        for j in range(2):
            rows, cols = slice(10 * i, 10 * (i + 1)), slice(3 * j, 3 * (j + 1))
            d = c[:, cols].astype(np.float64) @ w[rows, cols].T      # the gradient at the tile's input
            ref[i, j] = _rule(x[:, rows].astype(np.float64), d, r[i, j], spec.io.input_range)
            dk[rows, cols] = np.clip(x[:, rows], -r[i, j], r[i, j]).T @ c[:, cols]   # clipped input
    np.testing.assert_allclose(g_r, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_x, c @ w.T, rtol=1e-5, atol=1e-5)   # straight-through (no output at its bound)
    np.testing.assert_allclose(g_k, dk, rtol=1e-5, atol=1e-5)
    if ir.get("decay"):   # the decay term is on for the tile with most inputs inside its range
        assert np.mean(np.abs(x[:, 10:]) < 3.0) > 0.5


def test_range_gradient_counts_every_conv_patch_entry():
    """A conv's tile input is its im2col patches ((cin, kh, kw) order, zero padding included), as aihwkit's
    unfold: 3 tiles of 24 inputs split inside channels."""
    rng = np.random.default_rng(3)
    w = rng.uniform(-0.5, 0.5, (3, 3, 8, 6)).astype(np.float32)
    x = rng.normal(0, 1, (2, 6, 6, 8)).astype(np.float32)
    r = np.array([[0.9], [1.1], [1.6]], np.float32)
    spec = _spec(max_in=24, decay=0.05, input_min_percentage=0.2)
    _, (g_r, _, _), c = _layer(spec, w, x, r, geo={"stride": 1, "padding": 1})
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).astype(np.float64)
    patches = np.stack([xp[:, a:a + 6, b:b + 6, :] for a in range(3) for b in range(3)], axis=-1)   # (.., cin, 9)
    patches = patches.reshape(-1, 8 * 9)                                          # (cin, kh, kw) order
    m = w.transpose(2, 0, 1, 3).reshape(72, 6).astype(np.float64)
    d = c.reshape(-1, 6) @ m.T
    ref = [_rule(patches[:, 24 * i:24 * (i + 1)], d[:, 24 * i:24 * (i + 1)], r[i, 0], spec.io.input_range)
           for i in range(3)]
    np.testing.assert_allclose(g_r.ravel(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("manage", [False, True])
def test_clipped_outputs_mask_the_gradient_and_grow_the_range(manage):
    """Outputs at the ADC bound: their gradient is zeroed for the input and range gradients (aihwkit's
    handle_output_bound), not for the kernel's; manage_output_clipping subtracts (1 - p_out) r when p_out < 0.95."""
    rng = np.random.default_rng(4)
    w = (rng.uniform(-0.5, 0.5, (4, 6)) * 12).astype(np.float32)
    x = rng.normal(0, 1.5, (16, 4)).astype(np.float32)
    r = 0.5
    spec = _spec(manage_output_clipping=manage).replace(weight_scaling_omega=0.0)   # tile units = raw weights
    y, (g_r, g_x, g_k), c = _layer(spec, w, x, np.full((1, 1), r, np.float32))
    mask = np.abs(y / r) >= 0.999 * spec.io.out_bound
    assert 0.05 < mask.mean() < 0.9
    d = np.where(mask, 0.0, c.astype(np.float64)) @ w.T
    ref = _rule(x.astype(np.float64), d, r, spec.io.input_range, int(mask.sum()), entries=x.size)
    np.testing.assert_allclose(g_r.ravel(), [ref], rtol=1e-5)
    np.testing.assert_allclose(g_x, d, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_k, np.clip(x, -r, r).T @ c, rtol=1e-5, atol=1e-5)
    if manage:   # the term is on: 1 - clipped / 64 entries < 0.95
        assert 1 - mask.sum() / x.size < 0.95


def test_fixed_ranges_clip_but_get_no_gradient():
    rng = np.random.default_rng(5)
    w, x = rng.uniform(-0.5, 0.5, (8, 4)).astype(np.float32), rng.normal(0, 2, (5, 8)).astype(np.float32)
    learned = _layer(_spec(), w, x, np.full((1, 1), 1.0, np.float32))
    fixed = _layer(_spec(learn_input_range=False), w, x, np.full((1, 1), 1.0, np.float32))
    np.testing.assert_array_equal(learned[0], fixed[0])
    assert np.all(fixed[1][0] == 0) and np.any(learned[1][0] != 0)
    np.testing.assert_array_equal(learned[1][2], fixed[1][2])


def test_a_ranges_shape_must_be_the_devices_tile_grid():
    w, x = np.ones((20, 4), np.float32), np.ones((2, 20), np.float32)
    with pytest.raises(ValueError, match=r"has shape \(1, 1\) but this device cuts the layer into \(2, 1\)"):
        _layer(_spec(max_in=10), w, x, np.ones((1, 1), np.float32))


@pytest.mark.parametrize("make, match", [
    (lambda: analog_lib.IOParams(semantics="v0", input_range=analog_lib.InputRange()), "needs semantics='aihwkit'"),
    (lambda: analog_lib.IOParams(noise_management="constant", bound_management="iterative",
                             input_range=analog_lib.InputRange(manage_output_clipping=True)),
     "manage_output_clipping needs noise_management='constant', bound_management='none'"),
    (lambda: analog_lib.InputRange(input_min_percentage=1.5), r"input_min_percentage=1.5 must be a fraction"),
    (lambda: analog_lib.InputRange(init_value=0.0), "init_value"),
    (lambda: analog_lib.IOParams(input_range={"decay": 0.1}), "must be a jaxnoise.analog.InputRange"),
])
def test_bad_input_range_settings_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ----------------------------------------------------------------------------------------------------------------
# Data-driven init and calibration


def test_init_input_ranges_follows_aihwkits_rules():
    """init_from_data: the mean over the first batches of alpha * std (unbiased, all entries); moving_std: all-zero
    input vectors left out; max: max |x|; per input tile of a conv (patches with padding)."""
    model = get_model("cnn", input_shape=(8, 8, 1), num_classes=10, channels=(4, 4))
    variables = model.init(jax.random.key(0))
    spec = analog_lib.preset("hwa_standard").training()
    spec = spec.replace(io=spec.io.replace(input_range=analog_lib.InputRange(init_from_data=2)))
    x = np.array(jax.random.normal(jax.random.key(1), (24, 8, 8, 1)))
    x[:3] = 0.0   # whole images of zeros: all-zero patches
    m2, v2 = analog_lib.init_input_ranges(model, variables, spec, x, batch_size=8)
    assert m2.input_ranges == {"conv1": (1, 1), "conv2": (1, 1), "head": (1, 1)}
    assert m2.config["input_ranges"]["conv2"] == [1, 1]
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = np.stack([xp[:, a:a + 8, b:b + 8, 0] for a in range(3) for b in range(3)], axis=-1).reshape(24, -1, 9)
    want = np.mean([3.0 * np.std(patches[b * 8:(b + 1) * 8], ddof=1) for b in range(2)])   # first 2 batches
    np.testing.assert_allclose(float(v2["params"]["conv1"]["input_range"][0, 0]), want, rtol=1e-5)
    _, vs = analog_lib.init_input_ranges(model, variables, spec, x, batch_size=8, method="moving_std", alpha=2.0)
    stds = []
    for b in range(3):
        rows = patches[b * 8:(b + 1) * 8].reshape(-1, 9)
        stds.append(2.0 * np.std(rows[np.any(rows != 0, axis=1)], ddof=1))
    np.testing.assert_allclose(float(vs["params"]["conv1"]["input_range"][0, 0]), np.mean(stds), rtol=1e-5)
    _, vm = analog_lib.init_input_ranges(model, variables, spec, x, batch_size=8, method="max")
    np.testing.assert_allclose(float(vm["params"]["conv1"]["input_range"][0, 0]), np.max(np.abs(x)), rtol=1e-6)
    # The model with ranges rebuilds from its recorded config.
    assert get_model("cnn", **m2.config, input_shape=(8, 8, 1)).input_ranges == m2.input_ranges


def test_init_input_ranges_needs_learned_ranges_on_the_device():
    model = get_model("mlp", input_shape=(8, 8, 1), num_classes=10)
    with pytest.raises(ValueError, match="needs a device spec with IOParams\\(input_range=InputRange\\(\\)\\)"):
        analog_lib.init_input_ranges(model, model.init(jax.random.key(0)), analog_lib.preset("aihwkit_inference_default"),
                                 np.zeros((4, 8, 8, 1), np.float32))


# ----------------------------------------------------------------------------------------------------------------
# Training: the ranges move and are restored from the checkpoint


@pytest.mark.slow  # ~25 s on a loaded 2-core machine: three CLI runs (train, HWA train, eval)
def test_hwa_training_learns_ranges_and_checkpoints_them(tmp_path):
    base = tmp_path / "clean"
    assert cli.main(["train", "--model", "mlp", "--dataset", "digits", "--epochs", "1", "--lr", "0.05",
                     "--max-steps", "5", "--workdir", str(base)]) == 0
    hwa = tmp_path / "hwa"
    assert cli.main(["train", "--checkpoint", str(base), "--method", "forward_noise", "--train-weight-noise", "none",
                     "--train-analog", "hwa_standard", "--learn-input-ranges", "--epochs", "1", "--lr", "0.05",
                     "--max-steps", "4", "--train-batch-size", "64", "--workdir", str(hwa)]) == 0
    meta = json.loads((hwa / "checkpoints" / "metadata.json").read_text())
    assert meta["model_config"]["input_ranges"] == {"fc1": [1, 1], "fc2": [1, 1], "head": [1, 1]}
    assert meta["loss_config"]["device"]["io"]["inp_ranges"] is None   # the learned ranges replace the constant
    # The init the run started from (the same call as the CLI's), and what training made of it.
    model = cli.build_model("mlp", cli.data.load_dataset("digits"), meta["model_config"])
    start = checkpoint.load_variables(str(base))
    ds = cli.data.load_dataset("digits")
    images = np.asarray(ds.preprocess(cli.data.calibration_images(ds.train, n=1024, seed=0)))
    _, init = analog_lib.init_input_ranges(model, start, analog_lib.preset("hwa_standard").training(), images,
                                       batch_size=64)
    trained = checkpoint.load_variables(str(hwa), model)   # checked against the model rebuilt from its config
    moved = [abs(float(trained["params"][s]["input_range"][0, 0]) - float(init["params"][s]["input_range"][0, 0]))
             for s in ("fc1", "fc2", "head")]
    assert max(moved) > 1e-4, moved
    # eval under hwa_standard uses the learned ranges (the model comes back from the checkpoint's config).
    out = tmp_path / "eval"
    assert cli.main(["eval", "--checkpoint", str(hwa), "--analog", "hwa_standard", "--times", "1", "--n-chips", "2",
                     "--n-images", "50", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["arms"][0]["eval"][0]["n_chips"] == 2


def test_denoised_model_keeps_the_backbones_learned_input_ranges():
    """Blocks inserted into a model with learned ranges: the analog layers still clip at the learned ranges, so with
    no block placed the denoised model's logits on a chip are the backbone's (before the fix they ran unclipped)."""
    from jaxnoise import denoise
    model = get_model("cnn", input_shape=(8, 8, 1), num_classes=10, channels=(4, 4))
    variables = model.init(jax.random.key(0))
    spec = analog_lib.preset("hwa_standard").training()
    spec = spec.replace(io=spec.io.replace(out_noise=0.0, w_noise=0.0,
                                           input_range=analog_lib.InputRange(init_from_data=2)))
    x = np.array(jax.random.normal(jax.random.key(1), (16, 8, 8, 1)))
    m2, v2 = analog_lib.init_input_ranges(model, variables, spec, x, batch_size=8)
    v2["params"] = {k: ({**p, "input_range": 0.25 * p["input_range"]} if "input_range" in p else p)
                    for k, p in v2["params"].items()}   # tight ranges: clipping changes the logits
    dm = denoise.denoised(m2)
    assert dm.input_ranges == m2.input_ranges
    dv = denoise.init_variables(dm, v2, jax.random.key(5), placement=[])
    chip_key = jax.random.key(2)
    want = m2.apply(v2, x, chip=m2.sample_chip(chip_key, v2["params"], None, spec).read(0.0, None)).logits
    got = dm.apply(dv, x, chip=dm.sample_chip(chip_key, dv["params"], None, spec).read(0.0, None)).logits
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    unclipped = model.apply(variables, x, chip=model.sample_chip(chip_key, variables["params"], None, spec).read(0.0, None))
    assert not np.allclose(np.asarray(unclipped.logits), np.asarray(want))   # the ranges matter here
