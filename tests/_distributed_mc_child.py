"""Child process of tests/test_distributed_mc.py: Monte Carlo on 8 forced host devices vs the default device.

Run as ``python tests/_distributed_mc_child.py VARIABLES.npz OUT.json`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (set here too, before jax is imported).
"""

import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

jax.config.update("jax_debug_key_reuse", True)

from jaxnoise import analog as analog_lib  # noqa: E402
from jaxnoise import distributed, robustness  # noqa: E402
from jaxnoise.data import load_dataset  # noqa: E402
from jaxnoise.models import get_model  # noqa: E402
from jaxnoise.noise import NoiseSpec  # noqa: E402


def main(variables_path: str, out_path: str) -> None:
    ds = load_dataset("digits")
    model = get_model("cnn", input_shape=ds.image_shape, num_classes=10)
    flat = dict(np.load(variables_path))
    variables = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
    x, y = ds.test.images[:200], ds.test.labels[:200]
    common = dict(batch_size=48, preprocess=ds.preprocess)  # 5 batches: uneven over 2, 4 and 8 data shards
    spec = NoiseSpec(weight_eta=0.15, act_kind="multiplicative", act_eta=0.1)
    out = {"n_devices": jax.device_count(), "evaluate": {}, "sweep": {}, "device": {}}

    # 5 chips: uneven over every chips axis (8x1 pads to 8, 4x2 to 8, 2x4 to 6).
    single = robustness.evaluate(model, variables, x, y, spec, key=3, n_chips=5, **common)
    out["evaluate"]["single"] = single.per_chip.tolist()
    before = robustness.trace_count()
    for chips, data in ((8, 1), (4, 2)):
        mesh = distributed.make_mesh(chips, data)
        res = robustness.evaluate(model, variables, x, y, spec, key=3, n_chips=5, mesh=mesh, **common)
        out["evaluate"][f"{chips}x{data}"] = res.per_chip.tolist()
        out["evaluate"][f"{chips}x{data}_devices"] = len(mesh.devices.ravel())
    mesh = distributed.mc_mesh(5)
    out["mc_mesh_5"] = dict(mesh.shape)
    # A sweep over scales on one mesh compiles once.
    before = robustness.trace_count()
    sweep = robustness.sweep(model, variables, x, y, NoiseSpec(), weight_etas=[0.05, 0.1, 0.2], key=4, n_chips=11,
                             mesh=distributed.mc_mesh(11), **common)
    out["sweep"]["traces"] = robustness.trace_count() - before
    out["sweep"]["sharded"] = [r.per_chip.tolist() for r in sweep]
    single = robustness.sweep(model, variables, x, y, NoiseSpec(), weight_etas=[0.05, 0.1, 0.2], key=4, n_chips=11,
                              **common)
    out["sweep"]["single"] = [r.per_chip.tolist() for r in single]

    # PCM programming, drift, read noise and compensation; without the I/O chain, which takes long to compile.
    dev = analog_lib.preset("aihwkit_inference_default").replace(io=None)
    times = [1.0, 86400.0]
    a = robustness.evaluate_analog(model, variables, x, y, dev, times=times, key=5, n_chips=3, **common)
    b = robustness.evaluate_analog(model, variables, x, y, dev, times=times, key=5, n_chips=3,
                                   mesh=distributed.mc_mesh(3), **common)
    out["device"]["single"] = [r.per_chip.tolist() for r in a]
    out["device"]["sharded"] = [r.per_chip.tolist() for r in b]

    # Rounds of 5 chips reuse the programs compiled above (single device, and the 4 x 2 mesh of mc_mesh(5)).
    kw = dict(key=6, n_chips=5, target_ci_halfwidth=0.004, max_chips=23, **common)
    adaptive = robustness.evaluate(model, variables, x, y, spec, mesh=distributed.mc_mesh(5), **kw)
    plain = robustness.evaluate(model, variables, x, y, spec, **kw)
    out["adaptive"] = {"sharded": adaptive.per_chip.tolist(), "single": plain.per_chip.tolist(),
                       "stopping": adaptive.stopping}
    with open(out_path, "w") as f:
        json.dump(out, f)


def main_full_device(variables_path: str, out_path: str) -> None:
    """The full ``aihwkit_inference_default`` preset (DAC/ADC, bound management, PCM) on one device vs two meshes."""
    ds = load_dataset("digits")
    model = get_model("cnn", input_shape=ds.image_shape, num_classes=10)
    flat = dict(np.load(variables_path))
    variables = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
    x, y = ds.test.images[:300], ds.test.labels[:300]
    kw = dict(times=[1.0, 86400.0], key=5, n_chips=6, batch_size=50, preprocess=ds.preprocess)
    dev = analog_lib.preset("aihwkit_inference_default")
    out = {"single": [r.per_chip.tolist() for r in robustness.evaluate_analog(model, variables, x, y, dev, **kw)]}
    for chips, data in ((8, 1), (2, 4)):
        res = robustness.evaluate_analog(model, variables, x, y, dev, mesh=distributed.make_mesh(chips, data), **kw)
        out[f"{chips}x{data}"] = [r.per_chip.tolist() for r in res]
    with open(out_path, "w") as f:
        json.dump(out, f)


def main_multiprocess(variables_path: str, out_path: str, process_id: int, port: int) -> None:
    """One of 2 processes (2 CPU devices each, gloo collectives): Monte Carlo on a mesh over both processes'
    4 devices vs this process alone; writes the per-chip values it sees to ``out_path``."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    distributed.initialize(f"localhost:{port}", 2, process_id)
    ds = load_dataset("digits")
    model = get_model("cnn", input_shape=ds.image_shape, num_classes=10)
    flat = dict(np.load(variables_path))
    variables = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
    x, y = ds.test.images[:200], ds.test.labels[:200]
    spec = NoiseSpec(weight_eta=0.15, act_kind="multiplicative", act_eta=0.1)
    kw = dict(key=3, n_chips=5, batch_size=48, preprocess=ds.preprocess)
    out = {"process_count": jax.process_count(), "device_count": jax.device_count(),
           "main": distributed.is_main_process()}
    for chips, data in ((4, 1), (2, 2)):
        res = robustness.evaluate(model, variables, x, y, spec, mesh=distributed.make_mesh(chips, data), **kw)
        out[f"{chips}x{data}"] = res.per_chip.tolist()
    out["alone"] = robustness.evaluate(model, variables, x, y, spec, **kw).per_chip.tolist()
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    if sys.argv[1] == "multiprocess":
        main_multiprocess(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    elif sys.argv[1] == "full_device":
        main_full_device(sys.argv[2], sys.argv[3])
    else:
        main(sys.argv[1], sys.argv[2])
