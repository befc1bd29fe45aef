"""Tests of jaxnoise.checkpoint: roundtrip, retention, atomicity, clear errors, model variables."""

import glob
import json
import os
import shutil
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from orbax.checkpoint.path import atomicity

from jaxnoise import checkpoint as ckpt
from jaxnoise.models import WeightsMismatchError, get_model

PRETRAINED = os.path.join("..", "shared", "pretrained", "resnet20_cifar10.npz")


class Moments(NamedTuple):
    mean: jax.Array
    count: jax.Array


def make_state(offset: float = 0.0):
    return {
        "step": jnp.int32(7),
        "params": {"dense": {"kernel": jnp.arange(12, dtype=jnp.float32).reshape(4, 3) + offset,
                             "bias": jnp.full((3,), offset, jnp.float32)}},
        "opt_state": (Moments(mean=jnp.ones((4, 3)) * offset, count=jnp.int32(2)), None),
    }


def fake_variables(model, seed=0):
    """Random variables of ``model``'s structure, without the (slow, eager) ``model.init``."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(model.init, jax.random.key(0))
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), abstract)


def assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def step_files(directory, step):
    """The array data files of a step (the ones truncation or deletion damages)."""
    files = [f for f in glob.glob(os.path.join(directory, str(step), "state", "**", "*"), recursive=True)
             if os.path.isfile(f) and os.sep + "d" + os.sep in f]
    assert files, os.listdir(os.path.join(directory, str(step), "state"))
    return files


def test_save_restore_roundtrip(tmp_path):
    d = tmp_path / "ck"
    state = make_state(1.5)
    path = ckpt.save(d, 7, state, {"model": {"name": "mlp"}, "shape": (8, 8, 1)})
    assert path == str(d / "7") and os.path.isdir(path)
    assert ckpt.latest_step(d) == 7

    restored = ckpt.restore(d, make_state(0.0))
    assert_tree_equal(restored, state)
    assert isinstance(restored["opt_state"][0], Moments)
    assert restored["params"]["dense"]["kernel"].dtype == jnp.float32

    # Without a target: the stored structure, tuples/namedtuples as lists/dicts.
    raw = ckpt.restore(d)
    np.testing.assert_array_equal(raw["params"]["dense"]["kernel"], state["params"]["dense"]["kernel"])
    np.testing.assert_array_equal(raw["opt_state"][0]["mean"], state["opt_state"][0].mean)

    meta = ckpt.read_metadata(d)
    assert meta == {"model": {"name": "mlp"}, "shape": [8, 8, 1], "step": 7}
    with open(d / ckpt.METADATA_FILE) as f:
        assert json.load(f) == meta


def test_restore_into_target_dtypes_and_leaf_types(tmp_path):
    state = {"a": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "b": jnp.int32(3)}
    ckpt.save(tmp_path, 1, state)
    restored = ckpt.restore(tmp_path, {"a": np.zeros((2, 3), np.float64), "b": 0})
    assert isinstance(restored["a"], np.ndarray) and restored["a"].dtype == np.float64
    assert restored["b"] == 3 and isinstance(restored["b"], int)
    restored = ckpt.restore(tmp_path, {"a": jnp.zeros((2, 3), jnp.bfloat16), "b": jnp.int32(0)})
    assert restored["a"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(restored["a"], np.float32), np.asarray(state["a"]))


def test_latest_step_and_max_to_keep(tmp_path):
    d = tmp_path / "ck"
    assert ckpt.latest_step(d) is None  # no directory yet: nothing to resume
    with ckpt.CheckpointManager(d, max_to_keep=3) as mgr:
        assert mgr.latest_step() is None
        for step in range(1, 6):
            mgr.save(step, make_state(step), {"step_seen": step})
        assert mgr.all_steps() == [3, 4, 5]
    assert ckpt.latest_step(d) == 5
    assert_tree_equal(ckpt.restore(d, make_state(), step=3), make_state(3))
    assert_tree_equal(ckpt.restore(d, make_state()), make_state(5))
    assert ckpt.read_metadata(d, step=4)["step_seen"] == 4
    with pytest.raises(FileNotFoundError, match=r"step 1 not found.*available steps: \[3, 4, 5\]"):
        ckpt.restore(d, make_state(), step=1)


def test_existing_steps_are_never_overwritten(tmp_path):
    ckpt.save(tmp_path, 5, make_state(5))
    with pytest.raises(ValueError, match="step 5 already exists"):
        ckpt.save(tmp_path, 5, make_state(9))
    with pytest.raises(ValueError, match="never overwritten"):
        ckpt.save(tmp_path, 2, make_state(9))
    assert_tree_equal(ckpt.restore(tmp_path, make_state()), make_state(5))


def test_leftover_temporary_directory_is_ignored_then_cleaned(tmp_path):
    d = tmp_path / "ck"
    ckpt.save(d, 1, make_state(1))
    # What a run killed in the middle of writing step 2 leaves behind: a half-written temporary directory.
    shutil.copytree(d / "1", d / "2.orbax-checkpoint-tmp")
    for f in step_files(d, "2.orbax-checkpoint-tmp"):
        os.truncate(f, 3)
    os.makedirs(d / "3.orbax-checkpoint-tmp-1234567" / "state")

    assert ckpt.latest_step(d) == 1
    assert_tree_equal(ckpt.restore(d, make_state()), make_state(1))
    ckpt.save(d, 2, make_state(2))  # the next save removes the leftovers first
    assert sorted(os.listdir(d)) == ["1", "2", ckpt.METADATA_FILE]
    assert_tree_equal(ckpt.restore(d, make_state()), make_state(2))


def test_interrupted_save_leaves_earlier_checkpoints_intact(tmp_path, monkeypatch):
    d = tmp_path / "ck"
    ckpt.save(d, 1, make_state(1), {"n": 1})

    async def killed(self, *args, **kwargs):  # the process dies after writing, before the atomic rename
        raise KeyboardInterrupt("killed during save")

    with monkeypatch.context() as m:
        m.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", killed)
        with pytest.raises(KeyboardInterrupt):
            ckpt.save(d, 2, make_state(2), {"n": 2})
    assert ckpt.latest_step(d) == 1
    assert_tree_equal(ckpt.restore(d, make_state()), make_state(1))
    assert ckpt.read_metadata(d)["n"] == 1

    # A save that fails while serialising does not damage anything either.
    with pytest.raises(ValueError):
        ckpt.save(d, 3, {"bad": object()})
    assert ckpt.latest_step(d) == 1
    assert_tree_equal(ckpt.restore(d, make_state(), step=1), make_state(1))


def test_missing_directory_and_empty_directory(tmp_path):
    missing = tmp_path / "nope"
    for call in (lambda: ckpt.restore(missing, make_state()), lambda: ckpt.read_metadata(missing),
                 lambda: ckpt.load_variables(missing)):
        with pytest.raises(FileNotFoundError, match="does not exist") as e:
            call()
        assert str(missing) in str(e.value) and "train" in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        ckpt.restore(empty, make_state())
    assert ckpt.latest_step(empty) is None


# orbax may leave an asyncio callback behind when tensorstore fails a read; it is reported as "unraisable".
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_corrupt_checkpoint_raises_checkpoint_error(tmp_path, damage):
    d = tmp_path / "ck"
    ckpt.save(d, 1, make_state(1))
    ckpt.save(d, 2, make_state(2))
    for f in step_files(d, 2):
        if damage == "truncate":
            os.truncate(f, os.path.getsize(f) // 3)
        else:
            os.remove(f)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.restore(d, make_state())
    message = str(e.value)
    assert str(d / "2") in message and "delete" in message and "step=1" in message
    assert not isinstance(e.value, ckpt.CheckpointMismatchError)
    # The earlier step is unaffected.
    assert_tree_equal(ckpt.restore(d, make_state(), step=1), make_state(1))


def test_deleted_metadata_file_raises_checkpoint_error(tmp_path):
    ckpt.save(tmp_path, 4, make_state(4))
    os.remove(tmp_path / "4" / "state" / "_METADATA")
    with pytest.raises(ckpt.CheckpointError, match=r"4.*cannot be read.*there is no earlier step"):
        ckpt.restore(tmp_path)


def test_structure_mismatch_is_reported(tmp_path):
    mlp, cnn = get_model("mlp"), get_model("cnn")
    ckpt.save(tmp_path, 1, fake_variables(mlp))
    with pytest.raises(ckpt.CheckpointMismatchError) as e:
        ckpt.restore(tmp_path, fake_variables(cnn))
    message = str(e.value)
    assert "in target but not in checkpoint (15): batch_stats/bn1/mean" in message
    assert "in checkpoint but not in target (4): params/fc1/bias; params/fc1/kernel" in message
    assert "another model" in message and str(tmp_path / "1") in message

    wider = get_model("mlp", hidden=(32, 64))
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"wrong shape.*fc1/kernel: checkpoint \(64, 128\), "
                                                           r"target \(64, 32\)"):
        ckpt.restore(tmp_path, jax.eval_shape(wider.init, jax.random.key(0)))
    with pytest.raises(ckpt.CheckpointMismatchError, match="wrong shape"):
        ckpt.load_variables(tmp_path, wider)


def test_save_and_load_variables(tmp_path):
    model = get_model("cnn")
    variables = fake_variables(model)
    out = tmp_path / "final"
    ckpt.save_variables(out, variables, {"model": "cnn", "model_config": model.config})
    loaded = ckpt.load_variables(out, model)
    assert_tree_equal(loaded, variables)
    assert isinstance(jax.tree.leaves(loaded)[0], np.ndarray)
    assert_tree_equal(ckpt.load_variables(out), variables)  # no model needed for a checkpoint directory
    assert ckpt.read_metadata(out)["model"] == "cnn"

    with pytest.raises(FileExistsError, match="never overwrites"):
        ckpt.save_variables(out, variables)
    with pytest.raises(ValueError, match="not a .npz"):
        ckpt.save_variables(tmp_path / "w.npz", variables)


def test_load_variables_rejects_non_model_checkpoint(tmp_path):
    ckpt.save(tmp_path, 1, {"something": jnp.ones(3)})
    with pytest.raises(ckpt.CheckpointError, match="holds no 'params'"):
        ckpt.load_variables(tmp_path)


def test_load_variables_pretrained_npz(tmp_path):
    if not os.path.exists(PRETRAINED):
        pytest.skip(f"{PRETRAINED} not present")
    model = get_model("resnet20")
    variables = ckpt.load_variables(PRETRAINED, model)
    abstract = jax.eval_shape(model.init, jax.random.key(0))
    assert jax.tree.structure(variables) == jax.tree.structure(abstract)
    assert variables["params"]["conv1"]["kernel"].shape == (3, 3, 3, 16)

    with pytest.raises(ValueError, match="needs the model"):
        ckpt.load_variables(PRETRAINED)
    with pytest.raises(WeightsMismatchError):
        ckpt.load_variables(PRETRAINED, get_model("resnet32"))
    with pytest.raises(FileNotFoundError):
        ckpt.load_variables(tmp_path / "missing.npz", model)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(WeightsMismatchError, match="truncated or corrupt"):
        ckpt.load_variables(bad, model)


def test_load_variables_from_training_run(tmp_path):
    from jaxnoise.data import load_dataset
    from jaxnoise.train import TrainConfig, train

    model = get_model("mlp")
    config = TrainConfig(epochs=1, batch_size=128)
    variables, _ = train(model, load_dataset("digits"), config, workdir=tmp_path / "run", progress=False)

    for where in (tmp_path / "run", tmp_path / "run" / "checkpoints"):  # workdir or its checkpoint directory
        assert_tree_equal(ckpt.load_variables(where, model), variables)
    meta = ckpt.read_metadata(tmp_path / "run")
    assert (meta["model"], meta["model_config"], meta["input_shape"], meta["num_classes"]) == (
        "mlp", {"hidden": [128, 64], "num_classes": 10}, [8, 8, 1], 10)
    assert meta["dataset"] == "digits" and meta["num_train"] == 1347
    assert meta["train_config"] == config.to_dict()
    assert meta["step"] == 10 and meta["epoch"] == 1.0 and meta["loss"] == "clean"
    rebuilt = get_model(meta["model"], input_shape=meta["input_shape"], **meta["model_config"])
    assert_tree_equal(ckpt.load_variables(tmp_path / "run", rebuilt), variables)
    with pytest.raises(ckpt.CheckpointMismatchError, match="does not match model cnn"):
        ckpt.load_variables(tmp_path / "run", get_model("cnn"))


# ----------------------------------------------------------------------------------------------------------------
# State deltas (portable checkpoints)


def test_delta_stores_only_changed_leaves_and_restores_the_tree(tmp_path):
    base = jax.tree.map(np.asarray, make_state(0.0))
    tree = jax.tree.map(np.asarray, make_state(0.0))
    tree["params"]["dense"]["bias"] = np.array([1.0, -0.0, 2.0], np.float32)
    tree["step"] = np.int32(9)
    path = tmp_path / "delta.npz"
    assert ckpt.save_delta(path, tree, base, {"run": "a"}) == 2
    with np.load(path) as z:
        assert sorted(k for k in z.files if k != "__jaxnoise__") == ["leaf/['params']['dense']['bias']",
                                                                     "leaf/['step']"]
    restored, meta = ckpt.load_delta(path, base)
    assert meta == {"run": "a"} and ckpt.read_delta_metadata(path) == {"run": "a"}
    assert jax.tree.structure(restored) == jax.tree.structure(base)   # namedtuples and None kept
    for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(tree)):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()      # bitwise, -0.0 included
    # Replaced atomically by the next save; an unchanged tree stores nothing.
    assert ckpt.save_delta(path, base, base) == 0
    assert not [p for p in os.listdir(tmp_path) if p != "delta.npz"]
    for x, y in zip(jax.tree.leaves(ckpt.load_delta(path, base)[0]), jax.tree.leaves(base)):
        assert x.tobytes() == y.tobytes()


def test_docstring_example_of_save_delta(tmp_path):
    base = {"w": np.zeros(3), "b": np.ones(2)}
    assert ckpt.save_delta(tmp_path / "d.npz", {"w": np.arange(3.0), "b": np.ones(2)}, base) == 1
    np.testing.assert_array_equal(ckpt.load_delta(tmp_path / "d.npz", base)[0]["w"], [0.0, 1.0, 2.0])


def test_delta_refuses_another_base_or_structure(tmp_path):
    base = jax.tree.map(np.asarray, make_state(0.0))
    tree = jax.tree.map(np.asarray, make_state(1.0))
    path = tmp_path / "delta.npz"
    ckpt.save_delta(path, tree, base)   # count (2) is equal in both, so not stored
    other_base = jax.tree.map(np.array, make_state(0.0))
    other_base["opt_state"] = (other_base["opt_state"][0]._replace(count=np.int32(3)), None)
    with pytest.raises(ckpt.CheckpointMismatchError, match="taken against another base"):
        ckpt.load_delta(path, other_base)
    with pytest.raises(ckpt.CheckpointMismatchError, match="stored from a tree of 5 leaves, restored into one of 4"):
        ckpt.load_delta(path, {k: v for k, v in base.items() if k != "step"})
    bigger = jax.tree.map(np.asarray, make_state(0.0))
    bigger["params"]["dense"]["bias"] = np.zeros(4, np.float32)
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"bias'\]: stored \(3,\) float32, wanted \(4,\)"):
        ckpt.load_delta(path, bigger)
    with pytest.raises(ValueError, match="differ in structure"):
        ckpt.save_delta(path, tree, bigger)
    with pytest.raises(ValueError, match="does not end with .npz"):
        ckpt.save_delta(tmp_path / "delta", tree, base)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ckpt.CheckpointError, match="cannot be read as a state delta"):
        ckpt.load_delta(tmp_path / "junk.npz", base)
    with pytest.raises(FileNotFoundError, match="no state delta"):
        ckpt.read_delta_metadata(tmp_path / "none.npz")
