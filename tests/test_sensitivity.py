"""Tests of jaxnoise.sensitivity: per-layer maps as one compiled program, masks as data, result files."""

import json
import subprocess
import sys

import numpy as np
import pytest

from jaxnoise import noise, robustness, sensitivity


@pytest.fixture(scope="module")
def setup(trained_digits_cnn, digits):
    model, variables, ref = trained_digits_cnn
    x, y = digits.test.images[:120], digits.test.labels[:120]
    return model, variables, ref, x, y, digits.preprocess


def test_weight_map_equals_single_layer_evaluations(setup):
    model, variables, _, x, y, pre = setup
    kw = dict(key=3, n_chips=3, batch_size=60, preprocess=pre)
    smap = sensitivity.sensitivity_map(model, variables, x, y, noise="weight", scales=[0.1, 0.3], **kw)
    assert smap.layers == ("conv1", "conv2", "conv3", "head")  # forward order
    assert smap.mean.shape == (4, 2) and smap.ci95.shape == (4, 2, 2)
    paths = model.weight_noise_paths
    for li, layer in enumerate(smap.layers):
        mask = {p: float(p == f"{layer}/kernel") for p in paths}
        ref = robustness.evaluate(model, variables, x, y, noise.NoiseSpec(weight_eta=0.3, weight_mask=mask), **kw)
        np.testing.assert_allclose(smap.results[li][1].per_chip, ref.per_chip)
    everywhere = robustness.evaluate(model, variables, x, y, noise.NoiseSpec(weight_eta=0.3), **kw)
    np.testing.assert_allclose(smap.all_layers[1].per_chip, everywhere.per_chip)
    clean = robustness.evaluate(model, variables, x, y, batch_size=60, preprocess=pre)
    assert smap.clean_accuracy == clean.mean
    # Noise at one layer hurts less than everywhere, on average over layers.
    assert smap.mean[:, 1].mean() > smap.all_layers[1].mean


def test_map_compiles_once_for_any_scales_and_layers(setup):
    model, variables, _, x, y, pre = setup
    kw = dict(key=0, n_chips=2, batch_size=60, preprocess=pre)
    sensitivity.sensitivity_map(model, variables, x, y, noise="weight", scales=[0.1, 0.2], **kw)
    before = robustness.trace_count()
    smap = sensitivity.sensitivity_map(model, variables, x, y, noise="weight", scales=[0.05, 0.4], **kw)
    assert robustness.trace_count() == before  # new scales: same program (masks and scales are data)
    assert smap.mean[:, 1].mean() < smap.mean[:, 0].mean()


def test_activation_map_additive_needs_reference(setup):
    model, variables, ref, x, y, pre = setup
    kw = dict(key=1, n_chips=2, batch_size=60, preprocess=pre, scales=[0.5])
    with pytest.raises(ValueError, match="calibrate_activations"):
        sensitivity.sensitivity_map(model, variables, x, y, noise="activation",
                                    spec=noise.NoiseSpec(weight_kind=None, act_kind="additive"), **kw)
    spec = noise.NoiseSpec(weight_kind=None, act_kind="additive", act_ref=ref)
    smap = sensitivity.sensitivity_map(model, variables, x, y, noise="activation", spec=spec,
                                       layers=["conv1", "head"], **kw)
    assert smap.layers == ("conv1", "head") and smap.kind == "additive"
    single = robustness.evaluate(model, variables, x, y, spec.replace(act_eta=0.5, act_mask={
        s: float(s == "head") for s in model.sites}), key=1, n_chips=2, batch_size=60, preprocess=pre)
    np.testing.assert_allclose(smap.results[1][0].per_chip, single.per_chip)


def test_bad_inputs_name_the_fix(setup):
    model, variables, _, x, y, pre = setup
    kw = dict(key=0, n_chips=2, preprocess=pre)
    with pytest.raises(ValueError, match="choose from"):
        sensitivity.sensitivity_map(model, variables, x, y, scales=[0.1], layers=["nope"], **kw)
    with pytest.raises(ValueError, match="noise="):
        sensitivity.sensitivity_map(model, variables, x, y, noise="both", scales=[0.1], **kw)
    with pytest.raises(ValueError, match="empty"):
        sensitivity.sensitivity_map(model, variables, x, y, scales=[], **kw)
    with pytest.raises(ValueError, match="scales"):
        sensitivity.sensitivity_map(model, variables, x, y, scales=[-0.1], **kw)


def test_record_markdown_and_heatmap(setup, tmp_path):
    model, variables, _, x, y, pre = setup
    smap = sensitivity.sensitivity_map(model, variables, x, y, scales=[0.1, 0.3], key=0, n_chips=3,
                                       batch_size=60, preprocess=pre)
    record = smap.to_record("sens_test", "pytest", {"name": "digits", "split": "test", "n_images": len(y)},
                            param_count=model.param_count(variables))
    names = [a["name"] for a in record["arms"]]
    assert names == [*smap.layers, sensitivity.ALL_LAYERS]
    e = record["arms"][0]["eval"][1]
    assert e["weight_noise"]["eta"] == pytest.approx(0.3) and e["weight_noise"]["mask_layer"] == "conv1"
    assert e["mean"] == pytest.approx(smap.mean[0, 1])
    path = tmp_path / "results.json"
    from jaxnoise import report
    report.write_json(path, record)
    check = subprocess.run([sys.executable, "../shared/check_results.py", str(path)], capture_output=True, text=True)
    if "No such file" not in check.stderr:
        assert check.returncode == 0, check.stdout + check.stderr
    md = smap.to_markdown()
    assert md.count("\n| ") == len(smap.layers) + 1  # one row per layer and the all-layers row
    assert "conv2" in md and "Clean accuracy" in md
    fig = smap.plot(str(tmp_path / "heat.png"))
    assert (tmp_path / "heat.png").stat().st_size > 1000
    assert len(fig.axes[0].texts) == 4 * 2
    assert json.loads(path.read_text())["sensitivity"]["layers"] == list(smap.layers)
    assert smap.ranking()[0][1] == smap.mean[:, -1].min()


def test_one_chip_maps_have_no_interval_and_render(tmp_path):
    """With one chip per cell ``ci95`` is None: the table says so, ``ci95`` is NaN, the heatmap still draws."""
    one = robustness.MCResult.from_per_chip
    weight = noise.NoiseSpec(weight_eta=0.1).describe()
    smap = sensitivity.SensitivityMap(
        noise="weight", kind="additive_rel_max", layers=("conv1", "head"), scales=np.array([0.1]),
        results=[[one([0.8], 50, weight)], [one([0.6], 50, weight)]], all_layers=[one([0.5], 50, weight)],
        clean=one([0.9], 50), model="cnn")
    assert np.isnan(smap.ci95).all() and smap.ci95.shape == (2, 1, 2)
    md = smap.to_markdown()
    assert "80.00 (1 chip: no CI)" in md and "None" not in md
    smap.plot(str(tmp_path / "heat.png"))
    assert (tmp_path / "heat.png").stat().st_size > 1000
