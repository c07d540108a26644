"""Tests of the redshift-resample ops (kernels/resample*.py) against float64 references.

Each test body runs on numba, on the Triton kernels (interpreter without a GPU, CUDA when present) and, where
it says so, on the plain-torch index-arithmetic backend. The reference is spender's searchsorted formulation
in float64 (kernels/resample_ref.py) — wavelength arrays and torch.searchsorted, not index arithmetic — or an
analytic case (a spectrum linear in λ is interpolated exactly).
"""
import importlib

import numpy as np
import pytest
import torch
from fastspec.kernels import redshift_observed, resample, resample_loss, use_backend
from fastspec.kernels import resample_ref as ref
from fastspec.kernels.core import TOLERANCE
from kernel_testing import BACKENDS, HAS_CUDA, assert_close

from fastspec.instruments import Instrument, get_instrument

BACKENDS_AND_TORCH = BACKENDS + [("torch", "cpu")]

# A small SDSS-like log-linear observed grid (L = 160) and its linear restframe grid for z_max = 0.5 (R = 240).
MINI = Instrument("mini", start=3.58, step=1e-3, L=160, loglinear=True)
MINI_DESI = Instrument("mini-desi", start=3600.0, step=8.0, L=160, loglinear=False)
Z = [-0.05, 0.0, 0.2, 0.5, 2.0]  # below 0 (red end falls off the grid), in range, beyond the grid's range


@pytest.fixture(autouse=True)
def small_triton_blocks(monkeypatch):
    """Small Triton blocks so the small test grids still span several programs per row."""
    try:
        from fastspec.kernels import resample_triton
    except ImportError:  # pragma: no cover - triton is a test dependency
        return
    monkeypatch.setattr(resample_triton, "MAX_BLOCK_L", 64)
    monkeypatch.setattr(resample_triton, "MAX_BLOCK_J", 64)


def grids(inst=MINI, device="cpu", rest="linear"):
    """(wave_rest, wave_obs) float64 tensors: the instrument's observed grid and a restframe grid for
    z_max = 0.5, linear (spender's) or log-linear."""
    wave_obs = torch.as_tensor(inst.wave_obs, device=device)
    wave_rest = torch.as_tensor(inst.wave_rest(0.5) if rest == "linear" else log_rest_grid(inst), device=device)
    return wave_rest, wave_obs


def log_rest_grid(inst, z_max=0.5, step=5e-4):
    """A log-linear restframe grid 10**(ξ0 + j·step) from below wave_min/(1+z_max) to past wave_max; ξ0 is
    offset from the observed grid's pixels so that samples do not land on restframe pixels (kinks)."""
    xi0 = np.log10(inst.wave_min / (1 + z_max)) - 0.37 * step
    R = int(np.ceil((np.log10(inst.wave_max) - xi0) / step)) + 2
    return 10.0 ** (xi0 + step * np.arange(R))


def interp_log(x, z, wave_rest, wave_obs):
    """Independent float64 reference for a log-linear restframe grid: np.interp in log λ, row by row, and the
    valid mask (both ends included); rows with unusable z are all invalid."""
    x, z = np.asarray(x, np.float64), np.asarray(z, np.float64)
    lr, lo = np.log10(np.asarray(wave_rest)), np.log10(np.asarray(wave_obs))
    out, valid = np.zeros((len(z), len(lo))), np.zeros((len(z), len(lo)), bool)
    for n in range(len(z)):
        if not (np.isfinite(z[n]) and z[n] > -1):
            continue
        u = lo - np.log10(1 + z[n])
        valid[n] = (u >= lr[0]) & (u <= lr[-1])
        out[n] = np.where(valid[n], np.interp(u, lr, x[n]), 0.0)
    return torch.from_numpy(out), torch.from_numpy(valid)


def smooth_spectra(N, n, seed=0, dtype=torch.float32, device="cpu"):
    """Random spectra with structure on a few-pixel scale (white noise plus a smooth continuum)."""
    g = torch.Generator().manual_seed(seed)
    x = 1.0 + 0.3 * torch.randn(N, n, generator=g, dtype=torch.float64).cumsum(1) / n**0.5
    x += 0.2 * torch.randn(N, n, generator=g, dtype=torch.float64)
    return x.to(device=device, dtype=dtype)


def op_args(z, wave_rest, wave_obs):
    """(c, a, b) of the generic custom op for restframe → observed resampling on a linear restframe grid:
    u = λ_obs/((1+z)Δ) − λ0/Δ."""
    lam0 = float(wave_rest[0])
    dlam = float(wave_rest[-1] - wave_rest[0]) / (len(wave_rest) - 1)
    z = torch.as_tensor(z, dtype=torch.float64, device=wave_obs.device)
    return wave_obs.double(), 1.0 / ((1.0 + z) * dlam), torch.full_like(z, -lam0 / dlam)


def jvp_z(f, z):
    """∂f/∂z element-wise (each row depends only on its own z): a scale for the z-gradient tolerance."""
    return torch.func.jvp(f, (z,), (torch.ones_like(z),))[1]


# ---- resample ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend,device", BACKENDS_AND_TORCH)
def test_resample_forward_backward_vs_searchsorted(backend, device, dtype):
    wave_rest, wave_obs = grids(device=device)
    N, R, L = len(Z), wave_rest.numel(), wave_obs.numel()
    x = smooth_spectra(N, R, dtype=dtype, device=device).requires_grad_()
    z = torch.tensor(Z, dtype=torch.float32, device=device, requires_grad=True)
    g = torch.randn(N, L, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)

    x64 = x.detach().double().requires_grad_()
    z64 = z.detach().double().requires_grad_()
    y_ref, valid_ref = ref.resample_searchsorted(x64, z64, wave_rest, wave_obs)
    gx_ref, gz_ref = torch.autograd.grad((y_ref * g).sum(), (x64, z64))
    dydz = jvp_z(lambda zz: ref.resample_searchsorted(x64.detach(), zz, wave_rest, wave_obs)[0], z64.detach())

    with use_backend(backend):
        y, valid = resample(x, z, wave_rest, wave_obs)
        assert y.dtype == dtype and valid.dtype == torch.bool and y.shape == (N, L)
        gx, gz = torch.autograd.grad((y.double() * g).sum(), (x, z))

    # Inputs are exactly representable in float64: the mask must agree pixel for pixel.
    assert torch.equal(valid.cpu(), valid_ref.cpu())
    assert valid[0].any() and not valid[0].all(), "z < 0: the red end must be masked, the rest kept"
    assert not valid[-1].any() and (y[-1] == 0).all(), "z beyond the grid's range: all masked and zero"
    assert_close(y, y_ref, dtype, what="spec_obs")
    assert_close(gx, gx_ref, dtype, scale=g.abs().max() * 2, what="grad spec_rest")
    assert gx.dtype == dtype
    # z-gradient: sum over L terms of size |g·∂ŷ/∂z|; half-precision x enters rounded.
    assert_close(gz, gz_ref, dtype, scale=(g.abs() * dydz.abs()).sum(1).max(), what="grad z")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_resample_analytic_linear_spectrum_real_grid(backend, device):
    """On the real SDSS grids a spectrum linear in λ is interpolated exactly; ∂ŷ/∂z = −β·λ/(1+z)²."""
    inst = get_instrument("sdss")
    wave_rest, wave_obs = inst.wave_rest(0.5), inst.wave_obs  # numpy grids are accepted too
    alpha, beta = 2.0, 1e-3
    z = torch.tensor([0.0, 0.5], dtype=torch.float64, device=device, requires_grad=True)
    x = (alpha + beta * torch.as_tensor(wave_rest, device=device)).expand(2, -1).float().requires_grad_()
    with use_backend(backend):
        y, valid = resample(x, z, wave_rest, wave_obs, deterministic=False)
        y.sum().backward()
    lam = torch.as_tensor(wave_obs, device=device)
    expected = (alpha + beta * lam[None, :] / (1 + z.detach()[:, None]))
    assert valid.all(), "z in [0, z_max] keeps every observed pixel inside the restframe grid"
    assert_close(y, expected, 1e-6, what="linear spectrum")
    dz = (-beta * lam[None, :] / (1 + z.detach()[:, None]) ** 2).sum(1)
    assert_close(z.grad, dz, 1e-5, what="analytic z-gradient")


@pytest.mark.parametrize("inst,rest", [(MINI, "linear"), (MINI, "log"), (MINI_DESI, "log")],
                         ids=["linear-rest", "log-rest-log-obs", "log-rest-linear-obs"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_resample_gradcheck_float64(backend, device, inst, rest):
    wave_rest, wave_obs = grids(inst, device, rest)
    wave_rest, wave_obs = wave_rest[::4].contiguous(), wave_obs[::5].contiguous()  # L = 32, R = 60 (linear)
    x = smooth_spectra(2, wave_rest.numel(), dtype=torch.float64, device=device).requires_grad_()
    z = torch.tensor([0.0713, 0.3137], dtype=torch.float64, device=device, requires_grad=True)
    y = smooth_spectra(2, wave_obs.numel(), seed=3, dtype=torch.float64, device=device)
    w = torch.rand(2, wave_obs.numel(), dtype=torch.float64, device=device)
    dets = [False, True] if backend == "triton" else [False]
    with use_backend(backend):
        for det in dets:
            def spec_obs(x, z, det=det):
                return resample(x, z, wave_rest, wave_obs, deterministic=det)[0]

            def loss(x, z, det=det):
                return resample_loss(x, z, wave_rest, wave_obs, y, w, deterministic=det)

            assert torch.autograd.gradcheck(spec_obs, (x, z), eps=1e-7, atol=1e-6, fast_mode=True)
            assert torch.autograd.gradcheck(loss, (x, z), eps=1e-7, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_resample_deterministic_backward(backend, device):
    wave_rest, wave_obs = grids(device=device)
    x = smooth_spectra(2, wave_rest.numel(), device=device).requires_grad_()
    z = torch.tensor([0.05, 0.45], device=device, requires_grad=True)
    g = torch.randn(2, wave_obs.numel(), device=device)
    grads = []
    with use_backend(backend):
        for det in (True, True, False):
            y, _ = resample(x, z, wave_rest, wave_obs, deterministic=det)
            grads.append(torch.autograd.grad((y * g).sum(), (x, z)))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1]), "not bitwise repeatable"
    assert_close(grads[2][0], grads[0][0], 1e-6, what="scatter vs gather grad spec_rest")
    assert_close(grads[2][1], grads[0][1], 1e-5, what="scatter vs gather grad z")


# ---- resample_loss -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend,device", BACKENDS_AND_TORCH)
def test_resample_loss_vs_searchsorted(backend, device, dtype):
    wave_rest, wave_obs = grids(device=device)
    N, R, L = len(Z), wave_rest.numel(), wave_obs.numel()
    x = smooth_spectra(N, R, dtype=dtype, device=device).requires_grad_()
    z = torch.tensor(Z, dtype=torch.float64, device=device, requires_grad=True)
    gen = torch.Generator().manual_seed(5)
    y = (smooth_spectra(N, L, seed=2) + 0.1 * torch.randn(N, L, generator=gen)).to(device)
    w = torch.rand(N, L, generator=gen).to(device)
    w[:, ::7] = 0
    y[:, ::7] = float("nan")  # masked pixels may hold garbage: w = 0 skips them
    gl = torch.tensor([1.0, -0.5, 2.0, 0.3, 1.0], device=device)

    x64 = x.detach().double().requires_grad_()
    z64 = z.detach().clone().requires_grad_()
    loss_ref = ref.resample_loss_searchsorted(x64, z64, wave_rest, wave_obs, y.double(), w.double())
    gx_ref, gz_ref = torch.autograd.grad((loss_ref * gl).sum(), (x64, z64))

    with use_backend(backend):
        loss = resample_loss(x, z, wave_rest, wave_obs, y, w)
        assert loss.shape == (N,) and loss.dtype == torch.float32
        gx, gz = torch.autograd.grad((loss * gl).sum(), (x, z))
    assert loss[-1] == 0, "no valid pixel: zero loss"
    assert_close(loss, loss_ref, dtype, what="loss")
    assert_close(gx, gx_ref, dtype, what="grad spec_rest")
    assert_close(gz, gz_ref, 10 * TOLERANCE[dtype], what="grad z")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_resample_loss_equals_unfused(backend, device):
    """The fused loss equals Σ w·valid·(y − ŷ)² from `resample`; gradients to y and w come out too."""
    wave_rest, wave_obs = grids(MINI_DESI, device=device)
    x = smooth_spectra(3, wave_rest.numel(), device=device)
    z = torch.tensor([0.0, 0.2, 0.4], device=device)
    y = smooth_spectra(3, wave_obs.numel(), seed=7, device=device).requires_grad_()
    w = torch.rand(3, wave_obs.numel(), device=device).requires_grad_()
    with use_backend(backend):
        loss = resample_loss(x, z, wave_rest, wave_obs, y, w, deterministic=True)
        gy, gw = torch.autograd.grad(loss.sum(), (y, w))
        yhat, valid = resample(x, z, wave_rest, wave_obs)
    y2, w2 = y.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    unfused = (w2 * valid * (y2 - yhat.double()) ** 2).sum(1)
    gy2, gw2 = torch.autograd.grad(unfused.sum(), (y2, w2))
    assert_close(loss, unfused, 1e-5, what="loss")
    assert_close(gy, gy2, 1e-5, what="grad y")
    assert_close(gw, gw2, 1e-5, what="grad w")


# ---- redshift_observed -------------------------------------------------------------------------------------


@pytest.mark.parametrize("inst", [MINI, MINI_DESI], ids=["loglinear", "linear"])
@pytest.mark.parametrize("backend,device", BACKENDS_AND_TORCH)
def test_redshift_observed_vs_searchsorted(backend, device, inst):
    wave_obs = torch.as_tensor(inst.wave_obs, device=device)
    N, L = 4, wave_obs.numel()
    x = smooth_spectra(N, L, device=device).requires_grad_()
    # The z-gradient is one-sided where a sample lands exactly on a source pixel (a kink of the interpolant):
    # row 2 (z_new = z, the identity) does everywhere, and "round" ratios like 1.1/1.3 on a linear grid put
    # every 13th sample on a pixel, so the redshifts below are not round and row 2's gradient is not compared.
    z = torch.tensor([0.1137, 0.3091, 0.25, 0.2], dtype=torch.float64, device=device, requires_grad=True)
    z_new = torch.tensor([0.3013, 0.1071, 0.25, 1.5], dtype=torch.float64, device=device, requires_grad=True)
    g = torch.randn(N, L, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(device)
    g[2] = 0

    args64 = [t.detach().double().requires_grad_() for t in (x, z, z_new)]
    y_ref, valid_ref = ref.redshift_observed_searchsorted(*args64, wave_obs, loglinear=inst.loglinear)
    grads_ref = torch.autograd.grad((y_ref * g).sum(), args64)

    with use_backend(backend):
        y, valid = redshift_observed(x, z, z_new, wave_obs)
        grads = torch.autograd.grad((y.double() * g).sum(), (x, z, z_new))
    assert torch.equal(valid.cpu(), valid_ref.cpu())
    assert not valid[0].all() and not valid[1].all() and not valid[3].any(), "ends masked as they move"
    assert valid[2].all() and torch.equal(y[2], x[2].detach()), "z_new = z is the identity"
    assert_close(y, y_ref, 2e-5, what="spec_new")
    assert_close(grads[0], grads_ref[0], 2e-5, scale=2 * g.abs().max(), what="grad spec_obs")
    for k in (1, 2):
        assert_close(grads[k], grads_ref[k], 1e-4, what=f"grad {['z', 'z_new'][k - 1]}")


def test_redshift_observed_there_and_back_real_grid():
    """On the SDSS log-linear grid, a redshift change with (1+z)/(1+z_new) = 10**(k·step) is an exact shift by
    k pixels: spec_new[l] = spec_obs[l + k], and the k pixels shifted in from outside the grid are masked."""
    inst = get_instrument("sdss")
    x = smooth_spectra(2, inst.L)
    z = torch.tensor([0.1, 0.2], dtype=torch.float64)
    # (1+z)/(1+z_new) = 10**(k·step): an exact shift by k pixels
    k = torch.tensor([7.0, -31.0], dtype=torch.float64)
    z_new = (1 + z) / 10 ** (k * inst.step) - 1
    y, valid = redshift_observed(x, z, z_new, inst.wave_obs)
    for n in range(2):
        s = int(k[n])
        expect = torch.roll(x[n], -s)
        keep = valid[n].clone()
        # the pixel landing exactly on the grid's end may fall either side by rounding
        assert inst.L - abs(s) - 1 <= keep.sum() <= inst.L - abs(s)
        assert_close(y[n][keep], expect[keep], 1e-5, what="integer pixel shift")


# ---- edge cases --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rest", ["linear", "log"])
@pytest.mark.parametrize("backend,device", BACKENDS_AND_TORCH)
def test_unusable_redshifts_are_masked_with_zero_gradients(backend, device, rest):
    wave_rest, wave_obs = grids(device=device, rest=rest)
    z = torch.tensor([float("nan"), -1.0, -3.0, float("inf"), 0.1], device=device, requires_grad=True)
    x = smooth_spectra(5, wave_rest.numel(), device=device).requires_grad_()
    y = torch.ones(5, wave_obs.numel(), device=device)
    with use_backend(backend):
        out, valid = resample(x, z, wave_rest, wave_obs)
        loss = resample_loss(x, z, wave_rest, wave_obs, y, torch.ones_like(y))
        (out.sum() + loss.sum()).backward()
        moved, mvalid = redshift_observed(y, z, torch.zeros_like(z), wave_obs)
    assert not valid[:4].any() and (out[:4] == 0).all() and valid[4].any()
    assert (loss[:4] == 0).all()
    assert not mvalid[:4].any() and mvalid[4].any()
    assert torch.isfinite(x.grad).all() and (x.grad[:4] == 0).all()
    assert torch.isfinite(z.grad).all() and (z.grad[:4] == 0).all()


@pytest.mark.parametrize("N", [1, 2, 3, 5, 8, 21])
def test_numba_loss_backward_rows_without_gradient(N):
    """Rows whose upstream loss gradient is 0 get zero gradients even where their y is NaN at weighted
    pixels (the numba backward does not walk them); every other row matches the float64 reference. Batch
    sizes and patterns of such rows cover every position in the kernels' chunks of rows and pairs of rows."""
    wave_rest, wave_obs = grids()
    R, L = wave_rest.numel(), wave_obs.numel()
    gen = torch.Generator().manual_seed(11)
    x = smooth_spectra(N, R, seed=3).requires_grad_()
    z = (torch.rand(N, generator=gen, dtype=torch.float64) * 0.6 - 0.05).requires_grad_()
    g = torch.randn(N, L, generator=gen, dtype=torch.float64)
    w = torch.rand(N, L, generator=gen)
    rows = torch.arange(N)
    patterns = [rows < 0, rows % 2 == 0, rows % 2 == 1, rows // 2 % 2 == 0, (rows + 1) // 2 % 2 == 0, rows == N - 1,
                rows < N]
    x64, z64 = x.detach().double().requires_grad_(), z.detach().clone().requires_grad_()
    y_ref, _ = ref.resample_searchsorted(x64, z64, wave_rest, wave_obs)
    gx_ref, gz_ref = torch.autograd.grad((y_ref * g).sum(), (x64, z64))
    with use_backend("numba"):
        yhat, _ = resample(x, z, wave_rest, wave_obs)
        gx, gz = torch.autograd.grad((yhat.double() * g).sum(), (x, z))
    assert_close(gx, gx_ref, 2e-5, scale=g.abs().max() * 2, what="grad spec_rest")
    assert_close(gz, gz_ref, 1e-4, scale=gz_ref.abs().max(), what="grad z")

    for dead in patterns:
        y = smooth_spectra(N, L, seed=4)
        y[dead, 10] = float("nan")
        gl = torch.randn(N, generator=gen)
        gl[dead] = 0.0
        y_live = y.double().clone()
        y_live[dead] = 0.0
        loss_ref = ref.resample_loss_searchsorted(x64, z64, wave_rest, wave_obs, y_live, w.double())
        lx_ref, lz_ref = torch.autograd.grad((loss_ref * gl.double()).sum(), (x64, z64))
        with use_backend("numba"):
            loss = resample_loss(x, z, wave_rest, wave_obs, y, w)
            lx, lz = torch.autograd.grad((loss * gl).sum(), (x, z))
        assert torch.isfinite(lx).all() and torch.isfinite(lz).all()
        assert (lx[dead] == 0).all() and (lz[dead] == 0).all(), dead
        live = ~dead
        if live.any():
            assert_close(lx[live], lx_ref[live], 2e-5, scale=lx_ref.abs().max(), what="loss grad spec_rest")
            assert_close(lz[live], lz_ref[live], 1e-4, scale=lz_ref.abs().max(), what="loss grad z")


@pytest.mark.parametrize("backend,device", BACKENDS_AND_TORCH)
def test_empty_batch(backend, device):
    wave_rest, wave_obs = grids(device=device)
    x = torch.zeros(0, wave_rest.numel(), device=device, requires_grad=True)
    z = torch.zeros(0, device=device, requires_grad=True)
    y = torch.zeros(0, wave_obs.numel(), device=device)
    with use_backend(backend):
        out, valid = resample(x, z, wave_rest, wave_obs)
        loss = resample_loss(x, z, wave_rest, wave_obs, y, y)
        (out.sum() + loss.sum()).backward()
        moved, _ = redshift_observed(y, z, z, wave_obs)
    assert out.shape == (0, wave_obs.numel()) and valid.shape == out.shape and loss.shape == (0,)
    assert x.grad.shape == x.shape and z.grad.shape == (0,) and moved.shape == y.shape


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_inputs(backend, device):
    wave_rest, wave_obs = grids(device=device)
    R, L = wave_rest.numel(), wave_obs.numel()
    big = smooth_spectra(R, 6, device=device).t()  # (6, R), column-major
    x = big[::2]  # (3, R), strided both ways
    z = torch.tensor([0.1, 9.0, 0.2, 9.0, 0.4, 9.0], device=device)[::2]
    y = smooth_spectra(L, 3, seed=1, device=device).t()
    w = torch.rand(L, 3, device=device).t()
    assert not (x.is_contiguous() or z.is_contiguous() or y.is_contiguous())
    with use_backend(backend):
        out, valid = resample(x, z, wave_rest, wave_obs)
        out_c, valid_c = resample(x.contiguous(), z.contiguous(), wave_rest, wave_obs)
        loss = resample_loss(x, z, wave_rest, wave_obs, y, w)
        loss_c = resample_loss(x.contiguous(), z.contiguous(), wave_rest, wave_obs, y.contiguous(), w.contiguous())
        moved = redshift_observed(y, z, z.flip(0), wave_obs)[0]
        moved_c = redshift_observed(y.contiguous(), z.contiguous(), z.flip(0).contiguous(), wave_obs)[0]
    assert torch.equal(out, out_c) and torch.equal(valid, valid_c)
    assert torch.allclose(loss, loss_c, rtol=1e-6) and torch.equal(moved, moved_c)


def test_bad_input_errors():
    wave_rest, wave_obs = grids()
    R, L = wave_rest.numel(), wave_obs.numel()
    x = torch.ones(2, R)
    z = torch.zeros(2)
    y = torch.ones(2, L)
    with pytest.raises(ValueError, match=r"resample: z must have shape \(2,\)"):
        resample(x, torch.zeros(3), wave_rest, wave_obs)
    with pytest.raises(ValueError, match=f"spec_rest has {R} pixels per spectrum but wave_rest has {R - 1}"):
        resample(x, z, wave_rest[:-1], wave_obs)
    with pytest.raises(ValueError, match=r"spec_rest must have shape \(N, pixels\)"):
        resample(torch.ones(R), z, wave_rest, wave_obs)
    with pytest.raises(TypeError, match="spec_rest must be float16, bfloat16, float32 or float64; got torch.int64"):
        resample(torch.ones(2, R, dtype=torch.int64), z, wave_rest, wave_obs)
    with pytest.raises(ValueError, match="wave_rest is not a linear or log-linear grid"):
        resample(x, z, torch.as_tensor(np.sort(np.random.default_rng(1).uniform(2500, 9000, R))), wave_obs)
    with pytest.raises(ValueError, match=r"wave_obs must increase strictly.*wave_obs\[6\]"):
        resample(x, z, wave_rest, torch.cat([wave_obs[:6], wave_obs[5:-1]]))
    with pytest.raises(ValueError, match=r"wave_obs\[0\] = nan is not a positive finite wavelength"):
        resample(x, z, wave_rest, torch.cat([torch.tensor([float("nan")], dtype=torch.float64), wave_obs[1:]]))
    with pytest.raises(ValueError, match="z is on meta but spec_rest is on cpu"):
        resample(x, torch.zeros(2, device="meta"), wave_rest, wave_obs)
    with pytest.raises(ValueError, match="wave_rest is on meta but spec_rest is on cpu"):
        resample(x, z, wave_rest.to("meta"), wave_obs)
    with pytest.raises(ValueError, match=rf"resample_loss: w must have shape \(2, {L}\)"):
        resample_loss(x, z, wave_rest, wave_obs, y, torch.ones(2, L - 1))
    with pytest.raises(ValueError, match="resample_loss: y is on meta but spec_rest is on cpu"):
        resample_loss(x, z, wave_rest, wave_obs, y.to("meta"), y)
    with pytest.raises(ValueError, match="redshift_observed: wave_obs is not a linear or log-linear grid"):
        redshift_observed(y, z, z, np.sort(np.random.default_rng(0).uniform(4000, 9000, L)))
    with pytest.raises(ValueError, match="redshift_observed: wave_obs is not a linear grid"):
        redshift_observed(y, z, z, wave_obs, loglinear=False)
    with pytest.raises(ValueError, match=f"spec_obs has {L} pixels per spectrum but wave_obs has {R}"):
        redshift_observed(y, z, z, wave_rest)


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter-only guard test; CUDA runs the same launchers above")
def test_triton_launchers_stay_in_bounds():
    """Out-of-bounds accesses are not detected by the interpreter: run the launchers on views into larger
    buffers and check that the guard regions are untouched (writes) and that NaN guards are never read."""
    rt = importlib.import_module("fastspec.kernels.resample_triton")
    wave_rest, wave_obs = grids()
    wave_rest, wave_obs = wave_rest[::2].contiguous(), wave_obs[::2].contiguous()
    N, R, L = 3, wave_rest.numel(), wave_obs.numel()
    xbuf = torch.full((N + 2, R + 2), float("nan"))
    x = xbuf[1:-1, 1:-1]
    x.copy_(smooth_spectra(N, R))
    xbuf_flat = torch.full(((N + 2) * R,), float("nan"))
    xc = xbuf_flat[R:-R].view(N, R)  # contiguous rows with NaN before and after
    xc.copy_(x)
    c, a, b = op_args([-0.05, 0.2, 0.5], wave_rest, wave_obs)
    out_buf = torch.full(((N + 2) * L,), -7.0)
    valid_buf = torch.ones(((N + 2) * L,), dtype=torch.bool)
    out = out_buf[L:-L].view(N, L)
    valid = valid_buf[L:-L].view(N, L)
    rt.resample_fwd(xc, c, a, b, out=out, valid=valid)
    assert (out_buf[:L] == -7).all() and (out_buf[-L:] == -7).all()
    assert valid_buf[:L].all() and valid_buf[-L:].all()
    assert torch.isfinite(out).all(), "a NaN guard pixel was read"
    y_ref, v_ref = ref.resample_index(xc.double(), c, a, b)
    assert torch.equal(valid, v_ref) and torch.allclose(out.double(), y_ref, atol=1e-5)
    g = torch.randn(N, L)
    for det in (False, True):
        gx, gab = rt.resample_bwd(g, xc, c, a, b, True, det)
        assert gx.shape == (N, R) and torch.isfinite(gx).all() and torch.isfinite(gab).all()
        gx, gab = rt.resample_loss_bwd(torch.ones(N), xc, c, a, b, torch.ones(N, L), torch.ones(N, L), True, det)
        assert torch.isfinite(gx).all() and torch.isfinite(gab).all()


# ---- log-linear restframe grids ----------------------------------------------------------------------------


@pytest.mark.parametrize("inst", [MINI, MINI_DESI], ids=["obs-loglinear", "obs-linear"])
@pytest.mark.parametrize("backend,device", BACKENDS_AND_TORCH)
def test_resample_loglinear_rest_vs_float64(backend, device, inst):
    """On a log-linear restframe grid the interpolation is linear in log λ: values against np.interp in log λ,
    gradients against spender's searchsorted formulation in log λ (float64, autograd), for a log-linear
    (SDSS-like) and a linear (DESI-like) observed grid."""
    wave_rest, wave_obs = grids(inst, device, rest="log")
    N, R, L = len(Z), wave_rest.numel(), wave_obs.numel()
    x = smooth_spectra(N, R, device=device).requires_grad_()
    z = torch.tensor([-0.0513, 0.0, 0.2137, 0.4871, 2.0], dtype=torch.float32, device=device, requires_grad=True)
    g = torch.randn(N, L, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    y_np, valid_np = interp_log(x.detach().cpu(), z.detach().cpu(), wave_rest.cpu(), wave_obs.cpu())

    x64, z64 = x.detach().double().requires_grad_(), z.detach().double().requires_grad_()
    y_ref, valid_ref = ref.resample_searchsorted(x64, z64, wave_rest, wave_obs, loglinear=True)
    gx_ref, gz_ref = torch.autograd.grad((y_ref * g).sum(), (x64, z64))
    dydz = jvp_z(lambda zz: ref.resample_searchsorted(x64.detach(), zz, wave_rest, wave_obs, True)[0], z64.detach())
    assert torch.equal(valid_ref.cpu(), valid_np) and torch.allclose(y_ref.detach().cpu(), y_np, atol=1e-12)

    with use_backend(backend):
        y, valid = resample(x, z, wave_rest, wave_obs)
        gx, gz = torch.autograd.grad((y.double() * g).sum(), (x, z))
    assert torch.equal(valid.cpu(), valid_np)
    assert valid[0].any() and not valid[0].all() and not valid[-1].any()
    assert_close(y, y_np, torch.float32, what="spec_obs")
    assert_close(gx, gx_ref, torch.float32, scale=g.abs().max() * 2, what="grad spec_rest")
    assert_close(gz, gz_ref, torch.float32, scale=(g.abs() * dydz.abs()).sum(1).max(), what="grad z")


@pytest.mark.parametrize("inst", [MINI, MINI_DESI], ids=["obs-loglinear", "obs-linear"])
@pytest.mark.parametrize("backend,device", BACKENDS_AND_TORCH)
def test_resample_loss_loglinear_rest_vs_float64(backend, device, inst):
    wave_rest, wave_obs = grids(inst, device, rest="log")
    N, R, L = len(Z), wave_rest.numel(), wave_obs.numel()
    x = smooth_spectra(N, R, device=device).requires_grad_()
    z = torch.tensor([-0.0513, 0.0, 0.2137, 0.4871, 2.0], dtype=torch.float64, device=device, requires_grad=True)
    gen = torch.Generator().manual_seed(5)
    y = (smooth_spectra(N, L, seed=2) + 0.1 * torch.randn(N, L, generator=gen)).to(device)
    w = torch.rand(N, L, generator=gen).to(device)
    w[:, ::7] = 0
    y[:, ::7] = float("nan")
    gl = torch.tensor([1.0, -0.5, 2.0, 0.3, 1.0], device=device)
    y_np, valid_np = interp_log(x.detach().cpu(), z.detach().cpu(), wave_rest.cpu(), wave_obs.cpu())
    m = valid_np & (w.cpu() != 0)
    loss_np = torch.where(m, w.cpu().double() * (y.cpu().double() - y_np) ** 2, 0.0).sum(1)

    x64, z64 = x.detach().double().requires_grad_(), z.detach().clone().requires_grad_()
    loss_ref = ref.resample_loss_searchsorted(x64, z64, wave_rest, wave_obs, y.double(), w.double(), True)
    gx_ref, gz_ref = torch.autograd.grad((loss_ref * gl).sum(), (x64, z64))
    with use_backend(backend):
        loss, wsum = resample_loss(x, z, wave_rest, wave_obs, y, w, return_weight=True)
        gx, gz = torch.autograd.grad((loss * gl).sum(), (x, z))
    assert_close(loss, loss_np, torch.float32, what="loss")
    assert_close(wsum, torch.where(m, w.cpu().double(), 0.0).sum(1), torch.float32, what="Σ w·valid")
    assert_close(gx, gx_ref, torch.float32, what="grad spec_rest")
    assert_close(gz, gz_ref, 10 * TOLERANCE[torch.float32], what="grad z")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_loglinear_rest_analytic_real_grid(backend, device):
    """On the SDSS grid with a restframe grid of the same log step, (1+z) = 10**(k·1e-4) shifts by exactly
    k pixels, and a spectrum linear in log λ is interpolated exactly with an analytic z-gradient."""
    inst = get_instrument("sdss")
    j0 = 500
    wave_rest = 10.0 ** (inst.start - j0 * inst.step + inst.step * np.arange(inst.L + j0))  # numpy grids too
    k = torch.tensor([7.0, 120.0, 333.0], dtype=torch.float64, device=device)
    z = (10 ** (k * inst.step) - 1).requires_grad_()
    alpha, beta = -11.4, 3.0  # centred on the grid: fp32 differences of neighbouring pixels keep their digits
    x = (alpha + beta * torch.log10(torch.as_tensor(wave_rest, device=device))).expand(3, -1).float()
    x.requires_grad_()
    with use_backend(backend):
        y, valid = resample(x, z, wave_rest, inst.wave_obs)
    assert valid.all()
    lo = torch.log10(torch.as_tensor(inst.wave_obs, device=device))
    expected = alpha + beta * (lo[None, :] - torch.log10(1 + z.detach())[:, None])
    assert_close(y, expected, 1e-6, what="spectrum linear in log λ")
    y.sum().backward()
    dz = -beta * inst.L / (np.log(10) * (1 + z.detach()))
    assert_close(z.grad, dz, 1e-5, scale=dz.abs().max(), what="analytic z-gradient")


@pytest.mark.parametrize("mode", ["REST_LIN", "REST_LOG", "OBS_LOG", "OBS_LIN"])
def test_numba_coefficients_match_torch(mode):
    """The numba eager route's coefficients and z-derivatives (one jitted call) equal the torch formulas the
    other routes use, for every op and grid type, unusable redshifts included."""
    from fastspec.kernels import resample_coeffs, resample_numba

    m = getattr(resample_coeffs, mode)
    start, step = (3.4, 5e-4) if "LOG" in mode else (2523.0, 1.16)
    z = torch.tensor([0.1, -0.5, 2.0, float("nan"), -1.0, float("inf"), 0.3], dtype=torch.float64)
    zn = torch.tensor([0.3, 0.0, 0.1, 0.2, 0.5, 0.1, -2.0], dtype=torch.float64)
    want = resample_coeffs.coefficients(m, z, None if "REST" in mode else zn, start, step, derivs=True)
    got = resample_numba.coefficients(m, z.numpy(), zn.numpy(), start, step)
    for name, a, b in zip(want._fields, got, want):
        b = torch.zeros_like(z) if b is None else b
        assert torch.allclose(torch.from_numpy(a), b, rtol=1e-14, atol=0, equal_nan=True), name


# ---- Σ w·valid from the fused loss -------------------------------------------------------------------------


@pytest.mark.parametrize("rest", ["linear", "log"])
@pytest.mark.parametrize("backend,device", BACKENDS_AND_TORCH)
def test_resample_loss_return_weight(backend, device, rest):
    """return_weight=True adds Σ_l w·valid from the same call: against the valid mask of spender's
    searchsorted formulation (independent of the kernels), with w = 0 pixels holding NaN data and an unusable
    redshift; it carries no gradient, and the loss is the default call's."""
    wave_rest, wave_obs = grids(MINI, device, rest=rest)
    N, R, L = 6, wave_rest.numel(), wave_obs.numel()
    gen = torch.Generator().manual_seed(8)
    x = smooth_spectra(N, R, device=device).requires_grad_()
    z = torch.tensor([-0.05, 0.0, 0.2, 0.5, 2.0, float("nan")], device=device, requires_grad=True)
    y = smooth_spectra(N, L, seed=2, device=device)
    w = (torch.rand(N, L, generator=gen) * 3).to(device)
    w[:, ::5] = 0
    y[:, ::5] = float("nan")
    zs = torch.where(torch.isfinite(z), z, 0.0).detach().double()
    _, valid_ref = ref.resample_searchsorted(x.detach().double(), zs, wave_rest, wave_obs, rest == "log")
    valid_ref[-1] = False
    wsum_ref = (w.double() * valid_ref).sum(1)
    with use_backend(backend):
        loss, wsum = resample_loss(x, z, wave_rest, wave_obs, y, w, return_weight=True)
        plain = resample_loss(x, z, wave_rest, wave_obs, y, w)
        (loss.sum() + wsum.sum()).backward()
    assert not wsum.requires_grad and wsum.dtype == loss.dtype == torch.float32 and wsum.shape == (N,)
    assert torch.equal(loss, plain)
    assert_close(wsum, wsum_ref, torch.float32, scale=wsum_ref.abs().max(), what="Σ w·valid")
    assert wsum[-2] == 0 and wsum[-1] == 0, "no valid pixel, unusable z: 0"
    assert torch.isfinite(x.grad).all() and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("backend,device", BACKENDS_AND_TORCH)
def test_return_weight_empty_batch_and_float64(backend, device):
    wave_rest, wave_obs = grids(device=device)
    x = torch.zeros(0, wave_rest.numel(), device=device)
    y = torch.zeros(0, wave_obs.numel(), device=device)
    with use_backend(backend):
        loss, wsum = resample_loss(x, torch.zeros(0, device=device), wave_rest, wave_obs, y, y, return_weight=True)
        assert loss.shape == wsum.shape == (0,)
        x64 = smooth_spectra(2, wave_rest.numel(), dtype=torch.float64, device=device)
        w = torch.rand(2, wave_obs.numel(), dtype=torch.float64, device=device)
        _, wsum = resample_loss(x64, torch.tensor([0.1, 0.3], device=device), wave_rest, wave_obs, x64[:, :1].expand(
            2, wave_obs.numel()), w, return_weight=True)
        _, valid = resample(x64, torch.tensor([0.1, 0.3], device=device), wave_rest, wave_obs)
    assert wsum.dtype == torch.float64
    assert_close(wsum, (w * valid).sum(1), 1e-12, scale=wsum.abs().max(), what="Σ w·valid, float64")


# ---- torch.library / torch.compile -------------------------------------------------------------------------


@pytest.mark.parametrize("impl,device", [("numba", "cpu"), ("triton", "cuda" if HAS_CUDA else "cpu")])
def test_opcheck(impl, device):
    wave_rest, wave_obs = grids(device=device)
    wave_rest, wave_obs = wave_rest[::4].contiguous(), wave_obs[::5].contiguous()
    N, R, L = 3, wave_rest.numel(), wave_obs.numel()
    x = smooth_spectra(N, R, device=device).requires_grad_()
    z = torch.tensor([0.1, 0.4, -0.02], dtype=torch.float64, device=device)
    c, a, b = op_args(z, wave_rest, wave_obs)
    a.requires_grad_()
    y, w = smooth_spectra(N, L, seed=2, device=device), torch.rand(N, L, device=device)
    ops = torch.ops.fastspec
    torch.library.opcheck(ops.resample_fwd.default, (x, c, a, b, impl, False))
    torch.library.opcheck(ops.resample_loss_fwd.default, (x, c, a, b, y, w, impl, False))
    xd, ad, g = x.detach(), a.detach(), torch.randn(N, L, device=device)
    torch.library.opcheck(ops.resample_bwd.default, (g, xd, c, ad, b, True, impl, True))
    torch.library.opcheck(ops.resample_loss_bwd.default, (torch.ones(N, device=device), xd, c, ad, b, y, w, True,
                                                           impl, False))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_compiled_route_matches_eager_route(backend, device):
    """Eager calls run the kernels through autograd.Functions (chain rule to the redshifts done inside);
    torch.compile goes through the torch.library custom ops (fake tensors, autograd over the z → (a, b)
    arithmetic). Both routes give the same values and gradients, for all three ops, linear and log-linear grids
    and Σ w·valid (aot_eager: the compiled route without inductor's code generation)."""
    wave_rest, wave_obs = grids(device=device)
    log_rest, desi_obs = grids(MINI_DESI, device, rest="log")
    N, R, L = 4, wave_rest.numel(), wave_obs.numel()
    gen = torch.Generator().manual_seed(5)
    x0 = smooth_spectra(N, R, device=device)
    xl0 = smooth_spectra(N, log_rest.numel(), seed=6, device=device)
    s0 = smooth_spectra(N, L, seed=2, device=device)
    z0 = torch.tensor([0.05, 0.2, float("nan"), 0.4], device=device)
    zn0 = torch.tensor([0.3, 0.0, 0.1, 0.2], device=device)
    y0, w0 = smooth_spectra(N, L, seed=3, device=device), torch.rand(N, L, generator=gen).to(device)
    g = torch.randn(N, L, generator=gen).to(device)

    def step(x, xl, s, z, zn, y, w):
        out, valid = resample(x, z, wave_rest, wave_obs)
        loss = resample_loss(x, z, wave_rest, wave_obs, y, w)
        out_log, valid_log = resample(xl, z, log_rest, desi_obs)
        loss_log, wsum = resample_loss(xl, z, log_rest, desi_obs, y, w, return_weight=True)
        moved, mvalid = redshift_observed(s, z, zn, wave_obs, loglinear=True)
        moved_lin, _ = redshift_observed(s, z, zn, desi_obs, loglinear=False)
        return out, valid, loss, out_log, valid_log, loss_log, wsum, moved, mvalid, moved_lin

    def run(fn):
        x, xl, s, z, zn, y, w = (t.clone().requires_grad_() for t in (x0, xl0, s0, z0, zn0, y0, w0))
        with use_backend(backend):
            vals = fn(x, xl, s, z, zn, y, w)
            out, _, loss, out_log, _, loss_log, _, moved, _, moved_lin = vals
            total = ((out + out_log + moved + moved_lin) * g).sum() + loss.sum() + loss_log.sum()
            grads = torch.autograd.grad(total, (x, xl, s, z, zn, y, w))
        return vals, grads

    vals_e, grads_e = run(step)
    torch.compiler.reset()  # the backend is read at trace time: trace anew for this one
    vals_c, grads_c = run(torch.compile(step, backend="aot_eager", fullgraph=True))
    for a, b in zip(vals_e, vals_c):
        assert torch.equal(a, b)
    for name, a, b in zip(["spec_rest", "spec_rest (log)", "spec_obs", "z", "z_new", "y", "w"], grads_e, grads_c):
        assert torch.isfinite(a).all(), name
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max())), name
    assert grads_e[3][2] == 0 and grads_e[4][2] == 0, "unusable redshift: zero gradient"


def test_torch_compile_cpu():
    """All three ops (forward and backward), linear and log-linear restframe grids and the loss over Σ w·valid
    in one compiled graph, no graph breaks, same numbers as eager."""
    wave_rest, wave_obs = grids()
    log_rest, _ = grids(rest="log")
    N, R, L = 3, wave_rest.numel(), wave_obs.numel()

    def step(x, xl, z, y, w, z_new):
        out, valid = resample(x, z, wave_rest, wave_obs)
        loss = resample_loss(x, z, wave_rest, wave_obs, y, w)
        chi2, wsum = resample_loss(xl, z, log_rest, wave_obs, y, w, return_weight=True)
        moved, mvalid = redshift_observed(y, z, z_new, wave_obs, loglinear=True)
        return (out * valid).square().sum() + loss.sum() + (chi2 / wsum).sum() + (moved * mvalid).sum()

    x = smooth_spectra(N, R).requires_grad_()
    xl = smooth_spectra(N, log_rest.numel(), seed=4).requires_grad_()
    z = torch.tensor([0.05, 0.2, 0.4], requires_grad=True)
    y, w = smooth_spectra(N, L, seed=2), torch.rand(N, L)
    z_new = torch.tensor([0.3, 0.0, 0.1])
    with use_backend("numba"):
        compiled = torch.compile(step, fullgraph=True)
        val = compiled(x, xl, z, y, w, z_new)
        gx, gxl, gz = torch.autograd.grad(val, (x, xl, z))
        val_e = step(x, xl, z, y, w, z_new)
        gx_e, gxl_e, gz_e = torch.autograd.grad(val_e, (x, xl, z))
    assert torch.allclose(val, val_e, rtol=1e-5)
    assert torch.allclose(gx, gx_e, rtol=1e-5, atol=1e-6) and torch.allclose(gz, gz_e, rtol=1e-5)
    assert torch.allclose(gxl, gxl_e, rtol=1e-5, atol=1e-6)
