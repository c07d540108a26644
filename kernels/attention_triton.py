"""Triton kernels for attention pooling, e[n, c] = Σ_t h[n, c, t] · softmax_t(k[n, c, :])[t], forward and
backward, and their launchers (the CUDA implementation).

One program handles BLOCK_R rows r = n·C + c and walks t in chunks of BLOCK_T with an online softmax
(running max, rescaled sum and weighted sum), so any T works; when T fits one chunk (T = 72 for SDSS) the
backward keeps the row in registers and reads h and k once. Inputs may have arbitrary strides (the encoder
passes h and k as the two channel halves of one conv output); dh and dk are written contiguous.
Every load is upcast to fp32 (fp64 for fp64 inputs) right away: accumulation precision, and bf16 arithmetic
is silently wrong in the Triton interpreter. Semantics (shared with the numba kernels and the torch
reference): -inf keys get zero weight, a row whose keys are all -inf pools nothing (e = 0, zero gradients),
a NaN or +inf key makes that row NaN.

Launchers work on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 was set before this module was
imported (tests). `triton_compile_specs` lists the kernels with concrete signatures for compile-only checks.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_utils import GPU_TILE, INTERPRET, TILE, device_guard, spec_dtype, tl_acc_dtype

_MAX_BLOCK_T = 128  # longer rows are walked in chunks


@triton.jit
def _tile(ptr, row, st, t, mask, other, ACC_DTYPE: tl.constexpr):
    """The [BLOCK_R, BLOCK_T] tile of rows starting at element offsets `row`, positions t (stride st), upcast
    to the accumulation dtype at once (bf16 arithmetic is silently wrong in the interpreter)."""
    return tl.load(ptr + (row[:, None] + t[None, :] * st), mask=mask, other=other).to(ACC_DTYPE)


@triton.jit
def _online_softmax(h_ptr, k_ptr, h_row, k_row, h_st, k_st, row_ok, T: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_T: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """(m, s, acc) of BLOCK_R rows, walked in chunks of BLOCK_T: the keys' max, s = Σ_t exp(k − shift) and
    acc = Σ_t exp(k − shift)·h, rescaled chunk by chunk to shift = the final max (0 where all keys are -inf)."""
    m = tl.full([BLOCK_R], float("-inf"), ACC_DTYPE)
    s = tl.zeros([BLOCK_R], ACC_DTYPE)
    acc = tl.zeros([BLOCK_R], ACC_DTYPE)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        mask = row_ok[:, None] & (t < T)[None, :]
        kv = _tile(k_ptr, k_row, k_st, t, mask, float("-inf"), ACC_DTYPE)
        hv = _tile(h_ptr, h_row, h_st, t, mask, 0.0, ACC_DTYPE)
        m_new = tl.maximum(m, tl.max(kv, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: every weight is exactly 0
        rescale = tl.exp(m - shift)
        p = tl.exp(kv - shift[:, None])
        s = s * rescale + tl.sum(p, axis=1)
        acc = acc * rescale + tl.sum(p * hv, axis=1)
        m = m_new
    return m, s, acc


@triton.jit
def _rows(R, C, h_sn, h_sc, k_sn, k_sc, ROW_ALIGN: tl.constexpr, BLOCK_R: tl.constexpr):
    """This program's rows r = n·C + c: (rows, in range, n, c, h row offsets, k row offsets)."""
    # int64 rows: offsets n·sn + c·sc + t reach N·C·T, which overflows int32 at survey scale.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    n = rows // C
    c = rows - n * C
    h_row = tl.multiple_of(n * h_sn + c * h_sc, ROW_ALIGN)
    k_row = tl.multiple_of(n * k_sn + c * k_sc, ROW_ALIGN)
    return rows, rows < R, n, c, h_row, k_row


@triton.jit
def attention_pool_fwd_kernel(
    h_ptr, k_ptr, e_ptr,  # h, k: (N, C, T) any strides; e: contiguous (N, C)
    R, C,  # R = N·C rows
    h_sn, h_sc, h_st, k_sn, k_sc, k_st,  # element strides
    T: tl.constexpr,  # constexpr: the t mask's alignment is then known and loads can be vectorised
    ROW_ALIGN: tl.constexpr,  # every row offset (n·sn + c·sc) is a multiple of this (vectorisation hint)
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,  # rows per program, positions per chunk
    ACC_DTYPE: tl.constexpr,  # fp32; fp64 for fp64 inputs
):
    rows, row_ok, n, c, h_row, k_row = _rows(R, C, h_sn, h_sc, k_sn, k_sc, ROW_ALIGN, BLOCK_R)
    m, s, acc = _online_softmax(h_ptr, k_ptr, h_row, k_row, h_st, k_st, row_ok, T, BLOCK_R, BLOCK_T, ACC_DTYPE)
    e = tl.where(s == 0.0, 0.0, acc / tl.where(s == 0.0, 1.0, s))
    tl.store(e_ptr + rows, e.to(e_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def attention_pool_bwd_kernel(
    g_ptr, h_ptr, k_ptr, dh_ptr, dk_ptr,  # g: (N, C) any strides; dh, dk: contiguous (N, C, T)
    R, C,
    g_sn, g_sc, h_sn, h_sc, h_st, k_sn, k_sc, k_st,
    T: tl.constexpr, ROW_ALIGN: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, ACC_DTYPE: tl.constexpr,
    ONE_CHUNK: tl.constexpr,  # BLOCK_T ≥ T: the row is kept in registers and h, k are read once
):
    rows, row_ok, n, c, h_row, k_row = _rows(R, C, h_sn, h_sc, k_sn, k_sc, ROW_ALIGN, BLOCK_R)
    out_row = tl.multiple_of(rows * T, ROW_ALIGN)
    g = tl.load(g_ptr + (n * g_sn + c * g_sc), mask=row_ok, other=0.0).to(ACC_DTYPE)
    if ONE_CHUNK:
        t = tl.arange(0, BLOCK_T).to(tl.int64)
        mask = row_ok[:, None] & (t < T)[None, :]
        kv = _tile(k_ptr, k_row, k_st, t, mask, float("-inf"), ACC_DTYPE)
        hv = _tile(h_ptr, h_row, h_st, t, mask, 0.0, ACC_DTYPE)
        m = tl.max(kv, axis=1)
        shift = tl.where(m == float("-inf"), 0.0, m)
        p = tl.exp(kv - shift[:, None])
        s = tl.sum(p, axis=1)
        inv_s = tl.where(s == 0.0, 0.0, 1.0 / tl.where(s == 0.0, 1.0, s))
        e = tl.sum(p * hv, axis=1) * inv_s
        ga = p * (g * inv_s)[:, None]
        out = out_row[:, None] + t[None, :]
        tl.store(dh_ptr + out, ga.to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(dk_ptr + out, (ga * (hv - e[:, None])).to(dk_ptr.dtype.element_ty), mask=mask)
    else:
        # Pass 1: online softmax statistics; pass 2: recompute the weights chunk by chunk and write.
        m, s, acc = _online_softmax(h_ptr, k_ptr, h_row, k_row, h_st, k_st, row_ok, T, BLOCK_R, BLOCK_T,
                                    ACC_DTYPE)
        shift = tl.where(m == float("-inf"), 0.0, m)
        inv_s = tl.where(s == 0.0, 0.0, 1.0 / tl.where(s == 0.0, 1.0, s))
        e = acc * inv_s
        g_inv_s = g * inv_s
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
            mask = row_ok[:, None] & (t < T)[None, :]
            kv = _tile(k_ptr, k_row, k_st, t, mask, float("-inf"), ACC_DTYPE)
            hv = _tile(h_ptr, h_row, h_st, t, mask, 0.0, ACC_DTYPE)
            ga = tl.exp(kv - shift[:, None]) * g_inv_s[:, None]
            out = out_row[:, None] + t[None, :]
            tl.store(dh_ptr + out, ga.to(dh_ptr.dtype.element_ty), mask=mask)
            tl.store(dk_ptr + out, (ga * (hv - e[:, None])).to(dk_ptr.dtype.element_ty), mask=mask)


def _blocks(R: int, T: int, block_r: int | None, block_t: int | None) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_T), powers of two; explicit values (tests) override the heuristic."""
    if block_t is None:
        block_t = triton.next_power_of_2(max(T, 16))
        if not INTERPRET:
            block_t = min(block_t, _MAX_BLOCK_T)
    if block_r is None:
        block_r = max(1, min(TILE // block_t, triton.next_power_of_2(max(R, 1))))
    return block_r, block_t


def _row_align(T: int, *tensors: torch.Tensor) -> int:
    """Largest power of two (at most 16 bytes' worth of elements) dividing T and every (n, c) stride of
    tensors with unit t stride: a promise to the compiler that rows start on vector boundaries."""
    if any(t.stride(-1) != 1 for t in tensors):
        return 1
    common = T
    for t in tensors:
        common = math.gcd(common, t.stride(0), t.stride(1))
    align = 1
    while align * 2 <= 16 // tensors[0].element_size() and common % (align * 2) == 0:
        align *= 2
    return align


def attention_pool_fwd(h: torch.Tensor, k: torch.Tensor, block_r: int | None = None,
                       block_t: int | None = None) -> torch.Tensor:
    """e (N, C) in h's dtype. Inputs are assumed checked (same shape, device and float dtype)."""
    h, k = h.resolve_neg(), k.resolve_neg()  # a lazily negated view: the kernel reads raw memory
    N, C, T = h.shape
    e = torch.empty((N, C), dtype=h.dtype, device=h.device)
    R = N * C
    if R == 0:
        return e
    if T == 0:
        return e.zero_()
    BLOCK_R, BLOCK_T = _blocks(R, T, block_r, block_t)
    with device_guard(h):
        attention_pool_fwd_kernel[(triton.cdiv(R, BLOCK_R),)](
            h, k, e, R, C, *h.stride(), *k.stride(), T=T, ROW_ALIGN=_row_align(T, h, k),
            BLOCK_R=BLOCK_R, BLOCK_T=BLOCK_T, ACC_DTYPE=tl_acc_dtype(h.dtype), num_warps=4,
        )
    return e


def attention_pool_bwd(g: torch.Tensor, h: torch.Tensor, k: torch.Tensor, block_r: int | None = None,
                       block_t: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh, dk), contiguous (N, C, T) in h's dtype, for the upstream gradient g (N, C)."""
    g, h, k = g.resolve_neg(), h.resolve_neg(), k.resolve_neg()
    N, C, T = h.shape
    dh = torch.empty((N, C, T), dtype=h.dtype, device=h.device)
    dk = torch.empty((N, C, T), dtype=h.dtype, device=h.device)
    R = N * C
    if R * T == 0:
        return dh, dk
    BLOCK_R, BLOCK_T = _blocks(R, T, block_r, block_t)
    with device_guard(h):
        attention_pool_bwd_kernel[(triton.cdiv(R, BLOCK_R),)](
            g, h, k, dh, dk, R, C, *g.stride(), *h.stride(), *k.stride(), T=T, ROW_ALIGN=_row_align(T, h, k),
            BLOCK_R=BLOCK_R, BLOCK_T=BLOCK_T, ACC_DTYPE=tl_acc_dtype(h.dtype), ONE_CHUNK=BLOCK_T >= T,
            num_warps=4,
        )
    return dh, dk


def triton_compile_specs(dtype: str) -> list[tuple[str, object, dict, dict]]:
    """(name, kernel, signature, constexprs) for `triton.compiler.ASTSource`, one per kernel variant, for
    inputs of `dtype` ('fp32', 'fp16', 'bf16'; 'fp64' too) at the encoder's shape (T = 72 in one chunk, unit
    t stride as the JIT specialises it) and a long-row variant (T walked in chunks)."""
    ptr, _, acc, size = spec_dtype(dtype, "attention_triton.triton_compile_specs")
    sizes = {"R": "i64", "C": "i32"}
    strides_hk = {"h_sn": "i64", "h_sc": "i64", "h_st": "constexpr", "k_sn": "i64", "k_sc": "i64",
                  "k_st": "constexpr"}
    fwd_sig = {"h_ptr": ptr, "k_ptr": ptr, "e_ptr": ptr, **sizes, **strides_hk, "T": "constexpr",
               "ROW_ALIGN": "constexpr", "BLOCK_R": "constexpr", "BLOCK_T": "constexpr", "ACC_DTYPE": "constexpr"}
    bwd_sig = {"g_ptr": ptr, "h_ptr": ptr, "k_ptr": ptr, "dh_ptr": ptr, "dk_ptr": ptr, **sizes,
               "g_sn": "i64", "g_sc": "i64", **strides_hk, "T": "constexpr", "ROW_ALIGN": "constexpr",
               "BLOCK_R": "constexpr", "BLOCK_T": "constexpr", "ACC_DTYPE": "constexpr", "ONE_CHUNK": "constexpr"}
    # SDSS: T = 72, rows of (N, 512, 72) halves start every 72 elements; a long-row case for the chunked path.
    align = 16 // size
    unit = {"h_st": 1, "k_st": 1, "ROW_ALIGN": math.gcd(72, align), "ACC_DTYPE": acc}
    one_chunk = {**unit, "T": 72, "BLOCK_R": GPU_TILE // 128, "BLOCK_T": 128}
    chunked = {**unit, "T": 1000, "BLOCK_R": GPU_TILE // _MAX_BLOCK_T, "BLOCK_T": _MAX_BLOCK_T}
    return [
        ("attention_pool_fwd", attention_pool_fwd_kernel, fwd_sig, one_chunk),
        ("attention_pool_bwd_one_chunk", attention_pool_bwd_kernel, bwd_sig, {**one_chunk, "ONE_CHUNK": True}),
        ("attention_pool_bwd_chunked", attention_pool_bwd_kernel, bwd_sig, {**chunked, "ONE_CHUNK": False}),
    ]
