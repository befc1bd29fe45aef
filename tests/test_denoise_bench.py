"""Smoke test of benchmarks/denoise_train_step.py: both formulations of the frozen-backbone step train the same
blocks (the benchmark's own check), and it prints both timings."""

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
