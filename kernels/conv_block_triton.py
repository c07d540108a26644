"""Triton kernels for the fused InstanceNorm1d → PReLU → MaxPool1d block (see conv_block.py), forward and
backward, and their launchers (the CUDA implementation).

A program handles BLOCK_R rows r = n·C + c. The forward reads each row twice: once in chunks of BLOCK_L for
the statistics (per-chunk mean and centred sum of squares merged with Chan's formula: one read, no
E[x²] − mean² cancellation), once for the output, which it builds from 3-D tiles [BLOCK_R, BLOCK_J, POOL_P2]:
BLOCK_J pooling windows of POOL_P2 (pool rounded up to a power of two) slots each, so every element of a row
is loaded once and the window max is a reduction over the last axis. The backward recomputes the tiles to find
each window's first maximum (as torch), accumulates the two InstanceNorm row sums over the argmaxes in a first
pass and writes dx in a second, over ceil((L + pad) / pool) windows so that positions after the last full
window get their (non-pooled) share too.

Every load is upcast to fp32 (fp64 for fp64 inputs) right away: accumulation precision, and bf16 arithmetic is
silently wrong in the Triton interpreter. Row offsets are int64: n·sn + c·sc + t reaches N·C·L, which
overflows int32 at survey scale. Launchers work on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1
was set before this module was imported (tests). `triton_compile_specs` lists the kernels with concrete
signatures for compile-only checks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .core import acc_dtype
from .triton_utils import GPU_TILE, TILE, device_guard, spec_dtype, tl_acc_dtype


@triton.jit
def _row_stats(x_ptr, x_row, row_ok, L, eps, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
               ACC_DTYPE: tl.constexpr):
    """(mean, rstd) of BLOCK_R rows, chunk statistics merged with Chan's parallel formula."""
    mean = tl.zeros([BLOCK_R], ACC_DTYPE)
    m2 = tl.zeros([BLOCK_R], ACC_DTYPE)
    for t0 in range(0, L, BLOCK_L):
        t = t0 + tl.arange(0, BLOCK_L).to(tl.int64)
        mask = row_ok[:, None] & (t < L)[None, :]
        xv = tl.load(x_ptr + (x_row[:, None] + t[None, :]), mask=mask, other=0.0).to(ACC_DTYPE)
        na = t0 * 1.0  # every earlier chunk was full
        nb = tl.minimum(L - t0, BLOCK_L) * 1.0
        mb = tl.sum(xv, axis=1) / nb
        d = tl.where(mask, xv - mb[:, None], 0.0)
        m2b = tl.sum(d * d, axis=1)
        delta = mb - mean
        mean = mean + delta * (nb / (na + nb))
        m2 = m2 + m2b + delta * delta * (na * nb / (na + nb))
    var = m2 / L
    rstd = 1.0 / tl.sqrt(var + eps)
    return mean, rstd


@triton.jit
def _window_tile(x_ptr, x_row, row_ok, mean, rstd, wc, j0, L,
                 POOL: tl.constexpr, PAD: tl.constexpr, POOL_P2: tl.constexpr, BLOCK_J: tl.constexpr,
                 ACC_DTYPE: tl.constexpr):
    """Windows j0 … j0 + BLOCK_J − 1 of BLOCK_R rows as a [BLOCK_R, BLOCK_J, POOL_P2] tile: positions t,
    which slots are real pixels, normalised values v and activations a (-inf in empty slots)."""
    j = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
    q = tl.arange(0, POOL_P2).to(tl.int64)
    t = j[:, None] * POOL - PAD + q[None, :]  # [BLOCK_J, POOL_P2]
    real = (q < POOL)[None, :] & (t >= 0) & (t < L)
    mask = row_ok[:, None, None] & real[None, :, :]
    xv = tl.load(x_ptr + (x_row[:, None, None] + t[None, :, :]), mask=mask, other=0.0).to(ACC_DTYPE)
    v = (xv - mean[:, None, None]) * rstd[:, None, None]
    a = tl.where(v > 0.0, v, wc[:, None, None] * v)
    a = tl.where(mask, a, float("-inf"))
    return t, mask, v, a


@triton.jit
def conv_block_fwd_kernel(
    x_ptr, w_ptr, out_ptr, mean_ptr, rstd_ptr,  # x: (N, C, L), unit stride along L; out: contiguous (N, C, L_out)
    R, C, L, L_out,  # R = N·C rows
    x_sn, x_sc, w_sc,  # element strides (w_sc = 0 for one shared slope)
    eps,
    POOL: tl.constexpr, PAD: tl.constexpr, POOL_P2: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_L: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    n = rows // C
    c = rows - n * C
    x_row = n * x_sn + c * x_sc
    mean, rstd = _row_stats(x_ptr, x_row, row_ok, L, eps, BLOCK_R, BLOCK_L, ACC_DTYPE)
    tl.store(mean_ptr + rows, mean.to(mean_ptr.dtype.element_ty), mask=row_ok)
    tl.store(rstd_ptr + rows, rstd.to(rstd_ptr.dtype.element_ty), mask=row_ok)
    # the backward recomputes the activations from the stored (rounded) statistics: use those here too
    mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0).to(ACC_DTYPE)
    rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0).to(ACC_DTYPE)
    wc = tl.load(w_ptr + c * w_sc, mask=row_ok, other=0.0).to(ACC_DTYPE)
    out_row = rows * L_out
    for j0 in range(0, L_out, BLOCK_J):
        t, mask, v, a = _window_tile(x_ptr, x_row, row_ok, mean, rstd, wc, j0, L, POOL, PAD, POOL_P2,
                                     BLOCK_J, ACC_DTYPE)
        m = tl.max(a, axis=2)
        has_nan = tl.max((a != a).to(tl.int32), axis=2) > 0  # NaN propagates, as in torch's max_pool
        m = tl.where(has_nan, float("nan"), m)
        j = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
        omask = row_ok[:, None] & (j < L_out)[None, :]
        tl.store(out_ptr + (out_row[:, None] + j[None, :]), m.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _argmax_tile(t, mask, v, a, g_ptr, g_row, g_st, row_ok, wc, j0, L_out,
                 POOL_P2: tl.constexpr, BLOCK_J: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Per window of the tile: the one-hot of its first maximum (False beyond L_out), the normalised value
    there, the pooled gradient g and dv = g·PReLU'(v)."""
    j = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
    jmask = row_ok[:, None] & (j < L_out)[None, :]
    m = tl.max(a, axis=2)
    q = tl.arange(0, POOL_P2)
    is_max = (a == m[:, :, None]) & mask
    q_star = tl.min(tl.where(is_max, q[None, None, :], POOL_P2), axis=2)  # first maximum wins, as torch
    onehot = (q[None, None, :] == q_star[:, :, None]) & jmask[:, :, None]
    v_star = tl.sum(tl.where(onehot, v, 0.0), axis=2)
    g = tl.load(g_ptr + (g_row[:, None] + j[None, :] * g_st), mask=jmask, other=0.0).to(ACC_DTYPE)
    pos = v_star > 0.0
    dv = tl.where(pos, g, g * wc[:, None])
    dw_part = tl.where(pos, 0.0, g * v_star)
    return onehot, v_star, dv, dw_part


@triton.jit
def conv_block_bwd_kernel(
    g_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr,  # dx: contiguous (N, C, L); dw: (N·C,) per row
    R, C, L, L_out,
    g_sn, g_sc, g_st, x_sn, x_sc, w_sc,
    POOL: tl.constexpr, PAD: tl.constexpr, POOL_P2: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    n = rows // C
    c = rows - n * C
    x_row = n * x_sn + c * x_sc
    g_row = n * g_sn + c * g_sc
    mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0).to(ACC_DTYPE)
    rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0).to(ACC_DTYPE)
    wc = tl.load(w_ptr + c * w_sc, mask=row_ok, other=0.0).to(ACC_DTYPE)
    # pass 1: the InstanceNorm backward's row means of dv and dv·v (dv is non-zero at the argmaxes only)
    s_dv = tl.zeros([BLOCK_R], ACC_DTYPE)
    s_dvx = tl.zeros([BLOCK_R], ACC_DTYPE)
    dw = tl.zeros([BLOCK_R], ACC_DTYPE)
    for j0 in range(0, L_out, BLOCK_J):
        t, mask, v, a = _window_tile(x_ptr, x_row, row_ok, mean, rstd, wc, j0, L, POOL, PAD, POOL_P2,
                                     BLOCK_J, ACC_DTYPE)
        onehot, v_star, dv, dw_part = _argmax_tile(t, mask, v, a, g_ptr, g_row, g_st, row_ok, wc, j0, L_out,
                                                   POOL_P2, BLOCK_J, ACC_DTYPE)
        s_dv += tl.sum(dv, axis=1)
        s_dvx += tl.sum(dv * v_star, axis=1)
        dw += tl.sum(dw_part, axis=1)
    s_dv = s_dv / L
    s_dvx = s_dvx / L
    tl.store(dw_ptr + rows, dw.to(dw_ptr.dtype.element_ty), mask=row_ok)
    # pass 2: dx = rstd·(dv − mean(dv) − v·mean(dv·v)) at every position, windows past L_out included
    dx_row = rows * L
    for j0 in range(0, tl.cdiv(L + PAD, POOL), BLOCK_J):
        t, mask, v, a = _window_tile(x_ptr, x_row, row_ok, mean, rstd, wc, j0, L, POOL, PAD, POOL_P2,
                                     BLOCK_J, ACC_DTYPE)
        onehot, v_star, dv, dw_part = _argmax_tile(t, mask, v, a, g_ptr, g_row, g_st, row_ok, wc, j0, L_out,
                                                   POOL_P2, BLOCK_J, ACC_DTYPE)
        d = tl.where(onehot, dv[:, :, None], 0.0)
        dx = rstd[:, None, None] * (d - s_dv[:, None, None] - v * s_dvx[:, None, None])
        tl.store(dx_ptr + (dx_row[:, None, None] + t[None, :, :]), dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _blocks(R: int, L: int, L_out: int, pool: int, block_r=None, block_j=None,
            tile: int = TILE) -> tuple[int, int, int, int]:
    """(POOL_P2, BLOCK_R, BLOCK_J, BLOCK_L), powers of two; explicit values (tests) override the heuristic."""
    pool_p2 = triton.next_power_of_2(pool)
    if block_j is None:
        block_j = max(1, min(triton.next_power_of_2(triton.cdiv(L + pool, pool)), max(1, tile // pool_p2)))
    if block_r is None:
        block_r = max(1, min(tile // (block_j * pool_p2), triton.next_power_of_2(max(R, 1))))
    block_l = max(16, min(triton.next_power_of_2(L), max(16, tile // block_r)))
    return pool_p2, block_r, block_j, block_l


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


def conv_block_fwd(x: torch.Tensor, weight: torch.Tensor, pool: int, padding: int, eps: float,
                          block_r: int | None = None, block_j: int | None = None):
    """(out (N, C, L_out) in x's dtype, mean (N, C), rstd (N, C)); inputs assumed checked."""
    x = _unit_stride(x)
    N, C, L = x.shape
    L_out = (L + 2 * padding - pool) // pool + 1
    acc, acc_tl = acc_dtype(x.dtype), tl_acc_dtype(x.dtype)
    out = torch.empty((N, C, L_out), dtype=x.dtype, device=x.device)
    mean = torch.empty((N, C), dtype=acc, device=x.device)
    rstd = torch.empty((N, C), dtype=acc, device=x.device)
    R = N * C
    if R == 0:
        return out, mean, rstd
    pool_p2, BLOCK_R, BLOCK_J, BLOCK_L = _blocks(R, L, L_out, pool, block_r, block_j)
    with device_guard(x):
        conv_block_fwd_kernel[(triton.cdiv(R, BLOCK_R),)](
            x, weight, out, mean, rstd, R, C, L, L_out, x.stride(0), x.stride(1),
            1 if weight.shape[0] > 1 else 0, float(eps), POOL=pool, PAD=padding, POOL_P2=pool_p2,
            BLOCK_R=BLOCK_R, BLOCK_J=BLOCK_J, BLOCK_L=BLOCK_L, ACC_DTYPE=acc_tl, num_warps=4,
        )
    return out, mean, rstd


def conv_block_bwd(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                          rstd: torch.Tensor, pool: int, padding: int, block_r: int | None = None,
                          block_j: int | None = None):
    """(dx (N, C, L) contiguous in x's dtype, dweight in weight's dtype) for the pooled gradient g."""
    x = _unit_stride(x)
    N, C, L = x.shape
    L_out = (L + 2 * padding - pool) // pool + 1
    acc, acc_tl = acc_dtype(x.dtype), tl_acc_dtype(x.dtype)
    dx = torch.empty((N, C, L), dtype=x.dtype, device=x.device)
    R = N * C
    if R == 0:
        return dx, torch.zeros_like(weight)
    dw_rows = torch.empty((N, C), dtype=acc, device=x.device)
    mean = mean.to(acc).contiguous()
    rstd = rstd.to(acc).contiguous()
    pool_p2, BLOCK_R, BLOCK_J, _ = _blocks(R, L, L_out, pool, block_r, block_j)
    with device_guard(x):
        conv_block_bwd_kernel[(triton.cdiv(R, BLOCK_R),)](
            g, x, weight, mean, rstd, dx, dw_rows, R, C, L, L_out, *g.stride(), x.stride(0), x.stride(1),
            1 if weight.shape[0] > 1 else 0, POOL=pool, PAD=padding, POOL_P2=pool_p2,
            BLOCK_R=BLOCK_R, BLOCK_J=BLOCK_J, ACC_DTYPE=acc_tl, num_warps=4,
        )
    dw = dw_rows.sum(0) if weight.shape[0] > 1 else dw_rows.sum().reshape(1)
    return dx, dw.to(weight.dtype)


def triton_compile_specs(dtype: str) -> list[tuple[str, object, dict, dict]]:
    """(name, kernel, signature, constexprs) for `triton.compiler.ASTSource`, one per kernel variant, for x of
    `dtype` ('fp32', 'fp16', 'bf16'; 'fp64' too) at the encoder's three SDSS blocks: (pool 5, pad 2) on
    L = 3921, (11, 5) on 785 and no pooling on 72. PReLU slopes are fp32 parameters, mean/rstd fp32."""
    ptr, acc_ptr, acc_tl, _ = spec_dtype(dtype, "conv_block_triton.triton_compile_specs")
    sizes = {"R": "i64", "C": "i32", "L": "i32", "L_out": "i32"}
    fwd_sig = {"x_ptr": ptr, "w_ptr": "*fp32", "out_ptr": ptr, "mean_ptr": acc_ptr, "rstd_ptr": acc_ptr, **sizes,
               "x_sn": "i64", "x_sc": "i64", "w_sc": "i32", "eps": "fp32", "POOL": "constexpr",
               "PAD": "constexpr", "POOL_P2": "constexpr", "BLOCK_R": "constexpr", "BLOCK_J": "constexpr",
               "BLOCK_L": "constexpr", "ACC_DTYPE": "constexpr"}
    bwd_sig = {"g_ptr": ptr, "x_ptr": ptr, "w_ptr": "*fp32", "mean_ptr": acc_ptr, "rstd_ptr": acc_ptr,
               "dx_ptr": ptr, "dw_ptr": acc_ptr, **sizes, "g_sn": "i64", "g_sc": "i64", "g_st": "i64",
               "x_sn": "i64", "x_sc": "i64", "w_sc": "i32", "POOL": "constexpr", "PAD": "constexpr",
               "POOL_P2": "constexpr", "BLOCK_R": "constexpr", "BLOCK_J": "constexpr", "ACC_DTYPE": "constexpr"}
    specs = []
    for name, L, pool, pad in (("block1", 3921, 5, 2), ("block2", 785, 11, 5), ("block3", 72, 1, 0)):
        L_out = (L + 2 * pad - pool) // pool + 1
        pool_p2, br, bj, bl = _blocks(64 * 128, L, L_out, pool, tile=GPU_TILE)  # GPU sizes, even when interpreting
        common = {"POOL": pool, "PAD": pad, "POOL_P2": pool_p2, "BLOCK_R": br, "BLOCK_J": bj, "ACC_DTYPE": acc_tl}
        specs.append((f"conv_block_fwd_{name}", conv_block_fwd_kernel, fwd_sig, {**common, "BLOCK_L": bl}))
        specs.append((f"conv_block_bwd_{name}", conv_block_bwd_kernel, bwd_sig, common))
    return specs
