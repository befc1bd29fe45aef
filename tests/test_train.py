"""Tests of jaxnoise.train: config checks, optimizer, step keys, accuracy, BatchNorm, determinism and resume."""

import dataclasses
import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import he_variables

from jaxnoise import checkpoint as ckpt
from jaxnoise import train as train_lib
from jaxnoise.data import load_dataset
from jaxnoise.models import get_model
from jaxnoise.train import TrainConfig, evaluate_clean, train
from jaxnoise.workdir import LOCK_FILE, TrainingInterrupted, WorkdirError


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def synthetic():
    return load_dataset("synthetic", n_train=256, n_test=64)


def fake_variables(model, seed=0):
    """Random variables of ``model``'s structure, without the (slow, eager) ``model.init``."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(model.init, jax.random.key(0))
    return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype), abstract)





def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def records(workdir):
    with open(os.path.join(workdir, train_lib.METRICS_FILE)) as f:
        return [json.loads(line) for line in f]


def without_time(rs, kind=None):
    return [{k: v for k, v in r.items() if k not in ("time", "elapsed")} for r in rs if kind in (None, r["type"])]


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


# ----------------------------------------------------------------------------------------------------------------
# Configuration and optimizer


@pytest.mark.parametrize("kwargs, match", [
    ({"epochs": 0}, r"TrainConfig.epochs=0: must be an integer >= 1"),
    ({"epochs": 1, "learning_rate": -0.1}, r"TrainConfig.learning_rate=-0.1: must be a finite number >= 0"),
    ({"epochs": 1, "momentum": 1.0}, r"TrainConfig.momentum=1.0"),
    ({"epochs": 1, "schedule": "linear"}, r"TrainConfig.schedule='linear': choose one of \('cosine', 'constant'\)"),
    ({"epochs": 1, "weight_decay": -1.0}, r"TrainConfig.weight_decay"),
    ({"epochs": 1, "checkpoint_every": 0}, r"TrainConfig.checkpoint_every=0"),
    ({"epochs": 1, "batch_size": 0}, r"TrainConfig.batch_size=0"),
])
def test_bad_config_values_name_the_field(kwargs, match, tmp_path, synthetic):
    with pytest.raises(ValueError, match=match):
        train(get_model("mlp"), synthetic, TrainConfig(**kwargs), workdir=tmp_path, progress=False)
    assert not os.listdir(tmp_path)  # rejected before anything is written


def test_batch_size_larger_than_train_set(tmp_path, synthetic):
    with pytest.raises(ValueError, match=r"TrainConfig.batch_size=300 is larger than the training set \(256 "
                                         r"examples\).*use batch_size <= 256"):
        train(get_model("mlp"), synthetic, TrainConfig(epochs=1, batch_size=300), workdir=tmp_path, progress=False)


def test_model_dataset_mismatch(tmp_path, synthetic):
    with pytest.raises(ValueError, match="num_classes=10"):
        train(get_model("mlp", num_classes=5), synthetic, TrainConfig(epochs=1, batch_size=64),
              workdir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"expects \(16, 16, 1\)"):
        train(get_model("mlp", input_shape=(16, 16, 1)), synthetic, TrainConfig(epochs=1, batch_size=64),
              workdir=tmp_path, progress=False)


def test_schedules():
    cosine = train_lib.make_schedule(TrainConfig(epochs=1, learning_rate=0.2), 100)
    assert float(cosine(0)) == pytest.approx(0.2) and float(cosine(50)) == pytest.approx(0.1)
    assert float(cosine(100)) == pytest.approx(0.0, abs=1e-7)
    constant = train_lib.make_schedule(TrainConfig(epochs=1, learning_rate=0.2, schedule="constant"), 100)
    assert float(constant(0)) == float(constant(99)) == pytest.approx(0.2)
    warm = train_lib.make_schedule(TrainConfig(epochs=1, learning_rate=0.2, warmup_steps=10), 100)
    assert float(warm(0)) == 0.0 and float(warm(5)) == pytest.approx(0.1) and float(warm(10)) == pytest.approx(0.2)
    assert float(warm(100)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="warmup_steps=100 must be smaller"):
        train_lib.make_schedule(TrainConfig(epochs=1, warmup_steps=100), 100)


def test_weight_decay_only_on_kernels():
    params = fake_variables(get_model("cnn"))["params"]
    mask = train_lib.kernel_mask(params)
    flat = {"/".join(k.key for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert {k for k, v in flat.items() if v} == {"conv1/kernel", "conv2/kernel", "conv3/kernel", "head/kernel"}

    config = TrainConfig(epochs=1, learning_rate=1.0, momentum=0.0, weight_decay=0.5, schedule="constant")
    opt = train_lib.make_optimizer(config, 10)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, state = opt.update(zero_grads, opt.init(params), params)
    np.testing.assert_allclose(updates["conv1"]["kernel"], -0.5 * params["conv1"]["kernel"], rtol=1e-6)
    np.testing.assert_array_equal(updates["head"]["bias"], 0.0)
    np.testing.assert_array_equal(updates["bn1"]["scale"], 0.0)
    assert float(train_lib.current_learning_rate(state)) == 1.0


# ----------------------------------------------------------------------------------------------------------------
# The step


def test_step_key_derivation_and_metrics(synthetic):
    model = get_model("mlp", hidden=(16,))
    clean = train_lib.clean_loss(model)

    def loss_with_key(params, batch_stats, images, labels, key, hparams):
        loss, (logits, new_stats, extra) = clean(params, batch_stats, images, labels, key, hparams)
        return loss, (logits, new_stats, {**extra, "key_data": jax.random.key_data(key)})

    config = TrainConfig(epochs=1, batch_size=32, learning_rate=0.1)
    opt = train_lib.make_optimizer(config, 8)
    step = train_lib.make_train_step(model, loss_with_key, opt, synthetic)
    state = train_lib.init_state(model, fake_variables(model), opt)
    base = jax.random.key(42)
    schedule = train_lib.make_schedule(config, 8)
    images, labels = synthetic.train.images[:32], synthetic.train.labels[:32]
    for s in range(3):
        state, metrics = step(state, images, labels, base)
        expected = jax.random.fold_in(jax.random.fold_in(base, s), train_lib.LOSS_KEY)
        np.testing.assert_array_equal(metrics["key_data"], jax.random.key_data(expected))
        np.testing.assert_array_equal(jax.random.key_data(train_lib.step_keys(base, s)[1]),
                                      jax.random.key_data(expected))
        assert int(state.step) == s + 1
        assert float(metrics["lr"]) == pytest.approx(float(schedule(s)))
        assert 0.0 <= float(metrics["accuracy"]) <= 1.0 and np.isfinite(float(metrics["loss"]))


def test_evaluate_clean_counts_every_example_once(digits):
    model = get_model("mlp")
    variables = fake_variables(model)
    logits = model.apply(variables, digits.preprocess(digits.test.images)).logits
    correct = int(np.sum(np.argmax(np.asarray(logits), -1) == digits.test.labels))
    for batch_size in (450, 64, 1000):  # 450 = 7 * 64 + 2: a partial last batch
        accuracy = evaluate_clean(model, variables, digits.test, digits.preprocess, batch_size)
        assert accuracy == correct / 450


# ----------------------------------------------------------------------------------------------------------------
# Training runs


# The reference run, shared by the tests below: mlp on digits, 3 epochs of 21 steps, a checkpoint every 10 steps
# and a metrics line every step.
MLP_CONFIG = TrainConfig(epochs=3, batch_size=64, checkpoint_every=10, log_every=1)


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory, digits):
    workdir = tmp_path_factory.mktemp("mlp_run")
    model = get_model("mlp")
    variables, history = train(model, digits, MLP_CONFIG, workdir=workdir, progress=False)
    return model, variables, history, workdir


def test_training_reaches_good_accuracy_on_digits(mlp_run, digits):
    # Measured: 0.94 test accuracy after 3 epochs; 0.85 leaves a wide margin.
    model, variables, history, workdir = mlp_run
    epochs = [r for r in history if r["type"] == "epoch"]
    steps = [r for r in history if r["type"] == "train"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3] and [r["step"] for r in epochs] == [21, 42, 63]
    assert epochs[-1]["test_accuracy"] > 0.85
    assert np.mean([r["loss"] for r in steps[-5:]]) < 0.3 * np.mean([r["loss"] for r in steps[:5]])
    assert steps[0]["lr"] == pytest.approx(0.1) and steps[-1]["lr"] < 1e-3  # cosine decay to 0
    assert evaluate_clean(model, variables, digits.test, digits.preprocess) == pytest.approx(
        epochs[-1]["test_accuracy"])
    assert history == records(workdir)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["50", "60", "63", "metadata.json"]


def test_same_seed_same_result_other_seed_differs(tmp_path, mlp_run, digits):
    model, variables, _, _ = mlp_run
    same, _ = train(model, digits, MLP_CONFIG, workdir=tmp_path / "same", progress=False)
    assert_trees_equal(same, variables)
    other, _ = train(model, digits, dataclasses.replace(MLP_CONFIG, seed=1), workdir=tmp_path / "other",
                     progress=False)
    assert not np.array_equal(other["params"]["head"]["kernel"], variables["params"]["head"]["kernel"])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax, on the corrupt read
def test_interrupted_run_resumes_to_identical_parameters(tmp_path, mlp_run, digits, capsys):
    model, full, full_history, _ = mlp_run
    run = tmp_path / "run"
    train(model, digits, MLP_CONFIG, workdir=run, progress=False, max_steps=17)
    assert ckpt.latest_step(run / "checkpoints") == 17
    # Simulate a kill after step 17 was logged but before its checkpoint was renamed into place, in the middle
    # of writing a metrics line, with a half-written checkpoint of a later step lying around.
    shutil.rmtree(run / "checkpoints" / "17")
    shutil.copytree(run / "checkpoints" / "10", run / "checkpoints" / "20.orbax-checkpoint-tmp")
    with open(run / train_lib.METRICS_FILE, "a") as f:
        f.write('{"type": "train", "step": 18, "lo')
    assert max(r["step"] for r in train_lib.read_metrics(run / train_lib.METRICS_FILE)) == 17
    before = (run / train_lib.METRICS_FILE).read_text().splitlines(keepends=True)
    capsys.readouterr()

    old_umask = os.umask(0o027)  # the rewritten metrics.jsonl and the new superseded file follow the umask
    try:
        resumed, history = train(model, digits, MLP_CONFIG, workdir=run, progress=False)
    finally:
        os.umask(old_umask)
    assert_trees_equal(resumed, full)  # bitwise
    # The lines of the steps after checkpoint 10 (re-done) and the cut line are moved, not deleted.
    assert capsys.readouterr().out == (
        f"resuming {run} from step 10 of 63 (epoch 1)\n"
        f"{run}: moved 8 lines of metrics.jsonl past step 10 (written before the interruption; those steps are "
        f"re-done) to {run / train_lib.SUPERSEDED_METRICS_FILE}\n")
    superseded = (run / train_lib.SUPERSEDED_METRICS_FILE).read_text()
    assert superseded == "".join(before[10:]) + "\n"  # verbatim (the cut line gets its newline)
    assert [json.loads(line)["step"] for line in superseded.splitlines()[:-1]] == list(range(11, 18))
    for name in (train_lib.METRICS_FILE, train_lib.SUPERSEDED_METRICS_FILE):
        assert os.stat(run / name).st_mode & 0o777 == 0o640, name
    assert_trees_equal(ckpt.load_variables(run, model), full)

    # Every step logged exactly once; same numbers as the uninterrupted run.
    assert [r["step"] for r in history if r["type"] == "train"] == list(range(1, 64))
    assert [r["step"] for r in history if r["type"] == "epoch"] == [21, 42, 63]
    assert history == records(run)

    assert without_time(history, "train") == without_time(full_history, "train")  # log_every=1: per-step values
    # (Epoch lines' train_* means cover the steps of this process only, so only the test accuracy is compared.)
    assert [r["test_accuracy"] for r in history if r["type"] == "epoch"] == [
        r["test_accuracy"] for r in full_history if r["type"] == "epoch"]
    assert sorted(os.listdir(run / "checkpoints")) == ["50", "60", "63", "metadata.json"]

    # Finished: running again changes nothing and trains nothing; so does one with other free settings.
    again, history_again = train(model, digits, MLP_CONFIG, workdir=run, progress=False)
    assert_trees_equal(again, full)
    assert history_again == history
    assert capsys.readouterr().out == f"{run}: already complete at step 63 of 63; nothing to train\n"
    free = dataclasses.replace(MLP_CONFIG, checkpoint_every=7, max_to_keep=2, log_every=5, eval_batch_size=100)
    again, history_again = train(model, digits, free, workdir=run, progress=False, max_steps=40)
    assert_trees_equal(again, full)
    assert history_again == history

    # A different run in the same workdir is refused, and so is any change of the schedule or optimizer (an
    # uninterrupted run with either setting would differ): each field is listed, with the fix.
    with pytest.raises(ValueError, match=r"(?s)different run.*train_config.seed: checkpoint 0, now 1"):
        train(model, digits, dataclasses.replace(MLP_CONFIG, seed=1), workdir=run, progress=False)
    with pytest.raises(ValueError, match=r"model_config: checkpoint \{'hidden': \[128, 64\]"):
        train(get_model("mlp", hidden=(16,)), digits, MLP_CONFIG, workdir=run, progress=False)
    with pytest.raises(WorkdirError) as info:
        train(model, digits, dataclasses.replace(MLP_CONFIG, epochs=4, learning_rate=0.2, momentum=0.5),
              workdir=run, progress=False)
    assert str(info.value) == (
        f"the checkpoints in {str(run / 'checkpoints')!r} belong to a different run ("
        f"train_config.epochs: checkpoint 3, now 4; "
        f"train_config.learning_rate: checkpoint 0.1, now 0.2; "
        f"train_config.momentum: checkpoint 0.9, now 0.5). "
        f"Resume with the original settings (e.g. --epochs 3, --lr 0.1, momentum=0.9), or start a new run from "
        f"these weights in a new workdir (--checkpoint {run} --workdir NEW; from Python: "
        f"variables=jaxnoise.checkpoint.load_variables({str(run)!r}), workdir=NEW).")
    for change in ({"schedule": "constant"}, {"warmup_steps": 5}, {"nesterov": True}, {"weight_decay": 0.0}):
        field = next(iter(change))
        with pytest.raises(WorkdirError, match=rf"train_config.{field}: checkpoint .*, now "):
            train(model, digits, dataclasses.replace(MLP_CONFIG, **change), workdir=run, progress=False)
    # A changed loss only warns.
    other_loss = train_lib.clean_loss(model).replace(config={"variant": 1})
    with pytest.warns(UserWarning, match=r"loss_config: \{\} -> \{'variant': 1\}"):
        train(model, digits, MLP_CONFIG, workdir=run, progress=False, loss_fn=other_loss)
    assert not (run / LOCK_FILE).exists()

    # A corrupt latest checkpoint stops the resume with a message naming the step directory to delete.
    for f in glob.glob(str(run / "checkpoints" / "63" / "state" / "**" / "d" / "*"), recursive=True):
        os.truncate(f, 1)
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoints/63'.*delete .*step=60"):
        train(model, digits, MLP_CONFIG, workdir=run, progress=False)


def test_history_without_a_checkpoint_is_refused_not_truncated(tmp_path, synthetic, monkeypatch):
    # E.g. checkpoints deleted by hand, or a run killed before its first checkpoint.
    lines = "".join(json.dumps({"type": "train", "step": s, "loss": 1.0}) + "\n" for s in range(1, 121))
    (tmp_path / train_lib.METRICS_FILE).write_text(lines)
    os.makedirs(tmp_path / "checkpoints" / "20.orbax-checkpoint-tmp-1")  # an unfinished save is no checkpoint

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(train_lib, "init_state", no_training)
    with pytest.raises(WorkdirError) as info:
        train(get_model("mlp"), synthetic, TrainConfig(epochs=1, batch_size=64), workdir=tmp_path, progress=False)
    assert isinstance(info.value, ValueError)
    assert str(info.value) == (
        f"workdir {tmp_path} has 120 lines of training history in metrics.jsonl but no finished checkpoint in "
        f"{tmp_path / 'checkpoints'} covers them, so training would start over at step 0 and mix a new history "
        f"into them: use a new --workdir, or move metrics.jsonl away to start over.")
    assert (tmp_path / train_lib.METRICS_FILE).read_text() == lines  # untouched
    assert not (tmp_path / LOCK_FILE).exists() and not (tmp_path / train_lib.SUPERSEDED_METRICS_FILE).exists()


def interrupt_steps_after(monkeypatch, n_steps, workdir, locks):
    """Makes the train step raise KeyboardInterrupt (as a Ctrl-C would) once ``n_steps`` steps have run; ``locks``
    gets the workdir's lock file contents at the first step."""
    real = train_lib.make_train_step
    calls = []

    def make(*args, **kwargs):
        step = real(*args, **kwargs)

        def interruptible(*a, **k):
            if len(calls) == n_steps:
                raise KeyboardInterrupt
            if not calls:
                lock = workdir / LOCK_FILE
                locks.append(json.loads(lock.read_text()) if lock.exists() else None)
            calls.append(1)
            return step(*a, **k)
        return interruptible

    monkeypatch.setattr(train_lib, "make_train_step", make)


def test_portable_checkpoint_resumes_a_fresh_workdir_to_identical_parameters(tmp_path, mlp_run, digits, capsys):
    """A run that lost its workdir (a new clone of committed results) resumes from the portable checkpoint and
    the training log put back beside it, to the uninterrupted run's parameters and log."""
    model, full, full_history, _ = mlp_run
    portable = tmp_path / "results" / "resume.npz"
    first = tmp_path / "first"
    train(model, digits, MLP_CONFIG, workdir=first, progress=False, max_steps=25, portable_checkpoint=portable)
    assert ckpt.read_delta_metadata(portable)["step"] == 25   # the checkpoint at max_steps
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copyfile(first / train_lib.METRICS_FILE, fresh / train_lib.METRICS_FILE)
    capsys.readouterr()
    resumed, history = train(model, digits, MLP_CONFIG, workdir=fresh, progress=False, portable_checkpoint=portable)
    assert capsys.readouterr().out == (f"{fresh}: no checkpoint; resuming from the portable checkpoint {portable} "
                                       f"(step 25)\nresuming {fresh} from step 25 of 63 (epoch 2)\n")
    assert_trees_equal(resumed, full)   # bitwise
    assert without_time(history, "train") == without_time(full_history, "train")
    assert [r["step"] for r in history if r["type"] == "epoch"] == [21, 42, 63]
    assert ckpt.read_delta_metadata(portable)["step"] == 63
    # The workdir's own checkpoints come first (the portable file now holds step 63).
    again, _ = train(model, digits, MLP_CONFIG, workdir=first, progress=False, portable_checkpoint=portable)
    assert capsys.readouterr().out == f"resuming {first} from step 25 of 63 (epoch 2)\n"
    assert_trees_equal(again, full)


def test_portable_checkpoint_of_a_frozen_backbone_holds_only_the_trained_leaves(tmp_path, digits):
    model = get_model("mlp")
    variables = fake_variables(model)
    portable = tmp_path / "resume.npz"
    train(model, digits, dataclasses.replace(MLP_CONFIG, weight_decay=1e-3), workdir=tmp_path / "run",
          progress=False, max_steps=12, variables=variables, trainable=lambda path: path.startswith("head/"),
          portable_checkpoint=portable)
    with np.load(portable) as z:
        stored = [k for k in z.files if k != "__jaxnoise__"]
    per_param = [k for k in stored if any(f"['{layer}']" in k for layer in ("fc1", "fc2", "head"))]
    # The head and its momentum; no frozen leaf, nor its momentum (frozen leaves get no gradient, no decay).
    assert sorted(per_param) == sorted(f"leaf/{prefix}['head']['{leaf}']" for leaf in ("bias", "kernel") for prefix in
                                       ("['params']", "['opt_state'][1].inner_state[0].trace")), per_param


def test_portable_checkpoint_refuses_another_run(tmp_path, digits):
    model = get_model("mlp")
    portable = tmp_path / "resume.npz"
    train(model, digits, MLP_CONFIG, workdir=tmp_path / "a", progress=False, max_steps=10,
          variables=fake_variables(model, 0), portable_checkpoint=portable)
    with pytest.raises(ckpt.CheckpointMismatchError, match="taken against another base"):
        train(model, digits, MLP_CONFIG, workdir=tmp_path / "b", progress=False, max_steps=20,
              variables=fake_variables(model, 1), portable_checkpoint=portable)
    with pytest.raises(WorkdirError, match=r"train_config.learning_rate: checkpoint 0.1, now 0.05"):
        train(model, digits, dataclasses.replace(MLP_CONFIG, learning_rate=0.05), workdir=tmp_path / "c",
              progress=False, variables=fake_variables(model, 0), portable_checkpoint=portable)
    with pytest.raises(ValueError, match="must be a path ending with .npz"):
        train(model, digits, MLP_CONFIG, workdir=tmp_path / "d", progress=False, portable_checkpoint=tmp_path / "x")


@pytest.mark.parametrize("n_steps", [15, 20])  # 20: the periodic checkpoint of that step is already saved
def test_ctrl_c_checkpoints_the_last_step_and_resumes_identically(tmp_path, mlp_run, digits, monkeypatch, capsys,
                                                                   n_steps):
    model, full, full_history, _ = mlp_run
    config = dataclasses.replace(MLP_CONFIG, log_every=4)  # free on resume: same parameters as mlp_run
    locks = []
    with monkeypatch.context() as m:
        interrupt_steps_after(m, n_steps, tmp_path, locks)
        with pytest.raises(KeyboardInterrupt) as info:  # (a plain one would stop pytest)
            train(model, digits, config, workdir=tmp_path, progress=False)
    e = info.value
    assert isinstance(e, TrainingInterrupted) and e.step == n_steps and e.workdir == str(tmp_path) and e.saved
    assert locks[0]["pid"] == os.getpid()  # held while training ...
    assert not (tmp_path / LOCK_FILE).exists()  # ... and released
    assert str(e) == (f"interrupted at step {n_steps}; checkpoint saved in {tmp_path / 'checkpoints'}; re-run the "
                      f"same command to resume")
    assert ckpt.latest_step(tmp_path) == n_steps
    # The steps after the last train line (13-15) get one: the checkpoint's lines are all in metrics.jsonl.
    logged = [4, 8, 12, 15] if n_steps == 15 else [4, 8, 12, 16, 20]
    assert [r["step"] for r in records(tmp_path)] == logged

    capsys.readouterr()
    resumed, history = train(model, digits, config, workdir=tmp_path, progress=False)
    assert capsys.readouterr().out == f"resuming {tmp_path} from step {n_steps} of 63 (epoch 1)\n"
    assert_trees_equal(resumed, full)  # bitwise
    logged += [s for s in range(n_steps + 1, 64) if s % 4 == 0 or s % 21 == 0 or s == 63]
    assert [r["step"] for r in history if r["type"] == "train"] == logged
    assert [r["test_accuracy"] for r in history if r["type"] == "epoch"] == [
        r["test_accuracy"] for r in full_history if r["type"] == "epoch"]
    assert not (tmp_path / train_lib.SUPERSEDED_METRICS_FILE).exists()  # nothing to re-do


def test_ctrl_c_during_the_epoch_evaluation(tmp_path, mlp_run, digits, monkeypatch):
    model, full, full_history, _ = mlp_run
    with monkeypatch.context() as m:
        m.setattr(train_lib, "evaluate_clean", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt) as info:  # (a plain one would stop pytest)
            train(model, digits, MLP_CONFIG, workdir=tmp_path, progress=False)
    assert isinstance(info.value, TrainingInterrupted)
    assert str(info.value).startswith("interrupted at step 21; checkpoint saved")
    assert ckpt.latest_step(tmp_path) == 21
    assert [(r["type"], r["step"]) for r in records(tmp_path)][-1] == ("train", 21)  # its epoch line is missing
    # ... and written by the resume, from the epoch's means kept in the checkpoint: the same history as without
    # the interruption.
    resumed, history = train(model, digits, MLP_CONFIG, workdir=tmp_path, progress=False)
    assert_trees_equal(resumed, full)
    assert without_time(history) == without_time(full_history)
    assert not (tmp_path / LOCK_FILE).exists()


def test_cnn_batchnorm_stats_trained_used_and_resumed(tmp_path, digits):
    model = get_model("cnn", channels=(8, 16, 16))
    config = TrainConfig(epochs=2, batch_size=64, learning_rate=0.2, checkpoint_every=7, max_to_keep=10)
    start = he_variables(model)
    full, full_history = train(model, digits, config, workdir=tmp_path / "full", variables=start,
                               progress=False)

    # Resume from step 14, as if the run had been killed there: same parameters and BatchNorm statistics.
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    for step in (21, 28, 35, 42):
        shutil.rmtree(tmp_path / "cut" / "checkpoints" / str(step))
    assert ckpt.latest_step(tmp_path / "cut") == 14
    resumed, history = train(model, digits, config, workdir=tmp_path / "cut", progress=False)  # start ignored
    assert_trees_equal(resumed, full)
    assert [r["step"] for r in history if r["type"] == "train"] == [r["step"] for r in full_history
                                                                      if r["type"] == "train"]

    # Training updated the running statistics ...
    for layer in ("bn1", "bn2", "bn3"):
        assert not np.allclose(full["batch_stats"][layer]["mean"], 0.0)
        assert not np.allclose(full["batch_stats"][layer]["var"], 1.0)
    # ... and evaluation uses them: the initial statistics give a much worse accuracy (measured: 0.93 vs 0.73).
    trained = evaluate_clean(model, full, digits.test, digits.preprocess)
    stale = evaluate_clean(model, {"params": full["params"], "batch_stats": start["batch_stats"]}, digits.test,
                           digits.preprocess)
    assert trained > 0.8 and stale < trained - 0.1


def test_progress_bar_disabled_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "1")
    assert not train_lib._progress_enabled(True)
    monkeypatch.delenv("CI")
    assert not train_lib._progress_enabled(False)


# ----------------------------------------------------------------------------------------------------------------
# A streamed dataset (jaxnoise.stream; the mock imagenet2012 of conftest.py)


def test_train_on_a_stream_resumes_exactly(mock_imagenet, tmp_path):
    from jaxnoise import data as data_lib
    ds = data_lib.load_dataset("imagenet2012", data_dir=mock_imagenet, resolution=32, workers=0)
    model = get_model("cnn", input_shape=(32, 32, 3), num_classes=1000, channels=(8,))
    config = TrainConfig(epochs=2, batch_size=16, learning_rate=0.05, eval_batch_size=32, log_every=2)
    full, history = train(model, ds, config, workdir=tmp_path / "full", progress=False, max_steps=6)
    epochs = [r for r in history if r["type"] == "epoch"]
    assert len(epochs) == 1 and epochs[0]["step"] == 4 and 0 <= epochs[0]["test_accuracy"] <= 1
    meta = ckpt.read_metadata(tmp_path / "full")
    assert meta["num_train"] == 64 and meta["steps_per_epoch"] == 4 and meta["dataset"] == "imagenet2012"
    train(model, ds, config, workdir=tmp_path / "split", progress=False, max_steps=3)   # stops mid-epoch
    resumed, _ = train(model, ds, config, workdir=tmp_path / "split", progress=False, max_steps=6)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
