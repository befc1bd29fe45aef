"""Smoke test of benchmarks/peer_torch.py (the jaxnoise vs PyTorch peer benchmark).

torch is optional: without it (the default test venv) the script must print how to install it and exit 0 having run
nothing; with it, a tiny clean-eval run must pass its same-network check and print a ratio.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "peer_torch.py")
HAS_TORCH = importlib.util.find_spec("torch") is not None


def _run(*args, timeout):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.timeout(600)
def test_peer_bench_help_and_quick_run():
    r = _run("--help", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--jobs" in r.stdout and "--quick" in r.stdout
    if not HAS_TORCH:
        r = _run("--quick", "--jobs", "clean", "--n-images", "64", timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "pip install torch==2.14.1" in r.stdout and "ran nothing" in r.stdout
        assert "aihwkit-1.2.0" in r.stdout and "pip install -e ." in r.stdout
        return
    r = _run("--quick", "--jobs", "clean", "--n-images", "64", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "argmax agrees on" in r.stdout
    assert "clean eval" in r.stdout and "jaxnoise/PyTorch" in r.stdout
