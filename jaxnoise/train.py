"""Training: SGD with momentum, BatchNorm statistics, deterministic data order, atomic checkpoints and resume.

The pieces compose so that noise-aware methods only bring their own loss function:

* a **loss function** ``loss_fn(params, batch_stats, images, labels, key, hparams) -> (loss, (logits,
  new_batch_stats, metrics))`` made by a factory of :mod:`jaxnoise.methods` (``images`` are preprocessed floats,
  ``key`` is this step's loss key: use it for forward noise; ``hparams`` is a dict of float32 scalars such as
  ``eta_train`` and ``lambda``, passed as array data so that changing them does not recompile the step);
* the **generic step** of :func:`make_train_step`: key derivation, augmentation, preprocessing, gradient,
  optimizer update and BatchNorm update, whatever the loss;
* the **driver** :func:`train`: epochs, logging, evaluation, checkpoints and resume.

Keys: every key comes from ``jax.random.key(config.seed)`` by name (``jaxnoise.noise.name_key``):
``"jaxnoise/train/init"`` initialises the model, ``"jaxnoise/train/data"`` orders the data (epoch ``e`` uses
``fold_in(data_key, e)``, see ``jaxnoise.data.epoch_batches``) and ``"jaxnoise/train/step"`` is the step base key:
step ``s`` uses ``fold_in(base_key, s)``, then ``fold_in(., 0)`` for augmentation and ``fold_in(., 1)`` for the
loss. The whole run is therefore a pure function of ``(seed, config, initial variables)``, and a resumed run
reproduces an uninterrupted one exactly.

Data parallelism: ``train(..., mesh=...)`` replicates the state on every device of a :class:`jax.sharding.Mesh`
and shards each batch over all of them; ``jax.jit`` partitions the same step (XLA all-reduces the gradients and
the BatchNorm batch statistics). Random draws do not depend on the sharding, so the result is the one-device
result up to float summation order. See :func:`train` and :mod:`jaxnoise.distributed`.

Workdirs (:mod:`jaxnoise.workdir`): a run holds the workdir's lock while it trains (a second run into it is
refused), never deletes ``metrics.jsonl`` lines (lines a resume re-does move to ``metrics.superseded.jsonl``),
refuses a resume that would change the learning-rate schedule or the step -> batch mapping, and on Ctrl-C
checkpoints its last completed step before raising :class:`jaxnoise.workdir.TrainingInterrupted`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import numbers
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from jaxnoise import _checks, distributed, io, methods, robustness
from jaxnoise import checkpoint as ckpt_lib
from jaxnoise import data as data_lib
from jaxnoise import noise as noise_lib
from jaxnoise import workdir as workdir_lib
from jaxnoise.workdir import TrainingInterrupted, WorkdirError, WorkdirLockedError

logger = logging.getLogger(__name__)

SCHEDULES = ("cosine", "constant")
METRICS_FILE = "metrics.jsonl"
# Where a resume moves the metrics.jsonl lines of the steps it re-does (written before an interruption).
SUPERSEDED_METRICS_FILE = "metrics.superseded.jsonl"
# Sub-keys of step s's key fold_in(base_key, s).
AUGMENT_KEY = 0
LOSS_KEY = 1
# Config fields a resume may change: they do not change any step's result. The fixed ones define the run: the
# keys and data order (seed), the step -> batch mapping (batch_size, and epochs through the schedule), the
# learning-rate schedule (epochs, learning_rate, schedule, warmup_steps) and the optimizer (momentum, nesterov,
# weight_decay); a resume that changes one is refused. Any other field (none today) would give a warning.
_RESUME_FREE_FIELDS = ("checkpoint_every", "max_to_keep", "log_every", "eval_batch_size")
_RESUME_FIXED_FIELDS = ("seed", "batch_size", "epochs", "learning_rate", "schedule", "warmup_steps", "momentum",
                        "nesterov", "weight_decay")
# The command-line flags of the fixed fields (``jaxnoise train`` / ``jaxnoise denoise``), for the fix of a refusal.
_CLI_FLAGS = {"seed": "--seed", "batch_size": "--train-batch-size", "epochs": "--epochs", "learning_rate": "--lr",
              "weight_decay": "--weight-decay"}

LossFn = Callable[..., tuple[jax.Array, tuple[jax.Array, Any, dict[str, jax.Array]]]]


# ----------------------------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of a training run (saved in every checkpoint's metadata).

    All fields but ``checkpoint_every``, ``max_to_keep``, ``log_every`` and ``eval_batch_size`` define the run
    (its data order, learning-rate schedule and optimizer): :func:`train` refuses to resume a workdir with other
    values of them.

    Attributes:
      epochs: passes over the training set (each drops its last incomplete batch).
      batch_size: training examples per step.
      learning_rate: peak learning rate.
      momentum: SGD momentum (0 for plain SGD).
      nesterov: Nesterov momentum.
      weight_decay: L2 coefficient added to the gradient of the analog layers' kernels only (not biases nor
        BatchNorm), before momentum, as PyTorch's SGD ``weight_decay`` does.
      schedule: ``"cosine"`` (decays to 0 over all steps) or ``"constant"``.
      warmup_steps: linear warmup from 0 to ``learning_rate`` over the first steps (counted in the total).
      seed: seed of every key of the run (initialisation, data order, augmentation, loss noise).
      checkpoint_every: checkpoint period in steps; None means once per epoch. A checkpoint is always written
        at the last step.
      max_to_keep: how many checkpoints to keep (the newest ones).
      log_every: period, in steps, of the training-metrics lines of ``metrics.jsonl`` (and of the progress bar's
        numbers). The last step of each epoch is always logged.
      eval_batch_size: batch size of the test-set evaluation at each epoch end.
    """

    epochs: int
    batch_size: int = 128
    learning_rate: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    seed: int = 0
    checkpoint_every: int | None = None
    max_to_keep: int = 3
    log_every: int = 50
    eval_batch_size: int = 1000

    def validate(self, num_train: int | None = None) -> None:
        """Raises ValueError naming the first bad field and how to fix it.

        Args:
          num_train: size of the training split, to check ``batch_size`` against; None skips that check.
        """
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig.{message}")

        def is_int(x: Any) -> bool:
            return isinstance(x, numbers.Integral) and not isinstance(x, bool)

        def is_real(x: Any) -> bool:
            return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)

        need(is_int(self.epochs) and self.epochs >= 1,
             f"epochs={self.epochs!r}: must be an integer >= 1 (number of passes over the training set).")
        need(is_int(self.batch_size) and self.batch_size >= 1,
             f"batch_size={self.batch_size!r}: must be an integer >= 1.")
        if num_train is not None:
            need(self.batch_size <= num_train,
                 f"batch_size={self.batch_size} is larger than the training set ({num_train} examples), so an "
                 f"epoch would have no complete batch: use batch_size <= {num_train}.")
        need(is_real(self.learning_rate) and self.learning_rate >= 0,
             f"learning_rate={self.learning_rate!r}: must be a finite number >= 0 (e.g. 0.1 for SGD).")
        need(is_real(self.momentum) and 0 <= self.momentum < 1,
             f"momentum={self.momentum!r}: must be in [0, 1) (0 disables momentum; 0.9 is usual).")
        need(not (self.nesterov and self.momentum == 0),
             "nesterov=True needs momentum > 0: set momentum (e.g. 0.9) or nesterov=False.")
        need(is_real(self.weight_decay) and self.weight_decay >= 0,
             f"weight_decay={self.weight_decay!r}: must be a finite number >= 0 (0 disables it).")
        need(self.schedule in SCHEDULES, f"schedule={self.schedule!r}: choose one of {SCHEDULES}.")
        need(is_int(self.warmup_steps) and self.warmup_steps >= 0,
             f"warmup_steps={self.warmup_steps!r}: must be an integer >= 0.")
        need(is_int(self.seed), f"seed={self.seed!r}: must be an integer.")
        need(self.checkpoint_every is None or (is_int(self.checkpoint_every) and self.checkpoint_every >= 1),
             f"checkpoint_every={self.checkpoint_every!r}: must be an integer >= 1, or None for once per epoch.")
        need(is_int(self.max_to_keep) and self.max_to_keep >= 1,
             f"max_to_keep={self.max_to_keep!r}: must be an integer >= 1.")
        need(is_int(self.log_every) and self.log_every >= 1, f"log_every={self.log_every!r}: must be an integer >= 1.")
        need(is_int(self.eval_batch_size) and self.eval_batch_size >= 1,
             f"eval_batch_size={self.eval_batch_size!r}: must be an integer >= 1.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return dataclasses.asdict(self)


@struct.dataclass
class TrainState:
    """Everything a training step updates (a pytree).

    Attributes:
      step: number of steps done, int32 scalar array.
      params: the trainable parameters.
      batch_stats: BatchNorm running statistics (``{}`` for models without BatchNorm).
      opt_state: the optax optimizer state.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    @property
    def variables(self) -> dict[str, Any]:
        """``{"params": ..., "batch_stats": ...}``, ready for ``model.apply``."""
        return {"params": self.params, "batch_stats": self.batch_stats}


# ----------------------------------------------------------------------------------------------------------------
# Optimizer


def make_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
    """The learning-rate schedule: optional linear warmup, then cosine decay to 0 or constant.

    Args:
      config: the training config.
      total_steps: number of optimizer steps of the whole run (warmup included).

    Returns:
      ``schedule(step) -> learning rate``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps} must be >= 1.")
    lr, warmup = float(config.learning_rate), int(config.warmup_steps)
    if config.schedule not in SCHEDULES:
        raise ValueError(f"TrainConfig.schedule={config.schedule!r}: choose one of {SCHEDULES}.")
    if warmup and warmup >= total_steps:
        raise ValueError(f"TrainConfig.warmup_steps={warmup} must be smaller than the total number of steps "
                         f"({total_steps}): reduce warmup_steps or train longer.")
    if config.schedule == "cosine":
        if warmup:
            return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total_steps, end_value=0.0)
        return optax.cosine_decay_schedule(lr, total_steps)
    if warmup:
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)],
                                    [warmup])
    return optax.constant_schedule(lr)


def kernel_mask(params: Any, decayed_paths: Any = None) -> Any:
    """A bool tree like ``params``: True at the weight-decayed leaves, the kernels of the model's analog layers
    (``decayed_paths``: ``model.analog_weight_paths``, as the layers register them, so digital layers such as
    denoising blocks are not decayed); None: every leaf named ``kernel`` (a bare parameter tree)."""
    wanted = None if decayed_paths is None else frozenset(_checks.names(decayed_paths, "decayed_paths",
                                                                        example="conv1/kernel"))

    def is_decayed(path, _):
        if wanted is None:
            return bool(path) and _checks.key_name(path[-1]) == "kernel"
        return "/".join(_checks.key_name(k) for k in path) in wanted
    return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(config: TrainConfig, total_steps: int, *, decayed_paths: Any = None,
                   trainable: Callable[[str], bool] | None = None) -> optax.GradientTransformation:
    """SGD with (Nesterov) momentum, masked weight decay and the configured schedule.

    ``optax.chain(add_decayed_weights(weight_decay, mask=kernel_mask), inject_hyperparams(sgd)(schedule,
    momentum, nesterov))``: the learning rate of each step is kept in the optimizer state, where the train step
    reads it for its metrics.

    Args:
      config: the training config.
      total_steps: number of optimizer steps of the whole run (the cosine decay spans them).
      decayed_paths: the parameter paths that get weight decay: the model's analog kernels
        (``model.analog_weight_paths``; :func:`fit` passes them); None: every ``kernel`` leaf.
      trainable: as in :func:`make_train_step`: frozen leaves get no weight decay either, so their optimizer
        slots stay at zero (the state's structure does not depend on it). None: every leaf is trainable.

    Returns:
      The optax transformation.

    Examples:
      >>> opt = make_optimizer(TrainConfig(epochs=1), 100, decayed_paths=model.analog_weight_paths)  # doctest: +SKIP
    """
    schedule = make_schedule(config, total_steps)
    momentum = float(config.momentum) or None
    sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=schedule, momentum=momentum,
                                               nesterov=bool(config.nesterov))
    def mask(params):
        decayed = kernel_mask(params, decayed_paths)
        return decayed if trainable is None else jax.tree.map(lambda d, t: d and t, decayed,
                                                              trainable_mask(params, trainable))
    return optax.chain(optax.add_decayed_weights(float(config.weight_decay), mask=mask), sgd)


def current_learning_rate(opt_state: Any) -> jax.Array:
    """The learning rate recorded by ``optax.inject_hyperparams`` in ``opt_state`` (NaN when there is none).

    After an update, it is the rate that update used.
    """
    kinds = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
    for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, kinds)):
        if isinstance(node, kinds) and "learning_rate" in node.hyperparams:
            return jnp.asarray(node.hyperparams["learning_rate"], jnp.float32)
    return jnp.float32(jnp.nan)


def _check_variables(model: Any, variables: Mapping[str, Any]) -> None:
    if "params" not in variables:
        raise ValueError(f"variables must be {{'params': ..., 'batch_stats': ...}}, got keys {sorted(variables)}.")
    abstract = jax.eval_shape(model.init, jax.random.key(0))
    have = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {}) or {}}
    want = {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}
    lines = ckpt_lib.describe_mismatch(ckpt_lib.flat_shapes(have), ckpt_lib.flat_shapes(want))
    if lines:
        raise ValueError(f"variables do not match model {model.name} ({model.config}):\n" + "\n".join(lines)
                         + "\nInitialise with model.init or load weights of this architecture.")


def init_state(model: Any, variables: Mapping[str, Any], optimizer: optax.GradientTransformation) -> TrainState:
    """The state at step 0.

    Args:
      model: the model (``variables`` are checked against it).
      variables: ``{"params": ..., "batch_stats": ...}`` (numpy or jax arrays), e.g. from ``model.init`` or
        ``jaxnoise.checkpoint.load_variables``.
      optimizer: from :func:`make_optimizer`.

    Returns:
      A :class:`TrainState` of jax arrays, ``step = 0``.

    Raises:
      ValueError: ``variables`` do not match ``model``.
    """
    _check_variables(model, variables)
    # Copies: the jitted step may donate the state's buffers, which must not be the caller's arrays.
    params = jax.tree.map(jnp.array, variables["params"])
    batch_stats = jax.tree.map(jnp.array, variables.get("batch_stats", {}) or {})
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=optimizer.init(params))


# ----------------------------------------------------------------------------------------------------------------
# Loss and step


def clean_loss(model: Any) -> LossFn:
    """The clean cross-entropy loss of ``model`` (no noise), in train mode: ``jaxnoise.methods.clean(model)``.

    Loss functions of other methods: :mod:`jaxnoise.methods` (``forward_noise``, ``consistency``).
    """
    return methods.clean(model)


def step_keys(base_key: jax.Array, step: jax.Array | int) -> tuple[jax.Array, jax.Array]:
    """``(augment_key, loss_key)`` of step ``step``: ``fold_in(fold_in(base_key, step), 0 / 1)``."""
    key = jax.random.fold_in(base_key, step)
    return jax.random.fold_in(key, AUGMENT_KEY), jax.random.fold_in(key, LOSS_KEY)


def trainable_mask(params: Any, trainable: Callable[[str], bool] | None) -> Any:
    """A bool tree like ``params``: ``trainable(path)`` of each leaf's ``/``-joined path (all True when None)."""
    def leaf(path, _):
        return True if trainable is None else bool(trainable("/".join(_checks.key_name(k) for k in path)))
    return jax.tree_util.tree_map_with_path(leaf, params)


def make_train_step(model: Any, loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    dataset: Any, trainable: Callable[[str], bool] | None = None, mesh: Mesh | None = None
                    ) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted training step, generic in the loss.

    ``step(state, images, labels, base_key, hparams=None) -> (state, metrics)``:

    1. ``augment_key, loss_key = step_keys(base_key, state.step)``;
    2. ``x = dataset.preprocess(dataset.augment(augment_key, images))``;
    3. ``(loss, (logits, new_batch_stats, extra)), grads = value_and_grad(loss_fn)(params, batch_stats, x,
       labels, loss_key, hparams)`` (``hparams``: float32 scalar arrays, ``{}`` when None);
    4. optimizer update of ``params``; ``batch_stats <- new_batch_stats``; ``step <- step + 1``.

    ``metrics`` holds ``loss``, ``accuracy`` (of ``logits`` on the batch), ``lr`` (the learning rate this step
    used) and the loss function's own ``extra`` metrics (which should be scalars: :func:`train` logs their
    means), all on device. On accelerators the input
    ``state`` is donated (do not reuse it after the call).

    Args:
      model: the model (its input shape is checked against the dataset's).
      loss_fn: e.g. ``clean_loss(model)``.
      optimizer: from :func:`make_optimizer`.
      dataset: provides ``augment(key, images)`` and ``preprocess(images)`` (a ``jaxnoise.data.Dataset``).
      trainable: ``trainable(path) -> bool`` over ``/``-joined parameter paths; the other leaves are frozen:
        the loss sees them through ``stop_gradient`` (no gradient is computed for them) and the step returns
        them unchanged (the same bits). None trains every leaf.
      mesh: for data-parallel training: the new state and the metrics are replicated on every device of
        ``mesh`` (``NamedSharding(mesh, PartitionSpec())``). The caller places the inputs: the state,
        ``base_key`` and ``hparams`` replicated (:func:`jaxnoise.distributed.replicate`), ``images`` and
        ``labels`` sharded along axis 0 over every mesh axis (:func:`shard_batch`); ``jax.jit`` partitions the
        step accordingly. None: no sharding is imposed.

    Returns:
      The jitted step function.
    """
    image_shape = tuple(getattr(dataset, "image_shape", model.input_shape))
    if image_shape != tuple(model.input_shape):
        raise ValueError(f"dataset {getattr(dataset, 'name', '?')} has images of shape {image_shape} but model "
                         f"{model.name} expects {tuple(model.input_shape)}: build the model with "
                         f"input_shape={image_shape} or use a matching dataset.")

    def step(state: TrainState, images: jax.Array, labels: jax.Array, base_key: jax.Array,
             hparams: Mapping[str, jax.Array] | None = None):
        augment_key, loss_key = step_keys(base_key, state.step)
        hparams = {} if hparams is None else hparams
        x = dataset.preprocess(dataset.augment(augment_key, images))
        mask = trainable_mask(state.params, trainable)

        def trainable_loss(params, *args):
            # Inside the differentiated function: the frozen leaves' gradients are zeros that XLA drops (no kernel
            # gradients of a frozen backbone are computed), and their optimizer slots stay zero.
            return loss_fn(jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, mask), *args)
        grad_fn = jax.value_and_grad(trainable_loss, has_aux=True)
        (loss, (logits, new_batch_stats, extra)), grads = grad_fn(state.params, state.batch_stats, x, labels,
                                                                  loss_key, hparams)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params = jax.tree.map(lambda new, old, t: new if t else old, params, state.params, mask)
        accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
        metrics = {**extra, "loss": loss, "accuracy": accuracy, "lr": current_learning_rate(opt_state)}
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_batch_stats,
                                  opt_state=opt_state)
        return new_state, metrics

    # Donation saves a copy of the state on accelerators; the CPU backend ignores it (with a warning).
    donate = () if jax.default_backend() == "cpu" else (0,)
    if mesh is None:
        return jax.jit(step, donate_argnums=donate)
    # Pinned so the state keeps the replicated layout it came in with (no resharding, no recompilation).
    return jax.jit(step, donate_argnums=donate, out_shardings=NamedSharding(mesh, P()))


def batch_spec(mesh: Mesh) -> P:
    """The ``PartitionSpec`` of a data-parallel batch: axis 0 split over every axis of ``mesh`` (all devices)."""
    return P(tuple(mesh.axis_names))


def shard_batch(x: Any, mesh: Mesh) -> jax.Array:
    """A global array of the full host batch ``x`` (the same in every process), sharded along axis 0 over every
    device of ``mesh`` (:func:`batch_spec`).

    Raises:
      ValueError: ``len(x)`` is not a multiple of ``mesh.size``.
    """
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % mesh.size:
        raise ValueError(f"a batch of {x.shape[0] if x.ndim else 'scalar'} examples cannot be split evenly over the "
                         f"{mesh.size} devices of the mesh: use a batch size that is a multiple of {mesh.size}.")
    return distributed.global_array(x, mesh, batch_spec(mesh))


def _replicate_key(key: jax.Array, mesh: Mesh) -> jax.Array:
    """A typed PRNG key replicated on every device of ``mesh`` (same key data, same key implementation)."""
    data = distributed.global_array(np.asarray(jax.random.key_data(key)), mesh, P())
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(key))


def check_mesh_batch(batch_size: int, mesh: Mesh) -> None:
    """Raises ValueError when ``batch_size`` cannot be split evenly over the devices of ``mesh``."""
    if batch_size % mesh.size:
        lower = batch_size - batch_size % mesh.size
        near = " or ".join(str(b) for b in (lower, lower + mesh.size) if b > 0)
        raise ValueError(
            f"TrainConfig.batch_size={batch_size} is not divisible by the {mesh.size} devices of the mesh "
            f"({dict(mesh.shape)}): data-parallel training splits every batch evenly over the devices. Use a "
            f"batch size that is a multiple of {mesh.size} (e.g. {near}), or a mesh whose device count divides "
            f"{batch_size}.")


# ----------------------------------------------------------------------------------------------------------------
# Evaluation

def evaluate_clean(model: Any, variables: Mapping[str, Any], split: Any, preprocess: Callable,
                   batch_size: int = 1000) -> float:
    """Clean (noise-free) top-1 accuracy on a whole split, BatchNorm in inference mode (running statistics).

    Every example counts once: the last partial batch is zero-padded to ``batch_size`` (one compiled shape)
    and the padding is masked out.

    Args:
      model: the model.
      variables: ``{"params": ..., "batch_stats": ...}``.
      split: has ``images`` (raw, as stored) and ``labels`` (a ``jaxnoise.data.Split``), or a streamed split
        (``jaxnoise.stream.StreamSplit``, evaluation preprocessing, one pass).
      preprocess: raw images -> model input (``dataset.preprocess``).
      batch_size: examples per forward pass.

    Returns:
      The accuracy in [0, 1].
    """
    n = _num_examples(split)
    if n == 0:
        raise ValueError("evaluate_clean got an empty split: there is nothing to evaluate.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    # The Monte Carlo evaluator's noise-free path: one compiled scan over padded, masked batches.
    if hasattr(split, "eval_batches"):   # a streamed split (jaxnoise.stream): one pass
        result = robustness.evaluate(model, variables, split, None, None, batch_size=min(int(batch_size), n),
                                     preprocess=preprocess)
    else:
        result = robustness.evaluate(model, variables, split.images, split.labels, None,
                                     batch_size=min(int(batch_size), n), preprocess=preprocess)
    return float(result.mean)


# ----------------------------------------------------------------------------------------------------------------
# Metrics file


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (unparsable lines, e.g. a line cut by a kill, are skipped)."""
    records = []
    if not os.path.exists(path):
        return records
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _history_records(path: str) -> int:
    """How many records (JSON objects) ``path`` holds (0 when it does not exist)."""
    return sum(isinstance(r, dict) for r in read_metrics(path))


def _supersede_metrics(path: str, step: int) -> int:
    """Moves the lines of ``path`` for steps after ``step`` (the ones a resume from ``step`` re-does), and any
    unreadable line (e.g. cut by a kill), to ``metrics.superseded.jsonl`` next to it; nothing is deleted.

    The moved lines are appended there (fsynced) before ``path`` is rewritten atomically with the rest, so a crash
    in between duplicates lines there at worst. Returns the number of lines moved.
    """
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    keep, moved = [], []
    for line in lines:
        if not line.strip():
            continue
        line = line if line.endswith("\n") else line + "\n"
        try:
            record = json.loads(line)
            kept = isinstance(record, dict) and int(record.get("step", 0)) <= step
        except (ValueError, TypeError):  # JSONDecodeError is a ValueError; so is a bad "step"
            kept = False
        (keep if kept else moved).append(line)
    if moved:
        io.append_lines(os.path.join(os.path.dirname(path), SUPERSEDED_METRICS_FILE), moved)
    if keep != lines:
        io.write_text_atomic(path, "".join(keep))
    return len(moved)


def _mean_metrics(window: list[dict[str, jax.Array]]) -> dict[str, float]:
    host = jax.device_get(window)
    return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


def _progress_enabled(progress: bool) -> bool:
    return bool(progress) and not os.environ.get("CI") and sys.stderr.isatty()


# ----------------------------------------------------------------------------------------------------------------
# Driver


def _run_metadata(model, dataset, config, loss_fn, total_steps, steps_per_epoch, extra) -> dict[str, Any]:
    """The JSON metadata of every checkpoint of a run (flat keys; see :func:`train`)."""
    meta = {
        "format": "jaxnoise.train/1",
        "model": model.name,
        "model_config": dict(model.config),
        "input_shape": list(model.input_shape),
        "num_classes": int(model.num_classes),
        "dataset": getattr(dataset, "name", None),
        "num_train": _num_examples(dataset.train),
        "train_config": config.to_dict(),
        "loss": methods.as_loss(loss_fn).name,
        "loss_config": methods.as_loss(loss_fn).config,
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
    }
    meta.update(extra or {})
    return ckpt_lib.jsonable(meta)


# Metadata entries a resume must not change: they define which run the checkpoints belong to (the model, and the
# data, whose size sets the steps per epoch).
_MODEL_IDENTITY = ("model", "model_config", "input_shape")
_DATA_IDENTITY = ("dataset", "num_train")


def _check_resume(saved: Mapping[str, Any], current: Mapping[str, Any], directory: str, workdir: str) -> None:
    """Refuses a resume that would change the run's identity or schedule; warns when the loss changes.

    Raises:
      WorkdirError: listing each differing entry ("checkpoint X, now Y") and the fix.
    """
    def differs(k: str) -> bool:
        return k in saved and saved[k] != current.get(k)

    model_lines = [f"{k}: checkpoint {saved[k]!r}, now {current.get(k)!r}" for k in _MODEL_IDENTITY if differs(k)]
    data_keys = [k for k in _DATA_IDENTITY if differs(k)]
    old_cfg, new_cfg = saved.get("train_config") or {}, current["train_config"]
    cfg_fields = [f for f in _RESUME_FIXED_FIELDS if f in old_cfg and old_cfg[f] != new_cfg.get(f)]
    lines = (model_lines + [f"{k}: checkpoint {saved[k]!r}, now {current.get(k)!r}" for k in data_keys]
             + [f"train_config.{f}: checkpoint {old_cfg[f]!r}, now {new_cfg.get(f)!r}" for f in cfg_fields])
    if lines:
        if model_lines:
            fix = (f"Train this model into another --workdir, or resume {workdir} with the model it was "
                   f"trained with.")
        else:
            original = [f"{_CLI_FLAGS[f]} {old_cfg[f]}" if f in _CLI_FLAGS else f"{f}={old_cfg[f]!r}"
                        for f in cfg_fields]
            if "dataset" in data_keys:
                original.append(f"--dataset {saved['dataset']}")
            elif "num_train" in data_keys:
                original.append(f"a training set of {saved['num_train']} examples")
            fix = (f"Resume with the original settings (e.g. {', '.join(original)}), or start a new run from these "
                   f"weights in a new workdir (--checkpoint {workdir} --workdir NEW; from Python: "
                   f"variables=jaxnoise.checkpoint.load_variables({workdir!r}), workdir=NEW).")
        raise WorkdirError(f"the checkpoints in {directory!r} belong to a different run ({'; '.join(lines)}). "
                           + fix)
    changed = [f"{f}: {old_cfg[f]!r} -> {new_cfg[f]!r}" for f in new_cfg
               if f in old_cfg and f not in _RESUME_FREE_FIELDS and old_cfg[f] != new_cfg[f]]
    for k in ("loss", "loss_config", "hparams"):
        if differs(k):
            changed.append(f"{k}: {saved[k]!r} -> {current.get(k)!r}")
    if changed:
        warnings.warn(f"resuming from {directory!r} with changed settings ({'; '.join(changed)}); the result "
                      f"will differ from an uninterrupted run with either setting.", stacklevel=3)


def train(model: Any, dataset: Any, config: TrainConfig, *, workdir: str | os.PathLike,
          variables: Mapping[str, Any] | None = None, loss_fn: LossFn | None = None, progress: bool = True,
          max_steps: int | None = None, metadata: Mapping[str, Any] | None = None,
          hparams: Mapping[str, float] | None = None, trainable: Callable[[str], bool] | None = None,
          mesh: Mesh | None = None, portable_checkpoint: str | os.PathLike | None = None
          ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Trains ``model`` on ``dataset.train``, resuming from ``workdir`` if a previous run left checkpoints there.

    Files in ``workdir``:

    * ``checkpoints/<step>/``: atomic orbax checkpoints of the :class:`TrainState` (as a dict with keys ``step``,
      ``params``, ``batch_stats``, ``opt_state``) every ``config.checkpoint_every`` steps (default: each epoch end)
      and at the last step; the newest ``config.max_to_keep`` are kept. Each carries the run metadata, also
      copied to ``checkpoints/metadata.json`` (``jaxnoise.checkpoint.read_metadata(workdir)`` reads it,
      ``load_variables(workdir)`` the variables): ``{"format": "jaxnoise.train/1", "model": name,
      "model_config": model.config, "input_shape", "num_classes", "dataset": name, "num_train", "train_config":
      config.to_dict(), "loss": loss_fn.name, "loss_config": loss_fn.config, "total_steps", "steps_per_epoch",
      "hparams", "epoch" (steps done / steps per epoch), "step", **metadata}``.
    * ``metrics.jsonl``: one JSON object per line. ``{"type": "train", "step", "epoch", "loss", "accuracy",
      "lr", ..., "time", "elapsed"}`` every ``config.log_every`` steps and at each epoch's last step (means over
      the steps since the previous train line of this process); ``{"type": "epoch", "step", "epoch",
      "test_accuracy", "train_loss", "train_accuracy", "lr", "time", "elapsed"}`` at each epoch end
      (``train_*``: means over the epoch's steps run by this process). ``epoch`` counts from 1, ``step`` is the
      number of steps done, ``time`` is the Unix time and ``elapsed`` the seconds since this call started.

    * ``metrics.superseded.jsonl``: lines a resume moved out of ``metrics.jsonl`` (see below), appended verbatim.
    * ``.jaxnoise.lock``: present while a run trains into the workdir (:func:`jaxnoise.workdir.workdir_lock`).

    Lock: process 0 holds the workdir's lock for the whole call (taken before ``metrics.jsonl`` is read or a
    checkpoint restored), so a second run into the same workdir, from another process or this one, is refused
    with :class:`jaxnoise.workdir.WorkdirLockedError` naming the first one; a lock left by a dead process is taken
    over with a notice.

    Resume: when ``workdir/checkpoints`` holds a checkpoint, the state is restored from the latest one (``variables``
    is then ignored) and training continues at its step, with the line ``resuming WORKDIR from step S of T (epoch
    E)`` on stdout (E: the epoch of the next step, from 1), or ``WORKDIR: already complete at step S of T; nothing
    to train`` when there is nothing left to do. The batches of epoch ``e`` are a pure function of ``(seed, e)``
    and the keys of step ``s`` of ``(seed, s)``, so the result equals an uninterrupted run (bitwise on the same
    machine). Lines of ``metrics.jsonl`` for steps after that checkpoint (written before the interruption, and
    re-done now) are moved to ``metrics.superseded.jsonl`` first, with a notice, so no step is logged twice and no
    line is lost. A resume that changes the run is refused with a :class:`jaxnoise.workdir.WorkdirError` listing
    the differences and the fix: another model, dataset or training-set size, or any config field of the schedule,
    data order or optimizer (``seed``, ``batch_size``, ``epochs``, ``learning_rate``, ``schedule``,
    ``warmup_steps``, ``momentum``, ``nesterov``, ``weight_decay``); ``checkpoint_every``, ``max_to_keep``,
    ``log_every``, ``eval_batch_size`` and ``max_steps`` may change. A changed loss, loss config or hparams gives a
    warning. To train a finished run further, start a new run from its weights in a new workdir
    (``variables=jaxnoise.checkpoint.load_variables(workdir)``). A workdir whose ``metrics.jsonl`` has records
    but which holds no finished checkpoint is refused (:class:`jaxnoise.workdir.WorkdirError`) before anything is
    trained: training it would start over at step 0 and mix a new history into the old one.

    Portable checkpoint (``portable_checkpoint``, a ``.npz`` path outside the workdir): every checkpoint is also
    written there, replacing the previous one atomically, as the leaves of the state that differ from the step-0
    state (``jaxnoise.checkpoint.save_delta``: for blocks trained on a frozen backbone, only the blocks and their
    optimizer slots) with the run metadata. When the workdir holds no checkpoint but that file exists (a fresh
    clone of committed results, a lost work dir), training resumes from it, with the line ``WORKDIR: no
    checkpoint; resuming from the portable checkpoint PATH (step S)``, the same resume checks, and the same result
    as an uninterrupted run; put the run's ``metrics.jsonl`` back into the workdir first to keep its history
    (lines after step S are superseded as above). A file taken against another step-0 state (other pretrained
    weights) is refused (``jaxnoise.checkpoint.CheckpointMismatchError``). Single-process runs only.

    Interruption (Ctrl-C): a ``KeyboardInterrupt`` during training writes the metrics of the steps done since the
    last ``metrics.jsonl`` line as a ``"train"`` line, checkpoints the last completed step (unless it is already
    saved; single-process runs only: a multi-process run resumes from its last periodic checkpoint) and raises
    :class:`jaxnoise.workdir.TrainingInterrupted` (a ``KeyboardInterrupt`` with ``.step`` and ``.workdir``). Running
    the same call again resumes it to the result of an uninterrupted run (an epoch line whose evaluation was
    interrupted is written on resume).

    Data parallelism (``mesh``): the state (parameters, BatchNorm statistics, optimizer state, step) is replicated
    on every device of the mesh (``NamedSharding(mesh, PartitionSpec())``) and every batch is split along its
    first axis over all the mesh's devices, whatever its axis names (:func:`batch_spec`); ``jax.jit`` partitions
    the step and XLA all-reduces the gradients and BatchNorm batch statistics. ``config.batch_size`` stays the
    global batch size and must be a multiple of ``mesh.size``. Random draws (augmentation, loss noise) are
    defined independently of the sharding, so the parameters equal the one-device run's up to float summation
    order (measured: 1e-7 after 6 steps) and checkpoints are interchangeable between meshes: a resume restores
    the checkpoint straight into replicated arrays on the given mesh (or on one device without one).

    Multi-host: start the same command in every process after ``jaxnoise.distributed.initialize()``, with a mesh
    over all processes' devices (``jaxnoise.distributed.make_mesh(...)``) and ``workdir`` on a filesystem every
    process sees. Every process holds the same full dataset and draws the same batches (the order is a pure
    function of the seed and epoch) and builds the global arrays from them (each supplies its own devices'
    shards); every process takes part in the checkpoint saves and restores (orbax coordinates them), and only
    process 0 (``jaxnoise.distributed.is_main_process()``) writes ``metrics.jsonl``, ``checkpoints/metadata.json``
    and the progress bar. The other processes return the same variables and, as history, the records of steps
    up to the resumed-from checkpoint found in ``metrics.jsonl`` followed by those of this call. A streamed dataset
    (``jaxnoise.stream.StreamingDataset``) is not held whole: each process reads and augments only its rows of each
    global batch (``jax.make_array_from_process_local_data``); the global batches are those of one process.

    Streamed datasets: epoch ``e`` visits the records in the in-memory order (``fold_in(data_key, e)``); the
    augmentation (random-resized crop, flip) runs in the stream's grain workers, seeded per record from that key, so
    the step's augmentation key is unused (``dataset.augment`` is the identity) and a resumed run still reproduces
    an uninterrupted one. The epoch-end evaluation streams ``dataset.test`` once.

    Args:
      model: the model (``jaxnoise.models.get_model``).
      dataset: a ``jaxnoise.data.Dataset``.
      config: the hyperparameters.
      workdir: the run directory (created if missing).
      variables: initial ``{"params", "batch_stats"}`` (e.g. pretrained); None initialises with
        ``model.init(name_key(key(seed), "jaxnoise/train/init"))``.
      loss_fn: ``loss_fn(params, batch_stats, images, labels, key, hparams) -> (loss, (logits,
        new_batch_stats, metrics))`` (:mod:`jaxnoise.methods`); None means :func:`clean_loss`.
      hparams: the loss's hyperparameters (``{"eta_train": 0.1, "lambda": 1.0}``...); None uses
        ``loss_fn.hparams``. They enter the jitted step as arrays and are recorded in the metadata.
      progress: show a tqdm bar (only on a terminal, and never when the environment variable ``CI`` is set).
      max_steps: stop (with a checkpoint) once this many steps are done, e.g. to split a run across time-limited
        jobs; the schedule still spans all ``config.epochs``. None runs to the end.
      metadata: extra JSON-serialisable entries for the checkpoint metadata.
      trainable: ``trainable(path) -> bool`` selecting the trained parameter leaves (see
        :func:`make_train_step`); the others stay bitwise unchanged. None trains all (e.g. denoising blocks on a
        frozen backbone: ``jaxnoise.denoise.is_denoiser_param``).
      mesh: a :class:`jax.sharding.Mesh` (e.g. ``jaxnoise.distributed.make_mesh(8, 1)``) to train data-parallel
        over its devices (see above); None trains on the default device.
      portable_checkpoint: a ``.npz`` path for the compact copy of each checkpoint a run in a fresh workdir can
        resume from (see above); None writes none.

    Returns:
      ``(variables, history)``: the final ``{"params", "batch_stats"}`` (jax arrays; with a mesh, global arrays
      replicated on its devices) and every record of ``metrics.jsonl`` (earlier, resumed-from runs included).

    Raises:
      ValueError: a bad config value (naming the field), a batch size that is not a multiple of the mesh's
        device count, or a dataset that does not fit the model.
      jaxnoise.workdir.WorkdirError: (a ValueError) the workdir holds another run, or settings of this one the
        resume would change, or a history without a checkpoint.
      jaxnoise.workdir.WorkdirLockedError: (a WorkdirError) another run trains into the workdir.
      jaxnoise.workdir.TrainingInterrupted: (a KeyboardInterrupt) Ctrl-C; the last completed step is checkpointed.
      jaxnoise.checkpoint.CheckpointError: the latest checkpoint is corrupt (the message says which step
        directory to delete).
    """
    num_train = _num_examples(dataset.train)
    config.validate(num_train=num_train)
    streaming = hasattr(dataset.train, "train_batches")
    if max_steps is not None and (not isinstance(max_steps, (int, np.integer)) or max_steps < 1):
        raise ValueError(f"max_steps={max_steps!r} must be an integer >= 1 (or None to run every epoch).")
    if mesh is not None:
        if not isinstance(mesh, Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh (e.g. jaxnoise.distributed.make_mesh(8, 1)), got "
                            f"{type(mesh).__name__}.")
        check_mesh_batch(config.batch_size, mesh)
    portable = None if portable_checkpoint is None else os.path.abspath(os.fspath(portable_checkpoint))
    if portable is not None:
        if not portable.endswith(".npz"):
            raise ValueError(f"portable_checkpoint={portable!r} must be a path ending with .npz.")
        if jax.process_count() > 1:
            raise ValueError("portable_checkpoint is for single-process runs; a multi-process run resumes from "
                             "its workdir's checkpoints: pass portable_checkpoint=None.")
    if int(model.num_classes) != int(dataset.num_classes):
        raise ValueError(f"model {model.name} has {model.num_classes} outputs but dataset {dataset.name} has "
                         f"{dataset.num_classes} classes: build the model with num_classes={dataset.num_classes}.")
    image_shape = tuple(getattr(dataset, "image_shape", model.input_shape))
    if image_shape != tuple(model.input_shape):
        raise ValueError(f"dataset {dataset.name} has images of shape {image_shape} but model {model.name} expects "
                         f"{tuple(model.input_shape)}: build the model with input_shape={image_shape}.")
    loss_fn = clean_loss(model) if loss_fn is None else loss_fn
    hparams_array = methods.resolve_hparams(loss_fn, hparams)

    steps_per_epoch = num_train // config.batch_size
    total_steps = config.epochs * steps_per_epoch
    stop = total_steps if max_steps is None else min(total_steps, int(max_steps))
    checkpoint_every = config.checkpoint_every or steps_per_epoch

    root = jax.random.key(config.seed)
    init_key = noise_lib.name_key(root, "jaxnoise/train/init")
    data_key = noise_lib.name_key(root, "jaxnoise/train/data")
    base_key = noise_lib.name_key(root, "jaxnoise/train/step")

    optimizer = make_optimizer(config, total_steps, decayed_paths=getattr(model, "analog_weight_paths", None),
                               trainable=trainable)
    run_meta = _run_metadata(model, dataset, config, loss_fn, total_steps, steps_per_epoch,
                             {"hparams": {k: float(v) for k, v in hparams_array.items()}, **(metadata or {})})

    workdir = os.path.abspath(os.fspath(workdir))
    os.makedirs(workdir, exist_ok=True)
    ckpt_dir = os.path.join(workdir, ckpt_lib.CHECKPOINT_SUBDIR)
    metrics_path = os.path.join(workdir, METRICS_FILE)
    train_step = make_train_step(model, loss_fn, optimizer, dataset, trainable, mesh)
    main = distributed.is_main_process()
    # A streamed dataset in a multi-process run: each process reads its rows of every batch (jaxnoise.stream).
    own_rows = streaming and mesh is not None and jax.process_count() > 1
    if mesh is None:
        def place(x: Any) -> Any:
            return x
    elif own_rows:
        replicated = NamedSharding(mesh, P())
        base_key = _replicate_key(base_key, mesh)
        hparams_array = distributed.replicate(hparams_array, mesh)
        rows_sharding = NamedSharding(mesh, batch_spec(mesh))

        def place(x: Any) -> Any:
            x = np.asarray(x)
            return jax.make_array_from_process_local_data(rows_sharding, x,
                                                          (x.shape[0] * jax.process_count(),) + x.shape[1:])
    else:
        replicated = NamedSharding(mesh, P())
        base_key = _replicate_key(base_key, mesh)
        hparams_array = distributed.replicate(hparams_array, mesh)

        def place(x: Any) -> Any:
            return shard_batch(x, mesh)
    started = time.time()

    def epoch_eval(state: TrainState) -> float:
        # With a mesh: on a host copy of the replicated variables, in every process (the same program as without
        # a mesh; np.asarray of a fully replicated array is process-local).
        eval_vars = state.variables if mesh is None else jax.tree.map(np.asarray, state.variables)
        return evaluate_clean(model, eval_vars, dataset.test, dataset.preprocess, config.eval_batch_size)

    step0: dict[str, Any] = {}

    def step0_state() -> Any:  # host copy of the step-0 state: the base of the portable checkpoint
        if not step0:
            v = variables if variables is not None else model.init(init_key)
            step0["state"] = jax.tree.map(np.asarray, _state_dict(init_state(model, v, optimizer)))
        return step0["state"]

    def save_checkpoint(ckpt: ckpt_lib.CheckpointManager, step: int, state: TrainState, meta: dict) -> None:
        ckpt.save(step, _state_dict(state), meta)
        if portable is not None:
            ckpt_lib.save_delta(portable, jax.tree.map(np.asarray, _state_dict(state)), step0_state(),
                                dict(meta, step=step))

    # Process 0 holds the workdir's lock: the other processes of a multi-process run share the workdir with it.
    with (workdir_lib.workdir_lock(workdir) if main else contextlib.nullcontext()), \
            ckpt_lib.CheckpointManager(ckpt_dir, max_to_keep=config.max_to_keep) as ckpt:
        start = ckpt.latest_step()
        saved_meta: Mapping[str, Any] = {}
        if start is None and portable is not None and os.path.exists(portable):
            saved_meta = ckpt_lib.read_delta_metadata(portable)
            _check_resume(saved_meta, run_meta, portable, workdir)
            tree, _ = ckpt_lib.load_delta(portable, step0_state())
            state = TrainState(**jax.tree.map(jnp.asarray, tree))
            if mesh is not None:
                state = distributed.replicate(state, mesh)
            print(f"{workdir}: no checkpoint; resuming from the portable checkpoint {portable} "
                  f"(step {int(state.step)})", flush=True)
        elif start is None:
            n_records = _history_records(metrics_path)
            if n_records:
                raise WorkdirError(
                    f"workdir {workdir} has {n_records} line{'s' * (n_records != 1)} of training history in "
                    f"{METRICS_FILE} but no "
                    f"finished checkpoint in {ckpt_dir} covers them, so training would start over at step 0 and "
                    f"mix a new history into them: use a new --workdir, or move {METRICS_FILE} away to start "
                    f"over.")
            if variables is None:
                variables = model.init(init_key)
            state = init_state(model, variables, optimizer)
            if mesh is not None:
                state = distributed.replicate(state, mesh)
        else:
            saved_meta = ckpt.read_metadata(start)
            _check_resume(saved_meta, run_meta, ckpt_dir, workdir)
            # Only the structure of the state is needed as the restore target: nothing is initialised.
            target = jax.eval_shape(lambda: _state_dict(init_state(model, model.init(init_key), optimizer)))
            # With a mesh, orbax reads the arrays straight into replicated global arrays on it.
            state = TrainState(**ckpt.restore(target, start, sharding=None if mesh is None else replicated))
        start = int(state.step)
        if main:
            if start >= stop:
                print(f"{workdir}: already complete at step {start} of {total_steps}; nothing to train", flush=True)
            elif start > 0:
                print(f"resuming {workdir} from step {start} of {total_steps} (epoch {start // steps_per_epoch + 1})",
                      flush=True)
            moved = _supersede_metrics(metrics_path, start)
            if moved:
                print(f"{workdir}: moved {moved} line{'s' * (moved != 1)} of {METRICS_FILE} past step {start} "
                      f"(written before the interruption; those steps are re-done) to "
                      f"{os.path.join(workdir, SUPERSEDED_METRICS_FILE)}", flush=True)
            history = None
            known = read_metrics(metrics_path)
        else:  # the file belongs to process 0: keep what the resume keeps, then this call's records
            history = [r for r in read_metrics(metrics_path) if isinstance(r, dict) and int(r.get("step", 0)) <= start]
            known = history
        # An interrupt during the evaluation at an epoch end checkpoints that step with the epoch's means
        # ("pending_epoch"); its epoch line is written now, unless an earlier resume already wrote it.
        pending_epoch = saved_meta.get("pending_epoch") if start == saved_meta.get("step") else None
        if not isinstance(pending_epoch, dict) or any(
                isinstance(r, dict) and r.get("type") == "epoch" and r.get("step") == start for r in known):
            pending_epoch = None

        def record(kind: str, step: int, values: dict[str, float]) -> None:
            now = time.time()
            line = {"type": kind, "step": step, "epoch": -(-step // steps_per_epoch), **values,
                    "time": now, "elapsed": now - started}
            if log is None:
                history.append(line)
                return
            log.write(json.dumps(line) + "\n")
            log.flush()

        s = start
        window: list[dict[str, jax.Array]] = []
        epoch_window: list[dict[str, jax.Array]] = []
        metrics = None  # of the last step: assigned with the state it belongs to
        epoch_means = None  # the means of an epoch whose end-of-epoch evaluation is running
        last_epoch_line = start if pending_epoch is None else None  # step of the last epoch line
        with (open(metrics_path, "a") if main else contextlib.nullcontext()) as log, \
                tqdm(total=total_steps, initial=start, unit="step",
                     disable=not (main and _progress_enabled(progress))) as bar:
            try:
                if pending_epoch is not None:
                    record("epoch", start, {"test_accuracy": epoch_eval(state), **pending_epoch})
                    last_epoch_line = start
                while s < stop:
                    epoch = s // steps_per_epoch
                    first = s - epoch * steps_per_epoch  # batches of this epoch already done before a resume
                    for _, (images, labels) in _epoch(dataset, data_key, config.batch_size, epoch, first, own_rows):
                        state, metrics = train_step(state, place(images), place(labels), base_key, hparams_array)
                        window.append(metrics)
                        epoch_window.append(metrics)
                        s += 1
                        bar.update(1)
                        epoch_end = s % steps_per_epoch == 0
                        if s % config.log_every == 0 or epoch_end or s == stop:
                            values = _mean_metrics(window)
                            window = []
                            record("train", s, values)
                            bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['accuracy']:.3f}")
                        if epoch_end:
                            means = _mean_metrics(epoch_window)
                            epoch_means = {"train_loss": means["loss"], "train_accuracy": means["accuracy"],
                                           "lr": means["lr"]}
                            test_accuracy = epoch_eval(state)
                            epoch_window = []
                            record("epoch", s, {"test_accuracy": test_accuracy, **epoch_means})
                            last_epoch_line, epoch_means = s, None
                        # Logged before saved: a checkpoint's lines are always in the file.
                        if s % checkpoint_every == 0 or s == stop:
                            save_checkpoint(ckpt, s, state, dict(run_meta, epoch=s / steps_per_epoch))
                        if s >= stop:
                            break
            except KeyboardInterrupt:
                raise _interrupted(state, metrics, s, start, window, epoch_window, epoch_means, last_epoch_line,
                                   steps_per_epoch, record, ckpt, run_meta, workdir, metrics_path,
                                   save_checkpoint) from None
    return state.variables, read_metrics(metrics_path) if main else history


def _num_examples(split: Any) -> int:
    return len(split.labels) if hasattr(split, "labels") else len(split)


def _epoch(dataset: Any, data_key: jax.Array, batch_size: int, epoch: int, first: int, own_rows: bool):
    """``(b, (images, labels))`` for the batches ``b >= first`` of epoch ``epoch``: in memory
    (``data.epoch_batches``), or streamed in the same order with the augmentation done by the stream's workers
    (``jaxnoise.stream.StreamSplit.train_batches``; ``own_rows``: this process's rows of each batch only)."""
    if hasattr(dataset.train, "train_batches"):
        p, n = (jax.process_index(), jax.process_count()) if own_rows else (0, 1)
        return enumerate(dataset.train.train_batches(data_key, epoch, batch_size, first=first, process_index=p,
                                                     process_count=n), start=first)
    return ((b, x) for b, x in enumerate(data_lib.epoch_batches(data_key, dataset.train, batch_size, epoch))
            if b >= first)


def _interrupted(state, metrics, s, start, window, epoch_window, epoch_means, last_epoch_line, steps_per_epoch,
                 record, ckpt, run_meta, workdir, metrics_path, save_checkpoint) -> TrainingInterrupted:
    """After a KeyboardInterrupt in :func:`train`'s loop: logs the unlogged steps and checkpoints the last completed
    step (the state's own step, whatever the loop had counted), then returns the exception to raise."""
    latest = ckpt.latest_step()

    def not_saved(done: int | None, why: str) -> TrainingInterrupted:
        if latest is not None:
            then = f"re-run the same command to resume from step {latest}"
        else:
            then = (f"no checkpoint was written yet, so move {metrics_path} away (or use a new --workdir) and "
                    f"re-run the same command")
        return TrainingInterrupted((latest or 0) if done is None else done, workdir, saved=False,
                                   message=f"interrupted at step {'?' if done is None else done}; {why}; {then}")

    try:
        done = int(state.step)
    except Exception:  # the state was donated to a step the interrupt cut short: it is gone
        return not_saved(None, "the training state was lost mid-step, so it was not checkpointed")
    if jax.process_count() > 1:  # a save is collective, and the other processes are not stopping here
        return not_saved(done, "a multi-process run is not checkpointed on interrupt")
    if metrics is not None and done == s + 1:  # interrupted after the step, before the loop recorded it
        if not (window and window[-1] is metrics):
            window.append(metrics)
        if not (epoch_window and epoch_window[-1] is metrics):
            epoch_window.append(metrics)
    if window:  # the steps since the last train line: their line comes before the checkpoint, as always
        record("train", done, _mean_metrics(window))
    if latest == done:
        return TrainingInterrupted(done, workdir)
    if done == 0:
        return TrainingInterrupted(0, workdir, saved=False, message="interrupted at step 0, before the first "
                                   "step was done; nothing to save; re-run the same command to start")
    meta = dict(run_meta, epoch=done / steps_per_epoch)
    if done % steps_per_epoch == 0 and last_epoch_line != done and done > start:
        # The epoch line is missing (its evaluation was interrupted): the resume writes it from these means.
        if epoch_means is None:
            means = _mean_metrics(epoch_window)
            epoch_means = {"train_loss": means["loss"], "train_accuracy": means["accuracy"], "lr": means["lr"]}
        meta["pending_epoch"] = epoch_means
    try:
        save_checkpoint(ckpt, done, state, meta)
    except Exception as e:  # noqa: BLE001 - reported in the message; the interrupt is what propagates
        return not_saved(done, f"its checkpoint could not be saved ({type(e).__name__}: {e})")
    return TrainingInterrupted(done, workdir)


def _state_dict(state: TrainState) -> dict[str, Any]:
    """The checkpointed form of a :class:`TrainState`."""
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state}


__all__ = ["AUGMENT_KEY", "LOSS_KEY", "METRICS_FILE", "SCHEDULES", "SUPERSEDED_METRICS_FILE", "TrainConfig",
           "TrainState", "TrainingInterrupted", "WorkdirError", "WorkdirLockedError", "batch_spec",
           "check_mesh_batch", "clean_loss", "current_learning_rate", "evaluate_clean", "init_state", "kernel_mask",
           "make_optimizer", "make_schedule", "make_train_step", "read_metrics", "shard_batch", "step_keys",
           "train", "trainable_mask"]
