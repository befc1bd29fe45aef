"""Result files in the shared format (``../shared/RESULTS.md``): records, atomic JSON, markdown tables, plots.

A record is a plain JSON-ready dict::

    {"experiment", "command", "git_commit", "created", "device", "dataset": {"name", "split", "n_images"},
     "arms": [{"name", "model", "method", "param_count", "extra_param_count", "train", "eval": [...]}]}

where each ``eval`` entry is :meth:`jaxnoise.robustness.MCResult.to_dict`. ``../shared/check_results.py FILE``
validates a written file.

Examples:
  >>> results = sweep(model, variables, x, y, NoiseSpec(), weight_etas=[0.0, 0.1, 0.2], key=key, n_chips=32)
  >>> record = result_record("noise_sweep_resnet20", "python -m ...",
  ...                        [arm("pretrained", model, "clean", model.param_count(variables), results)],
  ...                        {"name": "cifar10", "split": "test", "n_images": len(y)})
  >>> write_json("experiments/results/noise_sweep_resnet20.json", record)
  >>> print(markdown_table(record))
  >>> plot_sweep(record, "experiments/results/noise_sweep_resnet20.png")
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxnoise.io import write_text_atomic
from jaxnoise.robustness import MCResult

__all__ = [
    "arm", "current_git_commit", "device_description", "markdown_table", "plot_sweep", "result_record", "write_json",
]

_REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def current_git_commit(repo_dir: str | None = None) -> str:
    """The commit hash of ``HEAD`` of the repository holding this package, or ``"unknown"`` outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir or _REPO_DIR, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else "unknown"


def _git_dirty(repo_dir: str | None = None) -> bool | None:
    """Whether tracked files differ from ``HEAD`` (None when unknown)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_dir or _REPO_DIR,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def device_description() -> str:
    """The JAX device(s) in words: ``"cpu (2 cores)"``, ``"NVIDIA H200"``, ``"2 x NVIDIA H200"``."""
    import jax

    devices = jax.devices()
    d = devices[0]
    if d.platform == "cpu":
        return f"cpu ({os.cpu_count()} cores)"
    kind = getattr(d, "device_kind", d.platform)
    return kind if len(devices) == 1 else f"{len(devices)} x {kind}"


def _utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def arm(name: str, model: Any, method: str, param_count: int, eval_results: Sequence[MCResult | Mapping],
        extra_param_count: int = 0, train: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One arm (a trained model and how it was trained) with its evaluations.

    Args:
      name: the arm's name, unique in the record (``"forward_noise"``).
      model: the model name (``"resnet20"``) or a :class:`~jaxnoise.models.Model` (its ``name`` is used).
      method: ``clean``, ``forward_noise``, ``consistency``, ``denoiser``, ...
      param_count: trainable parameters of the backbone.
      eval_results: :class:`~jaxnoise.robustness.MCResult` objects (or their ``to_dict()`` entries).
      extra_param_count: parameters added to the backbone (denoisers).
      train: whatever defines the training run (``eta_train``, ``epochs``, ``seed``, ...), or None.

    Returns:
      The arm as a dict.

    Examples:
      >>> arm("clean", "resnet20", "clean", 272474, [evaluate(model, variables, x, y)])
    """
    if not name:
        raise ValueError("an arm needs a non-empty name.")
    if not eval_results:
        raise ValueError(f"arm {name!r} has no evaluations.")
    entries = [r.to_dict() if isinstance(r, MCResult) else dict(r) for r in eval_results]
    return {
        "name": str(name),
        "model": str(getattr(model, "name", model)),
        "method": str(method),
        "param_count": int(param_count),
        "extra_param_count": int(extra_param_count),
        "train": None if train is None else dict(train),
        "eval": entries,
    }


def result_record(experiment: str, command: str, arms: Sequence[Mapping[str, Any]], dataset: Mapping[str, Any],
                  device: str | None = None, git_commit: str | None = None,
                  created: str | None = None) -> dict[str, Any]:
    """A whole result record in the shared format.

    Args:
      experiment: the experiment's name (also the usual file stem).
      command: the command line(s) that reproduce the file.
      arms: arms from :func:`arm`; names must be unique.
      dataset: ``{"name", "split", "n_images"}``; every eval entry that states ``n_images`` must agree.
      device: the device in words; default :func:`device_description`.
      git_commit: the code's commit; default ``git rev-parse HEAD`` of this package's repository (``"unknown"``
        outside git). When detected, ``git_dirty`` records whether tracked files had uncommitted changes.
      created: UTC ISO time; default now (``2026-11-24T10:00:00Z``).

    Returns:
      The record (a JSON-ready dict).

    Raises:
      ValueError: missing dataset fields, duplicate arm names, or evaluations on a different number of images.
    """
    missing = [k for k in ("name", "split", "n_images") if k not in dataset]
    if missing:
        raise ValueError(f"dataset needs {missing} (e.g. {{'name': 'cifar10', 'split': 'test', 'n_images': 10000}}).")
    names = [a["name"] for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"arm names must be unique, got {names}.")
    n_images = int(dataset["n_images"])
    for a in arms:
        for e in a["eval"]:
            if "n_images" in e and int(e["n_images"]) != n_images:
                raise ValueError(f"arm {a['name']!r} has an evaluation on {e['n_images']} images but the dataset "
                                 f"says n_images={n_images}.")
    record = {
        "experiment": str(experiment),
        "command": str(command),
        "git_commit": git_commit if git_commit is not None else current_git_commit(),
        "created": created or _utc_now(),
        "device": device or device_description(),
        "dataset": dict(dataset),
        "arms": [dict(a) for a in arms],
    }
    if git_commit is None:
        dirty = _git_dirty()
        if dirty is not None:
            record["git_dirty"] = dirty
    return record


def _json_default(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if hasattr(x, "__array__"):  # jax arrays
        return np.asarray(x).tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def write_json(path: str | os.PathLike, record: Mapping[str, Any]) -> str:
    """Writes ``record`` as indented JSON, atomically (temporary file in the same folder, then ``os.replace``).

    Creates missing folders. NaN/infinity are refused (not valid JSON).

    Args:
      path: the destination file.
      record: the record (numpy/jax scalars and arrays are converted).

    Returns:
      The path written.
    """
    text = json.dumps(record, indent=2, default=_json_default, allow_nan=False) + "\n"
    write_text_atomic(path, text)
    return path


def _eta(entry: Mapping[str, Any], which: str) -> float | None:
    spec = entry.get(f"{which}_noise")
    return None if spec is None else float(spec["eta"])


def _kinds(record: Mapping[str, Any], which: str) -> list[str]:
    kinds = {e[f"{which}_noise"]["kind"] for a in record["arms"] for e in a["eval"] if e.get(f"{which}_noise")}
    return sorted(kinds)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _applied_weight_noise(entry: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The weight noise an entry applied: for a device evaluation (whose ``weight_noise`` holds the device and
    time, see ``jaxnoise.robustness.describe_device``) the composed ``weight_noise_spec``, else ``weight_noise``."""
    if "device" in entry:
        return entry.get("weight_noise_spec")
    return entry.get("weight_noise")


def markdown_table(record: Mapping[str, Any]) -> str:
    """A markdown table with one row per arm and noise setting (accuracies in %, 2 decimals).

    Columns: arm, method, weight eta (with its kind when the record has several), activation eta (``off`` when
    that noise is off), for device evaluations the device and the time after programming, n_chips, mean, 95% CI
    of the mean (``n/a`` below two chips), 5th percentile over chips. Every column shows what was applied: a
    device evaluation with extra weight noise shows that noise's eta, not the time. A caption line names the
    experiment, dataset and noise kinds.

    Args:
      record: a record from :func:`result_record` (or a loaded result file).

    Returns:
      The markdown text (ending with a newline).
    """
    ds = record.get("dataset", {})
    entries = [e for a in record["arms"] for e in a["eval"]]
    devices = any("device" in e for e in entries)
    weight_kinds = sorted({w["kind"] for e in entries if (w := _applied_weight_noise(e))})
    ak = _kinds(record, "activation")
    device_names = sorted({e["device"].get("name", "?") for e in entries if "device" in e})
    caption = (f"**{record.get('experiment', '?')}**: {ds.get('name', '?')} {ds.get('split', '?')} split, "
               f"{ds.get('n_images', '?')} images; weight noise: {', '.join(weight_kinds) or 'off'}; "
               f"activation noise: {', '.join(ak) or 'off'}"
               + (f"; device: {', '.join(device_names)}" if devices else "")
               + ". Accuracy in %, mean over chips with Student-t 95% CI (clipped to [0, 100]).")
    device_head = " device | t (s) |" if devices else ""
    lines = [caption, "",
             f"| arm | method | weight eta | act. eta |{device_head} n_chips | mean (%) | 95% CI (%) | p5 (%) |",
             "|---|---|---:|---:|" + ("---|---:|" if devices else "") + "---:|---:|---:|---:|"]
    for a in record["arms"]:
        for e in a["eval"]:
            w = _applied_weight_noise(e)
            act = _eta(e, "activation")
            w_text = "off" if w is None else f"{float(w['eta']):g}"
            if w is not None and len(weight_kinds) > 1:  # several conventions in one record: say which
                w_text += f" ({w['kind']})"
            device_cells = ""
            if devices:
                if "device" in e:
                    comp = e["weight_noise"].get("drift_compensation")
                    name = e["device"].get("name", "?") + ("" if comp else ", no compensation")
                    device_cells = f" {name} | {float(e['weight_noise']['t_inference_s']):g} |"
                else:
                    device_cells = " off | |"
            ci = e.get("ci95")
            ci_text = "n/a" if ci is None else f"[{_pct(ci[0])}, {_pct(ci[1])}]"
            p5 = e.get("p5")
            lines.append(f"| {a['name']} | {a.get('method', '')} | {w_text} | "
                         f"{'off' if act is None else f'{act:g}'} |{device_cells} {e['n_chips']} | "
                         f"{_pct(e['mean'])} | {ci_text} | {'' if p5 is None else _pct(p5)} |")
    return "\n".join(lines) + "\n"


def plot_sweep(record: Mapping[str, Any], path: str | os.PathLike, noise: str = "weight") -> str:
    """Plots accuracy against the noise scale for every arm, with the 95% CI band of the mean; writes a PNG.

    Entries with the chosen noise on are placed at their eta; noise-free entries (both noises off) at eta 0 of
    the line without the other noise, unless that line has its own eta = 0 entry.
    When an arm's entries differ in the other noise (a 2-D grid), each setting of the other noise is a line.

    Args:
      record: a record from :func:`result_record` (or a loaded result file).
      path: the PNG file to write (folders are created).
      noise: ``"weight"`` or ``"activation"``: the scale on the x axis.

    Returns:
      The path written.
    """
    if noise not in ("weight", "activation"):
        raise ValueError(f"noise={noise!r}; choose 'weight' or 'activation'.")
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend state
    from matplotlib.figure import Figure

    other = "activation" if noise == "weight" else "weight"
    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    n_lines = 0
    for a in record["arms"]:
        groups: dict[float | None, list[tuple[float, Mapping[str, Any]]]] = {}
        clean = []
        for e in a["eval"]:
            eta, eta_other = _eta(e, noise), _eta(e, other)
            if eta is None:
                if eta_other is None:
                    clean.append(e)
                continue
            groups.setdefault(eta_other, []).append((eta, e))
        if None in groups and not any(eta == 0 for eta, _ in groups[None]):
            # the noise-free evaluation is the eta = 0 point of the line without the other noise
            groups[None].extend((0.0, e) for e in clean)
        for eta_other, points in groups.items():
            points.sort(key=lambda p: p[0])
            x = np.array([p[0] for p in points])
            mean = np.array([100 * p[1]["mean"] for p in points])
            # a point without a CI (one chip, e.g. the noise-free one) has a band of zero width
            lo = np.array([100 * (p[1]["ci95"] or [p[1]["mean"]] * 2)[0] for p in points])
            hi = np.array([100 * (p[1]["ci95"] or [p[1]["mean"]] * 2)[1] for p in points])
            label = a["name"] if len(groups) == 1 or eta_other is None else f"{a['name']} ({other} eta={eta_other:g})"
            (line,) = ax.plot(x, mean, marker="o", ms=3, label=label)
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
            n_lines += 1
    if n_lines == 0:
        raise ValueError(f"the record has no entries with {noise} noise to plot.")
    kinds = _kinds(record, noise)
    if kinds and all(k.startswith("device:") for k in kinds):
        # device evaluations: eta is the inference time in seconds (robustness.describe_device)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel(f"time after programming, s ({', '.join(k[len('device:'):] for k in kinds)})")
    else:
        ax.set_xlabel(f"{noise} noise eta" + (f" ({', '.join(kinds)})" if kinds else ""))
    ax.set_ylabel("accuracy (%)")
    ds = record.get("dataset", {})
    ax.set_title(f"{record.get('experiment', '')}: {ds.get('name', '')} {ds.get('split', '')}, mean and 95% CI",
                 fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png")
    return path
