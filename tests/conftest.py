"""Test setup shared by every test module.

Without a GPU the Triton kernels run in the Triton interpreter, which reads TRITON_INTERPRET when a
kernel is *defined*: so it is set here, before anything imports fastspec.kernels.
"""
import os
from pathlib import Path

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FASTSPEC_SHARED", REPO.parent / "shared"))
REAL_DATA = SHARED / "data" / "real"


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    if not REAL_DATA.is_dir():
        pytest.fail(f"real test spectra not found at {REAL_DATA} (set FASTSPEC_SHARED to the shared/ folder)")
    return REAL_DATA


def pytest_collection_modifyitems(config, items):
    """Mark the tests that run on a CUDA device `cuda`, so that `pytest -m cuda` runs exactly those (bench/gpu.py):
    every test with a parameter "cuda" (the kernel tests' BACKENDS give Triton the CUDA device when one is
    present), and with CUDA present the Triton-only tests (`test_triton_*`), which run on Triton's device."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        on_cuda = any(isinstance(v, str) and v.startswith("cuda") for v in params.values())
        if on_cuda or (_HAS_CUDA and getattr(item, "originalname", item.name).startswith("test_triton_")):
            item.add_marker(pytest.mark.cuda)
