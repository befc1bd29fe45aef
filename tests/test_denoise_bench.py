"""Smoke tests of benchmarks/denoise_train_step.py (both formulations of the frozen-backbone step train the same
blocks: the benchmark's own check; it prints both timings) and benchmarks/denoise_cost.py (a plan row per network)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow   # two ResNet-20 train-step compilations, ~30 s
def test_denoise_train_step_benchmark_quick_run_trains_the_same_blocks_both_ways():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "denoise_train_step.py"), "--quick"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "frozen inside grad (now)" in r.stdout and "frozen after grad (before)" in r.stdout
    diff = float(re.search(r"max \|blocks now - blocks before\| after \d+ steps: (\S+)", r.stdout).group(1))
    assert diff < 1e-5, r.stdout


@pytest.mark.slow   # a ResNet-20 train step and an evaluation compiled, ~40 s
def test_denoise_cost_benchmark_quick_run_prints_a_plan_row_per_network():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "denoise_cost.py"), "--quick"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("| resnet20 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:3] == ["9", "2.39%"]                 # blocks after the 9 residual blocks, the ablation's budget
    step_ms, epoch_min = float(cells[3]), float(cells[4])
    assert epoch_min == pytest.approx(step_ms / 1000 * 3063 / 60, rel=0.02, abs=0.06)   # 49,000 / 16 = 3063 steps
    assert all(float(c) > 0 for c in cells[3:])
