"""Mock spectra: reproducibility, normalisation, noise, lines, dust, masks, z distribution, DESI, file, CLI.

The checks are independent of the generator's code paths: the observed model is recomputed from the restframe
truth with np.interp, the normalisation median and the window are recomputed here, line fluxes and widths
are measured on the restframe truth, the Calzetti curve is coded here from the paper, and the raw kcorrect
templates are read with astropy.
"""
import math

import numpy as np
import pytest

from fastspec import cli
from fastspec.h5format import SpectraFile
from fastspec.instruments import get_instrument
from fastspec.mock import (
    CHUNK,
    LINE_NAMES,
    LINE_WAVE,
    MockError,
    make_mock,
    stellar_templates,
    write_mock,
)
from fastspec.prep import normalization

C_KMS = 299792.458
LINE = {n: i for i, n in enumerate(LINE_NAMES)}


@pytest.fixture(scope="module")
def sdss():
    return make_mock(CHUNK, instrument="sdss", seed=11, observed_truth=True)


@pytest.fixture(scope="module")
def desi():
    return make_mock(200, instrument="desi", seed=4)


def _resampled_truth(m):
    """The noiseless observed spectrum recomputed from truth/spec_rest at λ_obs/(1+z) (independent np.interp)."""
    return np.stack([np.interp(m.wave_obs / (1 + z), m.wave_rest, s) for z, s in zip(m.z, m.truth["spec_rest"])])


def _calzetti(wave):
    # Calzetti et al. (2000) eq. 4, with the red branch lowered by its 0.025 jump at 0.63 μm (as documented).
    lam = wave * 1e-4
    if lam < 0.63:
        return 2.659 * (-2.156 + 1.509 / lam - 0.198 / lam**2 + 0.011 / lam**3) + 4.05
    jump = 2.659 * (-1.857 + 1.040 / 0.63) - 2.659 * (-2.156 + 1.509 / 0.63 - 0.198 / 0.63**2 + 0.011 / 0.63**3)
    return 2.659 * (-1.857 + 1.040 / lam) + 4.05 - jump


def test_same_seed_same_bytes_other_seed_differs():
    a = make_mock(40, seed=3, restframe_truth=False)
    b = make_mock(40, seed=3, restframe_truth=False)
    c = make_mock(40, seed=4, restframe_truth=False)
    for name in ("flux", "ivar", "mask", "z", "z_err", "object_id", "norm"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name
    for k in a.truth:
        assert a.truth[k].tobytes() == b.truth[k].tobytes(), k
    assert not np.array_equal(a.flux, c.flux)
    assert not np.array_equal(a.z, c.z)
    assert not np.array_equal(a.truth["weights"], c.truth["weights"])


def test_chunking_does_not_change_rows(sdss):
    # Rows do not depend on N: a longer run (two chunks) starts with the rows of a shorter one.
    long = make_mock(CHUNK + 6, seed=11, observed_truth=True)
    assert len(long) == CHUNK + 6
    for name in ("flux", "ivar", "mask", "z", "norm"):
        np.testing.assert_array_equal(getattr(long, name)[:CHUNK], getattr(sdss, name))
    np.testing.assert_array_equal(long.truth["spec_rest"][:CHUNK], sdss.truth["spec_rest"])
    np.testing.assert_array_equal(long.object_id, np.arange(CHUNK + 6))
    # A short run (part of one chunk) gives the first rows of the full chunk, noise included.
    short = make_mock(40, seed=11, observed_truth=True)
    for name in ("flux", "ivar", "mask", "z", "z_err", "norm"):
        np.testing.assert_array_equal(getattr(short, name), getattr(sdss, name)[:40])
    for k in short.truth:
        np.testing.assert_array_equal(short.truth[k], sdss.truth[k][:40])
    # The second chunk is a different draw, not a copy of the first.
    assert not np.array_equal(long.flux[CHUNK:], long.flux[:6])


def test_restframe_truth_option_does_not_change_spectra():
    a = make_mock(30, seed=8, restframe_truth=False)
    b = make_mock(30, seed=8, restframe_truth=True)
    assert "spec_rest" not in a.truth and "spec_rest" in b.truth
    np.testing.assert_array_equal(a.flux, b.flux)


def test_normalisation_median_in_window_is_one(sdss):
    wave_rest = sdss.wave_obs[None, :] / (1 + sdss.z[:, None])
    sel = (wave_rest >= 5300) & (wave_rest <= 5850) & (sdss.ivar > 0)
    assert sel.sum(axis=1).min() > 100
    med = np.array([np.median(f[s]) for f, s in zip(sdss.flux, sel)])
    np.testing.assert_allclose(med, 1.0, rtol=0, atol=2e-6)
    assert np.all(sdss.norm > 0) and np.all(np.isfinite(sdss.norm))
    # The restframe truth is in the same normalisation: ≈1 in the window (up to noise and lines).
    win = (sdss.wave_rest >= 5300) & (sdss.wave_rest <= 5850)
    assert abs(np.median(np.median(sdss.truth["spec_rest"][:, win], axis=1)) - 1) < 0.05


def test_vectorised_normalization_is_the_window_median_bit_for_bit():
    # The mock and ingest normalise with the vectorised prep.normalization; it must give np.median's numbers
    # row by row, including odd/even pixel counts, empty windows, non-positive medians and non-finite flux.
    rng = np.random.default_rng(0)
    wave = get_instrument("sdss").wave_obs
    flux = rng.normal(1, 2, (200, wave.size)).astype(np.float32)
    ivar = (rng.random((200, wave.size)) > 0.3).astype(np.float32)
    ivar[:3] = 0
    flux[5, ::7] = np.nan
    z = rng.uniform(0, 0.5, 200)
    for dtype in (np.float32, np.float64):
        f = flux.astype(dtype)
        expect = np.full(200, np.nan)
        for n in range(200):
            rest = wave / (1 + z[n])
            sel = (rest >= 5300) & (rest <= 5850) & (ivar[n] > 0) & np.isfinite(f[n])
            m = float(np.median(f[n, sel])) if sel.any() else np.nan
            expect[n] = m if m > 0 else np.nan
        np.testing.assert_array_equal(normalization(f, ivar, wave, z), expect)


def test_noise_has_unit_variance_against_resampled_truth(sdss):
    ok = ~sdss.mask
    pull = ((sdss.flux - _resampled_truth(sdss)) * np.sqrt(sdss.ivar))[ok]
    # Two interpolations (fine grid → model grid → observed) differ a little at narrow lines only.
    assert abs(pull.mean()) < 0.01
    assert abs(pull.std() - 1) < 0.01
    assert abs(1.4826 * np.median(np.abs(pull)) - 1) < 0.01
    # Against the stored noiseless observed model: exactly Gaussian with the stated ivar.
    pull = ((sdss.flux - sdss.truth["model_obs"]) * np.sqrt(sdss.ivar))[ok]
    assert abs(pull.std() - 1) < 0.005 and abs(pull.mean()) < 0.005
    # The requested S/N is the one realised, and the noise depends on wavelength (blue end noisier).
    snr = np.array([np.median((sdss.truth["model_obs"][n] * np.sqrt(sdss.ivar[n]))[ok[n]]) for n in range(50)])
    np.testing.assert_allclose(snr, sdss.truth["snr"][:50], rtol=0.05)
    sigma = 1 / np.sqrt(np.where(ok, sdss.ivar, np.nan))
    blue = np.nanmedian(sigma[:, (sdss.wave_obs > 3800) & (sdss.wave_obs < 4100)], axis=1)
    green = np.nanmedian(sigma[:, (sdss.wave_obs > 5000) & (sdss.wave_obs < 5300)], axis=1)
    assert np.median(blue / green) > 1.2


def test_snr_distribution_is_sdss_like(sdss):
    snr = sdss.truth["snr"]
    assert 8 < np.median(snr) < 12
    assert np.percentile(snr, 84) / np.percentile(snr, 16) > 2  # lognormal spread, not one value


def test_halpha_peaks_at_redshifted_wavelength(sdss):
    strong = np.argsort(sdss.truth["line_flux"][:, LINE["Halpha"]])[::-1]
    checked = 0
    for n in strong[:40]:
        expect = 6564.61 * (1 + sdss.z[n])
        win = (np.abs(sdss.wave_obs - expect) < 12) & ~sdss.mask[n]
        if expect > 9250 or win.sum() < 10:
            continue
        peak = sdss.wave_obs[win][np.argmax(sdss.flux[n, win])]
        assert abs(peak - expect) < 2 * expect * 1e-4 * math.log(10), (n, peak, expect)
        checked += 1
    assert checked >= 10


def _line_moments(wave, spec, lam0, half):
    # Continuum from sidebands either side, then flux and RMS width of what is left.
    side = ((wave > lam0 - 2.5 * half) & (wave < lam0 - 1.5 * half)) | \
           ((wave > lam0 + 1.5 * half) & (wave < lam0 + 2.5 * half))
    cont = np.polyval(np.polyfit(wave[side], spec[side], 1), wave)
    core = np.abs(wave - lam0) < half
    dw = np.gradient(wave)[core]
    e = (spec - cont)[core]
    flux = np.sum(e * dw)
    width = math.sqrt(max(np.sum(e * dw * (wave[core] - lam0) ** 2) / flux, 0.0))
    return flux, width


def test_line_flux_and_width_truth_match_the_restframe_spectrum(sdss):
    j = LINE["OIII_5007"]
    strong = np.argsort(sdss.truth["line_flux"][:, j])[::-1][:8]
    for n in strong:
        lam0 = LINE_WAVE[j]
        sigma_lam = lam0 * sdss.truth["vdisp"][n] / C_KMS
        flux, width = _line_moments(sdss.wave_rest, sdss.truth["spec_rest"][n], lam0, max(6 * sigma_lam, 12))
        np.testing.assert_allclose(flux, sdss.truth["line_flux"][n, j], rtol=0.05)
        np.testing.assert_allclose(width, sigma_lam, rtol=0.12)


def test_line_strengths_follow_the_mixture_and_dust(sdss):
    lf, ebv, q = sdss.truth["line_flux"], sdss.truth["ebv"].astype(np.float64), sdss.truth["quiescent"]
    # Balmer decrement: case B 2.86 reddened by the nebular E(B−V).
    expect = 2.86 * 10 ** (0.4 * ebv * (_calzetti(4862.68) - _calzetti(6564.61)))
    np.testing.assert_allclose(lf[:, LINE["Halpha"]] / lf[:, LINE["Hbeta"]], expect, rtol=1e-4)
    np.testing.assert_allclose(lf[:, LINE["OIII_5007"]] / lf[:, LINE["OIII_4959"]],
                               2.98 * 10 ** (0.4 * ebv * (_calzetti(4960.30) - _calzetti(5008.24))), rtol=1e-4)
    # Star-forming galaxies (young templates) have much stronger Hα (per unit continuum) than passive ones.
    ha = lf[:, LINE["Halpha"]]
    assert np.median(ha[~q]) > 5 * np.median(ha[q])
    # [O III]/Hβ varies from galaxy to galaxy (a per-galaxy parameter), and more in SF galaxies.
    o3hb = np.log10(lf[~q, LINE["OIII_5007"]] / lf[~q, LINE["Hbeta"]])
    assert o3hb.std() > 0.2
    w = sdss.truth["weights"]
    assert np.all(w >= 0)
    np.testing.assert_allclose(w.sum(axis=1), 1, atol=1e-5)
    assert np.all((sdss.truth["vdisp"] >= 40) & (sdss.truth["vdisp"] <= 450))


def test_masks(sdss):
    inst = get_instrument("sdss")
    sky = inst.sky_mask()
    assert sky.sum() > 50
    assert sdss.mask[:, sky].all()
    dead = sdss.ivar == 0
    assert np.all(sdss.mask[dead]) and np.all(sdss.flux[dead] == 0)
    # The mask holds exactly the sky lines and the bad pixels (ivar = 0), nothing else.
    np.testing.assert_array_equal(sdss.mask, dead | sky[None, :])
    assert np.all(np.isfinite(sdss.flux)) and np.all(sdss.ivar >= 0)
    # A few percent of spectra have a long masked run (≥ 15 consecutive dead pixels).
    edges = np.diff(np.pad(dead.astype(np.int8), ((0, 0), (1, 1))), axis=1)
    row, start = np.nonzero(edges == 1)
    _, stop = np.nonzero(edges == -1)
    runs = np.unique(row[stop - start >= 15]).size
    assert 8 <= runs <= 70


def test_redshift_distribution(sdss):
    z = sdss.z
    assert z.min() >= 0 and z.max() <= 0.5
    assert 0.08 < np.median(z) < 0.12
    assert np.mean(z > 0.3) < 0.01 and np.mean(z > 0.2) > 0.02
    np.testing.assert_array_equal(sdss.truth["z"], z)
    assert np.all(sdss.z_err > 0) and np.median(sdss.z_err) < 1e-4
    u = make_mock(300, seed=2, z_dist="uniform", z_min=0.1, z_max=0.3, restframe_truth=False).z
    assert u.min() >= 0.1 and u.max() <= 0.3
    assert abs(np.mean(u) - 0.2) < 0.015 and np.mean(u < 0.15) > 0.15


def test_bad_parameters_are_named():
    with pytest.raises(MockError, match=r"z_max=0\.9 .*sdss"):
        make_mock(5, z_max=0.9)
    with pytest.raises(MockError, match="z_min < z_max"):
        make_mock(5, z_min=0.3, z_max=0.2)
    with pytest.raises(MockError, match="z_dist"):
        make_mock(5, z_dist="flat")
    with pytest.raises(MockError, match="positive integer"):
        make_mock(0)
    with pytest.raises(ValueError, match="unknown instrument"):
        make_mock(5, instrument="hst")


def test_desi_mock_on_desi_grid(desi):
    inst = get_instrument("desi")
    assert desi.flux.shape == (200, inst.L)
    np.testing.assert_array_equal(desi.wave_obs, inst.wave_obs)
    assert desi.truth["spec_rest"].shape == (200, math.ceil(inst.L * 1.5))
    assert desi.wave_rest[0] == pytest.approx(2400.0)
    assert desi.mask[:, inst.sky_mask()].all()
    ok = ~desi.mask
    pull = ((desi.flux - _resampled_truth(desi)) * np.sqrt(desi.ivar))[ok]
    assert abs(pull.std() - 1) < 0.01 and abs(pull.mean()) < 0.01


def test_templates_lose_their_nebular_lines_and_keep_the_continuum():
    from astropy.io import fits
    from kcorrect import __file__ as kc

    path = kc.replace("__init__.py", "data/templates/kcorrect-default-v4.fits")
    with fits.open(path) as h:
        raw_wave = h["FLUX"].data["wave"][0].astype(float)
        raw = h["FLUX"].data["flux"][0].astype(float)
    wave, clean, hbeta_ew = stellar_templates()
    np.testing.assert_array_equal(wave, raw_wave)
    far = (wave > 5100) & (wave < 5500)  # no lines here: cleaning leaves it (up to the window normalisation)
    ratio = clean[:, far] / raw[:, far]
    np.testing.assert_allclose(ratio / ratio[:, :1], 1, rtol=1e-12)
    scale = 1 / ratio[:, 0]
    for t in (1, 2):  # the star-forming templates carry the strongest lines
        for lam in (3728.5, 4862.68, 6564.61, 6725.0):
            core = np.abs(wave - lam) < 6
            side = np.median(raw[t, (np.abs(wave - lam) > 25) & (np.abs(wave - lam) < 45)])
            assert raw[t, core].max() > 2 * side, (t, lam)  # the template had the line...
            assert clean[t, core].max() * scale[t] < 1.05 * side, (t, lam)  # ...its stellar part has not
    assert hbeta_ew[1] > 10 and hbeta_ew[3] < 0.5  # young template carried Hβ, the old one none


def test_write_mock_file_validates_and_matches_memory(tmp_path):
    path = tmp_path / "m.h5"
    info = write_mock(path, 25, instrument="sdss", seed=6, z_max=0.4, progress=False)
    assert info["n"] == 25 and info["spectra_per_s"] > 0
    mem = make_mock(25, seed=6, z_max=0.4)
    with SpectraFile(path, instrument="sdss") as f:
        assert len(f) == 25
        b = f.read()
        np.testing.assert_array_equal(b.flux, mem.flux)
        np.testing.assert_array_equal(b.ivar, mem.ivar)
        np.testing.assert_array_equal(b.mask, mem.mask)
        np.testing.assert_array_equal(b.z, mem.z)
        np.testing.assert_array_equal(b.norm, mem.norm)
        np.testing.assert_array_equal(b.weights, np.where(mem.mask, 0, mem.ivar))
        np.testing.assert_array_equal(f.read_column("truth/spec_rest"), mem.truth["spec_rest"])
        np.testing.assert_array_equal(f.read_column("truth/line_flux"), mem.truth["line_flux"])
        for k in ("weights", "vdisp", "ebv", "z"):
            np.testing.assert_array_equal(f.read_column(f"truth/{k}"), mem.truth[k])
        np.testing.assert_array_equal(f.h5["truth_wave_rest"][:], get_instrument("sdss").wave_rest(0.4))
        assert [s.decode() for s in f.h5["truth_line_names"][:]] == list(LINE_NAMES)
        np.testing.assert_array_equal(f.h5["truth_line_wave"][:], LINE_WAVE)
        assert f.h5.attrs["mock_seed"] == 6 and f.h5.attrs["mock_z_max"] == 0.4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.h5"]  # no temporary file left
    from fastspec.validate import validate_file

    rep = validate_file(path, z_max=0.4)
    assert rep.ok, rep.problems


def test_cli_mock_writes_file_and_reports(tmp_path, capsys):
    path = tmp_path / "cli.h5"
    rc = cli.main(["mock", "-n", "12", "-o", str(path), "--seed", "5", "--instrument", "desi",
                   "--no-restframe-truth", "--no-progress", "--id-offset", "5000"])
    out = capsys.readouterr().out
    assert rc == 0
    assert str(path) in out and "spectra/s" in out and "desi" in out
    with SpectraFile(path) as f:
        assert len(f) == 12 and f.instrument.name == "desi"
        assert "truth/spec_rest" not in f.columns() and "truth/line_flux" in f.columns()
        np.testing.assert_array_equal(f.read_column("object_id"), 5000 + np.arange(12))
    rc = cli.main(["mock", "-n", "5", "-o", str(tmp_path / "bad.h5"), "--z-max", "0.9", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "z_max" in err
    assert not (tmp_path / "bad.h5").exists()
    with pytest.raises(SystemExit):
        cli.main(["mock", "-n", "0", "-o", str(tmp_path / "zero.h5")])
    assert "-n must be a positive integer" in capsys.readouterr().err
