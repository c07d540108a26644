"""fastspec.kernels: fused redshift-resample and attention-pooling ops (Triton on GPU, numba on CPU,
plain-torch reference), registered as torch.library custom ops."""
from .backend import BACKENDS, get_backend, set_backend, use_backend

__all__ = ["BACKENDS", "get_backend", "set_backend", "use_backend"]
