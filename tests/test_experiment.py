"""The experiment runner: configs, overrides, cached and resumable stages, and every config end to end (tiny)."""

import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxnoise import checkpoint, cli, experiment

CHECK = "../shared/check_results.py"
CONFIGS = sorted(glob.glob(os.path.join("experiments", "configs", "*.py")))
Q4 = os.path.join("experiments", "configs", "consistency_resnet32_q4.py")   # the runner tests' config


def _dirs(tmp_path):
    return {"results_dir": str(tmp_path / "results"), "work_dir": str(tmp_path / "work")}


def test_there_are_configs():
    assert CONFIGS, "experiments/configs/*.py: no config found"


# Protocols whose tiny run compiles too many programs for the default suite's budget (denoise_proxy: the vmapped
# training of several placements at once, 1-3 min here; denoise_ablation: 7 variants, 20-40 s; consistency_quantized
# and denoise_placement: 20-35 s); their configs run end to end in the slow set, their rules are unit tested by
# default (tests/test_denoise_{ablation,proxy}.py, test_quant.py, test_placement.py). consistency_float and
# device_drift run end to end by default: the runner's stages, records and caching stay covered there.
SLOW_TINY_PROTOCOLS = {"denoise_proxy", "denoise_ablation", "consistency_quantized", "denoise_placement"}


def _one_per_protocol():
    """Every config; the default suite runs the first config of each protocol end to end, the others (the same
    stages with other settings) and those of SLOW_TINY_PROTOCOLS are marked slow. Every config's docstring and
    stage list are checked by default."""
    seen = set()
    for path in CONFIGS:
        protocol = experiment.load_config(path).protocol
        slow = protocol in seen or protocol in SLOW_TINY_PROTOCOLS
        yield pytest.param(path, id=os.path.basename(path), marks=pytest.mark.slow if slow else ())
        seen.add(protocol)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_documents_its_command_and_builds_its_stages(path):
    doc = open(path).read()
    assert "jaxnoise run " + path.replace(os.sep, "/") in doc, "the docstring gives the command"
    assert "Expected" in doc, "the docstring gives the expected result"
    for tiny in (False, True):
        config = experiment.apply_overrides(experiment.load_config(path), [f"tiny={tiny}"])
        assert [s.name for s in experiment.stages_of(config)], path


@pytest.mark.parametrize("path", list(_one_per_protocol()))
def test_every_config_runs_end_to_end_in_tiny_mode_then_is_cached(path, tmp_path):
    config = experiment.apply_overrides(experiment.load_config(path), ["tiny=True"])
    logs = []
    summaries = experiment.run(config, **_dirs(tmp_path), log=logs.append)
    stages = experiment.stages_of(config)
    assert list(summaries) == [s.name for s in stages]
    for stage in stages:
        record = experiment.read_record(str(tmp_path / "results"), stage.name)
        assert record["format"] == experiment.RECORD_FORMAT and record["stage"] == stage.name
        for out in stage.outputs:
            assert (tmp_path / "results" / out).exists()
    # every .json the run wrote is a result file in the shared format (stage records are .jsonl)
    jsons = sorted(glob.glob(str(tmp_path / "results" / "**" / "*.json"), recursive=True))
    assert jsons
    if os.path.exists(CHECK):
        out = subprocess.run([sys.executable, CHECK, *jsons], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    # a second run reads every stage from its record and runs nothing
    logs2 = []
    again = experiment.run(config, **_dirs(tmp_path), log=logs2.append)
    assert again == summaries
    assert all("cached" in line for line in logs2), logs2


def _tiny(path=None):
    path = path or Q4
    # one arm, one seed: the runner's behaviour, not the protocol's (which the end-to-end test covers)
    return experiment.apply_overrides(experiment.load_config(path), ["tiny=True", "qat.epochs=1",
                                                                     "arms.methods=('forward_noise',)",
                                                                     "arms.seeds=(0,)"])


def _light_stages():
    """Two stages that only write a file each: the runner's behaviour without a protocol's cost."""
    def writer(out):
        def run(ctx):
            with open(ctx.result_path(out), "w") as f:
                f.write(str(ctx.config.qat.lr))
            return {"lr": ctx.config.qat.lr}
        return run
    return [experiment.Stage("qat", writer("weights/qat.npz"), settings=("tiny", "qat"), outputs=("weights/qat.npz",)),
            experiment.Stage("eval_qat", writer("eval_qat.json"), settings=("tiny", "qat", "eval.n_chips"),
                             outputs=("eval_qat.json",))]


def test_changed_settings_are_refused_and_rerun_replaces(tmp_path):
    config = _tiny()
    stages = _light_stages()
    experiment.run(config, stages, **_dirs(tmp_path), log=lambda m: None)
    record = (tmp_path / "results" / "stages" / "qat.jsonl").read_text()
    changed = experiment.apply_overrides(config, ["qat.lr=0.05"])
    with pytest.raises(experiment.ExperimentError, match=r"stage .qat.*qat\.lr: 0\.01 -> 0\.05.*--rerun qat"):
        experiment.run(changed, stages, **_dirs(tmp_path), log=lambda m: None)
    assert (tmp_path / "results" / "stages" / "qat.jsonl").read_text() == record   # untouched
    # a setting only a later stage uses leaves the earlier one cached
    logs = []
    experiment.run(experiment.apply_overrides(config, ["eval.n_chips=4"]), stages, **_dirs(tmp_path),
                   log=logs.append, rerun=["eval_qat"])
    assert any("qat: cached" in m for m in logs) and any("eval_qat: running" in m for m in logs)
    logs = []
    experiment.run(changed, stages, **_dirs(tmp_path), log=logs.append, rerun=["qat"])
    assert any("qat: running" in m for m in logs)
    assert experiment.read_record(str(tmp_path / "results"), "qat")["settings"]["qat"]["lr"] == 0.05
    history = [json.loads(h) for h in (tmp_path / "results" / "stages" / "qat.jsonl").read_text().splitlines()]
    assert [h.get("status") for h in history] == ["started", None, "superseded", "started", None]   # appended
    assert [h["settings"]["qat"]["lr"] for h in history if "settings" in h] == [0.01, 0.05]
    # the superseded run's outputs are kept, not deleted
    kept = glob.glob(str(tmp_path / "results" / "superseded" / "*" / "weights" / "qat.npz"))
    assert kept and open(kept[0]).read() == "0.01"


def test_a_stage_whose_outputs_are_gone_runs_again(tmp_path):
    config = _tiny()
    stages = _light_stages()
    experiment.run(config, stages, **_dirs(tmp_path), log=lambda m: None)
    os.remove(tmp_path / "results" / "eval_qat.json")
    logs = []
    experiment.run(config, stages, **_dirs(tmp_path), log=logs.append)
    assert any("eval_qat: running" in m for m in logs) and any("qat: cached" in m for m in logs)


def test_an_interrupted_rerun_resumes_as_a_rerun_with_a_fresh_work_dir(tmp_path):
    calls = {"a": 0, "b": 0}
    fail = {"a": False, "b": False}

    def stage(name):
        def run(ctx):
            calls[name] += 1
            if fail[name]:
                raise RuntimeError("interrupted")
            with open(ctx.result_path(f"{name}.txt"), "w") as f:
                f.write(f"{name} run {calls[name]} in {ctx.work_path('x')}")
            return {"n": calls[name]}
        return run

    config = experiment.apply_overrides(experiment.load_config(Q4), ["tiny=True"])
    stages = [experiment.Stage("a", stage("a"), settings=("seed",), outputs=("a.txt",)),
              experiment.Stage("b", stage("b"), settings=("seed",), outputs=("b.txt",))]
    kw = dict(stages=stages, **_dirs(tmp_path), log=lambda m: None)
    experiment.run(config, **kw)
    fail["b"] = True
    with pytest.raises(RuntimeError, match="interrupted"):
        experiment.run(config, rerun=["a"], **kw)
    # a reran (fresh work dir); b's old result is superseded, so the next plain run runs b instead of caching it
    assert experiment.read_record(str(tmp_path / "results"), "a")["summary"] == {"n": 2}
    assert experiment.read_record(str(tmp_path / "results"), "b") is None
    assert not (tmp_path / "results" / "b.txt").exists()
    assert "-r1" in (tmp_path / "results" / "a.txt").read_text()
    fail["b"] = False
    summaries = experiment.run(config, **kw)
    assert summaries == {"a": {"n": 2}, "b": {"n": 3}} and calls == {"a": 2, "b": 3}
    assert len(glob.glob(str(tmp_path / "results" / "superseded" / "*" / "*.txt"))) == 2


@pytest.mark.parametrize("override, match", [("qat.epochs", "key=value"), ("nope=1", "has no 'nope'"),
                                             ("qat.nope=1", "has no 'nope'"), ("qat.epochs='x'", "qat.epochs")])
def test_bad_overrides(override, match):
    with pytest.raises(experiment.ExperimentError, match=match):
        experiment.apply_overrides(experiment.load_config(Q4), [override])


def test_overrides_parse_literals():
    c = experiment.apply_overrides(experiment.load_config(Q4),
                                   ["qat.epochs=3", "qat.lr=1", "tiny=True", "quant.act_signed_paths=['^x$']"])
    assert c.qat.epochs == 3 and c.qat.lr == 1.0 and isinstance(c.qat.lr, float) and c.tiny is True
    assert tuple(c.quant.act_signed_paths) == ("^x$",)


def test_bad_config_files(tmp_path):
    with pytest.raises(experiment.ExperimentError, match="does not exist"):
        experiment.load_config(tmp_path / "none.py")
    (tmp_path / "c.py").write_text("x = 1\n")
    with pytest.raises(experiment.ExperimentError, match="get_config"):
        experiment.load_config(tmp_path / "c.py")
    (tmp_path / "d.py").write_text("import ml_collections\ndef get_config():\n"
                                   "    return ml_collections.ConfigDict(dict(name='d', protocol='nope'))\n")
    with pytest.raises(experiment.ExperimentError, match="unknown protocol 'nope'"):
        experiment.stages_of(experiment.load_config(tmp_path / "d.py"))


def test_eval_reads_a_saved_arm_with_its_quantized_model(tmp_path, capsys, monkeypatch):
    """`jaxnoise eval --weights ARM.npz` rebuilds the model (with its quantization) from the file's metadata."""
    path = os.path.abspath(Q4)
    monkeypatch.chdir(tmp_path)
    small = ["--set", "tiny=True", "--set", "qat.epochs=1", "--set", "arms.methods=('forward_noise',)",
             "--set", "arms.seeds=(0,)", "--only", "qat"]
    assert cli.main(["run", path, *small]) == 0
    weights = tmp_path / "runs" / "tiny" / "consistency_resnet32_q4" / "results" / "weights" / "qat.npz"
    assert checkpoint.read_npz_metadata(weights)["model_config"]["quant"]["weight_bits"] == 4
    out = tmp_path / "eval"
    assert cli.main(["eval", "--weights", str(weights), "--dataset", "digits", "--weight-eta", "0.2",
                     "--n-chips", "2", "--out", str(out)]) == 0
    entry = json.loads((out / "results.json").read_text())["arms"][0]["eval"][0]
    assert entry["weight_noise"]["quant"]["weight_bits"] == 4


def test_cli_run_lists_and_runs(tmp_path, capsys, monkeypatch):
    path = os.path.abspath(Q4)
    monkeypatch.chdir(tmp_path)   # tiny mode writes under runs/tiny of the working directory
    small = ["--set", "tiny=True", "--set", "qat.epochs=1", "--set", "arms.methods=('forward_noise',)",
             "--set", "arms.seeds=(0,)"]
    assert cli.main(["run", path, *small, "--list"]) == 0
    assert "qat" in capsys.readouterr().out
    assert cli.main(["run", path, *small]) == 0
    assert (tmp_path / "runs" / "tiny").exists()
    assert cli.main(["run", path, *small, "--set", "qat.epochs=2"]) == 2   # stale: refused
    assert "--rerun qat" in capsys.readouterr().err
    assert cli.main(["run", path, "--set", "nope=1"]) == 2


def test_npz_weights_round_trip(tmp_path, trained_digits_cnn):
    model, variables, _ = trained_digits_cnn
    path = checkpoint.save_npz(tmp_path / "w.npz", variables, {"model": model.name})
    assert checkpoint.read_npz_metadata(path)["model"] == "cnn"
    loaded = checkpoint.load_variables(path, model)
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, variables))
    with pytest.raises(FileExistsError):
        checkpoint.save_npz(path, variables)
    with pytest.raises(ValueError, match=".npz"):
        checkpoint.save_npz(tmp_path / "w.bin", variables)
    assert checkpoint.read_npz_metadata(path)["model"] == "cnn"


def _config(name, *overrides):
    return experiment.apply_overrides(experiment.load_config(os.path.join("experiments", "configs", f"{name}.py")),
                                      list(overrides))


def test_device_config_keeps_the_legacy_io_numerics_of_its_committed_results(trained_digits_cnn, digits):
    """device_resnet32's results predate IOParams.sampler/conv_sum/semantics: its training and inference specs use
    the old numerics, analog.LEGACY_IO (bit for bit the old code, tests/test_device.py); tiny mode uses the
    defaults (compile time)."""
    from jaxnoise import analog as analog_lib
    from jaxnoise.protocols import device_drift
    model, variables, _ = trained_digits_cnn
    config = _config("device_resnet32")
    numerics = dict(config.io_numerics)
    assert numerics == analog_lib.LEGACY_IO
    for mode in ("global", None):
        spec = device_drift.inference_spec(config, mode)
        assert spec.name == "aihwkit_inference_default" and spec.compensation == mode
        assert {k: getattr(spec.io, k) for k in numerics} == numerics
    train_spec = device_drift.training_spec(config, model, variables, digits)
    assert train_spec.name == "hwa_standard" and train_spec.pcm is None and train_spec.io.inp_ranges
    assert {k: getattr(train_spec.io, k) for k in numerics} == numerics
    assert train_spec.io.input_range is None   # the legacy pipeline has no learned ranges (nor had the results)
    tiny = device_drift.inference_spec(_config("device_resnet32", "tiny=True"), "global")
    assert tiny.io == analog_lib.preset("aihwkit_inference_default").io


def test_device_redo_config_uses_the_presets_numerics(trained_digits_cnn, digits):
    """device_resnet32_aihwkit (issue 18, ask 3) redoes device_resnet32 with the presets as they are: no I/O
    numerics overridden, so training and inference specs are hwa_standard's and aihwkit_inference_default's own
    (aihwkit semantics, tiles), at the full protocol (32 chips, the whole test split)."""
    from jaxnoise import analog as analog_lib
    from jaxnoise.protocols import device_drift
    model, variables, _ = trained_digits_cnn
    config = _config("device_resnet32_aihwkit")
    assert device_drift.io_numerics(config) == {}
    assert (config.eval.n_chips, config.eval.n_images) == (32, 0)
    for mode in ("global", None):
        spec = device_drift.inference_spec(config, mode)
        assert spec.io == analog_lib.preset("aihwkit_inference_default").io and spec.compensation == mode
    assert spec.io.semantics == "aihwkit"
    train_spec = device_drift.training_spec(config, model, variables, digits)
    hwa = analog_lib.preset("hwa_standard").io
    assert train_spec.io.inp_ranges and train_spec.io.replace(inp_ranges=hwa.inp_ranges) == hwa
    legacy = _config("device_resnet32")
    assert {k: v for k, v in config.items() if k not in ("name", "io_numerics", "eval")} == \
        {k: v for k, v in legacy.items() if k not in ("name", "io_numerics", "eval")}, "the same arms and training"


def test_denoise_config_draws_activation_noise_as_its_committed_results(trained_digits_cnn):
    """denoise_resnet20's results predate NoiseSpec.sampler (now icdf16 on CPU): evaluation and training noise use
    threefry/erfinv; tiny mode uses the backend's default (compile time)."""
    import types

    from jaxnoise import denoise
    from jaxnoise.protocols import denoise_placement
    model, _, ref = trained_digits_cnn
    fake_setup = types.SimpleNamespace(ref=ref)
    dmodel = denoise.denoised(model)
    config = _config("denoise_resnet20")
    assert denoise_placement.spec(config, fake_setup, 0.3).sampler == "threefry/erfinv"
    loss_fn = denoise_placement.loss(config, fake_setup, dmodel, 0.3)
    assert loss_fn.config["noise"]["prng"]["activation"] == "threefry/erfinv"
    tiny = _config("denoise_resnet20", "tiny=True")
    assert denoise_placement.spec(tiny, fake_setup, 0.3).sampler is None


@pytest.mark.slow   # a tiny search and a plateau training, twice, ~30 s
def test_denoise_placement_plateau_recipe_keeps_its_curve_as_an_output(tmp_path):
    """With train.recipe = "plateau" an arm trains chunk by chunk (train_until_plateau) and its curve is one of the
    stage's outputs, so --rerun moves it aside and the rerun starts a new curve instead of resuming the old one."""
    import ml_collections

    from jaxnoise.protocols import denoise_placement as dp
    config = _config("denoise_resnet20", "tiny=True")
    config.arms = ("every_block",)
    config.train.recipe = "plateau"
    config.train.chunk_steps = 0
    config.train.max_epochs = 1
    config.curve = ml_collections.ConfigDict(dict(n_chips=2, patience=2, min_delta=0.0))
    dirs = {"results_dir": str(tmp_path / "results"), "work_dir": str(tmp_path / "work")}
    only = ["level", "sensitivity", "search", "train_every_block"]
    experiment.run(config, only=only, log=lambda m: None, **dirs)
    curve = tmp_path / "results" / "curves" / "every_block.jsonl"
    assert len(dp.read_jsonl(str(curve))) == 1
    stage = next(st for st in experiment.stages_of(config) if st.name == "train_every_block")
    assert "curves/every_block.jsonl" in stage.outputs
    experiment.run(config, only=only, rerun=["train_every_block"], log=lambda m: None, **dirs)
    assert len(dp.read_jsonl(str(curve))) == 1   # a new curve, not a second chunk on the old one
    assert glob.glob(str(tmp_path / "results" / "superseded" / "*" / "curves" / "every_block.jsonl"))
    assert not glob.glob(str(tmp_path / "results" / "resume" / "*" / "every_block.npz"))   # complete: removed


def test_consistency_float_stage_sites_are_the_last_block_of_each_stage():
    """The ablation's 'stage outputs' run: the committed layer1/2, layer2/2, layer3/2 of the ResNet-20."""
    from jaxnoise.models import get_model
    from jaxnoise.protocols import consistency_float
    assert consistency_float.sites_of("stages", get_model("resnet20")) == ("layer1/2", "layer2/2", "layer3/2")
    assert consistency_float.sites_of("stages", get_model("resnet32")) == ("layer1/4", "layer2/4", "layer3/4")
    assert consistency_float.sites_of("", get_model("resnet20")) is None
    assert consistency_float.sites_of("logits", get_model("resnet20")) == ("logits",)


def test_outputs_made_outside_the_runner_are_never_overwritten(tmp_path):
    """A results dir holding a stage's outputs without its record (an older script's results) is refused before
    anything runs; --rerun moves them to superseded/ first. A stage the runner started keeps its partial files."""
    calls = []

    def run(ctx):
        calls.append(1)
        with open(ctx.result_path("a.json"), "w") as f:
            f.write("new")
        return {}

    config = experiment.apply_overrides(experiment.load_config(CONFIGS[0]), ["tiny=True"])
    stages = [experiment.Stage("a", run, settings=("seed",), outputs=("a.json",))]
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "a.json").write_text("committed by an older script")
    kw = dict(stages=stages, **_dirs(tmp_path), log=lambda m: None)
    with pytest.raises(experiment.ExperimentError, match=r"a\.json.*never ran the stage.*--rerun a"):
        experiment.run(config, **kw)
    assert (tmp_path / "results" / "a.json").read_text() == "committed by an older script" and not calls
    experiment.run(config, rerun=["a"], **kw)
    assert (tmp_path / "results" / "a.json").read_text() == "new"
    kept = glob.glob(str(tmp_path / "results" / "superseded" / "*" / "a.json"))
    assert len(kept) == 1 and open(kept[0]).read() == "committed by an older script"

    # a stage that started and stopped half-way resumes over its own partial outputs
    def half(ctx):
        with open(ctx.result_path("b.json"), "w") as f:
            f.write("partial")
        raise RuntimeError("stopped")

    stages_b = [experiment.Stage("b", half, settings=("seed",), outputs=("b.json",))]
    with pytest.raises(RuntimeError):
        experiment.run(config, stages=stages_b, **_dirs(tmp_path), log=lambda m: None)
    assert experiment.plan(config, stages_b, str(tmp_path / "results"))[0][1] == "run"


def test_a_training_stopped_before_its_first_checkpoint_is_set_aside_and_started_over(tmp_path):
    # The stage writes training history (metrics.jsonl) and dies before any checkpoint: jaxnoise.train refuses such
    # a workdir, so the runner moves it to <work>/stale/ (kept) and the next run trains from step 0.
    calls = []

    def run(ctx):
        train_dir = ctx.work_path("train")
        os.makedirs(train_dir, exist_ok=True)
        seen = os.path.exists(os.path.join(train_dir, "metrics.jsonl"))
        calls.append(seen)
        with open(os.path.join(train_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"type": "train", "step": 10, "loss": 1.0}) + "\n")
        if len(calls) == 1:
            raise RuntimeError("killed before the first checkpoint")
        with open(ctx.result_path("out.txt"), "w") as f:
            f.write("done")
        return {}

    config = experiment.apply_overrides(experiment.load_config(Q4), ["tiny=True"])
    kw = dict(stages=[experiment.Stage("a", run, settings=("seed",), outputs=("out.txt",))], **_dirs(tmp_path))
    with pytest.raises(RuntimeError, match="killed"):
        experiment.run(config, log=lambda m: None, **kw)
    logs = []
    experiment.run(config, log=logs.append, **kw)
    assert calls == [False, False]   # the second run started from an empty training dir
    assert any("no finished checkpoint" in m and "stale" in m for m in logs), logs
    kept = glob.glob(str(tmp_path / "work" / "stale" / "a-*-train-*" / "metrics.jsonl"))
    assert len(kept) == 1 and '"step": 10' in open(kept[0]).read()


def test_a_training_dir_with_a_checkpoint_is_left_to_resume(tmp_path):
    stage_dir = tmp_path / "work" / "a-0123"
    train_dir = stage_dir / "train"
    train_dir.mkdir(parents=True)
    (train_dir / "metrics.jsonl").write_text(json.dumps({"type": "train", "step": 10}) + "\n")
    checkpoint.save(str(train_dir / "checkpoints"), 10, {"w": np.zeros(3, np.float32)})
    assert experiment.set_aside_unresumable(str(stage_dir), str(tmp_path / "work")) == []
    assert (train_dir / "metrics.jsonl").exists()


def test_a_follow_up_reuses_the_stages_whose_settings_match(tmp_path):
    """reuse_from: a stage with the same settings in the other experiment is copied (its record says from where),
    one with other settings runs; the other experiment's files are untouched."""
    config = _tiny()
    stages = _light_stages()
    source = tmp_path / config.name / "results"   # the tiny layout, runs/tiny/<name>/results
    experiment.run(config, stages, results_dir=str(source), work_dir=str(tmp_path / config.name / "work"),
                   log=lambda m: None)
    before = {p: open(p, "rb").read() for p in glob.glob(str(source / "**" / "*"), recursive=True)
              if os.path.isfile(p)}
    follow = experiment.apply_overrides(config, ["name=follow_up", "eval.n_chips=4"])
    follow.reuse_from = config.name
    results = tmp_path / "follow_up" / "results"
    assert [a for _, a in experiment.plan(follow, stages, str(results))] == ["reuse", "run"]   # what --list shows
    logs = []
    experiment.run(follow, stages, results_dir=str(results), work_dir=str(tmp_path / "follow_up" / "work"),
                   log=logs.append)
    assert any(f"qat: reused from {config.name}" in m for m in logs), logs
    assert any("eval_qat: running" in m for m in logs), logs
    assert (results / "weights" / "qat.npz").read_bytes() == (source / "weights" / "qat.npz").read_bytes()
    record = experiment.read_record(str(results), "qat")
    assert record["reused_from"] == config.name and record["experiment"] == "follow_up"
    assert {p: open(p, "rb").read() for p in before} == before   # the source is untouched
    logs = []
    experiment.run(follow, stages, results_dir=str(results), work_dir=str(tmp_path / "follow_up" / "work"),
                   log=logs.append)
    assert all("cached" in m for m in logs), logs
