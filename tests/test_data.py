"""Tests for jaxnoise.data.

CIFAR-10 tests (marker ``cifar``) need a TFDS data dir holding cifar10 ($TFDS_DATA_DIR or ../shared/tfds).
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnoise import data

# --------------------------------------------------------------------------------------------------
# digits


def test_digits_shapes_dtypes_and_split():
    ds = data.load_dataset("digits")
    assert ds.name == "digits" and ds.num_classes == 10 and ds.image_shape == (8, 8, 1)
    assert ds.train.images.shape == (1347, 8, 8, 1) and ds.test.images.shape == (450, 8, 8, 1)
    for split in (ds.train, ds.test):
        assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
        assert split.images.max() == 16 and split.images.min() == 0
        assert set(np.unique(split.labels)) == set(range(10))
    # Stratified: every class has 25% +- 1 of its examples in the test split.
    counts_tr = np.bincount(ds.train.labels, minlength=10)
    counts_te = np.bincount(ds.test.labels, minlength=10)
    assert np.all(np.abs(counts_te - 0.25 * (counts_tr + counts_te)) <= 1)


def test_digits_deterministic_across_calls():
    a = data.load_dataset("digits")
    data._load_digits.cache_clear()
    b = data.load_dataset("digits")
    assert a is not b
    np.testing.assert_array_equal(a.train.images, b.train.images)
    np.testing.assert_array_equal(a.test.labels, b.test.labels)


def test_digits_preprocess_and_augment():
    ds = data.load_dataset("digits")
    x = ds.preprocess(ds.train.images[:64])
    assert x.dtype == jnp.float32 and x.shape == (64, 8, 8, 1)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    np.testing.assert_allclose(np.asarray(x), ds.train.images[:64] / 16.0, rtol=1e-6)
    out = ds.augment(jax.random.key(0), ds.train.images[:8])
    np.testing.assert_array_equal(np.asarray(out), ds.train.images[:8])


def test_preprocess_traceable_in_jit_and_vmap():
    ds = data.load_dataset("digits")
    batch = ds.test.images[:16]
    eager = ds.preprocess(batch)
    np.testing.assert_allclose(jax.jit(ds.preprocess)(batch), eager)
    np.testing.assert_allclose(jax.vmap(ds.preprocess)(batch), eager)


def test_normalising_preprocess():
    split = data.Split(np.zeros((2, 4, 4, 3), np.uint8), np.zeros((2,), np.int32))
    ds = data.Dataset("x", split, split, 10, (4, 4, 3), pixel_scale=255.0,
                      mean=data.CIFAR_MEAN, std=data.CIFAR_STD, augmentation="crop_flip")
    imgs = np.stack([np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)])
    x = np.asarray(jax.jit(ds.preprocess)(imgs))
    mean, std = np.array(data.CIFAR_MEAN), np.array(data.CIFAR_STD)
    np.testing.assert_allclose(x[0, 0, 0], -mean / std, rtol=1e-5)
    np.testing.assert_allclose(x[1, 0, 0], (1 - mean) / std, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_deterministic_and_learnable():
    kw = dict(n_train=200, n_test=100, image_shape=(8, 8, 1), num_classes=4, seed=0)
    a = data.load_dataset("synthetic", **kw)
    b = data.load_dataset("synthetic", **kw)
    assert a.train.images.shape == (200, 8, 8, 1) and a.test.images.shape == (100, 8, 8, 1)
    assert a.train.images.dtype == np.float32 and a.train.labels.dtype == np.int32
    assert a.num_classes == 4 and a.image_shape == (8, 8, 1)
    np.testing.assert_array_equal(a.train.images, b.train.images)
    np.testing.assert_array_equal(a.test.labels, b.test.labels)
    assert np.all(np.bincount(a.train.labels) == 50)
    c = data.load_dataset("synthetic", **{**kw, "seed": 1})
    assert not np.array_equal(a.train.images, c.train.images)
    # Nearest class mean (fitted on train) classifies the test split well.
    flat_tr = a.train.images.reshape(200, -1)
    means = np.stack([flat_tr[a.train.labels == k].mean(0) for k in range(4)])
    dists = ((a.test.images.reshape(100, 1, -1) - means[None]) ** 2).sum(-1)
    assert (dists.argmin(1) == a.test.labels).mean() > 0.9
    np.testing.assert_array_equal(np.asarray(a.preprocess(a.test.images)), a.test.images)


def test_unknown_option_rejected():
    with pytest.raises(TypeError, match="n_trian"):
        data.load_dataset("synthetic", n_trian=10)
    with pytest.raises(TypeError):
        data.load_dataset("digits", seed=3)


# --------------------------------------------------------------------------------------------------
# batching


@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey])
def test_batch_indices_is_permutation(make_key):
    idx = data.batch_indices(make_key(0), 103, 10)
    assert idx.shape == (10, 10) and idx.dtype == np.int32
    assert len(np.unique(idx)) == 100 and idx.min() >= 0 and idx.max() < 103
    np.testing.assert_array_equal(idx, data.batch_indices(make_key(0), 103, 10))
    assert not np.array_equal(idx, data.batch_indices(make_key(1), 103, 10))


def test_batch_indices_keep_remainder_and_edge_cases():
    idx = data.batch_indices(jax.random.key(0), 103, 10, drop_remainder=False)
    assert idx.shape == (11, 10)
    assert set(idx.ravel().tolist()) == set(range(103))
    # The partial last batch is completed from the start of the same permutation.
    np.testing.assert_array_equal(idx[-1, 3:], idx[0, :7])
    assert data.batch_indices(jax.random.key(0), 5, 10).shape == (0, 10)
    assert data.batch_indices(jax.random.key(0), 5, 10, drop_remainder=False).shape == (1, 10)
    with pytest.raises(ValueError):
        data.batch_indices(jax.random.key(0), 5, 0)


def _indexed_split(n):
    """Split whose image i holds the value i, so batches reveal which examples they hold."""
    images = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1)
    return data.Split(images, (np.arange(n) % 7).astype(np.int32))


def test_epoch_batches_deterministic_and_epoch_dependent():
    split = _indexed_split(70)
    key = jax.random.key(42)

    def run(epoch):
        return [(x.copy(), y.copy()) for x, y in data.epoch_batches(key, split, 16, epoch)]

    e0, e0_again, e1 = run(0), run(0), run(1)
    assert len(e0) == 4  # 70 // 16, remainder dropped
    for (x, y), (x2, y2) in zip(e0, e0_again):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    ids0 = np.concatenate([x.ravel() for x, _ in e0]).astype(int)
    ids1 = np.concatenate([x.ravel() for x, _ in e1]).astype(int)
    assert len(np.unique(ids0)) == 64 and len(np.unique(ids1)) == 64
    assert not np.array_equal(ids0, ids1)
    for x, y in e0:
        assert x.shape == (16, 1, 1, 1) and y.shape == (16,)
        np.testing.assert_array_equal(y, x.ravel().astype(int) % 7)  # labels stay paired


def test_calibration_images_fixed_subset_of_train():
    split = _indexed_split(500)
    a = data.calibration_images(split, n=64, seed=0)
    assert a.shape == (64, 1, 1, 1)
    np.testing.assert_array_equal(a, data.calibration_images(split, n=64, seed=0))
    assert not np.array_equal(a, data.calibration_images(split, n=64, seed=1))
    ids = a.ravel().astype(int)
    assert len(np.unique(ids)) == 64 and not np.array_equal(ids, np.arange(64))
    assert data.calibration_images(split, n=10_000).shape == (500, 1, 1, 1)
    ds = data.load_dataset("digits")
    calib = data.calibration_images(ds.train)
    assert calib.shape == (1024, 8, 8, 1) and calib.dtype == np.uint8


# --------------------------------------------------------------------------------------------------
# random_crop_flip


def _match_crop_flip(out, img, pad):
    """Returns every (dy, dx, flipped) such that `out` is that window of the zero-padded `img`."""
    h, w = img.shape[:2]
    padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)))
    hits = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            win = padded[dy:dy + h, dx:dx + w]
            for flipped, cand in ((False, win), (True, win[:, ::-1])):
                if np.array_equal(out, cand):
                    hits.append((dy, dx, flipped))
    return hits


def test_random_crop_flip_is_shifted_window_of_padded_image():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (128, 32, 32, 3), dtype=np.uint8)  # no zeros: windows are unique
    out = np.asarray(data.random_crop_flip(jax.random.key(0), images))
    assert out.shape == images.shape and out.dtype == np.uint8
    params = []
    for o, img in zip(out, images):
        hits = _match_crop_flip(o, img, pad=4)
        assert len(hits) == 1
        params.append(hits[0])
    offsets = {(dy, dx) for dy, dx, _ in params}
    flips = np.mean([f for _, _, f in params])
    assert len(offsets) > 40  # 81 possible offsets, 128 draws
    assert {dy for dy, _ in offsets} == set(range(9)) and {dx for _, dx in offsets} == set(range(9))
    assert 0.3 < flips < 0.7


def test_random_crop_flip_keyed():
    images = np.random.default_rng(1).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    a = data.random_crop_flip(jax.random.key(3), images)
    b = data.random_crop_flip(jax.random.key(3), images)
    c = data.random_crop_flip(jax.random.key(4), images)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    # Traceable inside jit with a float batch.
    f = jax.jit(lambda k, x: data.random_crop_flip(k, x))(jax.random.key(3), images.astype(np.float32))
    assert f.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(f), np.asarray(a).astype(np.float32))


def test_random_crop_flip_mirrors_known_image():
    # A left-to-right ramp: mirrored iff the first column holds the largest value.
    img = np.broadcast_to(np.arange(8, dtype=np.uint8)[None, :, None], (8, 8, 1))[None]
    outs = {}
    for i in range(32):
        key = jax.random.fold_in(jax.random.key(0), i)
        out = np.asarray(data.random_crop_flip(key, img, pad=0))[0]
        outs[bool(out[0, 0, 0] == 7)] = out
    assert set(outs) == {False, True}  # both outcomes occur over 32 keys
    np.testing.assert_array_equal(outs[True], img[0, :, ::-1])
    np.testing.assert_array_equal(outs[False], img[0])


def test_dataset_augment_crop_flip_single_and_batch():
    images = np.random.default_rng(2).integers(1, 256, (4, 8, 8, 3), dtype=np.uint8)
    split = data.Split(images, np.zeros((4,), np.int32))
    ds = data.Dataset("x", split, split, 2, (8, 8, 3), augmentation="crop_flip")
    out = np.asarray(jax.jit(ds.augment)(jax.random.key(0), images))
    assert out.shape == images.shape and out.dtype == np.uint8
    for o, img in zip(out, images):
        assert len(_match_crop_flip(o, img, pad=4)) == 1
    single = np.asarray(ds.augment(jax.random.key(0), images[0]))
    assert single.shape == (8, 8, 3) and len(_match_crop_flip(single, images[0], pad=4)) == 1


# --------------------------------------------------------------------------------------------------
# names, data dirs, errors


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="cifar10") as e:
        data.load_dataset("mnist")
    assert "mnist" in str(e.value)


def test_imagenet_streams_and_is_never_held_in_memory(tmp_path):
    with pytest.raises(NotImplementedError, match="does not fit in memory.*streaming=True"):
        data.load_dataset("imagenet2012", streaming=False)
    with pytest.raises(data.DatasetNotFoundError, match="tfds build imagenet2012 --manual_dir"):
        data.load_dataset("imagenet2012", data_dir=str(tmp_path))   # streamed by default (tests/test_stream.py)


def test_missing_dataset_explicit_dir(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.load_dataset("cifar10", data_dir=str(tmp_path))
    assert isinstance(e.value, FileNotFoundError)
    msg = str(e.value)
    for part in ("'cifar10'", str(tmp_path), "TFDS_DATA_DIR", "data_dir=", "--data-dir", "../shared/tfds"):
        assert part in msg


def test_missing_dataset_unprepared_subdir(tmp_path):
    (tmp_path / "cifar100").mkdir()
    with pytest.raises(data.DatasetNotFoundError, match="no prepared 'cifar100'"):
        data.load_dataset("cifar100", data_dir=str(tmp_path))


def test_missing_dataset_searches_all_defaults(tmp_path, monkeypatch):
    env_dir = tmp_path / "env_tfds"
    env_dir.mkdir()
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")  # ../shared/tfds does not exist from here
    monkeypatch.setenv("TFDS_DATA_DIR", str(env_dir))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.load_dataset("cifar10")
    msg = str(e.value)
    assert str(env_dir) in msg and str(tmp_path / "shared" / "tfds") in msg
    assert str(tmp_path / "home" / "tensorflow_datasets") in msg
    monkeypatch.delenv("TFDS_DATA_DIR")
    with pytest.raises(data.DatasetNotFoundError, match=r"\$TFDS_DATA_DIR: not set"):
        data.load_dataset("cifar10")


def test_resolve_data_dir_precedence(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.chdir(repo)
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    assert data.resolve_data_dir(None) is None
    shared = tmp_path / "shared" / "tfds"
    shared.mkdir(parents=True)
    assert data.resolve_data_dir(None) == str(shared)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "env"))
    assert data.resolve_data_dir(None) == str(tmp_path / "env")
    assert data.resolve_data_dir(str(tmp_path / "flag")) == str(tmp_path / "flag")
    assert data.resolve_data_dir("flag") == str(repo / "flag")


def test_datasets_tuple():
    assert data.DATASETS == ("digits", "cifar10", "cifar100", "imagenet2012", "synthetic")


# --------------------------------------------------------------------------------------------------
# CIFAR-10 (real data)


@pytest.fixture
def cifar10_dir():
    """TFDS data dir holding cifar10; skips the test when there is none.

    Resolved at test time (not collection time) so conftest's chdir to the repo root applies.
    """
    d = data.resolve_data_dir(None)
    if d is None or not os.path.isdir(os.path.join(d, "cifar10")):
        pytest.skip("no TFDS data dir holding cifar10 (set TFDS_DATA_DIR or provide ../shared/tfds)")
    return d


@pytest.fixture
def cifar10(cifar10_dir):
    # Function-scoped so conftest's chdir applies first; cheap after the first test (in-process cache).
    return data.load_dataset("cifar10", data_dir=cifar10_dir)


@pytest.mark.cifar
def test_cifar10_splits(cifar10):
    ds = cifar10
    assert ds.name == "cifar10" and ds.num_classes == 10 and ds.image_shape == (32, 32, 3)
    assert ds.test.images.shape == (10000, 32, 32, 3) and ds.train.images.shape == (50000, 32, 32, 3)
    for split, per_class in ((ds.test, 1000), (ds.train, 5000)):
        assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
        assert split.labels.min() == 0 and split.labels.max() == 9
        np.testing.assert_array_equal(np.bincount(split.labels, minlength=10), per_class)
    assert not ds.test.images.flags.writeable  # shared through the in-process cache
    assert data.load_dataset("cifar10").test is ds.test  # default dir, in-process cache hit


@pytest.mark.cifar
def test_cifar10_matches_tfds_records(cifar10, cifar10_dir):
    import tensorflow_datasets as tfds

    source = tfds.data_source("cifar10", data_dir=cifar10_dir, download=False)["test"]
    for i in (0, 1, 4321, 9999):
        record = source[i]
        np.testing.assert_array_equal(cifar10.test.images[i], record["image"])
        assert cifar10.test.labels[i] == record["label"]


@pytest.mark.cifar
def test_cifar10_pipeline(cifar10):
    x = cifar10.test.images[:256]
    z = np.asarray(jax.jit(cifar10.preprocess)(x))
    assert z.dtype == np.float32 and z.shape == x.shape
    assert abs(z.mean()) < 0.5 and 0.7 < z.std() < 1.3  # roughly standardised
    aug = np.asarray(cifar10.augment(jax.random.key(0), x[:4]))
    assert aug.shape == (4, 32, 32, 3) and aug.dtype == np.uint8
    for o, img in zip(aug, x[:4]):
        assert _match_crop_flip(o, img, pad=4)


@pytest.mark.cifar
def test_cifar10_disk_cache_roundtrip(cifar10_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXNOISE_CACHE", str(tmp_path))
    builder = data.find_builder("cifar10", cifar10_dir)
    t0 = time.perf_counter()
    cold = data._read_split(builder, "cifar10", "test", "label", disk_cache=True)
    t_cold = time.perf_counter() - t0
    files = [f for f in os.listdir(tmp_path) if f.endswith(".npz")]
    assert len(files) == 1 and files[0].startswith("cifar10-3.0.2-test-")
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
    t0 = time.perf_counter()
    cached = data._read_split(builder, "cifar10", "test", "label", disk_cache=True)
    t_cached = time.perf_counter() - t0
    np.testing.assert_array_equal(cold.images, cached.images)
    np.testing.assert_array_equal(cold.labels, cached.labels)
    assert cached.labels.dtype == np.int32 and t_cached < t_cold
    # A corrupt cache file is ignored with a warning and the split decoded again.
    (tmp_path / files[0]).write_bytes(b"not an npz")
    with pytest.warns(UserWarning, match="unreadable cache"):
        again = data._read_split(builder, "cifar10", "test", "label", disk_cache=True)
    np.testing.assert_array_equal(cold.labels, again.labels)


def test_holdout_splits_off_the_last_examples():
    from jaxnoise.data import Split, holdout
    split = Split(np.arange(10 * 4, dtype=np.uint8).reshape(10, 2, 2, 1), np.arange(10, dtype=np.int32))
    train_part, held = holdout(split, 3)
    np.testing.assert_array_equal(train_part.labels, np.arange(7))
    np.testing.assert_array_equal(held.labels, [7, 8, 9])
    with pytest.raises(ValueError, match="holdout size"):
        holdout(split, 10)
