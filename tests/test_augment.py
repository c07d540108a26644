"""Augmentation against an independent numpy computation (np.interp on the instrument's float64 pixel
coordinate, weights per the documented rules), plus the statistics and seeding of noise and masking."""
import numpy as np
import pytest
import torch
from fastspec.kernels import use_backend

from fastspec.augment import add_noise, augment, random_mask, redshift_augment
from fastspec.instruments import get_instrument

TOL = 1e-3  # bad_tolerance default


def smooth_batch(L, n=3, seed=0):
    """Smooth spectra (features over tens of pixels) with a masked stretch holding garbage flux."""
    rng = np.random.default_rng(seed)
    pix = np.arange(L)
    y = np.stack([1 + 0.3 * np.sin(2 * np.pi * pix / rng.uniform(30, 60) + rng.uniform(0, 6))
                  + 0.2 * np.cos(2 * np.pi * pix / rng.uniform(60, 120)) for _ in range(n)])
    w = rng.uniform(0.5, 2.0, (n, L))
    w[:, L // 3: L // 3 + 7] = 0
    y[:, L // 3: L // 3 + 7] = 50.0  # garbage where masked
    if n > 1:
        w[1, L // 2] = 0  # an isolated bad pixel
    return y, w


def reference(inst, y, w, z, z_new, mode):
    L = inst.L
    wave = inst.wave_obs
    y_out, w_out = np.zeros_like(y), np.zeros_like(w)
    for n in range(len(y)):
        u = inst.coordinate(wave * (1 + z[n]) / (1 + z_new[n]))  # source pixel coordinate
        valid = (u >= 0) & (u <= L - 1)
        uc = np.clip(u, 0, L - 1)
        y_out[n] = np.where(valid, np.interp(uc, np.arange(L), y[n]), 0)
        if mode == "linear":
            w_out[n] = np.where(valid, np.interp(uc, np.arange(L), w[n]), 0)
            continue
        i = np.minimum(np.floor(uc).astype(int), L - 2)
        t = uc - i
        bad = w[n] == 0
        share = (1 - t) * bad[i] + t * bad[i + 1]
        var = np.where(bad, 0.0, 1 / np.where(bad, 1, w[n]))
        var_new = (1 - t) * var[i] + t * var[i + 1]
        keep = valid & (share <= TOL) & (var_new > 0)
        w_out[n] = np.where(keep, 1 / np.where(keep, var_new, 1), 0)
    return y_out, w_out


@pytest.mark.parametrize("name, mode, backend", [
    ("sdss", "variance", "auto"), ("sdss", "linear", "torch"), ("desi", "variance", "torch"),
    ("desi", "linear", "auto"),
])
def test_redshift_augment_matches_reference(name, mode, backend):
    inst = get_instrument(name)
    y, w = smooth_batch(inst.L)
    # redshifts are float32 tensors; the reference takes their exact values
    z = np.array([0.05, 0.2, 0.4], dtype=np.float32).astype(np.float64)
    z_new = np.array([0.3, 0.0, 0.45], dtype=np.float32).astype(np.float64)
    with use_backend(backend):
        y2, w2, z2 = redshift_augment(torch.tensor(y, dtype=torch.float32), torch.tensor(w, dtype=torch.float32),
                                      torch.tensor(z), z_new=torch.tensor(z_new), instrument=name,
                                      ivar_interp=mode)
    y_ref, w_ref = reference(inst, y, w, z, z_new, mode)
    np.testing.assert_array_equal(z2.numpy(), z_new)
    np.testing.assert_allclose(y2.numpy(), y_ref, atol=2e-5 * np.abs(y).max())
    # weights: same zero pattern (away from sub-ulp ties of the bad-share threshold), same values
    np.testing.assert_array_equal(w2.numpy() > 0, w_ref > 0)
    np.testing.assert_allclose(w2.numpy(), w_ref, rtol=2e-4, atol=1e-6)
    assert (w_ref == 0).sum() > 0 and (w_ref > 0).sum() > 0


def test_masked_pixels_spread_to_the_pixels_they_feed_only_in_variance_mode():
    inst = get_instrument("sdss")
    y, w = smooth_batch(inst.L, n=1)
    args = (torch.tensor(y, dtype=torch.float32), torch.tensor(w, dtype=torch.float32), 0.1)
    z_new = 1.1 * 10**0.5e-4 - 1  # moves every pixel by half a pixel
    _, w_var, _ = redshift_augment(*args, z_new=z_new, instrument="sdss")
    _, w_lin, _ = redshift_augment(*args, z_new=z_new, instrument="sdss", ivar_interp="linear")
    # every output pixel mixes two inputs half and half: the 7 masked inputs feed 8 outputs, all masked with
    # the variance rule; linear interpolation of ivar masks only the 6 made of masked inputs alone
    around = slice(inst.L // 3 - 10, inst.L // 3 + 20)
    assert int((w_var[0, around] == 0).sum()) == 8
    assert int((w_lin[0, around] == 0).sum()) == 6


def test_unchanged_redshift_is_the_identity():
    inst = get_instrument("sdss")
    y, w = smooth_batch(inst.L)
    z = torch.tensor([0.05, 0.2, 0.4])
    y2, w2, _ = redshift_augment(torch.tensor(y, dtype=torch.float32), torch.tensor(w, dtype=torch.float32), z,
                                 z_new=z, instrument="sdss")
    np.testing.assert_allclose(y2.numpy(), y, atol=1e-4)
    np.testing.assert_allclose(w2.numpy(), w, rtol=1e-3)
    np.testing.assert_array_equal(w2.numpy() == 0, w == 0)


def test_pixels_from_outside_the_observed_range_are_zeroed():
    inst = get_instrument("sdss")
    y, w = smooth_batch(inst.L, n=1)
    y2, w2, _ = redshift_augment(torch.tensor(y, dtype=torch.float32), torch.tensor(w, dtype=torch.float32),
                                 0.3, z_new=0.0, instrument="sdss")
    outside = inst.wave_obs * 1.3 > inst.wave_max
    assert outside.sum() > 1000
    assert (y2[0, outside] == 0).all() and (w2[0, outside] == 0).all()
    assert (y2[0, ~outside] != 0).all()


def test_random_redshifts_are_seeded_and_in_range():
    inst = get_instrument("sdss")
    y, w = (torch.tensor(a, dtype=torch.float32) for a in smooth_batch(inst.L, n=3))
    z = torch.tensor([0.1, 0.2, 0.3])
    runs = [redshift_augment(y, w, z, generator=torch.Generator().manual_seed(s), z_max=0.4) for s in (5, 5, 6)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][2], runs[1][2])
    assert not torch.equal(runs[0][2], runs[2][2])
    zs = redshift_augment(y.repeat(100, 1), w.repeat(100, 1), z.repeat(100), z_max=0.4,
                          generator=torch.Generator().manual_seed(1))[2]
    assert zs.min() >= 0 and zs.max() <= 0.4 and zs.std() > 0.1


def test_add_noise_statistics_and_weights():
    g = torch.Generator().manual_seed(0)
    n, L = 4, 20000
    y = 1 + torch.rand(n, L, generator=g)
    w = torch.rand(n, L, generator=g) + 0.5
    w[:, :100] = 0
    y2, w2 = add_noise(y, w, generator=torch.Generator().manual_seed(1), amplitude=0.2, fraction=0.25)
    hit = y2 != y
    sigma = 0.2 * y.amax(1)
    assert abs(hit.float().mean().item() - 0.25) < 0.01
    for k in range(n):
        d = (y2[k] - y[k])[hit[k]]
        assert abs(d.std().item() / sigma[k].item() - 1) < 0.05 and abs(d.mean().item()) < 0.01
    expect = torch.where(hit, 1 / (1 / w + sigma[:, None] ** 2), w)
    ok = w > 0
    torch.testing.assert_close(w2[ok], expect[ok])
    assert (w2[~ok] == 0).all()
    again = add_noise(y, w, generator=torch.Generator().manual_seed(1), amplitude=0.2, fraction=0.25)
    assert torch.equal(again[0], y2) and torch.equal(again[1], w2)


@pytest.mark.parametrize("per_spectrum", [True, False])
def test_random_mask_zeroes_one_window(per_spectrum):
    g = torch.Generator().manual_seed(0)
    y, w = torch.rand(6, 200, generator=g) + 1, torch.rand(6, 200, generator=g) + 1
    y2, w2 = random_mask(y, w, generator=torch.Generator().manual_seed(3), fraction=0.1, per_spectrum=per_spectrum)
    starts = []
    for k in range(6):
        gone = torch.nonzero(y2[k] == 0).flatten()
        assert len(gone) == 20 and (gone.diff() == 1).all()
        assert torch.equal(torch.nonzero(w2[k] == 0).flatten(), gone)
        keep = torch.ones(200, dtype=torch.bool)
        keep[gone] = False
        assert torch.equal(y2[k, keep], y[k, keep]) and torch.equal(w2[k, keep], w[k, keep])
        starts.append(int(gone[0]))
    assert (len(set(starts)) > 1) is per_spectrum


def test_augment_pipeline_is_reproducible():
    inst = get_instrument("sdss")
    y, w = (torch.tensor(a, dtype=torch.float32) for a in smooth_batch(inst.L))
    z = torch.tensor([0.1, 0.2, 0.3])

    def run():
        return augment(y, w, z, generator=torch.Generator().manual_seed(9), noise=True, mask=True)

    a, b = run(), run()
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert not torch.equal(a[2], z)


def test_errors_are_clear():
    y = torch.ones(2, 100)
    with pytest.raises(ValueError, match="100 pixels: pass wave_obs= or instrument="):
        redshift_augment(y, y, torch.zeros(2), z_new=0.1)
    with pytest.raises(ValueError, match="ivar_interp"):
        redshift_augment(y, y, torch.zeros(2), z_new=0.1, wave_obs=np.linspace(4000, 5000, 100), ivar_interp="x")
    with pytest.raises(ValueError, match=r"z_new must have shape \(2,\)"):
        redshift_augment(y, y, torch.zeros(2), z_new=torch.zeros(3), wave_obs=np.linspace(4000, 5000, 100))
    with pytest.raises(ValueError, match="same shape|both have shape"):
        add_noise(y, torch.ones(2, 99))
