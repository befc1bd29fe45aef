"""Tests of data-parallel training over a ``jax.sharding.Mesh`` (``train.train(..., mesh=...)``) and of sharded
checkpoints.

The multi-device checks run in a child process (``tests/_distributed_train_child.py``) with 8 CPU devices forced
by ``XLA_FLAGS=--xla_force_host_platform_device_count=8``, which must be set before jax is imported; the rest runs
here, on this process's single device.
"""

import json
import os
import socket
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxnoise import checkpoint as ckpt
from jaxnoise import distributed
from jaxnoise import train as train_lib
from jaxnoise.models import get_model
from jaxnoise.train import TrainConfig, train

TESTS = os.path.dirname(os.path.abspath(__file__))
CHILD = os.path.join(TESTS, "_distributed_train_child.py")
# float32 reduction order differs between 1 and 8 devices; measured max |diff| after 6 steps: ~1.2e-7.
ATOL = 1e-5


@pytest.fixture(scope="module")
def dp(tmp_path_factory):
    """The child's measurements (see its ``main``): one run of every multi-device check."""
    tmp = tmp_path_factory.mktemp("dp")
    out = tmp / "out.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXNOISE_TEST_COMPILATION_CACHE": str(tmp / "xla_cache"),
           "XLA_FLAGS": " ".join(filter(None, [os.environ.get("XLA_FLAGS"),
                                               "--xla_force_host_platform_device_count=8"]))}
    proc = subprocess.run([sys.executable, CHILD, str(out), str(tmp / "runs")], env=env, cwd=os.path.dirname(TESTS),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and out.exists(), (
        f"child failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    with open(out) as f:
        results = json.load(f)
    print(f"data-parallel child: {json.dumps({k: v for k, v in results.items() if 'diff' in k})}, "
          f"{results['seconds']:.1f} s")
    return results


def assert_on_mesh(info):
    """Every leaf a fully replicated ``NamedSharding(mesh, P())`` over the mesh's 8 devices."""
    assert info == {"named": True, "same_mesh_devices": True, "n_devices": [8], "replicated": True,
                    "spec_empty": True}, info


# ----------------------------------------------------------------------------------------------------------------
# 8 devices (child process)


@pytest.mark.slow  # the 8-device child process (~25 s); test_one_device_mesh_* covers the mesh path by default
def test_data_parallel_equals_one_device(dp):
    # CNN with BatchNorm: the gradients and the batch statistics are reduced over the sharded batch.
    assert dp["clean_diff_8"] < ATOL and dp["clean_diff_2x4"] < ATOL, dp
    assert_on_mesh(dp["clean_sharding_8"])
    assert_on_mesh(dp["clean_sharding_2x4"])
    assert dp["one_on_single_device"]
    # The logged training metrics and the epoch-end evaluation (on the replicated variables) agree too.
    assert dp["train_loss_diff"] < 1e-4
    assert dp["test_accuracy"][0] == pytest.approx(dp["test_accuracy"][1], abs=2 / 450)
    assert dp["train_steps"] == [[2, 4, 6], [2, 4, 6]]
    assert dp["dp8_metrics_lines"] == 4  # 3 train lines and the epoch line, written once


@pytest.mark.slow  # the 8-device child process (~25 s); test_one_device_mesh_* covers the mesh path by default
def test_data_parallel_noise_is_independent_of_sharding(dp):
    # Weight noise (replicated shapes) and activation noise (batch-sharded shapes) drawn inside the sharded step
    # are the one-device draws.
    assert dp["noisy_diff_8"] < ATOL, dp
    assert dp["noisy_vs_clean"] > 100 * ATOL  # the noise does change the result


@pytest.mark.slow  # the 8-device child process (~25 s); test_one_device_mesh_* covers the mesh path by default
def test_sharded_checkpoint_resume(dp):
    assert dp["restored_step"] == 3
    assert_on_mesh(dp["restored_sharding"])
    assert dp["restored_vs_part"] == 0.0
    # Resumed on the mesh from step 3: bitwise the uninterrupted run on the same mesh.
    assert_on_mesh(dp["resumed_sharding"])
    assert dp["resume_diff_vs_dp8"] == 0.0
    assert dp["resume_diff_vs_one"] < ATOL
    assert dp["resume_train_steps"] == [2, 3, 4, 6]
    # A checkpoint written on one mesh restores replicated on another.
    assert_on_mesh(dp["cross_mesh_sharding"])
    assert dp["cross_mesh_diff"] == 0.0


@pytest.mark.slow  # the 8-device child process (~25 s); test_one_device_mesh_* covers the mesh path by default
def test_batch_not_divisible_by_mesh_size(dp):
    message = dp["bad_batch_error"]
    assert message is not None
    assert "batch_size=60" in message and "8 devices" in message and "multiple of 8" in message
    assert "56 or 64" in message
    assert not dp["bad_workdir_created"]  # refused before anything is written


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # 2-process jax.distributed run, ~40 s on 2 cores
def test_two_processes(tmp_path, digits):
    """Multi-host: 2 processes x 2 devices, interrupted and resumed; same result as one device, one writer."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    port, workdir = _free_port(), tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, CHILD, "multiprocess", str(tmp_path / f"p{i}.json"), str(workdir),
                               str(i), str(port)], env=env, cwd=os.path.dirname(TESTS), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-4000:] for log in logs)

    import dataclasses

    from jaxnoise.data import Split
    data = dataclasses.replace(digits, train=Split(digits.train.images[:384], digits.train.labels[:384]))
    model = get_model("cnn", input_shape=data.image_shape, num_classes=10)
    from _helpers import he_variables
    one, _ = train(model, data, TrainConfig(epochs=1, batch_size=64, learning_rate=0.05, log_every=2),
                   workdir=tmp_path / "one", variables=he_variables(model), progress=False)
    reports = [json.load(open(tmp_path / f"p{i}.json")) for i in (0, 1)]
    for i, report in enumerate(reports):
        assert report["process_count"] == 2 and report["device_count"] == 4 and not report["fully_addressable"]
        leaves = np.load(tmp_path / f"p{i}.json.npz")
        for k, x in enumerate(jax.tree.leaves(one)):
            np.testing.assert_allclose(leaves[f"arr_{k}"], np.asarray(x), rtol=0, atol=ATOL)
    assert reports[0]["history"] == reports[1]["history"]
    assert [r["step"] for r in reports[0]["history"]] == [2, 3, 4, 6, 6]
    with open(workdir / train_lib.METRICS_FILE) as f:  # written once, by process 0
        assert [json.loads(line)["step"] for line in f] == [2, 3, 4, 6, 6]
    assert ckpt.latest_step(workdir) == 6


# ----------------------------------------------------------------------------------------------------------------
# One device (this process)


def test_check_mesh_batch_message():
    fake = types.SimpleNamespace(size=8, shape={"chips": 2, "data": 4})
    train_lib.check_mesh_batch(64, fake)
    with pytest.raises(ValueError, match=r"batch_size=4 is not divisible by the 8 devices .*\(e\.g\. 8\)"):
        train_lib.check_mesh_batch(4, fake)
    with pytest.raises(TypeError, match="jax.sharding.Mesh"):
        train(get_model("mlp"), types.SimpleNamespace(train=types.SimpleNamespace(labels=np.zeros(256))),
              TrainConfig(epochs=1), workdir="unused", mesh=fake)


def test_restore_with_sharding(tmp_path):
    mesh = distributed.make_mesh(1, 1)
    state = {"a": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "b": jnp.int32(3)}
    ckpt.save(tmp_path, 1, state)
    replicated = NamedSharding(mesh, P())
    for target in ({"a": np.zeros((2, 3), np.float32), "b": 0}, jax.eval_shape(lambda: state), None):
        restored = ckpt.restore(tmp_path, target, sharding=replicated)
        for leaf in jax.tree.leaves(restored):
            assert isinstance(leaf, jax.Array) and leaf.sharding == replicated
        np.testing.assert_array_equal(restored["a"], state["a"])
        assert int(restored["b"]) == 3


@pytest.fixture(scope="module")
def small(digits):
    """MLP on 384 digits: 6 steps of 64 per epoch."""
    import dataclasses

    from jaxnoise.data import Split
    data = dataclasses.replace(digits, train=Split(digits.train.images[:384], digits.train.labels[:384]))
    model = get_model("mlp", input_shape=data.image_shape, num_classes=10)
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(s.dtype),
                             jax.eval_shape(model.init, jax.random.key(0)))
    return model, data, variables, TrainConfig(epochs=1, batch_size=64, learning_rate=0.05, log_every=2)


def _without_times(history):
    return [{k: v for k, v in r.items() if k not in ("time", "elapsed")} for r in history]


def test_one_device_mesh_equals_no_mesh_and_resumes_across(tmp_path, small):
    model, data, variables, config = small
    mesh = distributed.make_mesh(1, 1)
    plain, h_plain = train(model, data, config, workdir=tmp_path / "plain", variables=variables, progress=False)
    # Interrupted without a mesh, resumed with one: the checkpoint is restored onto the mesh.
    train(model, data, config, workdir=tmp_path / "mixed", variables=variables, progress=False, max_steps=3)
    resumed, h_resumed = train(model, data, config, workdir=tmp_path / "mixed", progress=False, mesh=mesh)
    for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(resumed)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=ATOL)
        assert y.sharding == NamedSharding(mesh, P())
    # The interrupted run logged step 3 (its last); the resumed one the rest.
    assert [r["step"] for r in h_resumed] == [2, 3, 4, 6, 6]
    assert [r["step"] for r in h_plain] == [2, 4, 6, 6]


def test_only_main_process_writes_plain_files(tmp_path, small, monkeypatch):
    model, data, variables, config = small
    # Process 0 runs the first 3 steps in both workdirs; then process 0 finishes "main", "another process" "other".
    for name in ("main", "other"):
        train(model, data, config, workdir=tmp_path / name, variables=variables, progress=False, max_steps=3)
    main_vars, h_main = train(model, data, config, workdir=tmp_path / "main", progress=False)
    metrics = open(tmp_path / "other" / train_lib.METRICS_FILE).read()
    meta = open(tmp_path / "other" / "checkpoints" / ckpt.METADATA_FILE).read()
    with monkeypatch.context() as m:
        m.setattr(distributed, "is_main_process", lambda: False)
        other_vars, h_other = train(model, data, config, workdir=tmp_path / "other", progress=False)
    # metrics.jsonl and metadata.json untouched; the checkpoint itself (orbax, every process) was written.
    assert open(tmp_path / "other" / train_lib.METRICS_FILE).read() == metrics
    assert open(tmp_path / "other" / "checkpoints" / ckpt.METADATA_FILE).read() == meta
    assert ckpt.latest_step(tmp_path / "other") == 6
    for x, y in zip(jax.tree.leaves(main_vars), jax.tree.leaves(other_vars)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # The same history: the file's records up to the resumed step, then this call's (kept in memory).
    assert _without_times(h_other) == _without_times(h_main)
    assert [r["step"] for r in h_other] == [2, 3, 4, 6, 6]


def test_shard_batch_refuses_an_uneven_batch():
    from jaxnoise.train import shard_batch
    fake = jax.sharding.Mesh(np.asarray([object() for _ in range(8)]).reshape(8, 1), ("chips", "data"))
    with pytest.raises(ValueError, match="multiple of 8"):
        shard_batch(np.zeros((12, 3)), fake)
