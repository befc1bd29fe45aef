"""The notebooks in notebooks/ run: each is executed (a copy; the committed file is never touched) in small mode.

Small mode is the environment variable ``JAXNOISE_NOTEBOOK_SMALL=1``, read by each notebook's first cell: fewer
images, chips, scales and epochs, same code path. The kernel is started by nbclient with this process's
environment and the kernelspec ``python3``, which jupyter_client runs with this interpreter (``sys.executable``),
so it imports the same ``jaxnoise``. The committed copies are the full runs: :func:`test_committed_notebook_is_executed`
checks that they carry their outputs.
"""

import copy
import os
import time

import pytest

nbformat = pytest.importorskip("nbformat", reason="executing the notebooks needs nbformat (pip install '.[test]')")
nbclient = pytest.importorskip("nbclient", reason="executing the notebooks needs nbclient (pip install '.[test]')")
pytest.importorskip("ipykernel", reason="executing the notebooks needs ipykernel (pip install '.[test]')")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(REPO_ROOT, "notebooks")
NOTEBOOKS = ("01_quickstart_digits.ipynb", "02_cifar_resnet_robustness.ipynb", "03_methods_side_by_side.ipynb")
CIFAR_NOTEBOOKS = ("02_cifar_resnet_robustness.ipynb",)  # need ../shared/pretrained and CIFAR-10
CELL_TIMEOUT_S = 300


def _cifar_missing() -> str | None:
    """Why notebook 2 cannot run here (None when it can): it needs the pretrained weights and CIFAR-10.

    Resolved at test time, from the repository root (conftest's chdir), as the notebook resolves them.
    """
    from jaxnoise import data

    weights = os.path.join("..", "shared", "pretrained", "resnet20_cifar10.npz")
    if not os.path.isfile(weights):
        return f"the pretrained weights {weights} are not beside the repository"
    d = data.resolve_data_dir(None)
    if d is None or not os.path.isdir(os.path.join(d, "cifar10")):
        return "no TFDS data dir holding cifar10 (set TFDS_DATA_DIR or provide ../shared/tfds)"
    return None


def _read(name):
    return nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)


def test_every_notebook_is_listed():
    on_disk = sorted(f for f in os.listdir(NOTEBOOK_DIR) if f.endswith(".ipynb"))
    assert on_disk == sorted(NOTEBOOKS), "add new notebooks to NOTEBOOKS so that they are executed"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_executed(name):
    """The committed copy is a full run: every code cell ran, in order, without an error, and shows output."""
    nb = _read(name)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{name} has no code cells"
    counts = [c.get("execution_count") for c in code]
    assert all(n is not None for n in counts), f"{name}: cells not executed (execution_count None): re-run it"
    assert counts == list(range(1, len(code) + 1)), f"{name}: cells executed out of order {counts}: re-run it"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{name}: committed with an error output: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    assert sum(len(c.get("outputs", [])) for c in code) >= len(code) // 2, f"{name}: outputs missing"
    text = "".join(o.get("text", "") for c in code for o in c.get("outputs", []) if o.get("output_type") == "stream")
    assert "small mode: True" not in text, f"{name}: the committed copy is a small-mode run; commit the full run"


# The two notebooks that train or evaluate ResNets take 30-45 s each even in small mode: they run with the slow set
# (which CI runs after the default suite); the methods notebook runs in the default suite.
SLOW_NOTEBOOKS = ("01_quickstart_digits.ipynb", "02_cifar_resnet_robustness.ipynb")


def _marks(n: str) -> list:
    return ([pytest.mark.cifar] if n in CIFAR_NOTEBOOKS else []) + ([pytest.mark.slow] if n in SLOW_NOTEBOOKS else [])


@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n)) for n in NOTEBOOKS])
def test_notebook_runs_in_small_mode(name, monkeypatch):
    if name in CIFAR_NOTEBOOKS:
        reason = _cifar_missing()
        if reason:
            pytest.skip(f"{name}: {reason}")
    monkeypatch.setenv("JAXNOISE_NOTEBOOK_SMALL", "1")  # inherited by the kernel
    monkeypatch.delenv("MPLBACKEND", raising=False)  # ipykernel's inline backend, as in the committed runs
    nb = copy.deepcopy(_read(name))  # the committed file is never written
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": NOTEBOOK_DIR}})
    t0 = time.time()
    client.execute()  # raises CellExecutionError with the cell's traceback on any error
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "small mode: True" in text, "the notebook did not see JAXNOISE_NOTEBOOK_SMALL=1"
    print(f"{name}: {time.time() - t0:.0f} s in small mode")
