"""What the Triton kernel modules share at launch: the interpreter flag, tile and block sizes, the
accumulation dtype as a Triton type, the CUDA device guard, and the dtype names of their compile specs."""
from __future__ import annotations

import contextlib

import torch
import triton.language as tl

from .backend import triton_interpreting
from .core import acc_dtype

# Read once, like @triton.jit, which reads TRITON_INTERPRET when a kernel is defined (this module is
# imported right before the kernel modules' kernels are).
INTERPRET = triton_interpreting()
# Elements per program tile: on a GPU 2048 (4 warps -> 16 per thread per tensor); the interpreter costs
# ~1.4 ms per program instance whatever its size, so it gets few, large programs.
GPU_TILE = 2048
TILE = 16384 if INTERPRET else GPU_TILE

_TL = {torch.float32: tl.float32, torch.float64: tl.float64}


def tl_acc_dtype(dtype: torch.dtype):
    """`core.acc_dtype` as a Triton type (the kernels' ACC constexpr)."""
    return _TL[acc_dtype(dtype)]


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def block_size(n: int, max_block: int, min_block: int = 16) -> int:
    """A power-of-two block covering `n` elements, clamped to [min_block, max_block]."""
    return max(min_block, min(max_block, next_power_of_2(n)))


def device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it t's (several GPUs per process)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# Triton pointer-type names of the input dtypes the compile specs take; 'fp64' serves the float64 gradcheck.
SPEC_DTYPES = ("fp32", "fp16", "bf16", "fp64")
_SPEC_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8}


def spec_dtype(dtype: str, fn: str):
    """(input pointer type, accumulation pointer type, accumulation Triton type, element size) for the compile
    specs of inputs of `dtype` ('fp32', 'fp16', 'bf16', 'fp64')."""
    if dtype not in SPEC_DTYPES:
        raise ValueError(f"{fn}: dtype must be one of {', '.join(SPEC_DTYPES)}, got {dtype!r}")
    acc = "fp64" if dtype == "fp64" else "fp32"
    return "*" + dtype, "*" + acc, (tl.float64 if acc == "fp64" else tl.float32), _SPEC_BYTES[dtype]
