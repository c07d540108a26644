"""numba CPU kernels for the encoder's element-wise block InstanceNorm1d → PReLU → MaxPool1d, fused.

Row r = n·C + c of x (N, C, L) is normalised with its own mean and biased variance, activated with the PReLU
slope of channel c and max-pooled in windows of `pool` (stride `pool`, `pad` virtual -inf on each side, the
tail that fills no window dropped, as torch's MaxPool1d). Rows are independent: chunks of rows run in
parallel, and a row (≤ 31 KB for DESI's 7781 fp32 pixels) stays in L1/L2 between the passes over it, so x is
read from memory once for the statistics and the output, and once more in the backward.

The backward recomputes the normalised values and each window's argmax (first maximum wins, as torch) from
x and the saved mean / rstd instead of keeping indices or activations: per row it scatters the pooled
gradient to the argmaxes, takes the PReLU slope there, and applies the InstanceNorm backward
dx = rstd·(dv − mean(dv) − x̂·mean(dv·x̂)), whose two row means only see the ≤ L_out argmax positions.

Buffers are flat 1-D arrays with element offsets and (n, c) strides and unit stride along the row. float32
and float64 buffers are used as they are; bfloat16 tensors come in as their raw uint16 bits (numba has no
bfloat16) and are decoded / rounded to nearest even here, so autocast activations need no fp32 copy.
Accumulation is in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

# fastmath without nnan/ninf (NaN rows must stay NaN) and without anything that could make the backward's
# recomputed activations differ from the forward's: they are the same (x − mean)·rstd and w·v products.
_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


@intrinsic
def _f32_from_bits(typingctx, bits):
    sig = types.float32(types.int64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.trunc(args[0], ir.IntType(32)), ir.FloatType())

    return sig, codegen


@intrinsic
def _bits_from_f32(typingctx, x):
    sig = types.int64(types.float32)

    def codegen(context, builder, signature, args):
        return builder.zext(builder.bitcast(args[0], ir.IntType(32)), ir.IntType(64))

    return sig, codegen


def _ld(buf, i):  # pragma: no cover - replaced by the overload inside numba code
    return buf[i]


@overload(_ld, fastmath=_FASTMATH)
def _ld_impl(buf, i):
    """buf[i] as the accumulation type: uint16 buffers hold bfloat16 bits (the high half of a float32)."""
    if buf.dtype == types.uint16:
        return lambda buf, i: _f32_from_bits(np.int64(buf[i]) << 16)
    return lambda buf, i: buf[i]


def _st(buf, i, v):  # pragma: no cover - replaced by the overload inside numba code
    buf[i] = v


@overload(_st, fastmath=_FASTMATH)
def _st_impl(buf, i, v):
    """buf[i] = v, rounding to nearest even into bfloat16 bits for uint16 buffers (NaN stays a quiet NaN)."""
    if buf.dtype == types.uint16:
        def impl(buf, i, v):
            f = np.float32(v)
            b = _bits_from_f32(f)
            b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
            buf[i] = np.uint16(0x7FC0) if f != f else np.uint16(b & 0xFFFF)

        return impl

    def impl_float(buf, i, v):
        buf[i] = v

    return impl_float


@njit(fastmath=_FASTMATH, inline="always")
def _row_stats(xr, inv_L, eps, zero, one):
    """(mean, 1/sqrt(var + eps)) of one row, the variance from centred values (no E[x²] − mean² loss).

    Every scalar is of the accumulation type (numba would promote float32 / int to float64)."""
    s = zero
    for t in range(xr.shape[0]):
        s += _ld(xr, t)
    mu = s * inv_L
    q = zero
    for t in range(xr.shape[0]):
        d = _ld(xr, t) - mu
        q += d * d
    return mu, one / math.sqrt(q * inv_L + eps)


@njit(fastmath=_FASTMATH, inline="always")
def _activate(xr, mu, rs, wc, zero, act):
    """act[t] = prelu((x[t] − mean)·rstd); row slices indexed from 0 so that the loop vectorises (an offset
    index would keep numba's negative-index wraparound in the loop)."""
    for t in range(xr.shape[0]):
        v = (_ld(xr, t) - mu) * rs
        act[t] = v if v > zero else wc * v


# Rows are addressed through slices (xb[base:base + L]) for the same reason; windows are read from a padded
# scratch row `padded` of the activations, -inf in the `pad` slots on either side, by plain index (a slice per
# window would cost two atomic reference-count updates each).


@njit(fastmath=_FASTMATH, inline="always")
def _pool_row(padded, pool, pad, outr, nan_value):
    """outr[j] = max of window j of the padded activations (NaN if the window holds one, as torch)."""
    for j in range(outr.shape[0]):
        k = j * pool
        m = padded[k + pad if j == 0 else k]  # the first window starts with `pad` -inf slots
        nan = m != m
        for q in range(k, k + pool):
            a = padded[q]
            m = a if a > m else m  # selects, not branches: random data mispredicts every other one
            nan |= a != a
        _st(outr, j, m if not nan else nan_value)


@njit(fastmath=_FASTMATH, inline="always")
def _bwd_row(xr, mu, rs, wc, gr, g_st, L_out, pool, pad, inv_L, zero, padded, dv_row, dxr):
    """dx of one row into dxr (may alias xr: each element is read before it is written); returns the row's
    PReLU-slope gradient. `padded` must hold the row's activations (see `_activate`)."""
    s_dv = zero
    s_dvx = zero
    dw = zero
    for j in range(L_out):
        k = j * pool
        # start at the window's first real position: the argmax is a real pixel even in NaN rows
        u = k + pad if j == 0 else k
        m = padded[u]
        for q in range(u + 1, k + pool):
            a = padded[q]
            better = a > m  # strict: the first maximum wins, as torch
            m = a if better else m  # selects, not branches (see _pool_row)
            u = q if better else u
        t = u - pad
        v = (_ld(xr, t) - mu) * rs
        g = _ld(gr, j * g_st)
        pos = v > zero
        dv = g if pos else g * wc
        dw += zero if pos else g * v
        dv_row[t] += dv
        s_dv += dv
        s_dvx += dv * v
    s_dv *= inv_L
    s_dvx *= inv_L
    for t in range(xr.shape[0]):
        v = (_ld(xr, t) - mu) * rs
        _st(dxr, t, rs * (dv_row[t] - s_dv - v * s_dvx))
        dv_row[t] = zero
    return dw


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def conv_block_fwd_numba(xb, x_off, x_sn, x_sc, C, L, wb, w_sc, pool, pad, L_out, eps, out, mean, rstd,
                         rows_per_chunk):
    """out (R·L_out,) = maxpool(prelu(instance_norm(x))) row by row; mean, rstd (R,) saved for the backward."""
    zero = mean.dtype.type(0.0)
    one = mean.dtype.type(1.0)
    nan_value = mean.dtype.type(np.nan)
    inv_L = one / mean.dtype.type(L)
    eps_ = mean.dtype.type(eps)
    R = mean.shape[0]
    n_chunks = (R + rows_per_chunk - 1) // rows_per_chunk
    for ch in prange(n_chunks):
        padded = np.full(L + 2 * pad, -np.inf, dtype=mean.dtype)
        act = padded[pad:pad + L]
        for r in range(ch * rows_per_chunk, min(R, (ch + 1) * rows_per_chunk)):
            n = r // C
            c = r - n * C
            base = x_off + n * x_sn + c * x_sc
            xr = xb[base:base + L]
            outr = out[r * L_out:(r + 1) * L_out]
            mean[r], rstd[r] = _row_stats(xr, inv_L, eps_, zero, one)
            # read back: the backward recomputes activations from exactly these stored values
            mu = mean[r]
            rs = rstd[r]
            wc = wb[c * w_sc]
            if pool == 1:
                for t in range(L):
                    v = (_ld(xr, t) - mu) * rs
                    _st(outr, t, v if v > zero else wc * v)
            else:
                _activate(xr, mu, rs, wc, zero, act)
                _pool_row(padded, pool, pad, outr, nan_value)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def conv_block_bwd_numba(gb, g_off, g_sn, g_sc, g_st, xb, x_off, x_sn, x_sc, C, L, wb, w_sc, pool, pad, L_out,
                         mean, rstd, dx, dw_rows, rows_per_chunk):
    """dx (R·L,) contiguous and the per-row PReLU-slope gradient dw_rows (R,) for the pooled gradient g."""
    zero = mean.dtype.type(0.0)
    inv_L = mean.dtype.type(1.0) / mean.dtype.type(L)
    R = mean.shape[0]
    n_chunks = (R + rows_per_chunk - 1) // rows_per_chunk
    for ch in prange(n_chunks):
        padded = np.full(L + 2 * pad, -np.inf, dtype=mean.dtype)
        act = padded[pad:pad + L]
        # dv at the argmax positions, zero elsewhere; reset while dx is written, ready for the next row
        dv_row = np.zeros(L, dtype=mean.dtype)
        for r in range(ch * rows_per_chunk, min(R, (ch + 1) * rows_per_chunk)):
            n = r // C
            c = r - n * C
            base = x_off + n * x_sn + c * x_sc
            xr = xb[base:base + L]
            gbase = g_off + n * g_sn + c * g_sc
            gr = gb[gbase:gbase + (L_out - 1) * g_st + 1]
            mu = mean[r]
            rs = rstd[r]
            wc = wb[c * w_sc]
            _activate(xr, mu, rs, wc, zero, act)
            dw_rows[r] = _bwd_row(xr, mu, rs, wc, gr, g_st, L_out, pool, pad, inv_L, zero, padded, dv_row,
                                  dx[r * L:(r + 1) * L])


# --- the first block on the spectrum itself: Conv1d with one input channel, fused in front of the above ---
# Its output (N, C, L), the largest activation of the encoder (128 × 3921 values per SDSS spectrum), is never
# stored: each row is convolved into an L1-resident scratch row (K shifted multiply-adds over the spectrum)
# and recomputed in the backward, which reduces the conv weight and bias gradients row by row.


@njit(fastmath=_FASTMATH, inline="always")
def _conv_row(yp, cw, cb, buf):
    """buf[t] = cb + Σ_j cw[j]·yp[t + j]: one output channel of a one-input-channel conv over the zero-padded
    spectrum yp, tap by tap so that the t loops vectorise."""
    for t in range(buf.shape[0]):
        buf[t] = cb
    for j in range(cw.shape[0]):
        wj = cw[j]
        ys = yp[j:j + buf.shape[0]]
        for t in range(buf.shape[0]):
            buf[t] += wj * ys[t]


@njit(fastmath=_FASTMATH, inline="always")
def _pad_spectrum(yb, y_off, y_sn, n, L_in, cpad, yp, zero):
    """yp = the spectrum of row n with `cpad` zeros in front (the tail of yp stays zero)."""
    base = y_off + n * y_sn
    yr = yb[base:base + L_in]
    ys = yp[cpad:cpad + L_in]
    for t in range(L_in):
        ys[t] = _ld(yr, t)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def spectrum_block_fwd_numba(yb, y_off, y_sn, L_in, cw, cb, cpad, C, L, wb, w_sc, pool, pad, L_out, eps, out,
                             mean, rstd, rows_per_chunk):
    """out (R·L_out,) = maxpool(prelu(instance_norm(conv1d(y)))) for a conv with one input channel:
    cw (C, K) taps, cb (C,) bias, cpad zeros of padding, conv output length L."""
    zero = mean.dtype.type(0.0)
    one = mean.dtype.type(1.0)
    nan_value = mean.dtype.type(np.nan)
    inv_L = one / mean.dtype.type(L)
    eps_ = mean.dtype.type(eps)
    R = mean.shape[0]
    K = cw.shape[1]
    n_chunks = (R + rows_per_chunk - 1) // rows_per_chunk
    for ch in prange(n_chunks):
        yp = np.zeros(L + K - 1, dtype=mean.dtype)
        buf = np.empty(L, dtype=mean.dtype)
        padded = np.full(L + 2 * pad, -np.inf, dtype=mean.dtype)
        act = padded[pad:pad + L]
        n_prev = -1
        for r in range(ch * rows_per_chunk, min(R, (ch + 1) * rows_per_chunk)):
            n = r // C
            c = r - n * C
            if n != n_prev:  # consecutive rows share the spectrum
                _pad_spectrum(yb, y_off, y_sn, n, L_in, cpad, yp, zero)
                n_prev = n
            _conv_row(yp, cw[c], cb[c], buf)
            outr = out[r * L_out:(r + 1) * L_out]
            mean[r], rstd[r] = _row_stats(buf, inv_L, eps_, zero, one)
            mu = mean[r]
            rs = rstd[r]
            _activate(buf, mu, rs, wb[c * w_sc], zero, act)
            _pool_row(padded, pool, pad, outr, nan_value)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def spectrum_block_bwd_numba(gb, g_off, g_sn, g_sc, g_st, yb, y_off, y_sn, L_in, cw, cb, cpad, C, L, wb, w_sc,
                             pool, pad, L_out, mean, rstd, dcw_rows, dcb_rows, dw_rows, rows_per_chunk):
    """Per-row gradients of the conv taps dcw_rows (R, K), conv bias dcb_rows (R,) and PReLU slope
    dw_rows (R,); the caller sums them over the batch."""
    zero = mean.dtype.type(0.0)
    inv_L = mean.dtype.type(1.0) / mean.dtype.type(L)
    R = mean.shape[0]
    K = cw.shape[1]
    n_chunks = (R + rows_per_chunk - 1) // rows_per_chunk
    for ch in prange(n_chunks):
        yp = np.zeros(L + K - 1, dtype=mean.dtype)
        buf = np.empty(L, dtype=mean.dtype)
        padded = np.full(L + 2 * pad, -np.inf, dtype=mean.dtype)
        act = padded[pad:pad + L]
        dv_row = np.zeros(L, dtype=mean.dtype)
        n_prev = -1
        for r in range(ch * rows_per_chunk, min(R, (ch + 1) * rows_per_chunk)):
            n = r // C
            c = r - n * C
            if n != n_prev:
                _pad_spectrum(yb, y_off, y_sn, n, L_in, cpad, yp, zero)
                n_prev = n
            _conv_row(yp, cw[c], cb[c], buf)
            gbase = g_off + n * g_sn + c * g_sc
            gr = gb[gbase:gbase + (L_out - 1) * g_st + 1]
            mu = mean[r]
            rs = rstd[r]
            wc = wb[c * w_sc]
            _activate(buf, mu, rs, wc, zero, act)
            # the conv output's gradient replaces the conv output in buf
            dw_rows[r] = _bwd_row(buf, mu, rs, wc, gr, g_st, L_out, pool, pad, inv_L, zero, padded, dv_row, buf)
            s = zero
            for t in range(L):
                s += buf[t]
            dcb_rows[r] = s
            for j in range(K):
                ys = yp[j:j + L]
                s = zero
                for t in range(L):
                    s += buf[t] * ys[t]
                dcw_rows[r, j] = s
