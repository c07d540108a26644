"""The public conv-block ops of the encoder and their dispatch: the element-wise work around each convolution,
fused — InstanceNorm1d → PReLU → MaxPool1d — and, for the first block, the conv on the spectra in front.

Public: `instance_norm_prelu_pool(x, weight, pool=1, padding=0, eps=1e-5) -> y` for x (N, C, L):
InstanceNorm1d without affine parameters or running statistics (each (n, c) row normalised by its own mean
and biased variance, as the encoder's and spender's `nn.InstanceNorm1d(C)`), PReLU with slopes `weight`
((C,) or (1,), as `nn.PReLU`), then MaxPool1d(pool, stride=pool, padding) (pool = 1: no pooling; the tail
that fills no window is dropped, ties go to the first maximum, as torch). y has shape (N, C, L_out),
L_out = (L + 2·padding − pool) // pool + 1, in x's dtype; differentiable in x and weight. Dropout is not part
of the op: the encoder applies it between the activation and the pooling itself.

Why fused: on a CPU the three torch ops and their backwards read and write the (N, C, L) activation about a
dozen times and keep three copies of it (plus int64 pooling indices) for the backward. The fused forward reads
x once for the statistics and once for the output and keeps only x and two numbers per row; the backward
recomputes the normalised values and window argmaxes from them (see conv_block_numba).

Routes, by the backend `core.backend_for` picks:
  * 'torch'  -> `instance_norm_prelu_pool_reference`, plain torch ops (autograd by torch);
  * 'numba', and 'triton' on CUDA -> the custom op `fastspec::instance_norm_prelu_pool_fwd` (CPU kernel:
                conv_block_numba; CUDA kernel: conv_block_triton; backward: the custom op
                `fastspec::instance_norm_prelu_pool_bwd`), usable under autograd, autocast, torch.compile and
                opcheck;
  * 'triton' on CPU tensors, eager (tests, TRITON_INTERPRET=1) -> `_EagerConvBlock`, an autograd.Function
                calling the Triton launchers in the interpreter with the custom ops' forward/backward formula.

Precision: accumulation in fp32 (fp64 for fp64 inputs). bf16 is read and written as is by every kernel
(under CPU autocast the conv outputs stay bf16 end to end); fp16 is upcast to an fp32 copy for numba only
(numba has no float16). The output and dx are in x's dtype, the slope gradient in weight's dtype; mean and
rstd are kept in the accumulation type. Under autocast the op is not cast: it takes the conv's bf16/fp16
output and returns the same dtype, computing in fp32 inside. Double backward is not supported by the custom
ops.
"""
from __future__ import annotations

import torch

from .core import acc_dtype, backend_for, check_device, check_tensor, compiling, kernel_module

__all__ = ["instance_norm_prelu_pool", "instance_norm_prelu_pool_reference", "spectrum_conv_block",
           "pooled_length"]

_WHERE = "instance_norm_prelu_pool"


def pooled_length(L: int, pool: int, padding: int) -> int:
    """Output length of MaxPool1d(pool, stride=pool, padding) on L positions."""
    return (L + 2 * padding - pool) // pool + 1


def _check_inputs(x, weight, pool, padding, eps, where: str = _WHERE) -> None:
    check_tensor(x, "x", where, 3, "(N, C, L)")
    check_tensor(weight, "weight", where)
    C = x.shape[1]
    if weight.dim() != 1 or weight.shape[0] not in (1, C):
        raise ValueError(f"{where}: weight (the PReLU slopes) must have shape ({C},) or (1,) for x with C={C} "
                         f"channels, got shape {tuple(weight.shape)}")
    check_device(weight, "weight", x, "x", where)
    if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
        raise ValueError(f"{where}: pool must be an integer ≥ 1, got {pool!r}")
    if isinstance(padding, bool) or not isinstance(padding, int) or not 0 <= padding <= pool // 2:
        raise ValueError(f"{where}: padding must be an integer in [0, pool // 2] = [0, {pool // 2}], got {padding!r}")
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"{where}: eps must be a positive number, got {eps!r}")
    L = x.shape[2]
    if L < 2:
        raise ValueError(f"{where}: x needs at least 2 positions per row to normalise, got L={L}")
    if pooled_length(L, pool, padding) < 1:
        raise ValueError(f"{where}: L={L} positions are fewer than one pooling window (pool={pool}, "
                         f"padding={padding})")


def instance_norm_prelu_pool_reference(x: torch.Tensor, weight: torch.Tensor, pool: int = 1, padding: int = 0,
                                       eps: float = 1e-5) -> torch.Tensor:
    """The op as plain torch functions (F.instance_norm, F.prelu, F.max_pool1d) in fp32 (fp64 for fp64)."""
    _check_inputs(x, weight, pool, padding, eps, "instance_norm_prelu_pool_reference")
    acc = acc_dtype(x.dtype)
    with torch.autocast(device_type=x.device.type, enabled=False):
        y = torch.nn.functional.instance_norm(x.to(acc), eps=eps)
        y = torch.nn.functional.prelu(y, weight.to(acc))
        if pool > 1:
            y = torch.nn.functional.max_pool1d(y, pool, stride=pool, padding=padding)
    return y.to(x.dtype)


# ------------------------------------------------------------------------------------------ custom ops

def _check_saved(g, x, mean, rstd, pool, padding, where):
    N, C, L = x.shape
    want = (N, C, pooled_length(L, pool, padding))
    if tuple(g.shape) != want:
        raise ValueError(f"{where}: g must have shape (N, C, L_out) = {want}, got {tuple(g.shape)}")
    for name, t in (("mean", mean), ("rstd", rstd)):
        if tuple(t.shape) != (N, C):
            raise ValueError(f"{where}: {name} must have shape (N, C) = {(N, C)}, got {tuple(t.shape)}")
    check_device(g, "g", x, "x", where)


@torch.library.custom_op("fastspec::instance_norm_prelu_pool_fwd", mutates_args=(), device_types="cpu")
def instance_norm_prelu_pool_fwd(x: torch.Tensor, weight: torch.Tensor, pool: int, padding: int,
                                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y (N, C, L_out) in x's dtype, mean (N, C), rstd (N, C)); CPU kernel: numba, CUDA kernel: Triton."""
    _check_inputs(x, weight, pool, padding, eps, "fastspec::instance_norm_prelu_pool_fwd")
    return kernel_module("conv_block", "numba").conv_block_fwd(x, weight, pool, padding, eps)


@instance_norm_prelu_pool_fwd.register_kernel("cuda")
def _(x, weight, pool, padding, eps):
    _check_inputs(x, weight, pool, padding, eps, "fastspec::instance_norm_prelu_pool_fwd")
    return kernel_module("conv_block", "triton").conv_block_fwd(x, weight, pool, padding, eps)


@instance_norm_prelu_pool_fwd.register_fake
def _(x, weight, pool, padding, eps):
    _check_inputs(x, weight, pool, padding, eps, "fastspec::instance_norm_prelu_pool_fwd")
    N, C, L = x.shape
    acc = acc_dtype(x.dtype)
    return (x.new_empty((N, C, pooled_length(L, pool, padding))), x.new_empty((N, C), dtype=acc),
            x.new_empty((N, C), dtype=acc))


@torch.library.custom_op("fastspec::instance_norm_prelu_pool_bwd", mutates_args=(), device_types="cpu")
def instance_norm_prelu_pool_bwd(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                                 rstd: torch.Tensor, pool: int, padding: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx (N, C, L) contiguous in x's dtype, dweight in weight's dtype) for the upstream gradient g."""
    where = "fastspec::instance_norm_prelu_pool_bwd"
    _check_inputs(x, weight, pool, padding, 1.0, where)
    _check_saved(g, x, mean, rstd, pool, padding, where)
    return kernel_module("conv_block", "numba").conv_block_bwd(g, x, weight, mean, rstd, pool, padding)


@instance_norm_prelu_pool_bwd.register_kernel("cuda")
def _(g, x, weight, mean, rstd, pool, padding):
    where = "fastspec::instance_norm_prelu_pool_bwd"
    _check_inputs(x, weight, pool, padding, 1.0, where)
    _check_saved(g, x, mean, rstd, pool, padding, where)
    return kernel_module("conv_block", "triton").conv_block_bwd(g, x, weight, mean, rstd, pool, padding)


@instance_norm_prelu_pool_bwd.register_fake
def _(g, x, weight, mean, rstd, pool, padding):
    where = "fastspec::instance_norm_prelu_pool_bwd"
    _check_inputs(x, weight, pool, padding, 1.0, where)
    _check_saved(g, x, mean, rstd, pool, padding, where)
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    # Only x and two numbers per row are kept: the backward recomputes x̂, the activation and the argmaxes.
    x, weight, pool, padding, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.pool = pool
    ctx.padding = padding
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, g, _g_mean, _g_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw = torch.ops.fastspec.instance_norm_prelu_pool_bwd(g, x, weight, mean, rstd, ctx.pool, ctx.padding)
    return dx, dw, None, None, None


instance_norm_prelu_pool_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerConvBlock(torch.autograd.Function):
    """The kernel module's launchers without the custom-op dispatch, with the custom ops' forward/backward
    formula: eager calls on CPU tensors (numba; 'triton' in the interpreter). The dispatcher's first call
    imports torch._dynamo (~0.7 s and ~140 MB, Triton's library included, even on a CPU); eager code has no
    use for it, and the torch.compile route still goes through the custom ops."""

    @staticmethod
    def forward(ctx, x, weight, pool, padding, eps, impl):
        y, mean, rstd = kernel_module("conv_block", impl).conv_block_fwd(x, weight, pool, padding, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.pool, ctx.padding, ctx.impl = pool, padding, impl
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw = kernel_module("conv_block", ctx.impl).conv_block_bwd(g, x, weight, mean, rstd, ctx.pool,
                                                                      ctx.padding)
        return dx, dw, None, None, None, None


class _EagerSpectrumBlock(torch.autograd.Function):
    """`spectrum_block_fwd` / `_bwd`'s kernels and formula without the custom-op dispatch (see _EagerConvBlock)."""

    @staticmethod
    def forward(ctx, y, conv_weight, conv_bias, weight, pool, padding, eps, out_dtype):
        out, mean, rstd = kernel_module("conv_block", "numba").spectrum_block_fwd(
            y, conv_weight, conv_bias, weight, pool, padding, eps, out_dtype)
        ctx.save_for_backward(y, conv_weight, conv_bias, weight, mean, rstd)
        ctx.pool, ctx.padding = pool, padding
        return out

    @staticmethod
    def backward(ctx, g):
        y, conv_weight, conv_bias, weight, mean, rstd = ctx.saved_tensors
        dcw, dcb, dw = kernel_module("conv_block", "numba").spectrum_block_bwd(
            g.contiguous(), y, conv_weight, conv_bias, weight, mean, rstd, ctx.pool, ctx.padding)
        return None, dcw, dcb, dw, None, None, None, None


# --------------------------------------------------- the first block: one-input-channel conv fused in front

def _check_spectrum_inputs(y, conv_weight, conv_bias, weight, pool, padding, eps, where):
    check_tensor(y, "y", where, 2, "(N, L)")
    for name, t in (("conv_weight", conv_weight), ("conv_bias", conv_bias)):
        check_tensor(t, name, where)
        check_device(t, name, y, "y", where)
    if conv_weight.dim() != 3 or conv_weight.shape[1] != 1:
        raise ValueError(f"{where}: conv_weight must have shape (C, 1, K) (one input channel), got shape "
                         f"{tuple(conv_weight.shape)}")
    C, _, K = conv_weight.shape
    if tuple(conv_bias.shape) != (C,):
        raise ValueError(f"{where}: conv_bias must have shape ({C},), got shape {tuple(conv_bias.shape)}")
    L = y.shape[1] + 2 * (K // 2) - K + 1
    # the conv output is what the norm/pool part sees: check it as that op's x
    _check_inputs(y.new_empty((0, C, max(L, 0))), weight, pool, padding, eps, where)


@torch.library.custom_op("fastspec::spectrum_block_fwd", mutates_args=(), device_types="cpu")
def spectrum_block_fwd(y: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor, weight: torch.Tensor,
                       pool: int, padding: int, eps: float,
                       out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (N, C, L_out) in out_dtype, mean (N, C), rstd (N, C)) of the fused first block; CPU only."""
    _check_spectrum_inputs(y, conv_weight, conv_bias, weight, pool, padding, eps, "fastspec::spectrum_block_fwd")
    return kernel_module("conv_block", "numba").spectrum_block_fwd(y, conv_weight, conv_bias, weight, pool, padding,
                                                                   eps, out_dtype)


@spectrum_block_fwd.register_fake
def _(y, conv_weight, conv_bias, weight, pool, padding, eps, out_dtype):
    _check_spectrum_inputs(y, conv_weight, conv_bias, weight, pool, padding, eps, "fastspec::spectrum_block_fwd")
    N, L_in = y.shape
    C, _, K = conv_weight.shape
    L_out = pooled_length(L_in + 2 * (K // 2) - K + 1, pool, padding)
    acc = acc_dtype(y.dtype)
    return (y.new_empty((N, C, L_out), dtype=out_dtype), y.new_empty((N, C), dtype=acc),
            y.new_empty((N, C), dtype=acc))


@torch.library.custom_op("fastspec::spectrum_block_bwd", mutates_args=(), device_types="cpu")
def spectrum_block_bwd(g: torch.Tensor, y: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor,
                       weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, pool: int,
                       padding: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d conv_weight, d conv_bias, d weight), each in its parameter's dtype, for the upstream gradient g."""
    where = "fastspec::spectrum_block_bwd"
    _check_spectrum_inputs(y, conv_weight, conv_bias, weight, pool, padding, 1.0, where)
    N, L_in = y.shape
    C, _, K = conv_weight.shape
    L_out = pooled_length(L_in + 2 * (K // 2) - K + 1, pool, padding)
    if tuple(g.shape) != (N, C, L_out):
        raise ValueError(f"{where}: g must have shape (N, C, L_out) = {(N, C, L_out)}, got {tuple(g.shape)}")
    return kernel_module("conv_block", "numba").spectrum_block_bwd(g, y, conv_weight, conv_bias, weight, mean, rstd,
                                                                   pool, padding)


@spectrum_block_bwd.register_fake
def _(g, y, conv_weight, conv_bias, weight, mean, rstd, pool, padding):
    return conv_weight.new_empty(conv_weight.shape), conv_bias.new_empty(conv_bias.shape), weight.new_empty(weight.shape)


def _spectrum_setup_context(ctx, inputs, output):
    # The spectrum and two numbers per row: the conv output is recomputed in the backward.
    y, conv_weight, conv_bias, weight, pool, padding, _eps, _out_dtype = inputs
    _out, mean, rstd = output
    ctx.save_for_backward(y, conv_weight, conv_bias, weight, mean, rstd)
    ctx.pool = pool
    ctx.padding = padding
    ctx.mark_non_differentiable(mean, rstd)


def _spectrum_backward(ctx, g, _g_mean, _g_rstd):
    y, conv_weight, conv_bias, weight, mean, rstd = ctx.saved_tensors
    if ctx.needs_input_grad[0]:
        raise RuntimeError("fastspec::spectrum_block_fwd has no gradient for the spectrum y; "
                           "spectrum_conv_block routes inputs that require one through the unfused path")
    dcw, dcb, dw = torch.ops.fastspec.spectrum_block_bwd(g, y, conv_weight, conv_bias, weight, mean, rstd,
                                                         ctx.pool, ctx.padding)
    return None, dcw, dcb, dw, None, None, None, None


spectrum_block_fwd.register_autograd(_spectrum_backward, setup_context=_spectrum_setup_context)


# ------------------------------------------------------------------------------------------- public API

def instance_norm_prelu_pool(x: torch.Tensor, weight: torch.Tensor, pool: int = 1, padding: int = 0,
                             eps: float = 1e-5) -> torch.Tensor:
    """MaxPool1d(pool, padding)(PReLU(weight)(InstanceNorm1d(C, eps)(x))) in one pass.

    Parameters
    ----------
    x : (N, C, L) tensor, fp16 / bf16 / fp32 / fp64, unit stride along L preferred (else copied), L ≥ 2.
    weight : PReLU slopes, (C,) or (1,), any float dtype, on x's device.
    pool : pooling window and stride (1 = no pooling). padding : -inf padding on each side, ≤ pool // 2.
    eps : added to the variance, as InstanceNorm1d's eps.

    Returns
    -------
    y : (N, C, (L + 2·padding − pool) // pool + 1) tensor in x's dtype; differentiable in x and weight.
    """
    _check_inputs(x, weight, pool, padding, eps)
    backend = backend_for(x.device)
    if backend == "torch":
        return instance_norm_prelu_pool_reference(x, weight, pool, padding, eps)
    if not x.is_cuda and not compiling():
        return _EagerConvBlock.apply(x, weight, pool, padding, float(eps), backend)
    # Triton-on-CPU (interpreter) compiles to the custom op too: its CPU kernel is numba.
    return torch.ops.fastspec.instance_norm_prelu_pool_fwd(x, weight, pool, padding, float(eps))[0]


def spectrum_conv_block(y: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
                        weight: torch.Tensor, pool: int = 1, padding: int = 0, eps: float = 1e-5) -> torch.Tensor:
    """The encoder's first block on the spectra themselves: Conv1d(1, C, K, padding=K // 2) followed by
    `instance_norm_prelu_pool`.

    On CPU (numba backend) the conv is fused in too: its (N, C, L) output — the largest activation of the
    encoder — is neither written nor kept for the backward, which recomputes it from y and returns gradients
    for conv_weight, conv_bias and weight only. Spectra that require a gradient themselves, float64 spectra
    (checks, not training; one numba variant less to compile) and the other backends take the unfused path:
    F.conv1d, then `instance_norm_prelu_pool`.

    Parameters
    ----------
    y : (N, L) spectra. conv_weight : (C, 1, K). conv_bias : (C,) or None. weight : PReLU slopes (C,) or (1,).
    pool, padding, eps : as `instance_norm_prelu_pool`.

    Returns
    -------
    (N, C, L_out) tensor: in y's dtype, or under autocast in the autocast dtype (what the conv would return).
    """
    if conv_bias is None and isinstance(conv_weight, torch.Tensor):
        conv_bias = conv_weight.new_zeros(conv_weight.shape[0])
    _check_spectrum_inputs(y, conv_weight, conv_bias, weight, pool, padding, eps, "spectrum_conv_block")
    dev = y.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else y.dtype
    backend = backend_for(y.device)
    if backend != "numba" or y.requires_grad or y.dtype == torch.float64:
        x = torch.nn.functional.conv1d(y.unsqueeze(1), conv_weight, conv_bias, padding=conv_weight.shape[-1] // 2)
        return instance_norm_prelu_pool(x, weight, pool, padding, eps)
    if not compiling():
        return _EagerSpectrumBlock.apply(y, conv_weight, conv_bias, weight, pool, padding, float(eps), out_dtype)
    return torch.ops.fastspec.spectrum_block_fwd(y, conv_weight, conv_bias, weight, pool, padding, float(eps),
                                                 out_dtype)[0]
