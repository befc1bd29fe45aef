"""Per-layer sensitivity maps: accuracy when noise hits one analog layer alone, for a grid of scales.

For every layer ``l`` and scale ``eta``, the map holds the Monte Carlo accuracy of the network with noise of scale
``eta`` at layer ``l`` and every other layer exact, plus a reference row with the noise at every layer. Layer
selection is a 0/1 mask in the spec (``NoiseSpec.weight_mask`` or ``act_mask``), and masks and scales are array
data: the (layers + 1) x scales settings are stacked and run as one call of one compiled program
(:func:`jaxnoise.robustness.evaluate_many`), mapped one setting after another (``setting_batch_size=1``, best on
CPU) or vmapped. Every setting uses the same chips (common random numbers), so the differences between layers are
sharper than independent draws would give.

Examples:
  >>> smap = sensitivity_map(model, variables, ds.test.images, ds.test.labels, noise="weight",
  ...                        scales=[0.02, 0.05, 0.1], key=0, n_chips=8, preprocess=ds.preprocess)
  >>> print(smap.to_markdown())
  >>> smap.plot("sensitivity.png")
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxnoise import _checks, report, robustness
from jaxnoise import noise as noise_lib
from jaxnoise.models.base import Model, Variables
from jaxnoise.robustness import MCResult

__all__ = ["ALL_LAYERS", "NOISE_TYPES", "SensitivityMap", "layer_masks", "sensitivity_map"]

NOISE_TYPES = ("weight", "activation")
ALL_LAYERS = "all_layers"  # name of the reference row: the noise at every layer at once


def _layer_of_path(path: str) -> str:
    """``layer1/0/conv1/kernel`` -> ``layer1/0/conv1``: the layer a weight leaf belongs to."""
    return path.rsplit("/", 1)[0] if "/" in path else path


def layer_masks(model: Model, variables: Variables, spec: noise_lib.NoiseSpec, noise: str,
                layers: Sequence[str] | None = None) -> tuple[tuple[str, ...], list[dict[str, float]]]:
    """The layers of a sensitivity map and the 0/1 mask that puts the noise on each one alone.

    Args:
      model: the model.
      variables: its variables (the weight leaves the spec perturbs are read from ``variables["params"]``).
      spec: the noise spec (its ``weight_paths`` select the noisy weight leaves).
      noise: ``"weight"`` (masks over parameter paths, ``NoiseSpec.weight_mask``) or ``"activation"`` (masks over
        activation sites, ``NoiseSpec.act_mask``).
      layers: a subset of layer names (default: every analog layer, in forward order). For weight noise a layer
        is a parameter path without its last component (``layer1/0/conv1`` for ``layer1/0/conv1/kernel``).

    Returns:
      ``(layers, masks)``: masks[i] maps every maskable name to 1.0 (in layer i) or 0.0.

    Raises:
      ValueError: unknown ``noise`` or layer names (the message lists the valid ones), or ``layers`` given as a
        bare string (``layers=("conv1",)``, not ``"conv1"``).
    """
    _checks.choice(noise, NOISE_TYPES, "noise type (noise=)")
    if layers is not None:
        layers = _checks.names(layers, "layers", example=(tuple(model.sites) or ("layer",))[0])
    if noise == "weight":
        names = noise_lib.weight_noise_sites(variables["params"], spec, analog_paths=model.analog_weight_paths)
        if not names:
            raise ValueError(f"spec.weight_paths={spec.weight_paths} select no parameter of {model.name}.")
        by_layer: dict[str, list[str]] = {}
        for p in names:
            by_layer.setdefault(_layer_of_path(p), []).append(p)
        order = {site: i for i, site in enumerate(model.sites)}  # forward order where known
        available = sorted(by_layer, key=lambda layer: (order.get(layer, len(order)), layer))
    else:
        names = tuple(model.sites)
        by_layer = {s: [s] for s in names}
        available = list(names)
    if layers is None:
        chosen = tuple(available)
    else:
        chosen = tuple(layers)
        unknown = [layer for layer in chosen if layer not in by_layer]
        if unknown or not chosen:
            raise ValueError(f"unknown {noise} layers {unknown or '(none given)'} for {model.name}; choose from "
                             f"{_checks.listing(available, 40)}.")
    masks = [{n: float(n in by_layer[layer]) for n in names} for layer in chosen]
    return chosen, masks


@dataclasses.dataclass(frozen=True, eq=False)
class SensitivityMap:
    """Accuracy with noise at one layer at a time (rows) for each scale (columns).

    Attributes:
      noise: ``"weight"`` or ``"activation"``.
      kind: the noise kind (``NoiseSpec.weight_kind`` / ``act_kind``).
      layers: the layer (or site) names, in forward order.
      scales: the scales (relative sigma in the units of ``kind``), shape (S,).
      results: ``results[l][s]``: the :class:`MCResult` with the noise at ``layers[l]`` alone at ``scales[s]``.
      all_layers: the reference: the noise at every layer of the model at each scale (S results).
      clean: the noise-free result.
      model: the model name.
    """

    noise: str
    kind: str
    layers: tuple[str, ...]
    scales: np.ndarray
    results: list[list[MCResult]]
    all_layers: list[MCResult]
    clean: MCResult
    model: str

    @property
    def clean_accuracy(self) -> float:
        return self.clean.mean

    @property
    def mean(self) -> np.ndarray:
        """(L, S) mean accuracy."""
        return np.array([[r.mean for r in row] for row in self.results])

    @property
    def ci95(self) -> np.ndarray:
        """(L, S, 2) 95% confidence intervals of the mean (clipped to [0, 1]); NaN where undefined (one chip)."""
        return np.array([[(np.nan, np.nan) if r.ci95 is None else r.ci95 for r in row] for row in self.results],
                        dtype=np.float64).reshape(len(self.results), len(self.scales), 2)

    @property
    def drop(self) -> np.ndarray:
        """(L, S) accuracy drop from the clean network (fraction)."""
        return self.clean.mean - self.mean

    def ranking(self, scale_index: int = -1) -> list[tuple[str, float]]:
        """Layers from most to least sensitive at ``scales[scale_index]``: ``[(layer, mean accuracy)]``."""
        col = self.mean[:, scale_index]
        return [(self.layers[i], float(col[i])) for i in np.argsort(col, kind="stable")]

    def to_record(self, experiment: str, command: str, dataset: Mapping[str, Any], param_count: int = 0,
                  train: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The map as a result file in the shared format (``../shared/RESULTS.md``).

        One arm per layer (named after the layer, ``method`` ``"sensitivity"``, ``train.noise_at`` = the layer) and
        the reference arm ``all_layers``; each arm's ``eval`` holds one entry per scale with the layer mask in
        ``{weight,activation}_noise.mask_layer``. The clean accuracy is ``clean`` at the top level. Every arm shares
        the kind and the scale grid, so ``check_results.py --compare LAYER_A LAYER_B`` pairs them.
        """
        key = "weight_noise" if self.noise == "weight" else "activation_noise"

        def entries(results: Sequence[MCResult], layer: str) -> list[dict[str, Any]]:
            out = []
            for r in results:
                d = r.to_dict()
                d[key] = {**d[key], "mask_layer": layer}
                out.append(d)
            return out

        arms = [report.arm(layer, self.model, "sensitivity", param_count, entries(row, layer),
                           train={"noise_at": layer, **(train or {})})
                for layer, row in zip(self.layers, self.results)]
        arms.append(report.arm(ALL_LAYERS, self.model, "sensitivity", param_count,
                               entries(self.all_layers, ALL_LAYERS), train={"noise_at": ALL_LAYERS, **(train or {})}))
        record = report.result_record(experiment, command, arms, dataset)
        record["clean"] = self.clean.to_dict()
        record["sensitivity"] = {"noise": self.noise, "kind": self.kind, "layers": list(self.layers),
                                 "scales": [float(s) for s in self.scales]}
        return record

    def to_markdown(self) -> str:
        """A table: one row per layer (and the all-layers reference), one column per scale, mean % [95% CI]."""
        head = f"| layer ({self.noise} noise, {self.kind}) | " + " | ".join(
            f"eta {s:g}" for s in self.scales) + " |"
        lines = [head, "|---|" + "---:|" * len(self.scales)]

        def cell(r: MCResult) -> str:
            return f"{100 * r.mean:.2f} {robustness.format_ci95(r.ci95, missing='(1 chip: no CI)')}"

        for layer, row in zip(self.layers, self.results):
            lines.append(f"| {layer} | " + " | ".join(cell(r) for r in row) + " |")
        lines.append(f"| *{ALL_LAYERS}* | " + " | ".join(cell(r) for r in self.all_layers) + " |")
        n = self.results[0][0]
        lines.append("")
        lines.append(f"Clean accuracy {100 * self.clean.mean:.2f}%; {n.n_chips} chips x {n.n_images} images per cell "
                     f"(the same chips in every cell); mean % [95% CI over chips].")
        return "\n".join(lines)

    def plot(self, path: str | None = None, *, title: str | None = None):
        """Heatmap of the accuracy drop (points) with the noise at each layer alone (rows) per scale (columns).

        Args:
          path: write a PNG there too (parent directories are created).
          title: the figure title (default: model, noise kind, chips and images).

        Returns:
          The matplotlib ``Figure``.
        """
        import matplotlib.pyplot as plt

        drop = 100 * self.drop
        n_rows = len(self.layers)
        fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(self.scales), 1.2 + 0.32 * n_rows))
        im = ax.imshow(drop, aspect="auto", cmap="magma_r", vmin=0, vmax=max(float(np.nanmax(drop)), 1e-9))
        ax.set_xticks(range(len(self.scales)), [f"{s:g}" for s in self.scales])
        ax.set_yticks(range(n_rows), self.layers, fontsize=8)
        ax.set_xlabel(f"{self.noise}-noise scale eta ({self.kind}, relative sigma)")
        for i in range(n_rows):
            for j in range(len(self.scales)):
                ax.text(j, i, f"{drop[i, j]:.1f}", ha="center", va="center", fontsize=7,
                        color="white" if drop[i, j] > 0.6 * np.nanmax(drop) else "black")
        r = self.results[0][0]
        ax.set_title(title or f"{self.model}: accuracy drop (points) with noise at one layer\n"
                              f"clean {100 * self.clean.mean:.2f}%, {r.n_chips} chips x {r.n_images} images",
                     fontsize=9)
        fig.colorbar(im, ax=ax, label="accuracy drop (points)")
        fig.tight_layout()
        if path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            fig.savefig(path, dpi=120)
        return fig


def _default_spec(noise: str) -> noise_lib.NoiseSpec:
    if noise == "weight":
        return noise_lib.NoiseSpec(weight_kind="additive_rel_max")
    return noise_lib.NoiseSpec(weight_kind=None, act_kind="multiplicative")


def sensitivity_map(model: Model, variables: Variables, images: Any, labels: Any, *, noise: str = "weight",
                    scales: Sequence[float], key: jax.Array | int, spec: noise_lib.NoiseSpec | None = None,
                    layers: Sequence[str] | None = None, n_chips: int = 8, batch_size: int = 500,
                    chip_batch_size: int | None = None, setting_batch_size: int = 1,
                    preprocess: Callable[[jax.Array], jax.Array] | None = None,
                    mesh: jax.sharding.Mesh | None = None) -> SensitivityMap:
    """Monte Carlo accuracy with noise at each layer alone, for each scale, in one compiled program.

    Args:
      model: the model.
      variables: its variables.
      images: (N, ...) test images (raw with ``preprocess``, or model inputs).
      labels: (N,) integer labels.
      noise: ``"weight"`` (noise on one layer's weights) or ``"activation"`` (noise on one MVM output).
      scales: the scales (relative sigma in the units of the kind; >= 0).
      key: base key of the chips; the same chips serve every cell (common random numbers).
      spec: the kind (and, for ``act_kind="additive"``, the calibrated ``act_ref``); only the chosen noise is
        kept (the other is switched off) and its scale and mask are replaced per cell. Default:
        ``additive_rel_max`` weight noise, or ``multiplicative`` activation noise.
      layers: the layers to map (default every analog layer; see :func:`layer_masks`).
      n_chips: chips per cell.
      batch_size, chip_batch_size, preprocess, mesh: as in :func:`jaxnoise.robustness.evaluate`.
      setting_batch_size: cells evaluated at once (vmapped); 1 (default) maps them one after another, the
        fastest on CPU for convolutions.

    Returns:
      A :class:`SensitivityMap`.

    Raises:
      ValueError: unknown ``noise`` or layers, no scales or an invalid one, a spec without the chosen kind, or
        additive activation noise without ``act_ref``.

    Examples:
      >>> smap = sensitivity_map(model, variables, x, y, noise="activation", scales=[0.1, 0.2], key=0,
      ...                        preprocess=ds.preprocess)
      >>> smap.ranking()[:3]       # the three most sensitive sites at the largest scale
    """
    where = "sensitivity_map"
    _checks.choice(noise, NOISE_TYPES, "noise type (noise=)")
    grid = robustness.check_scales("scales", [] if scales is None else scales)  # the sweep's scale-list checks
    robustness.check_spec_type(spec, "spec", where)
    spec = _default_spec(noise) if spec is None else spec
    key = robustness.check_key(spec, key, where)  # every cell is noisy: a key is required
    robustness.check_inputs(model, variables, [spec], where=where)
    if noise == "weight":
        if spec.weight_kind is None:
            raise ValueError("noise='weight' but spec.weight_kind is None: set a weight-noise kind.")
        spec = spec.weight_only()
        kind = spec.weight_kind
    else:
        if spec.act_kind is None:
            raise ValueError("noise='activation' but spec.act_kind is None: set an activation-noise kind, e.g. "
                             "NoiseSpec(weight_kind=None, act_kind='multiplicative').")
        if spec.act_kind == "additive" and spec.act_ref is None:
            raise ValueError("additive activation noise needs calibrated reference scales: pass spec=NoiseSpec("
                             "weight_kind=None, act_kind='additive', act_ref=noise.calibrate_activations(...)), or "
                             "use act_kind='multiplicative'.")
        spec = spec.activation_only()
        kind = spec.act_kind
    chosen, masks = layer_masks(model, variables, spec, noise, layers)
    all_mask = {n: 1.0 for n in masks[0]}
    field_eta, field_mask = ("weight_eta", "weight_mask") if noise == "weight" else ("act_eta", "act_mask")
    cells = [spec.replace(**{field_eta: s, field_mask: m}) for m in [*masks, all_mask] for s in grid]
    mc = robustness.MonteCarlo(model, images, labels, batch_size=batch_size, chip_batch_size=chip_batch_size,
                               preprocess=preprocess, mesh=mesh, caller=where)
    results = mc.evaluate_many(variables, cells, key=key, n_chips=n_chips, setting_batch_size=setting_batch_size)
    clean = mc.clean(variables)
    s = len(grid)
    rows = [results[i * s:(i + 1) * s] for i in range(len(chosen) + 1)]
    return SensitivityMap(noise=noise, kind=kind, layers=chosen, scales=np.asarray(grid), results=rows[:-1],
                          all_layers=rows[-1], clean=clean, model=model.name)
