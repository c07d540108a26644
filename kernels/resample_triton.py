"""Triton kernels of the generic resample op and their launchers (the CUDA implementation; on CPU tensors
they run in the Triton interpreter, which is how the tests check them without a GPU).

Generic form (see resample_coeffs): row n of the source x (N, R) is sampled at u = c[l]·a[n] + b[n]; c, a, b are
float64 so the index arithmetic is exact to ~1e-12 pixels (fp32 would be ±5e-4 pixels at R ≈ 6000); every
value load is upcast to the accumulation dtype ACC (fp32; fp64 for the float64 gradcheck) right away.
Row offsets are int64 (`n.to(tl.int64) * stride`): N·L passes 2³¹ at survey scale.

Kernels:
* `_fwd_kernel`            ŷ and valid, grid (N, cdiv(L, BLOCK_L)).
* `_loss_fwd_kernel`       per-block partial Σ w·(y−ŷ)² and Σ w over the used pixels, summed per row on the
                           host side (deterministic).
* `_bwd_scatter_kernel`    backward by scatter with fp32 atomics (fast, order of adds not fixed); the
                           gradients to a, b as per-block partials.
* `_bwd_gather_kernel`     deterministic backward: one program per block of rest pixels j gathers the
                           contiguous range of output pixels l that touch j (found by binary search, valid
                           because u is monotone in l), no atomics.
The two backward kernels serve both ops: LOSS=True recomputes ŷ and takes G = −2·g[n]·w·(y − ŷ) as the
upstream gradient instead of g[n, l]; nothing of size N×L is saved between forward and backward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .core import acc_dtype
from .triton_utils import block_size, device_guard, spec_dtype, tl_acc_dtype

MAX_BLOCK_L = 1024  # output pixels per program (tests lower these to exercise several blocks per row)
MAX_BLOCK_J = 256  # rest pixels per program in the gather backward
NUM_WARPS = 4

# Kernel arguments shared by every kernel below:
#   x_ptr: (N, R) source spectra, rows with stride `stride_x`, unit stride along R; any float dtype
#   c_ptr: (L,) float64 grid coordinate of each output pixel; a_ptr, b_ptr: (N,) float64 coefficients
#   R, L: source and output pixels per row
#   ACC: accumulation dtype (fp32; fp64 for float64 inputs)


@triton.jit
def _coords(c, an, bn, R, ACC: tl.constexpr):
    """(inside, i, t) for output pixels with c = c[l] (float64) in row n: u = c·a + b, i = min(⌊u⌋, R−2)."""
    # a ≤ 0 (or NaN) marks a row with no valid pixel; NaN makes every comparison below false.
    u = c * tl.where(an > 0.0, an, float("nan")) + bn
    inside = (u >= 0.0) & (u <= R - 1.0)
    us = tl.where(inside, u, 0.0)
    i = tl.minimum(us.to(tl.int32), R - 2)
    t = (us - i).to(ACC)
    return inside, i, t


@triton.jit
def _sample(x_ptr, c_ptr, a_ptr, b_ptr, n, offs, R, L, stride_x, ACC: tl.constexpr, LOAD_X: tl.constexpr):
    """The coordinate/load block of the kernels that walk output pixels `offs` of row n: (in range, c,
    inside, i, t, x[i], x[i+1]); ŷ = x[i] + t·(x[i+1] − x[i]). The x values are loaded only when LOAD_X."""
    m = offs < L
    c = tl.load(c_ptr + offs, mask=m, other=0.0)
    an = tl.load(a_ptr + n)
    bn = tl.load(b_ptr + n)
    inside, i, t = _coords(c, an, bn, R, ACC)
    inside = inside & m
    if LOAD_X:
        xrow = x_ptr + n * stride_x
        x0 = tl.load(xrow + i, mask=inside, other=0.0).to(ACC)
        x1 = tl.load(xrow + i + 1, mask=inside, other=0.0).to(ACC)
    else:
        x0 = t * 0.0
        x1 = x0
    return m, c, inside, i, t, x0, x1


@triton.jit
def _residual(y_ptr, w_ptr, n, l, stride_y, stride_w, inside, yhat, ACC: tl.constexpr):
    """(used, w, y − ŷ) at output pixels l of row n: a pixel is used when inside the restframe grid and w ≠ 0
    (w = 0 pixels are skipped even when y is NaN there); w and y − ŷ are meaningful where used only."""
    yl = tl.load(y_ptr + n * stride_y + l, mask=inside, other=0.0).to(ACC)
    wl = tl.load(w_ptr + n * stride_w + l, mask=inside, other=0.0).to(ACC)
    return inside & (wl != 0.0), wl, yl - yhat


@triton.jit
def _fwd_kernel(x_ptr, c_ptr, a_ptr, b_ptr, out_ptr, valid_ptr,  # out: (N, L) in x's dtype; valid: (N, L) u8
                R, L, stride_x, stride_out, stride_valid,  # row strides in elements
                ACC: tl.constexpr, BLOCK_L: tl.constexpr):  # grid (N, cdiv(L, BLOCK_L))
    n = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    m, c, inside, i, t, x0, x1 = _sample(x_ptr, c_ptr, a_ptr, b_ptr, n, offs, R, L, stride_x, ACC, True)
    y = tl.where(inside, x0 + t * (x1 - x0), 0.0)
    tl.store(out_ptr + n * stride_out + offs, y.to(out_ptr.dtype.element_ty), mask=m)
    tl.store(valid_ptr + n * stride_valid + offs, inside.to(tl.uint8), mask=m)


@triton.jit
def _loss_fwd_kernel(x_ptr, c_ptr, a_ptr, b_ptr, y_ptr, w_ptr,  # y, w: (N, L) data and weights
                     part_ptr,  # (N, 2, n_blocks) ACC: per-block Σ w·(y − ŷ)² and Σ w over used pixels
                     R, L, stride_x, stride_y, stride_w, n_blocks,
                     ACC: tl.constexpr, BLOCK_L: tl.constexpr):  # grid (N, n_blocks)
    n = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs = blk * BLOCK_L + tl.arange(0, BLOCK_L)
    m, c, inside, i, t, x0, x1 = _sample(x_ptr, c_ptr, a_ptr, b_ptr, n, offs, R, L, stride_x, ACC, True)
    use, wl, r = _residual(y_ptr, w_ptr, n, offs, stride_y, stride_w, inside, x0 + t * (x1 - x0), ACC)
    r = tl.where(use, r, 0.0)
    wl = tl.where(use, wl, 0.0)
    base = part_ptr + n * 2 * n_blocks + blk
    tl.store(base, tl.sum(wl * r * r, axis=0))
    tl.store(base + n_blocks, tl.sum(wl, axis=0))


@triton.jit
def _bwd_scatter_kernel(g_ptr,  # (N, L) upstream gradient of ŷ (resample)
                        gl_ptr,  # (N,) ACC upstream gradient of the loss (resample_loss)
                        x_ptr, c_ptr, a_ptr, b_ptr, y_ptr, w_ptr,
                        gx_ptr,  # (N, R) ACC, zeroed: ∂/∂x, accumulated with atomics
                        gab_ptr,  # (N, n_blocks, 2) ACC: per-block partials of ∂/∂a, ∂/∂b
                        R, L, stride_g, stride_x, stride_y, stride_w, stride_gx, n_blocks,
                        LOSS: tl.constexpr,  # resample_loss (G from gl, y, w, recomputed ŷ) or resample (G = g)
                        NEED_AB: tl.constexpr, ACC: tl.constexpr, BLOCK_L: tl.constexpr):  # grid (N, n_blocks)
    n = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs = blk * BLOCK_L + tl.arange(0, BLOCK_L)
    m, c, inside, i, t, x0, x1 = _sample(x_ptr, c_ptr, a_ptr, b_ptr, n, offs, R, L, stride_x, ACC,
                                         LOSS or NEED_AB)
    if LOSS:
        g2 = -2.0 * tl.load(gl_ptr + n).to(ACC)
        use, wl, r = _residual(y_ptr, w_ptr, n, offs, stride_y, stride_w, inside, x0 + t * (x1 - x0), ACC)
        G = tl.where(use, g2 * wl * r, 0.0)
    else:
        G = tl.load(g_ptr + n * stride_g + offs, mask=inside, other=0.0).to(ACC)
    gxrow = gx_ptr + n * stride_gx
    tl.atomic_add(gxrow + i, G * (1.0 - t), mask=inside, sem="relaxed")
    tl.atomic_add(gxrow + i + 1, G * t, mask=inside, sem="relaxed")
    if NEED_AB:
        d = G * (x1 - x0)
        base = gab_ptr + (n * n_blocks + blk) * 2
        tl.store(base, tl.sum(d * c.to(ACC), axis=0))
        tl.store(base + 1, tl.sum(d, axis=0))


@triton.jit
def _key(c_ptr, l, an, bn, R):
    """Rest pixel i(l) of output pixel l: −1 before the valid range, R after it (or NaN); monotone in l."""
    u = tl.load(c_ptr + l) * an + bn
    inside = (u >= 0.0) & (u <= R - 1.0)
    i = tl.minimum(tl.where(inside, u, 0.0).to(tl.int32), R - 2)
    return tl.where(inside, i, tl.where(u < 0.0, -1, R))


@triton.jit
def _search(c_ptr, lo, hi, target, an, bn, R, L, n_iter):
    """First l in [lo, hi) with _key(l) ≥ target (hi where there is none); lo, hi, target scalars or vectors."""
    for _ in range(0, n_iter):
        active = lo < hi
        mid = (lo + hi) // 2
        k = _key(c_ptr, tl.minimum(mid, L - 1), an, bn, R)
        right = k >= target
        hi = tl.where(active & right, mid, hi)
        lo = tl.where(active & (k < target), mid + 1, lo)
    return lo


@triton.jit
def _bwd_gather_kernel(g_ptr, gl_ptr, x_ptr, c_ptr, a_ptr, b_ptr, y_ptr, w_ptr,  # as _bwd_scatter_kernel
                       gx_ptr,  # (N, R) in x's dtype: ∂/∂x, each element written once
                       gab_ptr,  # (N, n_blocks, 2) ACC: per-block partials of ∂/∂a, ∂/∂b
                       R, L, stride_g, stride_x, stride_y, stride_w, stride_gx, n_blocks,
                       n_iter,  # steps of the binary search over l: bit_length(L) + 1
                       LOSS: tl.constexpr, NEED_AB: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_J: tl.constexpr):  # grid (N, n_blocks = cdiv(R, BLOCK_J))
    n = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    j0 = blk * BLOCK_J
    j = j0 + tl.arange(0, BLOCK_J)
    mj = j < R
    # u is monotone in l only for a > 0; rows with a ≤ 0 have no valid pixel: NaN keys them all "after".
    an = tl.load(a_ptr + n)
    an = tl.where(an > 0.0, an, float("nan"))
    bn = tl.load(b_ptr + n)
    # The output pixels l touching rest pixel j are those with i(l) ∈ {j−1, j}: a contiguous run starting at
    # lo(j) = first l with i(l) ≥ j−1. Narrow the search to this block's l range first (scalar searches).
    zero = tl.zeros((), dtype=tl.int32)
    blo = _search(c_ptr, zero, zero + L, j0 - 1, an, bn, R, L, n_iter)
    bhi = _search(c_ptr, blo, zero + L, j0 + BLOCK_J + 1, an, bn, R, L, n_iter)
    n_it = tl.ceil(tl.log2((bhi - blo + 1).to(tl.float32))).to(tl.int32) + 1
    lo = _search(c_ptr, tl.zeros([BLOCK_J], dtype=tl.int32) + blo, tl.zeros([BLOCK_J], dtype=tl.int32) + bhi,
                 j - 1, an, bn, R, L, n_it)

    xrow = x_ptr + n * stride_x
    xj = tl.load(xrow + j, mask=mj, other=0.0).to(ACC)
    xn = tl.load(xrow + j + 1, mask=j + 1 < R, other=0.0).to(ACC)  # x[j+1]
    if LOSS:
        xp = tl.load(xrow + j - 1, mask=mj & (j >= 1), other=0.0).to(ACC)  # x[j−1]
        g2 = -2.0 * tl.load(gl_ptr + n).to(ACC)
    acc = tl.zeros([BLOCK_J], dtype=ACC)
    sa = tl.zeros([BLOCK_J], dtype=ACC)
    sb = tl.zeros([BLOCK_J], dtype=ACC)
    l = lo
    active = mj & (l < L)
    while tl.max(active.to(tl.int32), axis=0) > 0:
        lc = tl.minimum(l, L - 1)
        c = tl.load(c_ptr + lc, mask=active, other=0.0)
        inside, i, t = _coords(c, an, bn, R, ACC)
        inside = inside & active
        left = inside & (i == j)  # j is the left neighbour of l: weight 1−t
        right = inside & (i + 1 == j)  # j is the right neighbour: weight t
        if LOSS:
            xa = tl.where(left, xj, xp)
            xb = tl.where(left, xn, xj)
            use, wl, r = _residual(y_ptr, w_ptr, n, lc, stride_y, stride_w, inside, xa + t * (xb - xa), ACC)
            G = tl.where(use, g2 * wl * r, 0.0)
        else:
            G = tl.load(g_ptr + n * stride_g + lc, mask=inside, other=0.0).to(ACC)
        acc += tl.where(left, G * (1.0 - t), 0.0) + tl.where(right, G * t, 0.0)
        if NEED_AB:
            d = tl.where(left, G * (xn - xj), 0.0)  # each l counted once, at j = i(l)
            sa += d * c.to(ACC)
            sb += d
        # Past the run once i(l) > j (or u beyond the grid / NaN, which keys as R).
        key = tl.where(inside, i, tl.where(c * an + bn < 0.0, -1, R))
        l += 1
        active = active & (key <= j) & (l < L)
    tl.store(gx_ptr + n * stride_gx + j, acc.to(gx_ptr.dtype.element_ty), mask=mj)
    if NEED_AB:
        base = gab_ptr + (n * n_blocks + blk) * 2
        tl.store(base, tl.sum(sa, axis=0))
        tl.store(base + 1, tl.sum(sb, axis=0))


# ---- launchers (torch tensors in; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1) ------------------


def _grid_args(x, c, a, b):
    x = x.contiguous()
    c = c.to(torch.float64).contiguous()
    a = a.to(torch.float64).contiguous()
    b = b.to(torch.float64).contiguous()
    return x, c, a, b


def resample_fwd(x, c, a, b, out=None, valid=None):
    """ŷ (N, L) in x.dtype and valid (N, L) bool; `out`/`valid` may be given (contiguous rows)."""
    x, c, a, b = _grid_args(x, c, a, b)
    N, R = x.shape
    L = c.shape[0]
    if out is None:
        out = torch.empty((N, L), dtype=x.dtype, device=x.device)
    if valid is None:
        valid = torch.empty((N, L), dtype=torch.bool, device=x.device)
    if N == 0 or L == 0:
        return out, valid
    BLOCK_L = block_size(L, MAX_BLOCK_L)
    grid = (N, triton.cdiv(L, BLOCK_L))
    with device_guard(x):
        _fwd_kernel[grid](x, c, a, b, out, valid.view(torch.uint8), R, L, x.stride(0), out.stride(0),
                          valid.stride(0), ACC=tl_acc_dtype(x.dtype), BLOCK_L=BLOCK_L, num_warps=NUM_WARPS)
    return out, valid


def resample_loss_fwd(x, c, a, b, y, w, weight: bool = False):
    """(Σ_l w·valid·(y − ŷ)² (N,), Σ_l w·valid (N,) when `weight`, else None), in the accumulation dtype."""
    x, c, a, b = _grid_args(x, c, a, b)
    y = y.contiguous()
    w = w.contiguous()
    N, R = x.shape
    L = c.shape[0]
    acc = acc_dtype(x.dtype)
    if N == 0 or L == 0:
        zero = torch.zeros(N, dtype=acc, device=x.device)
        return zero, (zero.clone() if weight else None)
    BLOCK_L = block_size(L, MAX_BLOCK_L)
    nb = triton.cdiv(L, BLOCK_L)
    part = torch.empty((N, 2, nb), dtype=acc, device=x.device)
    with device_guard(x):
        _loss_fwd_kernel[(N, nb)](x, c, a, b, y, w, part, R, L, x.stride(0), y.stride(0), w.stride(0), nb,
                                  ACC=tl_acc_dtype(x.dtype), BLOCK_L=BLOCK_L, num_warps=NUM_WARPS)
    loss = part[:, 0].sum(1, dtype=torch.float64).to(acc)
    return loss, (part[:, 1].sum(1, dtype=torch.float64).to(acc) if weight else None)


def _bwd(g, gl, x, c, a, b, y, w, need_ab, deterministic, loss):
    x, c, a, b = _grid_args(x, c, a, b)
    N, R = x.shape
    L = c.shape[0]
    acc = acc_dtype(x.dtype)
    ACC = tl_acc_dtype(x.dtype)
    if loss:
        y, w, gl = y.contiguous(), w.contiguous(), gl.contiguous()
        g = x  # unused
    else:
        g = g.contiguous()
        y = w = gl = x  # unused
    if N == 0 or L == 0 or not need_ab:
        gab_out = torch.zeros((N, 2), dtype=torch.float64, device=x.device)
    if N == 0 or L == 0:
        return torch.zeros_like(x), gab_out
    strides = (g.stride(0), x.stride(0), y.stride(0), w.stride(0))
    if deterministic:
        BLOCK_J = block_size(R, MAX_BLOCK_J)
        nb = triton.cdiv(R, BLOCK_J)
        gx = torch.empty_like(x)
        gab = torch.empty((N, nb, 2), dtype=acc, device=x.device)
        with device_guard(x):
            _bwd_gather_kernel[(N, nb)](g, gl, x, c, a, b, y, w, gx, gab, R, L, *strides, gx.stride(0), nb,
                                        int(L).bit_length() + 1, LOSS=loss, NEED_AB=bool(need_ab), ACC=ACC,
                                        BLOCK_J=BLOCK_J, num_warps=NUM_WARPS)
    else:
        BLOCK_L = block_size(L, MAX_BLOCK_L)
        nb = triton.cdiv(L, BLOCK_L)
        gx = torch.zeros((N, R), dtype=acc, device=x.device)
        gab = torch.empty((N, nb, 2), dtype=acc, device=x.device)
        with device_guard(x):
            _bwd_scatter_kernel[(N, nb)](g, gl, x, c, a, b, y, w, gx, gab, R, L, *strides, gx.stride(0), nb,
                                         LOSS=loss, NEED_AB=bool(need_ab), ACC=ACC, BLOCK_L=BLOCK_L,
                                         num_warps=NUM_WARPS)
        gx = gx.to(x.dtype)
    if need_ab:
        gab_out = gab.sum(1, dtype=torch.float64)
    return gx, gab_out


def resample_bwd(g, x, c, a, b, need_ab: bool, deterministic: bool = False):
    """(∂/∂x (N, R) in x.dtype, [∂/∂a, ∂/∂b] (N, 2) float64) for upstream gradient g (N, L)."""
    return _bwd(g, None, x, c, a, b, None, None, need_ab, deterministic, loss=False)


def resample_loss_bwd(gl, x, c, a, b, y, w, need_ab: bool, deterministic: bool = False):
    """Gradients of Σ_l w·valid·(y − ŷ)² times gl[n] (N,), recomputing ŷ on the fly."""
    return _bwd(None, gl, x, c, a, b, y, w, need_ab, deterministic, loss=True)


# ---- compile specs (tests/test_triton_compile.py compiles these for sm_70/80/90 without a GPU) ------------


def triton_compile_specs(dtype: str) -> list[tuple]:
    """(name, kernel, signature, constexprs) for every kernel at x dtype `dtype` ('fp32', 'fp16', 'bf16', 'fp64')."""
    xp, accp, accd, _ = spec_dtype(dtype, "resample_triton.triton_compile_specs")
    f64 = "*fp64"
    i32 = "i32"
    specs = [
        ("resample_fwd", _fwd_kernel,
         dict(x_ptr=xp, c_ptr=f64, a_ptr=f64, b_ptr=f64, out_ptr=xp, valid_ptr="*u8", R=i32, L=i32,
              stride_x=i32, stride_out=i32, stride_valid=i32, ACC="constexpr", BLOCK_L="constexpr"),
         dict(ACC=accd, BLOCK_L=MAX_BLOCK_L)),
        ("resample_loss_fwd", _loss_fwd_kernel,
         dict(x_ptr=xp, c_ptr=f64, a_ptr=f64, b_ptr=f64, y_ptr=xp, w_ptr=xp, part_ptr=accp, R=i32, L=i32,
              stride_x=i32, stride_y=i32, stride_w=i32, n_blocks=i32, ACC="constexpr", BLOCK_L="constexpr"),
         dict(ACC=accd, BLOCK_L=MAX_BLOCK_L)),
    ]
    common = dict(g_ptr=xp, gl_ptr=accp, x_ptr=xp, c_ptr=f64, a_ptr=f64, b_ptr=f64, y_ptr=xp, w_ptr=xp)
    strides = dict(R=i32, L=i32, stride_g=i32, stride_x=i32, stride_y=i32, stride_w=i32, stride_gx=i32,
                   n_blocks=i32)
    for loss in (False, True):
        op = "resample_loss" if loss else "resample"
        specs.append((f"{op}_bwd_scatter", _bwd_scatter_kernel,
                      dict(**common, gx_ptr=accp, gab_ptr=accp, **strides, LOSS="constexpr",
                           NEED_AB="constexpr", ACC="constexpr", BLOCK_L="constexpr"),
                      dict(LOSS=loss, NEED_AB=True, ACC=accd, BLOCK_L=MAX_BLOCK_L)))
        specs.append((f"{op}_bwd_gather", _bwd_gather_kernel,
                      dict(**common, gx_ptr=xp, gab_ptr=accp, **strides, n_iter=i32, LOSS="constexpr",
                           NEED_AB="constexpr", ACC="constexpr", BLOCK_J="constexpr"),
                      dict(LOSS=loss, NEED_AB=True, ACC=accd, BLOCK_J=MAX_BLOCK_J)))
    return specs
