"""Layers as pure functions over a :class:`Scope`, which threads params, BatchNorm state and activation sites.

A model is a function ``forward(scope, x) -> (logits, features)``. The same function initialises the model
(``Scope(init_key=...)`` creates missing parameters, shape-inferred, like ``flax.linen``) and applies it. Every
``conv``/``dense`` output is an analog MVM output and goes through the :class:`~jaxnoise.noise.SiteContext` under
the layer's path (``"layer1/0/conv1"``): that is where activation noise is added, before BatchNorm and before the
digital bias. Parameter and initialisation keys are derived from paths, never from call order.

**Analog by registration.** ``conv``/``dense`` register their layer as analog in the root scope (``layers``), and
``digital_conv``/``digital_dense`` as digital (exact, no site, whatever their leaves are named). The model reads
the registry (``Model.analog_layers``, ``Model.analog_weight_paths``); weight noise, quantization, device mapping,
weight decay and sensitivity maps select among the analog layers it lists, never by a leaf's name.

Layouts follow Flax: conv kernels (kh, kw, in, out), dense kernels (in, out); BatchNorm ``scale``/``bias`` in
``params`` and ``mean``/``var`` in ``batch_stats``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnoise import noise as noise_lib
from jaxnoise import quant as quant_lib


class Scope:
    """Threads the variables of one forward pass through pure layer functions.

    Args:
      params: the parameter tree (nested dicts), or None/{} with ``init_key`` to create them.
      batch_stats: BatchNorm running statistics (nested dicts).
      sites: the activation-site handler of this pass.
      train: BatchNorm uses batch statistics and records updated running statistics in ``new_stats``.
      init_key: when given, missing parameters are created (He-normal kernels, keyed by path).
      bn_momentum: weight of the new batch statistic in the running average (PyTorch's 0.1).
      tap: ``tap(scope, name, x) -> x``, called by :meth:`feature` at every tap point (block outputs, stem, the
        inner points): the pass's own hook (gradient probes, recorders). None: identity.
      taps: ``{name: fn(scope, name, x) -> x}``: the model's own insertions at tap points (``Model.taps``: the
        denoising blocks), run before ``tap``; what they record for the pass goes in the root's ``tap_outputs``.
      quant: the model's quantization; a selected layer's input goes through its LSQ quantizer (learned step
        ``a_step`` beside the kernel) before the MVM. Kernels arrive already quantized (``Model.apply``).
      input_ranges: ``{layer: (T_in, T_out)}``: the layers with learned input ranges (a leaf ``input_range`` of
        that shape beside the kernel, created at init with aihwkit's ``init_value`` 3.0), passed to the MVM
        (``jaxnoise.analog.InputRange``).
    """

    def __init__(self, params=None, batch_stats=None, *, sites: noise_lib.SiteContext | None = None,
                 train: bool = False, init_key: jax.Array | None = None, bn_momentum: float = 0.1,
                 tap=None, taps=None, quant: quant_lib.QuantSpec | None = None, input_ranges=None,
                 _path: tuple[str, ...] = (), _root: Scope | None = None):
        self.params = {} if params is None else params
        self.batch_stats = {} if batch_stats is None else batch_stats
        self.sites = sites or noise_lib.SiteContext()
        self.train = train
        self.init_key = init_key
        self.bn_momentum = bn_momentum
        self.path = _path
        self.root = _root or self
        if _root is None:
            self.tap = tap
            self.site_taps = dict(taps or {})
            self.tap_outputs: dict[str, Any] = {}
            self.quant = quant
            self.input_ranges = dict(input_ranges or {})
            self.new_stats: dict[str, Any] = {}
            self.created_params: dict[str, Any] = {}
            self.created_stats: dict[str, Any] = {}
            self.layers: dict[str, dict[str, Any]] = {}   # {layer: {"analog", "weight"}}, in forward order

    def child(self, name: str | int) -> Scope:
        name = str(name)
        return Scope(self.params.get(name, {}) if self.params else {},
                     self.batch_stats.get(name, {}) if self.batch_stats else {},
                     sites=self.sites, train=self.train, init_key=self.init_key, bn_momentum=self.bn_momentum,
                     _path=self.path + (name,), _root=self.root)

    def feature(self, name: str, x):
        """Marks ``x`` as the named feature ``name`` (a model-level name such as ``"layer1/0"``) and returns it,
        after the model's insertion at ``name`` (the root's ``site_taps``, e.g. a denoising block) and the root's
        ``tap`` hook, when they are set (either may change it)."""
        root = self.root
        site_tap = root.site_taps.get(name)
        if site_tap is not None:
            x = site_tap(root, name, x)
        return x if root.tap is None else root.tap(root, name, x)

    def inner(self, name: str, x):
        """Marks ``x`` as the inner tap point ``self.name(name)`` (e.g. ``"layer1/0/mid"``: inside a residual
        branch, between two MVMs) and returns it after the root's ``tap`` hook. Unlike :meth:`feature` it is not
        one of the model's returned features (``Model.feature_names``); ``Model.tap_names`` lists both."""
        return self.feature(self.name(name), x)

    def param(self, name: str, shape, init_fn):
        """The parameter leaf ``name`` directly under this scope's path (created at init)."""
        return self._get("params", None, name, shape, init_fn)

    def quantized_input(self, name: str, x):
        """``x``, the input of layer ``name``, through the layer's activation quantizer when ``quant`` selects it."""
        quant = self.root.quant
        site = self.name(name)
        if quant is None or not quant.quantizes_input(site):
            return x
        step = self._get("params", name, quant_lib.ACT_STEP, (), ones)
        return quant_lib.quantize_input(x, step, quant.act_bits, quant.input_signed(site))

    def input_range(self, name: str):
        """The learned input ranges of layer ``name`` (``params[name]["input_range"]``), or None without them."""
        shape = self.root.input_ranges.get(self.name(name))
        if shape is None:
            return None
        return self._get("params", name, "input_range", tuple(shape), input_range_init)

    def name(self, *parts: str) -> str:
        return "/".join(self.path + tuple(str(p) for p in parts))

    def register(self, name: str, *, analog: bool, weight: str = "kernel") -> None:
        """Records layer ``name`` (under this scope) in the root's registry: analog (an MVM on the array: weight
        noise, quantization, device mapping, weight decay) or digital, its weight leaf ``weight``. One name
        registered as two different layers in one pass is an error."""
        layer = self.name(name)
        entry = {"analog": bool(analog), "weight": "/".join(p for p in (layer, weight) if p)}
        known = self.root.layers.get(layer)
        if known is not None and known != entry:
            raise ValueError(f"layer {layer!r} is registered twice, as {known} and as {entry}: give the layers "
                             f"distinct names.")
        self.root.layers[layer] = entry

    def analog_weight_paths(self) -> list[str]:
        """The weight leaves of the analog layers registered in the root so far (``Model.analog_weight_paths``)."""
        return [entry["weight"] for entry in self.root.layers.values() if entry["analog"]]

    # -- variable access -------------------------------------------------------------------------------------
    def _get(self, collection: str, layer: str, leaf: str, shape, init_fn):
        tree = self.params if collection == "params" else self.batch_stats
        if layer is None:  # a leaf directly under this scope
            value = tree.get(leaf) if tree else None
            parts: tuple[str, ...] = (leaf,)
        else:
            value = tree.get(layer, {}).get(leaf) if tree else None
            parts = (layer, leaf)
        if value is None:
            if self.init_key is None:
                raise KeyError(f"missing {collection} leaf {self.name(*parts)!r}: the variables do not match "
                               f"this model (initialise with model.init or load matching weights).")
            value = init_fn(noise_lib.name_key(self.init_key, self.name(*parts)), shape)
            created = self.root.created_params if collection == "params" else self.root.created_stats
            _set_nested(created, self.path + parts, value)
        elif tuple(value.shape) != tuple(shape):
            raise ValueError(f"{collection} leaf {self.name(*parts)!r} has shape {tuple(value.shape)}, the "
                             f"model expects {tuple(shape)}: the weights belong to a different architecture.")
        return value

    # -- layers ------------------------------------------------------------------------------------------------
    def conv(self, name: str, x, features: int, kernel_size: int = 3, stride: int = 1,
             padding: int | None = None, bias: bool = False):
        """2-D convolution (NHWC), an analog MVM (``sites.mvm``): noise site ``self.name(name)``; bias digital."""
        padding = kernel_size // 2 if padding is None else padding
        cin = x.shape[-1]
        self.register(name, analog=True)
        kernel = self._get("params", name, "kernel", (kernel_size, kernel_size, cin, features), he_normal)
        x = self.quantized_input(name, x)
        if self.root.train and materialize_conv_inputs():
            x = materialized(x)
        def exact(x, kernel):
            return conv2d(x, kernel.astype(x.dtype), stride, padding)

        y = self.sites.mvm(self.name(name), x, kernel, exact, {"stride": stride, "padding": padding},
                           self.input_range(name))
        if bias:
            y = y + self._get("params", name, "bias", (features,), zeros).astype(y.dtype)
        return y

    def dense(self, name: str, x, features: int, bias: bool = True):
        """Fully connected layer, an analog MVM: noise site ``self.name(name)``; bias added digitally after."""
        self.register(name, analog=True)
        kernel = self._get("params", name, "kernel", (x.shape[-1], features), lecun_normal)
        x = self.quantized_input(name, x)
        y = self.sites.mvm(self.name(name), x, kernel, lambda x, k: x @ k.astype(x.dtype), None,
                           self.input_range(name))
        if bias:
            y = y + self._get("params", name, "bias", (features,), zeros).astype(y.dtype)
        return y

    def digital_conv(self, name: str, x, features: int, kernel_size: int = 3, stride: int = 1,
                     padding: int | None = None, bias: bool = True, *, init=None,
                     leaves: tuple[str, str] = ("kernel", "bias")):
        """2-D convolution (NHWC) computed digitally and exactly: no noise site, no quantization, never mapped to
        the device, no weight decay (a digital engine's layer, e.g. a denoising block). ``leaves``: the names of
        its kernel and bias leaves; ``init``: the kernel's initialiser (default :func:`he_normal`)."""
        padding = kernel_size // 2 if padding is None else padding
        init = he_normal if init is None else init
        self.register(name, analog=False, weight=leaves[0])
        kernel = self._get("params", name, leaves[0], (kernel_size, kernel_size, x.shape[-1], features), init)
        y = conv2d(x, kernel, stride, padding)
        if bias:
            y = y + self._get("params", name, leaves[1], (features,), zeros)
        return y

    def digital_dense(self, name: str, x, features: int, bias: bool = True, *, init=None,
                      leaves: tuple[str, str] = ("kernel", "bias")):
        """Fully connected layer computed digitally and exactly (see :meth:`digital_conv`) on the last axis;
        ``init`` defaults to :func:`lecun_normal`."""
        init = lecun_normal if init is None else init
        self.register(name, analog=False, weight=leaves[0])
        y = x @ self._get("params", name, leaves[0], (x.shape[-1], features), init)
        if bias:
            y = y + self._get("params", name, leaves[1], (features,), zeros)
        return y

    def batch_norm(self, name: str, x, eps: float = 1e-5):
        """BatchNorm over all axes but the last (digital, exact). Train mode records new running statistics.

        Running variance is updated with the unbiased batch variance, as PyTorch does.
        """
        c = x.shape[-1]
        scale = self._get("params", name, "scale", (c,), ones)
        bias = self._get("params", name, "bias", (c,), zeros)
        mean_r = self._get("batch_stats", name, "mean", (c,), zeros)
        var_r = self._get("batch_stats", name, "var", (c,), ones)
        if self.train:
            y, mean, var = batch_norm_train(x, scale, bias, eps)
            n = int(np.prod(x.shape[:-1]))
            m = self.bn_momentum
            _set_nested(self.root.new_stats, self.path + (name,), {
                "mean": (1 - m) * mean_r + m * jax.lax.stop_gradient(mean),
                "var": (1 - m) * var_r + m * jax.lax.stop_gradient(var) * n / max(n - 1, 1),
            })
            return y
        return (x - mean_r) * jax.lax.rsqrt(var_r + eps) * scale + bias


def conv2d(x, kernel, stride: int, padding: int):
    """The exact NHWC x HWIO convolution of both conv layers (symmetric ``padding``, square ``stride``)."""
    return jax.lax.conv_general_dilated(x, kernel, window_strides=(stride, stride),
                                        padding=((padding, padding), (padding, padding)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


MATERIALIZE_CONV_INPUTS: bool | None = None   # None: on the CPU backend only (see materialize_conv_inputs)


def materialize_conv_inputs() -> bool:
    """Whether train-mode convolutions take their input through :func:`materialized`: ``MATERIALIZE_CONV_INPUTS``,
    or when None (the default) on the CPU backend, where it makes the ResNet-20 train step ~20% faster
    (``benchmarks/train_step_profile.py``); elsewhere XLA transposes well and it would only cost a copy."""
    if MATERIALIZE_CONV_INPUTS is not None:
        return bool(MATERIALIZE_CONV_INPUTS)
    return jax.default_backend() == "cpu"


@jax.custom_vjp
def materialized(x):
    """``x`` unchanged (exactly: a product with the identity matrix over the last axis, whose gradient is the
    identity), computed into a buffer of its own that XLA cannot fuse into its consumers.

    Why: for a convolution's kernel gradient XLA:CPU transposes the input to (C, H, W, N); when the input is an
    elementwise chain (BatchNorm, ReLU, the residual sum) it fuses the chain into that transpose and recomputes it
    with strided reads, ~13x slower than transposing a buffer (0.34 vs 4.5 ms at 128x32x32x16,
    ``benchmarks/transpose_fusion.py``), 144 of 352 ms of the
    ResNet-20 step. An optimization barrier does not survive XLA's pipeline; a dot does. One caveat: an inf in one
    channel makes the pixel's other channels NaN (inf x 0), a step that has diverged anyway.
    """
    eye = jnp.eye(x.shape[-1], dtype=x.dtype)
    return jnp.einsum("...c,cd->...d", x, eye, precision=jax.lax.Precision.HIGHEST)


materialized.defvjp(lambda x: (materialized(x), None), lambda _, g: (g,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x, scale, bias, eps: float = 1e-5):
    """BatchNorm on the statistics of ``x`` over all axes but the last: ``(y, mean, var)`` with ``y = (x - mean)
    / sqrt(var + eps) * scale + bias`` and the biased batch variance ``var``.

    Its gradient is the closed form (two channel sums and one elementwise pass) instead of autodiff's chain through
    the mean and the variance, which XLA:CPU runs about 2x slower (``benchmarks/train_step_breakdown.py``). The
    ``mean`` and ``var`` outputs are differentiable too (their cotangents enter ``dx``); equal to autodiff within
    float tolerance (tests/test_models.py).
    """
    return _batch_norm_train_fwd(x, scale, bias, eps)[0]


def _batch_norm_train_fwd(x, scale, bias, eps):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    xc = x - mean
    var = jnp.mean(jnp.square(xc), axes)
    rstd = jax.lax.rsqrt(var + eps)
    return (xc * (rstd * scale) + bias, mean, var), (x, mean, rstd, scale)


def _batch_norm_train_bwd(eps, residuals, cotangents):
    x, mean, rstd, scale = residuals
    dy, dmean, dvar = cotangents
    axes = tuple(range(x.ndim - 1))
    n = int(np.prod(x.shape[:-1]))
    xc = x - mean
    xhat = xc * rstd
    dbias = jnp.sum(dy, axes)
    dscale = jnp.sum(dy * xhat, axes)
    dx = (scale * rstd) * (dy - (dbias + xhat * dscale) / n) + (dmean + 2.0 * dvar * xc) / n
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


def _set_nested(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def he_normal(key, shape):
    """He-normal initialiser: std sqrt(2 / fan_in), fan_in = product of all axes but the last."""
    fan_in = int(np.prod(shape[:-1]))
    return jax.random.normal(key, shape, jnp.float32) * np.sqrt(2.0 / fan_in)


def lecun_normal(key, shape):
    """LeCun-normal initialiser for (in, out) kernels: std sqrt(1 / in)."""
    return jax.random.normal(key, shape, jnp.float32) * np.sqrt(1.0 / shape[0])


def zeros(key, shape):
    del key
    return jnp.zeros(shape, jnp.float32)


def input_range_init(key, shape):
    """A new learned input range: aihwkit's ``InputRangeParameter.init_value`` (3.0) on every tile."""
    del key
    return jnp.full(shape, 3.0, jnp.float32)


def ones(key, shape):
    del key
    return jnp.ones(shape, jnp.float32)
