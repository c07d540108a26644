"""What the numba CPU kernels share: their fast-math flags, bit-level helpers inside jitted code, and flat
numpy views of torch tensors at the boundary."""
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

# Every fast-math flag except nnan/ninf: NaN redshifts, fluxes and keys must still be seen by the comparisons
# (with them, LLVM deletes isnan checks). None of these can make a backward's recomputed values differ from
# the forward's: both run the same expressions.
FASTMATH = {"contract", "arcp", "nsz", "reassoc", "afn"}


@intrinsic
def f32_from_bits(typingctx, bits):
    # Reinterpret the low 32 bits of an integer as a float32 (bf16 → fp32 upcast, 2**n without libm).
    sig = types.float32(types.int64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.trunc(args[0], ir.IntType(32)), ir.FloatType())

    return sig, codegen


@intrinsic
def bits_from_f32(typingctx, x):
    # The bits of a float32 as a non-negative int64 (fp32 → bf16 rounding).
    sig = types.int64(types.float32)

    def codegen(context, builder, signature, args):
        return builder.zext(builder.bitcast(args[0], ir.IntType(32)), ir.IntType(64))

    return sig, codegen


def flat_buffer(t: torch.Tensor) -> np.ndarray:
    """t's elements as a flat numpy array starting at t's first element, in place (bf16 as its uint16 bits):
    the kernels address rows by element offsets and strides, so one compiled version serves any view."""
    span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    flat = torch.as_strided(t, (span,), (1,), t.storage_offset())
    if t.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view("uint16")
    return flat.numpy()
