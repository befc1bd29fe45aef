"""The Python API never reports a wrong number silently: misuse is a ValueError at the call, before tracing.

One section per class of misuse (each test fails on the code before the checks existed):

1. a noise spec without a key (used to give the clean accuracy under the noisy label);
2. selectors that match nothing, and bare strings where a tuple of names is expected;
3. confidence intervals from one chip (None, not zero width) and intervals clipped to [0, 1];
4. API misuse: incomplete variables, a spec that is not a NoiseSpec, scales that are not numbers, counts that are
   not integers, keys that are neither PRNG keys nor ints;
5. the Monte Carlo memory guard (InsufficientMemoryError, raised before anything is allocated).

Every check runs before anything is compiled, so these tests use untrained variables (``he_variables``: numpy, no
compilation) and assert that no evaluation program was traced.
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import he_variables

from jaxnoise import analog as analog_lib
from jaxnoise import denoise, methods, noise, placement, robustness, sensitivity
from jaxnoise.models import get_model

N = 20
W_SPEC = noise.NoiseSpec(weight_eta=0.5)


@pytest.fixture(scope="module")
def mlp():
    model = get_model("mlp")
    return model, he_variables(model)


@pytest.fixture(scope="module")
def cnn():
    model = get_model("cnn")  # conv + BatchNorm
    return model, he_variables(model)


@pytest.fixture(scope="module")
def dcnn(cnn):
    dmodel = denoise.denoised(cnn[0])
    return dmodel, he_variables(dmodel)


@pytest.fixture
def data(digits):
    return digits.test.images[:N], digits.test.labels[:N], digits.preprocess


@pytest.fixture
def no_trace():
    """Asserts that the test traced no Monte Carlo program (every error came before compiling)."""
    before = robustness.trace_count()
    yield
    assert robustness.trace_count() == before, "an evaluation program was traced before the error"


def _entry_points(model, variables, data, *, spec=W_SPEC, key=0, **kw):
    """Every Monte Carlo entry point, as ``name -> thunk``, called with the same model, spec and key."""
    x, y, pre = data
    common = dict(preprocess=pre, **kw)
    dev = analog_lib.preset("aihwkit_inference_default")
    return {
        "evaluate": lambda: robustness.evaluate(model, variables, x, y, spec, key=key, n_chips=2, **common),
        "evaluate_many": lambda: robustness.evaluate_many(model, variables, x, y, [spec], key=key, n_chips=2,
                                                          **common),
        "sweep": lambda: robustness.sweep(model, variables, x, y, spec, weight_etas=[0.1, 0.2], key=key, n_chips=2,
                                          **common),
        "evaluate_analog": lambda: robustness.evaluate_analog(model, variables, x, y, dev, times=[1.0], key=key,
                                                              noise=spec, n_chips=2, **common),
        "sensitivity_map": lambda: sensitivity.sensitivity_map(model, variables, x, y, scales=[0.1], key=key,
                                                               spec=spec, n_chips=2, **common),
    }


# ----------------------------------------------------------------------------------------------------------------
# 1. A noise spec needs a key


@pytest.mark.parametrize("entry", ["evaluate", "evaluate_many", "sweep", "evaluate_analog", "sensitivity_map"])
def test_a_noise_spec_without_key_is_an_error(mlp, data, no_trace, entry):
    model, variables = mlp
    with pytest.raises(ValueError, match=r"needs key=\.\.\."):
        _entry_points(model, variables, data, key=None)[entry]()


def test_evaluate_without_key_no_longer_returns_the_clean_accuracy(mlp, data, no_trace):
    model, variables = mlp
    x, y, pre = data
    with pytest.raises(ValueError, match="a noise spec needs key=.*a clean evaluation is spec=None"):
        robustness.evaluate(model, variables, x, y, noise.NoiseSpec(weight_eta=0.5), key=None, preprocess=pre)


def test_placement_evaluators_need_a_key(cnn, dcnn, data, no_trace):
    model, variables = cnn
    dmodel, dvars = dcnn
    x, y, pre = data
    spec = noise.NoiseSpec(weight_kind=None, act_kind="multiplicative", act_eta=0.5)
    with pytest.raises(ValueError, match="needs key="):
        placement.evaluate_placements(dmodel, dvars, np.eye(4, dtype=np.float32), x, y, spec, key=None, n_chips=2,
                                      preprocess=pre)
    with pytest.raises(ValueError, match="needs key="):
        placement.removal_sensitivity(model, variables, x, y, spec, key=None, n_chips=2, preprocess=pre)
    with pytest.raises(ValueError, match="needs key="):
        placement.gradient_sensitivity(model, variables, x, y, spec, key=None, preprocess=pre)


def test_chip_correct_with_a_spec_but_no_chip_key_is_an_error(mlp, data):
    model, variables = mlp
    x, y, pre = data
    images_b, labels_b, valid_b, _ = robustness.batch_data(model, x, y, N, pre)
    chip_correct = robustness.make_chip_eval(model, batch_size=N, preprocess=pre)
    with pytest.raises(ValueError, match="needs a chip_key"):
        chip_correct(variables, images_b, labels_b, valid_b, W_SPEC, None)


# ----------------------------------------------------------------------------------------------------------------
# 2a. Bare strings where a tuple of names is expected


@pytest.mark.parametrize("make, fix", [
    (lambda: noise.NoiseSpec(weight_paths="kernel"), "weight_paths=('kernel',)"),
    (lambda: analog_lib.AnalogSpec(digital_layers="head"), "digital_layers=('head',)"),
    (lambda: analog_lib.AnalogSpec(analog_layers="conv"), "analog_layers=('conv',)"),
])
def test_a_bare_string_selector_is_rejected_with_the_tuple_fix(make, fix):
    with pytest.raises(ValueError, match="bare string") as e:
        make()
    assert fix in str(e.value)


def test_bare_string_names_at_every_api_taking_names(cnn, dcnn, data):
    model, variables = cnn
    dmodel, dvars = dcnn
    x, y, pre = data
    spec = noise.NoiseSpec(weight_kind=None, act_kind="multiplicative", act_eta=0.5)
    cases = {
        "sites=('block1',) [consistency]": lambda: methods.consistency(model, sites="block1"),
        "weight_paths=('kernel',) [forward_noise]": lambda: methods.forward_noise(model, weight_paths="kernel"),
        "sites=('block1',) [denoised]": lambda: denoise.denoised(model, "block1"),
        "feature_sites=('block1',) [denoiser_loss]": lambda: denoise.denoiser_loss(
            dmodel, act_eta_train=0.1, act_kind="multiplicative", feature_sites="block1"),
        "placement=('block1',) [placement_array]": lambda: denoise.placement_array(dmodel, "block1"),
        "layers=('conv1',) [sensitivity_map]": lambda: sensitivity.sensitivity_map(
            model, variables, x, y, scales=[0.1], key=0, layers="conv1", preprocess=pre),
        "sites=('block1',) [removal_sensitivity]": lambda: placement.removal_sensitivity(
            model, variables, x, y, spec, key=0, n_chips=2, sites="block1", preprocess=pre),
        "sites=('block1',) [gradient_sensitivity]": lambda: placement.gradient_sensitivity(
            model, variables, x, y, spec, key=0, sites="block1", preprocess=pre),
        "candidates=('block1',) [random_placement]": lambda: placement.random_placement(dmodel, 0.5,
                                                                                         candidates="block1"),
    }
    for fix, make in cases.items():
        with pytest.raises(ValueError, match="bare string") as e:
            make()
        assert fix.split(" [")[0] in str(e.value), (fix, str(e.value))


def test_name_sequences_are_stored_as_tuples_and_masks_must_be_mappings():
    spec = noise.NoiseSpec(weight_paths=["kernel$"])  # a list: stored as a (hashable, static) tuple
    assert spec.weight_paths == ("kernel$",) and hash(jax.tree.structure(spec))
    assert analog_lib.AnalogSpec(digital_layers=["^head$"]).digital_layers == ("^head$",)
    for field in ("weight_mask", "act_mask", "act_ref"):
        with pytest.raises(ValueError, match=f"{field} must be a mapping"):
            noise.NoiseSpec(**{field: ["fc1/kernel"]})
    with pytest.raises(ValueError, match="keys are"):
        noise.NoiseSpec(weight_mask={0: 1.0})
    with pytest.raises(ValueError, match="inp_ranges must be a mapping"):
        analog_lib.IOParams(inp_ranges=["conv1"])


# ----------------------------------------------------------------------------------------------------------------
# 2b. Every selector must select


def test_weight_paths_that_match_nothing_are_an_error_not_the_clean_accuracy(mlp, data, no_trace):
    model, variables = mlp
    x, y, pre = data
    for paths in (("nomatch",), (r"kernel$", "nomatch")):  # one dead pattern among live ones too
        with pytest.raises(ValueError, match="'nomatch' matches no parameter") as e:
            robustness.evaluate(model, variables, x, y, noise.NoiseSpec(weight_eta=0.5, weight_paths=paths),
                                key=0, n_chips=2, preprocess=pre)
        assert "fc1/kernel" in str(e.value)  # lists the valid paths
    with pytest.raises(ValueError, match="matches no parameter"):  # direct users of the noise core
        noise.perturb_weights(jax.random.key(0), variables["params"],
                              noise.NoiseSpec(weight_eta=0.5, weight_paths=("nomatch",)))


def test_masks_and_references_must_name_existing_sites(mlp, data, no_trace):
    model, variables = mlp
    x, y, pre = data
    kw = dict(key=0, n_chips=2, preprocess=pre)
    with pytest.raises(ValueError, match="act_mask names activation sites that do not exist") as e:
        robustness.evaluate(model, variables, x, y, noise.NoiseSpec(act_kind="multiplicative", act_eta=0.5,
                                                                    act_mask={"nosuch": 0.0}), **kw)
    assert "fc1, fc2, head" in str(e.value)
    with pytest.raises(ValueError, match="weight_paths=.* does not select"):  # a bias mask would do nothing
        robustness.evaluate(model, variables, x, y, noise.NoiseSpec(weight_eta=0.5, weight_mask={"fc1/bias": 0.0}),
                            **kw)
    with pytest.raises(ValueError, match="act_ref lacks"):  # before tracing (the trace used to find it)
        robustness.evaluate(model, variables, x, y, noise.NoiseSpec(weight_kind=None, act_kind="additive",
                                                                    act_eta=0.1, act_ref={"fc1": 1.0}), **kw)
    with pytest.raises(ValueError, match="act_mask names activation sites"):
        robustness.evaluate_many(model, variables, x, y, [noise.NoiseSpec(act_kind="multiplicative", act_eta=0.5,
                                                                           act_mask={"nosuch": 0.0})], **kw)


def test_device_layer_selectors_must_match_a_layer(cnn, data, no_trace):
    model, variables = cnn
    x, y, pre = data
    base = analog_lib.preset("aihwkit_inference_default")
    kw = dict(times=[1.0], key=0, n_chips=2, preprocess=pre)
    for field in ("digital_layers", "analog_layers"):
        with pytest.raises(ValueError, match=f"{field} pattern 'nosuch' matches no layer") as e:
            robustness.evaluate_analog(model, variables, x, y, base.replace(**{field: ("nosuch",)}), **kw)
        assert "conv1, conv2, conv3, head" in str(e.value)
        with pytest.raises(ValueError, match="matches no layer"):  # direct users: analog_sites
            analog_lib.analog_sites(variables["params"], base.replace(**{field: ("nosuch",)}))
    with pytest.raises(ValueError, match="leaves no analog layer"):
        robustness.evaluate_analog(model, variables, x, y, base.replace(digital_layers=(".*",)), **kw)
    with pytest.raises(ValueError, match="inp_ranges names layers that do not exist"):
        robustness.evaluate_analog(model, variables, x, y, base.replace(io=analog_lib.IOParams(inp_ranges={"cnv1": 1.0})),
                                   **kw)


def test_training_noise_must_select_parts_of_the_model(cnn):
    model, _ = cnn
    with pytest.raises(ValueError, match="matches no parameter"):
        methods.forward_noise(model, weight_paths=("nomatch",))
    with pytest.raises(ValueError, match="digital_layers pattern 'nosuch'"):
        methods.forward_noise(model, weight_kind=None, device=analog_lib.AnalogSpec(digital_layers=("nosuch",)))
    with pytest.raises(ValueError, match="act_mask names activation sites"):
        denoise.denoiser_loss(denoise.denoised(model), act_eta_train=0.1, act_kind="multiplicative",
                              act_mask={"nosuch": 0.0})


# ----------------------------------------------------------------------------------------------------------------
# 3. Confidence intervals


def test_one_chip_has_no_interval_and_no_spread():
    s = robustness.summarize([0.7])
    assert s["std"] is None and s["se"] is None and s["ci95"] is None and s["mean"] == 0.7
    r = robustness.MCResult.from_per_chip([0.7], 10)
    assert r.ci95 is None and r.std is None and r.se is None
    d = json.loads(json.dumps(r.to_dict()))
    assert d["ci95"] is None and d["std"] is None and d["se"] is None  # JSON null
    assert robustness.format_ci95(r.ci95) == "n/a (1 chip)"


@pytest.mark.parametrize("per_chip", [[1.0, 0.9], [0.0, 0.1], [0.99, 1.0, 1.0], [0.5, 0.9]])
def test_interval_is_clipped_to_the_unit_interval(per_chip):
    lo, hi = robustness.summarize(per_chip)["ci95"]
    assert 0.0 <= lo <= np.mean(per_chip) <= hi <= 1.0
    unclipped = robustness.ci_halfwidth(per_chip)
    assert hi == pytest.approx(min(1.0, np.mean(per_chip) + unclipped))
    assert lo == pytest.approx(max(0.0, np.mean(per_chip) - unclipped))
    r = robustness.MCResult.from_per_chip(per_chip, 10)
    assert 0.0 <= r.ci95[0] and r.ci95[1] <= 1.0


def test_summarize_bounds_for_differences_and_out_of_range_values():
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\].*bounds=\(-1, 1\)"):
        robustness.summarize([-0.02, 0.01])
    lo, hi = robustness.summarize([-0.02, 0.01, -0.01], bounds=(-1.0, 1.0))["ci95"]
    assert lo < 0 < hi
    assert robustness.format_ci95([-0.01, 0.02], signed=True) == "[-1.00, +2.00]"


# ----------------------------------------------------------------------------------------------------------------
# 4. API misuse


@pytest.mark.parametrize("entry", ["evaluate", "evaluate_many", "sweep", "evaluate_analog", "sensitivity_map"])
def test_params_only_variables_are_rejected_before_tracing(cnn, data, no_trace, entry):
    model, variables = cnn
    for bad in (variables["params"], {"params": variables["params"]}):
        with pytest.raises(ValueError, match="pass the full variables") as e:
            _entry_points(model, bad, data)[entry]()
        assert "batch_stats" in str(e.value)


def test_variables_of_another_model_name_the_missing_leaves(cnn, mlp, dcnn, data, no_trace):
    x, y, pre = data
    with pytest.raises(ValueError, match=r"variables\['params'\] lacks \d+ leaves of cnn"):
        robustness.evaluate(cnn[0], {**mlp[1], "batch_stats": cnn[1]["batch_stats"]}, x, y, W_SPEC, key=0,
                            preprocess=pre)
    dmodel, dvars = dcnn
    with pytest.raises(ValueError, match="pass the full variables"):
        placement.evaluate_placements(dmodel, dvars["params"], np.eye(4, dtype=np.float32), x, y, W_SPEC, key=0,
                                      n_chips=2, preprocess=pre)


def test_a_spec_that_is_not_a_noise_spec_is_rejected(mlp, cnn, dcnn, data, no_trace):
    model, variables = mlp
    x, y, pre = data
    as_dict = {"weight_eta": 0.1}
    with pytest.raises(ValueError, match=r"spec must be a jaxnoise.noise.NoiseSpec.*NoiseSpec\(\*\*"):
        robustness.evaluate(model, variables, x, y, as_dict, key=0, preprocess=pre)
    with pytest.raises(ValueError, match="spec must be a jaxnoise.noise.NoiseSpec"):
        robustness.sweep(model, variables, x, y, as_dict, weight_etas=[0.1], key=0, preprocess=pre)
    with pytest.raises(ValueError, match="noise must be a jaxnoise.noise.NoiseSpec"):
        robustness.evaluate_analog(cnn[0], cnn[1], x, y, analog_lib.preset("ideal"), times=[1.0], key=0, noise=as_dict,
                                   preprocess=pre)
    with pytest.raises(ValueError, match="spec must be a jaxnoise.noise.NoiseSpec"):
        sensitivity.sensitivity_map(model, variables, x, y, scales=[0.1], key=0, spec=as_dict, preprocess=pre)
    with pytest.raises(ValueError, match="spec must be a jaxnoise.noise.NoiseSpec"):
        placement.evaluate_placements(dcnn[0], dcnn[1], np.eye(4, dtype=np.float32), x, y, as_dict, key=0,
                                      n_chips=2, preprocess=pre)
    with pytest.raises(ValueError, match="spec must be a jaxnoise.noise.NoiseSpec"):
        noise.perturb_weights(jax.random.key(0), variables["params"], as_dict)


@pytest.mark.parametrize("kw, match", [
    (dict(weight_eta="0.1"), "is a string"),
    (dict(act_kind="multiplicative", act_eta="0.1"), "is a string"),
    (dict(weight_eta=[0.1, 0.2]), r"use robustness.sweep\(\.\.\., weight_etas=\[\.\.\.\]\)"),
    (dict(act_kind="multiplicative", act_eta=(0.1,)), r"act_etas=\[\.\.\.\]"),
    (dict(weight_eta=True), "is a bool"),
    (dict(weight_eta=np.array("0.1")), "dtype"),
    (dict(weight_mask={"fc1/kernel": "0"}), "is a string"),
    (dict(weight_kind=None, act_kind="additive", act_ref={"fc1": [1.0]}), "is a list"),
])
def test_scales_must_be_numbers(kw, match):
    with pytest.raises(ValueError, match=match):
        noise.NoiseSpec(**kw)


def test_scale_data_arrays_and_tracers_stay_allowed():
    with pytest.raises(ValueError, match="is a string"):  # ... while strings are not
        noise.NoiseSpec(weight_eta="0.1")
    for eta in (np.float32(0.1), jnp.asarray(0.1), np.array(0.1), np.array([0.1, 0.2]), 1):
        noise.NoiseSpec(weight_eta=eta)
    assert float(jax.jit(lambda e: noise.NoiseSpec(weight_eta=e).weight_eta * 2)(0.25)) == 0.5
    # jax rebuilds pytrees with placeholder leaves (vmap axes): no spurious error
    axes = jax.tree.map(lambda _: None, noise.NoiseSpec(weight_eta=0.1))
    assert isinstance(axes, noise.NoiseSpec)


@pytest.mark.parametrize("make, match", [
    (lambda: analog_lib.AnalogSpec(g_max="25"), "is a string"),
    (lambda: analog_lib.IOParams(out_noise=[0.06]), "is a list"),
    (lambda: analog_lib.PCMModel(drift_scale=True), "is a bool"),
    (lambda: analog_lib.WeightModifier(std="0.1"), "is a string"),
])
def test_device_numbers_must_be_numbers(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_sweep_scale_lists_must_hold_numbers(mlp, data, no_trace):
    model, variables = mlp
    x, y, pre = data
    for bad, match in ((["0.1"], "not a number"), ([True], "not a number"), ("0.1", "must be a list")):
        with pytest.raises(ValueError, match=match):
            robustness.sweep(model, variables, x, y, W_SPEC, weight_etas=bad, key=0, preprocess=pre)


def test_counts_must_be_integers_everywhere(mlp, dcnn, data, no_trace):
    model, variables = mlp
    dmodel, dvars = dcnn
    x, y, pre = data
    eye = np.eye(4, dtype=np.float32)
    act = noise.NoiseSpec(weight_kind=None, act_kind="multiplicative", act_eta=0.5)
    cases = [
        ("n_chips=2.5", lambda: placement.evaluate_placements(dmodel, dvars, eye, x, y, act, key=0, n_chips=2.5,
                                                               preprocess=pre)),
        ("chip_batch_size=1.5", lambda: placement.evaluate_placements(dmodel, dvars, eye, x, y, act, key=0,
                                                                       n_chips=2, chip_batch_size=1.5,
                                                                       preprocess=pre)),
        ("variant_batch_size=0", lambda: placement.evaluate_placements(dmodel, dvars, eye, x, y, act, key=0,
                                                                        n_chips=2, variant_batch_size=0,
                                                                        preprocess=pre)),
        ("batch_size=True", lambda: robustness.make_chip_eval(model, batch_size=True)),
        ("n_draws=2.5", lambda: placement.gradient_sensitivity(model, variables, x, y, act, key=0, n_draws=2.5,
                                                                preprocess=pre)),
        ("n_chips=2.0", lambda: robustness.chip_keys(0, 2.0)),
        ("n_chips=True", lambda: robustness.evaluate(model, variables, x, y, W_SPEC, key=0, n_chips=True,
                                                      preprocess=pre)),
        ("batch_size=50.0", lambda: robustness.evaluate(model, variables, x, y, W_SPEC, key=0, batch_size=50.0,
                                                         preprocess=pre)),
        ("chip_batch_size=False", lambda: robustness.sweep(model, variables, x, y, W_SPEC, weight_etas=[0.1],
                                                            key=0, chip_batch_size=False, preprocess=pre)),
    ]
    for name, make in cases:
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            make()


@pytest.mark.parametrize("key", [0.5, "0", True, None, np.float32(1.0), "split"])
def test_keys_must_be_a_prng_key_or_an_int(mlp, data, no_trace, key):
    model, variables = mlp
    x, y, pre = data
    if key == "split":
        key = jax.random.split(jax.random.key(0), 3)  # a batch of keys, not one
    with pytest.raises(ValueError, match="PRNG key"):
        if key is None:
            robustness.chip_keys(None, 2)
        else:
            robustness.evaluate(model, variables, x, y, W_SPEC, key=key, n_chips=2, preprocess=pre)


def test_valid_keys_are_accepted_and_chip_indices_stop_at_2_to_the_32():
    typed, raw = jax.random.key(3), jax.random.PRNGKey(3)
    np.testing.assert_array_equal(jax.random.key_data(robustness.chip_keys(typed, 2)),
                                  jax.random.key_data(robustness.chip_keys(3, 2)))
    assert robustness.chip_keys(raw, 2).shape == (2, 2)
    assert robustness.chip_keys(np.int64(3), 1).shape == (1,)
    with pytest.raises(ValueError, match=r"2\*\*32"):
        robustness.chip_keys(0, 2, start=2 ** 32 - 1)  # chip 2**32 would be chip 0 again


# ----------------------------------------------------------------------------------------------------------------
# 5. Memory guard


def test_memory_estimate_scales_with_chips_and_batches(cnn, data):
    model, variables = cnn
    x = data[0]
    base = robustness.estimate_memory_bytes(model, variables, 10, 1, 4, images=x)
    assert base > 0
    assert robustness.estimate_memory_bytes(model, variables, 10, 4, 4, images=x) > base       # chip chunk
    assert robustness.estimate_memory_bytes(model, variables, 20, 1, 4, images=x) > base       # data batch
    assert robustness.estimate_memory_bytes(model, variables, 10, 1, 10 ** 6, images=x) > 10 ** 7  # per chip
    assert robustness.estimate_memory_bytes(model, variables, 10, 1, 4, images=x,
                                            device=analog_lib.preset("aihwkit_inference_default")) > base
    free = robustness.available_memory_bytes()
    assert free is None or (isinstance(free, int) and free > 0)


def test_huge_chip_counts_fail_fast_without_allocating(mlp, data, no_trace):
    model, variables = mlp
    x, y, pre = data
    t0 = time.perf_counter()
    with pytest.raises(robustness.InsufficientMemoryError, match="lower chip_batch_size or batch_size") as e:
        robustness.evaluate(model, variables, x, y, W_SPEC, key=0, n_chips=10 ** 12, preprocess=pre)
    assert time.perf_counter() - t0 < 2.0
    assert isinstance(e.value, ValueError) and e.value.estimate > e.value.available
    assert "adaptive" in str(e.value) and "n_chips=1000000000000" in str(e.value)


def test_memory_guard_at_every_entry_point(mlp, dcnn, data, no_trace, monkeypatch):
    model, variables = mlp
    x, y, pre = data
    monkeypatch.setattr(robustness, "available_memory_bytes", lambda device=None: 8 * 10 ** 9)
    with pytest.raises(robustness.InsufficientMemoryError, match=r"chip_batch_size=100000.*8 GB is free"):
        robustness.evaluate(model, variables, x, y, W_SPEC, key=0, n_chips=100000, chip_batch_size=100000,
                            preprocess=pre)
    monkeypatch.setattr(robustness, "available_memory_bytes", lambda device=None: 10 ** 4)  # 10 kB free
    for name, run in _entry_points(model, variables, data).items():
        with pytest.raises(robustness.InsufficientMemoryError, match=name):
            run()
    with pytest.raises(robustness.InsufficientMemoryError, match="evaluate_variants"):
        placement.evaluate_placements(dcnn[0], dcnn[1], np.eye(4, dtype=np.float32), x, y, W_SPEC, key=0,
                                      n_chips=2, preprocess=pre)


def test_memory_guard_with_a_mesh_is_per_device(mlp, data, no_trace, monkeypatch):
    from jaxnoise import distributed
    model, variables = mlp
    x, y, pre = data
    mesh = distributed.make_mesh(1, 1)
    single = robustness.estimate_memory_bytes(model, variables, 10, 1, 1000, images=x)
    assert robustness.estimate_memory_bytes(model, variables, 10, 1, 1000, images=x, mesh=mesh) == pytest.approx(
        single, rel=0.01)
    monkeypatch.setattr(robustness, "available_memory_bytes", lambda device=None: 10 ** 4)
    with pytest.raises(robustness.InsufficientMemoryError, match="free on cpu"):
        robustness.evaluate(model, variables, x, y, W_SPEC, key=0, n_chips=2, preprocess=pre, mesh=mesh)
