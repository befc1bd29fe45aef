"""Devices, meshes and processes: jaxnoise on JAX's own distributed runtime (``jax.sharding``).

jaxnoise never moves data between devices itself. It builds a :class:`jax.sharding.Mesh`, places global arrays on
it with :class:`~jax.sharding.NamedSharding` and lets ``jax.jit`` / ``jax.shard_map`` do the rest:

* **Monte Carlo evaluation** (``robustness.evaluate/sweep/evaluate_analog(..., mesh=...)``) shards chips over the
  ``"chips"`` axis of the mesh and data batches over its ``"data"`` axis (useful when chips are fewer than devices).
  :func:`mc_mesh` picks the layout.
* **Training** (``train.train(..., mesh=...)``) is data-parallel: the batch is sharded over every device of the mesh,
  parameters and optimizer state are replicated, and orbax saves and restores the sharded state.

Launching
---------
* **One process, several local devices** (a multi-GPU node, one TPU VM host, or a CPU with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` for testing): nothing to initialise; pass
  ``mesh=jaxnoise.distributed.mc_mesh(n_chips)`` (or ``--mesh`` on the CLI).
* **Several processes** (a TPU pod slice, several GPU nodes): start the same command in every process and call
  :func:`initialize` first (the CLI does so with ``--distributed``). On Cloud TPU and under SLURM/Open MPI
  ``jax.distributed.initialize()`` finds the coordinator itself; elsewhere set ``JAX_COORDINATOR_ADDRESS``
  (``host:port`` of process 0), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` in each process. For example::

      # TPU pod slice (every worker VM runs the same command; install jax[tpu] and jaxnoise on each first)
      gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command \
        "cd jaxnoise && jaxnoise sweep --distributed --mesh auto --model resnet20 --weights W.npz ..."
      # two GPU nodes under SLURM, one process per node owning its 8 GPUs
      srun --nodes 2 --ntasks-per-node 1 --gpus-per-task 8 jaxnoise sweep --distributed --mesh auto ...
      # without a scheduler: on node i (0 and 1)
      JAX_COORDINATOR_ADDRESS=node0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=i jaxnoise sweep --distributed ...

  One multi-GPU node needs no ``--distributed``: one process sees all its GPUs (``--mesh auto``).

  Every process must see the same data and arguments (jaxnoise builds each global array from the full host copy
  with ``jax.make_array_from_callback``, so no process needs to know which shards are its own) and only process 0
  writes files (:func:`is_main_process`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["CHIPS", "DATA", "P", "global_array", "initialize", "is_main_process", "mc_mesh", "make_mesh",
           "replicate", "to_host"]

CHIPS = "chips"  # mesh axis over which Monte Carlo chips are sharded
DATA = "data"  # mesh axis over which data (batches of images) are sharded

_initialized = False


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Starts JAX's multi-process runtime (``jax.distributed.initialize``) once; safe to call again.

    Call it at the start of every process of a multi-process launch, before any other JAX call. With no arguments
    ``jax.distributed.initialize()`` detects Cloud TPU, SLURM and Open MPI launches; elsewhere give the arguments or
    set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.

    Args:
      coordinator_address: ``host:port`` of process 0, or None to auto-detect / read the environment.
      num_processes: total number of processes, or None.
      process_id: this process's index, or None.

    Returns:
      True when more than one process is running after the call.
    """
    global _initialized
    if not _initialized:
        kwargs = {}
        if coordinator_address is not None:
            kwargs["coordinator_address"] = coordinator_address
        if num_processes is not None:
            kwargs["num_processes"] = int(num_processes)
        elif os.environ.get("JAX_NUM_PROCESSES"):
            kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
        if process_id is not None:
            kwargs["process_id"] = int(process_id)
        elif os.environ.get("JAX_PROCESS_ID"):
            kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
        jax.distributed.initialize(**kwargs)
        _initialized = True
    return jax.process_count() > 1


def is_main_process() -> bool:
    """True in process 0, the only process that writes files (results, checkpoints' metadata, plots, logs)."""
    return jax.process_index() == 0


def _devices(devices: Sequence[Any] | None) -> list[Any]:
    devs = list(jax.devices() if devices is None else devices)
    if not devs:
        raise ValueError("no devices given: pass devices=None to use jax.devices().")
    return devs


def make_mesh(n_chip_shards: int | None = None, n_data_shards: int = 1,
              devices: Sequence[Any] | None = None) -> Mesh:
    """A 2-D mesh with axes ``("chips", "data")`` over ``n_chip_shards * n_data_shards`` devices.

    Args:
      n_chip_shards: size of the ``"chips"`` axis; None: every device not used by the data axis.
      n_data_shards: size of the ``"data"`` axis.
      devices: the devices (default ``jax.devices()``, every device of every process).

    Returns:
      The mesh.

    Raises:
      ValueError: if the axes do not multiply to a number of devices available.

    Examples:
      >>> mesh = make_mesh()                       # all devices shard chips
      >>> mesh = make_mesh(2, 4)                   # 2 chip shards x 4 data shards = 8 devices
    """
    devs = _devices(devices)
    if n_data_shards < 1 or (n_chip_shards is not None and n_chip_shards < 1):
        raise ValueError(f"mesh axes must be >= 1, got chips={n_chip_shards}, data={n_data_shards}.")
    if n_chip_shards is None:
        if len(devs) % n_data_shards:
            raise ValueError(f"n_data_shards={n_data_shards} does not divide the {len(devs)} devices.")
        n_chip_shards = len(devs) // n_data_shards
    n = n_chip_shards * n_data_shards
    if n > len(devs):
        raise ValueError(f"a {n_chip_shards} x {n_data_shards} mesh needs {n} devices, only {len(devs)} are "
                         f"available (jax.devices()); on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N "
                         f"before importing jax.")
    return Mesh(np.asarray(devs[:n], dtype=object).reshape(n_chip_shards, n_data_shards), (CHIPS, DATA))


def mc_mesh(n_chips: int, devices: Sequence[Any] | None = None) -> Mesh:
    """The mesh for a Monte Carlo job of ``n_chips`` chips over ``devices`` (default: all).

    Chips are independent, so they shard first: the ``"chips"`` axis gets the largest divisor of the device count
    that is <= ``n_chips``, and the remaining factor shards the data batches. 32 chips on 8 devices -> 8 x 1;
    2 chips on 8 devices -> 2 x 4. Chips and batches that do not divide evenly are padded (and discarded).
    """
    devs = _devices(devices)
    if n_chips < 1:
        raise ValueError(f"n_chips={n_chips} must be >= 1.")
    n = len(devs)
    chips = max(d for d in range(1, n + 1) if n % d == 0 and d <= n_chips)
    return make_mesh(chips, n // chips, devs)


def global_array(x: Any, mesh: Mesh, spec: P) -> jax.Array:
    """A global ``jax.Array`` with ``NamedSharding(mesh, spec)`` built from a full host copy of ``x``.

    Every process passes the same ``x``; each supplies the shards of its own devices
    (``jax.make_array_from_callback``), so this works unchanged across hosts.
    """
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda idx: x[idx])


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every array leaf of ``tree`` replicated on every device of ``mesh`` (``PartitionSpec()``)."""
    return jax.tree.map(lambda x: global_array(x, mesh, P()), tree)


def to_host(x: jax.Array) -> np.ndarray:
    """The full value of a (possibly multi-host) global array as a NumPy array, in every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
