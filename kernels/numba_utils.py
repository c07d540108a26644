"""numba helpers shared by the CPU kernels."""
from llvmlite import ir
from numba import types
from numba.extending import intrinsic


@intrinsic
def f32_from_bits(typingctx, bits):
    # Reinterpret the low 32 bits of an integer as a float32 (bf16 → fp32 upcast, 2**n without libm).
    sig = types.float32(types.int64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.trunc(args[0], ir.IntType(32)), ir.FloatType())

    return sig, codegen
