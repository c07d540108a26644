"""fastspec.restframe: observed spectra on a restframe grid against np.interp in float64, and the weighted
mean spectrum the decoder starts from."""
import numpy as np

from fastspec.instruments import get_instrument
from fastspec.restframe import mean_spectrum, to_restframe

SDSS = get_instrument("sdss")


def test_to_restframe_matches_numpy_interpolation_and_drops_masked_and_outside_pixels():
    rng = np.random.default_rng(0)
    wave_obs = SDSS.wave_obs
    wave_rest = SDSS.wave_rest(0.5)
    n = 5
    z = np.array([0.0, 0.05, 0.2, 0.37, 0.5])
    y = rng.normal(1, 0.2, (n, wave_obs.size)).astype(np.float32)
    w = rng.uniform(50, 150, (n, wave_obs.size)).astype(np.float32)
    w[1, 1000:1010] = 0
    x, v = to_restframe(y, w, z, wave_obs, wave_rest)
    for i in range(n):
        lam = wave_rest * (1 + z[i])
        inside = (lam >= wave_obs[0]) & (lam <= wave_obs[-1])
        ref = np.interp(lam, wave_obs, y[i].astype(np.float64))
        # every weighted pixel equals the float64 interpolation; every pixel outside has zero weight
        good = v[i] > 0
        np.testing.assert_allclose(x[i, good], ref[good], rtol=2e-6, atol=2e-6)
        assert not good[~inside].any()
        if i != 1:
            assert good[inside].mean() > 0.999
    # restframe pixels that take a share of a masked observed pixel are dropped
    lam = wave_rest * 1.05
    touches = (lam > wave_obs[999]) & (lam < wave_obs[1010])
    assert touches.sum() > 5 and not (v[1, touches] > 0).any()
    # inverse-variance propagation: between equal weights, w' = 1/((1−t)/w + t/w) = w
    w_flat = np.full_like(w, 100.0)
    _, v2 = to_restframe(y, w_flat, z, wave_obs, wave_rest)
    np.testing.assert_allclose(v2[v2 > 0], 100.0, rtol=1e-5)


def test_mean_spectrum_is_the_inverse_variance_weighted_mean_in_the_restframe():
    """Two spectra of the same restframe shape at two redshifts with weights 1 and 3: where both cover a
    restframe pixel the mean is (x1 + 3·x2)/4; where only one does it is that one; outside both, the nearest
    covered value."""
    wave_obs = SDSS.wave_obs
    wave_rest = 10 ** np.linspace(np.log10(wave_obs[0] / 1.5), np.log10(wave_obs[-1]), 2000)
    shape = lambda lam: 1.0 + 0.3 * np.sin(lam / 300.0)  # noqa: E731 (a smooth restframe spectrum)
    z = np.array([0.05, 0.3])
    y = np.stack([shape(wave_obs / (1 + zi)) * (1 + i) for i, zi in enumerate(z)]).astype(np.float32)
    w = np.stack([np.full(wave_obs.size, 1.0), np.full(wave_obs.size, 3.0)]).astype(np.float32)
    mean = mean_spectrum(y, w, z, wave_obs, wave_rest)
    lo = [wave_obs[0] / (1 + zi) for zi in z]
    hi = [wave_obs[-1] / (1 + zi) for zi in z]
    both = (wave_rest > max(lo) + 2) & (wave_rest < min(hi) - 2)
    only_first = (wave_rest > min(hi) + 2) & (wave_rest < hi[0] - 2)
    exact = shape(wave_rest)
    np.testing.assert_allclose(mean[both], ((exact + 3 * 2 * exact) / 4)[both], rtol=2e-4)
    np.testing.assert_allclose(mean[only_first], exact[only_first], rtol=2e-4)
    below = wave_rest < min(lo) - 2
    assert below.any() and np.allclose(mean[below], mean[np.flatnonzero(~below)[0]])
    assert mean.dtype == np.float32 and mean.shape == wave_rest.shape
    np.testing.assert_array_equal(mean_spectrum(y, 0 * w, z, wave_obs, wave_rest), 1.0)
