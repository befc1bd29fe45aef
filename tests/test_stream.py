"""jaxnoise.stream: the grain pipeline over a mock imagenet2012 written in TFDS format by the tests themselves."""

import hashlib
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from jaxnoise import data, stream

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(mock_imagenet, **kw):
    return data.load_dataset("imagenet2012", data_dir=mock_imagenet, **{"resolution": 32, "workers": 0, **kw})


def test_mock_is_a_prepared_imagenet2012_and_streams(mock_imagenet):
    ds = _load(mock_imagenet)
    assert isinstance(ds, stream.StreamingDataset) and isinstance(ds, data.Dataset)
    assert ds.num_classes == 1000 and ds.image_shape == (32, 32, 3)
    assert (len(ds.train), len(ds.test), ds.train.split, ds.test.split) == (64, 32, "train", "validation")
    x = np.full((2, 32, 32, 3), 255, np.uint8)
    np.testing.assert_allclose(np.asarray(ds.preprocess(x))[0, 0, 0],
                               (1 - np.array(data.CIFAR_MEAN)) / np.array(data.CIFAR_STD), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(ds.augment(jax.random.key(0), x)), x)   # augmentation is in the workers


def test_train_order_is_the_in_memory_order_and_draws_are_per_record(mock_imagenet):
    ds = _load(mock_imagenet)
    key = jax.random.key(3)
    batches = list(ds.train.train_batches(key, 1, 16))
    order = data.batch_indices(jax.random.fold_in(key, 1), 64, 16)
    source = stream._data_source("imagenet2012", mock_imagenet, "train")
    assert len(batches) == 4
    for (images, labels), idx in zip(batches, order):
        assert images.shape == (16, 32, 32, 3) and images.dtype == np.uint8 and labels.dtype == np.int32
        np.testing.assert_array_equal(labels, [source[int(i)]["label"] for i in idx])
    again = list(ds.train.train_batches(key, 1, 16))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(batches, again))
    other = next(ds.train.train_batches(key, 2, 16))
    assert not np.array_equal(other[1], batches[0][1])
    # a resumed epoch starts at its batch; two processes read the two halves of every batch, with the same pixels
    resumed = list(ds.train.train_batches(key, 1, 16, first=2))
    assert len(resumed) == 2 and np.array_equal(resumed[0][0], batches[2][0])
    halves = [list(ds.train.train_batches(key, 1, 16, process_index=p, process_count=2)) for p in (0, 1)]
    for b, full in enumerate(batches):
        np.testing.assert_array_equal(np.concatenate([halves[0][b][0], halves[1][b][0]]), full[0])
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        next(ds.train.train_batches(key, 1, 16, process_count=3))


def test_worker_processes_give_the_same_batches(mock_imagenet):
    key = jax.random.key(0)
    inline = list(_load(mock_imagenet).train.train_batches(key, 0, 32))
    workers = list(_load(mock_imagenet, workers=2).train.train_batches(key, 0, 32))
    assert len(workers) == 2
    for a, b in zip(inline, workers):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def test_eval_batches_pad_mask_and_shard(mock_imagenet):
    ds = _load(mock_imagenet)
    batches = list(ds.test.eval_batches(10))
    assert [b for b, *_ in batches] == [0, 1, 2, 3]
    assert [int(v.sum()) for *_, v in batches] == [10, 10, 10, 2]
    np.testing.assert_array_equal(batches[3][1][2:], np.repeat(batches[3][1][1:2], 8, axis=0))   # last record
    mine = [list(ds.test.eval_batches(10, process_index=p, process_count=2)) for p in (0, 1)]
    assert [b for b, *_ in mine[0]] == [0, 2] and [b for b, *_ in mine[1]] == [1, 3]
    np.testing.assert_array_equal(mine[1][1][1], batches[3][1])
    held = ds.test.select(30, None)
    assert len(held) == 2 and held.description == "validation[30:32]"
    np.testing.assert_array_equal(held.materialize().images, batches[3][1][:2])
    a, b = data.holdout(ds.train, 8)
    assert (len(a), len(b), b.start) == (56, 8, 56)
    calib = data.calibration_images(ds.train, n=5, seed=0)
    idx = np.sort(np.random.default_rng(0).choice(64, size=5, replace=False))
    np.testing.assert_array_equal(calib, ds.train.materialize(idx).images)


def test_eval_transform_resizes_the_short_side_and_crops_the_centre():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 80, 3), dtype=np.uint8)
    out = stream.eval_transform(img, 32)
    resized = np.asarray(Image.fromarray(img).resize((74, 37), Image.BILINEAR))   # 37 = round(32 / 0.875), 74 = 37 * 2
    top, left = round((37 - 32) / 2), round((74 - 32) / 2)
    np.testing.assert_array_equal(out, resized[top:top + 32, left:left + 32])
    square = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(stream.eval_transform(square, 32, crop_fraction=1.0), square)


def test_random_resized_crop_shapes_flips_and_fallback():
    img = np.tile(np.arange(64, dtype=np.uint8)[None, :, None], (48, 1, 3))   # columns increase left to right
    flips = 0
    for i in range(200):
        out = stream.random_resized_crop(img, np.random.default_rng(i), 24)
        assert out.shape == (24, 24, 3) and out.dtype == np.uint8
        flips += int(out[0, 0, 0]) > int(out[0, -1, 0])
    assert 70 < flips < 130   # a fair coin (200 draws: +-4 sigma)

    class NeverFits:   # every try fails: the centre crop at the nearest allowed aspect ratio
        def uniform(self, lo, hi):
            return hi if lo > 0.5 or lo < 0 else 10.0

        def integers(self, lo, hi):
            raise AssertionError("no random offset in the fallback")

        def random(self):
            return 0.9

    wide = np.tile(np.arange(200, dtype=np.uint8)[None, :, None], (20, 1, 3))
    out = stream.random_resized_crop(wide, NeverFits(), 16)
    ref = np.asarray(Image.fromarray(wide[:, 86:86 + 27]).resize((16, 16), Image.BILINEAR))   # w = round(20 * 4/3), (200 - 27) // 2
    np.testing.assert_array_equal(out, ref)


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.load_dataset("imagenet2012", data_dir=str(tmp_path / "none"))
    msg = str(e.value)
    assert "'imagenet2012' was not found" in msg and str(tmp_path / "none") in msg
    assert "tfds build imagenet2012 --manual_dir MANUAL_DIR --data_dir DIR --file_format array_record" in msg
    assert "ILSVRC2012_img_train.tar" in msg


def test_bad_options_are_refused_before_reading(mock_imagenet):
    with pytest.raises(ValueError, match="resolution=8 must be an integer >= 16"):
        _load(mock_imagenet, resolution=8)
    with pytest.raises(ValueError, match="workers=-1"):
        _load(mock_imagenet, workers=-1)
    with pytest.raises(TypeError, match="unknown options"):
        _load(mock_imagenet, size=3)
    with pytest.raises(NotImplementedError, match="streaming=True"):
        data.load_dataset("imagenet2012", data_dir=mock_imagenet, streaming=False)
    with pytest.raises(ValueError, match="cannot be streamed|not a TFDS dataset"):
        data.load_dataset("digits", streaming=True)


_CHILD = """
import hashlib, sys, jax, numpy as np
from jaxnoise import data
ds = data.load_dataset("imagenet2012", data_dir=sys.argv[1], resolution=32, workers=0)
h = hashlib.sha256()
for images, labels in ds.train.train_batches(jax.random.key(7), 0, 16):
    h.update(images.tobytes()); h.update(labels.tobytes())
for b, images, labels, valid in ds.test.eval_batches(16):
    h.update(images.tobytes()); h.update(labels.tobytes())
print(h.hexdigest())
"""


def test_two_processes_stream_the_same_batches(mock_imagenet):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    digests = [subprocess.run([sys.executable, "-c", _CHILD, mock_imagenet], capture_output=True, text=True, env=env,
                              cwd=REPO_ROOT, check=True, timeout=120).stdout.split()[-1] for _ in range(2)]
    ds = _load(mock_imagenet)
    h = hashlib.sha256()
    for images, labels in ds.train.train_batches(jax.random.key(7), 0, 16):
        h.update(images.tobytes())
        h.update(labels.tobytes())
    for _, images, labels, _valid in ds.test.eval_batches(16):
        h.update(images.tobytes())
        h.update(labels.tobytes())
    assert digests[0] == digests[1] == h.hexdigest()


@pytest.mark.cifar
def test_streamed_cifar10_equals_the_in_memory_copy():
    try:
        mem = data.load_dataset("cifar10")
    except data.DatasetNotFoundError:
        pytest.skip("no CIFAR-10 TFDS copy")
    ds = data.load_dataset("cifar10", streaming=True, resolution=32, crop_fraction=1.0, workers=0)
    assert ds.test.split == "test" and len(ds.test) == len(mem.test)
    b, images, labels, valid = next(ds.test.eval_batches(100))
    np.testing.assert_array_equal(images, mem.test.images[:100])
    np.testing.assert_array_equal(labels, mem.test.labels[:100])
