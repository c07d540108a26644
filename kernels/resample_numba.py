"""numba CPU kernels for the redshift-resample ops (the CPU implementation of the fastspec:: custom ops).

Generic form (see resample_ref): row n of the source x (N, R) is sampled at u = c[l]·a[n] + b[n].
Coordinates are computed in float64 (cheap on a CPU, and it keeps the valid mask identical to the float64
reference away from exact ties); values are computed in fp32 (float64 for float64 inputs, so gradcheck
works); half inputs are upcast to fp32 at the boundary (numba has no float16/bfloat16).
Parallel over spectra; each spectrum is walked serially in l, so the scatter-add of the backward needs no
atomics and is deterministic.
"""
from __future__ import annotations

import numba
import numpy as np
import torch

# Every fast-math flag except nnan/ninf: NaN redshifts and fluxes must still be seen by the comparisons.
_FASTMATH = {"contract", "arcp", "nsz", "reassoc", "afn"}
_jit = numba.njit(parallel=True, cache=True, fastmath=_FASTMATH, nogil=True)


@_jit
def _fwd(x, c, a, b, out, valid):
    N, R = x.shape
    L = c.shape[0]
    hi = R - 1.0
    imax = R - 2
    for n in numba.prange(N):
        an = a[n]
        bn = b[n]
        row_ok = an > 0.0
        for l in range(L):
            u = c[l] * an + bn
            if row_ok and u >= 0.0 and u <= hi:
                i = min(int(u), imax)
                t = u - i
                x0 = x[n, i]
                out[n, l] = x0 + t * (x[n, i + 1] - x0)
                valid[n, l] = True
            else:
                out[n, l] = 0.0
                valid[n, l] = False


@_jit
def _bwd(g, x, c, a, b, gx, gab, need_ab):
    """gx (zeroed) += scatter of g; gab[n] = (Σ g·Δx·c, Σ g·Δx), the gradients to a[n] and b[n]."""
    N, R = x.shape
    L = c.shape[0]
    hi = R - 1.0
    imax = R - 2
    for n in numba.prange(N):
        an = a[n]
        bn = b[n]
        sa = 0.0
        sb = 0.0
        if an > 0.0:
            for l in range(L):
                u = c[l] * an + bn
                if u >= 0.0 and u <= hi:
                    i = min(int(u), imax)
                    t = u - i
                    G = g[n, l]
                    gx[n, i] += G * (1.0 - t)
                    gx[n, i + 1] += G * t
                    if need_ab:
                        d = G * (x[n, i + 1] - x[n, i])
                        sa += d * c[l]
                        sb += d
        gab[n, 0] = sa
        gab[n, 1] = sb


@_jit
def _loss_fwd(x, c, a, b, y, w, out):
    N, R = x.shape
    L = c.shape[0]
    hi = R - 1.0
    imax = R - 2
    for n in numba.prange(N):
        an = a[n]
        bn = b[n]
        s = 0.0
        if an > 0.0:
            for l in range(L):
                u = c[l] * an + bn
                wl = w[n, l]
                if u >= 0.0 and u <= hi and wl != 0.0:
                    i = min(int(u), imax)
                    t = u - i
                    x0 = x[n, i]
                    r = y[n, l] - (x0 + t * (x[n, i + 1] - x0))
                    s += wl * r * r
        out[n] = s


@_jit
def _loss_bwd(gl, x, c, a, b, y, w, gx, gab, need_ab):
    N, R = x.shape
    L = c.shape[0]
    hi = R - 1.0
    imax = R - 2
    for n in numba.prange(N):
        an = a[n]
        bn = b[n]
        g2 = -2.0 * gl[n]
        sa = 0.0
        sb = 0.0
        if an > 0.0 and g2 != 0.0:
            for l in range(L):
                u = c[l] * an + bn
                wl = w[n, l]
                if u >= 0.0 and u <= hi and wl != 0.0:
                    i = min(int(u), imax)
                    t = u - i
                    x0 = x[n, i]
                    dx = x[n, i + 1] - x0
                    G = g2 * wl * (y[n, l] - (x0 + t * dx))
                    gx[n, i] += G * (1.0 - t)
                    gx[n, i + 1] += G * t
                    if need_ab:
                        sa += G * dx * c[l]
                        sb += G * dx
        gab[n, 0] = sa
        gab[n, 1] = sb


# ---- torch-facing wrappers (CPU tensors in, CPU tensors out) ----------------------------------------------


def _cd(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _np(t: torch.Tensor, dtype) -> np.ndarray:
    """A C-contiguous numpy view (copy only when a cast or a gather of strides is needed)."""
    return t.detach().to(dtype).contiguous().numpy()


def resample_fwd(x, c, a, b):
    N, R = x.shape
    L = c.shape[0]
    cd = _cd(x.dtype)
    out = torch.empty((N, L), dtype=cd)
    valid = torch.empty((N, L), dtype=torch.bool)
    if N and L:
        _fwd(_np(x, cd), _np(c, torch.float64), _np(a, torch.float64), _np(b, torch.float64),
             out.numpy(), valid.numpy())
    return out.to(x.dtype), valid


def resample_bwd(g, x, c, a, b, need_ab: bool):
    N, R = x.shape
    cd = _cd(x.dtype)
    gx = torch.zeros((N, R), dtype=cd)
    gab = torch.zeros((N, 2), dtype=torch.float64)
    if N and c.shape[0]:
        _bwd(_np(g, cd), _np(x, cd), _np(c, torch.float64), _np(a, torch.float64), _np(b, torch.float64),
             gx.numpy(), gab.numpy(), bool(need_ab))
    return gx.to(x.dtype), gab


def resample_loss_fwd(x, c, a, b, y, w):
    N = x.shape[0]
    cd = _cd(x.dtype)
    out = torch.zeros(N, dtype=torch.float64)
    if N and c.shape[0]:
        _loss_fwd(_np(x, cd), _np(c, torch.float64), _np(a, torch.float64), _np(b, torch.float64),
                  _np(y, cd), _np(w, cd), out.numpy())
    return out.to(cd)


def resample_loss_bwd(gl, x, c, a, b, y, w, need_ab: bool):
    N, R = x.shape
    cd = _cd(x.dtype)
    gx = torch.zeros((N, R), dtype=cd)
    gab = torch.zeros((N, 2), dtype=torch.float64)
    if N and c.shape[0]:
        _loss_bwd(_np(gl, torch.float64), _np(x, cd), _np(c, torch.float64), _np(a, torch.float64),
                  _np(b, torch.float64), _np(y, cd), _np(w, cd), gx.numpy(), gab.numpy(), bool(need_ab))
    return gx.to(x.dtype), gab
