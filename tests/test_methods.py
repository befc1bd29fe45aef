"""Tests of jaxnoise.methods: gradients, reductions between methods, K draws, BatchNorm choice, no recompilation,
and that noise-aware training makes a tiny model more robust (Monte Carlo, CI-checked)."""

import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxnoise import methods, noise, robustness, train
from jaxnoise.models import get_model


@pytest.fixture(scope="module")
def cnn_setup(digits):
    """A small CNN with BatchNorm on a digits batch: (model, variables, x, y)."""
    model = get_model("cnn", input_shape=digits.image_shape, num_classes=10)
    variables = model.init(jax.random.key(0))
    # Non-trivial running statistics, so that their update is visible.
    variables = {"params": variables["params"],
                 "batch_stats": jax.tree.map(lambda s: s + 0.1, variables["batch_stats"])}
    x = digits.preprocess(digits.train.images[:32])
    y = jnp.asarray(digits.train.labels[:32])
    return model, variables, x, y


def run(loss_fn, variables, x, y, key, hparams=None):
    """(loss, aux, grads) of ``loss_fn`` at ``variables``."""
    hp = methods.check_hparams(loss_fn.hparams if hparams is None else hparams, tuple(loss_fn.hparams))
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        variables["params"], variables["batch_stats"], x, y, key, hp)
    return loss, aux, grads


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol), a, b)


# ----------------------------------------------------------------------------------------------------------------
# Distances


def test_distances_zero_at_equality_scale_free_and_differentiable():
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(8, 5, 3)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(8, 5, 3)), jnp.float32)
    for d in ("nmse", "cosine", "logit_kl"):
        assert float(methods.feature_distance(b, b, d)) == pytest.approx(0.0, abs=1e-6)
        assert float(methods.feature_distance(a, b, d)) > 0
    for d in ("nmse", "cosine"):
        assert float(methods.feature_distance(3 * a, 3 * b, d)) == pytest.approx(
            float(methods.feature_distance(a, b, d)), rel=1e-5)
    # cosine and KL are plain functions: finite differences.
    check_grads(lambda u: methods.feature_distance(u, b, "cosine"), (a,), order=1, modes=("rev",), atol=1e-2)
    check_grads(lambda u: methods.feature_distance(u.reshape(8, 15), b.reshape(8, 15), "logit_kl"), (a,),
                order=1, modes=("rev",), atol=1e-2)
    # nmse holds its normaliser constant: gradient 2 (a - b) / E, E = (|a|^2 + |b|^2) / 2.
    energy = 0.5 * (jnp.sum(a ** 2) + jnp.sum(b ** 2))
    grad = jax.grad(lambda u: methods.feature_distance(u, b, "nmse"))(a)
    np.testing.assert_allclose(grad, 2 * (a - b) / energy, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown consistency distance"):
        methods.feature_distance(a, b, "l1")


def test_nmse_finite_when_clean_feature_is_zero():
    a = jnp.ones((4, 6))
    d, g = jax.value_and_grad(lambda u: methods.feature_distance(u, jnp.zeros((4, 6)), "nmse"))(a)
    assert float(d) == pytest.approx(2.0)
    assert np.all(np.isfinite(g))


# ----------------------------------------------------------------------------------------------------------------
# Gradients and reductions


def test_forward_noise_gradient_is_the_clean_gradient_at_the_noisy_weights(cnn_setup):
    """Hand-derived case: straight-through noise means d loss / d W = d CE / d W' at W' = W + delta."""
    model, variables, x, y = cnn_setup
    key = jax.random.key(3)
    loss_fn = methods.forward_noise(model, eta_train=0.2)
    loss, (logits, stats, _), grads = run(loss_fn, variables, x, y, key)

    draw_key = jax.random.fold_in(key, 0)
    noisy = noise.perturb_weights(noise.weight_key(draw_key), variables["params"], noise.NoiseSpec(weight_eta=0.2))

    def ce_at(params):
        out = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True)
        return methods.cross_entropy(out.logits, y), (out.logits, out.state)

    (ref_loss, (ref_logits, ref_stats)), ref_grads = jax.value_and_grad(ce_at, has_aux=True)(noisy)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-5)
    assert_trees_close(grads, ref_grads, rtol=1e-4, atol=1e-6)
    assert_trees_close(stats, ref_stats)


def test_consistency_gradient_matches_hand_derivation(cnn_setup):
    """d/dW [CE(f(W')) + lambda * mean_s d(f_s(W'), sg f_s(W))] at W' = W + delta, target held constant."""
    model, variables, x, y = cnn_setup
    key, lam, sites = jax.random.key(4), 0.7, ("block1", "pre_logits", "logits")
    loss_fn = methods.consistency(model, eta_train=0.15, lam=lam, sites=sites)
    loss, (_, _, metrics), grads = run(loss_fn, variables, x, y, key)

    clean_logits, clean_feats = model.apply(variables, x, train=True)[:2]
    target = {"block1": clean_feats["block1"], "pre_logits": clean_feats["pre_logits"], "logits": clean_logits}
    noisy = noise.perturb_weights(noise.weight_key(jax.random.fold_in(key, 0)), variables["params"],
                                  noise.NoiseSpec(weight_eta=0.15))

    def manual(params):
        out, feats = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True)[:2]
        f = {"block1": feats["block1"], "pre_logits": feats["pre_logits"], "logits": out}
        reg = sum(methods.feature_distance(f[s], target[s], "nmse") for s in sites) / len(sites)
        return methods.cross_entropy(out, y) + lam * reg, reg

    (ref_loss, ref_reg), ref_grads = jax.value_and_grad(manual, has_aux=True)(noisy)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    assert float(metrics["consistency"]) == pytest.approx(float(ref_reg), rel=1e-5)
    assert float(metrics["consistency"]) > 0
    assert_trees_close(grads, ref_grads, rtol=1e-4, atol=1e-6)


def test_lambda_zero_is_forward_noise(cnn_setup):
    model, variables, x, y = cnn_setup
    key = jax.random.key(5)
    fn = run(methods.forward_noise(model, eta_train=0.2, n_draws=2), variables, x, y, key)
    cr = run(methods.consistency(model, eta_train=0.2, lam=0.0, n_draws=2), variables, x, y, key)
    assert float(fn[0]) == pytest.approx(float(cr[0]), rel=1e-6)
    assert_trees_close(fn[2], cr[2])          # gradients
    assert_trees_close(fn[1][1], cr[1][1])    # BatchNorm statistics
    np.testing.assert_allclose(fn[1][0], cr[1][0], rtol=1e-6)


def test_eta_zero_is_clean(cnn_setup):
    model, variables, x, y = cnn_setup
    key = jax.random.key(6)
    clean = run(methods.clean(model), variables, x, y, key)
    fn = run(methods.forward_noise(model, eta_train=0.0, n_draws=3), variables, x, y, key)
    assert float(clean[0]) == pytest.approx(float(fn[0]), rel=1e-6)
    assert_trees_close(clean[2], fn[2])
    assert_trees_close(clean[1][1], fn[1][1])
    # lambda > 0 with eta 0: the noisy features equal the clean ones, so consistency adds nothing.
    cr = run(methods.consistency(model, eta_train=0.0, lam=2.0), variables, x, y, key)
    assert float(cr[1][2]["consistency"]) == pytest.approx(0.0, abs=1e-7)
    assert_trees_close(clean[2], cr[2])


@pytest.mark.parametrize("draw_batch_size", [1, pytest.param(2, marks=pytest.mark.slow),
                                             pytest.param(3, marks=pytest.mark.slow)])
def test_k_draws_are_the_mean_of_single_draws_and_batchnorm_averages(cnn_setup, draw_batch_size):
    model, variables, x, y = cnn_setup
    key, k = jax.random.key(7), 3
    loss, (logits, stats, _), grads = run(
        methods.forward_noise(model, eta_train=0.2, n_draws=k, draw_batch_size=draw_batch_size),
        variables, x, y, key)
    spec = noise.NoiseSpec(weight_eta=0.2)

    def single(params, draw):
        out = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                          key=jax.random.fold_in(key, draw), noise=spec, train=True)
        return methods.cross_entropy(out.logits, y), (out.logits, out.state)

    singles = [jax.value_and_grad(single, has_aux=True)(variables["params"], d) for d in range(k)]
    assert float(loss) == pytest.approx(np.mean([float(s[0][0]) for s in singles]), rel=1e-5)
    assert_trees_close(grads, jax.tree.map(lambda *g: sum(g) / k, *[s[1] for s in singles]), rtol=1e-4)
    # BatchNorm choice: running statistics = mean over draws of each draw's updated statistics.
    assert_trees_close(stats, jax.tree.map(lambda *s: sum(s) / k, *[s[0][1][1] for s in singles]), rtol=1e-5)
    np.testing.assert_allclose(logits, singles[0][0][1][0], rtol=1e-4, atol=1e-5)
    # The draws differ (they are independent chips), so the average is not one of them.
    assert len({round(float(s[0][0]), 6) for s in singles}) == k


def test_same_key_same_loss_other_key_other_loss(cnn_setup):
    model, variables, x, y = cnn_setup
    loss_fn = methods.consistency(model, eta_train=0.2)
    a = run(loss_fn, variables, x, y, jax.random.key(8))[0]
    b = run(loss_fn, variables, x, y, jax.random.key(8))[0]
    c = run(loss_fn, variables, x, y, jax.random.key(9))[0]
    assert float(a) == float(b) and float(a) != float(c)


def test_teacher_targets_come_from_frozen_variables(cnn_setup):
    model, variables, x, y = cnn_setup
    teacher = model.init(jax.random.key(42))
    key = jax.random.key(10)
    loss_fn = methods.consistency(model, eta_train=0.0, lam=1.0, sites=("logits",), teacher=teacher)
    loss, (_, _, metrics), _ = run(loss_fn, variables, x, y, key)
    t_logits = model.apply(teacher, x).logits  # inference mode
    s_logits = model.apply(variables, x, train=True).logits
    expected = methods.feature_distance(s_logits, t_logits, "nmse")
    assert float(metrics["consistency"]) == pytest.approx(float(expected), rel=1e-5)


def test_bad_configuration_is_rejected_with_the_fix(cnn_setup):
    model = cnn_setup[0]
    with pytest.raises(ValueError, match="unknown consistency sites"):
        methods.consistency(model, sites=("block9",))
    with pytest.raises(ValueError, match="logit_kl"):
        methods.consistency(model, distance="logit_kl", sites=("block1",))
    with pytest.raises(ValueError, match="n_draws"):
        methods.forward_noise(model, n_draws=0)
    with pytest.raises(ValueError, match="lam"):
        methods.consistency(model, lam=-1.0)
    with pytest.raises(ValueError, match="eta_train"):
        methods.forward_noise(model, eta_train=float("nan"))
    with pytest.raises(ValueError, match="use method 'clean'"):
        methods.forward_noise(model, weight_kind=None)
    with pytest.raises(ValueError, match="site_weights names sites"):
        methods.consistency(model, sites=("block1",), site_weights={"block2": 1.0})
    with pytest.raises(ValueError, match="unknown training method"):
        methods.make_loss("noisy", model)
    loss_fn = methods.consistency(model)
    with pytest.raises(ValueError, match="do not match the loss"):
        methods.check_hparams({"eta_train": 0.1}, tuple(loss_fn.hparams))
    with pytest.raises(ValueError, match="lambda"):
        methods.check_hparams({"eta_train": 0.1, "lambda": -2.0}, tuple(loss_fn.hparams))


# ----------------------------------------------------------------------------------------------------------------
# Compilation and training


def test_changing_eta_train_or_lambda_does_not_recompile(cnn_setup, digits):
    model, variables, _, _ = cnn_setup
    loss_fn = methods.consistency(model, eta_train=0.1, lam=1.0)
    traces = []

    def counted(*args):
        traces.append(1)
        return loss_fn(*args)

    config = train.TrainConfig(epochs=1, batch_size=16)
    opt = train.make_optimizer(config, 10)
    step = train.make_train_step(model, counted, opt, digits)
    state = train.init_state(model, variables, opt)
    images, labels = digits.train.images[:16], digits.train.labels[:16]
    losses = []
    for eta, lam in [(0.1, 1.0), (0.2, 1.0), (0.2, 0.0), (0.05, 3.0)]:
        hp = methods.check_hparams({"eta_train": eta, "lambda": lam}, tuple(loss_fn.hparams))
        _, metrics = step(state, images, labels, jax.random.key(0), hp)
        losses.append(float(metrics["loss"]))
    assert len(traces) == 1
    assert len(set(losses)) == 4  # the new values were used


@pytest.fixture(scope="module")
def trained_digits(digits):
    """An MLP trained on digits with each method (same seed, schedule and data order)."""
    model = get_model("mlp", input_shape=digits.image_shape, num_classes=10)
    config = train.TrainConfig(epochs=20, batch_size=64, learning_rate=0.05, seed=0)
    losses = {"clean": methods.clean(model), "forward_noise": methods.forward_noise(model, eta_train=0.1),
              "consistency": methods.consistency(model, eta_train=0.1, lam=0.3)}
    out = {}
    for name, loss_fn in losses.items():
        with tempfile.TemporaryDirectory() as workdir:
            out[name], _ = train.train(model, digits, config, workdir=workdir, loss_fn=loss_fn, progress=False)
    return model, out


def test_noise_aware_training_makes_a_tiny_model_more_robust(trained_digits, digits):
    model, variables = trained_digits
    spec = noise.NoiseSpec(weight_eta=0.1)
    results = {name: robustness.evaluate(model, v, digits.test.images, digits.test.labels, spec,
                                         key=jax.random.key(11), n_chips=32, batch_size=450,
                                         preprocess=digits.preprocess) for name, v in variables.items()}
    clean = results["clean"]
    for name in ("forward_noise", "consistency"):
        r = results[name]
        diff = r.mean - clean.mean
        se = np.sqrt(r.se ** 2 + clean.se ** 2)
        # Welch 95% interval of the difference excludes 0.
        assert diff - 1.96 * se > 0, f"{name}: {100 * r.mean:.2f}% vs clean {100 * clean.mean:.2f}%"


def test_default_draw_batch_size_per_backend_and_bad_values(cnn_setup):
    assert methods.default_draw_batch_size(4, "cpu") == 1
    assert methods.default_draw_batch_size(4, "gpu") == 4 and methods.default_draw_batch_size(3, "tpu") == 3
    model = cnn_setup[0]
    assert methods.forward_noise(model, n_draws=4, draw_batch_size=9).config["draw_batch_size"] == 4
    with pytest.raises(ValueError, match="draw_batch_size=0"):
        methods.forward_noise(model, n_draws=2, draw_batch_size=0)


def test_losses_are_typed_values_and_plain_functions_are_losses_too(digits):
    """Every factory returns a Loss (name, config, hparams as fields, compared by identity); a plain function is
    wrapped by as_loss; a Loss's fields are checked; replace makes a new loss."""
    model = get_model("mlp", input_shape=digits.image_shape)
    for loss in (methods.clean(model), methods.make_loss("forward_noise", model, eta_train=0.1),
                 methods.make_loss("consistency", model, eta_train=0.1, lam=2.0)):
        assert isinstance(loss, methods.Loss) and loss.name in methods.METHODS
        assert loss == loss and loss != loss.replace()   # identity: a new object is a new compiled step
        hash(loss)
    assert methods.make_loss("consistency", model, lam=2.0).hparams["lambda"] == 2.0

    def my_loss(params, batch_stats, images, labels, key, hparams):
        return 0.0, (None, batch_stats, {})

    wrapped = methods.as_loss(my_loss)
    assert (wrapped.name, wrapped.config, dict(wrapped.hparams)) == ("my_loss", None, {})
    assert methods.as_loss(wrapped) is wrapped
    assert methods.resolve_hparams(my_loss) == {}
    with pytest.raises(ValueError, match="Loss.name"):
        methods.Loss(my_loss, "")
    with pytest.raises(ValueError, match="must be a jaxnoise.methods.Loss or a function"):
        methods.as_loss(3)
