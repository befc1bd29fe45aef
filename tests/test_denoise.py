"""Denoising blocks: identity at insertion, placement as data, frozen backbone, counts, training helps."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import traverse_util

from jaxnoise import denoise, noise, robustness, train
from jaxnoise.models import get_model


@pytest.fixture(scope="module")
def trained_cnn(trained_digits_cnn):
    return trained_digits_cnn


def _randomize_blocks(dmodel, dvars, key):
    """Non-zero values in every block leaf (as if trained), gates kept."""
    flat = traverse_util.flatten_dict(dvars["params"], sep="/")
    for i, path in enumerate(sorted(flat)):
        if denoise.is_denoiser_param(path):
            flat[path] = 0.3 * jax.random.normal(jax.random.fold_in(key, i), flat[path].shape)
    return {**dvars, "params": traverse_util.unflatten_dict(flat, sep="/")}


@pytest.mark.parametrize("name,kind", [("cnn", "residual"), ("cnn", "probabilistic"), ("mlp", "residual"),
                                       ("mlp", "probabilistic"),
                                       pytest.param("resnet20", "residual", marks=pytest.mark.slow)])
def test_fresh_blocks_are_bitwise_identity(name, kind):
    model = get_model(name, **({"input_shape": (8, 8, 1)} if name != "resnet20" else {}))
    variables = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (3,) + model.input_shape)
    dmodel = denoise.denoised(model, config=denoise.DenoiserConfig(kind=kind))
    dvars = denoise.init_variables(dmodel, variables, jax.random.key(2))
    assert dmodel.candidate_sites == model.feature_names
    logits, feats = model.apply(variables, x)[:2]
    dlogits, dfeats = dmodel.apply(dvars, x)[:2]
    np.testing.assert_array_equal(np.asarray(dlogits), np.asarray(logits))
    for s in model.feature_names:
        np.testing.assert_array_equal(np.asarray(dfeats[s]), np.asarray(feats[s]))


# Slow set: among the default suite's heaviest (2026-12-03 --durations); CI runs it in the slow pass.
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["residual", "probabilistic"])
def test_empty_placement_equals_plain_model_under_noise(kind):
    """Gates 0 give the plain model bit for bit, noise included: insertion changes no noise key elsewhere."""
    model = get_model("cnn", input_shape=(8, 8, 1))
    variables = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    dmodel = denoise.denoised(model, config=denoise.DenoiserConfig(kind=kind))
    dvars = _randomize_blocks(dmodel, denoise.init_variables(dmodel, variables, jax.random.key(2)), jax.random.key(3))
    ref = {s: jnp.float32(1.0) for s in model.sites}
    spec = noise.NoiseSpec(weight_eta=0.1, act_kind="additive", act_eta=0.2, act_ref=ref)
    key = jax.random.key(4)
    plain = model.apply(variables, x, key=key, noise=spec).logits
    off = dmodel.apply(denoise.with_placement(dmodel, dvars, []), x, key=key, noise=spec).logits
    np.testing.assert_array_equal(np.asarray(off), np.asarray(plain))
    on = dmodel.apply(denoise.with_placement(dmodel, dvars, ["block2"]), x, key=key, noise=spec).logits
    assert not np.array_equal(np.asarray(on), np.asarray(plain))  # a placed, non-zero block acts


def test_placement_is_data_vmapped_and_compiled_once():
    model = get_model("cnn", input_shape=(8, 8, 1))
    variables = model.init(jax.random.key(0))
    dmodel = denoise.denoised(model)
    dvars = _randomize_blocks(dmodel, denoise.init_variables(dmodel, variables, jax.random.key(2)), jax.random.key(3))
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    traces = []

    @jax.jit
    def run(gates):
        traces.append(1)
        return dmodel.apply(denoise.with_placement(dmodel, dvars, gates), x)[0]

    placements = np.eye(4, dtype=np.float32)
    singles = [run(p) for p in placements]
    assert len(traces) == 1  # four placements, one compilation
    batched = jax.vmap(lambda g: dmodel.apply(denoise.with_placement(dmodel, dvars, g), x)[0])(placements)
    np.testing.assert_allclose(np.asarray(batched), np.stack(singles), rtol=1e-5, atol=1e-5)


def test_counts_match_hand_count():
    model = get_model("cnn", input_shape=(8, 8, 1))  # block1: 8x8x16
    costs = denoise.site_costs(denoise.denoised(model))
    # 1x1 16->4 (+4 bias), 3x3 4->4 (+4), 1x1 4->16 (+16)
    assert costs["block1"]["params"] == 16 * 4 + 4 + 9 * 4 * 4 + 4 + 4 * 16 + 16 == 296
    assert costs["block1"]["macs"] == 8 * 8 * (16 * 4 + 9 * 4 * 4 + 4 * 16) == 17408
    # pre_logits (32 channels, dense block, b = 8): 32*8+8 + 8*8+8 + 8*32+32
    assert costs["pre_logits"]["params"] == 256 + 8 + 64 + 8 + 256 + 32
    assert costs["pre_logits"]["macs"] == 256 + 64 + 256
    prob = denoise.site_costs(denoise.denoised(model, config=denoise.DenoiserConfig(kind="probabilistic")))
    # + two heads b->C on the pooled bottleneck, applied once per image
    assert prob["block1"]["params"] == 296 + 2 * (4 * 16 + 16)
    assert prob["block1"]["macs"] == 17408 + 2 * 4 * 16
    # the counted leaves are the leaves that exist
    dvars = denoise.denoised(model).init(jax.random.key(0))
    flat = traverse_util.flatten_dict(dvars["params"], sep="/")
    assert sum(v.size for p, v in flat.items() if p.startswith("denoise/block1/") and denoise.is_denoiser_param(p)) \
        == 296
    over = denoise.overhead(denoise.denoised(model), ["block1", "block3"])
    assert over["params"] == 296 + costs["block3"]["params"]
    assert over["param_overhead"] == pytest.approx(over["params"] / model.param_count())
    assert over["mac_overhead"] == pytest.approx(over["macs"] / denoise.backbone_mvm_macs(model))


@pytest.mark.parametrize("kind", ["residual", "probabilistic"])
def test_engine_shapes_agree_with_the_counted_blocks(kind):
    """block_shapes / analog_layers feed jaxnoise.engine; its counts equal the ones taken from the real leaves."""
    from jaxnoise import engine
    model = get_model("resnet20")
    dmodel = denoise.denoised(model, config=denoise.DenoiserConfig(kind=kind))
    costs = denoise.site_costs(dmodel)
    for shape in denoise.block_shapes(dmodel):
        cost = engine.block_cost(shape)
        assert (cost["params"], cost["macs"]) == (costs[shape.site]["params"], costs[shape.site]["macs"]), shape
    layers = denoise.analog_layers(model)
    assert [layer.name for layer in layers] == list(model.sites)
    assert layers[0] == engine.AnalogLayer("conv1", rows=27, cols=16, mvms_per_image=32 * 32)
    assert engine.backbone_cost(layers)["macs"] == denoise.backbone_mvm_macs(model)


def test_backbone_mvm_macs_hand_count():
    model = get_model("mlp", input_shape=(8, 8, 1), hidden=(128, 64))
    assert denoise.backbone_mvm_macs(model) == 64 * 128 + 128 * 64 + 64 * 10


def test_blocks_are_digital_and_noise_free():
    model = get_model("cnn", input_shape=(8, 8, 1))
    dmodel = denoise.denoised(model)
    assert dmodel.sites == model.sites  # no activation-noise site inside blocks
    dvars = dmodel.init(jax.random.key(0))
    plain = model.init(jax.random.key(0))["params"]
    assert noise.weight_noise_sites(dvars["params"]) == noise.weight_noise_sites(plain)
    # by registration: the blocks are digital layers, the backbone's layers stay the analog ones
    assert dmodel.analog_layers == model.analog_layers and not model.digital_layers
    assert set(dmodel.digital_layers) == {f"denoise/{site}/{layer}" for site in dmodel.candidate_sites
                                          for layer in ("down", "mid", "up")}
    assert dmodel.weight_noise_paths == model.weight_noise_paths
    mask = jax.tree_util.tree_leaves_with_path(train.kernel_mask(dvars["params"], dmodel.analog_weight_paths))
    decayed = {"/".join(k.key for k in path) for path, on in mask if on}
    assert decayed == set(model.analog_weight_paths)   # no weight decay on a block


def test_blocks_are_the_models_taps_and_a_pass_tap_still_sees_every_point():
    model = get_model("cnn", input_shape=(8, 8, 1))
    dmodel = denoise.denoised(model)
    assert set(dmodel.taps) == set(dmodel.candidate_sites) and model.taps is None
    dvars = denoise.init_variables(dmodel, model.init(jax.random.key(0)), jax.random.key(1))
    seen = []

    def tap(root, name, h):
        seen.append(name)
        return h

    x = jnp.ones((2, 8, 8, 1))
    dmodel.apply(dvars, x, tap=tap)
    assert seen == list(model.tap_names)
    seen.clear()
    dmodel.apply(dvars, x, tap=tap)             # a second pass: the model's taps were not changed by the first
    assert seen == list(model.tap_names)


def test_bad_input_errors():
    model = get_model("cnn", input_shape=(8, 8, 1))
    with pytest.raises(ValueError, match="unknown denoiser sites"):
        denoise.denoised(model, ["block9"])
    with pytest.raises(ValueError, match="unknown denoiser kind"):
        denoise.DenoiserConfig(kind="wiener")
    with pytest.raises(ValueError, match="reduction"):
        denoise.DenoiserConfig(reduction=0)
    dmodel = denoise.denoised(model)
    with pytest.raises(ValueError, match="last axis of 4"):
        denoise.placement_array(dmodel, np.ones(3))
    with pytest.raises(ValueError, match="without a block"):
        denoise.placement_array(dmodel, ["layer1/0"])
    with pytest.raises(ValueError, match="probabilistic"):
        denoise.denoiser_loss(dmodel, act_eta_train=0.1, act_ref={}, nll_weight=1.0)
    with pytest.raises(ValueError, match="already has denoising blocks"):
        denoise.denoised(dmodel)


def test_training_freezes_backbone_and_raises_noisy_accuracy(digits, trained_cnn, tmp_path):
    """Blocks trained under activation noise: backbone bitwise unchanged, Monte Carlo accuracy up (CI > 0)."""
    model, variables, ref = trained_cnn
    dmodel = denoise.denoised(model)
    dvars = denoise.init_variables(dmodel, variables, jax.random.key(0), placement=["block1", "block2", "block3"])
    loss_fn = denoise.denoiser_loss(dmodel, act_eta_train=0.5, act_ref=ref, feature_weight=0.5)
    config = train.TrainConfig(epochs=15, batch_size=64, learning_rate=0.05, weight_decay=0.0)
    trained, history = denoise.train_denoisers(dmodel, digits, config, workdir=str(tmp_path), variables=dvars,
                                               loss_fn=loss_fn, progress=False)
    before = traverse_util.flatten_dict(dvars["params"], sep="/")
    after = traverse_util.flatten_dict(trained["params"], sep="/")
    for path, value in before.items():
        if denoise.is_denoiser_param(path):
            continue
        assert np.asarray(after[path]).tobytes() == np.asarray(value).tobytes(), path  # bitwise
    assert any(not np.array_equal(after[p], before[p]) for p in before if denoise.is_denoiser_param(p))
    for name in ("batch_stats",):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                     trained[name], dvars[name])
    spec = noise.NoiseSpec(weight_kind=None, act_kind="additive", act_ref=ref, act_eta=0.5)
    kw = dict(key=7, n_chips=16, preprocess=digits.preprocess)
    plain = robustness.evaluate(model, variables, digits.test.images, digits.test.labels, spec, **kw)
    den = robustness.evaluate(dmodel, trained, digits.test.images, digits.test.labels, spec, **kw)
    diff = den.per_chip - plain.per_chip
    half = scipy.stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
    assert diff.mean() - half > 0, (plain.mean, den.mean)
    # resume: a finished run restores instead of retraining
    again, _ = denoise.train_denoisers(dmodel, digits, config, workdir=str(tmp_path), variables=dvars,
                                       loss_fn=loss_fn, progress=False)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), again, trained)


def test_probabilistic_blocks_train_with_noise_likelihood(digits, trained_cnn, tmp_path):
    model, variables, ref = trained_cnn
    dmodel = denoise.denoised(model, ["block2"], denoise.DenoiserConfig(kind="probabilistic"))
    dvars = denoise.init_variables(dmodel, variables, jax.random.key(0))
    loss_fn = denoise.denoiser_loss(dmodel, act_eta_train=0.5, act_ref=ref, feature_weight=0.5, nll_weight=0.1)
    config = train.TrainConfig(epochs=4, batch_size=64, learning_rate=0.02, weight_decay=0.0)
    _, history = denoise.train_denoisers(dmodel, digits, config, workdir=str(tmp_path), variables=dvars,
                                         loss_fn=loss_fn, progress=False)
    nll = [h["nll"] for h in history if h["type"] == "train"]
    assert np.all(np.isfinite(nll)) and nll[-1] < nll[0]  # the predicted noise distribution fits better


@pytest.mark.parametrize("sampler", [pytest.param("threefry/erfinv", marks=pytest.mark.slow), "threefry/icdf16"])
def test_denoiser_loss_draws_its_noise_with_the_given_sampler(trained_cnn, digits, sampler):
    """The training noise is NoiseSpec(sampler=...)'s: the loss equals the CE of the noisy forward pass it names."""
    model, variables, ref = trained_cnn
    dmodel = denoise.denoised(model)
    dvars = denoise.init_variables(dmodel, variables, jax.random.key(0))
    x = digits.preprocess(digits.train.images[:64])
    y = jnp.asarray(digits.train.labels[:64])
    loss_fn = denoise.denoiser_loss(dmodel, act_eta_train=0.5, act_ref=ref, sampler=sampler)
    assert loss_fn.config["noise"]["prng"]["activation"] == sampler
    key = jax.random.key(1)
    loss, _ = loss_fn(dvars["params"], dvars["batch_stats"], x, y, key, {"act_eta_train": 0.5, "feature_weight": 0.0,
                                                                         "nll_weight": 0.0})
    spec = noise.NoiseSpec(act_kind="additive", act_ref=ref, act_eta=0.5, sampler=sampler)
    logits = dmodel.apply(dvars, x, key=key, noise=spec).logits
    expected = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1))
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)


def _loss_inputs(trained_cnn, digits, n=64):
    model, variables, ref = trained_cnn
    dmodel = denoise.denoised(model)
    dvars = _randomize_blocks(dmodel, denoise.init_variables(dmodel, variables, jax.random.key(0)),
                              jax.random.key(5))
    x = digits.preprocess(digits.train.images[:n])
    y = jnp.asarray(digits.train.labels[:n])
    return model, dmodel, dvars, ref, x, y


def test_kl_term_is_the_kl_of_the_clean_backbone_predictions_to_the_noisy_ones(trained_cnn, digits):
    model, dmodel, dvars, ref, x, y = _loss_inputs(trained_cnn, digits)
    loss_fn = denoise.denoiser_loss(dmodel, act_eta_train=0.5, act_ref=ref, kl_weight=2.0)
    assert loss_fn.hparams["kl_weight"] == 2.0
    key = jax.random.key(3)
    hp = {k: jnp.float32(v) for k, v in loss_fn.hparams.items()}
    loss, (_, _, m) = loss_fn(dvars["params"], dvars["batch_stats"], x, y, key, hp)
    logits = dmodel.apply(dvars, x, key=key, noise=noise.NoiseSpec(act_kind="additive", act_ref=ref, act_eta=0.5)).logits
    clean_logits = model.apply(trained_cnn[1], x).logits
    p, q = jax.nn.softmax(clean_logits), jax.nn.softmax(logits)
    kl = float(np.mean(np.sum(np.asarray(p) * (np.log(np.asarray(p)) - np.log(np.asarray(q))), axis=-1)))
    assert kl > 1e-3   # the noise moved the predictions
    np.testing.assert_allclose(float(m["kl"]), kl, rtol=1e-4)
    np.testing.assert_allclose(float(loss), float(m["ce"]) + 2.0 * kl, rtol=1e-5)
    # without noise and with fresh blocks the noisy network is the clean one: KL 0
    fresh = denoise.init_variables(dmodel, trained_cnn[1], jax.random.key(0))
    _, (_, _, m0) = loss_fn(fresh["params"], fresh["batch_stats"], x, y, key, {**hp, "act_eta_train": jnp.float32(0)})
    assert abs(float(m0["kl"])) < 1e-6


def test_act_eta_spread_draws_the_scale_uniformly_per_step_from_the_key(trained_cnn, digits):
    model, dmodel, dvars, ref, x, y = _loss_inputs(trained_cnn, digits, n=8)
    loss_fn = denoise.denoiser_loss(dmodel, act_eta_train=0.6, act_ref=ref, act_eta_spread=0.5)
    assert loss_fn.config["act_eta_spread"] == 0.5
    hp = {k: jnp.float32(v) for k, v in loss_fn.hparams.items()}
    eta_of = jax.jit(lambda key: loss_fn(dvars["params"], dvars["batch_stats"], x, y, key, hp)[1][2]["act_eta"])
    keys = [jax.random.fold_in(jax.random.key(11), i) for i in range(200)]
    etas = np.array([float(eta_of(k)) for k in keys])
    assert etas.min() >= 0.3 - 1e-6 and etas.max() <= 0.9 + 1e-6
    assert scipy.stats.kstest((etas - 0.3) / 0.6, "uniform").pvalue > 1e-3
    assert float(eta_of(keys[0])) == etas[0]                      # same key, same scale
    # the drawn scale is the one the noise used: the loss equals the CE at that fixed scale
    key = keys[7]
    loss, _ = loss_fn(dvars["params"], dvars["batch_stats"], x, y, key, hp)
    fixed = denoise.denoiser_loss(dmodel, act_eta_train=float(etas[7]), act_ref=ref)
    loss_fixed, _ = fixed(dvars["params"], dvars["batch_stats"], x, y, key,
                          {k: jnp.float32(v) for k, v in fixed.hparams.items()})
    np.testing.assert_allclose(float(loss), float(loss_fixed), rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [({"act_eta_spread": 1.0}, "must be < 1"),
                                           ({"act_eta_spread": -0.1}, "act_eta_spread"),
                                           ({"act_eta_spread": 0.2, "act_kind": None}, "needs activation noise"),
                                           ({"kl_weight": -1.0}, "kl_weight")])
def test_bad_loss_options_are_refused_with_the_field(trained_cnn, kwargs, match):
    model, _, ref = trained_cnn
    with pytest.raises(ValueError, match=match):
        denoise.denoiser_loss(denoise.denoised(model), act_eta_train=0.5, act_ref=ref, **kwargs)


def test_a_block_inside_a_residual_branch_acts_there_and_its_feature_term_compares_that_point():
    """A block at ``layer1/0/mid`` (between the branch's two convolutions, a tap point that is not a returned
    feature): fresh it changes nothing, placed it acts, its shape is the branch's, and feature matching compares
    the value there with the clean backbone's (0 without noise; > 0 with noise on conv1, with a gradient)."""
    model = get_model("resnet8_cifar", input_shape=(8, 8, 3))
    assert "layer1/0/mid" in model.tap_names and "layer1/0/mid" not in model.feature_names
    variables = model.init(jax.random.key(0))
    dmodel = denoise.denoised(model, sites=("layer1/0/mid", "layer1/0"))
    assert dmodel.candidate_sites == ("layer1/0/mid", "layer1/0")
    assert denoise.feature_shapes(model)["layer1/0/mid"] == (8, 8, 16)
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    y = jnp.arange(4) % 10
    dvars = denoise.init_variables(dmodel, variables, jax.random.key(2), placement=["layer1/0/mid"])
    run = jax.jit(lambda v: dmodel.apply(v, x)[0])
    clean = jax.jit(lambda v: model.apply(v, x)[0])(variables)
    np.testing.assert_array_equal(np.asarray(run(dvars)), np.asarray(clean))
    assert not np.allclose(np.asarray(run(_randomize_blocks(dmodel, dvars, jax.random.key(3)))), np.asarray(clean))
    ref = {s: jnp.float32(1.0) for s in model.sites}
    loss_fn = denoise.denoiser_loss(dmodel, act_eta_train=0.3, act_ref=ref, feature_weight=1.0,
                                    feature_sites=("layer1/0/mid",))
    hp = {k: jnp.float32(v) for k, v in loss_fn.hparams.items()}
    step = jax.jit(lambda p, h: loss_fn(p, dvars["batch_stats"], x, y, jax.random.key(4), h))
    _, (_, _, quiet) = step(dvars["params"], {**hp, "act_eta_train": jnp.float32(0.0)})
    assert abs(float(quiet["feature"])) < 1e-7
    _, (_, _, m) = step(dvars["params"], hp)
    assert float(m["feature"]) > 1e-3
    # "placed": gate-weighted over the candidates, here the one placed block at the inner point
    placed = denoise.denoiser_loss(dmodel, act_eta_train=0.3, act_ref=ref, feature_weight=1.0, feature_sites="placed")
    _, (_, _, mp) = jax.jit(lambda p, h: placed(p, dvars["batch_stats"], x, y, jax.random.key(4), h))(dvars["params"],
                                                                                                     hp)
    np.testing.assert_allclose(float(mp["feature"]), float(m["feature"]), rtol=1e-6)
    assert placed.config["feature_sites"] == "placed"
    grads = jax.jit(jax.grad(lambda p: step(p, hp)[1][2]["feature"]))(dvars["params"])
    flat = traverse_util.flatten_dict(grads, sep="/")
    assert any(np.any(np.asarray(g) != 0) for p, g in flat.items() if p.startswith("denoise/layer1/0/mid/"))
    with pytest.raises(ValueError, match="unknown denoiser sites"):
        denoise.denoised(model, sites=("layer1/0/inside",))


def test_probabilistic_blocks_report_their_noise_estimate_in_aux():
    model = get_model("cnn", input_shape=(8, 8, 1))
    dmodel = denoise.denoised(model, config=denoise.DenoiserConfig(kind="probabilistic"))
    dvars = denoise.init_variables(dmodel, model.init(jax.random.key(0)), jax.random.key(1))
    x = jnp.ones((2, 8, 8, 1))
    out = dmodel.apply(dvars, x)
    assert set(out.aux) == set(dmodel.candidate_sites)
    assert set(out.features) == set(model.feature_names)          # aux is not mixed into the features
    for site, a in out.aux.items():
        assert set(a) == {"input", "mean", "log_var"}
        assert a["mean"].shape == (2, out.features[site].shape[-1])
    assert model.apply(model.init(jax.random.key(0)), x).aux == {}
