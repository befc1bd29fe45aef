"""Tests of result records (jaxnoise.report): format, validation by ../shared/check_results.py, table, plot."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxnoise import noise, report
from jaxnoise.robustness import MCResult

CHECKER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared",
                       "check_results.py")
ETAS = [0.0, 0.1, 0.2]
N_IMAGES = 200


def _results(offset, rng):
    """Clean result plus a weight-noise sweep, built from per-chip accuracies (no model needed)."""
    out = [MCResult.from_per_chip([0.9 - offset], N_IMAGES)]
    for eta in ETAS:
        per_chip = np.clip(0.9 - offset - eta + rng.normal(0, 0.01 + eta / 10, 8), 0, 1)
        out.append(MCResult.from_per_chip(per_chip, N_IMAGES, noise.NoiseSpec(weight_eta=eta).describe()))
    return out


@pytest.fixture
def record():
    rng = np.random.default_rng(0)
    arms = [report.arm("clean", "mlp", "clean", 1000, _results(0.0, rng)),
            report.arm("forward_noise", "mlp", "forward_noise", 1000, _results(0.05, rng),
                       train={"eta_train": 0.1, "epochs": 3, "seed": 0})]
    return report.result_record("unit_test_sweep", "pytest tests/test_report.py", arms,
                                {"name": "digits", "split": "test", "n_images": N_IMAGES})


def test_record_fields(record):
    assert record["git_commit"] != "" and record["created"].endswith("Z") and record["device"]
    assert len(record["git_commit"]) == 40 or record["git_commit"] == "unknown"
    assert record["arms"][1]["train"]["eta_train"] == 0.1 and record["arms"][0]["extra_param_count"] == 0
    entry = record["arms"][0]["eval"][0]
    assert entry["weight_noise"] is None and entry["activation_noise"] is None and entry["n_chips"] == 1
    assert record["arms"][0]["eval"][2]["weight_noise"] == {"kind": "additive_rel_max", "eta": 0.1}
    fixed = report.result_record("e", "c", [], {"name": "d", "split": "test", "n_images": 1}, device="x",
                                 git_commit="abc", created="2026-01-01T00:00:00Z")
    assert (fixed["device"], fixed["git_commit"], fixed["created"]) == ("x", "abc", "2026-01-01T00:00:00Z")


def test_written_json_passes_check_results(record, tmp_path):
    path = report.write_json(tmp_path / "sub" / "dir" / "result.json", record)
    assert os.path.exists(path) and not [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".tmp")]
    with open(path) as f:
        assert json.load(f) == json.loads(json.dumps(record))
    out = subprocess.run([sys.executable, CHECKER, path], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "forward_noise" in out.stdout
    cmp = subprocess.run([sys.executable, CHECKER, path, "--compare", "clean", "forward_noise"],
                         capture_output=True, text=True)
    assert cmp.returncode == 0 and "weight eta=0.2" in cmp.stdout, cmp.stdout


def test_check_results_catches_a_corrupted_file(record, tmp_path):
    record["arms"][0]["eval"][1]["mean"] += 0.1
    path = report.write_json(tmp_path / "bad.json", record)
    out = subprocess.run([sys.executable, CHECKER, path], capture_output=True, text=True)
    assert out.returncode == 1 and "differs from mean of per_chip" in out.stdout


def test_write_json_is_atomic_and_refuses_nan(tmp_path):
    path = tmp_path / "r.json"
    report.write_json(path, {"a": np.float32(1.5), "b": np.arange(3)})
    assert json.loads(path.read_text()) == {"a": 1.5, "b": [0, 1, 2]}
    with pytest.raises(ValueError):
        report.write_json(path, {"a": float("nan")})
    assert json.loads(path.read_text()) == {"a": 1.5, "b": [0, 1, 2]}  # old file intact
    assert sorted(os.listdir(tmp_path)) == ["r.json"]                  # no temporary left behind


def test_markdown_table_has_a_row_per_setting(record):
    md = report.markdown_table(record)
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| arm")]
    assert len(rows) == 2 * (1 + len(ETAS))
    clean_row = rows[0].split("|")
    assert clean_row[3].strip() == "off" and clean_row[5].strip() == "1" and clean_row[6].strip() == "90.00"
    assert "| forward_noise | forward_noise | 0.2 | off | 8 |" in md
    assert "additive_rel_max" in md.splitlines()[0]


def test_plot_sweep_writes_png(record, tmp_path):
    path = report.plot_sweep(record, tmp_path / "plots" / "sweep.png")
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 5000
    with pytest.raises(ValueError, match="no entries with activation noise"):
        report.plot_sweep(record, tmp_path / "act.png", noise="activation")


def test_bad_records_are_rejected():
    r = MCResult.from_per_chip([0.5], 10)
    with pytest.raises(ValueError, match="no evaluations"):
        report.arm("a", "mlp", "clean", 1, [])
    with pytest.raises(ValueError, match="unique"):
        report.result_record("e", "c", [report.arm("a", "mlp", "clean", 1, [r])] * 2,
                             {"name": "d", "split": "test", "n_images": 10})
    with pytest.raises(ValueError, match="n_images=20"):
        report.result_record("e", "c", [report.arm("a", "mlp", "clean", 1, [r])],
                             {"name": "d", "split": "test", "n_images": 20})
    with pytest.raises(ValueError, match="dataset needs"):
        report.result_record("e", "c", [], {"name": "d"})
