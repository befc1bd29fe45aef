"""Models: shapes, feature/site names, PyTorch npz import and its errors, the pretrained ResNet-20 accuracy."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnoise import noise
from jaxnoise.models import Chip, WeightsMismatchError, get_model, load_torch_npz
from jaxnoise.models.resnet_cifar import _shortcut_a

PRETRAINED = "../shared/pretrained"
needs_pretrained = pytest.mark.skipif(not os.path.isdir(PRETRAINED), reason="../shared/pretrained not present")


@pytest.mark.parametrize("name, shape, params", [
    ("mlp", (8, 8, 1), 64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10),
    ("cnn", (8, 8, 1), None),
    ("resnet20", (32, 32, 3), 269_722),
    ("resnet32", (32, 32, 3), 464_154),
])
def test_shapes_features_and_sites(name, shape, params):
    model = get_model(name)
    variables = model.init(jax.random.key(0))
    logits, feats = jax.jit(model.apply)(variables, jnp.zeros((3,) + shape))[:2]
    assert logits.shape == (3, 10)
    assert set(feats) == set(model.feature_names)  # jit returns dicts key-sorted; feature_names is forward order
    assert "pre_logits" in feats
    if params is not None:
        assert model.param_count(variables) == params
    assert len(set(model.sites)) == len(model.sites)


def test_resnet_cifar_names():
    model = get_model("resnet20")
    blocks = [f"layer{s}/{b}" for s in (1, 2, 3) for b in range(3)]
    assert model.feature_names == ("stem", *blocks, "pre_logits")
    assert len(model.sites) == 20  # 19 convolutions + the linear head
    assert model.sites[0] == "conv1" and model.sites[-1] == "linear"
    assert model.weight_noise_paths[0] == "conv1/kernel"
    # tap points: the features plus one inner point per residual branch (between conv1 and conv2), forward order
    assert model.tap_names == ("stem", *[n for b in blocks for n in (f"{b}/mid", b)], "pre_logits")
    bottleneck = get_model("resnet50", input_shape=(32, 32, 3))
    assert bottleneck.tap_names[1:4] == ("layer1/0/mid1", "layer1/0/mid2", "layer1/0")


def test_resnet18_imagenet():
    model = get_model("resnet18")
    variables = jax.eval_shape(model.init, jax.random.key(0))
    assert model.param_count(variables) == 11_689_512  # torchvision's resnet18
    assert "layer2/0/downsample/0" in model.sites
    variables = model.init(jax.random.key(0))
    logits, feats = jax.jit(model.apply)(variables, jnp.zeros((1, 224, 224, 3)))[:2]
    assert logits.shape == (1, 1000)
    assert feats["layer4/1"].shape == (1, 7, 7, 512)
    assert feats["stem"].shape == (1, 56, 56, 64)


def test_option_a_shortcut():
    x = jnp.arange(2 * 4 * 4 * 16, dtype=jnp.float32).reshape(2, 4, 4, 16)
    y = _shortcut_a(x, 32)
    assert y.shape == (2, 2, 2, 32)
    np.testing.assert_array_equal(y[..., 8:24], x[:, ::2, ::2, :])
    assert float(jnp.abs(y[..., :8]).sum() + jnp.abs(y[..., 24:]).sum()) == 0.0


def test_unknown_model_and_bad_depth():
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        get_model("vgg")
    with pytest.raises(ValueError, match="unknown model 'resnet21'"):
        get_model("resnet21")


def test_bad_inputs_are_named():
    model = get_model("cnn")
    variables = model.init(jax.random.key(0))
    with pytest.raises(ValueError, match="expects inputs of shape"):
        model.apply(variables, jnp.zeros((2, 9, 8, 1)))
    with pytest.raises(ValueError, match="floating-point inputs.*preprocess"):
        model.apply(variables, jnp.zeros((2, 8, 8, 1), jnp.uint8))


def test_train_mode_returns_updated_batch_stats():
    model = get_model("cnn")
    variables = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (16, 8, 8, 1)) * 3 + 1
    out = model.apply(variables, x, train=True)
    new = out.state
    assert model.apply(variables, x).state is None            # inference mode: no new statistics
    assert set(out.features) == set(model.feature_names)      # features hold only the named features
    assert jax.tree.structure(new) == jax.tree.structure(variables["batch_stats"])
    assert not np.allclose(new["bn1"]["mean"], variables["batch_stats"]["bn1"]["mean"])


def test_noise_needs_key_and_spec_and_is_deterministic():
    model = get_model("cnn")
    variables = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    spec = noise.NoiseSpec(weight_eta=0.1)
    clean = model.apply(variables, x).logits
    np.testing.assert_array_equal(model.apply(variables, x, key=jax.random.key(2))[0], clean)
    np.testing.assert_array_equal(model.apply(variables, x, noise=spec)[0], clean)
    a = model.apply(variables, x, key=jax.random.key(2), noise=spec).logits
    b = model.apply(variables, x, key=jax.random.key(2), noise=spec).logits
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, clean)


@needs_pretrained
def test_pretrained_loads_exactly():
    model = get_model("resnet20")
    variables = load_torch_npz(model, f"{PRETRAINED}/resnet20_cifar10.npz")
    with np.load(f"{PRETRAINED}/resnet20_cifar10.npz") as f:
        np.testing.assert_array_equal(variables["params"]["layer2"]["0"]["conv1"]["kernel"],
                                      f["layer2.0.conv1.weight"].transpose(2, 3, 1, 0))
        np.testing.assert_array_equal(variables["params"]["linear"]["kernel"], f["linear.weight"].T)
        np.testing.assert_array_equal(variables["batch_stats"]["bn1"]["var"], f["bn1.running_var"])


@needs_pretrained
def test_import_errors_name_every_problem(tmp_path):
    src = f"{PRETRAINED}/resnet20_cifar10.npz"
    with np.load(src) as f:
        state = dict(f)
    state.pop("layer1.0.bn1.running_mean")
    state["layer9.0.conv1.weight"] = np.zeros((1,))
    state["linear.weight"] = np.zeros((100, 64), np.float32)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **state)
    with pytest.raises(WeightsMismatchError) as e:
        load_torch_npz(get_model("resnet20"), bad)
    msg = str(e.value)
    assert "missing in file (1): batch_stats/layer1/0/bn1/mean" in msg
    assert "unexpected in file (1): layer9.0.conv1.weight" in msg
    assert "wrong shape (1): linear.weight" in msg
    with pytest.raises(WeightsMismatchError, match="missing in file"):
        load_torch_npz(get_model("resnet32"), src)  # deeper architecture than the file
    corrupt = tmp_path / "corrupt.npz"
    shutil.copy(src, corrupt)
    with open(corrupt, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(WeightsMismatchError, match="corrupt"):
        load_torch_npz(get_model("resnet20"), corrupt)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_torch_npz(get_model("resnet20"), tmp_path / "nothing.npz")
    assert os.path.getsize(src) > 1_000_000  # the source file is untouched


# Slow set: among the default suite's heaviest (2026-12-03 --durations); CI runs it in the slow pass.
@pytest.mark.slow
@pytest.mark.cifar
@needs_pretrained
def test_pretrained_resnet20_accuracy_on_shared_cifar10():
    from jaxnoise import data
    try:
        ds = data.load_dataset("cifar10")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model = get_model("resnet20")
    variables = load_torch_npz(model, f"{PRETRAINED}/resnet20_cifar10.npz")
    predict = jax.jit(lambda v, x: jnp.argmax(model.apply(v, ds.preprocess(x))[0], -1))
    images, labels = ds.test.images, ds.test.labels
    pred = np.concatenate([predict(variables, images[i:i + 1000]) for i in range(0, len(images), 1000)])
    acc = float((pred == labels).mean())
    assert abs(acc - 0.8103) <= 0.001, acc  # ../shared/pretrained/README.md: 81.03%


def _batch_norm_autodiff(x, scale, bias, eps=1e-5):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    var = jnp.mean(jnp.square(x - mean), axes)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias, mean, var


def test_batch_norm_closed_form_gradient_equals_autodiff(monkeypatch):
    from jaxnoise.models import layers
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 5, 5, 6)) * 3 + 1, jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 2, 6), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(6), jnp.float32)
    g = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (x.shape, (6,), (6,))]

    def loss(bn):   # every output carries a cotangent, the mean and variance included
        return lambda x, s, b: sum(jnp.sum(jnp.tanh(o) * gi) for o, gi in zip(bn(x, s, b), g))

    for a, b in zip(layers.batch_norm_train(x, scale, bias), _batch_norm_autodiff(x, scale, bias)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    ours = jax.grad(loss(layers.batch_norm_train), argnums=(0, 1, 2))(x, scale, bias)
    ref = jax.grad(loss(_batch_norm_autodiff), argnums=(0, 1, 2))(x, scale, bias)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # two ResNet-8 gradient compilations (~15 s); the layer-level test above runs by default
def test_batch_norm_closed_form_leaves_the_network_gradient_unchanged(monkeypatch):
    from jaxnoise.models import layers
    rng = np.random.default_rng(0)
    model = get_model("resnet8_cifar")
    v = model.init(jax.random.key(0))
    xb = jnp.asarray(rng.standard_normal((4, 32, 32, 3)), jnp.float32)

    def net_grad():
        return jax.grad(lambda p: jnp.sum(model.apply({**v, "params": p}, xb, train=True)[0] ** 2))(v["params"])

    fast = net_grad()
    monkeypatch.setattr(layers, "batch_norm_train", _batch_norm_autodiff)
    slow = net_grad()
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(slow)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_materialized_conv_inputs_are_exact_and_leave_the_gradient_unchanged(monkeypatch):
    from jaxnoise.models import layers
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 6, 6, 5)) * 1e3, jnp.float32)
    np.testing.assert_array_equal(layers.materialized(x), x)   # bit for bit
    g = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(layers.materialized(x) * g))(x), g)
    model = get_model("resnet8_cifar")
    v = model.init(jax.random.key(0))
    xb = jnp.asarray(rng.standard_normal((4, 32, 32, 3)), jnp.float32)

    def run():
        def loss(p):
            return jnp.sum(model.apply({**v, "params": p}, xb, train=True)[0] ** 2)
        return jax.jit(jax.value_and_grad(loss))(v["params"])

    results = {}
    for flag in (True, False):
        monkeypatch.setattr(layers, "MATERIALIZE_CONV_INPUTS", flag)
        assert layers.materialize_conv_inputs() is flag
        results[flag] = run()
    np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(results[True][1]), jax.tree.leaves(results[False][1])):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    monkeypatch.setattr(layers, "MATERIALIZE_CONV_INPUTS", None)
    assert layers.materialize_conv_inputs() == (jax.default_backend() == "cpu")


def test_a_chip_is_a_value_one_weight_draw_fixed_for_every_input():
    """Model.sample_chip is the weight draw apply(key=...) makes per call, as a value: applied to any batch it gives
    the same weights; it is a pytree (chips map and vmap); another key is another chip."""
    model = get_model("mlp", input_shape=(8, 8, 1), hidden=(16,))
    variables = model.init(jax.random.key(0))
    spec = noise.NoiseSpec(weight_eta=0.3)
    x = jax.random.normal(jax.random.key(1), (6, 8, 8, 1))
    k = jax.random.key(2)
    chip = model.sample_chip(k, variables["params"], spec)
    assert isinstance(chip, Chip) and chip.device is None and chip.state is None
    fresh = model.apply(variables, x, key=k, noise=spec).logits          # the chip apply draws from this key
    np.testing.assert_array_equal(model.apply(variables, x, chip=chip)[0], fresh)
    np.testing.assert_array_equal(model.apply(variables, x[:3], chip=chip)[0], fresh[:3])   # fixed per input
    other = model.sample_chip(jax.random.key(3), variables["params"], spec)
    assert not np.array_equal(model.apply(variables, x, chip=other)[0], fresh)
    keys = jax.vmap(lambda i: jax.random.fold_in(k, i))(jnp.arange(2, dtype=jnp.uint32))
    chips = jax.vmap(lambda kk: model.sample_chip(kk, variables["params"], spec))(keys)
    assert isinstance(chips, Chip) and chips.weights["fc1"]["kernel"].shape[0] == 2
    act = noise.NoiseSpec(weight_kind=None, act_kind="multiplicative", act_eta=0.2)
    a = model.apply(variables, x, key=jax.random.key(4), noise=act, chip=chip).logits   # activation noise on top
    assert not np.array_equal(a, fresh)


def _mixed_model():
    """A conv (analog), a digital dense layer whose leaves are named like an analog one's, and an analog head."""
    from jaxnoise.models import Model

    def forward(scope, x):
        h = jax.nn.relu(scope.conv("conv", x, 4))
        h = jnp.mean(h, axis=(1, 2))
        h = scope.feature("pooled", h)
        h = h + scope.digital_dense("helper", h, 4)          # leaves helper/kernel, helper/bias: digital anyway
        return scope.dense("head", h, 3), {"pooled": h}

    return Model("mixed", forward, (6, 6, 2), 3)


def test_analog_layers_come_from_registration_not_leaf_names():
    from jaxnoise import analog as analog_lib
    from jaxnoise import quant, train

    model = _mixed_model()
    assert model.analog_layers == ("conv", "head") and model.digital_layers == ("helper",)
    assert model.analog_weight_paths == ("conv/kernel", "head/kernel")
    assert model.sites == ("conv", "head")          # a digital layer has no activation-noise site
    variables = model.init(jax.random.key(0))
    assert set(variables["params"]["helper"]) == {"kernel", "bias"}
    assert model.weight_noise_paths == ("conv/kernel", "head/kernel")
    params = variables["params"]
    # weight noise, quantization and the device mapping leave the digital layer alone
    chip = model.sample_chip(jax.random.key(1), params, noise.NoiseSpec(weight_eta=0.3))
    assert chip.weights["helper"]["kernel"] is params["helper"]["kernel"]
    assert not np.array_equal(chip.weights["head"]["kernel"], params["head"]["kernel"])
    qmodel = model.with_quant(quant.QuantSpec(weight_bits=4, weight_step="max"))
    qweights = qmodel.chip_weights(params)
    assert qweights["helper"]["kernel"] is params["helper"]["kernel"]
    assert len(np.unique(np.asarray(qweights["head"]["kernel"]))) <= 15
    spec = analog_lib.preset("aihwkit_inference_default")
    programmed = model.sample_chip(jax.random.key(2), params, None, spec).programmed
    assert set(programmed) == {"conv", "head"}
    assert analog_lib.analog_sites(params, spec) == ("conv", "head", "helper")   # a bare tree: by leaf name only
    assert analog_lib.analog_sites(params, spec, model.analog_layers) == ("conv", "head")
    # weight decay: the analog kernels only
    mask = train.kernel_mask(params, model.analog_weight_paths)
    assert mask["conv"]["kernel"] and mask["head"]["kernel"]
    assert not mask["helper"]["kernel"] and not mask["head"]["bias"]
    # a pattern that selects only the digital layer selects no analog weight: refused, naming the analog ones
    with pytest.raises(ValueError, match="matches no parameter among the analog weights.*conv/kernel"):
        model.sample_chip(jax.random.key(1), params, noise.NoiseSpec(weight_eta=0.3, weight_paths=("helper",)))


def test_one_name_registered_as_two_kinds_of_layer_is_refused():
    from jaxnoise.models import Model

    def forward(scope, x):
        h = scope.conv("a", x, 2)
        return scope.digital_dense("a", jnp.mean(h, axis=(1, 2)), 3, leaves=("w", "b")), {}

    with pytest.raises(ValueError, match="registered twice"):
        Model("clash", forward, (4, 4, 1), 3).init(jax.random.key(0))


def test_registry_selections_refuse_a_bare_string():
    from jaxnoise import analog, quant, train

    model = _mixed_model()
    params = model.init(jax.random.key(0))["params"]
    spec = noise.NoiseSpec(weight_eta=0.1)
    with pytest.raises(ValueError, match="analog_paths='head/kernel' is a bare string"):
        noise.perturb_weights(jax.random.key(1), params, spec, analog_paths="head/kernel")
    with pytest.raises(ValueError, match="analog_paths='head/kernel' is a bare string"):
        quant.quantize_params(params, quant.QuantSpec(weight_bits=4, weight_step="max"), analog_paths="head/kernel")
    with pytest.raises(ValueError, match="decayed_paths='head/kernel' is a bare string"):
        train.kernel_mask(params, "head/kernel")
    with pytest.raises(ValueError, match="layers='head' is a bare string"):
        analog.layer_names(params, "head")
    with pytest.raises(ValueError, match=r"analog layers \['nope'\] have no kernel"):
        analog.layer_names(params, ("head", "nope"))
