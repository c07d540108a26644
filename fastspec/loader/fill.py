"""The loader's one pass over a block of rows (numba, GIL-free): loss weights from ivar and mask, flux zeroed
where the weight is 0 (a masked NaN never reaches the loss), a check that weighted pixels are finite, and each
row scattered to its shuffled place in the output.
"""
from __future__ import annotations

import threading

import numpy as np

_FILL = None
_FILL_LOCK = threading.Lock()
_UNALIGNED = None  # numba intrinsic; a global, not a closure cell, so numba's on-disk cache can key on fill


def fill(flux, ivar, mask, zz, dest, row0, y, w, z, index):
    """One pass: w = ivar where unmasked and ivar > 0 (else 0), y = flux where w > 0 (else 0, so masked NaN
    never reaches the loss), written with z and the global row id (row0 + i) to rows `dest` of the outputs
    (dest < 0: row not wanted); returns the first (row, pixel, field) where a weighted pixel is not finite,
    or (−1, −1, −1)."""
    global _FILL
    if _FILL is None:
        with _FILL_LOCK:
            if _FILL is None:
                _FILL = _compile_fill()
    # the mask as bytes (a mapped file's mask is not guaranteed to hold only 0 and 1); Z as an aligned copy
    return _FILL(flux, ivar, mask.view(np.uint8), np.require(zz, np.float64, "CA"), dest, row0, y, w, z,
                 index)


def _compile_fill():
    import numba
    from numba import types
    from numba.core.imputils import impl_ret_borrowed
    from numba.extending import intrinsic

    @intrinsic
    def unaligned(typingctx, arr):
        # the same array typed as unaligned, so its loads are emitted with alignment 1: a memory-mapped HDF5
        # chunk may start at any byte
        if not isinstance(arr, types.Array):
            return None
        ret = types.Array(arr.dtype, arr.ndim, arr.layout, readonly=not arr.mutable, aligned=False)

        def codegen(context, builder, signature, args):
            return impl_ret_borrowed(context, builder, ret, args[0])

        return ret(arr), codegen

    global _UNALIGNED
    _UNALIGNED = unaligned

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def fill(flux, ivar, mask, zz, dest, row0, y, w, z, index):
        n, L = flux.shape
        fbits = _UNALIGNED(flux.view(np.uint32))
        ibits = _UNALIGNED(ivar.view(np.uint32))
        flux = _UNALIGNED(flux)
        ivar = _UNALIGNED(ivar)
        for i in range(n):
            d = dest[i]
            if d < 0:
                continue
            z[d] = zz[i]
            index[d] = row0 + i
            bad = 0
            # branch-free so LLVM vectorises it; non-finite = all exponent bits set
            for l in range(L):
                iv = ivar[i, l]
                good = mask[i, l] == 0 and iv > 0
                w[d, l] = iv if good else np.float32(0)
                y[d, l] = flux[i, l] if good else np.float32(0)
                nonfinite = ((fbits[i, l] & 0x7F800000) == 0x7F800000) or ((ibits[i, l] & 0x7F800000) == 0x7F800000)
                bad |= good and nonfinite
            if bad:
                for l in range(L):
                    if mask[i, l] == 0 and ivar[i, l] > 0:
                        if not np.isfinite(flux[i, l]):
                            return i, l, 0
                        if not np.isfinite(ivar[i, l]):
                            return i, l, 1
        return -1, -1, -1

    return fill
