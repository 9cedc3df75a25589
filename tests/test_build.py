"""Build configuration (setup.py) and package layout."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_setup():
    spec = importlib.util.spec_from_file_location("llkern_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the helpers, runs no build
    return module


def test_cuda_decision():
    setup = load_setup()
    assert setup._want_cuda("13.0", "/usr/local/cuda", flag="") is True       # CUDA torch + nvcc: build
    assert setup._want_cuda(None, "/usr/local/cuda", flag="") is False        # CPU torch: skip
    assert setup._want_cuda("13.0", None, flag="") is False                   # no nvcc: skip, install still works
    assert setup._want_cuda("13.0", "/usr/local/cuda", flag="0") is False     # forced off
    assert setup._want_cuda("13.0", "/usr/local/cuda", flag="1") is True
    with pytest.raises(SystemExit, match="CPU build"):
        setup._want_cuda(None, "/usr/local/cuda", flag="1")
    with pytest.raises(SystemExit, match="nvcc was not found"):
        setup._want_cuda("13.0", None, flag="1")
    with pytest.raises(SystemExit, match="must be 0 or 1"):
        setup._want_cuda("13.0", None, flag="yes")


def test_gencode_flags():
    setup = load_setup()
    assert setup._gencode_flags("80;90a") == ["-gencode=arch=compute_80,code=sm_80",
                                             "-gencode=arch=compute_90a,code=sm_90a"]
    assert setup._gencode_flags("9.0") == ["-gencode=arch=compute_90,code=sm_90"]
    with pytest.raises(SystemExit, match="no architecture"):
        setup._gencode_flags(" ; ")


def test_forcing_cuda_on_a_cpu_torch_fails_clearly():
    import torch

    if torch.version.cuda is not None:
        pytest.skip("torch is a CUDA build here")
    out = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                         env={**__import__("os").environ, "LLKERN_CUDA": "1"}, timeout=120)
    assert out.returncode != 0
    assert "LLKERN_CUDA=1 but the installed torch is a CPU build" in out.stderr


def test_triton_kernels_is_a_subpackage(tmp_path):
    # From a neutral directory (pytest puts the checkout on sys.path): the installed package maps
    # triton_kernels/ to llkern.triton_kernels and installs no top-level `triton_kernels`.
    script = ("import importlib.util, llkern.triton_kernels as t; print(t.__file__); "
              "spec = importlib.util.find_spec('triton_kernels'); print(spec.origin if spec else None)")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    subpackage, top_level = out.stdout.split()
    assert Path(subpackage).parent == ROOT / "triton_kernels"
    assert top_level == "None" or Path(top_level).parent != ROOT / "triton_kernels"


def test_every_package_is_installed():
    # setup.py lists the packages: a new folder left out would be missing from a wheel (an editable
    # install still finds it, so nothing else would notice)
    setup = load_setup()
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "llkern").rglob("__init__.py")}
    found |= {"llkern.triton_kernels", "llkern.recipes"}  # mapped from the repository's triton_kernels/ and recipes/
    assert set(setup.PACKAGES) == found
    assert setup.PACKAGE_DATA["llkern.recipes"] == ["*.json"]  # the recipes themselves travel in the wheel
