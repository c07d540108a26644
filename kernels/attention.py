"""The encoder's attention-pooling op and its dispatch: e[n, c] = Σ_t h[n, c, t] · softmax_t(k[n, c, :])[t].

`attention_pool(h, k) -> e` (N, C) for h, k of shape (N, C, T), in the input dtype, differentiable.
Backward (per row, a = softmax_t(k), g = ∂L/∂e): ∂h = g·a, ∂k = a ⊙ (g·h − Σ_t a g h) = g·a ⊙ (h − e).

Routes, by the backend `core.backend_for` picks:
  * 'torch'  -> `attention_pool_reference`, plain torch ops (autograd by torch);
  * eager calls on CPU tensors -> `_EagerAttentionPool`, an autograd.Function with the custom ops' formula
                that calls the kernel module directly: attention_numba, or attention_triton in the interpreter
                when the backend is 'triton' (tests);
  * CUDA tensors, and every call under torch.compile -> the custom ops `fastspec::attention_pool_fwd` and
                `fastspec::attention_pool_bwd` (CPU kernel: numba; CUDA kernel: Triton; fake and autograd
                registrations), usable under autograd, torch.compile and opcheck.

Defined behaviour on every backend: empty inputs give empty (or, for T = 0, zero) outputs; keys equal to -inf
get zero weight and a row whose keys are all -inf pools nothing (e = 0, zero gradients); a NaN or +inf key
makes that row NaN (as torch.softmax does); large keys are safe (the row max is subtracted). Inputs may have
any strides: h and k as the two channel halves of one conv output are read in place. fp16/bf16 are
accumulated in fp32 (numba upcasts them to fp32 copies at the boundary); fp64 stays fp64 throughout.
Double backward is not supported by the custom ops.
"""
from __future__ import annotations

import torch

from .core import acc_dtype, backend_for, check_device, check_tensor, compiling, kernel_module

__all__ = ["attention_pool", "attention_pool_reference"]


def _check_inputs(h, k, fn: str = "attention_pool") -> None:
    check_tensor(h, "h", fn, 3, "(N, C, T)", floating=False)
    check_tensor(k, "k", fn, 3, "(N, C, T)", floating=False)
    if h.shape != k.shape:
        raise ValueError(f"{fn}: h and k must have the same shape (N, C, T); got h {tuple(h.shape)} "
                         f"and k {tuple(k.shape)}")
    check_device(k, "k", h, "h", fn)
    if h.dtype != k.dtype:
        raise TypeError(f"{fn}: h and k must have the same dtype; got h {h.dtype} and k {k.dtype}")
    check_tensor(h, "h", fn)


def _check_grad(g: torch.Tensor, h: torch.Tensor, fn: str) -> None:
    if g.shape != h.shape[:2]:
        raise ValueError(f"{fn}: g must have shape (N, C) = {tuple(h.shape[:2])}, got {tuple(g.shape)}")
    check_device(g, "g", h, "h", fn)


def attention_pool_reference(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Plain-torch attention pooling with the op's defined semantics (fp32 accumulation; fp64 for fp64)."""
    _check_inputs(h, k, "attention_pool_reference")
    acc = acc_dtype(h.dtype)
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


# ---- custom ops (CUDA, and the torch.compile route) ------------------------------------------------------


@torch.library.custom_op("fastspec::attention_pool_fwd", mutates_args=(), device_types="cpu")
def attention_pool_fwd(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """e (N, C) = Σ_t h · softmax_t(k); CPU kernel: numba, CUDA kernel: Triton."""
    _check_inputs(h, k, "fastspec::attention_pool_fwd")
    return kernel_module("attention", "numba").attention_pool_fwd(h, k)


@attention_pool_fwd.register_kernel("cuda")
def _(h, k):
    _check_inputs(h, k, "fastspec::attention_pool_fwd")
    return kernel_module("attention", "triton").attention_pool_fwd(h, k)


@attention_pool_fwd.register_fake
def _(h, k):
    _check_inputs(h, k, "fastspec::attention_pool_fwd")
    return h.new_empty(h.shape[:2])


@torch.library.custom_op("fastspec::attention_pool_bwd", mutates_args=(), device_types="cpu")
def attention_pool_bwd(g: torch.Tensor, h: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂h, ∂k), contiguous (N, C, T) in h's dtype, for the upstream gradient g (N, C)."""
    _check_inputs(h, k, "fastspec::attention_pool_bwd")
    _check_grad(g, h, "fastspec::attention_pool_bwd")
    return kernel_module("attention", "numba").attention_pool_bwd(g, h, k)


@attention_pool_bwd.register_kernel("cuda")
def _(g, h, k):
    _check_inputs(h, k, "fastspec::attention_pool_bwd")
    _check_grad(g, h, "fastspec::attention_pool_bwd")
    return kernel_module("attention", "triton").attention_pool_bwd(g, h, k)


@attention_pool_bwd.register_fake
def _(g, h, k):
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


# ---- the eager route on CPU ------------------------------------------------------------------------------


class _EagerAttentionPool(torch.autograd.Function):
    """Eager calls on CPU tensors: the custom ops' kernels and formula without the custom-op dispatch (numba),
    or the Triton launchers in the interpreter ('triton' on CPU, for tests). test_torch_compile_cpu checks that
    the compiled route (the custom ops) gives the same values and gradients."""

    @staticmethod
    def forward(ctx, h, k, impl):
        ctx.save_for_backward(h, k)
        ctx.impl = impl
        return kernel_module("attention", impl).attention_pool_fwd(h, k)

    @staticmethod
    def backward(ctx, g):
        h, k = ctx.saved_tensors
        _check_grad(g, h, "attention_pool backward")
        return (*kernel_module("attention", ctx.impl).attention_pool_bwd(g, h, k), None)


# ---- public API ------------------------------------------------------------------------------------------


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
    backend = backend_for(h.device)
    if backend == "torch":
        return attention_pool_reference(h, k)
    if h.is_cuda or compiling():
        # Triton-on-CPU (interpreter) compiles to the custom op too: its CPU kernel is numba.
        return torch.ops.fastspec.attention_pool_fwd(h, k)
    return _EagerAttentionPool.apply(h, k, backend)
