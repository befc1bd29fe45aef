"""Analytical hardware cost of the digital denoiser engine: parameters, MACs, cycles, latency, on-chip buffers.

What is modelled
----------------
A CNN runs on analog compute-in-memory (CIM) tiles; small residual bottleneck **denoising blocks**
(:mod:`jaxnoise.denoise`) are inserted after selected layers and run on a dedicated **digital engine**: an
on-chip Gaussian noise generator (Box-Muller), ``P`` parallel 3x3 convolution cores, a small vector unit for
elementwise work, and on-chip buffers. For each placed block (:class:`BlockShape`) :func:`block_cost` counts, per
image, the parameters, the multiply-accumulates (MACs) of its conv/dense layers, its elementwise operations, the
engine cycles and latency, and the bytes of weight and activation buffer it needs. :func:`backbone_cost` gives the
analog backbone's MACs, crossbar tiles and latency (:class:`AnalogLayer`), and :func:`placement_cost` combines a
placement of blocks with the backbone into totals and relative overheads; :func:`markdown` prints them.

The block (as :mod:`jaxnoise.denoise` builds it), with ``C`` channels and bottleneck width ``b``:

* ``residual``: ``1x1 conv C->b (+bias, ReLU)``, ``3x3 conv b->b (+bias, ReLU)`` (dense ``b->b`` on 2-D
  features), ``1x1 conv b->C (+bias)``; the output ``r`` is added to the input ``h``.
* ``probabilistic``: the same trunk, plus two dense heads ``b->C`` (noise mean ``m`` and log-variance ``v`` per
  channel) on the globally average-pooled bottleneck; output ``h - m + g * r`` with the gain
  ``g = s2 / (s2 + var_c)``, ``s2 = exp(v)`` and ``var_c`` the spatial variance of input channel ``c`` (``h^2``
  on 2-D features).

Dataflow assumptions
--------------------
* **One block at a time.** The engine runs the blocks of a placement one after another, so its activation
  buffers are sized by the largest block; all blocks' weights stay resident in the weight buffer (no reloads).
* **Row streaming.** A spatial block consumes its input row by row: it keeps 3 rows of the bottleneck for the 3x3
  window and 2 rows of the ``C``-channel input for the residual add (the window delays the output by one row).
* **Cores split the work evenly.** The ``P`` cores split output channels (and output rows when a layer has fewer
  output channels than cores), so a layer takes ``ceil(MACs / (P * macs_per_core_per_cycle * efficiency))``
  cycles; 1x1 and dense layers use ``pointwise_efficiency``, 3x3 layers keep every multiplier busy.
* **Layers do not overlap.** Cycles add over the layers, the elementwise work, the Gaussian samples and a fixed
  per-block overhead: a throughput-bound model that ignores memory stalls (everything is on chip).
* **Biases and ReLUs are free**: a bias initialises the accumulator and the ReLU sits on the core's output.
* **Probabilistic blocks need whole-map statistics** (pooled bottleneck, channel variance) before the first output,
  so the bottleneck map (``H * W * b`` activations) is kept in a frame buffer until the heads have run; the
  up-projection, gain and mean subtraction then stream over it, re-reading ``h`` from the accelerator's activation
  memory (which holds it anyway as the next layer's input). ``frame_buffer_bytes`` is 0 for every other block.
* **The engine does not overlap with the analog tiles**: the denoiser latency adds to the backbone latency
  (``latency_overhead``). Analog layers run one after another, every tile of a layer in parallel, one MVM per
  output pixel; the digital partial-sum adds of multi-tile layers are not counted.

Operation counts (per image; ``n = H * W * C`` elements; ``H = W = 1`` on 2-D features)
---------------------------------------------------------------------------------------
* ``macs``: conv/dense MACs only, as :func:`jaxnoise.denoise.site_costs` counts them:
  ``H*W*(C*b + 9*b*b + b*C)`` (spatial; ``b*b`` middle on 2-D features), plus ``2*b*C`` for the probabilistic
  heads, which act once on the pooled bottleneck.
* ``elementwise_ops`` (vector unit): the residual add (``n``) for every block. A probabilistic block adds: the
  pooling sums (``H*W*b`` adds on spatial features, the ``1/(H*W)`` folded into the head weights; none on 2-D
  features), the channel variance (2 ops per element, sum and sum of squares, on spatial features; 1, the square
  ``h^2``, on 2-D features), ``4*C`` per-channel ops on spatial features (``exp`` lookup of the log-variance and
  3 to finish the variance ``S2/n - (S1/n)^2``; ``C``, the ``exp``, on 2-D features), and 3 per element for the
  correction: 1 divide-or-lookup for the gain (per element: exact on 2-D features, a conservative upper bound on
  spatial ones, where the gain is per channel) and 2 MAC-equivalents (multiply by the gain, subtract the mean).
* Gaussian samples (``gaussian_samples_per_image``, default 0: inference without sampling) cost
  ``gaussian_cycles_per_sample`` each on the Box-Muller unit; using a sample (e.g. ``m + s * z``) is assumed
  fused into the generator's output stage.

Reference: Azizi et al. 2024 (arXiv:2409.18553); the paper's engine has a Box-Muller generator, parallel 3x3
convolution cores and on-chip memory, but publishes no figures we could calibrate against, so the defaults are
assumptions, not the paper's numbers.

Examples:
  >>> block = BlockShape(site="layer2/0", height=16, width=16, channels=32, bottleneck=8)
  >>> block_cost(block)["macs"]
  278528
  >>> layers = [AnalogLayer("conv", rows=27, cols=16, mvms_per_image=1024)]
  >>> cost = placement_cost([block], layers)
  >>> print(markdown(cost))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "KINDS", "AnalogLayer", "BlockShape", "EngineConfig", "backbone_cost", "block_cost", "markdown", "placement_cost",
]

KINDS = ("residual", "probabilistic")


def _check_int(owner: str, name: str, value: Any, minimum: int) -> None:
    """Raises ValueError unless ``value`` is an int (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{owner}.{name}={value!r} is not an int; pass a whole number >= {minimum}.")
    if value < minimum:
        raise ValueError(f"{owner}.{name}={value!r} is below {minimum}; pass a whole number >= {minimum}.")


def _check_positive(owner: str, name: str, value: Any, allow_zero: bool = False) -> None:
    """Raises ValueError unless ``value`` is a finite real number ``> 0`` (``>= 0`` with ``allow_zero``)."""
    bound = ">= 0" if allow_zero else "> 0"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}.{name}={value!r} is not a finite number; pass a number {bound}.")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{owner}.{name}={value!r} is out of range; pass a number {bound}.")


@dataclasses.dataclass(frozen=True)
class BlockShape:
    """One placed denoising block, as :func:`jaxnoise.denoise.block_shapes` describes it.

    Attributes:
      site: the feature the block follows, e.g. ``"layer2/0"``.
      height: feature-map height ``H`` at the site (1 for 2-D features).
      width: feature-map width ``W`` (1 for 2-D features).
      channels: channels ``C`` of the feature.
      bottleneck: the bottleneck width ``b``.
      kind: ``"residual"`` or ``"probabilistic"`` (module docstring).
      spatial: True when the middle layer is a 3x3 conv on a (H, W, C) map; False for 2-D features (dense middle
        layer, ``height = width = 1``).

    Examples:
      >>> BlockShape(site="pre_logits", height=1, width=1, channels=64, bottleneck=16, spatial=False)
      BlockShape(site='pre_logits', height=1, width=1, channels=64, bottleneck=16, kind='residual', spatial=False)
    """

    site: str
    height: int
    width: int
    channels: int
    bottleneck: int
    kind: str = "residual"
    spatial: bool = True

    def __post_init__(self):
        for name in ("height", "width", "channels", "bottleneck"):
            _check_int("BlockShape", name, getattr(self, name), 1)
        if self.kind not in KINDS:
            raise ValueError(f"BlockShape.kind={self.kind!r} is unknown; choose one of {KINDS}.")
        if not isinstance(self.spatial, bool):
            raise ValueError(f"BlockShape.spatial={self.spatial!r}; pass True (3x3 middle) or False (dense).")
        if not self.spatial and (self.height, self.width) != (1, 1):
            raise ValueError(f"BlockShape(site={self.site!r}) has spatial=False but height x width = "
                             f"{self.height} x {self.width}; 2-D (dense) features need height=1 and width=1.")

    @property
    def elements(self) -> int:
        """Elements of the feature per image, ``H * W * C``."""
        return self.height * self.width * self.channels


@dataclasses.dataclass(frozen=True)
class AnalogLayer:
    """One analog matrix-vector-product (MVM) layer of the backbone.

    Attributes:
      name: the layer's activation-site name, e.g. ``"layer1/0/conv1"``.
      rows: MVM input length ``K = kh * kw * C_in`` (dense layers: input features).
      cols: MVM output length ``N = C_out``.
      mvms_per_image: MVMs per image: output pixels for a conv, 1 for a dense layer.

    Examples:
      >>> AnalogLayer(name="layer1/0/conv1", rows=3 * 3 * 16, cols=16, mvms_per_image=32 * 32).rows
      144
    """

    name: str
    rows: int
    cols: int
    mvms_per_image: int

    def __post_init__(self):
        for name in ("rows", "cols", "mvms_per_image"):
            _check_int("AnalogLayer", name, getattr(self, name), 1)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Every assumption of the cost model, with its default's justification.

    None of the defaults come from the paper (it publishes no engine figures); change them to model another engine.

    Attributes:
      num_cores: ``P`` parallel 3x3 convolution cores. 8: a small engine; enough to keep a bottleneck block's
        latency in the range of the analog layers' (microseconds) at CIFAR-size maps.
      macs_per_core_per_cycle: MACs a core completes per cycle. 9: a core is a 3x3 multiplier array that takes one
        3x3 window of one input channel per cycle.
      pointwise_efficiency: fraction of a core's multipliers a 1x1 conv or dense layer keeps busy, in (0, 1].
        1.0: the array's 9 multipliers can take 9 input channels of one pixel (adder tree reused); lower it for a
        rigid window datapath (1/9 when a 1x1 conv uses one multiplier per core).
      clock_hz: engine clock. 500 MHz: a common clock for small digital blocks in 22-28 nm accelerator chips.
      weight_bits: bits per stored weight and bias. 8: the block runs at the 8-bit precision typical of the
        converters around analog tiles.
      activation_bits: bits per buffered activation. 8: as ``weight_bits``.
      gaussian_cycles_per_sample: Box-Muller cost per Gaussian sample. 0.5: one pipelined unit turns two uniforms
        into two normals (the cosine and sine branches) per cycle.
      block_overhead_cycles: fixed cycles per block for pipeline fill/drain and control. 64: a few dozen pipeline
        stages (multiplier, adder tree, accumulator, activation, write-back) for each of the block's layers.
      elementwise_ops_per_cycle: vector-unit throughput for residual adds, gain, mean subtraction and statistics.
        16: a narrow 16-lane SIMD unit, small next to the 72 multipliers of 8 cores.
      tile_rows: rows (inputs) of one analog crossbar tile. 256: a common crossbar size in CIM prototypes.
      tile_cols: columns (outputs) of one tile. 256: as ``tile_rows``.
      analog_mvm_latency_s: one analog MVM on a tile (DAC, array read, ADC), every tile of a layer in parallel.
        100 ns: the order of published PCM/RRAM cores (tens to hundreds of ns per 8-bit MVM).

    Examples:
      >>> EngineConfig(num_cores=16, clock_hz=1e9).num_cores
      16
    """

    num_cores: int = 8
    macs_per_core_per_cycle: int = 9
    pointwise_efficiency: float = 1.0
    clock_hz: float = 500e6
    weight_bits: int = 8
    activation_bits: int = 8
    gaussian_cycles_per_sample: float = 0.5
    block_overhead_cycles: int = 64
    elementwise_ops_per_cycle: int = 16
    # analog backbone (for relative overheads)
    tile_rows: int = 256
    tile_cols: int = 256
    analog_mvm_latency_s: float = 100e-9

    def __post_init__(self):
        for name in ("num_cores", "macs_per_core_per_cycle", "weight_bits", "activation_bits",
                     "elementwise_ops_per_cycle", "tile_rows", "tile_cols"):
            _check_int("EngineConfig", name, getattr(self, name), 1)
        _check_int("EngineConfig", "block_overhead_cycles", self.block_overhead_cycles, 0)
        _check_positive("EngineConfig", "clock_hz", self.clock_hz)
        _check_positive("EngineConfig", "analog_mvm_latency_s", self.analog_mvm_latency_s)
        _check_positive("EngineConfig", "gaussian_cycles_per_sample", self.gaussian_cycles_per_sample,
                        allow_zero=True)
        eff = self.pointwise_efficiency
        if isinstance(eff, bool) or not isinstance(eff, (int, float)) or not 0 < eff <= 1:
            raise ValueError(f"EngineConfig.pointwise_efficiency={eff!r} is not in (0, 1]; pass the fraction of a "
                             f"core's multipliers a 1x1/dense layer keeps busy, e.g. 1.0 or 1/9.")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)


def _ceil_div(work: float, rate: float) -> int:
    """``ceil(work / rate)`` for non-negative work, robust to float round-off at exact multiples."""
    q = work / rate
    return max(0, math.ceil(q - 1e-9 * max(1.0, q)))


def _layer_macs(block: BlockShape) -> list[tuple[str, int, bool]]:
    """``(layer, MACs per image, is_3x3)`` of each conv/dense layer of the block (names as in denoise.py)."""
    hw, c, b = block.height * block.width, block.channels, block.bottleneck
    layers = [("down", hw * c * b, False),
              ("mid", hw * 9 * b * b, True) if block.spatial else ("mid", b * b, False),
              ("up", hw * b * c, False)]
    if block.kind == "probabilistic":  # heads act once on the pooled bottleneck
        layers += [("noise_mean", b * c, False), ("noise_log_var", b * c, False)]
    return layers


def _elementwise_ops(block: BlockShape) -> int:
    """Vector-unit operations per image (counting rules in the module docstring)."""
    n = block.elements
    ops = n  # residual add
    if block.kind == "probabilistic":
        hw, c, b = block.height * block.width, block.channels, block.bottleneck
        if block.spatial:
            ops += hw * b  # pooling sums
            ops += 2 * n  # channel variance: sum and sum of squares
            ops += 4 * c  # per channel: exp(log-var) lookup + variance finalisation
        else:
            ops += n  # var = h^2
            ops += c  # exp(log-var)
        ops += 3 * n  # gain divide-or-lookup, multiply by gain, subtract mean
    return ops


def block_cost(block: BlockShape, config: EngineConfig = EngineConfig(),
               gaussian_samples_per_image: int = 0) -> dict[str, Any]:
    """Cost of one block on the engine, per image.

    Args:
      block: the block's shape.
      config: the engine's assumptions.
      gaussian_samples_per_image: Gaussian samples the block draws per image on the Box-Muller unit (0: inference
        without sampling).

    Returns:
      A dict with the block's fields (``site``, ``kind``, ``height``, ``width``, ``channels``, ``bottleneck``,
      ``spatial``) and:

      * ``params``: weights and biases, ``C*b + b + (9*b*b or b*b) + b + b*C + C`` (+ ``2*(b*C + C)`` for the
        probabilistic heads).
      * ``macs``: conv/dense MACs per image; ``elementwise_ops``: vector-unit operations per image.
      * ``layers``: ``[{"name", "macs", "cycles"}]`` per conv/dense layer.
      * ``conv_cycles``, ``elementwise_cycles``, ``gaussian_cycles``, ``overhead_cycles`` and their sum ``cycles``.
      * ``latency_s``: ``cycles / clock_hz``.
      * ``weight_buffer_bytes``: ``ceil(params * weight_bits / 8)``.
      * ``line_buffer_bytes``: ``ceil((3*W*b + 2*W*C) * activation_bits / 8)`` (2-D features: ``(b + C)``
        activations); ``frame_buffer_bytes``: the probabilistic spatial block's bottleneck map,
        ``ceil(H*W*b * activation_bits / 8)``, else 0; ``activation_buffer_bytes``: their sum.

    Examples:
      >>> cost = block_cost(BlockShape(site="s", height=32, width=32, channels=16, bottleneck=4))
      >>> cost["params"], cost["macs"]
      (296, 278528)
    """
    if not isinstance(block, BlockShape):
        raise ValueError(f"block={block!r} is not a BlockShape; build one with BlockShape(site=..., ...).")
    if not isinstance(config, EngineConfig):
        raise ValueError(f"config={config!r} is not an EngineConfig; pass EngineConfig(...).")
    _check_int("block_cost", "gaussian_samples_per_image", gaussian_samples_per_image, 0)
    c, b, w = block.channels, block.bottleneck, block.width
    params = c * b + b + (9 * b * b if block.spatial else b * b) + b + b * c + c
    if block.kind == "probabilistic":
        params += 2 * (b * c + c)

    peak = config.num_cores * config.macs_per_core_per_cycle  # MACs per cycle of a 3x3 layer
    layers = []
    for name, macs, is_3x3 in _layer_macs(block):
        rate = peak if is_3x3 else peak * config.pointwise_efficiency
        layers.append({"name": name, "macs": macs, "cycles": _ceil_div(macs, rate)})
    elementwise_ops = _elementwise_ops(block)
    conv_cycles = sum(layer["cycles"] for layer in layers)
    elementwise_cycles = _ceil_div(elementwise_ops, config.elementwise_ops_per_cycle)
    gaussian_cycles = _ceil_div(gaussian_samples_per_image * config.gaussian_cycles_per_sample, 1.0)
    cycles = conv_cycles + elementwise_cycles + gaussian_cycles + config.block_overhead_cycles

    act_bytes = config.activation_bits / 8
    line = (3 * w * b + 2 * w * c) if block.spatial else (b + c)
    frame = block.height * w * b if (block.kind == "probabilistic" and block.spatial) else 0
    line_buffer_bytes = math.ceil(line * act_bytes)
    frame_buffer_bytes = math.ceil(frame * act_bytes)
    return {
        **dataclasses.asdict(block),
        "params": params,
        "macs": sum(layer["macs"] for layer in layers),
        "elementwise_ops": elementwise_ops,
        "gaussian_samples": gaussian_samples_per_image,
        "layers": layers,
        "conv_cycles": conv_cycles,
        "elementwise_cycles": elementwise_cycles,
        "gaussian_cycles": gaussian_cycles,
        "overhead_cycles": config.block_overhead_cycles,
        "cycles": cycles,
        "latency_s": cycles / config.clock_hz,
        "weight_buffer_bytes": math.ceil(params * config.weight_bits / 8),
        "line_buffer_bytes": line_buffer_bytes,
        "frame_buffer_bytes": frame_buffer_bytes,
        "activation_buffer_bytes": line_buffer_bytes + frame_buffer_bytes,
    }


def backbone_cost(layers: Sequence[AnalogLayer], config: EngineConfig = EngineConfig()) -> dict[str, Any]:
    """Cost of the analog backbone, per image.

    Layers run one after another; every tile of a layer works in parallel, so a layer takes
    ``mvms_per_image * analog_mvm_latency_s`` whatever its tile count (digital partial-sum adds not counted).

    Args:
      layers: the backbone's analog MVM layers (e.g. :func:`jaxnoise.denoise.analog_layers`).
      config: the engine's assumptions (tile size, MVM latency).

    Returns:
      ``{"layers", "params", "macs", "tiles", "analog_mvms", "latency_s"}``: the number of layers, kernel weights
      ``sum rows*cols`` (biases and BatchNorm excluded), MACs ``sum rows*cols*mvms_per_image``, crossbar tiles
      ``sum ceil(rows/tile_rows)*ceil(cols/tile_cols)``, MVMs ``sum mvms_per_image`` and the latency.

    Examples:
      >>> backbone_cost([AnalogLayer("fc", rows=64, cols=10, mvms_per_image=1)])["macs"]
      640
    """
    if not isinstance(config, EngineConfig):
        raise ValueError(f"config={config!r} is not an EngineConfig; pass EngineConfig(...).")
    for layer in layers:
        if not isinstance(layer, AnalogLayer):
            raise ValueError(f"layer {layer!r} is not an AnalogLayer; build one with AnalogLayer(name=..., ...).")
    mvms = sum(layer.mvms_per_image for layer in layers)
    return {
        "layers": len(layers),
        "params": sum(layer.rows * layer.cols for layer in layers),
        "macs": sum(layer.rows * layer.cols * layer.mvms_per_image for layer in layers),
        "tiles": sum(math.ceil(layer.rows / config.tile_rows) * math.ceil(layer.cols / config.tile_cols)
                     for layer in layers),
        "analog_mvms": mvms,
        "latency_s": mvms * config.analog_mvm_latency_s,
    }


def placement_cost(blocks: Sequence[BlockShape], layers: Sequence[AnalogLayer],
                   config: EngineConfig = EngineConfig(), gaussian_samples_per_image: int = 0,
                   backbone_params: int | None = None) -> dict[str, Any]:
    """Cost of a placement of blocks on the engine, and its overhead relative to the analog backbone.

    The engine runs one block at a time and does not overlap with the analog tiles, so latencies add; all blocks'
    weights stay resident, activation buffers are shared (the largest block sizes them).

    Args:
      blocks: the placed blocks (e.g. :func:`jaxnoise.denoise.block_shapes` of the placed sites); may be empty.
      layers: the backbone's analog MVM layers (at least one).
      config: the engine's assumptions.
      gaussian_samples_per_image: Gaussian samples per image drawn by each block (0: inference without sampling).
      backbone_params: the backbone's parameter count for ``param_overhead``; None: its kernel weights
        ``sum rows*cols`` (biases and BatchNorm excluded).

    Returns:
      A dict with:

      * ``config``: :meth:`EngineConfig.to_dict`; ``gaussian_samples_per_image``.
      * ``blocks``: :func:`block_cost` of each block.
      * ``totals``: ``params``, ``macs``, ``elementwise_ops``, ``cycles``, ``latency_s`` and
        ``weight_buffer_bytes`` summed over the blocks; ``line_buffer_bytes``, ``frame_buffer_bytes`` and
        ``activation_buffer_bytes`` as the maximum over the blocks (0 without blocks).
      * ``backbone``: :func:`backbone_cost`, with ``params`` replaced by ``backbone_params`` when given.
      * ``mac_overhead``: denoiser MACs / backbone MACs; ``latency_overhead``: denoiser latency / backbone
        latency (engine not overlapped with the tiles); ``param_overhead``: denoiser params / backbone params.

    Examples:
      >>> block = BlockShape(site="s", height=32, width=32, channels=16, bottleneck=4)
      >>> cost = placement_cost([block], [AnalogLayer("conv", rows=144, cols=16, mvms_per_image=1024)])
      >>> round(cost["mac_overhead"], 4)
      0.1181
    """
    if not layers:
        raise ValueError("layers is empty; pass the backbone's analog layers (jaxnoise.denoise.analog_layers(model)) "
                         "so the overheads have a denominator.")
    backbone = backbone_cost(layers, config)
    if backbone_params is not None:
        _check_int("placement_cost", "backbone_params", backbone_params, 1)
        backbone["params"] = backbone_params
    per_block = [block_cost(block, config, gaussian_samples_per_image) for block in blocks]
    totals = {key: sum(cost[key] for cost in per_block)
              for key in ("params", "macs", "elementwise_ops", "cycles", "latency_s", "weight_buffer_bytes")}
    for key in ("line_buffer_bytes", "frame_buffer_bytes", "activation_buffer_bytes"):
        totals[key] = max((cost[key] for cost in per_block), default=0)
    return {
        "config": config.to_dict(),
        "gaussian_samples_per_image": gaussian_samples_per_image,
        "blocks": per_block,
        "totals": totals,
        "backbone": backbone,
        "mac_overhead": totals["macs"] / backbone["macs"],
        "latency_overhead": totals["latency_s"] / backbone["latency_s"],
        "param_overhead": totals["params"] / backbone["params"],
    }


def _hw(cost: dict[str, Any]) -> str:
    return f"{cost['height']} x {cost['width']}" if cost["spatial"] else "dense"


def markdown(cost: dict[str, Any]) -> str:
    """A markdown table of a placement's cost: one row per block, a totals row, then the backbone and overheads.

    Args:
      cost: a dict from :func:`placement_cost`.

    Returns:
      The markdown text (ending with a newline). Buffers in bytes: weights, and activations (line + frame).

    Examples:
      >>> block = BlockShape(site="layer1/0", height=32, width=32, channels=16, bottleneck=4)
      >>> text = markdown(placement_cost([block], [AnalogLayer("conv", rows=144, cols=16, mvms_per_image=1024)]))
      >>> "layer1/0" in text
      True
    """
    if not isinstance(cost, dict) or not {"blocks", "totals", "backbone"} <= cost.keys():
        raise ValueError("cost is not a placement cost; pass the dict returned by placement_cost(blocks, layers).")
    cfg = cost.get("config", {})
    lines = [f"**Denoiser engine cost** (per image; {cfg.get('num_cores', '?')} cores at "
             f"{cfg.get('clock_hz', float('nan')) / 1e6:g} MHz; assumptions: jaxnoise.engine.EngineConfig)", "",
             "| site | kind | C | b | H x W | params | MACs | cycles | latency (us) | weight buf (B) | act. buf (B) |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for b in cost["blocks"]:
        lines.append(f"| {b['site']} | {b['kind']} | {b['channels']} | {b['bottleneck']} | {_hw(b)} | "
                     f"{b['params']:,} | {b['macs']:,} | {b['cycles']:,} | {b['latency_s'] * 1e6:.3f} | "
                     f"{b['weight_buffer_bytes']:,} | {b['activation_buffer_bytes']:,} |")
    t = cost["totals"]
    lines.append(f"| **total** | | | | | {t['params']:,} | {t['macs']:,} | {t['cycles']:,} | "
                 f"{t['latency_s'] * 1e6:.3f} | {t['weight_buffer_bytes']:,} | "
                 f"{t['activation_buffer_bytes']:,} (max) |")
    bb = cost["backbone"]
    lines += ["",
              f"Backbone (analog): {bb['layers']} layers, {bb['params']:,} params, {bb['macs']:,} MACs, "
              f"{bb['tiles']:,} tiles, {bb['analog_mvms']:,} MVMs, {bb['latency_s'] * 1e6:.3f} us.",
              f"Overhead: MACs {100 * cost['mac_overhead']:.2f}%, latency {100 * cost['latency_overhead']:.2f}% "
              f"(engine not overlapped with the tiles), params {100 * cost['param_overhead']:.2f}%."]
    return "\n".join(lines) + "\n"
