"""The standing layer-level cross-check against IBM aihwkit (issue 18): tools/aihwkit_crosscheck.py under pytest.

One dense and one conv layer, each non-ideality alone and all together, 1,000 draws per side; the statistics and
their tolerances (from the sample sizes, with aihwkit's finite list of normals) are described in the tool's
docstring. Skipped unless torch and aihwkit 1.2.0 are importable (they are not in the project's venv or CI); run it
in the peer venv (benchmarks/peer_torch.py says how to make one):

  PYTHONPATH=. <peer venv>/bin/python -m pytest -q tests/test_aihwkit_crosscheck.py
"""

import importlib.util
import os
import sys

import pytest
from _helpers import require_aihwkit

torch = require_aihwkit("the aihwkit cross-check", __file__)

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "aihwkit_crosscheck.py")
_spec = importlib.util.spec_from_file_location("aihwkit_crosscheck", _PATH)
crosscheck = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = crosscheck   # its dataclasses look their module up
_spec.loader.exec_module(crosscheck)


@pytest.mark.parametrize("cfg, layer", [pytest.param(c, layer, id=f"{layer}-{c.name}")
                                        for c in crosscheck.CONFIGS for layer in c.layers])
def test_layer_statistics_agree_with_aihwkit(cfg, layer):
    torch.set_num_threads(1)
    result = crosscheck.compare(cfg, layer, crosscheck.DRAWS)
    assert result.passed, result.line
