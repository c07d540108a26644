"""fastspec: the galaxy-spectrum autoencoder of Melchior, Hahn & Liang (2022), fast.

The package's modules each do one job (README, Layout); every error fastspec raises on purpose derives from
`fastspec.FastspecError`.
"""
from .errors import FastspecError

__version__ = "0.1.0"

__all__ = ["FastspecError", "__version__"]
