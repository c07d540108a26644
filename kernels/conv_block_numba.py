"""numba CPU kernels for the encoder's element-wise block InstanceNorm1d → PReLU → MaxPool1d, fused (with the
first block's one-input-channel conv in front), and their torch-facing wrappers (the CPU implementation).

Row r = n·C + c of x (N, C, L) is normalised with its own mean and biased variance, activated with the PReLU
slope of channel c and max-pooled in windows of `pool` (stride `pool`, `pad` virtual -inf on each side, the
tail that fills no window dropped, as torch's MaxPool1d). Rows are independent: chunks of rows run in
parallel, and a row (≤ 31 KB for DESI's 7781 fp32 pixels) stays in L1/L2 between the passes over it, so x is
read from memory once for the statistics and the output, and once more in the backward.

The backward recomputes the normalised values and each window's argmax (first maximum wins, as torch) from
x and the saved mean / rstd instead of keeping indices or activations: per row it scatters the pooled
gradient to the argmaxes, takes the PReLU slope there, and applies the InstanceNorm backward
dx = rstd·(dv − mean(dv) − x̂·mean(dv·x̂)), whose two row means only see the ≤ L_out argmax positions.

Buffers are flat 1-D arrays with element offsets and (n, c) strides and unit stride along the row (the pooled
gradient too: with a run-time stride its loop did not vectorise). float32
and float64 buffers are used as they are; bfloat16 tensors come in as their raw uint16 bits (numba has no
bfloat16) and are decoded / rounded to nearest even here, so autocast activations need no fp32 copy.
Accumulation is in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import overload

from .core import acc_dtype
from .numba_utils import FASTMATH, bits_from_f32, f32_from_bits, flat_buffer


def _ld(buf, i):  # pragma: no cover - replaced by the overload inside numba code
    return buf[i]


@overload(_ld, fastmath=FASTMATH)
def _ld_impl(buf, i):
    """buf[i] as the accumulation type: uint16 buffers hold bfloat16 bits (the high half of a float32)."""
    if buf.dtype == types.uint16:
        return lambda buf, i: f32_from_bits(np.int64(buf[i]) << 16)
    return lambda buf, i: buf[i]


def _st(buf, i, v):  # pragma: no cover - replaced by the overload inside numba code
    buf[i] = v


@overload(_st, fastmath=FASTMATH)
def _st_impl(buf, i, v):
    """buf[i] = v, rounding to nearest even into bfloat16 bits for uint16 buffers (NaN stays a quiet NaN)."""
    if buf.dtype == types.uint16:
        def impl(buf, i, v):
            f = np.float32(v)
            b = bits_from_f32(f)
            b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
            buf[i] = np.uint16(0x7FC0) if f != f else np.uint16(b & 0xFFFF)

        return impl

    def impl_float(buf, i, v):
        buf[i] = v

    return impl_float


@njit(fastmath=FASTMATH)
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


@njit(fastmath=FASTMATH)
def _activate(xr, mu, rs, wc, zero, act):
    """act[t] = prelu((x[t] − mean)·rstd); returns Σ act, which is NaN iff the row holds a NaN (the values
    are finite otherwise: rstd ≤ 1/sqrt(eps)). Row slices are indexed from 0 so that the loop vectorises (an
    offset index would keep numba's negative-index wraparound in the loop)."""
    s = zero
    for t in range(xr.shape[0]):
        v = (_ld(xr, t) - mu) * rs
        a = v if v > zero else wc * v
        act[t] = a
        s += a
    return s


# Rows are addressed through slices (xb[base:base + L]) for the same reason; windows are read from a padded
# scratch row `padded` of the activations (-inf in the `pad` slots in front and after the row) by plain index:
# a slice per window would cost two atomic reference-count updates each. Window maxima use selects, not
# branches (random data mispredicts every other branch), and pool = 5, the encoder's first and largest pooling,
# has its own loop with the window written out: LLVM then vectorises it with interleaved loads (≈ 10× the
# generic loop on the development machine).


@njit(fastmath=FASTMATH, inline="always")
def _max2(a, b):
    return b if b > a else a


@njit(fastmath=FASTMATH, inline="always")
def _argmax2(m, i, a, q):
    better = a > m  # strict: the first maximum wins, as torch
    return (a if better else m), (q if better else i)


@njit(fastmath=FASTMATH)
def _pool_row(padded, pool, pad, outr, nan_row, nan_value):
    """outr[j] = max of window j of the padded activations; in a row holding a NaN, windows with one give NaN
    (as torch's max_pool)."""
    L_out = outr.shape[0]
    if nan_row:
        for j in range(L_out):
            k = j * pool
            m = padded[k + pad if j == 0 else k]  # the first window starts with `pad` -inf slots
            nan = m != m
            for q in range(k, k + pool):
                a = padded[q]
                m = a if a > m else m
                nan |= a != a
            _st(outr, j, m if not nan else nan_value)
    elif pool == 5:
        for j in range(L_out):
            k = j * 5
            _st(outr, j, _max2(_max2(_max2(padded[k], padded[k + 1]), _max2(padded[k + 2], padded[k + 3])),
                               padded[k + 4]))
    else:
        for j in range(L_out):
            k = j * pool
            m = padded[k + pad if j == 0 else k]
            for q in range(k, k + pool):
                m = _max2(m, padded[q])
            _st(outr, j, m)


@njit(fastmath=FASTMATH, inline="always")
def _window_argmax(padded, pool, pad, args):
    """args[j] = position (in padded coordinates) of the first maximum of window j. Every window but the first
    starts on a real pixel; the first is scanned from its first real pixel, so the argmax is a real pixel
    even in rows of NaN (where no comparison succeeds)."""
    L_out = args.shape[0]
    if pool == 1:
        for j in range(L_out):
            args[j] = j
        return
    u = pad
    m = padded[u]
    for q in range(pad + 1, pool):
        m, u = _argmax2(m, u, padded[q], q)
    args[0] = u
    if pool == 5:
        for j in range(1, L_out):
            k = j * 5
            m, i = padded[k], 0
            m, i = _argmax2(m, i, padded[k + 1], 1)
            m, i = _argmax2(m, i, padded[k + 2], 2)
            m, i = _argmax2(m, i, padded[k + 3], 3)
            m, i = _argmax2(m, i, padded[k + 4], 4)
            args[j] = k + i
    else:
        for j in range(1, L_out):
            k = j * pool
            m, u = padded[k], k
            for q in range(k + 1, k + pool):
                m, u = _argmax2(m, u, padded[q], q)
            args[j] = u


@njit(fastmath=FASTMATH, inline="always")
def _bwd_row(xr, mu, rs, wc, gr, pool, pad, inv_L, zero, padded, args, vw, dv_row, dxr):
    """dx of one row into dxr (may alias xr: each element is read before it is written); returns the row's
    PReLU-slope gradient. `padded` must hold the row's activations (see `_activate`); args, vw (L_out,) and
    dv_row (L, zero on entry and exit) are scratch. Per-window work is split into a gather, a vectorisable
    pass with the three row sums, and a scatter: one loop doing all three ran at ~3 ns per window."""
    _window_argmax(padded, pool, pad, args)
    L_out = args.shape[0]
    for j in range(L_out):
        vw[j] = (_ld(xr, args[j] - pad) - mu) * rs
    s_dv = zero
    s_dvx = zero
    dw = zero
    for j in range(L_out):
        v = vw[j]
        g = _ld(gr, j)
        pos = v > zero
        dv = g if pos else g * wc
        dw += zero if pos else g * v
        s_dv += dv
        s_dvx += dv * v
        vw[j] = dv
    for j in range(L_out):
        dv_row[args[j] - pad] = vw[j]  # windows do not overlap: at most one dv per position
    s_dv *= inv_L
    s_dvx *= inv_L
    for t in range(xr.shape[0]):
        v = (_ld(xr, t) - mu) * rs
        _st(dxr, t, rs * (dv_row[t] - s_dv - v * s_dvx))
        dv_row[t] = zero
    return dw


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _fwd_kernel(xb, x_off, x_sn, x_sc, C, L, wb, w_sc, pool, pad, L_out, eps, out, mean, rstd,
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
                total = _activate(xr, mu, rs, wc, zero, act)
                _pool_row(padded, pool, pad, outr, total != total, nan_value)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _bwd_kernel(gb, g_off, g_sn, g_sc, xb, x_off, x_sn, x_sc, C, L, wb, w_sc, pool, pad, L_out,
                mean, rstd, dx, dw_rows, rows_per_chunk):
    """dx (R·L,) contiguous and the per-row PReLU-slope gradient dw_rows (R,) for the pooled gradient g."""
    zero = mean.dtype.type(0.0)
    inv_L = mean.dtype.type(1.0) / mean.dtype.type(L)
    R = mean.shape[0]
    n_chunks = (R + rows_per_chunk - 1) // rows_per_chunk
    for ch in prange(n_chunks):
        padded = np.full(L + 2 * pad, -np.inf, dtype=mean.dtype)
        act = padded[pad:pad + L]
        args = np.empty(L_out, dtype=np.int64)
        vw = np.empty(L_out, dtype=mean.dtype)
        # dv at the argmax positions, zero elsewhere; reset while dx is written, ready for the next row
        dv_row = np.zeros(L, dtype=mean.dtype)
        for r in range(ch * rows_per_chunk, min(R, (ch + 1) * rows_per_chunk)):
            n = r // C
            c = r - n * C
            base = x_off + n * x_sn + c * x_sc
            xr = xb[base:base + L]
            gbase = g_off + n * g_sn + c * g_sc
            gr = gb[gbase:gbase + L_out]
            mu = mean[r]
            rs = rstd[r]
            wc = wb[c * w_sc]
            _activate(xr, mu, rs, wc, zero, act)
            dw_rows[r] = _bwd_row(xr, mu, rs, wc, gr, pool, pad, inv_L, zero, padded, args, vw, dv_row,
                                  dx[r * L:(r + 1) * L])


# --- the first block on the spectrum itself: Conv1d with one input channel, fused in front of the above ---
# Its output (N, C, L), the largest activation of the encoder (128 × 3921 values per SDSS spectrum), is never
# stored: each row is convolved into an L1-resident scratch row (K shifted multiply-adds over the spectrum)
# and recomputed in the backward, which reduces the conv weight and bias gradients row by row.


@njit(fastmath=FASTMATH)
def _conv_row(yp, cw, cb, zero, buf):
    """buf[t] = cb + Σ_j cw[j]·yp[t + j]: one output channel of a one-input-channel conv over the zero-padded
    spectrum yp (4 spare zeros at its end). Taps go in groups of five written out, each group one pass over
    t that vectorises; tap by tap (buf[t] += w·y[t + j]) LLVM cannot rule out that buf and yp overlap and the
    loop ran ~6× slower."""
    n = buf.shape[0]
    K = cw.shape[0]
    for j0 in range(0, K, 5):
        w0 = cw[j0]
        w1 = cw[j0 + 1] if j0 + 1 < K else zero
        w2 = cw[j0 + 2] if j0 + 2 < K else zero
        w3 = cw[j0 + 3] if j0 + 3 < K else zero
        w4 = cw[j0 + 4] if j0 + 4 < K else zero
        y0 = yp[j0:j0 + n]
        y1 = yp[j0 + 1:j0 + 1 + n]
        y2 = yp[j0 + 2:j0 + 2 + n]
        y3 = yp[j0 + 3:j0 + 3 + n]
        y4 = yp[j0 + 4:j0 + 4 + n]
        if j0 == 0:
            for t in range(n):
                buf[t] = cb + w0 * y0[t] + w1 * y1[t] + w2 * y2[t] + w3 * y3[t] + w4 * y4[t]
        else:
            for t in range(n):
                buf[t] += w0 * y0[t] + w1 * y1[t] + w2 * y2[t] + w3 * y3[t] + w4 * y4[t]


@njit(fastmath=FASTMATH)
def _pad_spectrum(yb, y_off, y_sn, n, L_in, cpad, yp, zero):
    """yp = the spectrum of row n with `cpad` zeros in front (the tail of yp stays zero)."""
    base = y_off + n * y_sn
    yr = yb[base:base + L_in]
    ys = yp[cpad:cpad + L_in]
    for t in range(L_in):
        ys[t] = _ld(yr, t)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _spectrum_fwd_kernel(yb, y_off, y_sn, L_in, cw, cb, cpad, C, L, wb, w_sc, pool, pad, L_out, eps, out,
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
        yp = np.zeros(L + K - 1 + 4, dtype=mean.dtype)
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
            _conv_row(yp, cw[c], cb[c], zero, buf)
            outr = out[r * L_out:(r + 1) * L_out]
            mean[r], rstd[r] = _row_stats(buf, inv_L, eps_, zero, one)
            mu = mean[r]
            rs = rstd[r]
            total = _activate(buf, mu, rs, wb[c * w_sc], zero, act)
            _pool_row(padded, pool, pad, outr, total != total, nan_value)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _spectrum_bwd_kernel(gb, g_off, g_sn, g_sc, yb, y_off, y_sn, L_in, cw, cb, cpad, C, L, wb, w_sc,
                         pool, pad, L_out, mean, rstd, dcw_rows, dcb_rows, dw_rows, rows_per_chunk):
    """Per-row gradients of the conv taps dcw_rows (R, K), conv bias dcb_rows (R,) and PReLU slope
    dw_rows (R,); the caller sums them over the batch."""
    zero = mean.dtype.type(0.0)
    inv_L = mean.dtype.type(1.0) / mean.dtype.type(L)
    R = mean.shape[0]
    K = cw.shape[1]
    n_chunks = (R + rows_per_chunk - 1) // rows_per_chunk
    for ch in prange(n_chunks):
        yp = np.zeros(L + K - 1 + 4, dtype=mean.dtype)
        buf = np.empty(L, dtype=mean.dtype)
        padded = np.full(L + 2 * pad, -np.inf, dtype=mean.dtype)
        act = padded[pad:pad + L]
        args = np.empty(L_out, dtype=np.int64)
        vw = np.empty(L_out, dtype=mean.dtype)
        dv_row = np.zeros(L, dtype=mean.dtype)
        n_prev = -1
        for r in range(ch * rows_per_chunk, min(R, (ch + 1) * rows_per_chunk)):
            n = r // C
            c = r - n * C
            if n != n_prev:
                _pad_spectrum(yb, y_off, y_sn, n, L_in, cpad, yp, zero)
                n_prev = n
            _conv_row(yp, cw[c], cb[c], zero, buf)
            gbase = g_off + n * g_sn + c * g_sc
            gr = gb[gbase:gbase + L_out]
            mu = mean[r]
            rs = rstd[r]
            wc = wb[c * w_sc]
            _activate(buf, mu, rs, wc, zero, act)
            # the conv output's gradient replaces the conv output in buf
            dw_rows[r] = _bwd_row(buf, mu, rs, wc, gr, pool, pad, inv_L, zero, padded, args, vw, dv_row, buf)
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


# ---- torch-facing wrappers (CPU tensors in, CPU tensors out; inputs assumed checked) ---------------------


def _rows_per_chunk(R: int) -> int:
    # A few chunks per thread balance the load; chunks, not rows, because each allocates a row of scratch.
    return max(1, -(-R // (4 * numba.get_num_threads())))


def _operand(t: torch.Tensor) -> torch.Tensor:
    """t detached, with unit stride along its last dim (copied if not) and fp16, which numba cannot read,
    upcast; bf16 stays bf16 (read as bits)."""
    t = t.detach()
    if t.dtype == torch.float16:
        t = t.float()
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    return t


def _vector(t: torch.Tensor, acc: torch.dtype) -> np.ndarray:
    """A small parameter or saved statistic as a contiguous numpy array of the accumulation dtype."""
    return t.detach().to(acc).contiguous().view(-1).numpy()


def _pooled_length(L: int, pool: int, padding: int) -> int:
    return (L + 2 * padding - pool) // pool + 1


def _slope_grad(dw_rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The PReLU slopes' gradient from the per-row sums (N, C): per channel, or one shared slope."""
    dw = dw_rows.sum(0) if weight.shape[0] > 1 else dw_rows.sum().reshape(1)
    return dw.to(weight.dtype)


def conv_block_fwd(x, weight, pool: int, padding: int, eps: float):
    """(y (N, C, L_out) in x's dtype, mean (N, C), rstd (N, C) in the accumulation dtype)."""
    N, C, L = x.shape
    L_out = _pooled_length(L, pool, padding)
    acc = acc_dtype(x.dtype)
    out = torch.empty((N, C, L_out), dtype=x.dtype)
    mean = torch.empty((N, C), dtype=acc)
    rstd = torch.empty((N, C), dtype=acc)
    if N * C == 0:
        return out, mean, rstd
    xo = _operand(x)
    # fp16 x computes into an fp32 output (numba has no float16), cast back below
    out_k = out if out.dtype != torch.float16 else torch.empty((N, C, L_out), dtype=torch.float32)
    _fwd_kernel(flat_buffer(xo), 0, xo.stride(0), xo.stride(1), C, L, _vector(weight, acc),
                1 if weight.shape[0] > 1 else 0, pool, padding, L_out, float(eps), flat_buffer(out_k),
                mean.view(-1).numpy(), rstd.view(-1).numpy(), _rows_per_chunk(N * C))
    if out_k is not out:
        out.copy_(out_k)
    return out, mean, rstd


def conv_block_bwd(g, x, weight, mean, rstd, pool: int, padding: int):
    """(dx (N, C, L) contiguous in x's dtype, dweight in weight's dtype) for the pooled gradient g."""
    N, C, L = x.shape
    L_out = _pooled_length(L, pool, padding)
    acc = acc_dtype(x.dtype)
    dx = torch.empty((N, C, L), dtype=x.dtype)
    if N * C == 0:
        return dx, torch.zeros_like(weight)
    xo = _operand(x)
    go = _operand(g)  # unit stride along L_out (an expanded gradient is copied)
    if go.dtype != xo.dtype:
        go = go.to(xo.dtype)  # the kernel reads g with x's decoder (bf16 bits or floats)
    dx_k = dx if dx.dtype != torch.float16 else torch.empty((N, C, L), dtype=torch.float32)
    dw_rows = torch.empty((N, C), dtype=acc)
    _bwd_kernel(flat_buffer(go), 0, go.stride(0), go.stride(1), flat_buffer(xo), 0, xo.stride(0), xo.stride(1), C,
                L, _vector(weight, acc), 1 if weight.shape[0] > 1 else 0, pool, padding, L_out, _vector(mean, acc),
                _vector(rstd, acc), flat_buffer(dx_k), dw_rows.view(-1).numpy(), _rows_per_chunk(N * C))
    if dx_k is not dx:
        dx.copy_(dx_k)
    return dx, _slope_grad(dw_rows, weight)


def _spectrum_args(y, conv_weight, conv_bias, weight, acc):
    """(spectra, conv taps (C, K), conv bias, slopes, slope stride, conv padding, conv output length) as the
    spectrum kernels take them."""
    C, _, K = conv_weight.shape
    cpad = K // 2
    L = y.shape[1] + 2 * cpad - K + 1
    return (y.detach().to(acc).contiguous().view(-1).numpy(), _vector(conv_weight, acc).reshape(C, K),
            _vector(conv_bias, acc), _vector(weight, acc), 1 if weight.shape[0] > 1 else 0, cpad, L)


def spectrum_block_fwd(y, conv_weight, conv_bias, weight, pool: int, padding: int, eps: float, out_dtype):
    """(out (N, C, L_out) in out_dtype, mean (N, C), rstd (N, C)) of Conv1d(1, C, K) → the block, the conv
    output never stored."""
    N, L_in = y.shape
    C = conv_weight.shape[0]
    acc = acc_dtype(y.dtype)
    yb, cw, cb, wb, w_sc, cpad, L = _spectrum_args(y, conv_weight, conv_bias, weight, acc)
    L_out = _pooled_length(L, pool, padding)
    out = torch.empty((N, C, L_out), dtype=out_dtype)
    mean = torch.empty((N, C), dtype=acc)
    rstd = torch.empty((N, C), dtype=acc)
    if N * C == 0:
        return out, mean, rstd
    out_k = out if out_dtype in (acc, torch.bfloat16) else torch.empty((N, C, L_out), dtype=acc)
    _spectrum_fwd_kernel(yb, 0, L_in, L_in, cw, cb, cpad, C, L, wb, w_sc, pool, padding, L_out, float(eps),
                         flat_buffer(out_k), mean.view(-1).numpy(), rstd.view(-1).numpy(), _rows_per_chunk(N * C))
    if out_k is not out:
        out.copy_(out_k)
    return out, mean, rstd


def spectrum_block_bwd(g, y, conv_weight, conv_bias, weight, mean, rstd, pool: int, padding: int):
    """(d conv_weight, d conv_bias, d weight), each in its parameter's dtype, for the upstream gradient g."""
    N, L_in = y.shape
    C, _, K = conv_weight.shape
    acc = acc_dtype(y.dtype)
    dcw = torch.zeros((N, C, K), dtype=acc)
    dcb = torch.zeros((N, C), dtype=acc)
    dw = torch.zeros((N, C), dtype=acc)
    if N * C:
        yb, cw, cb, wb, w_sc, cpad, L = _spectrum_args(y, conv_weight, conv_bias, weight, acc)
        go = _operand(g)
        if go.dtype not in (acc, torch.bfloat16):
            go = go.to(acc)
        _spectrum_bwd_kernel(flat_buffer(go), 0, go.stride(0), go.stride(1), yb, 0, L_in, L_in, cw, cb, cpad, C, L,
                             wb, w_sc, pool, padding, _pooled_length(L, pool, padding), _vector(mean, acc),
                             _vector(rstd, acc), dcw.view(N * C, K).numpy(), dcb.view(-1).numpy(),
                             dw.view(-1).numpy(), _rows_per_chunk(N * C))
    return (dcw.sum(0).reshape(conv_weight.shape).to(conv_weight.dtype), dcb.sum(0).to(conv_bias.dtype),
            _slope_grad(dw, weight))
