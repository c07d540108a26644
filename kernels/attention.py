"""Attention pooling of the encoder, e[n, c] = Σ_t h[n, c, t] · softmax_t(k[n, c, :])[t], as one fused op.

Public: `attention_pool(h, k) -> e` (N, C) for h, k of shape (N, C, T), in the input dtype, differentiable.
Backward (per row, a = softmax_t(k), g = ∂L/∂e): ∂h = g·a, ∂k = a ⊙ (g·h − Σ_t a g h) = g·a ⊙ (h − e).

Implementations, chosen by `fastspec.kernels.backend.resolve(device)`:
  * 'torch'  -> `attention_pool_reference`, plain torch ops (autograd by torch);
  * 'numba'  -> the custom op `fastspec::attention_pool_fwd` (CPU kernel: numba; backward: the custom op
                `fastspec::attention_pool_bwd`), usable under autograd, torch.compile and opcheck;
  * 'triton' -> on CUDA the same custom ops, whose CUDA kernels are the Triton launchers; on CPU tensors
                (tests, TRITON_INTERPRET=1) a torch.autograd.Function that calls the Triton launchers in the
                interpreter with the same forward/backward formula (a custom op has one CPU kernel: numba).

Defined behaviour on every backend: empty inputs give empty (or, for T = 0, zero) outputs; keys equal to -inf
get zero weight and a row whose keys are all -inf pools nothing (e = 0, zero gradients); a NaN or +inf key
makes that row NaN (as torch.softmax does); large keys are safe (the row max is subtracted). Inputs may have
any strides: h and k as the two channel halves of one conv output are read in place. fp16/bf16 are
accumulated in fp32 (numba upcasts them to fp32 copies at the boundary); fp64 stays fp64 throughout.
Double backward is not supported by the custom ops.
"""
from __future__ import annotations

import sys

import torch

from .backend import resolve

__all__ = ["attention_pool", "attention_pool_reference", "triton_compile_specs"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_inputs(h, k, where: str = "attention_pool") -> None:
    for name, t in (("h", h), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{where}: {name} must have shape (N, C, T), got shape {tuple(t.shape)}")
    if h.shape != k.shape:
        raise ValueError(f"{where}: h and k must have the same shape (N, C, T); got h {tuple(h.shape)} "
                         f"and k {tuple(k.shape)}")
    if h.device != k.device:
        raise ValueError(f"{where}: h and k must be on the same device; got h on {h.device} and k on {k.device}")
    if h.dtype != k.dtype:
        raise TypeError(f"{where}: h and k must have the same dtype; got h {h.dtype} and k {k.dtype}")
    if h.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{where}: h and k must be float16, bfloat16, float32 or float64; got {h.dtype}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_pool_reference(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Plain-torch attention pooling with the op's defined semantics (fp32 accumulation; fp64 for fp64)."""
    _check_inputs(h, k, "attention_pool_reference")
    acc = _acc_dtype(h.dtype)
    hf, kf = h.to(acc), k.to(acc)
    if h.shape[-1] == 0:
        return (hf * kf).sum(-1).to(h.dtype)
    # The shift is a constant for autograd: softmax does not depend on it.
    m = kf.detach().amax(dim=-1, keepdim=True)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    p = torch.exp(kf - m)
    s = p.sum(dim=-1, keepdim=True)
    a = p / torch.where(s == 0, torch.ones_like(s), s)
    return (a * hf).sum(dim=-1).to(h.dtype)


# ---------------------------------------------------------------------------------------------- numba (CPU)

_HUGE_PAGE = 1 << 21
_MADV_HUGEPAGE = 14
_madvise = None


def _empty_cpu(shape, dtype: torch.dtype) -> torch.Tensor:
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


def _numba_operand(t: torch.Tensor, acc: torch.dtype):
    """(flat numpy buffer, stride_n, stride_c) of t viewed in place when possible.

    The numba kernels want unit stride along t; anything else (rare: transposed inputs) is copied, as are
    half types (numba has no float16/bfloat16)."""
    t = t.detach().resolve_neg().to(acc)  # numpy views see raw memory, not the lazy negation bit
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    flat = torch.as_strided(t, (span,), (1,), t.storage_offset())
    return flat.numpy(), t.stride(0), t.stride(1)


def _numba_fwd(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    N, C, T = h.shape
    if N * C == 0 or T == 0:
        return torch.zeros((N, C), dtype=h.dtype)
    from .attention_numba import attention_pool_fwd_numba

    acc = _acc_dtype(h.dtype)
    hb, h_sn, h_sc = _numba_operand(h, acc)
    kb, k_sn, k_sc = _numba_operand(k, acc)
    e = torch.empty((N, C), dtype=acc)
    attention_pool_fwd_numba(hb, 0, h_sn, h_sc, kb, 0, k_sn, k_sc, C, T, e.view(-1).numpy())
    return e.to(h.dtype)


def _numba_bwd(g: torch.Tensor, h: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    N, C, T = h.shape
    if N * C * T == 0:
        return torch.zeros((N, C, T), dtype=h.dtype), torch.zeros((N, C, T), dtype=h.dtype)
    from .attention_numba import attention_pool_bwd_numba

    acc = _acc_dtype(h.dtype)
    g = g.detach().resolve_neg().to(acc)
    span = 1 + sum((size - 1) * stride for size, stride in zip(g.shape, g.stride()))
    gb = torch.as_strided(g, (span,), (1,), g.storage_offset()).numpy()
    hb, h_sn, h_sc = _numba_operand(h, acc)
    kb, k_sn, k_sc = _numba_operand(k, acc)
    dh = _empty_cpu((N, C, T), acc)
    dk = _empty_cpu((N, C, T), acc)
    attention_pool_bwd_numba(gb, 0, g.stride(0), g.stride(1), hb, 0, h_sn, h_sc, kb, 0, k_sn, k_sc, C, T,
                             dh.view(-1).numpy(), dk.view(-1).numpy())
    return dh.to(h.dtype), dk.to(h.dtype)


# ------------------------------------------------------------------------------------------ custom ops

def _check_grad(g: torch.Tensor, h: torch.Tensor, where: str) -> None:
    if g.shape != h.shape[:2]:
        raise ValueError(f"{where}: g must have shape (N, C) = {tuple(h.shape[:2])}, got {tuple(g.shape)}")
    if g.device != h.device:
        raise ValueError(f"{where}: g must be on {h.device}, got {g.device}")


@torch.library.custom_op("fastspec::attention_pool_fwd", mutates_args=(), device_types="cpu")
def attention_pool_fwd(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """e (N, C) = Σ_t h · softmax_t(k); CPU kernel: numba, CUDA kernel: Triton."""
    _check_inputs(h, k, "fastspec::attention_pool_fwd")
    return _numba_fwd(h, k)


@attention_pool_fwd.register_kernel("cuda")
def _attention_pool_fwd_cuda(h, k):
    _check_inputs(h, k, "fastspec::attention_pool_fwd")
    from .attention_triton import attention_pool_fwd_triton

    return attention_pool_fwd_triton(h, k)


@attention_pool_fwd.register_fake
def _attention_pool_fwd_fake(h, k):
    _check_inputs(h, k, "fastspec::attention_pool_fwd")
    return h.new_empty(h.shape[:2])


@torch.library.custom_op("fastspec::attention_pool_bwd", mutates_args=(), device_types="cpu")
def attention_pool_bwd(g: torch.Tensor, h: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂h, ∂k), contiguous (N, C, T) in h's dtype, for the upstream gradient g (N, C)."""
    _check_inputs(h, k, "fastspec::attention_pool_bwd")
    _check_grad(g, h, "fastspec::attention_pool_bwd")
    return _numba_bwd(g, h, k)


@attention_pool_bwd.register_kernel("cuda")
def _attention_pool_bwd_cuda(g, h, k):
    _check_inputs(h, k, "fastspec::attention_pool_bwd")
    _check_grad(g, h, "fastspec::attention_pool_bwd")
    from .attention_triton import attention_pool_bwd_triton

    return attention_pool_bwd_triton(g, h, k)


@attention_pool_bwd.register_fake
def _attention_pool_bwd_fake(g, h, k):
    _check_inputs(h, k, "fastspec::attention_pool_bwd")
    _check_grad(g, h, "fastspec::attention_pool_bwd")
    return h.new_empty(h.shape), h.new_empty(h.shape)


def _setup_context(ctx, inputs, output):
    # Only the inputs are kept: the backward recomputes the softmax from k (no N×C×T activations saved).
    h, k = inputs
    ctx.save_for_backward(h, k)


def _backward(ctx, g):
    h, k = ctx.saved_tensors
    return torch.ops.fastspec.attention_pool_bwd(g, h, k)


attention_pool_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerCPU(torch.autograd.Function):
    """Eager calls on CPU tensors: the custom ops' kernels and formula without the custom-op dispatch (numba),
    or the Triton launchers in the interpreter ('triton' on CPU, for tests). Under torch.compile the custom
    ops are used instead; test_torch_compile_cpu checks that both give the same values and gradients."""

    @staticmethod
    def forward(ctx, h, k, impl):
        ctx.save_for_backward(h, k)
        ctx.impl = impl
        if impl == "triton":
            from .attention_triton import attention_pool_fwd_triton

            return attention_pool_fwd_triton(h, k)
        return _numba_fwd(h, k)

    @staticmethod
    def backward(ctx, g):
        h, k = ctx.saved_tensors
        if ctx.impl == "triton":
            from .attention_triton import attention_pool_bwd_triton

            return (*attention_pool_bwd_triton(g, h, k), None)
        _check_grad(g, h, "attention_pool backward")
        return (*_numba_bwd(g, h, k), None)


# ------------------------------------------------------------------------------------------- public API

def _resolve_at_trace_time(device) -> str:
    return resolve(device)


# What torch.compiler.assume_constant_result does (dynamo calls the function while tracing and bakes in its
# result), without importing torch._dynamo (~2.5 s) whenever this module is imported; test_torch_compile_cpu
# (fullgraph=True) fails if dynamo stops honouring it.
_resolve_at_trace_time._dynamo_marked_constant = True


def attention_pool(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Attention pooling e[n, c] = Σ_t h[n, c, t] · softmax_t(k[n, c, :])[t].

    Parameters
    ----------
    h, k : (N, C, T) tensors on one device with one float dtype (fp16, bf16, fp32, fp64), any strides.

    Returns
    -------
    e : (N, C) tensor in the input dtype; differentiable in h and k.
    """
    _check_inputs(h, k)
    if torch.compiler.is_compiling():
        # Dynamo cannot trace the ContextVar behind the backend switch: the switch is read once at trace
        # time, and Triton-on-CPU (interpreter) compiles to the custom op (its CPU kernel is numba).
        backend = _resolve_at_trace_time(h.device)
        if backend == "torch":
            return attention_pool_reference(h, k)
        return torch.ops.fastspec.attention_pool_fwd(h, k)
    backend = resolve(h.device)
    if backend == "torch":
        return attention_pool_reference(h, k)
    if not h.is_cuda:
        return _EagerCPU.apply(h, k, backend)
    return torch.ops.fastspec.attention_pool_fwd(h, k)


def triton_compile_specs(dtype: str):
    """(name, kernel, signature, constexprs) per Triton kernel variant, for compile-only checks
    (`triton.compiler.ASTSource`); see attention_triton.triton_compile_specs."""
    from .attention_triton import triton_compile_specs as specs

    return specs(dtype)
