"""tools/aihwkit_network_check.py's input checks and run splitting, without aihwkit (the run itself needs the peer
venv: the tool's docstring). A results file may gain a preset run later with the same settings; a preset already
there, or other settings, is refused with one line before anything runs."""

import importlib.util
import json
import os
import sys

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                     "aihwkit_network_check.py")
_spec = importlib.util.spec_from_file_location("aihwkit_network_check", _PATH)
netcheck = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = netcheck
_spec.loader.exec_module(netcheck)


def _args(out, *extra):
    return netcheck.parse_args(["--chips", "2", "--images", "64", "--times", "1 s,1 day", "--out", str(out), *extra])


def _write(out, presets, chips=2):
    out.mkdir(exist_ok=True)
    record = {"chips": chips, "images": 64, "seed": 0, "times": {"1 s": 1.0, "1 day": 86400.0},
              "presets": {p: {"rows": {}} for p in presets}}
    (out / "results.json").write_text(json.dumps(record))
    return record


def test_a_new_out_starts_a_fresh_record(tmp_path):
    args = _args(tmp_path / "new")
    assert args.previous is None and args.presets.split(",") == list(netcheck.PRESETS)


def test_a_preset_is_added_to_a_record_with_the_same_settings(tmp_path):
    record = _write(tmp_path / "r", ["aihwkit_inference_default"])
    args = _args(tmp_path / "r", "--presets", "hwa_standard")
    assert args.previous == record


def test_a_preset_already_in_the_record_is_refused_unless_forced(tmp_path, capsys):
    _write(tmp_path / "r", ["aihwkit_inference_default"])
    with pytest.raises(SystemExit):
        _args(tmp_path / "r", "--presets", "aihwkit_inference_default")
    assert "already holds ['aihwkit_inference_default']" in capsys.readouterr().err
    assert _args(tmp_path / "r", "--presets", "aihwkit_inference_default", "--force").previous is not None


def test_other_settings_are_refused_unless_forced_then_start_fresh(tmp_path, capsys):
    _write(tmp_path / "r", ["aihwkit_inference_default"], chips=16)
    with pytest.raises(SystemExit):
        _args(tmp_path / "r", "--presets", "hwa_standard")
    assert "holds a run with other settings" in capsys.readouterr().err
    assert _args(tmp_path / "r", "--presets", "hwa_standard", "--force").previous is None


@pytest.mark.parametrize("flag, value", [("--times", "1 week"), ("--presets", "aihwkit_default")])
def test_unknown_times_and_presets_are_refused(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit):
        netcheck.parse_args(["--out", str(tmp_path), flag, value])
    assert "unknown" in capsys.readouterr().err


def test_quick_writes_to_a_temporary_folder_not_the_results(tmp_path):
    args = netcheck.parse_args(["--quick", "--out", str(tmp_path)])
    assert (args.chips, args.images) == (2, 64) and not args.out.startswith(str(tmp_path))
    os.rmdir(args.out)


def test_the_record_is_in_the_shared_format_with_an_arm_per_simulator_and_preset():
    rows = {"1 s": {"aihwkit": [0.7, 0.72], "jaxnoise": [0.71, 0.73]}}
    results = {"chips": 2, "images": 64, "seed": 0, "times": {"1 s": 1.0},
               "presets": {"aihwkit_inference_default": {"rows": rows, "log": ["$ python tools/x.py --chips 2"]}}}
    record = netcheck.shared_record(results)
    for field in ("experiment", "command", "git_commit", "dataset", "arms"):
        assert field in record, field
    assert record["chips"] == 2 and record["presets"] == results["presets"], "the tool's own fields are kept"
    assert [a["name"] for a in record["arms"]] == ["aihwkit/aihwkit_inference_default",
                                                   "jaxnoise/aihwkit_inference_default"]
    entry = record["arms"][1]["eval"][0]
    assert entry["per_chip"] == [0.71, 0.73] and abs(entry["mean"] - 0.72) < 1e-12 and entry["n_images"] == 64
    assert entry["weight_noise"]["kind"] == "device:aihwkit_inference_default"
