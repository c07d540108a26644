"""What every kernel op shares: the float dtypes it takes and the one it accumulates in, the tolerance its
kernels are held to against a float64 reference, the argument checks behind its error messages, and the
backend a call runs on (read once, at trace time, under torch.compile)."""
from __future__ import annotations

import importlib

import torch

from .backend import resolve

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_NAMES = "float16, bfloat16, float32 or float64"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for inputs of `dtype`: float32, or float64 for float64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Largest error of a kernel's output against a float64 reference, relative to the output's scale, for inputs
# of each dtype: the rounding of the output dominates. bf16 allows a whole unit in the last place (the Triton
# interpreter truncates fp32 → bf16 instead of rounding). The kernel tests hold every backend to it.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


# ---- argument checks: errors name the function, the argument and what was wrong -------------------------


def check_tensor(t, name: str, fn: str, dim: int | None = None, layout: str = "", floating: bool = True) -> None:
    """A torch.Tensor (of `dim` dimensions, described by `layout` such as '(N, C, T)', when given; of a float
    dtype the kernels take, when `floating`)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{fn}: {name} must have shape {layout}, got shape {tuple(t.shape)}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: {name} must be {_FLOAT_NAMES}; got {t.dtype}")


def check_device(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str, fn: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{fn}: {name} is on {t.device} but {ref_name} is on {ref.device}")


# ---- which implementation runs -------------------------------------------------------------------------


def backend_for(device) -> str:
    """The concrete backend ('triton', 'numba' or 'torch') of a call on tensors on `device`.

    Under torch.compile it is read once, at trace time, and baked into the graph: dynamo cannot trace the
    ContextVar behind `use_backend`. The attribute below is what torch.compiler.assume_constant_result sets;
    setting it here spares importing torch._dynamo (~1.5 s) with the kernels. The ops' torch.compile tests
    (fullgraph=True) fail if dynamo stops honouring it.
    """
    return resolve(device)


backend_for._dynamo_marked_constant = True

compiling = torch.compiler.is_compiling

_MODULES: dict = {}


def kernel_module(op: str, impl: str):
    """The module `<op>_<impl>` of this package ('numba' or 'triton' kernels), imported on first use: numba
    and triton take seconds to import, and triton is optional on CPU."""
    mod = _MODULES.get((op, impl))
    if mod is None:
        if impl not in ("numba", "triton"):
            raise ValueError(f"fastspec {op} ops: unknown impl {impl!r} (expected 'numba' or 'triton')")
        mod = _MODULES[op, impl] = importlib.import_module(f".{op}_{impl}", __package__)
    return mod
