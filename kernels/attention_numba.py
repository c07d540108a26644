"""numba CPU kernels for attention pooling, e[n, c] = Σ_t h[n, c, t] · softmax_t(k[n, c, :])[t], and their
torch-facing wrappers (the CPU implementation).

The kernels take flat 1-D buffers plus element offsets and (n, c) strides, with unit stride along t, so
one compiled version per dtype serves contiguous inputs and channel-sliced views alike (the encoder passes
h and k as the two channel halves of one conv output; the caller copies the rare input whose t stride is
not 1). Rows r = n·C + c run in parallel; a row of T ≈ 72 values lives in L1, so h, k (and g) are read
from memory once and dh, dk written once. Accumulation is in the buffers' dtype, which the caller makes
fp32 (half types are upcast at the boundary) or fp64.

Semantics shared with the Triton kernels and the torch reference:
  * keys equal to -inf get zero weight; a row whose keys are all -inf (or T = 0) pools nothing: e = 0 and
    both gradients are 0;
  * NaN anywhere in a row's keys, or a +inf key, gives NaN for that row (as torch.softmax does).
"""
from __future__ import annotations

import math
import sys

import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import overload

from .core import acc_dtype
from .numba_utils import FASTMATH, f32_from_bits, flat_buffer


def _exp_nonpos(x):  # pragma: no cover - replaced by the overload below inside numba code
    return math.exp(x)


@overload(_exp_nonpos, fastmath=FASTMATH)
def _exp_nonpos_impl(x):
    """exp(x) for x <= 0, -inf or NaN (x = key - row max).

    float32 gets a branch-free Cephes polynomial that LLVM vectorises (numba without SVML calls the scalar
    libm expf, which made the exp the bottleneck); rel. error ≈ 2e-7. Other types use math.exp.
    """
    if x == types.float32:
        def impl(x):
            # Clamp first so the float -> int conversion never sees NaN or -inf (undefined in LLVM);
            # the true value is restored by the final select.
            xc = x if x >= np.float32(-87.0) else np.float32(-87.0)
            n = np.floor(xc * np.float32(1.4426950408889634) + np.float32(0.5))
            r = xc - n * np.float32(0.693359375) - n * np.float32(-2.12194440e-4)
            p = np.float32(1.9875691500e-4)
            p = p * r + np.float32(1.3981999507e-3)
            p = p * r + np.float32(8.3334519073e-3)
            p = p * r + np.float32(4.1665795894e-2)
            p = p * r + np.float32(1.6666665459e-1)
            p = p * r + np.float32(5.0000001201e-1)
            y = p * r * r + r + np.float32(1.0)
            y = y * f32_from_bits((np.int64(n) + 127) << 23)
            if x >= np.float32(-87.0):
                return y
            if x < np.float32(-87.0):
                return np.float32(0.0)
            return x  # NaN

        return impl
    return lambda x: math.exp(x)


def _row_max(krow):  # pragma: no cover - replaced by the overload below inside numba code
    return krow.max()


@overload(_row_max, fastmath=FASTMATH)
def _row_max_impl(krow):
    """Largest key of a contiguous row; NaN keys may be skipped (the exp loop turns them into NaN anyway).

    A float compare-and-select chain does not vectorise without the nnan flag and cost as much as the
    whole exp loop; for float32 the max runs on order-preserving integer images of the bit patterns.
    """
    if krow.dtype == types.float32:
        def impl(krow):
            bits = krow.view(np.int32)
            m = np.int64(-(2**31))
            for t in range(bits.shape[0]):
                i = np.int64(bits[t])
                v = i ^ ((i >> 31) & 0x7FFFFFFF)  # negative floats: reverse the order of their bits
                if v > m:
                    m = v
            return f32_from_bits(m ^ ((m >> 31) & 0x7FFFFFFF))

        return impl

    def impl_scalar(krow):
        m = krow.dtype.type(-np.inf)
        for t in range(krow.shape[0]):
            if krow[t] > m:
                m = krow[t]
        return m

    return impl_scalar


@njit(fastmath=FASTMATH)
def _shift(krow):
    """The softmax shift: the row max, or 0 when every key is -inf (then all weights are exactly 0)."""
    m = _row_max(krow)
    if m == -np.inf:
        return krow.dtype.type(0.0)
    return m


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _fwd_kernel(hb, h_off, h_sn, h_sc, kb, k_off, k_sn, k_sc, C, T, e):
    """e[r] for rows r = n·C + c; e is a contiguous (N·C,) buffer of hb's dtype."""
    zero = hb.dtype.type(0.0)
    for r in prange(e.shape[0]):
        n = r // C
        c = r - n * C
        hr = h_off + n * h_sn + c * h_sc
        kr = k_off + n * k_sn + c * k_sc
        hrow = hb[hr:hr + T]
        krow = kb[kr:kr + T]
        m = _shift(krow)
        s = zero
        acc = zero
        for t in range(T):
            p = _exp_nonpos(krow[t] - m)
            s += p
            acc += p * hrow[t]
        e[r] = zero if s == zero else acc / s


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _bwd_kernel(gb, g_off, g_sn, g_sc, hb, h_off, h_sn, h_sc, kb, k_off, k_sn, k_sc, C, T, dh, dk):
    """dh = g·a and dk = g·a·(h − e), a = softmax_t(k), e = Σ_t a h; dh, dk contiguous (N·C·T,) buffers."""
    zero = hb.dtype.type(0.0)
    one = hb.dtype.type(1.0)
    R = dh.shape[0] // T if T > 0 else 0
    for r in prange(R):
        n = r // C
        c = r - n * C
        hr = h_off + n * h_sn + c * h_sc
        kr = k_off + n * k_sn + c * k_sc
        hrow = hb[hr:hr + T]
        krow = kb[kr:kr + T]
        dhrow = dh[r * T:(r + 1) * T]
        dkrow = dk[r * T:(r + 1) * T]
        m = _shift(krow)
        s = zero
        acc = zero
        # dh doubles as scratch for the unnormalised weights, so each exp is computed once.
        for t in range(T):
            p = _exp_nonpos(krow[t] - m)
            dhrow[t] = p
            s += p
            acc += p * hrow[t]
        inv_s = zero if s == zero else one / s
        e = acc * inv_s
        g = gb[g_off + n * g_sn + c * g_sc] * inv_s
        for t in range(T):
            ga = g * dhrow[t]
            dhrow[t] = ga
            dkrow[t] = ga * (hrow[t] - e)


# ---- torch-facing wrappers (CPU tensors in, CPU tensors out) ----------------------------------------------

_HUGE_PAGE = 1 << 21
_MADV_HUGEPAGE = 14
_madvise = None


def _empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty, with large buffers marked for transparent huge pages before their first touch.

    A fresh 4 KiB-page buffer costs one page fault per page when the kernel first writes it; for the
    backward's dh and dk (N×C×T each) those faults took longer than the kernel itself on the 2-core
    development machine (75 MB: ~110 ms with 4 KiB pages, ~30 ms with 2 MiB pages). Linux only; a no-op
    elsewhere or when THP is disabled."""
    global _madvise
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    if nbytes < 2 * _HUGE_PAGE or not sys.platform.startswith("linux"):
        return t
    if _madvise is None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _madvise = libc.madvise
        except (OSError, AttributeError):
            _madvise = False
    if _madvise:
        start = (t.data_ptr() + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
        end = (t.data_ptr() + nbytes) & ~(_HUGE_PAGE - 1)
        if end > start:
            _madvise(start, end - start, _MADV_HUGEPAGE)  # advisory: failure just means 4 KiB pages
    return t


def _operand(t: torch.Tensor, acc: torch.dtype):
    """(flat numpy buffer, stride_n, stride_c) of t, in place when possible: the kernels want unit stride
    along the last dim (anything else, rare, is copied) and fp32/fp64 (half types are upcast: numba has no
    float16/bfloat16); numpy views see raw memory, not a lazy negation bit, so that is resolved first."""
    t = t.detach().resolve_neg().to(acc)
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    return flat_buffer(t), t.stride(0), t.stride(1)


def attention_pool_fwd(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """e (N, C) in h's dtype. Inputs are assumed checked (same shape, device and float dtype)."""
    N, C, T = h.shape
    if N * C == 0 or T == 0:
        return torch.zeros((N, C), dtype=h.dtype)
    acc = acc_dtype(h.dtype)
    hb, h_sn, h_sc = _operand(h, acc)
    kb, k_sn, k_sc = _operand(k, acc)
    e = torch.empty((N, C), dtype=acc)
    _fwd_kernel(hb, 0, h_sn, h_sc, kb, 0, k_sn, k_sc, C, T, e.view(-1).numpy())
    return e.to(h.dtype)


def attention_pool_bwd(g: torch.Tensor, h: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh, dk), contiguous (N, C, T) in h's dtype, for the upstream gradient g (N, C)."""
    N, C, T = h.shape
    if N * C * T == 0:
        return torch.zeros((N, C, T), dtype=h.dtype), torch.zeros((N, C, T), dtype=h.dtype)
    acc = acc_dtype(h.dtype)
    g = g.detach().resolve_neg().to(acc)
    hb, h_sn, h_sc = _operand(h, acc)
    kb, k_sn, k_sc = _operand(k, acc)
    dh = _empty((N, C, T), acc)
    dk = _empty((N, C, T), acc)
    _bwd_kernel(flat_buffer(g), 0, g.stride(0), g.stride(1), hb, 0, h_sn, h_sc, kb, 0, k_sn, k_sc, C, T,
                dh.view(-1).numpy(), dk.view(-1).numpy())
    return dh.to(h.dtype), dk.to(h.dtype)
