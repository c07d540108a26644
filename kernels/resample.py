"""Redshift-resample ops: restframe → observed spectra (`resample`), the fused training loss
(`resample_loss`), and moving observed spectra to another redshift for augmentation (`redshift_observed`).

All three reduce to one generic op: row n of a source spectrum x (N, R) on a *uniform* grid is sampled at
the fractional source index ``u[n, l] = c[l]·a[n] + b[n]`` and linearly interpolated; pixels with u outside
[0, R−1] are zero and `valid` False. Index arithmetic replaces searchsorted:

* resample (linear restframe grid λ0 + jΔ):        c = λ_obs,   a = 1/((1+z)Δ),         b = −λ0/Δ
* redshift_observed on a log-linear grid (SDSS):   c = (log10 λ − ξ0)/Δξ (= pixel index), a = 1,
                                                     b = log10((1+z)/(1+z_new))/Δξ
* redshift_observed on a linear grid (DESI):       c = λ,       a = (1+z)/((1+z_new)Δ),  b = −λ0/Δ

a and b are computed from z (and z_new) with differentiable torch ops, so the custom ops only return
gradients to x, a and b, and autograd carries them on to the redshifts. Op contract: c is non-decreasing
(validated grids guarantee it; the gather backward relies on u being monotone in l), and a row with a ≤ 0 or
NaN has no valid pixel — the public functions set a = NaN for unusable redshifts (z ≤ −1, NaN, ±inf).

Dispatch (kernels/backend.py): 'torch' → the plain-torch reference (resample_ref, autograd by torch);
'numba' and 'triton' → the torch.library custom ops `fastspec::resample_fwd`, `fastspec::resample_bwd`,
`fastspec::resample_loss_fwd`, `fastspec::resample_loss_bwd`. Their CUDA kernel is the Triton launcher; their
CPU kernel runs numba, or the Triton launcher in the interpreter when the op's `impl` argument is 'triton'
(tests without a GPU). The backend is resolved once in the public function and passed as `impl`, so the
backward runs on the same backend as the forward.

Backward: numba walks each spectrum serially (deterministic); Triton scatters with fp32 atomics by default,
or gathers without atomics when `deterministic=True` (default: torch.are_deterministic_algorithms_enabled()).
"""
from __future__ import annotations

import hashlib
import importlib
import math
import weakref
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from . import resample_ref as ref
from .backend import resolve

__all__ = ["resample", "resample_loss", "redshift_observed", "triton_compile_specs"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# A grid is accepted as uniform when no point is further than this many pixels from the straight line.
GRID_TOL_PIXELS = 0.01


def _impl_module(x: torch.Tensor, impl: str):
    if x.device.type == "cuda" or impl == "triton":
        name = "resample_triton"
    elif impl == "numba":
        name = "resample_numba"
    else:
        raise ValueError(f"fastspec resample ops: unknown impl {impl!r} (expected 'numba' or 'triton')")
    mod = _MODULES.get(name)
    if mod is None:  # imported on first use (triton is optional on CPU)
        mod = _MODULES[name] = importlib.import_module(f".{name}", __package__)
    return mod


_MODULES: dict = {}


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_op_args(x, c, a, b):
    if x.dim() != 2 or c.dim() != 1 or a.shape != (x.shape[0],) or b.shape != (x.shape[0],):
        raise ValueError(f"fastspec resample op: expected x (N, R), c (L,), a (N,), b (N,); got "
                         f"{tuple(x.shape)}, {tuple(c.shape)}, {tuple(a.shape)}, {tuple(b.shape)}")
    if x.shape[1] < 2:
        raise ValueError(f"fastspec resample op: the source grid needs at least 2 pixels, got {x.shape[1]}")


# ---- custom ops ------------------------------------------------------------------------------------------


@torch.library.custom_op("fastspec::resample_fwd", mutates_args=())
def _resample_fwd(x: torch.Tensor, c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, impl: str,
                  deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check_op_args(x, c, a, b)
    return _impl_module(x, impl).resample_fwd(x, c, a, b)


@torch.library.custom_op("fastspec::resample_bwd", mutates_args=())
def _resample_bwd(grad: torch.Tensor, x: torch.Tensor, c: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  need_ab: bool, impl: str, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check_op_args(x, c, a, b)
    return _impl_module(x, impl).resample_bwd(grad, x, c, a, b, need_ab, deterministic)


@torch.library.custom_op("fastspec::resample_loss_fwd", mutates_args=())
def _resample_loss_fwd(x: torch.Tensor, c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, y: torch.Tensor,
                       w: torch.Tensor, impl: str, deterministic: bool) -> torch.Tensor:
    _check_op_args(x, c, a, b)
    return _impl_module(x, impl).resample_loss_fwd(x, c, a, b, y, w)


@torch.library.custom_op("fastspec::resample_loss_bwd", mutates_args=())
def _resample_loss_bwd(grad: torch.Tensor, x: torch.Tensor, c: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       y: torch.Tensor, w: torch.Tensor, need_ab: bool, impl: str,
                       deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check_op_args(x, c, a, b)
    return _impl_module(x, impl).resample_loss_bwd(grad, x, c, a, b, y, w, need_ab, deterministic)


# The CUDA kernels are the Triton launchers whatever `impl` says (numba cannot run on CUDA tensors).
@_resample_fwd.register_kernel("cuda")
def _resample_fwd_cuda(x, c, a, b, impl, deterministic):
    _check_op_args(x, c, a, b)
    from . import resample_triton

    return resample_triton.resample_fwd(x, c, a, b)


@_resample_bwd.register_kernel("cuda")
def _resample_bwd_cuda(grad, x, c, a, b, need_ab, impl, deterministic):
    from . import resample_triton

    return resample_triton.resample_bwd(grad, x, c, a, b, need_ab, deterministic)


@_resample_loss_fwd.register_kernel("cuda")
def _resample_loss_fwd_cuda(x, c, a, b, y, w, impl, deterministic):
    _check_op_args(x, c, a, b)
    from . import resample_triton

    return resample_triton.resample_loss_fwd(x, c, a, b, y, w)


@_resample_loss_bwd.register_kernel("cuda")
def _resample_loss_bwd_cuda(grad, x, c, a, b, y, w, need_ab, impl, deterministic):
    from . import resample_triton

    return resample_triton.resample_loss_bwd(grad, x, c, a, b, y, w, need_ab, deterministic)


@_resample_fwd.register_fake
def _(x, c, a, b, impl, deterministic):
    N, L = x.shape[0], c.shape[0]
    return x.new_empty((N, L)), x.new_empty((N, L), dtype=torch.bool)


@_resample_bwd.register_fake
def _(grad, x, c, a, b, need_ab, impl, deterministic):
    return torch.empty_like(x), x.new_empty((x.shape[0], 2), dtype=torch.float64)


@_resample_loss_fwd.register_fake
def _(x, c, a, b, y, w, impl, deterministic):
    return x.new_empty((x.shape[0],), dtype=_compute_dtype(x.dtype))


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


def _backward_loss(ctx, grad):
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


def _loss_data_grads(grad, yhat, valid, x, y, w, need_y, need_w):
    """Gradients of the loss to the data y and w (rarely wanted: ŷ is materialised here, not in the kernels)."""
    cd = _compute_dtype(x.dtype)
    m = valid & (w != 0)
    zero = torch.zeros((), dtype=cd, device=x.device)
    r = torch.where(m, y.to(cd) - yhat.to(cd), zero)
    g = grad.to(cd)[:, None]
    gy = (2 * g * torch.where(m, w.to(cd), zero) * r).to(y.dtype) if need_y else None
    gw = (g * r * r).to(w.dtype) if need_w else None
    return gy, gw


_resample_loss_fwd.register_autograd(_backward_loss, setup_context=_setup_loss)


# ---- grids -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Grid:
    """A validated 1-D wavelength grid: its uniform-coordinate description and the float64 `c` it yields."""

    loglinear: bool
    start: float  # ξ0: λ0 (linear) or log10 λ0 (log-linear)
    step: float  # Δ in the same coordinate
    c: torch.Tensor  # float64 on the device: λ (linear) or (log10 λ − ξ0)/Δ (log-linear)


_GRID_CACHE: dict = {}
_GRID_CACHE_MAX = 32


def _cache_key(arr, kind, device):
    if isinstance(arr, torch.Tensor):
        # torch.Size, stride tuples and devices hash as they are (no str(): this runs on every call)
        return ("t", id(arr), arr.data_ptr(), arr._version, arr.shape, arr.stride(), arr.dtype, arr.device, kind,
                device)
    digest = hashlib.blake2b(np.ascontiguousarray(arr).tobytes(), digest_size=16).hexdigest()
    return ("a", digest, arr.shape, arr.dtype.str, kind, str(device))


def _fit_uniform(coord: np.ndarray):
    """(start, step, worst deviation in steps, where) of the straight line through the end points."""
    n = coord.size
    start = float(coord[0])
    step = float(coord[-1] - coord[0]) / (n - 1)
    dev = np.abs(coord - (start + step * np.arange(n))) / abs(step) if step != 0 else np.full(n, np.inf)
    worst = int(np.argmax(dev))
    return start, step, float(dev[worst]), worst


def _grid(arr, name: str, fn: str, device, kind: str, min_len: int) -> _Grid:
    """Validate a wavelength grid (cached) and describe it. kind: 'linear', 'loglinear', 'monotone', 'auto'."""
    if isinstance(arr, torch.Tensor) and arr.device != torch.device(device):
        raise ValueError(f"{fn}: {name} is on {arr.device} but the spectra are on {device}")
    key = _cache_key(arr, kind, device)
    hit = _GRID_CACHE.get(key)
    if hit is not None and (hit[0] is None or hit[0]() is arr):
        return hit[1]
    grid = _make_grid(arr, name, fn, device, kind, min_len)
    if len(_GRID_CACHE) >= _GRID_CACHE_MAX:
        _GRID_CACHE.pop(next(iter(_GRID_CACHE)))
    _GRID_CACHE[key] = (weakref.ref(arr) if isinstance(arr, torch.Tensor) else None, grid)
    return grid


def _make_grid(arr, name, fn, device, kind, min_len) -> _Grid:
    host = arr.detach().cpu().double().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr, np.float64)
    if host.ndim != 1:
        raise ValueError(f"{fn}: {name} must be 1-D, got shape {tuple(host.shape)}")
    if host.size < min_len:
        raise ValueError(f"{fn}: {name} needs at least {min_len} wavelengths, got {host.size}")
    bad = np.flatnonzero(~np.isfinite(host) | (host <= 0))
    if bad.size:
        raise ValueError(f"{fn}: {name}[{bad[0]}] = {host[bad[0]]} is not a positive finite wavelength")
    steps = np.diff(host)
    if np.any(steps <= 0):
        k = int(np.flatnonzero(steps <= 0)[0])
        raise ValueError(f"{fn}: {name} must increase strictly, but {name}[{k + 1}] = {host[k + 1]} ≤ "
                         f"{name}[{k}] = {host[k]}")
    if kind == "monotone":
        return _Grid(False, float(host[0]), float("nan"), torch.as_tensor(host, device=device))
    fits = {}
    if kind in ("linear", "auto"):
        fits[False] = _fit_uniform(host)
    if kind in ("loglinear", "auto"):
        fits[True] = _fit_uniform(np.log10(host))
    ok = {log: f for log, f in fits.items() if f[2] <= GRID_TOL_PIXELS}
    if not ok:
        what = {"linear": "linear", "loglinear": "log-linear", "auto": "linear or log-linear"}[kind]
        log, (_, _, dev, worst) = min(fits.items(), key=lambda kv: kv[1][2])
        raise ValueError(f"{fn}: {name} is not a {what} grid: {name}[{worst}] = {host[worst]:.6g} lies "
                         f"{dev:.3g} pixels off the uniform {'log-linear' if log else 'linear'} grid through "
                         f"its end points (tolerance {GRID_TOL_PIXELS})")
    log = min(ok, key=lambda k: ok[k][2])
    start, step, _, _ = ok[log]
    c = (np.log10(host) - start) / step if log else host
    return _Grid(log, start, step, torch.as_tensor(c, dtype=torch.float64, device=device))


def _grid_traced(arr, device, loglinear: bool):
    """Grid description from tensor ops only (under torch.compile: no validation, no host sync)."""
    t = torch.as_tensor(arr, device=device).detach().to(torch.float64)
    coord = torch.log10(t) if loglinear else t
    start = coord[0]
    step = (coord[-1] - coord[0]) / (coord.shape[0] - 1)
    c = (coord - start) / step if loglinear else t
    return start, step, c


# ---- argument checks -------------------------------------------------------------------------------------


def _check_spec(x, name: str, fn: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{fn}: {name} must have shape (N, pixels), got {tuple(x.shape)}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{fn}: {name} has dtype {x.dtype}; expected float16, bfloat16, float32 or float64")
    return x


def _check_z(z, name: str, fn: str, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(z, torch.Tensor):
        z = torch.as_tensor(z, dtype=torch.float64, device=x.device)
    if z.device != x.device:
        raise ValueError(f"{fn}: {name} is on {z.device} but the spectra are on {x.device}")
    if not (z.dtype.is_floating_point or z.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{fn}: {name} has dtype {z.dtype}; expected a floating-point tensor")
    N = x.shape[0]
    if z.dim() == 0:
        z = z.expand(N)
    if z.shape != (N,):
        raise ValueError(f"{fn}: {name} must have shape ({N},) — one redshift per spectrum — got {tuple(z.shape)}")
    return z


def _check_data(t, name: str, fn: str, x: torch.Tensor, L: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != x.device:
        raise ValueError(f"{fn}: {name} is on {t.device} but spec_rest is on {x.device}")
    if t.shape != (x.shape[0], L):
        raise ValueError(f"{fn}: {name} must have shape ({x.shape[0]}, {L}) like the observed spectra, "
                         f"got {tuple(t.shape)}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{fn}: {name} has dtype {t.dtype}; expected a floating-point tensor")
    return t


def _deterministic(flag) -> bool:
    return torch.are_deterministic_algorithms_enabled() if flag is None else bool(flag)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


@torch.compiler.assume_constant_result
def _backend_for(device_type: str) -> str:
    # Dynamo cannot trace the ContextVar behind use_backend: under torch.compile the backend in force when
    # the function is compiled is baked into the graph.
    return resolve(device_type)


def _usable(*zs):
    """(ok, z with unusable entries replaced by 0): a redshift is usable when finite and > −1.

    Rows that are not ok get a = NaN, which every backend reads as "no valid pixel"; computing a, b from the
    sanitised z keeps their gradients 0 instead of 0·inf = NaN.
    """
    ok = None
    for z in zs:
        o = torch.isfinite(z) & (z > -1.0)
        ok = o if ok is None else ok & o
    return (ok, *[torch.where(ok, z, 0.0) for z in zs])


class _Coeffs(NamedTuple):
    """a, b of the generic op for N spectra, and (eager path only) their derivatives to z and z_new.

    Tensors, or float64 numpy arrays on the numba eager path (resample_numba.coefficients). A derivative is
    None where it is identically 0. Unusable rows have a = NaN and derivatives 0.
    """

    a: torch.Tensor
    b: torch.Tensor
    a_z: torch.Tensor | None = None
    b_z: torch.Tensor | None = None
    a_zn: torch.Tensor | None = None
    b_zn: torch.Tensor | None = None


# Which coefficients (resample_numba's mode constants: the same formulas in numba for the numba eager path).
_REST, _OBS_LOG, _OBS_LIN = 0, 1, 2


def _rest_coeffs(z, lam0, dlam, derivs: bool) -> _Coeffs:
    """resample: u = λ_obs/((1+z)Δ) − λ0/Δ, so a = 1/((1+z)Δ), b = −λ0/Δ. z float64; differentiable when
    derivs is False (the custom-op path, where autograd carries ∂a on to z)."""
    ok, zs = _usable(z)
    a = 1.0 / ((1.0 + zs) * dlam)
    b = (-lam0 / dlam) * torch.ones_like(z)
    a_z = torch.where(ok, -a / (1.0 + zs), 0.0) if derivs else None
    return _Coeffs(torch.where(ok, a, float("nan")), b, a_z)


def _obs_coeffs(z, z_new, loglinear: bool, start, step, derivs: bool) -> _Coeffs:
    """redshift_observed: source pixel of λ·(1+z)/(1+z_new) on the observed grid (log-linear or linear)."""
    ok, zs, zns = _usable(z, z_new)
    nan = float("nan")
    if loglinear:  # u = l + log10((1+z)/(1+z_new))/Δξ
        k = 1.0 / (math.log(10.0) * step)
        a = torch.where(ok, torch.ones_like(z), nan)
        b = (torch.log1p(zs) - torch.log1p(zns)) * k
        if not derivs:
            return _Coeffs(a, b)
        return _Coeffs(a, b, b_z=torch.where(ok, k / (1.0 + zs), 0.0), b_zn=torch.where(ok, -k / (1.0 + zns), 0.0))
    # linear: u = λ·(1+z)/((1+z_new)Δ) − λ0/Δ
    a = (1.0 + zs) / ((1.0 + zns) * step)
    b = (-start / step) * torch.ones_like(z)
    if not derivs:
        return _Coeffs(torch.where(ok, a, nan), b)
    return _Coeffs(torch.where(ok, a, nan), b, a_z=torch.where(ok, 1.0 / ((1.0 + zns) * step), 0.0),
                   a_zn=torch.where(ok, -a / (1.0 + zns), 0.0))


def _eager_coeffs(x, impl, mode, z, z_new, p0, p1) -> _Coeffs:
    """a, b and their derivatives outside autograd (mode _REST: p0, p1 = λ0, Δ of the restframe grid;
    _OBS_LOG / _OBS_LIN: ξ0, Δ of the observed grid). numba on CPU: one jitted call returning numpy rows."""
    if x.device.type == "cpu" and impl == "numba":
        zs = _host_z(z)
        zn = zs if z_new is None else _host_z(z_new)
        return _Coeffs(*_impl_module(x, impl).coefficients(mode, zs, zn, float(p0), float(p1)))
    with torch.no_grad():
        z64 = z.detach().to(torch.float64)
        if mode == _REST:
            return _rest_coeffs(z64, p0, p1, derivs=True)
        return _obs_coeffs(z64, z_new.detach().to(torch.float64), mode == _OBS_LOG, p0, p1, derivs=True)


def _host_z(z):
    """Redshifts as a numpy array for resample_numba.coefficients (float32/float64 as they come)."""
    z = z.detach()
    return (z if z.dtype in (torch.float32, torch.float64) else z.to(torch.float64)).numpy()


def _z_grads(co: _Coeffs, gab, need_z, need_zn, z_dtype, zn_dtype):
    """Chain rule from the kernels' (∂/∂a, ∂/∂b) to z and z_new."""
    if isinstance(co.a, np.ndarray):  # numba eager path: every derivative row is there (zeros included)
        g = gab.numpy()
        chain_rule = _MODULES["resample_numba"].chain_rule

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


# ---- eager path ------------------------------------------------------------------------------------------
# Outside torch.compile the public functions call the kernels through these autograd.Functions: the same
# kernels as the custom ops, with the chain rule to the redshifts done here in one step. That skips the
# custom-op dispatch and the autograd nodes of the z → (a, b) arithmetic. The Python between two kernels
# runs with caches the kernels have just flushed (2–4× its warm cost), so this path keeps it short: at
# N = 256 on the SDSS grid it was a third of a resample forward+backward before (kernels/README.md).


class _ResampleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, z, z_new, c, co, impl, deterministic):
        out, valid = _impl_module(x, impl).resample_fwd(x, c, co.a, co.b)
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
        gx, gab = _impl_module(x, ctx.impl).resample_bwd(grad, x, ctx.c, co.a, co.b, bool(need_z or need_zn),
                                                          ctx.deterministic)
        gz, gzn = _z_grads(co, gab, need_z, need_zn, *ctx.z_dtypes)
        return gx if need_x else None, gz, gzn, None, None, None, None


class _ResampleLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, z, y, w, c, co, impl, deterministic):
        loss = _impl_module(x, impl).resample_loss_fwd(x, c, co.a, co.b, y, w)
        ctx.save_for_backward(x, y, w)
        ctx.c, ctx.co, ctx.impl, ctx.deterministic, ctx.z_dtype = c, co, impl, deterministic, z.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        x, y, w = ctx.saved_tensors
        need_x, need_z, need_y, need_w = ctx.needs_input_grad[:4]
        c, co = ctx.c, ctx.co
        mod = _impl_module(x, ctx.impl)
        gx = gz = gy = gw = None
        if need_x or need_z:
            gx, gab = mod.resample_loss_bwd(grad, x, c, co.a, co.b, y, w, bool(need_z), ctx.deterministic)
            gz, _ = _z_grads(co, gab, need_z, False, ctx.z_dtype, None)
        if need_y or need_w:
            yhat, valid = mod.resample_fwd(x, c, co.a, co.b)
            gy, gw = _loss_data_grads(grad, yhat, valid, x, y, w, need_y, need_w)
        return gx if need_x else None, gz, gy, gw, None, None, None, None


def _eager_grid(x, impl, c):
    """The grid coordinates as the eager path's kernels take them (numba: a numpy view)."""
    return c.numpy() if x.device.type == "cpu" and impl == "numba" else c


# Tests set this to send eager calls through the custom ops, the path torch.compile takes.
_EAGER_VIA_CUSTOM_OPS = False


def _eager() -> bool:
    return not (_EAGER_VIA_CUSTOM_OPS or _compiling())


# ---- public API ------------------------------------------------------------------------------------------


def _rest_grid(x, wave_rest, wave_obs, fn):
    """(c, λ0, Δ) for restframe → observed resampling."""
    R = x.shape[1]
    if len(wave_rest) != R:
        raise ValueError(f"{fn}: spec_rest has {R} pixels per spectrum but wave_rest has {len(wave_rest)}")
    if _compiling():
        lam0, dlam, _ = _grid_traced(wave_rest, x.device, loglinear=False)
        return torch.as_tensor(wave_obs, device=x.device).detach().to(torch.float64), lam0, dlam
    rest = _grid(wave_rest, "wave_rest", fn, x.device, "linear", 2)
    obs = _grid(wave_obs, "wave_obs", fn, x.device, "monotone", 1)
    return obs.c, rest.start, rest.step


def resample(spec_rest, z, wave_rest, wave_obs, *, deterministic=None):
    """Redshift restframe model spectra and sample them on the observed grid.

    spec_obs[n, l] = spec_rest[n](wave_obs[l] / (1 + z[n])), linear interpolation on the linear restframe grid;
    0 and valid False where wave_obs[l]/(1+z[n]) falls outside [wave_rest[0], wave_rest[-1]] (both ends
    included), or z[n] ≤ −1 or NaN.

    Parameters
    ----------
    spec_rest : (N, R) tensor, float16/bfloat16/float32/float64 — restframe spectra (any strides).
    z : (N,) tensor (or a scalar) — redshifts, on the same device; gradients flow to it.
    wave_rest : (R,) linear grid (tensor on the same device, or array), Å.
    wave_obs : (L,) strictly increasing observed grid (tensor or array), Å.
    deterministic : bool, optional — Triton backward without atomics (default:
        torch.are_deterministic_algorithms_enabled()). numba and torch are always deterministic.

    Returns
    -------
    spec_obs : (N, L) tensor in spec_rest's dtype; valid : (N, L) bool tensor.
    """
    fn = "resample"
    x = _check_spec(spec_rest, "spec_rest", fn)
    z = _check_z(z, "z", fn, x)
    c, lam0, dlam = _rest_grid(x, wave_rest, wave_obs, fn)
    backend = _backend_for(x.device.type)
    det = _deterministic(deterministic)
    if backend != "torch" and _eager():
        co = _eager_coeffs(x, backend, _REST, z, None, lam0, dlam)
        return _ResampleFn.apply(x, z, None, _eager_grid(x, backend, c), co, backend, det)
    co = _rest_coeffs(z.to(torch.float64), lam0, dlam, derivs=False)
    if backend == "torch":
        return ref.resample_index(x, c, co.a, co.b)
    return torch.ops.fastspec.resample_fwd(x, c, co.a, co.b, backend, det)


def resample_loss(spec_rest, z, wave_rest, wave_obs, y, w, *, deterministic=None):
    """Per-spectrum weighted squared residual of the resampled model, without materialising it.

    loss[n] = Σ_l w[n,l]·valid[n,l]·(y[n,l] − spec_obs[n,l])² with (spec_obs, valid) = resample(...);
    pixels with w = 0 are skipped even where y is NaN. Returns (N,) float32 (float64 for float64 spec_rest).
    Gradients flow to spec_rest and z (and to y, w if they require them). Arguments as in `resample`; y and w
    are (N, L) on the observed grid.
    """
    fn = "resample_loss"
    x = _check_spec(spec_rest, "spec_rest", fn)
    z = _check_z(z, "z", fn, x)
    c, lam0, dlam = _rest_grid(x, wave_rest, wave_obs, fn)
    L = c.shape[0]
    y = _check_data(y, "y", fn, x, L)
    w = _check_data(w, "w", fn, x, L)
    backend = _backend_for(x.device.type)
    det = _deterministic(deterministic)
    if backend != "torch" and _eager():
        co = _eager_coeffs(x, backend, _REST, z, None, lam0, dlam)
        return _ResampleLossFn.apply(x, z, y, w, _eager_grid(x, backend, c), co, backend, det)
    co = _rest_coeffs(z.to(torch.float64), lam0, dlam, derivs=False)
    if backend == "torch":
        return ref.resample_loss_index(x, c, co.a, co.b, y, w)
    return torch.ops.fastspec.resample_loss_fwd(x, c, co.a, co.b, y, w, backend, det)


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
    z = _check_z(z, "z", fn, x)
    z_new = _check_z(z_new, "z_new", fn, x)
    L = x.shape[1]
    if len(wave_obs) != L:
        raise ValueError(f"{fn}: spec_obs has {L} pixels per spectrum but wave_obs has {len(wave_obs)}")
    if _compiling():
        if loglinear is None:
            raise ValueError(f"{fn}: under torch.compile pass loglinear=True/False (grid detection reads data)")
        start, step, c = _grid_traced(wave_obs, x.device, bool(loglinear))
    else:
        kind = "auto" if loglinear is None else ("loglinear" if loglinear else "linear")
        grid = _grid(wave_obs, "wave_obs", fn, x.device, kind, 2)
        loglinear, start, step, c = grid.loglinear, grid.start, grid.step, grid.c
    backend = _backend_for(x.device.type)
    det = _deterministic(deterministic)
    if backend != "torch" and _eager():
        co = _eager_coeffs(x, backend, _OBS_LOG if loglinear else _OBS_LIN, z, z_new, start, step)
        return _ResampleFn.apply(x, z, z_new, _eager_grid(x, backend, c), co, backend, det)
    co = _obs_coeffs(z.to(torch.float64), z_new.to(torch.float64), loglinear, start, step, derivs=False)
    if backend == "torch":
        return ref.resample_index(x, c, co.a, co.b)
    return torch.ops.fastspec.resample_fwd(x, c, co.a, co.b, backend, det)


def triton_compile_specs(dtype: str) -> list[tuple]:
    """(name, kernel, signature, constexprs) of every resample Triton kernel, for dtype 'fp32'/'fp16'/'bf16'."""
    from .resample_triton import triton_compile_specs as specs

    return specs(dtype)

