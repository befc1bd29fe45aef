"""The command line's guarantees: results never overwritten silently, result sets written as one unit, bad input
refused with one line before any work, flags that would have no effect refused, conventions (--version, "did you
mean", umask, exit codes)."""

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from jaxnoise import cli, io, report, robustness

CIFAR = "../shared/tfds/cifar10/3.0.2"


def run(argv, capsys):
    """``(exit status, stdout, stderr)`` of ``jaxnoise ARGV``; a failure must be one line and no traceback."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own usage errors
        rc = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    if rc != 0:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, err
    return rc, out, err


@pytest.fixture(scope="module")
def mlp_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mlp") / "run"
    assert cli.main(["train", "--model", "mlp", "--epochs", "1", "--lr", "0.05", "--workdir", str(workdir)]) == 0
    return str(workdir)


def _snapshot(directory):
    return {n: (directory / n).read_bytes() for n in sorted(os.listdir(directory))}


def _sweep(workdir, out, *extra):
    return ["sweep", "--checkpoint", workdir, "--weight-etas", "0,0.2", "--n-chips", "2", "--out", str(out),
            *extra]


# ----------------------------------------------------------------------------------------------------------------
# Output safety


def test_existing_result_set_is_refused_then_replaced_whole_with_overwrite(mlp_workdir, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert run(_sweep(mlp_workdir, out), capsys)[0] == 0
    before = _snapshot(out)
    assert set(before) == {"results.json", "results.md", "accuracy_vs_eta.png"}
    rc, _, err = run(_sweep(mlp_workdir, out, "--seed", "1"), capsys)
    assert rc == 2 and "already holds results" in err and "--overwrite" in err
    assert _snapshot(out) == before
    assert run(_sweep(mlp_workdir, out, "--seed", "1", "--overwrite"), capsys)[0] == 0
    after = _snapshot(out)
    assert set(after) == set(before) and all(after[n] != before[n] for n in after)
    assert "--seed 1" in json.loads(after["results.json"])["command"]
    assert not [n for n in os.listdir(tmp_path) if n != "sweep"]  # no staging or backup left behind


def test_eval_into_a_sweep_directory_never_mixes_sets(mlp_workdir, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert run(_sweep(mlp_workdir, out), capsys)[0] == 0
    before = _snapshot(out)
    argv = ["eval", "--checkpoint", mlp_workdir, "--weight-eta", "0.1", "--n-chips", "2", "--out", str(out)]
    rc, _, err = run(argv, capsys)
    assert rc == 2 and "already holds results" in err and _snapshot(out) == before
    assert run(argv + ["--overwrite"], capsys)[0] == 0
    # The sweep's plot did not survive beside the eval's files: the set is eval's alone.
    assert sorted(os.listdir(out)) == ["results.json", "results.md"]
    entry = json.loads((out / "results.json").read_text())["arms"][0]["eval"]
    assert [e["weight_noise"]["eta"] for e in entry] == [0.1]


def test_read_only_result_file_is_never_replaced(mlp_workdir, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert run(_sweep(mlp_workdir, out), capsys)[0] == 0
    os.chmod(out / "results.json", 0o444)
    before = _snapshot(out)
    rc, _, err = run(_sweep(mlp_workdir, out, "--overwrite"), capsys)
    assert rc == 2 and "read-only" in err and "results.json" in err
    assert _snapshot(out) == before


def test_overwrite_refuses_a_directory_with_other_files(mlp_workdir, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    rc, _, err = run(_sweep(mlp_workdir, out, "--overwrite"), capsys)
    assert rc == 2 and "notes.txt" in err and "not jaxnoise results" in err
    assert (out / "notes.txt").read_text() == "my notes"


def test_failure_half_way_leaves_the_earlier_set(mlp_workdir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    assert run(_sweep(mlp_workdir, out), capsys)[0] == 0
    before = _snapshot(out)

    def broken_plot(*args, **kwargs):
        raise RuntimeError("disk full while plotting")
    monkeypatch.setattr(report, "plot_sweep", broken_plot)
    with pytest.raises(RuntimeError, match="disk full"):
        cli.main(_sweep(mlp_workdir, out, "--seed", "3", "--overwrite"))
    assert _snapshot(out) == before  # results.json was written into the staging directory, not here
    assert os.listdir(tmp_path) == ["sweep"]
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="disk full"):
        cli.main(_sweep(mlp_workdir, fresh))
    assert not fresh.exists()


def test_concurrent_writer_is_detected_and_both_results_kept(mlp_workdir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    real = robustness.sweep

    def sweep_while_another_run_writes(*args, **kwargs):
        results = real(*args, **kwargs)
        out.mkdir()
        (out / "results.json").write_text('{"other": "run"}')
        return results
    monkeypatch.setattr(robustness, "sweep", sweep_while_another_run_writes)
    rc, _, err = run(_sweep(mlp_workdir, out), capsys)
    assert rc == 2 and "another run" in err
    assert (out / "results.json").read_text() == '{"other": "run"}'
    kept = [n for n in os.listdir(tmp_path) if n.startswith("sweep.conflict-")]
    assert len(kept) == 1 and kept[0] in err
    assert "arms" in json.loads((tmp_path / kept[0] / "results.json").read_text())


def test_two_processes_writing_one_result_directory(mlp_workdir, tmp_path):
    """Real processes: the first to finish writes the set; the other refuses or keeps its files aside."""
    out = tmp_path / "sweep"
    env = dict(os.environ, CI="true")
    cmd = [sys.executable, "-m", "jaxnoise", *_sweep(mlp_workdir, out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    codes = sorted(r[2] for r in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[2] == 2)
    assert "already holds results" in loser[1] or "another run" in loser[1]
    assert "arms" in json.loads((out / "results.json").read_text())


def test_default_output_names_are_unique_per_setting(mlp_workdir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["sweep", "--checkpoint", mlp_workdir, "--n-chips", "2"]
    assert run(base + ["--weight-etas", "0,0.1"], capsys)[0] == 0
    assert run(base + ["--act-etas", "0,0.5", "--act-noise", "multiplicative"], capsys)[0] == 0
    assert run(base + ["--weight-etas", "0,0.2"], capsys)[0] == 0
    names = sorted(os.listdir(tmp_path / "runs"))
    assert len(names) == 3 and all(n.startswith("sweep_mlp_digits_") for n in names)
    assert sum("weight-additive_rel_max" in n for n in names) == 2
    assert sum("act-multiplicative" in n for n in names) == 1
    # The same command again finds its own directory and refuses to replace it.
    rc, _, err = run(base + ["--weight-etas", "0,0.1"], capsys)
    assert rc == 2 and "already holds results" in err


def test_files_get_the_users_umask(mlp_workdir, tmp_path, capsys):
    old = os.umask(0o027)
    try:
        assert run(_sweep(mlp_workdir, tmp_path / "s"), capsys)[0] == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "s").st_mode) == 0o750
    for name in os.listdir(tmp_path / "s"):
        assert stat.S_IMODE(os.stat(tmp_path / "s" / name).st_mode) == 0o640, name


def test_ctrl_c_writes_nothing_and_says_so(mlp_workdir, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(robustness, "sweep", interrupted)
    rc, _, err = run(_sweep(mlp_workdir, tmp_path / "s"), capsys)
    assert rc == 130 and "interrupted" in err and "no result files were written" in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv, message", [
    (["--out", "FILE"], "is a file, not a directory"),
    (["--out", "FILE/sub"], "is a file, so the directory cannot be created"),
])
def test_bad_output_location_refused_before_any_work(argv, message, mlp_workdir, tmp_path, capsys, monkeypatch):
    (tmp_path / "FILE").write_text("x")
    argv = [str(tmp_path / a) if a.startswith("FILE") else a for a in argv]

    def no_work(*args, **kwargs):
        raise AssertionError("the model and data were loaded before the output location was checked")
    monkeypatch.setattr(cli, "load_model", no_work)
    rc, _, err = run(["sweep", "--checkpoint", mlp_workdir, "--weight-etas", "0.1", *argv], capsys)
    assert rc == 2 and message in err


def test_workdir_that_is_a_file_refused_before_any_work(tmp_path, capsys, monkeypatch):
    (tmp_path / "FILE").write_text("x")
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("loaded before the workdir was checked"))
    for workdir in (tmp_path / "FILE", tmp_path / "FILE" / "run"):
        rc, _, err = run(["train", "--model", "mlp", "--epochs", "1", "--workdir", str(workdir)], capsys)
        assert rc == 2 and "--workdir" in err and "file" in err


def test_demo_output_is_one_unit(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--epochs", "1", "--n-chips", "2", "--out", str(out), "--quiet"]
    assert run(argv, capsys)[0] == 0
    assert {"train", "results.json", "results.md", "accuracy_vs_eta.png"} <= set(os.listdir(out))
    before = (out / "results.json").read_bytes()
    rc, _, err = run(argv, capsys)
    assert rc == 2 and "already holds results" in err and (out / "results.json").read_bytes() == before
    assert run(argv[:-1] + ["--seed", "1", "--overwrite", "--quiet"], capsys)[0] == 0
    assert (out / "results.json").read_bytes() != before


# ----------------------------------------------------------------------------------------------------------------
# Validation: one validator for every entry point; no silently wrong numbers


@pytest.mark.parametrize("value", ["-0.1", "nan", "inf", "-inf"])
@pytest.mark.parametrize("command", [
    ["eval", "--weight-eta"], ["eval", "--act-eta"], ["sweep", "--weight-etas"], ["sweep", "--act-etas"],
    ["sensitivity", "--scales"], ["train", "--method", "forward_noise", "--eta-train"],
    ["train", "--method", "forward_noise", "--train-act-noise", "additive", "--act-eta-train"],
    ["denoise", "--act-eta-train"],
])
def test_bad_noise_scales_are_refused_everywhere(command, value, capsys):
    rc, _, err = run([*command[:-1], f"{command[-1]}={value}"], capsys)
    assert rc == 2 and ("negative" in err or "not finite" in err) and command[-1] in err


def test_eval_negative_eta_no_longer_reports_clean_accuracy(mlp_workdir, capsys):
    rc, out, err = run(["eval", "--checkpoint", mlp_workdir, "--weight-eta=-0.1"], capsys)
    assert rc == 2 and "mean" not in out and "negative" in err


@pytest.mark.parametrize("argv, flag, needs", [
    (["train", "--model", "mlp", "--act-eta-train", "0.1", "--method", "forward_noise"], "--act-eta-train",
     "--train-act-noise"),
    (["train", "--model", "mlp", "--eta-train", "0.2"], "--eta-train", "--method forward_noise"),
    (["train", "--model", "mlp", "--eta-train=0.2", "--method", "clean"], "--eta-train", "--method forward_noise"),
    (["train", "--model", "mlp", "--method", "forward_noise", "--lam", "2"], "--lam", "--method consistency"),
    (["train", "--model", "mlp", "--num-draws", "2"], "--num-draws", "--method"),
    (["train", "--model", "mlp", "--method", "forward_noise", "--train-weight-noise", "none", "--eta-train", "0.1"],
     "--eta-train", "--train-weight-noise"),
    (["eval", "--model", "mlp", "--weights", "w.npz", "--act-statistic", "absmax", "--weight-eta", "0.1"],
     "--act-statistic", "--act-eta"),
    (["eval", "--model", "mlp", "--weights", "w.npz", "--weight-noise", "multiplicative"], "--weight-noise",
     "--weight-eta"),
    (["eval", "--model", "mlp", "--weights", "w.npz", "--digital-layers", "fc1", "--weight-eta", "0.1"],
     "--digital-layers", "--analog"),
    (["eval", "--model", "mlp", "--weights", "w.npz", "--max-chips", "10", "--weight-eta", "0.1"], "--max-chips",
     "--target-ci-halfwidth"),
    (["sweep", "--model", "mlp", "--weights", "w.npz", "--weight-etas", "0.1", "--act-noise", "multiplicative"],
     "--act-noise", "--act-etas"),
    (["sensitivity", "--model", "mlp", "--weights", "w.npz", "--scales", "0.1", "--act-noise", "multiplicative"],
     "--act-noise", "--noise activation"),
    (["denoise", "--model", "mlp", "--weights", "w.npz", "--placement", "fc1", "--beam-width", "3"],
     "--beam-width", "--search-budget"),
    (["denoise", "--model", "mlp", "--weights", "w.npz", "--placement", "fc1", "--eta-train", "0.1"],
     "--eta-train", "--train-weight-noise"),
])
def test_flags_without_effect_are_refused_before_any_work(argv, flag, needs, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("work started before the flags were checked"))
    rc, _, err = run(argv, capsys)
    assert rc == 2 and f"{flag} has no effect" in err and needs in err


def test_sampler_flag_is_recorded(mlp_workdir, tmp_path, capsys):
    out = tmp_path / "s"
    rc, _, _ = run(["eval", "--checkpoint", mlp_workdir, "--act-eta", "0.3", "--n-chips", "2", "--sampler",
                    "rbg/icdf16", "--out", str(out)], capsys)
    assert rc == 0
    entry = json.loads((out / "results.json").read_text())["arms"][0]["eval"][0]
    assert entry["activation_noise"]["prng"] == "rbg/icdf16"
    rc, _, err = run(["eval", "--checkpoint", mlp_workdir, "--sampler", "rbg/icdf16"], capsys)
    assert rc == 2 and "--sampler has no effect" in err


def test_flags_that_count_are_accepted(mlp_workdir, tmp_path, capsys):
    rc, out, _ = run(["train", "--checkpoint", mlp_workdir, "--method", "forward_noise", "--eta-train", "0.1",
                      "--train-act-noise", "multiplicative", "--act-eta-train", "0.1", "--max-steps", "2",
                      "--epochs", "1", "--workdir", str(tmp_path / "fn")], capsys)
    assert rc == 0 and "forward_noise" in out


def test_device_table_shows_the_weight_noise_applied(mlp_workdir, tmp_path, capsys):
    out = tmp_path / "dev"
    rc, text, _ = run(["eval", "--checkpoint", mlp_workdir, "--analog", "ideal", "--times", "1",
                       "--weight-eta", "0.1", "--n-chips", "2", "--out", str(out)], capsys)
    assert rc == 0 and "weight noise additive_rel_max eta 0.1" in text
    md = (out / "results.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| mlp"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "0.1" and cells[4].startswith("ideal") and cells[5] == "1", row
    entry = json.loads((out / "results.json").read_text())["arms"][0]["eval"][0]
    assert entry["weight_noise_spec"] == {"kind": "additive_rel_max", "eta": 0.1}


@pytest.mark.parametrize("argv, message", [
    (["eval", "--analog", "ideal", "--digital-layers", "fc1,nosuch", "--weight-eta", "0.1", "--n-chips", "2"],
     "--digital-layers nosuch: no such layer in mlp; its layers are fc1, fc2, head"),
    (["sensitivity", "--scales", "0.1", "--layers", "nosuch", "--n-chips", "2"], "choose from fc1, fc2, head"),
    (["train", "--method", "consistency", "--sites", "nosuch"], "unknown consistency sites ['nosuch']"),
])
def test_selectors_that_match_nothing_are_refused(argv, message, mlp_workdir, tmp_path, capsys):
    extra = ["--workdir", str(tmp_path / "w")] if argv[0] == "train" else []
    rc, _, err = run([argv[0], "--checkpoint", mlp_workdir, *argv[1:], *extra], capsys)
    assert rc == 2 and message in err


@pytest.mark.parametrize("flags", [["--n-chips", str(10 ** 12)], ["--n-chips", "1000000", "--chip-batch-size", "1000000",
                                                                  "--batch-size", "450"]])
def test_monte_carlo_that_cannot_fit_in_memory_is_refused_at_once(flags, mlp_workdir, capsys):
    rc, _, err = run(["eval", "--checkpoint", mlp_workdir, "--weight-eta", "0.1", *flags], capsys)
    assert rc == 2 and "needs an estimated" in err and "--chip-batch-size" in err and "--n-chips" in err


def test_checkpoint_of_another_model_is_one_line(mlp_workdir, capsys):
    rc, _, err = run(["eval", "--model", "cnn", "--checkpoint", mlp_workdir, "--weight-eta", "0.1"], capsys)
    assert rc == 2 and "holds a mlp" in err and "drop --model" in err


@pytest.mark.cifar
@pytest.mark.skipif(not os.path.isdir(CIFAR), reason="needs ../shared/tfds")
def test_corrupt_dataset_file_is_one_line(tmp_path, capsys):
    version = tmp_path / "tfds" / "cifar10" / "3.0.2"
    version.mkdir(parents=True)
    for name in os.listdir(CIFAR):
        src = os.path.join(CIFAR, name)
        if "array_record" in name:
            with open(src, "rb") as f:
                (version / name).write_bytes(f.read(200_000))  # truncated copy
        else:
            shutil.copy(src, version / name)
    env_cache = os.environ.get("JAXNOISE_CACHE")
    os.environ["JAXNOISE_CACHE"] = str(tmp_path / "cache")
    try:
        rc, _, err = run(["eval", "--model", "resnet20", "--weights", "../shared/pretrained/resnet20_cifar10.npz",
                          "--dataset", "cifar10", "--data-dir", str(tmp_path / "tfds")], capsys)
    finally:
        if env_cache is None:
            os.environ.pop("JAXNOISE_CACHE")
        else:
            os.environ["JAXNOISE_CACHE"] = env_cache
    assert rc == 2 and "truncated or damaged" in err and "--data-dir" in err


# ----------------------------------------------------------------------------------------------------------------
# Conventions


def test_version(capsys):
    assert cli.main(["--version"]) == 0 and capsys.readouterr().out.startswith("jaxnoise ")
    out = subprocess.run([sys.executable, "-m", "jaxnoise", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"jaxnoise {cli._version()}"


@pytest.mark.parametrize("argv, suggestion", [
    (["swep"], "did you mean sweep?"),
    (["evl"], "did you mean eval?"),
    (["sweep", "--weight-etaz", "0.1"], "did you mean --weight-etas?"),
    (["train", "--epoch", "3"], "did you mean --epochs?"),
])
def test_did_you_mean(argv, suggestion, capsys):
    rc, _, err = run(argv, capsys)
    assert rc == 2 and suggestion in err


def test_flag_prefixes_are_not_guessed(capsys):
    rc, _, err = run(["eval", "--weight-et", "0.1"], capsys)  # argparse would take it for --weight-eta
    assert rc == 2 and "did you mean --weight-eta?" in err


def test_result_set_api(tmp_path):
    target = tmp_path / "set"
    rs = io.ResultSet(target)
    with rs.staging() as d:
        io.write_text_atomic(os.path.join(d, "results.json"), "{}")
    assert os.listdir(target) == ["results.json"]
    with pytest.raises(io.OutputExistsError, match="--overwrite"):
        io.ResultSet(target)
    with io.ResultSet(target, overwrite=True).staging() as d:
        io.write_text_atomic(os.path.join(d, "results.md"), "x")
    assert os.listdir(target) == ["results.md"]


# ----------------------------------------------------------------------------------------------------------------
# Training from the command line: history, schedule, resume line, Ctrl-C


def _train(workdir, *extra):
    return ["train", "--model", "mlp", "--epochs", "2", "--lr", "0.05", "--workdir", str(workdir), *extra]


def test_train_history_without_checkpoint_is_kept(tmp_path, capsys):
    workdir = tmp_path / "w"
    workdir.mkdir()
    history = "".join(json.dumps({"type": "train", "step": s, "loss": 1.0}) + "\n" for s in range(1, 121))
    (workdir / "metrics.jsonl").write_text(history)
    rc, _, err = run(_train(workdir), capsys)
    assert rc == 2 and "120 lines" in err and "--workdir" in err
    assert (workdir / "metrics.jsonl").read_text() == history


def test_train_resume_line_and_schedule_identity(tmp_path, capsys):
    workdir = tmp_path / "w"
    assert run(_train(workdir, "--max-steps", "5"), capsys)[0] == 0
    rc, out, _ = run(_train(workdir), capsys)
    assert rc == 0 and f"resuming {workdir} from step 5 of 20 (epoch 1)" in out
    rc, out, _ = run(_train(workdir), capsys)
    assert rc == 0 and "already complete at step 20 of 20" in out
    rc, _, err = run(_train(workdir, "--epochs", "3")[:3] + ["--epochs", "3", "--lr", "0.05", "--workdir",
                                                          str(workdir)], capsys)
    assert rc == 2 and "epochs: checkpoint 2, now 3" in err and "--epochs 2" in err


def test_train_ctrl_c_checkpoints_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    from jaxnoise import data as data_lib
    real = data_lib.epoch_batches

    def interrupted_after_7(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 7:
                raise KeyboardInterrupt
            yield batch
    monkeypatch.setattr(data_lib, "epoch_batches", interrupted_after_7)
    workdir = tmp_path / "w"
    rc, _, err = run(_train(workdir), capsys)
    assert rc == 130 and "interrupted at step 7" in err and "re-run the same command to resume" in err
    assert (workdir / "checkpoints" / "7").is_dir() and not (workdir / ".jaxnoise.lock").exists()
    monkeypatch.setattr(data_lib, "epoch_batches", real)
    rc, out, _ = run(_train(workdir), capsys)
    assert rc == 0 and "from step 7 of 20" in out


@pytest.mark.slow  # two CLI processes (~17 s)
def test_same_seed_same_numbers_in_separate_processes(mlp_workdir, tmp_path, capsys):
    """Two fresh Python processes running one command give identical per-chip results, equal to this process's."""
    env = dict(os.environ, CI="true")
    per_chip = []
    for name in ("a", "b"):
        argv = ["eval", "--checkpoint", mlp_workdir, "--weight-eta", "0.2", "--act-eta", "0.3", "--n-chips", "3",
                "--out", str(tmp_path / name)]
        subprocess.run([sys.executable, "-m", "jaxnoise", *argv], check=True, capture_output=True, env=env)
        per_chip.append(json.loads((tmp_path / name / "results.json").read_text())["arms"][0]["eval"][0]["per_chip"])
    here = tmp_path / "here"
    assert run(argv[:-1] + [str(here)], capsys)[0] == 0
    assert per_chip[0] == per_chip[1] == json.loads((here / "results.json").read_text())["arms"][0]["eval"][0][
        "per_chip"]
    assert len(set(per_chip[0])) > 1  # the chips differ from each other
