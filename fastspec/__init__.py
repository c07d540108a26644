"""fastspec: the galaxy-spectrum autoencoder of Melchior, Hahn & Liang (2022), fast.

The package's modules each do one job (README, Layout); every error fastspec raises on purpose derives from
`fastspec.FastspecError`.
"""
import os

# torch and numba (threading layer omp) run their parallel regions on GNU OpenMP pools whose idle threads spin;
# beside another busy process a spinning thread holds the core the working one needs (training 2.3x slower than
# with passive waiting, which costs ~4% on a quiet machine: bench/results/busy-train-*.md). It must be set before
# torch or numba start their pools; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import FastspecError  # noqa: E402

__version__ = "0.1.0"

__all__ = ["FastspecError", "__version__"]
