"""numba CPU kernels of the generic resample op, and their torch-facing wrappers (the CPU implementation).

Row n of the source x (N, R) is sampled at u = c[l]·a[n] + b[n] (see resample_coeffs). Coordinates are
computed in float64 (cheap on a CPU, and it keeps the valid mask identical to the float64 reference away
from exact ties); values in fp32 (float64 for float64 inputs, so gradcheck works); half inputs are upcast to
fp32 at the boundary (numba has no float16/bfloat16).
Parallel over chunks of spectra; each spectrum is walked serially in l, so the scatter-add of the backward
needs no atomics and is deterministic. Each block of output pixels takes two passes: a vectorised one for
the coordinates (i, t) into small scratch rows, then the gathers/scatters.
"""
from __future__ import annotations

import numba
import numpy as np
import torch

from .core import acc_dtype
from .numba_utils import FASTMATH
from .resample_coeffs import OBS_LIN, OBS_LOG, REST_LIN, REST_LOG

_jit = numba.njit(parallel=True, cache=True, fastmath=FASTMATH, nogil=True)


@numba.njit(fastmath=FASTMATH, inline="always")
def _coords(c, l0, l1, an, bn, R, ib, tb, vb=None):
    """Pass 1 over output pixels l0 ≤ l < l1 of one spectrum: rest pixel ib[l−l0] (−1 where not valid),
    weight tb[l−l0] and, when vb is given, the valid mask (stored here, vectorised, rather than in the gather
    loop: −9% forward time). Branch-free and gather-free, so LLVM vectorises it; pass 2 then gathers/scatters."""
    hi = R - 1.0
    imax = R - 2.0
    if not an > 0.0:  # a ≤ 0 or NaN: no valid pixel in this row
        an = np.nan
    cb = c[l0:l1]
    for j in range(l1 - l0):  # the loop variable indexes without wraparound checks
        u = cb[j] * an + bn
        ok = (u >= 0.0) & (u <= hi)
        us = u if ok else 0.0
        fl = min(np.floor(us), imax)  # floor in float64, then one conversion: −14% on this pass vs int round trip
        ib[j] = np.int32(fl) if ok else np.int32(-1)
        tb[j] = us - fl
        if vb is not None:  # resolved at compile time: vb is an array or None
            vb[j] = ok


# Output pixels per pass: the scratch rows (BLOCK int32 + BLOCK values per chunk of spectra) stay in L1 and
# the ops allocate nothing of size N or L beyond their outputs.
BLOCK = 512


@numba.njit(inline="always")
def _chunk(k, nchunk, N):
    return k * N // nchunk, (k + 1) * N // nchunk


@_jit
def _fwd(x, c, a, b, out, valid, nchunk):
    N, R = x.shape
    L = c.shape[0]
    for k in numba.prange(nchunk):  # chunks of spectra: the scratch rows are allocated once per chunk
        ib = np.empty(BLOCK, np.int32)
        tb = np.empty(BLOCK, x.dtype)
        n0, n1 = _chunk(k, nchunk, N)
        for n in range(n0, n1):
            xr = x[n]
            outr = out[n]
            vr = valid[n]
            for l0 in range(0, L, BLOCK):
                l1 = min(l0 + BLOCK, L)
                _coords(c, l0, l1, a[n], b[n], R, ib, tb, vr[l0:l1])
                ob = outr[l0:l1]  # block views: indexing by the loop variable needs no wraparound checks
                for j in range(l1 - l0):
                    i = ib[j]
                    if i >= 0:
                        x0 = xr[i]
                        ob[j] = x0 + tb[j] * (xr[i + 1] - x0)
                    else:
                        ob[j] = 0.0


@numba.njit(fastmath=FASTMATH, inline="always")
def _scatter(i, t, G, xr, gxr, cj, need_ab, sa, sb):
    """One output pixel's share of the backward: G into rest pixels i, i+1; the running sums of ∂/∂a, ∂/∂b."""
    if i >= 0:
        gxr[i] += G - G * t
        gxr[i + 1] += G * t
        if need_ab:
            d = G * (xr[i + 1] - xr[i])
            sa += d * cj
            sb += d
    return sa, sb


# The backward kernels walk two spectra side by side: within one spectrum each scatter-add may read the
# value the previous pixel just stored (a store-to-load chain of ~5 cycles a pixel); two independent chains
# interleaved let the core overlap them (−20% on the SDSS grid, one thread).


@_jit
def _bwd(g, x, c, a, b, gx, gab, need_ab, nchunk):
    """gx = scatter of g (gx need not be zeroed); gab[n] = (Σ g·Δx·c, Σ g·Δx), the gradients to a[n], b[n]."""
    N, R = x.shape
    L = c.shape[0]
    for k in numba.prange(nchunk):
        ib, ib2 = np.empty(BLOCK, np.int32), np.empty(BLOCK, np.int32)
        tb, tb2 = np.empty(BLOCK, x.dtype), np.empty(BLOCK, x.dtype)
        n0, n1 = _chunk(k, nchunk, N)
        for n in range(n0, n1, 2):
            pair = n + 1 < n1
            m = n + 1 if pair else n  # an odd last row walks alone
            xr, xr2, gr, gr2, gxr, gxr2 = x[n], x[m], g[n], g[m], gx[n], gx[m]
            gxr[:] = 0.0  # zeroed here, while the row is about to be in cache anyway
            gxr2[:] = 0.0
            sa = sb = sa2 = sb2 = 0.0
            for l0 in range(0, L, BLOCK):
                l1 = min(l0 + BLOCK, L)
                _coords(c, l0, l1, a[n], b[n], R, ib, tb)
                gb, gb2, cb = gr[l0:l1], gr2[l0:l1], c[l0:l1]
                if pair:
                    _coords(c, l0, l1, a[m], b[m], R, ib2, tb2)
                    for j in range(l1 - l0):
                        sa, sb = _scatter(ib[j], tb[j], gb[j], xr, gxr, cb[j], need_ab, sa, sb)
                        sa2, sb2 = _scatter(ib2[j], tb2[j], gb2[j], xr2, gxr2, cb[j], need_ab, sa2, sb2)
                else:
                    for j in range(l1 - l0):
                        sa, sb = _scatter(ib[j], tb[j], gb[j], xr, gxr, cb[j], need_ab, sa, sb)
            if pair:
                gab[m, 0] = sa2
                gab[m, 1] = sb2
            gab[n, 0] = sa
            gab[n, 1] = sb


@_jit
def _loss_fwd(x, c, a, b, y, w, out, wout, nchunk):
    """out[n] = Σ_l w·valid·(y − ŷ)²; and, when wout is not empty, wout[n] = Σ_l w·valid (the loss's
    denominator, a second independent sum chain in the same walk: it costs nothing next to the gathers)."""
    N, R = x.shape
    L = c.shape[0]
    weight = wout.shape[0] > 0
    for k in numba.prange(nchunk):
        ib = np.empty(BLOCK, np.int32)
        tb = np.empty(BLOCK, x.dtype)
        n0, n1 = _chunk(k, nchunk, N)
        for n in range(n0, n1):
            xr = x[n]
            yr = y[n]
            wr = w[n]
            s = 0.0
            sw = 0.0
            for l0 in range(0, L, BLOCK):
                l1 = min(l0 + BLOCK, L)
                _coords(c, l0, l1, a[n], b[n], R, ib, tb)
                yb = yr[l0:l1]
                wb = wr[l0:l1]
                for j in range(l1 - l0):
                    i = ib[j]
                    wl = wb[j]
                    if i >= 0 and wl != 0.0:  # w = 0 pixels are skipped even when y is NaN there
                        x0 = xr[i]
                        r = yb[j] - (x0 + tb[j] * (xr[i + 1] - x0))
                        s += wl * r * r
                        sw += wl
            out[n] = s
            if weight:
                wout[n] = sw


@numba.njit(fastmath=FASTMATH, inline="always")
def _scatter_loss(i, t, wl, yl, g2, xr, gxr, cj, need_ab, sa, sb):
    """_scatter for the loss: G = −2·g·w·(y − ŷ), skipping w = 0 pixels (y may be NaN there)."""
    if i >= 0 and wl != 0.0:
        x0 = xr[i]
        dx = xr[i + 1] - x0
        G = g2 * wl * (yl - (x0 + t * dx))
        gxr[i] += G - G * t
        gxr[i + 1] += G * t
        if need_ab:
            sa += G * dx * cj
            sb += G * dx
    return sa, sb


@_jit
def _loss_bwd(gl, x, c, a, b, y, w, gx, gab, need_ab, nchunk):
    N, R = x.shape
    L = c.shape[0]
    for k in numba.prange(nchunk):
        ib, ib2 = np.empty(BLOCK, np.int32), np.empty(BLOCK, np.int32)
        tb, tb2 = np.empty(BLOCK, x.dtype), np.empty(BLOCK, x.dtype)
        n0, n1 = _chunk(k, nchunk, N)
        for n in range(n0, n1, 2):
            m = min(n + 1, n1 - 1)
            gx[n, :] = 0.0
            gx[m, :] = 0.0
            # Rows with zero upstream gradient are not walked (their y may be NaN where w ≠ 0): p is the
            # first row to walk and q the second (p == q: one row).
            p = n if gl[n] != 0.0 else m
            q = m if gl[m] != 0.0 else p
            g2 = gl[p] + gl[p]  # stays in the compute dtype (a float64 literal would promote the loop)
            g2 = -g2
            h2 = gl[q] + gl[q]
            h2 = -h2
            xr, xr2, yr, yr2, wr, wr2, gxr, gxr2 = x[p], x[q], y[p], y[q], w[p], w[q], gx[p], gx[q]
            sa = sb = sa2 = sb2 = 0.0
            for l0 in range(0, L if g2 != 0.0 else 0, BLOCK):
                l1 = min(l0 + BLOCK, L)
                _coords(c, l0, l1, a[p], b[p], R, ib, tb)
                yb, yb2, wb, wb2, cb = yr[l0:l1], yr2[l0:l1], wr[l0:l1], wr2[l0:l1], c[l0:l1]
                if q != p:
                    _coords(c, l0, l1, a[q], b[q], R, ib2, tb2)
                    for j in range(l1 - l0):
                        sa, sb = _scatter_loss(ib[j], tb[j], wb[j], yb[j], g2, xr, gxr, cb[j], need_ab, sa, sb)
                        sa2, sb2 = _scatter_loss(ib2[j], tb2[j], wb2[j], yb2[j], h2, xr2, gxr2, cb[j], need_ab,
                                                 sa2, sb2)
                else:
                    for j in range(l1 - l0):
                        sa, sb = _scatter_loss(ib[j], tb[j], wb[j], yb[j], g2, xr, gxr, cb[j], need_ab, sa, sb)
            gab[n, 0] = gab[n, 1] = gab[m, 0] = gab[m, 1] = 0.0
            if q != p:
                gab[q, 0] = sa2
                gab[q, 1] = sb2
            gab[p, 0] = sa
            gab[p, 1] = sb


# ---- coefficients of the public ops (resample_coeffs derives the same in torch for the other routes) ------

# The jitted code below bakes these in, and numba's cache is keyed on this file only: an edit of the numbers
# in resample_coeffs alone would leave stale compiled coefficients behind. This guard makes it an edit here.
assert (REST_LIN, REST_LOG, OBS_LOG, OBS_LIN) == (0, 1, 2, 3), "edit coefficients() with the mode numbers"


@numba.njit(cache=True)
def coefficients(mode, z, z_new, p0, p1):
    """Six float64 (N,) arrays a, b, ∂a/∂z, ∂b/∂z, ∂a/∂z_new, ∂b/∂z_new for the redshifts z (and z_new).

    mode (resample_coeffs): REST_LIN (resample; p0 = λ0, p1 = Δ of the restframe grid; z_new unused), REST_LOG
    (resample on a log-linear restframe grid; p1 = Δlog10λ; z_new unused), OBS_LOG (redshift_observed on a
    log-linear grid; p1 = Δlog10λ), OBS_LIN (on a linear grid; p0 = λ0, p1 = Δ). A row whose z or z_new is
    not finite or ≤ −1 gets a = NaN (no valid pixel) and zero derivatives. One call instead of a dozen small
    array operations: the eager path's coefficients cost ~2 µs.
    """
    N = z.shape[0]
    out = np.zeros((6, N))
    rest = mode == REST_LIN or mode == REST_LOG
    log = mode == REST_LOG or mode == OBS_LOG
    for n in range(N):
        zz = np.float64(z[n])  # float32 redshifts are widened here, not copied beforehand
        zq = 0.0 if rest else np.float64(z_new[n])
        ok = np.isfinite(zz) and zz > -1.0 and np.isfinite(zq) and zq > -1.0
        if not ok:
            out[0, n] = np.nan
            out[1, n] = 0.0 if log else -p0 / p1
            continue
        if mode == REST_LIN:  # u = λ_obs/((1+z)Δ) − λ0/Δ
            a = 1.0 / ((1.0 + zz) * p1)
            out[0, n] = a
            out[1, n] = -p0 / p1
            out[2, n] = -a / (1.0 + zz)
        elif mode == REST_LOG:  # u = c − log10(1+z)/Δ
            k = 1.0 / (np.log(10.0) * p1)
            out[0, n] = 1.0
            out[1, n] = -np.log1p(zz) * k
            out[3, n] = -k / (1.0 + zz)
        elif mode == OBS_LOG:  # u = l + log10((1+z)/(1+z_new))/Δ
            k = 1.0 / (np.log(10.0) * p1)
            out[0, n] = 1.0
            out[1, n] = (np.log1p(zz) - np.log1p(zq)) * k
            out[3, n] = k / (1.0 + zz)
            out[5, n] = -k / (1.0 + zq)
        else:  # u = λ·(1+z)/((1+z_new)Δ) − λ0/Δ
            a = (1.0 + zz) / ((1.0 + zq) * p1)
            out[0, n] = a
            out[1, n] = -p0 / p1
            out[2, n] = 1.0 / ((1.0 + zq) * p1)
            out[4, n] = -a / (1.0 + zq)
    return out[0], out[1], out[2], out[3], out[4], out[5]


@numba.njit(cache=True)
def chain_rule(gab, da, db, out):
    """out[n] = ∂L/∂a[n]·da[n] + ∂L/∂b[n]·db[n] (the gradient to z or z_new, cast to out's dtype)."""
    for n in range(out.shape[0]):
        out[n] = gab[n, 0] * da[n] + gab[n, 1] * db[n]


# ---- torch-facing wrappers (CPU tensors in, CPU tensors out; c, a, b may be float64 numpy arrays) ---------


def _nchunk(N: int) -> int:
    """Chunks of spectra for the prange: a few per thread balance the load, each chunk allocates its scratch
    rows once, and at least 2 rows per chunk let the backward walk spectra in pairs. From the thread pool's
    size, not numba.get_num_threads(): that call costs ~20 µs once the kernels have evicted it from cache,
    and the chunking only shapes the load balance."""
    return max(1, min(N // 2, 4 * numba.config.NUMBA_NUM_THREADS))


def _np(t, dtype) -> np.ndarray:
    """A C-contiguous numpy view (copy only when a cast or a gather of strides is needed)."""
    if isinstance(t, np.ndarray):  # the eager path's float64 grid and coefficients
        return t
    t = t.detach()
    if t.dtype != dtype:
        t = t.to(dtype)
    return (t if t.is_contiguous() else t.contiguous()).numpy()


# Outputs are allocated by numpy and handed to torch without a copy: a call of this module's wrappers runs
# right after the kernels have streamed tens of MB through the caches, and numpy's allocation path is about
# half of torch.empty's there.
_NP = {torch.float32: np.float32, torch.float64: np.float64}


def _as_dtype(a: np.ndarray, dtype) -> torch.Tensor:
    t = torch.from_numpy(a)
    return t if t.dtype == dtype else t.to(dtype)


def resample_fwd(x, c, a, b):
    N, R = x.shape
    L = c.shape[0]
    cd = acc_dtype(x.dtype)
    out = np.empty((N, L), _NP[cd])
    valid = np.empty((N, L), np.bool_)
    if N and L:
        _fwd(_np(x, cd), _np(c, torch.float64), _np(a, torch.float64), _np(b, torch.float64), out, valid,
             _nchunk(N))
    return _as_dtype(out, x.dtype), torch.from_numpy(valid)


def resample_bwd(g, x, c, a, b, need_ab: bool, deterministic: bool = True):
    # always deterministic: each spectrum is walked serially, without atomics
    N, R = x.shape
    cd = acc_dtype(x.dtype)
    gx = (np.empty if c.shape[0] else np.zeros)((N, R), _NP[cd])  # the kernel zeroes the rows it walks
    gab = np.zeros((N, 2))
    if N and c.shape[0]:
        _bwd(_np(g, cd), _np(x, cd), _np(c, torch.float64), _np(a, torch.float64), _np(b, torch.float64),
             gx, gab, bool(need_ab), _nchunk(N))
    return _as_dtype(gx, x.dtype), torch.from_numpy(gab)


_NO_WEIGHT = np.empty(0)


def resample_loss_fwd(x, c, a, b, y, w, weight: bool = False):
    """(loss (N,), Σ w·valid (N,) when `weight`, else None), in the accumulation dtype."""
    N = x.shape[0]
    cd = acc_dtype(x.dtype)
    out = np.zeros(N)
    wout = np.zeros(N) if weight else _NO_WEIGHT
    if N and c.shape[0]:
        _loss_fwd(_np(x, cd), _np(c, torch.float64), _np(a, torch.float64), _np(b, torch.float64),
                  _np(y, cd), _np(w, cd), out, wout, _nchunk(N))
    return _as_dtype(out, cd), (_as_dtype(wout, cd) if weight else None)


def resample_loss_bwd(gl, x, c, a, b, y, w, need_ab: bool, deterministic: bool = True):
    N, R = x.shape
    cd = acc_dtype(x.dtype)
    gx = (np.empty if c.shape[0] else np.zeros)((N, R), _NP[cd])  # the kernel zeroes the rows it walks
    gab = np.zeros((N, 2))
    if N and c.shape[0]:
        _loss_bwd(_np(gl, cd), _np(x, cd), _np(c, torch.float64), _np(a, torch.float64),
                  _np(b, torch.float64), _np(y, cd), _np(w, cd), gx, gab, bool(need_ab),
                  _nchunk(N))
    return _as_dtype(gx, x.dtype), torch.from_numpy(gab)
