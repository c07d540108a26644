"""What the kernel tests share: the backends every test body runs on, and one closeness check against float64
references with one tolerance table (fastspec.kernels.core.TOLERANCE)."""
import torch
from fastspec.kernels.core import TOLERANCE

HAS_CUDA = torch.cuda.is_available()

# numba, and the Triton kernels — in the interpreter without a GPU (conftest sets TRITON_INTERPRET), on CUDA
# when present.
BACKENDS = [("numba", "cpu"), ("triton", "cuda" if HAS_CUDA else "cpu")]
IDS = [f"{b}-{d}" for b, d in BACKENDS]


def assert_close(actual, expected, tol, scale=None, what=""):
    """max |actual − expected| ≤ tol · scale, every value finite.

    tol: a dtype (its TOLERANCE: the kernel's output rounding) or a number. scale: the size the error is
    measured against — by default max(1, max |expected|) (values and gradients of O(1) and below are held to
    an absolute tol); a reduction over many terms passes the sum of their sizes.
    """
    tol = TOLERANCE[tol] if isinstance(tol, torch.dtype) else tol
    actual = torch.as_tensor(actual).double().cpu()
    expected = torch.as_tensor(expected).double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    if scale is None:
        scale = expected.abs().max().clamp_min(1.0) if expected.numel() else 1.0
    err = (actual - expected).abs().max() if actual.numel() else torch.tensor(0.0)
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.3g} × scale {float(scale):.3g}"
