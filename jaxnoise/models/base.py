"""The :class:`Model` wrapper: one pure ``forward(scope, x)`` gives ``init``, ``apply`` and the site lists."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxnoise import analog as analog_lib
from jaxnoise import noise as noise_lib
from jaxnoise import quant as quant_lib
from jaxnoise.models.layers import Scope

Variables = dict[str, Any]  # {"params": ..., "batch_stats": ...}


class Chip(NamedTuple):
    """One simulated chip: a value, fixed for every input it sees (a pytree: map, scan or jit over chips).

    Made by :meth:`Model.sample_chip` (a Monte Carlo index, or a training draw) and used by
    :meth:`Model.apply` (``chip=``), which then draws only the pass's own noise from its ``key`` (activation noise,
    and the analog I/O noise of a read chip).

    Attributes:
      weights: the weights its MVMs use: the parameters quantized (``Model.quant``), then one weight-noise draw.
      device: the analog device it is programmed on (``jaxnoise.analog.AnalogSpec``), or None: digital MVMs.
      programmed: ``jaxnoise.analog.program_chip``'s state (conductances and drift exponents), or None.
      state: the chip read at one time (``jaxnoise.analog.ChipRead``, from :meth:`read`), or None. A chip with a
        device runs analog MVMs once read; unread, it is refused by ``apply``.
    """

    weights: Any
    device: analog_lib.AnalogSpec | None = None
    programmed: Any = None
    state: analog_lib.ChipRead | None = None

    def read(self, t_inference: Any, key: jax.Array) -> Chip:
        """This chip read ``t_inference`` seconds after programming, read noise from ``key``
        (``jaxnoise.analog.read_chip``): drift is fixed by the chip, read noise is fresh per read. A digital chip
        is returned as it is."""
        if self.device is None:
            return self
        return self._replace(state=analog_lib.ChipRead(self.device, analog_lib.read_chip(
            key, self.programmed, t_inference, self.device)))


class Output(NamedTuple):
    """What :meth:`Model.apply` returns, each kind of value in its own field (a pytree: fine under jit and vmap).

    ``out[:2]`` is ``(logits, features)``.

    Attributes:
      logits: (batch, num_classes).
      features: ``{name: array}`` for every name of ``Model.feature_names`` (the values after any tap).
      state: with ``train=True``, the updated BatchNorm running statistics (the structure of
        ``variables["batch_stats"]``); else None.
      captured: with ``capture_mvm=True``, the clean (pre-noise) outputs and the inputs of every MVM site
        (:class:`jaxnoise.noise.Captured`); else None.
      aux: what the model's own ``taps`` recorded at their tap points, ``{point: {...}}`` (the probabilistic
        denoising blocks' ``{"input", "mean", "log_var"}``); ``{}`` when nothing.
    """

    logits: jax.Array
    features: dict[str, jax.Array]
    state: dict[str, Any] | None = None
    captured: noise_lib.Captured | None = None
    aux: dict[str, Any] = {}


@dataclasses.dataclass(frozen=True)
class Model:
    """A pure-function model.

    Attributes:
      name: registry name (``"resnet20"``).
      forward: ``forward(scope, x) -> (logits, features)``, features a dict of named intermediate outputs.
      input_shape: shape of one input example, (H, W, C).
      num_classes: number of logits.
      config: the constructor arguments, for records (with ``"quant"``: the quantization's config).
      quant: weight/activation quantization (:class:`~jaxnoise.quant.QuantSpec`), or None for float. The
        kernels are quantized before any weight noise, so noise acts on the quantized weights; learned steps are
        parameters (``w_step``/``a_step``, see :func:`jaxnoise.quant.init_steps`). Use :meth:`with_quant`.
      input_ranges: ``{layer: (T_in, T_out)}``: layers with learned input ranges (aihwkit's
        ``InputRangeParameter``), a parameter ``input_range`` of that shape (one per tile) beside each kernel, used
        by an analog MVM under ``IOParams(input_range=...)``. Use :meth:`with_input_ranges` (or
        ``jaxnoise.analog.init_input_ranges``).
      taps: ``{tap point: fn(scope, name, h) -> h}``: insertions at points of :attr:`tap_names` (what
        ``jaxnoise.denoise.denoised`` adds: a block per site), run in every pass before ``apply``'s own ``tap``;
        their parameters live under the scope they are given. None: none.
    """

    name: str
    forward: Callable[[Scope, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
    input_shape: tuple[int, ...]
    num_classes: int
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    quant: quant_lib.QuantSpec | None = None
    input_ranges: Mapping[str, tuple[int, int]] | None = None
    taps: Mapping[str, Callable[[Scope, str, jax.Array], jax.Array]] | None = None

    def with_quant(self, quant: quant_lib.QuantSpec | Mapping[str, Any] | None) -> Model:
        """The same model with ``quant`` (a QuantSpec, its ``to_config()`` dict, or None for float), recorded in
        ``config["quant"]`` so checkpoints and result files rebuild it."""
        quant = quant_lib.QuantSpec.from_config(quant)
        config = {k: v for k, v in self.config.items() if k != "quant"}
        if quant is not None:
            config["quant"] = quant.to_config()
        return dataclasses.replace(self, config=config, quant=quant)

    def with_input_ranges(self, shapes: Mapping[str, Any] | None) -> Model:
        """The same model with learned input ranges at the layers of ``shapes`` (``{layer: (T_in, T_out)}``, the
        tile grid of each layer; None or empty: none), recorded in ``config["input_ranges"]`` so checkpoints and
        result files rebuild it. Unknown layer names or bad shapes raise a ValueError."""
        config = {k: v for k, v in self.config.items() if k != "input_ranges"}
        if not shapes:
            return dataclasses.replace(self, config=config, input_ranges=None)
        if not isinstance(shapes, Mapping):
            raise ValueError(f"input_ranges must map layer names to (T_in, T_out) tile grids, got "
                             f"{type(shapes).__name__}.")
        clean = {}
        for site, shape in shapes.items():
            shape = tuple(shape) if isinstance(shape, (tuple, list)) else shape
            if (not isinstance(shape, tuple) or len(shape) != 2
                    or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape)):
                raise ValueError(f"input_ranges[{site!r}]={shapes[site]!r}: give the layer's tile grid (T_in, T_out) "
                                 f"as two integers >= 1 (jaxnoise.analog.tile_layout(kernel.shape, spec).shape[:2]).")
            clean[str(site)] = shape
        model = dataclasses.replace(self, config={**config, "input_ranges": {k: list(v) for k, v in clean.items()}},
                                    input_ranges=clean)
        layers = self.analog_layers
        unknown = sorted(set(clean) - set(layers))
        if unknown:
            raise ValueError(f"input_ranges names layers {unknown[:5]} that {self.name} does not have; its layers: "
                             f"{', '.join(layers)}.")
        return model

    def chip_weights(self, params: Mapping[str, Any], key: jax.Array | None = None,
                     noise: noise_lib.NoiseSpec | None = None) -> Any:
        """The weights the MVMs of one chip use: ``params`` quantized by ``self.quant`` (when set), then one
        weight-noise draw ``noise_lib.perturb_weights(weight_key(key), ., noise)`` on the quantized values (when
        ``key`` and ``noise`` are given), so ``additive_rel_max`` is relative to ``max|W_q|``. Both act on the
        analog layers' kernels only (:attr:`analog_weight_paths`). :meth:`sample_chip` wraps them in a
        :class:`Chip`."""
        paths = self.analog_weight_paths
        params = quant_lib.quantize_params(params, self.quant, analog_paths=paths)
        if key is not None and noise is not None:
            params = noise_lib.perturb_weights(noise_lib.weight_key(key), params, noise, analog_paths=paths)
        return params

    def sample_chip(self, key: jax.Array, params: Mapping[str, Any], noise: noise_lib.NoiseSpec | None = None,
                    device: analog_lib.AnalogSpec | None = None) -> Chip:
        """The chip of ``key``: its weights (:meth:`chip_weights`: quantized, then the weight-noise draw of
        ``weight_key(key)`` when ``noise`` has weight noise) and, with a ``device``, those weights programmed
        from ``analog.chip_key(key)`` (:func:`jaxnoise.analog.program_chip`); :meth:`Chip.read` reads it.

        Examples:
          >>> chip = model.sample_chip(chip_key, variables["params"], NoiseSpec(weight_eta=0.1))  # doctest: +SKIP
          >>> logits = model.apply(variables, x, chip=chip).logits   # the same weights for every batch  # doctest: +SKIP
        """
        weights = self.chip_weights(params, key, noise if noise is not None and noise.has_weight_noise else None)
        if device is None:
            return Chip(weights)
        return Chip(weights, device, analog_lib.program_chip(analog_lib.chip_key(key), weights, device,
                                                             layers=self.analog_layers))

    def pass_chip(self, key: jax.Array, params: Mapping[str, Any], noise: noise_lib.NoiseSpec | None = None,
                  device: analog_lib.AnalogSpec | None = None) -> Chip:
        """A fresh chip for one forward pass (training draws one per step and draw): :meth:`sample_chip` read at
        ``device.t_inference`` with the read key ``name_key(analog.chip_key(key), "jaxnoise/device/read_pass")``
        (:func:`jaxnoise.analog.read`); an ideal device, or none, gives a digital chip."""
        if device is None or device.is_ideal:
            return self.sample_chip(key, params, noise)
        chip = self.sample_chip(key, params, noise, device)
        read_key = noise_lib.name_key(analog_lib.chip_key(key), "jaxnoise/device/read_pass")
        return chip.read(device.t_inference, read_key)

    def init(self, key: jax.Array, batch_size: int = 2) -> Variables:
        """Fresh variables; every leaf's initialisation key is derived from its path."""
        return self._jitted_init(key, batch_size=batch_size)

    def _init(self, key: jax.Array, batch_size: int) -> Variables:
        scope = Scope(init_key=key, quant=self.quant, input_ranges=self.input_ranges, taps=self.taps)
        self.forward(scope, jnp.zeros((batch_size,) + tuple(self.input_shape), jnp.float32))
        params = scope.created_params
        if self.quant is not None:
            params = quant_lib.init_weight_steps(params, self.quant, analog_paths=scope.analog_weight_paths())
        return {"params": params, "batch_stats": scope.created_stats}

    @functools.cached_property
    def _jitted_init(self):
        # One compilation per model instead of one eager random.normal per parameter shape.
        return jax.jit(self._init, static_argnames="batch_size")

    def apply(self, variables: Variables, x: jax.Array, *, key: jax.Array | None = None,
              noise: noise_lib.NoiseSpec | None = None, chip: Chip | None = None, train: bool = False,
              capture_mvm: bool = False, tap: Callable | None = None,
              bn_momentum: float = 0.1) -> Output:
        """Runs the model, noisy when both ``key`` and ``noise`` are given.

        Args:
          variables: ``{"params": ..., "batch_stats": ...}``.
          x: preprocessed inputs, float, shape (batch,) + ``input_shape``.
          key: the forward pass key: activation noise uses ``noise.activation_key(key)`` and a read chip's I/O
            noise ``name_key(key, "jaxnoise/device/io")``; without ``chip``, weight noise uses
            ``noise.weight_key(key)`` (a fresh chip per call). None means exact.
          noise: a :class:`~jaxnoise.noise.NoiseSpec` or None.
          chip: a :class:`Chip` (:meth:`sample_chip`, read with :meth:`Chip.read` when it has a device): its
            weights are used as they are in place of ``variables["params"]`` (no quantization or weight noise
            here; ``noise`` then applies its activation noise only), and a read chip's MVMs are analog. The
            Monte Carlo evaluator makes one per chip; training makes one per pass (:meth:`pass_chip`).
          train: BatchNorm in training mode; ``state`` then holds the updated running statistics (same structure
            as ``variables["batch_stats"]``).
          capture_mvm: record the clean (pre-noise) output and the input of every activation site in
            ``captured``.
          tap: ``tap(scope, name, x) -> x`` called at every tap point (``self.tap_names``) with the root
            :class:`~jaxnoise.models.layers.Scope`, after the model's own ``taps``; what it returns flows on (and
            is the reported feature). For gradient probes and recorders. None: identity.
          bn_momentum: with ``train``, the weight of this batch's statistics in the updated running statistics
            (PyTorch's 0.1; 1.0 returns the batch's own mean and unbiased variance).

        Returns:
          An :class:`Output`: ``logits``, ``features`` (each name of ``self.feature_names``), ``state`` (with
          ``train``), ``captured`` (with ``capture_mvm``), ``aux`` (what the model's taps recorded).

        Examples:
          >>> out = model.apply(variables, x, train=True)                    # doctest: +SKIP
          >>> out.logits.shape, sorted(out.features) == sorted(model.feature_names), out.state is not None
        """
        self.check_input(x)
        analog = None
        if chip is None:
            params = self.chip_weights(variables["params"], key, noise)
        elif not isinstance(chip, Chip):
            raise TypeError(f"chip must be a jaxnoise.models.Chip (model.sample_chip(...)), got "
                            f"{type(chip).__name__}.")
        else:
            params = chip.weights
            if chip.device is not None and chip.state is None:
                raise ValueError("this chip is programmed but not read: pass chip.read(t_inference, read_key) "
                                 "(drift and read noise at that time).")
            if chip.state is not None:   # analog MVMs; without a pass key, no I/O noise (quantisation still applies)
                analog = analog_lib.AnalogContext(chip.state, key)
        sites = noise_lib.SiteContext(key, noise, capture=capture_mvm, analog=analog)
        scope = Scope(params, variables.get("batch_stats", {}), sites=sites, train=train, tap=tap, taps=self.taps,
                      quant=self.quant, input_ranges=self.input_ranges, bn_momentum=bn_momentum)
        logits, features = self.forward(scope, x)
        return Output(logits, dict(features), scope.new_stats if train else None,
                      noise_lib.Captured(sites.captured, sites.captured_inputs) if capture_mvm else None,
                      dict(scope.tap_outputs))

    def check_input(self, x: Any) -> None:
        """Raises a ValueError naming the problem when ``x`` is not a float batch of ``input_shape``."""
        shape = tuple(getattr(x, "shape", ()))
        dtype = getattr(x, "dtype", None)
        expected = (None,) + tuple(self.input_shape)
        if len(shape) != len(expected) or shape[1:] != tuple(self.input_shape):
            raise ValueError(f"{self.name} expects inputs of shape (batch, {', '.join(map(str, self.input_shape))}), "
                             f"got {shape}: pass a batch of preprocessed images (dataset.preprocess).")
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{self.name} expects floating-point inputs, got dtype {dtype}: raw uint8 images must "
                             f"go through dataset.preprocess (scaling and normalisation) first.")

    @functools.cached_property
    def _names(self) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], dict[str, Any], tuple[str, ...],
                              dict[str, dict[str, Any]]]:
        variables = jax.eval_shape(self.init, jax.random.key(0))
        ctx = noise_lib.SiteContext()

        order: list[str] = []  # dict pytrees come back key-sorted; keep forward order
        taps: list[str] = []
        layers: dict[str, dict[str, Any]] = {}
        analog: list[str] = []

        def tap(root, name, h):
            taps.append(name)
            return h

        def run(v, x):
            scope = Scope(v["params"], v["batch_stats"], sites=ctx, quant=self.quant,
                          input_ranges=self.input_ranges, tap=tap, taps=self.taps)
            logits, feats = self.forward(scope, x)
            order.extend(k for k, v in feats.items() if not isinstance(v, dict))
            layers.update(scope.layers)
            analog.extend(scope.analog_weight_paths())
            return logits

        jax.eval_shape(run, variables, jax.ShapeDtypeStruct((1,) + tuple(self.input_shape), jnp.float32))
        weight_paths = noise_lib.weight_noise_sites(variables["params"], analog_paths=analog)
        return tuple(ctx.sites), tuple(order), weight_paths, dict(ctx.geometry), tuple(taps), layers

    @property
    def mvm_geometry(self) -> dict[str, dict[str, int] | None]:
        """``{site: {"stride", "padding"}}`` of every conv MVM, None for a dense one."""
        return {k: None if v is None else dict(v) for k, v in self._names[3].items()}

    @property
    def sites(self) -> tuple[str, ...]:
        """Names of the activation-noise sites (every analog MVM output), in forward order."""
        return self._names[0]

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Names of the intermediate features ``apply`` returns."""
        return self._names[1]

    @property
    def tap_names(self) -> tuple[str, ...]:
        """Every point where a ``tap`` hook is called, in forward order: the features (``feature_names``) and the
        inner points of the residual branches (``"layer1/0/mid"``; ImageNet bottlenecks ``.../mid1``, ``/mid2``),
        which are not returned features. Denoising blocks may sit at any of them."""
        return self._names[4]

    @property
    def analog_layers(self) -> tuple[str, ...]:
        """The analog layers (``"layer1/0/conv1"``), as ``Scope.conv``/``Scope.dense`` register them, in forward
        order: the MVMs on the analog array, the only layers that get weight noise, quantization, a device
        mapping and weight decay. The single source of truth for "analog"; layers built with
        ``Scope.digital_conv``/``digital_dense`` (denoising blocks) are not among them."""
        return tuple(name for name, entry in self._names[5].items() if entry["analog"])

    @property
    def digital_layers(self) -> tuple[str, ...]:
        """The layers registered as digital (``Scope.digital_conv``/``digital_dense``), in forward order."""
        return tuple(name for name, entry in self._names[5].items() if not entry["analog"])

    @property
    def analog_weight_paths(self) -> tuple[str, ...]:
        """The parameter paths of the analog layers' kernels (``"layer1/0/conv1/kernel"``), in forward order: what
        ``noise.perturb_weights``, ``quant.quantize_params`` and the weight decay may select (``analog_paths=``)."""
        return tuple(entry["weight"] for entry in self._names[5].values() if entry["analog"])

    @property
    def weight_noise_paths(self) -> tuple[str, ...]:
        """Parameter paths that get weight noise under the default ``NoiseSpec.weight_paths``."""
        return self._names[2]

    def param_count(self, variables: Variables | None = None) -> int:
        """Number of trainable parameters (``params`` leaves; BatchNorm running statistics excluded)."""
        params = (variables or jax.eval_shape(self.init, jax.random.key(0)))["params"]
        return int(sum(math.prod(p.shape) for p in jax.tree.leaves(params)))
