"""Child process of tests/test_distributed_train.py: data-parallel training on forced CPU devices.

* ``python tests/_distributed_train_child.py OUT_JSON WORKDIR`` with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the device count must be set before jax is imported,
  hence a separate process): one process, 8 devices. Writes its measurements to ``OUT_JSON``.
* ``python tests/_distributed_train_child.py multiprocess OUT_JSON WORKDIR PROCESS_ID PORT`` with 2 devices per
  process, started twice (process ids 0 and 1): a 2-process run over ``jax.distributed``.

The tests assert on what it writes. Not collected by pytest (no ``test_`` prefix).
"""

import dataclasses
import json
import os
import sys
import time

import jax

jax.config.update("jax_debug_key_reuse", True)
if os.environ.get("JAXNOISE_TEST_COMPILATION_CACHE"):  # identical programs (re-run / resumed steps) compile once
    jax.config.update("jax_compilation_cache_dir", os.environ["JAXNOISE_TEST_COMPILATION_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import numpy as np  # noqa: E402
from _helpers import he_variables  # noqa: E402  (tests/ is sys.path[0] of this script)
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxnoise import checkpoint as ckpt  # noqa: E402
from jaxnoise import methods  # noqa: E402
from jaxnoise.data import Split, load_dataset  # noqa: E402
from jaxnoise.distributed import make_mesh  # noqa: E402
from jaxnoise.models import get_model  # noqa: E402
from jaxnoise.train import TrainConfig, train  # noqa: E402

N_TRAIN = 384  # 6 steps of 64: one epoch, so the epoch-end evaluation runs too
BATCH = 64


def max_abs_diff(a, b) -> float:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))





def sharding_info(tree, mesh) -> dict:
    """How the leaves of ``tree`` are placed, relative to ``mesh``."""
    leaves = jax.tree.leaves(tree)
    return {
        "named": all(isinstance(x.sharding, NamedSharding) for x in leaves),
        "same_mesh_devices": all(x.sharding.device_set == set(mesh.devices.flat) for x in leaves),
        "n_devices": sorted({len(x.sharding.device_set) for x in leaves}),
        "replicated": all(x.sharding.is_fully_replicated for x in leaves),
        "spec_empty": all(isinstance(x.sharding, NamedSharding) and x.sharding.spec == P() for x in leaves),
    }


def epoch_accuracy(history) -> float:
    return [r for r in history if r["type"] == "epoch"][-1]["test_accuracy"]


def main(out_path: str, workdir: str) -> None:
    started = time.time()
    assert jax.device_count() == 8, jax.devices()
    digits = load_dataset("digits")
    data = dataclasses.replace(digits, train=Split(digits.train.images[:N_TRAIN], digits.train.labels[:N_TRAIN]))
    model = get_model("cnn", input_shape=data.image_shape, num_classes=10)  # with BatchNorm
    mlp = get_model("mlp", input_shape=data.image_shape, num_classes=10)
    config = TrainConfig(epochs=1, batch_size=BATCH, learning_rate=0.05, log_every=2)
    mesh8, mesh24 = make_mesh(8, 1), make_mesh(2, 4)
    out: dict = {}
    initial = {"cnn": he_variables(model), "mlp": he_variables(mlp)}

    def run(name, mesh, model=model, **kwargs):
        return train(model, data, config, workdir=os.path.join(workdir, name), progress=False, mesh=mesh,
                     variables=initial[model.name], **kwargs)

    # a. clean loss: 1 device vs 8 x 1 vs 2 x 4.
    one, h_one = run("one", None)
    dp8, h_dp8 = run("dp8", mesh8)
    dp24, _ = run("dp24", mesh24)
    out["clean_diff_8"] = max_abs_diff(one, dp8)
    out["clean_diff_2x4"] = max_abs_diff(one, dp24)
    out["clean_sharding_8"] = sharding_info(dp8, mesh8)
    out["clean_sharding_2x4"] = sharding_info(dp24, mesh24)
    out["one_on_single_device"] = all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(one))
    out["test_accuracy"] = [epoch_accuracy(h_one), epoch_accuracy(h_dp8)]
    out["train_steps"] = [[r["step"] for r in h if r["type"] == "train"] for h in (h_one, h_dp8)]
    out["train_loss_diff"] = max(abs(a["loss"] - b["loss"]) for a, b in zip(h_one, h_dp8) if a["type"] == "train")
    with open(os.path.join(workdir, "dp8", "metrics.jsonl")) as f:
        out["dp8_metrics_lines"] = sum(1 for _ in f)

    # b. forward-noise loss, noise drawn inside the sharded step: weight noise (replicated shapes) and activation
    # noise (batch-sharded shapes). 1 device vs 8 x 1. On the MLP: it compiles faster than the CNN.
    noisy = methods.forward_noise(mlp, eta_train=0.1, act_kind="multiplicative", act_eta_train=0.1)
    n_one, _ = run("noisy_one", None, model=mlp, loss_fn=noisy)
    n_dp8, _ = run("noisy_dp8", mesh8, model=mlp, loss_fn=noisy)
    clean_mlp = methods.clean(mlp)
    c_one, _ = run("mlp_clean", None, model=mlp, loss_fn=clean_mlp)
    out["noisy_diff_8"] = max_abs_diff(n_one, n_dp8)
    out["noisy_vs_clean"] = max_abs_diff(n_one, c_one)  # the noise changes the result

    # c. sharded checkpoints: interrupted at step 3 on the 8 x 1 mesh, resumed on it to step 6.
    part, _ = run("cut", mesh8, max_steps=3)
    ckdir = os.path.join(workdir, "cut", ckpt.CHECKPOINT_SUBDIR)
    restored = ckpt.restore(ckdir, sharding=NamedSharding(mesh8, P()))
    out["restored_step"] = int(restored["step"])
    out["restored_sharding"] = sharding_info(restored, mesh8)
    out["restored_vs_part"] = max_abs_diff(restored["params"], part["params"])
    resumed, h_res = run("cut", mesh8)
    out["resumed_sharding"] = sharding_info(resumed, mesh8)
    out["resume_diff_vs_dp8"] = max_abs_diff(resumed, dp8)
    out["resume_diff_vs_one"] = max_abs_diff(resumed, one)
    out["resume_train_steps"] = [r["step"] for r in h_res if r["type"] == "train"]
    # ... and checkpoints move between meshes: the 8 x 1 checkpoint restored replicated on the 2 x 4 mesh.
    other = ckpt.restore(ckdir, sharding=NamedSharding(mesh24, P()))
    out["cross_mesh_sharding"] = sharding_info(other, mesh24)
    out["cross_mesh_diff"] = max_abs_diff(other["params"], resumed["params"])

    # d. a batch that does not split over the mesh.
    try:
        train(model, data, dataclasses.replace(config, batch_size=60), workdir=os.path.join(workdir, "bad"),
              progress=False, mesh=mesh8)
        out["bad_batch_error"] = None
    except ValueError as e:
        out["bad_batch_error"] = str(e)
    out["bad_workdir_created"] = os.path.exists(os.path.join(workdir, "bad"))

    out["seconds"] = time.time() - started
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)


def main_multiprocess(out_path: str, workdir: str, process_id: int, port: int) -> None:
    """One of 2 processes (2 CPU devices each, gloo collectives): the CNN trained on a 4-device mesh over both,
    interrupted at step 3 and resumed; writes this process's final variables and history to ``out_path``."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from jaxnoise import distributed
    distributed.initialize(f"localhost:{port}", 2, process_id)
    digits = load_dataset("digits")
    data = dataclasses.replace(digits, train=Split(digits.train.images[:N_TRAIN], digits.train.labels[:N_TRAIN]))
    model = get_model("cnn", input_shape=data.image_shape, num_classes=10)
    config = TrainConfig(epochs=1, batch_size=BATCH, learning_rate=0.05, log_every=2)
    mesh = make_mesh(jax.device_count(), 1)
    train(model, data, config, workdir=workdir, progress=False, mesh=mesh, variables=he_variables(model),
          max_steps=3)
    variables, history = train(model, data, config, workdir=workdir, progress=False, mesh=mesh)
    leaves = jax.tree.leaves(variables)
    np.savez(out_path + ".npz", *[np.asarray(x) for x in leaves])  # replicated: every process has the value
    with open(out_path, "w") as f:
        json.dump({"process_count": jax.process_count(), "device_count": jax.device_count(),
                   "fully_addressable": any(x.is_fully_addressable for x in leaves),
                   "history": [{k: v for k, v in r.items() if k not in ("time", "elapsed")} for r in history]}, f)


if __name__ == "__main__":
    if sys.argv[1] == "multiprocess":
        main_multiprocess(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main(sys.argv[1], sys.argv[2])
