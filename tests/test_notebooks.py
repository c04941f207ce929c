"""Every notebook in notebooks/ runs top to bottom without a cell error.

Notebooks run in a fresh kernel (so each sets its own CPU device count), from the repository
root, on the Python running the tests: the kernel must import the meshplan being tested, not
one from another environment.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL = "python3"
TIMEOUT_S = 600  # per cell


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """Make the `python3` kernel start this interpreter.

    jupyter_client turns a kernelspec whose argv starts with "python" into sys.executable,
    which is what ipykernel installs into this environment. Only if another `python3`
    kernelspec (e.g. one in the user's Jupyter dir naming a different interpreter) would
    win, put one naming sys.executable first on JUPYTER_PATH, in a temporary directory:
    nothing is installed anywhere.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        argv0 = KernelSpecManager().get_kernel_spec(KERNEL).argv[0]
    except NoSuchKernel:
        argv0 = None
    python_names = {"python", f"python{sys.version_info[0]}",
                    "python{}.{}".format(*sys.version_info[:2])}
    if argv0 in python_names or (argv0 and os.path.realpath(argv0) ==
                                 os.path.realpath(sys.executable)):
        yield
        return
    spec_dir = tmp_path_factory.mktemp("jupyter") / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python 3 ({sys.prefix})", "language": "python"}))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        [str(spec_dir.parent.parent)] + ([old] if old else []))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = old


def _execute(nb):
    client = nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name=KERNEL,
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    return nb


def test_kernel_is_this_python(kernel_env):
    """The notebook kernel runs this interpreter and imports this checkout's meshplan."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import os, sys, meshplan\nprint(sys.prefix)\nprint(os.getcwd())\n"
        "print(os.path.dirname(os.path.dirname(os.path.abspath(meshplan.__file__))))")])
    text = "".join(o.get("text", "") for o in _execute(nb).cells[0].outputs)
    prefix, cwd, package_root = text.split()[:3]
    assert os.path.realpath(prefix) == os.path.realpath(sys.prefix), text
    assert os.path.realpath(cwd) == os.path.realpath(ROOT), text
    import meshplan
    here = os.path.dirname(os.path.dirname(os.path.abspath(meshplan.__file__)))
    assert os.path.realpath(package_root) == os.path.realpath(here), text


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks found in {ROOT / 'notebooks'}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, kernel_env):
    nb = nbformat.read(path, as_version=4)
    try:
        _execute(nb)
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name}: a cell raised\n{e}", pytrace=False)
