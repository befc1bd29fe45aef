"""The command line end to end on small settings: demo, train/resume, eval, sweep, and its errors."""

import json
import os
import subprocess
import sys

import pytest

from jaxnoise import cli, experiment

CHECK = "../shared/check_results.py"
PRETRAINED = "../shared/pretrained/resnet20_cifar10.npz"


def _check_results(path):
    if os.path.exists(CHECK):
        out = subprocess.run([sys.executable, CHECK, str(path)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


def test_demo_small(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--epochs", "3", "--n-chips", "4", "--out", str(out), "--quiet"]) == 0
    record = json.loads((out / "results.json").read_text())
    etas = [e["weight_noise"]["eta"] for e in record["arms"][0]["eval"]]
    assert etas == list(cli.DEMO_WEIGHT_ETAS)
    assert record["command"].startswith("jaxnoise demo")
    assert (out / "accuracy_vs_eta.png").stat().st_size > 1000
    assert "| " in (out / "results.md").read_text()
    _check_results(out / "results.json")
    text = capsys.readouterr().out
    assert "clean test accuracy" in text


def test_train_then_eval_from_checkpoint(tmp_path, capsys):
    workdir = tmp_path / "run"
    args = ["train", "--model", "mlp", "--dataset", "digits", "--epochs", "2", "--lr", "0.05",
            "--workdir", str(workdir)]
    assert cli.main(args) == 0
    assert cli.main(["eval", "--checkpoint", str(workdir), "--weight-eta", "0.1", "--n-chips", "3",
                     "--out", str(tmp_path / "eval")]) == 0
    record = json.loads((tmp_path / "eval" / "results.json").read_text())
    entry = record["arms"][0]["eval"][0]
    assert entry["n_chips"] == 3 and entry["weight_noise"] == {"kind": "additive_rel_max", "eta": 0.1}
    _check_results(tmp_path / "eval" / "results.json")
    # Running the same training command again resumes the finished run instead of starting over.
    assert cli.main(args) == 0
    # Hardware-aware fine-tuning from that checkpoint under the hwa_standard preset, device recorded.
    hwa = tmp_path / "hwa"
    assert cli.main(["train", "--checkpoint", str(workdir), "--method", "forward_noise", "--train-weight-noise",
                     "none", "--train-analog", "hwa_standard", "--epochs", "1", "--lr", "0.01", "--max-steps", "3",
                     "--workdir", str(hwa)]) == 0
    meta = json.loads((hwa / "checkpoints" / "metadata.json").read_text())
    dev = meta["loss_config"]["device"]
    assert meta["step"] == 3 and dev["name"] == "hwa_standard" and dev["pcm"] is None
    assert set(dev["io"]["inp_ranges"]) == {"fc1", "fc2", "head"} and meta["hparams"] == {}


@pytest.mark.slow  # ~36 s: trains a CNN, then activation and device sweeps from the command line
def test_activation_sweep_digits(tmp_path):
    workdir = tmp_path / "run"
    assert cli.main(["train", "--model", "cnn", "--epochs", "1", "--lr", "0.05", "--workdir", str(workdir)]) == 0
    out = tmp_path / "sweep"
    assert cli.main(["sweep", "--checkpoint", str(workdir), "--act-etas", "0,0.5", "--n-chips", "2",
                     "--out", str(out)]) == 0
    record = json.loads((out / "results.json").read_text())
    evals = record["arms"][0]["eval"]
    assert [e["activation_noise"]["eta"] for e in evals] == [0.0, 0.5]
    assert evals[0]["weight_noise"] is None
    _check_results(out / "results.json")

    # Device time sweep of the same checkpoint: one entry per time, device spec recorded, shared format.
    dev_out = tmp_path / "device"
    assert cli.main(["sweep", "--checkpoint", str(workdir), "--analog", "hwa_standard",
                     "--times", "1,86400", "--n-chips", "2", "--n-images", "60", "--out", str(dev_out)]) == 0
    evals = json.loads((dev_out / "results.json").read_text())["arms"][0]["eval"]
    assert [e["weight_noise"]["t_inference_s"] for e in evals] == [1.0, 86400.0]
    assert evals[0]["device"]["name"] == "hwa_standard" and evals[0]["device"]["pcm"]["t0"] == 20.0
    _check_results(dev_out / "results.json")
    assert (dev_out / "accuracy_vs_eta.png").exists()
    # eval: a preset composed with weight noise, compensation off, first layer digital
    assert cli.main(["eval", "--checkpoint", str(workdir), "--analog", "hwa_standard", "--no-drift-compensation",
                     "--digital-layers", "conv1", "--weight-eta", "0.05", "--times", "3600", "--n-chips", "2",
                     "--n-images", "30", "--out", str(tmp_path / "dev_eval")]) == 0
    entry = json.loads((tmp_path / "dev_eval" / "results.json").read_text())["arms"][0]["eval"][0]
    assert entry["device"]["compensation"] is None and entry["device"]["digital_layers"] == ["^conv1$"]
    assert entry["weight_noise_spec"] == {"kind": "additive_rel_max", "eta": 0.05}


@pytest.mark.cifar
@pytest.mark.skipif(not os.path.exists(PRETRAINED), reason="pretrained weights not present")
def test_eval_pretrained_resnet20_subset(tmp_path, capsys):
    code = cli.main(["eval", "--model", "resnet20", "--weights", PRETRAINED, "--dataset", "cifar10",
                     "--weight-eta", "0.05", "--n-chips", "2", "--n-images", "200",
                     "--out", str(tmp_path)])
    if code != 0 and "TFDS_DATA_DIR" in capsys.readouterr().err:
        pytest.skip("CIFAR-10 not available")
    assert code == 0
    _check_results(tmp_path / "results.json")


@pytest.mark.parametrize("method, extra", [
    ("forward_noise", ["--eta-train", "0.1", "--n-draws", "2"]),
    ("consistency", ["--eta-train", "0.1", "--lam", "0.3", "--sites", "hidden1,logits", "--distance", "cosine"]),
])
def test_train_with_noise_aware_method_records_it_and_resumes(tmp_path, capsys, method, extra):
    workdir = tmp_path / method
    args = ["train", "--model", "mlp", "--epochs", "2", "--lr", "0.05", "--method", method, *extra,
            "--workdir", str(workdir)]
    assert cli.main(args + ["--max-steps", "5"]) == 0  # interrupted run
    meta = json.loads((workdir / "checkpoints" / "metadata.json").read_text())
    assert meta["loss"] == method and meta["step"] == 5
    assert meta["hparams"]["eta_train"] == pytest.approx(0.1)
    if method == "consistency":
        assert meta["hparams"]["lambda"] == pytest.approx(0.3)
        assert meta["loss_config"]["sites"] == ["hidden1", "logits"]
        assert meta["loss_config"]["distance"] == "cosine"
    else:
        assert meta["loss_config"]["num_draws"] == 2
    assert cli.main(args) == 0  # resumes and finishes
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 2 * (1347 // 128)
    assert f"({method})" in capsys.readouterr().out


def test_train_rejects_unknown_site(tmp_path, capsys):
    assert cli.main(["train", "--model", "mlp", "--epochs", "1", "--method", "consistency", "--sites", "conv9",
                     "--workdir", str(tmp_path / "w")]) == 2
    assert "unknown consistency sites ['conv9']" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "vgg", "--weights", "x.npz"], "unknown model 'vgg'"),
    (["eval", "--model", "mlp", "--weights", "/nonexistent/w.npz"], "does not exist"),
    (["eval", "--model", "mlp", "--dataset", "mnist3", "--weights", "w.npz"], "nknown dataset"),
    (["eval", "--checkpoint", "/nonexistent/run"], "/nonexistent/run"),
    (["eval", "--model", "resnet26", "--weights", "x.npz"], "resnet26_cifar"),
    (["eval", "--model", "mlp", "--dataset", "digits", "--resolution", "32", "--weights", "x.npz"], "--streaming"),
])
def test_bad_input_gives_clear_error(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_negative_eta_rejected(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert cli.main(["train", "--model", "mlp", "--epochs", "1", "--workdir", str(workdir)]) == 0
    assert cli.main(["sweep", "--checkpoint", str(workdir), "--weight-etas", "0,-0.1"]) == 2
    assert "negative" in capsys.readouterr().err
    assert cli.main(["sweep", "--checkpoint", str(workdir), "--analog", "ideal", "--times", "1,-5"]) == 2
    assert "negative" in capsys.readouterr().err
    assert cli.main(["eval", "--checkpoint", str(workdir), "--times", "1"]) == 2
    assert "--times has no effect here: it counts with --analog" in capsys.readouterr().err
    assert cli.main(["sweep", "--checkpoint", str(workdir), "--analog", "ideal"]) == 2
    assert "needs --times" in capsys.readouterr().err


def test_old_device_flag_still_parses_as_analog():
    """``--device PRESET`` (the name before issue 19) is a hidden alias of ``--analog PRESET``: same parsed value,
    same default output directory, and the flag-effect rules name the flag as written."""
    parser = cli.build_parser()
    for command in ("eval", "sweep"):
        new = parser.parse_args([command, "--model", "mlp", "--analog", "hwa_standard", "--times", "1"])
        old = parser.parse_args([command, "--model", "mlp", "--device", "hwa_standard", "--times", "1"])
        assert new.device == old.device == "hwa_standard" and vars(new) == vars(old)
        assert cli.default_out(new, "x") == cli.default_out(old, "x")
        assert cli.given_flags(parser, [command, "--device", "ideal"]) == {"device": "--device"}
        help_text = parser.commands[command].format_help()
        assert "--analog" in help_text and "--device" not in help_text


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "jaxnoise", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout and "sweep" in out.stdout


@pytest.mark.slow  # ~30 s; jaxnoise.denoise's own tests cover the training, this the command line
def test_denoise_train_and_eval_checkpoint(tmp_path, capsys):
    """`jaxnoise denoise` trains blocks at the given sites; `eval` rebuilds the denoised model from its checkpoint.

    The search and the resume are tested in tests/test_placement.py and tests/test_denoise.py."""
    base = tmp_path / "cnn"
    assert cli.main(["train", "--model", "cnn", "--dataset", "digits", "--epochs", "2", "--lr", "0.05",
                     "--workdir", str(base)]) == 0
    workdir = tmp_path / "den"
    args = ["denoise", "--checkpoint", str(base), "--act-eta-train", "0.5", "--placement", "block1,block2",
            "--max-steps", "10", "--train-batch-size", "64", "--n-chips", "2", "--workdir", str(workdir)]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "['block1', 'block2']" in text and "denoised" in text
    meta = json.loads((workdir / "checkpoints" / "metadata.json").read_text())
    assert meta["model"] == "cnn+denoise" and meta["placement"] == {"block1": 1.0, "block2": 1.0, "block3": 0.0,
                                                                    "pre_logits": 0.0}
    assert cli.main(["eval", "--checkpoint", str(workdir), "--act-eta", "0.5", "--n-chips", "2",
                     "--out", str(tmp_path / "eval")]) == 0
    _check_results(tmp_path / "eval" / "results.json")


def test_denoise_defaults_are_the_ablations_winner(tmp_path, monkeypatch):
    """`jaxnoise denoise` trains by default what the ablation (denoise_ablation_resnet20) found best: its ``spread``
    variant's block width, training-scale spread, schedule length, learning rate and batch; the loss gets them."""
    config = experiment.load_config(os.path.join("experiments", "configs", "denoise_ablation_resnet20.py"))
    winner = config.variants.spread
    args = cli.build_parser().parse_args(["denoise", "--checkpoint", "x"])
    assert (args.reduction, args.act_eta_spread, args.feature_weight, args.kl_weight, args.nll_weight, args.kind) == (
        config.denoiser.reduction, winner.act_eta_spread, config.denoiser.feature_weight, 0.0, 0.0,
        config.denoiser.kind)
    assert (args.epochs, args.lr, args.train_batch_size) == (config.train.max_epochs, config.train.lr,
                                                             config.train.batch_size)
    seen = {}

    class Stop(Exception):
        pass

    def fake_loss(dmodel, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(cli.denoise, "denoiser_loss", fake_loss)
    with pytest.raises(Stop):
        cli.cmd_denoise(cli.build_parser().parse_args(["denoise", "--checkpoint", str(_tiny_mlp(tmp_path)),
                                                       "--act-eta-spread", "0.2", "--kl-weight", "0.5",
                                                       "--placement", "fc1"]))
    assert seen["act_eta_spread"] == 0.2 and seen["kl_weight"] == 0.5


@pytest.mark.parametrize("value", ["1", "-0.1", "nan"])
def test_denoise_refuses_a_spread_outside_0_1(value, capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["denoise", "--checkpoint", "x", f"--act-eta-spread={value}"])
    assert "--act-eta-spread" in capsys.readouterr().err


def test_denoise_needs_a_placement(tmp_path, capsys):
    args = cli.build_parser().parse_args(["denoise", "--checkpoint", str(_tiny_mlp(tmp_path))])
    with pytest.raises(cli.UsageError, match="--placement"):
        cli.cmd_denoise(args)


def _tiny_mlp(tmp_path):
    workdir = tmp_path / "mlp"
    assert cli.main(["train", "--model", "mlp", "--dataset", "digits", "--epochs", "1", "--workdir", str(workdir)]) == 0
    return workdir


def test_sensitivity_adaptive_eval_and_mesh(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert cli.main(["train", "--model", "mlp", "--dataset", "digits", "--epochs", "2", "--lr", "0.05",
                     "--train-batch-size", "64", "--mesh", "auto", "--workdir", str(workdir)]) == 0
    out = tmp_path / "sens"
    assert cli.main(["sensitivity", "--checkpoint", str(workdir), "--noise", "weight", "--scales", "0.1,0.3",
                     "--n-chips", "3", "--n-images", "200", "--mesh", "auto", "--out", str(out)]) == 0
    record = json.loads((out / "results.json").read_text())
    assert [a["name"] for a in record["arms"]] == ["fc1", "fc2", "head", "all_layers"]
    assert record["sensitivity"]["scales"] == [0.1, 0.3] and record["command"].startswith("jaxnoise sensitivity")
    assert (out / "sensitivity.png").stat().st_size > 1000 and "| fc1 |" in (out / "results.md").read_text()
    _check_results(out / "results.json")
    assert "most sensitive at eta 0.3" in capsys.readouterr().out
    act = tmp_path / "sens_act"
    assert cli.main(["sensitivity", "--checkpoint", str(workdir), "--noise", "activation", "--act-noise",
                     "multiplicative", "--scales", "0.5", "--n-chips", "2", "--n-images", "100", "--layers",
                     "fc2,head", "--out", str(act)]) == 0
    assert [a["name"] for a in json.loads((act / "results.json").read_text())["arms"]] == ["fc2", "head",
                                                                                          "all_layers"]
    # Adaptive Monte Carlo from the command line.
    assert cli.main(["eval", "--checkpoint", str(workdir), "--weight-eta", "0.2", "--n-chips", "8",
                     "--target-ci-halfwidth", "0.01", "--max-chips", "40", "--n-images", "200",
                     "--out", str(tmp_path / "ad")]) == 0
    entry = json.loads((tmp_path / "ad" / "results.json").read_text())["arms"][0]["eval"][0]
    assert entry["stopping"]["round_chips"] == 8 and entry["n_chips"] <= 40
    assert entry["n_chips"] == 40 or entry["stopping"]["met_target"]
    assert "adaptive:" in capsys.readouterr().out
    assert cli.main(["sensitivity", "--checkpoint", str(workdir), "--scales", "0.1", "--mesh", "3by1",
                     "--out", str(tmp_path / "x")]) == 2
    assert "CHIPSxDATA" in capsys.readouterr().err


@pytest.mark.slow
def test_imagenet_path_end_to_end_on_the_mock(mock_imagenet, tmp_path, capsys):
    """train, eval, sweep and denoise on the streamed mock imagenet2012 at 32 px (a small CNN, 1000 classes)."""
    data = ["--data-dir", mock_imagenet, "--resolution", "32", "--workers", "0"]
    run = str(tmp_path / "run")
    assert cli.main(["train", "--model", "cnn", "--dataset", "imagenet2012", *data, "--epochs", "1",
                     "--train-batch-size", "16", "--max-steps", "2", "--workdir", run]) == 0
    assert "clean test accuracy" in capsys.readouterr().out
    assert cli.main(["eval", "--checkpoint", run, *data, "--weight-eta", "0.1", "--n-chips", "2", "--batch-size",
                     "16", "--out", str(tmp_path / "eval")]) == 0
    record = json.load(open(tmp_path / "eval" / "results.json"))
    assert record["dataset"] == {"name": "imagenet2012", "split": "test", "n_images": 32}
    assert cli.main(["sweep", "--checkpoint", run, *data, "--weight-etas", "0,0.2", "--n-chips", "2",
                     "--batch-size", "16", "--n-images", "20", "--out", str(tmp_path / "sweep")]) == 0
    sweep = json.load(open(tmp_path / "sweep" / "results.json"))
    assert [e["n_images"] for e in sweep["arms"][0]["eval"]] == [20, 20]
    assert cli.main(["denoise", "--checkpoint", run, *data, "--placement", "all", "--train-batch-size", "16",
                     "--max-steps", "2", "--n-chips", "2", "--batch-size", "16", "--workdir",
                     str(tmp_path / "den")]) == 0
    assert "denoised" in capsys.readouterr().out


def test_missing_imagenet_says_how_to_prepare_it(tmp_path, capsys):
    weights = tmp_path / "w.npz"
    weights.write_bytes(b"")
    assert cli.main(["eval", "--model", "cnn", "--dataset", "imagenet2012", "--data-dir", str(tmp_path / "none"),
                     "--weights", str(weights)]) == 2
    err = capsys.readouterr().err
    assert "'imagenet2012' was not found" in err and "tfds build imagenet2012 --manual_dir" in err
