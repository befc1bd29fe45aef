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


def test_old_public_names_warn_and_resolve_to_the_new_ones():
    import jaxnoise as jn
    from jaxnoise import robustness
    for old, new in [("device_preset", "analog_preset"), ("evaluate_device", "evaluate_analog")]:
        assert old not in jn.__all__ and new in jn.__all__
        with pytest.warns(DeprecationWarning, match=rf"jaxnoise.{old} is deprecated: use jaxnoise.{new}"):
            assert getattr(jn, old) is getattr(jn, new)
    assert jn.analog_preset is analog.preset
    assert robustness.evaluate_device is robustness.evaluate_analog
    assert robustness.MonteCarlo.evaluate_device is robustness.MonteCarlo.evaluate_analog


def test_old_cli_flag_names_parse_to_the_same_values_and_are_hidden():
    from jaxnoise import cli
    parser = cli.build_parser()
    base = ["train", "--model", "mlp", "--method", "forward_noise"]
    new = parser.parse_args([*base, "--train-analog", "hwa_standard", "--n-draws", "3"])
    old = parser.parse_args([*base, "--train-device", "hwa_standard", "--num-draws", "3"])
    assert vars(new) == vars(old)   # same dests: the default work dir (hashed from them) is unchanged
    assert new.train_device == "hwa_standard" and new.num_draws == 3
    helptext = parser.commands["train"].format_help()
    assert "--train-analog" in helptext and "--n-draws" in helptext
    assert "--train-device" not in helptext and "--num-draws" not in helptext


def test_old_keyword_num_draws_warns_and_builds_the_same_loss():
    from jaxnoise import methods
    from jaxnoise.models import get_model
    model = get_model("mlp", input_shape=(8, 8, 1), num_classes=10)
    for factory in (methods.forward_noise, methods.consistency):
        with pytest.warns(DeprecationWarning, match=r"\(num_draws=\.\.\.\) is deprecated: use n_draws="):
            old = factory(model, eta_train=0.1, num_draws=2)
        assert old.config == factory(model, eta_train=0.1, n_draws=2).config
        assert old.config["num_draws"] == 2   # the recorded key keeps its name (committed results compare)
        with pytest.raises(TypeError, match="got both num_draws= and n_draws="):
            factory(model, num_draws=2, n_draws=2)
