"""jaxnoise: noise-robust neural networks for analog and compute-in-memory accelerators, in pure-function JAX.

The names most work needs are here (``import jaxnoise as jn``); each module (``jaxnoise.noise``,
``jaxnoise.robustness``, ...) holds the rest. Attributes load on first use, so ``import jaxnoise`` is cheap.

Monte Carlo accuracy under weight noise: 4 chips (one weight draw each, fixed for every image) of a small CNN,
with a 95% interval over chips::

  >>> import jaxnoise as jn
  >>> ds = jn.load_dataset("digits")
  >>> model = jn.get_model("cnn", input_shape=ds.image_shape, num_classes=10)
  >>> variables = model.init(jn.key(0))
  >>> spec = jn.NoiseSpec(weight_eta=0.1)           # sigma = 0.1 max|W| per layer (the default convention)
  >>> res = jn.evaluate(model, variables, ds.test.images, ds.test.labels, spec, key=0, n_chips=4,
  ...                   preprocess=ds.preprocess)
  >>> res.per_chip.shape
  (4,)
  >>> bool(0.0 <= res.mean <= 1.0) and res.ci95[0] <= res.mean <= res.ci95[1]
  True

The same key gives the same chips; a scale sweep compiles one program::

  >>> again = jn.evaluate(model, variables, ds.test.images, ds.test.labels, spec, key=0, n_chips=4,
  ...                     preprocess=ds.preprocess)
  >>> bool((again.per_chip == res.per_chip).all())
  True
  >>> sweep = jn.sweep(model, variables, ds.test.images, ds.test.labels, spec, weight_etas=[0.0, 0.1],
  ...                  key=0, n_chips=4, preprocess=ds.preprocess)
  >>> [r.n_chips for r in sweep]
  [4, 4]

One evaluator batches the test set once and serves every call (the functions above are one-call adapters)::

  >>> mc = jn.MonteCarlo(model, ds.test.images, ds.test.labels, preprocess=ds.preprocess)
  >>> bool((mc.evaluate(variables, spec, key=0, n_chips=4).per_chip == res.per_chip).all())
  True
  >>> mc.clean(variables).n_chips                   # noise-free: one "chip", no interval
  1
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    # keys and noise
    "NoiseSpec": "jaxnoise.noise",
    "name_key": "jaxnoise.noise",
    "calibrate_activations": "jaxnoise.noise",
    "QuantSpec": "jaxnoise.quant",
    # analog devices (aihwkit's model)
    "AnalogSpec": "jaxnoise.analog",
    "IOParams": "jaxnoise.analog",
    "PCMModel": "jaxnoise.analog",
    "analog_preset": ("jaxnoise.analog", "preset"),
    "calibrate_input_ranges": "jaxnoise.analog",
    "init_input_ranges": "jaxnoise.analog",
    # models and data
    "Model": "jaxnoise.models",
    "get_model": "jaxnoise.models",
    "load_dataset": "jaxnoise.data",
    "load_variables": "jaxnoise.checkpoint",
    "save_variables": "jaxnoise.checkpoint",
    # Monte Carlo evaluation
    "MCResult": "jaxnoise.robustness",
    "MonteCarlo": "jaxnoise.robustness",
    "evaluate": "jaxnoise.robustness",
    "evaluate_many": "jaxnoise.robustness",
    "sweep": "jaxnoise.robustness",
    "evaluate_analog": "jaxnoise.robustness",
    "sensitivity_map": "jaxnoise.sensitivity",
    # training and the paper methods
    "TrainConfig": "jaxnoise.train",
    "train_model": ("jaxnoise.train", "train"),   # ``jaxnoise.train`` is the module
    "make_loss": "jaxnoise.methods",
    "DenoiserConfig": "jaxnoise.denoise",
    "denoised": "jaxnoise.denoise",
    "denoiser_loss": "jaxnoise.denoise",
    "train_denoisers": "jaxnoise.denoise",
    "search_placement": ("jaxnoise.placement", "search"),
    # statistics and experiments
    "paired_interval": ("jaxnoise.stats", "paired"),
    "welch_interval": ("jaxnoise.stats", "welch"),
    "interval_over_seeds": ("jaxnoise.stats", "over_seeds"),
    "load_config": "jaxnoise.experiment",
    "run_experiment": ("jaxnoise.experiment", "run"),
}

__all__ = sorted([*_EXPORTS, "key"])


def key(seed: int):
    """``jax.random.key(seed)``: a typed PRNG key (the library derives every other key from it by name)."""
    import jax  # noqa: PLC0415 (lazy: importing jaxnoise stays cheap)
    return jax.random.key(seed)


# old public name -> its new name (issue 19: "device" means a JAX device; the analog hardware is "analog")
_RENAMED = {"device_preset": "analog_preset", "evaluate_device": "evaluate_analog"}


def __getattr__(name: str):
    if name in _RENAMED:
        import warnings  # noqa: PLC0415
        warnings.warn(f"jaxnoise.{name} is deprecated: use jaxnoise.{_RENAMED[name]}.", DeprecationWarning,
                      stacklevel=2)
        return __getattr__(_RENAMED[name])
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'jaxnoise' has no attribute {name!r}; the curated names are "
                             f"jaxnoise.__all__, the rest live in the submodules (jaxnoise.noise, ...).")
    module, attr = target if isinstance(target, tuple) else (target, name)
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value   # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
