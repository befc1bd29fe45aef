"""``jaxnoise.device``, the old name of ``jaxnoise.analog`` (issue 19), still imports: with a DeprecationWarning,
``DeviceSpec`` is ``AnalogSpec`` and every name of the new module is there. The only import of the shim in the
repository is this test's."""

import importlib
import sys

import pytest

from jaxnoise import analog


def test_old_module_name_warns_and_aliases_the_new_one():
    sys.modules.pop("jaxnoise.device", None)   # a fresh import, so the warning is issued here
    with pytest.warns(DeprecationWarning, match=r"jaxnoise.device is now jaxnoise.analog; DeviceSpec is AnalogSpec"):
        old = importlib.import_module("jaxnoise.device")
    assert old.DeviceSpec is analog.AnalogSpec
    assert old.AnalogSpec is analog.AnalogSpec and old.preset is analog.preset and old.PRESETS is analog.PRESETS
    public = [n for n in vars(analog) if not n.startswith("_")]
    assert all(getattr(old, n) is getattr(analog, n) for n in public)
    assert old._normals is analog._normals   # private helpers too (old tests and notebooks used some)
    assert old.preset("hwa_standard") == analog.preset("hwa_standard")
    assert not hasattr(analog, "DeviceSpec")   # the alias lives only in the shim
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        old.no_such_name  # noqa: B018
