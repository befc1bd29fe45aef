"""The curated top-level API: every exported name resolves to the object of its module, unknown names say where
to look, and the package docstring's examples run (doctest)."""

import doctest
import importlib
import subprocess
import sys

import pytest

import jaxnoise


def test_every_exported_name_is_the_module_object():
    for name in jaxnoise.__all__:
        value = getattr(jaxnoise, name)
        target = jaxnoise._EXPORTS.get(name)
        if target is None:
            continue   # defined in the package itself (jaxnoise.key)
        module, attr = target if isinstance(target, tuple) else (target, name)
        assert value is getattr(importlib.import_module(module), attr), name
    assert set(jaxnoise.__all__) <= set(dir(jaxnoise))


def test_no_exported_name_shadows_a_submodule():
    import pkgutil
    submodules = {m.name for m in pkgutil.iter_modules(jaxnoise.__path__)}
    assert not set(jaxnoise.__all__) & submodules   # `from jaxnoise import train` must stay the module


def test_unknown_name_points_to_the_submodules():
    with pytest.raises(AttributeError, match="jaxnoise.__all__"):
        jaxnoise.no_such_thing   # noqa: B018


def test_importing_the_package_loads_no_submodule():
    code = "import sys, jaxnoise; print(sorted(m for m in sys.modules if m.startswith('jaxnoise.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# Modules whose docstring examples are complete programs (the others show fragments).
DOCTESTED = ("jaxnoise", "jaxnoise.methods", "jaxnoise.engine", "jaxnoise.analog")


@pytest.mark.parametrize("name", DOCTESTED)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, raise_on_error=False, verbose=False)
    assert result.attempted >= 3 and result.failed == 0, result
