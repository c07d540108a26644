"""The public redshift-resample ops and their dispatch: `resample` (restframe → observed spectra), the fused
training loss `resample_loss`, and `redshift_observed` (observed spectra moved to another redshift, for
augmentation).

All three are one generic op: row n of a source spectrum on a uniform grid is sampled at the fractional
source index u = c[l]·a[n] + b[n] and linearly interpolated (resample_coeffs gives c, a, b per op and grid
type; grids validates and describes the grids). The kernels return gradients to x, a and b only; the
gradients to the redshifts follow by the chain rule.

Routes, by the backend `core.backend_for` picks:
* 'torch': resample_ref's index-arithmetic form, autograd by torch.
* 'numba' / 'triton', eager: `_EagerResample` and `_EagerResampleLoss` call the kernel module (resample_numba
  or resample_triton) directly. a, b and their z-derivatives are computed outside autograd (for numba in one
  jitted call) and the chain rule to the redshifts is done inside the Function: no custom-op dispatch and no
  autograd nodes for the z → (a, b) arithmetic. The Python between two kernels runs with caches the kernels
  have just flushed, at 2–4× its warm cost, so this route keeps it short.
* 'numba' / 'triton' under torch.compile: the custom ops `fastspec::resample_fwd`, `resample_bwd`,
  `resample_loss_fwd`, `resample_loss_bwd` (fake and autograd registrations; CUDA kernel: the Triton
  launcher; CPU kernel: numba, or the Triton launcher in the interpreter when `impl` is 'triton'), with a, b
  from differentiable torch ops.
The backward runs on the forward's backend: numba's is deterministic; Triton's scatters with atomics unless
`deterministic=True` (default torch.are_deterministic_algorithms_enabled()), then it gathers.

Op contract: c is non-decreasing (validated grids guarantee it; the gather backward relies on u being
monotone in l), and a row with a ≤ 0 or NaN has no valid pixel.
"""
from __future__ import annotations

import numpy as np
import torch

from . import resample_ref as ref
from .core import acc_dtype, backend_for, check_device, check_tensor, compiling, kernel_module
from .grids import grid, traced_fit, traced_grid, traced_wave
from .resample_coeffs import OBS_LIN, OBS_LOG, REST_LIN, REST_LOG, Coeffs, coefficients

__all__ = ["resample", "resample_loss", "redshift_observed"]


def _check_op_args(x, c, a, b):
    if x.dim() != 2 or c.dim() != 1 or a.shape != (x.shape[0],) or b.shape != (x.shape[0],):
        raise ValueError(f"fastspec resample op: expected x (N, R), c (L,), a (N,), b (N,); got "
                         f"{tuple(x.shape)}, {tuple(c.shape)}, {tuple(a.shape)}, {tuple(b.shape)}")
    if x.shape[1] < 2:
        raise ValueError(f"fastspec resample op: the source grid needs at least 2 pixels, got {x.shape[1]}")


# ---- custom ops (the torch.compile route) ----------------------------------------------------------------


# Each op's body takes the kernel module from `impl`; the CUDA kernel is the Triton launcher whatever `impl`
# says (numba cannot run on CUDA tensors).


def _fwd(x: torch.Tensor, c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, impl: str,
         deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check_op_args(x, c, a, b)
    return kernel_module("resample", impl).resample_fwd(x, c, a, b)


def _bwd(grad: torch.Tensor, x: torch.Tensor, c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, need_ab: bool,
         impl: str, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check_op_args(x, c, a, b)
    return kernel_module("resample", impl).resample_bwd(grad, x, c, a, b, need_ab, deterministic)


def _loss_fwd(x: torch.Tensor, c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, y: torch.Tensor,
              w: torch.Tensor, impl: str, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ w·valid·(y − ŷ)², Σ w·valid) per spectrum; the second is not differentiable."""
    _check_op_args(x, c, a, b)
    return kernel_module("resample", impl).resample_loss_fwd(x, c, a, b, y, w, True)


def _loss_bwd(grad: torch.Tensor, x: torch.Tensor, c: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              y: torch.Tensor, w: torch.Tensor, need_ab: bool, impl: str,
              deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check_op_args(x, c, a, b)
    return kernel_module("resample", impl).resample_loss_bwd(grad, x, c, a, b, y, w, need_ab, deterministic)


_resample_fwd = torch.library.custom_op("fastspec::resample_fwd", _fwd, mutates_args=())
_resample_bwd = torch.library.custom_op("fastspec::resample_bwd", _bwd, mutates_args=())
_resample_loss_fwd = torch.library.custom_op("fastspec::resample_loss_fwd", _loss_fwd, mutates_args=())
_resample_loss_bwd = torch.library.custom_op("fastspec::resample_loss_bwd", _loss_bwd, mutates_args=())


@_resample_fwd.register_kernel("cuda")
def _(x, c, a, b, impl, deterministic):
    return _fwd(x, c, a, b, "triton", deterministic)


@_resample_bwd.register_kernel("cuda")
def _(grad, x, c, a, b, need_ab, impl, deterministic):
    return _bwd(grad, x, c, a, b, need_ab, "triton", deterministic)


@_resample_loss_fwd.register_kernel("cuda")
def _(x, c, a, b, y, w, impl, deterministic):
    return _loss_fwd(x, c, a, b, y, w, "triton", deterministic)


@_resample_loss_bwd.register_kernel("cuda")
def _(grad, x, c, a, b, y, w, need_ab, impl, deterministic):
    return _loss_bwd(grad, x, c, a, b, y, w, need_ab, "triton", deterministic)


@_resample_fwd.register_fake
def _(x, c, a, b, impl, deterministic):
    N, L = x.shape[0], c.shape[0]
    return x.new_empty((N, L)), x.new_empty((N, L), dtype=torch.bool)


@_resample_bwd.register_fake
def _(grad, x, c, a, b, need_ab, impl, deterministic):
    return torch.empty_like(x), x.new_empty((x.shape[0], 2), dtype=torch.float64)


@_resample_loss_fwd.register_fake
def _(x, c, a, b, y, w, impl, deterministic):
    acc = acc_dtype(x.dtype)
    return x.new_empty((x.shape[0],), dtype=acc), x.new_empty((x.shape[0],), dtype=acc)


@_resample_loss_bwd.register_fake
def _(grad, x, c, a, b, y, w, need_ab, impl, deterministic):
    return torch.empty_like(x), x.new_empty((x.shape[0], 2), dtype=torch.float64)


def _setup_fwd(ctx, inputs, output):
    x, c, a, b, impl, deterministic = inputs
    ctx.save_for_backward(x, c, a, b)
    ctx.impl, ctx.deterministic = impl, deterministic
    # No zero-filled N×L gradient for the bool mask (nor for ŷ when only the mask was used).
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward_fwd(ctx, grad, grad_valid):
    if grad is None:
        return None, None, None, None, None, None
    x, c, a, b = ctx.saved_tensors
    need_x, _, need_a, need_b = ctx.needs_input_grad[:4]
    gx, gab = torch.ops.fastspec.resample_bwd(grad, x, c, a, b, bool(need_a or need_b), ctx.impl,
                                              ctx.deterministic)
    return (gx if need_x else None, None, gab[:, 0].to(a.dtype) if need_a else None,
            gab[:, 1].to(b.dtype) if need_b else None, None, None)


_resample_fwd.register_autograd(_backward_fwd, setup_context=_setup_fwd)


def _setup_loss(ctx, inputs, output):
    x, c, a, b, y, w, impl, deterministic = inputs
    ctx.save_for_backward(x, c, a, b, y, w)
    ctx.impl, ctx.deterministic = impl, deterministic
    ctx.mark_non_differentiable(output[1])


def _backward_loss(ctx, grad, grad_wsum):
    x, c, a, b, y, w = ctx.saved_tensors
    need_x, _, need_a, need_b, need_y, need_w = ctx.needs_input_grad[:6]
    gx = ga = gb = gy = gw = None
    if need_x or need_a or need_b:
        gx, gab = torch.ops.fastspec.resample_loss_bwd(grad, x, c, a, b, y, w, bool(need_a or need_b),
                                                       ctx.impl, ctx.deterministic)
        ga = gab[:, 0].to(a.dtype) if need_a else None
        gb = gab[:, 1].to(b.dtype) if need_b else None
    if need_y or need_w:
        yhat, valid = torch.ops.fastspec.resample_fwd(x, c, a, b, ctx.impl, ctx.deterministic)
        gy, gw = _loss_data_grads(grad, yhat, valid, x, y, w, need_y, need_w)
    return gx if need_x else None, None, ga, gb, gy, gw, None, None


_resample_loss_fwd.register_autograd(_backward_loss, setup_context=_setup_loss)


def _loss_data_grads(grad, yhat, valid, x, y, w, need_y, need_w):
    """Gradients of the loss to the data y and w (rarely wanted: ŷ is materialised here, not in the kernels)."""
    cd = acc_dtype(x.dtype)
    m = valid & (w != 0)
    zero = torch.zeros((), dtype=cd, device=x.device)
    r = torch.where(m, y.to(cd) - yhat.to(cd), zero)
    g = grad.to(cd)[:, None]
    gy = (2 * g * torch.where(m, w.to(cd), zero) * r).to(y.dtype) if need_y else None
    gw = (g * r * r).to(w.dtype) if need_w else None
    return gy, gw


# ---- the eager route -------------------------------------------------------------------------------------


def _eager_coeffs(impl, mode, z, z_new, start, step) -> Coeffs:
    """a, b and their derivatives outside autograd; for numba one jitted call returning numpy rows."""
    if impl == "numba":
        zs = _host_z(z)
        zn = zs if z_new is None else _host_z(z_new)
        return Coeffs(*kernel_module("resample", "numba").coefficients(mode, zs, zn, float(start), float(step)))
    with torch.no_grad():
        zn = None if z_new is None else z_new.detach().to(torch.float64)
        return coefficients(mode, z.detach().to(torch.float64), zn, start, step, derivs=True)


def _host_z(z):
    """Redshifts as a numpy array for resample_numba.coefficients (float32/float64 as they come)."""
    z = z.detach()
    return (z if z.dtype in (torch.float32, torch.float64) else z.to(torch.float64)).numpy()


def _eager_grid(impl, c):
    """The grid coordinates as the eager route's kernels take them (numba: a numpy view)."""
    return c.numpy() if impl == "numba" else c


def _z_grads(co: Coeffs, gab, need_z, need_zn, z_dtype, zn_dtype):
    """Chain rule from the kernels' (∂/∂a, ∂/∂b) to z and z_new."""
    if isinstance(co.a, np.ndarray):  # numba: every derivative row is there (zeros included)
        g = gab.numpy()
        chain_rule = kernel_module("resample", "numba").chain_rule

        def chain(da, db, dtype):
            out = np.empty(da.shape[0], np.float32 if dtype == torch.float32 else np.float64)
            chain_rule(g, da, db, out)
            t = torch.from_numpy(out)
            return t if t.dtype == dtype else t.to(dtype)
    else:
        def chain(da, db, dtype):
            out = torch.zeros_like(gab[:, 0])
            if da is not None:
                out = out + gab[:, 0] * da
            if db is not None:
                out = out + gab[:, 1] * db
            return out.to(dtype)

    return (chain(co.a_z, co.b_z, z_dtype) if need_z else None,
            chain(co.a_zn, co.b_zn, zn_dtype) if need_zn else None)


class _EagerResample(torch.autograd.Function):
    """resample and redshift_observed on the eager route: (ŷ, valid), gradients to x, z and z_new."""

    @staticmethod
    def forward(ctx, x, z, z_new, c, co, impl, deterministic):
        out, valid = kernel_module("resample", impl).resample_fwd(x, c, co.a, co.b)
        ctx.save_for_backward(x)
        ctx.c, ctx.co, ctx.impl, ctx.deterministic = c, co, impl, deterministic
        ctx.z_dtypes = (z.dtype, z_new.dtype if z_new is not None else None)
        ctx.mark_non_differentiable(valid)
        ctx.set_materialize_grads(False)
        return out, valid

    @staticmethod
    def backward(ctx, grad, grad_valid):
        need_x, need_z, need_zn = ctx.needs_input_grad[:3]
        if grad is None or not (need_x or need_z or need_zn):
            return None, None, None, None, None, None, None
        (x,) = ctx.saved_tensors
        co = ctx.co
        gx, gab = kernel_module("resample", ctx.impl).resample_bwd(grad, x, ctx.c, co.a, co.b,
                                                                   bool(need_z or need_zn), ctx.deterministic)
        gz, gzn = _z_grads(co, gab, need_z, need_zn, *ctx.z_dtypes)
        return gx if need_x else None, gz, gzn, None, None, None, None


class _EagerResampleLoss(torch.autograd.Function):
    """resample_loss on the eager route: the loss (and, with `weight`, Σ w·valid, not differentiable),
    gradients to x, z, y and w."""

    @staticmethod
    def forward(ctx, x, z, y, w, c, co, impl, deterministic, weight):
        loss, wsum = kernel_module("resample", impl).resample_loss_fwd(x, c, co.a, co.b, y, w, weight)
        ctx.save_for_backward(x, y, w)
        ctx.c, ctx.co, ctx.impl, ctx.deterministic, ctx.z_dtype = c, co, impl, deterministic, z.dtype
        if not weight:
            return loss
        ctx.mark_non_differentiable(wsum)
        return loss, wsum

    @staticmethod
    def backward(ctx, grad, grad_wsum=None):
        x, y, w = ctx.saved_tensors
        need_x, need_z, need_y, need_w = ctx.needs_input_grad[:4]
        c, co = ctx.c, ctx.co
        mod = kernel_module("resample", ctx.impl)
        gx = gz = gy = gw = None
        if need_x or need_z:
            gx, gab = mod.resample_loss_bwd(grad, x, c, co.a, co.b, y, w, bool(need_z), ctx.deterministic)
            gz, _ = _z_grads(co, gab, need_z, False, ctx.z_dtype, None)
        if need_y or need_w:
            yhat, valid = mod.resample_fwd(x, c, co.a, co.b)
            gy, gw = _loss_data_grads(grad, yhat, valid, x, y, w, need_y, need_w)
        return gx if need_x else None, gz, gy, gw, None, None, None, None, None


# ---- argument checks and the generic op's arguments ----------------------------------------------------


def _check_spec(x, name: str, fn: str) -> torch.Tensor:
    check_tensor(x, name, fn, 2, "(N, pixels)")
    return x


def _check_z(z, name: str, fn: str, x: torch.Tensor, x_name: str) -> torch.Tensor:
    if not isinstance(z, torch.Tensor):
        z = torch.as_tensor(z, dtype=torch.float64, device=x.device)
    check_device(z, name, x, x_name, fn)
    if not (z.dtype.is_floating_point or z.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{fn}: {name} has dtype {z.dtype}; expected a floating-point tensor")
    N = x.shape[0]
    if z.dim() == 0:
        z = z.expand(N)
    if z.shape != (N,):
        raise ValueError(f"{fn}: {name} must have shape ({N},) — one redshift per spectrum — got {tuple(z.shape)}")
    return z


def _check_data(t, name: str, fn: str, x: torch.Tensor, L: int) -> torch.Tensor:
    check_tensor(t, name, fn)
    check_device(t, name, x, "spec_rest", fn)
    if t.shape != (x.shape[0], L):
        raise ValueError(f"{fn}: {name} must have shape ({x.shape[0]}, {L}) like the observed spectra, "
                         f"got {tuple(t.shape)}")
    return t


def _deterministic(flag) -> bool:
    return torch.are_deterministic_algorithms_enabled() if flag is None else bool(flag)


def _rest_call(fn, spec_rest, z, wave_rest, wave_obs, deterministic):
    """The checked arguments of resample / resample_loss, their backend, and the generic op's arguments:
    (x, z, backend, deterministic, c, a, b, None); on the eager kernel route (..., c as the kernels take it,
    None, None, coefficients with their z-derivatives)."""
    x = _check_spec(spec_rest, "spec_rest", fn)
    z = _check_z(z, "z", fn, x, "spec_rest")
    backend = backend_for(x.device)
    return (x, z, backend, _deterministic(deterministic), *_rest_args(x, z, wave_rest, wave_obs, fn, backend))


def _rest_args(x, z, wave_rest, wave_obs, fn, backend):
    """(c, a, b, None) of the generic op for restframe → observed on a linear or log-linear restframe grid, or
    (c, None, None, coefficients) on the eager kernel route."""
    R = x.shape[1]
    if len(wave_rest) != R:
        raise ValueError(f"{fn}: spec_rest has {R} pixels per spectrum but wave_rest has {len(wave_rest)}")
    if compiling():
        return (*_rest_args_traced(x, z, wave_rest, wave_obs), None)
    rest = grid(wave_rest, "wave_rest", fn, x.device, "auto", 2, "spec_rest")
    obs = grid(wave_obs, "wave_obs", fn, x.device, "monotone", 1, "spec_rest")
    if rest.loglinear:
        mode, c = REST_LOG, obs.log_coords(rest.start, rest.step)
    else:
        mode, c = REST_LIN, obs.c
    if backend == "torch":
        co = coefficients(mode, z.to(torch.float64), None, rest.start, rest.step, derivs=False)
        return c, co.a, co.b, None
    return _eager_grid(backend, c), None, None, _eager_coeffs(backend, mode, z, None, rest.start, rest.step)


def _rest_args_traced(x, z, wave_rest, wave_obs):
    """(c, a, b) under torch.compile, by tensor ops only: the restframe grid's type is read from its
    deviations from a straight line in λ and in log10 λ (as the eager route's validation picks it), and c,
    a, b are selected between the two forms on the device, without a host sync."""
    rest = traced_wave(wave_rest, x.device)
    obs = traced_wave(wave_obs, x.device)
    lin_start, lin_step, lin_dev = traced_fit(rest)
    log_start, log_step, log_dev = traced_fit(torch.log10(rest))
    is_log = log_dev < lin_dev
    z64 = z.to(torch.float64)
    lin = coefficients(REST_LIN, z64, None, lin_start, lin_step, derivs=False)
    log = coefficients(REST_LOG, z64, None, log_start, log_step, derivs=False)
    c = torch.where(is_log, (torch.log10(obs) - log_start) / log_step, obs)
    return c, torch.where(is_log, log.a, lin.a), torch.where(is_log, log.b, lin.b)


def _obs_args(x, z, z_new, wave_obs, loglinear, fn, backend):
    """As `_rest_args`, for redshift_observed on the observed grid (log-linear or linear)."""
    L = x.shape[1]
    if len(wave_obs) != L:
        raise ValueError(f"{fn}: spec_obs has {L} pixels per spectrum but wave_obs has {len(wave_obs)}")
    if compiling():
        if loglinear is None:
            raise ValueError(f"{fn}: under torch.compile pass loglinear=True/False (grid detection reads data)")
        start, step, c = traced_grid(wave_obs, x.device, bool(loglinear))
    else:
        kind = "auto" if loglinear is None else ("loglinear" if loglinear else "linear")
        g = grid(wave_obs, "wave_obs", fn, x.device, kind, 2, "spec_obs")
        loglinear, start, step, c = g.loglinear, g.start, g.step, g.c
        if backend != "torch":
            co = _eager_coeffs(backend, OBS_LOG if loglinear else OBS_LIN, z, z_new, start, step)
            return _eager_grid(backend, c), None, None, co
    co = coefficients(OBS_LOG if loglinear else OBS_LIN, z.to(torch.float64), z_new.to(torch.float64), start, step,
                      derivs=False)
    return c, co.a, co.b, None


# ---- public API ------------------------------------------------------------------------------------------


def resample(spec_rest, z, wave_rest, wave_obs, *, deterministic=None):
    """Redshift restframe model spectra and sample them on the observed grid.

    spec_obs[n, l] = spec_rest[n](wave_obs[l] / (1 + z[n])), linear interpolation on the restframe grid — in λ
    on a linear grid, in log λ on a log-linear one (detected from the grid); 0 and valid False where
    wave_obs[l]/(1+z[n]) falls outside [wave_rest[0], wave_rest[-1]] (both ends included), or z[n] ≤ −1, NaN
    or ±inf.

    Parameters
    ----------
    spec_rest : (N, R) tensor, float16/bfloat16/float32/float64 — restframe spectra (any strides).
    z : (N,) tensor (or a scalar) — redshifts, on the same device; gradients flow to it.
    wave_rest : (R,) linear or log-linear grid (tensor on the same device, or array), Å.
    wave_obs : (L,) strictly increasing observed grid (tensor or array), Å.
    deterministic : bool, optional — Triton backward without atomics (default:
        torch.are_deterministic_algorithms_enabled()). numba and torch are always deterministic.

    Returns
    -------
    spec_obs : (N, L) tensor in spec_rest's dtype; valid : (N, L) bool tensor.
    """
    x, z, backend, det, c, a, b, co = _rest_call("resample", spec_rest, z, wave_rest, wave_obs, deterministic)
    if co is not None:
        return _EagerResample.apply(x, z, None, c, co, backend, det)
    if backend == "torch":
        return ref.resample_index(x, c, a, b)
    return torch.ops.fastspec.resample_fwd(x, c, a, b, backend, det)


def resample_loss(spec_rest, z, wave_rest, wave_obs, y, w, *, deterministic=None, return_weight=False):
    """Per-spectrum weighted squared residual of the resampled model, without materialising it.

    loss[n] = Σ_l w[n,l]·valid[n,l]·(y[n,l] − spec_obs[n,l])² with (spec_obs, valid) = resample(...);
    pixels with w = 0 are skipped even where y is NaN. Returns (N,) float32 (float64 for float64 spec_rest).
    Gradients flow to spec_rest and z (and to y, w if they require them). Arguments as in `resample`; y and w
    are (N, L) on the observed grid.

    return_weight : also return wsum[n] = Σ_l w[n,l]·valid[n,l] (the denominator of the paper's loss), from
        the same kernel pass, without gradient: returns (loss, wsum).
    """
    fn = "resample_loss"
    x, z, backend, det, c, a, b, co = _rest_call(fn, spec_rest, z, wave_rest, wave_obs, deterministic)
    L = c.shape[0]
    y = _check_data(y, "y", fn, x, L)
    w = _check_data(w, "w", fn, x, L)
    if co is not None:
        return _EagerResampleLoss.apply(x, z, y, w, c, co, backend, det, bool(return_weight))
    if backend == "torch":
        return ref.resample_loss_index(x, c, a, b, y, w, bool(return_weight))
    loss, wsum = torch.ops.fastspec.resample_loss_fwd(x, c, a, b, y, w, backend, det)
    return (loss, wsum) if return_weight else loss


def redshift_observed(spec_obs, z, z_new, wave_obs, *, loglinear=None, deterministic=None):
    """Move observed spectra from redshift z to z_new on the same observed grid (redshift augmentation).

    spec_new[n, l] = spec_obs[n] interpolated at wave_obs[l]·(1+z[n])/(1+z_new[n]); 0 and valid False where
    that falls outside [wave_obs[0], wave_obs[-1]]. Index arithmetic in log λ for a log-linear grid
    (SDSS/BOSS) and in λ for a linear one (DESI); `loglinear` detects the grid type when None (pass it under
    torch.compile). Use it on the weights too and multiply them by `valid`. Gradients flow to spec_obs, z
    and z_new.

    Returns (spec_new (N, L) in spec_obs's dtype, valid (N, L) bool).
    """
    fn = "redshift_observed"
    x = _check_spec(spec_obs, "spec_obs", fn)
    z = _check_z(z, "z", fn, x, "spec_obs")
    z_new = _check_z(z_new, "z_new", fn, x, "spec_obs")
    backend = backend_for(x.device)
    det = _deterministic(deterministic)
    c, a, b, co = _obs_args(x, z, z_new, wave_obs, loglinear, fn, backend)
    if co is not None:
        return _EagerResample.apply(x, z, z_new, c, co, backend, det)
    if backend == "torch":
        return ref.resample_index(x, c, a, b)
    return torch.ops.fastspec.resample_fwd(x, c, a, b, backend, det)
