"""Tests of jaxnoise.distributed and of sharded Monte Carlo (robustness.evaluate/sweep/evaluate_analog(mesh=...)).

The multi-device checks run in a subprocess with 8 forced host devices (``XLA_FLAGS`` must be set before jax is
imported); see ``tests/_distributed_mc_child.py``.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from jaxnoise import distributed, robustness
from jaxnoise.noise import NoiseSpec

HERE = os.path.dirname(os.path.abspath(__file__))


def test_make_mesh_axes_and_errors():
    mesh = distributed.make_mesh()
    assert mesh.axis_names == (distributed.CHIPS, distributed.DATA)
    assert dict(mesh.shape) == {"chips": jax.device_count(), "data": 1}
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count"):
        distributed.make_mesh(jax.device_count() + 1, 1)
    with pytest.raises(ValueError, match=">= 1"):
        distributed.make_mesh(0, 1)


def test_mc_mesh_layout_on_fake_devices():
    devices = [object() for _ in range(8)]  # layout only: Mesh accepts any objects
    shape = lambda n: dict(distributed.mc_mesh(n, devices).shape)  # noqa: E731
    assert shape(32) == {"chips": 8, "data": 1}
    assert shape(8) == {"chips": 8, "data": 1}
    assert shape(5) == {"chips": 4, "data": 2}
    assert shape(3) == {"chips": 2, "data": 4}
    assert shape(1) == {"chips": 1, "data": 8}
    with pytest.raises(ValueError, match="n_chips"):
        distributed.mc_mesh(0, devices)


def test_global_array_and_to_host_roundtrip():
    mesh = distributed.make_mesh()
    x = np.arange(8.0 * jax.device_count()).reshape(-1, 1)
    g = distributed.global_array(x, mesh, distributed.P(distributed.CHIPS))
    assert isinstance(g.sharding, jax.sharding.NamedSharding)
    np.testing.assert_array_equal(distributed.to_host(g), x)
    rep = distributed.replicate({"a": np.ones(3)}, mesh)
    assert rep["a"].sharding.is_fully_replicated


def test_is_main_process_single_process():
    assert distributed.is_main_process()
    assert jax.process_count() == 1


def test_bad_mesh_is_refused(trained_digits_cnn, digits):
    model, variables, _ = trained_digits_cnn
    bad = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("x",))
    with pytest.raises(ValueError, match="mc_mesh"):
        robustness.evaluate(model, variables, digits.test.images[:10], digits.test.labels[:10],
                            NoiseSpec(weight_eta=0.1), key=0, n_chips=2, preprocess=digits.preprocess, mesh=bad)


def test_one_device_mesh_equals_no_mesh(trained_digits_cnn, digits):
    model, variables, _ = trained_digits_cnn
    x, y = digits.test.images[:100], digits.test.labels[:100]
    kw = dict(key=1, n_chips=3, batch_size=40, preprocess=digits.preprocess)
    spec = NoiseSpec(weight_eta=0.2, act_kind="multiplicative", act_eta=0.1)
    a = robustness.evaluate(model, variables, x, y, spec, **kw)
    b = robustness.evaluate(model, variables, x, y, spec, mesh=distributed.mc_mesh(3), **kw)
    np.testing.assert_array_equal(a.per_chip, b.per_chip)


@pytest.mark.slow  # an 8-device child process (~30 s); test_one_device_mesh_equals_no_mesh runs by default
def test_sharded_mc_on_8_forced_host_devices(trained_digits_cnn, tmp_path):
    """Per-chip accuracies on 8 devices (chips and data sharded, uneven chips and batches) equal the single-device
    run for evaluate, sweep, evaluate_analog and adaptive evaluate; a sweep on a mesh compiles once."""
    _, variables, _ = trained_digits_cnn
    flat = traverse_util.flatten_dict(jax.device_get(variables), sep="/")
    np.savez(tmp_path / "vars.npz", **flat)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_distributed_mc_child.py"),
                           str(tmp_path / "vars.npz"), str(tmp_path / "out.json")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["n_devices"] == 8
    ev = out["evaluate"]
    for mesh in ("8x1", "4x2"):
        assert ev[f"{mesh}_devices"] == 8
        assert ev[mesh] == ev["single"], mesh
    assert len(set(ev["single"])) > 1  # the chips differ: the comparison is not vacuous
    assert out["mc_mesh_5"] == {"chips": 4, "data": 2}
    assert out["sweep"]["sharded"] == out["sweep"]["single"]
    assert out["sweep"]["traces"] == 1
    means = [np.mean(s) for s in out["sweep"]["single"]]
    assert means[0] > means[-1]  # accuracy falls with the scale
    assert out["device"]["sharded"] == out["device"]["single"]
    ad = out["adaptive"]
    assert ad["sharded"] == ad["single"]
    assert len(ad["sharded"]) == 23 and ad["stopping"]["rounds"] == 5 and not ad["stopping"]["met_target"]


@pytest.mark.slow  # the full I/O chain compiles slowly on CPU (~1 min)
def test_sharded_full_device_preset_on_8_forced_host_devices(trained_digits_cnn, tmp_path):
    """The full aihwkit_inference_default preset (DAC/ADC quantisation, bound management, PCM drift and read noise):
    6 chips at 2 times give the single-device per-chip values on 8 x 1 and 2 x 4 meshes."""
    _, variables, _ = trained_digits_cnn
    np.savez(tmp_path / "vars.npz", **traverse_util.flatten_dict(jax.device_get(variables), sep="/"))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_distributed_mc_child.py"), "full_device",
                           str(tmp_path / "vars.npz"), str(tmp_path / "out.json")],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["8x1"] == out["single"] and out["2x4"] == out["single"]
    assert len(set(out["single"][1])) > 1  # chips differ: the comparison is not vacuous


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # 2 processes x 2 devices over jax.distributed (gloo), ~40 s on 2 cores
def test_sharded_mc_over_two_processes(trained_digits_cnn, tmp_path):
    """Multi-host: a mesh over 2 processes' devices gives every process the single-device per-chip values."""
    _, variables, _ = trained_digits_cnn
    np.savez(tmp_path / "vars.npz", **traverse_util.flatten_dict(jax.device_get(variables), sep="/"))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "_distributed_mc_child.py"), "multiprocess",
                               str(tmp_path / "vars.npz"), str(tmp_path / f"p{i}.json"), str(i), str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    outs = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in (0, 1)]
    assert [o["main"] for o in outs] == [True, False]
    for o in outs:
        assert o["process_count"] == 2 and o["device_count"] == 4
        assert o["4x1"] == o["alone"] and o["2x2"] == o["alone"]
    assert outs[0]["alone"] == outs[1]["alone"]
