"""Tests of jaxnoise.workdir: the workdir lock (in this process, another process, stale), file modes, and the lock
in jaxnoise.train.train."""

import datetime
import json
import os
import pickle
import signal
import socket
import subprocess
import sys

import pytest

from jaxnoise import distributed, io
from jaxnoise import workdir as workdir_lib
from jaxnoise.workdir import TrainingInterrupted, WorkdirError, WorkdirLockedError, workdir_lock

# A second process that takes the lock, says so, and holds it until a line arrives on its stdin.
HOLDER = """
import sys
from jaxnoise.workdir import workdir_lock
with workdir_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.readline()
print("released", flush=True)
"""


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


@pytest.fixture
def holder(tmp_path):
    """``start(workdir) -> Popen`` of HOLDER once it holds the lock; every holder is killed at teardown."""
    procs = []

    def start(workdir):
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def lock_path(workdir):
    return os.path.join(workdir, workdir_lib.LOCK_FILE)


def read_lock(workdir):
    with open(lock_path(workdir)) as f:
        return json.load(f)


def test_lock_file_names_the_owner_and_is_removed(tmp_path, umask_027):
    work = tmp_path / "run"  # created by the lock
    with workdir_lock(work) as owner:
        assert read_lock(work) == owner
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        assert owner["command"] == " ".join(sys.argv)
        started = datetime.datetime.fromisoformat(owner["started"])
        assert started.utcoffset() == datetime.timedelta(0)
        assert abs((datetime.datetime.now(datetime.UTC) - started).total_seconds()) < 60
        assert os.stat(lock_path(work)).st_mode & 0o777 == 0o640  # the umask applies
    assert not os.path.exists(lock_path(work))
    assert os.listdir(work) == []


def test_lock_refused_twice_in_one_process_and_released_on_errors(tmp_path):
    with workdir_lock(tmp_path):
        # flock is per open file description: a second open in this process conflicts too.
        with pytest.raises(WorkdirLockedError, match=rf"in use by this process \(pid {os.getpid()} on host "
                                                     rf".*wait for that run to finish, or use another --workdir"):
            with workdir_lock(tmp_path):
                pass
        assert read_lock(tmp_path)["pid"] == os.getpid()  # the refused attempt left the holder's file alone
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with workdir_lock(tmp_path):
                raise exc
        assert not os.path.exists(lock_path(tmp_path))
    with workdir_lock(tmp_path):  # free again
        pass
    assert issubclass(WorkdirLockedError, WorkdirError) and issubclass(WorkdirError, ValueError)


def test_lock_held_by_another_process_then_taken_over_when_it_dies(tmp_path, holder, capsys):
    proc = holder(tmp_path)
    owner = read_lock(tmp_path)
    assert owner["pid"] == proc.pid
    with pytest.raises(WorkdirLockedError) as info:
        with workdir_lock(tmp_path):
            pass
    message = str(info.value)
    assert f"workdir {tmp_path} is in use by another run: pid {proc.pid} on host {socket.gethostname()}" in message
    assert f"started {owner['started']}" in message and str(tmp_path) in owner["command"]
    assert message.endswith("wait for that run to finish, or use another --workdir.")
    assert info.value.owner == owner and info.value.path == lock_path(tmp_path)

    # Killed without any cleanup: the file stays, the kernel released the flock. The lock is taken over.
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert read_lock(tmp_path)["pid"] == proc.pid
    capsys.readouterr()
    with workdir_lock(tmp_path) as mine:
        out = capsys.readouterr().out
        assert read_lock(tmp_path) == mine and mine["pid"] == os.getpid()
    assert out.count("\n") == 1
    assert f"taking over the stale lock of pid {proc.pid} on host {socket.gethostname()}, started " \
           f"{owner['started']}" in out
    assert not os.path.exists(lock_path(tmp_path))


def test_holder_that_exits_normally_removes_its_lock(tmp_path, holder):
    proc = holder(tmp_path)
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "released"
    assert proc.wait() == 0
    assert not os.path.exists(lock_path(tmp_path))


def test_stale_lock_file_of_a_dead_pid_or_another_host(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {"pid": dead.pid, "host": socket.gethostname(), "started": "2024-01-02T03:04:05+00:00",
             "command": "jaxnoise train --workdir runs/x"}
    with open(lock_path(tmp_path), "w") as f:
        json.dump(stale, f)
    with workdir_lock(tmp_path):
        assert read_lock(tmp_path)["pid"] == os.getpid()
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "stale lock" in out
    assert f"pid {dead.pid} on host {socket.gethostname()}, started 2024-01-02T03:04:05+00:00" in out

    with open(lock_path(tmp_path), "w") as f:
        json.dump(dict(stale, host="node-elsewhere"), f)
    with workdir_lock(tmp_path):
        pass
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert f"pid {dead.pid} on host node-elsewhere, started 2024-01-02T03:04:05+00:00" in out
    assert "another host" in out and "taking it over" in out
    assert not os.path.exists(lock_path(tmp_path))


def test_file_modes_follow_the_umask(tmp_path, umask_027):
    assert io.umask() == 0o027
    assert io.default_file_mode() == 0o640
    path = tmp_path / "f.jsonl"
    io.write_text_atomic(path, "a\nb\n")
    assert path.read_text() == "a\nb\n" and os.stat(path).st_mode & 0o777 == 0o640
    io.append_lines(tmp_path / "g.jsonl", ["c\n"])
    assert os.stat(tmp_path / "g.jsonl").st_mode & 0o777 == 0o640
    assert sorted(os.listdir(tmp_path)) == ["f.jsonl", "g.jsonl"]  # no temporary file left


def test_training_interrupted_is_a_keyboard_interrupt():
    e = TrainingInterrupted(12, "/runs/a")
    assert isinstance(e, KeyboardInterrupt) and e.step == 12 and e.workdir == "/runs/a" and e.saved
    assert str(e) == ("interrupted at step 12; checkpoint saved in /runs/a/checkpoints; re-run the same command to "
                      "resume")
    again = pickle.loads(pickle.dumps(e))
    assert (type(again), again.step, again.workdir, again.saved, str(again)) == (type(e), 12, "/runs/a", True, str(e))
    locked = WorkdirLockedError("in use", workdir="/w", path="/w/.jaxnoise.lock", owner={"pid": 1})
    again = pickle.loads(pickle.dumps(locked))
    assert (str(again), again.workdir, again.path, again.owner) == ("in use", "/w", "/w/.jaxnoise.lock", {"pid": 1})


# ----------------------------------------------------------------------------------------------------------------
# The lock in train()


@pytest.fixture(scope="module")
def tiny():
    from jaxnoise.data import load_dataset
    from jaxnoise.models import get_model
    from jaxnoise.train import TrainConfig
    return get_model("mlp", hidden=(16,)), load_dataset("synthetic", n_train=256, n_test=64), \
        TrainConfig(epochs=1, batch_size=64)


def test_train_refuses_a_workdir_locked_by_another_process(tmp_path, holder, tiny):
    from jaxnoise.train import train
    model, data, config = tiny
    proc = holder(tmp_path)
    with pytest.raises(WorkdirLockedError, match=rf"pid {proc.pid} on host"):
        train(model, data, config, workdir=tmp_path, progress=False)
    assert os.listdir(tmp_path) == [workdir_lib.LOCK_FILE]  # nothing read, written or restored


def test_train_holds_the_lock_only_in_the_main_process(tmp_path, tiny, monkeypatch, capsys):
    from jaxnoise.train import train
    model, data, config = tiny
    with workdir_lock(tmp_path):
        with pytest.raises(WorkdirLockedError, match=rf"this process \(pid {os.getpid()}"):
            train(model, data, config, workdir=tmp_path, progress=False)
        # The other processes of a multi-process run share the workdir with process 0: they take no lock.
        with monkeypatch.context() as m:
            m.setattr(distributed, "is_main_process", lambda: False)
            train(model, data, config, workdir=tmp_path, progress=False, max_steps=2)
    assert not os.path.exists(lock_path(tmp_path))
    # Process 0 resumes that run; a refused resume releases the lock too.
    train(model, data, config, workdir=tmp_path, progress=False)
    assert capsys.readouterr().out == f"resuming {tmp_path} from step 2 of 4 (epoch 1)\n"
    import dataclasses
    with pytest.raises(WorkdirError, match="train_config.seed: checkpoint 0, now 1"):
        train(model, data, dataclasses.replace(config, seed=1), workdir=tmp_path, progress=False)
    assert not os.path.exists(lock_path(tmp_path))
