"""Learned input ranges against IBM aihwkit 1.2.0 itself: forward, range and input gradients, data-driven init and
calibration, on a dense and a conv layer (StandardHWATrainingPreset with ir_drop, output noise and w_noise off,
so that both sides are deterministic).

Skipped unless torch and aihwkit are importable (not in the project's venv or CI); run it in the peer venv:

  PYTHONPATH=. <peer venv>/bin/python -m pytest -q tests/test_aihwkit_input_ranges.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import require_aihwkit

from jaxnoise import analog as analog_lib
from jaxnoise.models import get_model

torch = require_aihwkit("the aihwkit input-range check", __file__)

GEO = {"stride": 1, "padding": 1}


def _rpu(max_in=0, omega=1.0, manage=False, decay=0.001, init_from_data=0):
    from aihwkit.simulator.parameters.enums import NoiseManagementType
    from aihwkit.simulator.presets import StandardHWATrainingPreset
    c = StandardHWATrainingPreset()
    c.forward.ir_drop = 0.0
    c.forward.out_noise = 0.0
    c.forward.w_noise = 0.0
    c.mapping.max_input_size = max_in
    c.mapping.max_output_size = 0
    c.mapping.weight_scaling_omega = omega
    ir = c.pre_post.input_range
    ir.init_from_data = init_from_data
    ir.decay = decay
    if manage:   # aihwkit allows it with noise management NONE only (= jaxnoise's constant scale r)
        c.forward.noise_management = NoiseManagementType.NONE
        ir.manage_output_clipping = True
    return c


def _spec(max_in=0, omega=1.0, manage=False, decay=0.001, init_from_data=0):
    spec = analog_lib.preset("hwa_standard")
    io = spec.io.replace(out_noise=0.0, w_noise=0.0, input_range=analog_lib.InputRange(
        init_from_data=init_from_data, manage_output_clipping=manage, decay=decay))
    return spec.replace(io=io, max_input_size=max_in, max_output_size=0, weight_scaling_omega=omega).training()


def _aihwkit_layer(kind, w, rpu):
    from aihwkit.nn import AnalogConv2d, AnalogLinear
    if kind == "dense":
        m = AnalogLinear(w.shape[0], w.shape[1], bias=False, rpu_config=rpu)
        m.set_weights(torch.from_numpy(np.ascontiguousarray(w.T)))
    else:
        m = AnalogConv2d(w.shape[2], w.shape[3], w.shape[0], stride=1, padding=1, bias=False, rpu_config=rpu)
        m.set_weights(torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1))))
    return m


def _to_torch(kind, a):
    return torch.from_numpy(np.ascontiguousarray(a if kind == "dense" else a.transpose(0, 3, 1, 2)))


def _from_torch(kind, t):
    a = t.detach().numpy()
    return a if kind == "dense" else a.transpose(0, 2, 3, 1)


CASES = {   # name: (kind, gain, max_in, ranges, omega, manage, decay)
    "dense_2tiles": ("dense", 1.0, 10, [1.2, 2.0], 1.0, False, 0.001),
    "dense_clipped_outputs": ("dense", 12.0, 0, [0.5], 0.0, False, 0.001),
    "dense_manage_output_clipping": ("dense", 12.0, 0, [0.3], 0.0, True, 0.001),
    "dense_decay_on": ("dense", 1.0, 0, [6.0], 1.0, False, 0.05),
    "conv_channel_groups": ("conv", 1.0, 36, [0.8, 1.5], 1.0, False, 0.001),
    "conv_split_channels": ("conv", 1.0, 32, [0.9, 1.1, 1.6], 1.0, False, 0.001),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_gradients_match_aihwkit(name):
    kind, gain, max_in, ranges, omega, manage, decay = CASES[name]
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    if kind == "dense":
        n_in = 20 if max_in else 4
        w = (rng.uniform(-0.5, 0.5, (n_in, 6)) * gain).astype(np.float32)
        x = rng.normal(0, 1.5, (16, n_in)).astype(np.float32)
    else:
        w = (rng.uniform(-0.5, 0.5, (3, 3, 8, 6)) * gain).astype(np.float32)
        x = rng.normal(0, 1, (2, 6, 6, 8)).astype(np.float32)
    m = _aihwkit_layer(kind, w, _rpu(max_in, omega, manage, decay))
    m.train()
    for tile, r in zip(m.analog_tiles(), ranges):
        tile.set_input_range(r)
    xt = _to_torch(kind, x).requires_grad_(True)
    y_a = m(xt)
    c = rng.normal(0, 1, _from_torch(kind, y_a).shape).astype(np.float32)
    (y_a * _to_torch(kind, c)).sum().backward()
    g_a = np.array([t.input_range.grad.item() for t in m.analog_tiles()])

    spec = _spec(max_in, omega, manage, decay)
    params = {"layer": {"kernel": jnp.asarray(w)}}
    chip = analog_lib.read(analog_lib.chip_key(jax.random.key(0)), params, spec, 0.0)
    geo = None if kind == "dense" else GEO

    def f(r, xx):
        y = analog_lib.AnalogContext(chip, None).mvm("layer", xx, params["layer"]["kernel"], geo, r)
        return jnp.sum(y * c), y

    (_, y_j), (g_j, gx_j) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
        jnp.asarray(ranges, jnp.float32)[:, None], jnp.asarray(x))
    scale = float(np.max(np.abs(_from_torch(kind, y_a))))
    np.testing.assert_allclose(np.asarray(y_j), _from_torch(kind, y_a), atol=1e-5 * scale)
    np.testing.assert_allclose(np.asarray(g_j).ravel(), g_a, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gx_j), _from_torch(kind, xt.grad), rtol=1e-5, atol=1e-5)
    if "clip" in name:   # the case exercises the output-bound mask (and the output-clipping term)
        assert np.mean(np.abs(_from_torch(kind, y_a)) / ranges[0] >= 0.999 * 10) > 0.05


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_data_driven_init_and_calibration_match_aihwkit(kind):
    """init_from_data = aihwkit's range after its first training batches (no optimizer step); moving_std and max =
    aihwkit.inference.calibration.calibrate_input_ranges on a fresh layer."""
    from aihwkit.inference.calibration.calibration import InputRangeCalibrationType, calibrate_input_ranges
    torch.set_num_threads(1)
    rng = np.random.default_rng(1)
    if kind == "dense":
        model = get_model("mlp", hidden=(), input_shape=(1, 1, 20), num_classes=6)
        site, x = "head", np.maximum(rng.normal(0, 1, (24, 1, 1, 20)), 0).astype(np.float32)
        x[:5] = 0.0
        w = rng.uniform(-0.5, 0.5, (20, 6)).astype(np.float32)
        xin = x.reshape(24, 20)
    else:
        model = get_model("cnn", channels=(6,), input_shape=(6, 6, 8), num_classes=6)
        site, x = "conv1", np.maximum(rng.normal(0, 1, (24, 6, 6, 8)), 0).astype(np.float32)
        x[:2, :3, :3, :] = 0.0
        w = rng.uniform(-0.5, 0.5, (3, 3, 8, 6)).astype(np.float32)
        xin = x
    variables = model.init(jax.random.key(0))
    variables["params"][site]["kernel"] = jnp.asarray(w)
    spec = _spec(max_in=40, init_from_data=2)   # 2 input tiles on both layers
    batches = [xin[i:i + 8] for i in range(0, 24, 8)]
    tiles_of = {}
    for method in ("init_from_data", "moving_std", "max"):
        m = _aihwkit_layer(kind, w, _rpu(max_in=40, init_from_data=2 if method == "init_from_data" else 0))
        if method == "init_from_data":
            m.train()
            with torch.no_grad():
                for b in batches:
                    m(_to_torch(kind, b))
        else:
            typ = InputRangeCalibrationType.MOVING_STD if method == "moving_std" else InputRangeCalibrationType.MAX
            calibrate_input_ranges(m, typ, iter([((_to_torch(kind, b),), {}) for b in batches]), std_alpha=3.0)
        tiles_of[method] = [t.input_range.item() for t in m.analog_tiles()]
        _, v = analog_lib.init_input_ranges(model, variables, spec, x, method=method, batch_size=8)
        got = np.asarray(v["params"][site]["input_range"]).ravel()
        np.testing.assert_allclose(got, tiles_of[method], rtol=1e-5, err_msg=method)
    assert tiles_of["moving_std"] != tiles_of["init_from_data"]   # the zero vectors make a difference
