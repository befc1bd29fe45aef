"""Test configuration: every test runs with JAX's key-reuse checker on."""

import os
import tempfile

import jax
import pytest

jax.config.update("jax_debug_key_reuse", True)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _run_from_repo_root(monkeypatch):
    """Relative defaults (``../shared/tfds``) resolve the same whatever directory pytest was started from."""
    monkeypatch.chdir(REPO_ROOT)


@pytest.fixture(scope="session")
def digits():
    """The embedded digits dataset (shared by every test module)."""
    from jaxnoise.data import load_dataset
    return load_dataset("digits")


@pytest.fixture(scope="session")
def trained_digits_cnn(digits):
    """A CNN trained clean on digits (~98%) and its activation reference scales: ``(model, variables, ref)``.

    Trained once per session; tests must not modify the returned arrays (jax arrays are immutable)."""
    from jaxnoise import noise, train
    from jaxnoise.models import get_model
    model = get_model("cnn", input_shape=digits.image_shape, num_classes=10)
    with tempfile.TemporaryDirectory() as workdir:
        variables, _ = train.train(model, digits, train.TrainConfig(epochs=15, batch_size=64, learning_rate=0.05),
                                   workdir=workdir, progress=False)
    ref = noise.calibrate_activations(model.apply, variables, digits.preprocess(digits.train.images[:512]))
    return model, variables, ref


@pytest.fixture(scope="session")
def mock_imagenet(tmp_path_factory):
    """A TFDS data dir holding a prepared mock ``imagenet2012`` (64 train / 32 validation random JPEGs of 40-96 px,
    10 of the 1000 classes used), written by ``jaxnoise.stream.write_mock_tfds``: the real builder's format."""
    from jaxnoise import stream
    root = tmp_path_factory.mktemp("tfds")
    stream.write_mock_tfds(root)
    return str(root)
