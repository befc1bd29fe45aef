"""BatchNorm recalibration after drift (``robustness.evaluate_analog(recalibrate="batch_norm")``): the statistics
are those of the calibration images through the chip, nothing else; at 1 year they restore the accuracy drift
took; errors. aihwkit has no such feature."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnoise import analog as analog_lib
from jaxnoise import data, robustness
from jaxnoise.models import get_model


@pytest.fixture(scope="module")
def small_cnn():
    model = get_model("cnn", input_shape=(8, 8, 1), num_classes=10, channels=(4, 4))
    return model, model.init(jax.random.key(0))


def test_recalibrated_statistics_are_the_calibration_images_own(small_cnn, digits):
    """Through an exact chip (a device that changes nothing), the first BatchNorm's statistics are the mean and
    unbiased variance of conv1's outputs on the calibration images; evaluating with them equals the clean
    evaluation of the model holding those statistics: the test images play no part in them."""
    model, variables = small_cnn
    calib = data.calibration_images(digits.train, n=64, seed=0)
    exact = analog_lib.AnalogSpec(name="exact")
    chip = model.sample_chip(jax.random.key(2), variables["params"], None, exact).read(0.0, jax.random.key(1))
    calib_b = jnp.asarray(calib.reshape((2, 32) + calib.shape[1:]))
    stats = robustness.recalibrated_batch_stats(model, variables, chip, calib_b, jax.random.key(3),
                                                preprocess=digits.preprocess)
    y = np.asarray(model.apply(variables, digits.preprocess(jnp.asarray(calib)), capture_mvm=True).captured.outputs["conv1"],
                   np.float64).reshape(2, -1, 4)
    np.testing.assert_allclose(stats["bn1"]["mean"], y.mean(axis=1).mean(axis=0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["bn1"]["var"], y.var(axis=1, ddof=1).mean(axis=0), rtol=1e-4)
    x, labels = digits.test.images[:100], digits.test.labels[:100]
    recal = robustness.evaluate_analog(model, variables, x, labels, exact, times=[0.0], key=0, n_chips=2,
                                       preprocess=digits.preprocess, recalibrate="batch_norm",
                                       calibration_images=calib, calibration_batch_size=32)[0]
    clean = robustness.evaluate(model, dict(variables, batch_stats=stats), x, labels, None,
                                preprocess=digits.preprocess)
    assert recal.per_chip.tolist() == [clean.mean, clean.mean]
    assert recal.noise["recalibration"] == {"method": "batch_norm", "n_images": 64, "batch_size": 32,
                                            "split": "train"}


@pytest.mark.slow  # ~60 s on a loaded 2-core machine (the session's trained CNN, two device programs)
def test_recalibration_restores_accuracy_after_a_year_of_drift(trained_digits_cnn, digits):
    """aihwkit_inference_default without compensation at 1 year: drift costs most of the accuracy; BatchNorm
    recalibration on 256 training images brings every chip (the same chips, paired) back near the 1 s accuracy;
    at 1 s it changes little (the statistics of 256 images instead of the training run's)."""
    model, variables, _ = trained_digits_cnn
    spec = analog_lib.preset("aihwkit_inference_default").replace(compensation=None)
    x, labels = digits.test.images[:200], digits.test.labels[:200]
    kw = dict(times=[1.0, 3.15e7], key=0, n_chips=3, preprocess=digits.preprocess, batch_size=100)
    plain = robustness.evaluate_analog(model, variables, x, labels, spec, **kw)
    recal = robustness.evaluate_analog(model, variables, x, labels, spec, recalibrate="batch_norm",
                                       calibration_images=data.calibration_images(digits.train, n=256, seed=0), **kw)
    assert np.all(recal[1].per_chip > plain[1].per_chip + 0.3), (plain[1].per_chip, recal[1].per_chip)
    assert recal[1].mean > plain[0].mean - 0.1
    assert abs(recal[0].mean - plain[0].mean) < 0.03


def test_recalibration_errors_are_named(small_cnn, digits):
    model, variables = small_cnn
    x, labels = digits.test.images[:10], digits.test.labels[:10]
    spec = analog_lib.AnalogSpec(name="exact")
    calib = data.calibration_images(digits.train, n=30, seed=0)

    def run(m=model, v=variables, **kw):
        return robustness.evaluate_analog(m, v, x, labels, spec, times=[0.0], key=0, n_chips=1,
                                          preprocess=digits.preprocess, **kw)

    with pytest.raises(ValueError, match="needs calibration_images"):
        run(recalibrate="batch_norm")
    with pytest.raises(ValueError, match="count only with recalibrate='batch_norm'"):
        run(calibration_images=calib)
    with pytest.raises(ValueError, match="recalibrate='adabn': choose one of"):
        run(recalibrate="adabn", calibration_images=calib)
    with pytest.raises(ValueError, match="do not split into batches of 7"):
        run(recalibrate="batch_norm", calibration_images=calib, calibration_batch_size=7)
    with pytest.raises(ValueError, match="calibration_images have shape"):
        run(recalibrate="batch_norm", calibration_images=np.zeros((4, 5, 5, 1), np.uint8))
    mlp = get_model("mlp", input_shape=(8, 8, 1), num_classes=10)
    with pytest.raises(ValueError, match="mlp has no BatchNorm statistics"):
        run(mlp, mlp.init(jax.random.key(0)), recalibrate="batch_norm", calibration_images=calib)


def test_cli_calibration_images_needs_recalibrate(capsys):
    from jaxnoise import cli
    assert cli.main(["eval", "--model", "cnn", "--analog", "aihwkit_inference_default",
                     "--calibration-images", "64"]) == 2
    assert "--calibration-images" in capsys.readouterr().err


@pytest.mark.slow  # ~40 s: trains a CNN for 3 steps, then a recalibrated device evaluation from the command line
def test_cli_recalibrate_records_its_training_images(tmp_path):
    import json

    from jaxnoise import cli
    run = tmp_path / "run"
    assert cli.main(["train", "--model", "cnn", "--epochs", "1", "--max-steps", "3", "--workdir", str(run)]) == 0
    out = tmp_path / "eval"
    assert cli.main(["eval", "--checkpoint", str(run), "--analog", "aihwkit_inference_default", "--times", "3.15e7",
                     "--recalibrate", "batch_norm", "--calibration-images", "64", "--n-chips", "1",
                     "--n-images", "30", "--out", str(out)]) == 0
    entry = json.loads((out / "results.json").read_text())["arms"][0]["eval"][0]
    assert entry["recalibration"] == {"method": "batch_norm", "n_images": 64, "batch_size": 64, "split": "train"}
