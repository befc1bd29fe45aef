"""Test configuration: every test runs with JAX's key-reuse checker on."""

import os

import jax
import pytest

jax.config.update("jax_debug_key_reuse", True)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _run_from_repo_root(monkeypatch):
    """Relative defaults (``../shared/tfds``) resolve the same whatever directory pytest was started from."""
    monkeypatch.chdir(REPO_ROOT)
