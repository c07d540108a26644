"""Mock features beyond a template mixture (fastspec.mockvar through fastspec.mock): each one switchable, the
basic mocks untouched, and what each feature stored in truth/ visible in the spectra — measured here
independently: line ratios placed on the BPT diagram against the Kauffmann/Kewley curves coded here, line
widths and fluxes measured on the restframe truth, calibration curves recomputed with numpy's Legendre
polynomials, ivar scaling and sky residuals from the same noise draws without the feature.
"""
import math

import numpy as np
import pytest
from numpy.polynomial import legendre
from test_mock import _line_moments

from fastspec import cli
from fastspec.mock import LINE_NAMES, LINE_WAVE, MockError, make_mock, stellar_templates
from fastspec.mockvar import CLASSES, FEATURES, parse_features

C_KMS = 299792.458
LINE = {n: i for i, n in enumerate(LINE_NAMES)}
EXTRA = ("NeIII_3869", "HeI_5876", "OI_6300", "OI_6363", "ArIII_7135", "SIII_9069")
N = 1500


@pytest.fixture(scope="module")
def basic():
    return make_mock(N, seed=7)


@pytest.fixture(scope="module")
def rich():
    return make_mock(N, seed=7, features="rich")


def _only(feature):
    return make_mock(N, seed=7, features=[feature])


def test_presets_and_names():
    assert parse_features("basic") == () and parse_features(None) == ()
    assert parse_features("rich") == tuple(sorted(FEATURES))
    assert parse_features("lsf, bpt") == ("bpt", "lsf")
    with pytest.raises(ValueError, match="unknown mock feature.*'bogus'.*choose from basic, rich"):
        parse_features("lsf,bogus")
    with pytest.raises(MockError, match="'bogus'"):
        make_mock(3, features="bogus")


def test_basic_has_no_extra_lines_or_truth(basic):
    assert set(basic.truth) == {"weights", "line_flux", "vdisp", "ebv", "z", "snr", "quiescent", "spec_rest"}
    assert np.all(basic.truth["line_flux"][:, [LINE[n] for n in EXTRA]] == 0)
    assert np.array_equal(make_mock(5, seed=7, features="basic").flux, basic.flux[:5])


def test_observational_features_leave_the_galaxies_alone(basic):
    for feature in ("calibration", "sky_residuals", "ivar_scale"):
        m = _only(feature)
        for k in ("weights", "vdisp", "ebv", "z"):
            np.testing.assert_array_equal(m.truth[k], basic.truth[k], err_msg=f"{feature}: truth/{k}")
        # the same galaxy; only the normalisation (from the observed flux) moves
        for k in ("spec_rest", "line_flux"):
            np.testing.assert_allclose(m.truth[k] * m.norm[:, None], basic.truth[k] * basic.norm[:, None],
                                       rtol=1e-5, atol=1e-6, err_msg=f"{feature}: truth/{k}")


def test_rows_do_not_depend_on_n(rich):
    m = make_mock(5, seed=7, features="rich")
    np.testing.assert_array_equal(m.flux, rich.flux[:5])
    np.testing.assert_array_equal(m.truth["line_class"], rich.truth["line_class"][:5])
    np.testing.assert_array_equal(m.truth["calibration"], rich.truth["calibration"][:5])


def test_bpt_classes_sit_where_they_belong(rich):
    lf, cls = rich.truth["line_flux"].astype(np.float64), rich.truth["line_class"]
    frac = np.bincount(cls, minlength=len(CLASSES)) / N
    assert all(f > 0.02 for f in frac), frac  # every class present, broad-line AGN included
    has = lf[:, LINE["Hbeta"]] > 0
    np.testing.assert_array_equal(has, cls != CLASSES.index("line-free"))
    # on the BPT diagram, dust-corrected with the truth's E(B−V) (Calzetti, tested against the paper in
    # test_mock): the ratios of neighbouring lines move by ≤ 0.06 dex otherwise
    from fastspec.mock import calzetti_k

    ebv = rich.truth["ebv"][has].astype(np.float64)
    k = calzetti_k(np.array([6585.27, 6564.61, 5008.24, 4862.68]))
    x = np.log10(lf[has, LINE["NII_6584"]] / lf[has, LINE["Halpha"]]) + 0.4 * ebv * (k[0] - k[1])
    y = np.log10(lf[has, LINE["OIII_5007"]] / lf[has, LINE["Hbeta"]]) + 0.4 * ebv * (k[2] - k[3])
    c = cls[has]
    kauff = lambda x: 0.61 / (x - 0.05) + 1.30  # noqa: E731  Kauffmann et al. 2003
    kewley = lambda x: 0.61 / (x - 0.47) + 1.19  # noqa: E731  Kewley et al. 2001
    sf, comp, sey, lin = (c == CLASSES.index(k) for k in ("star-forming", "composite", "Seyfert", "LINER"))
    assert np.all(y[sf] < kauff(x[sf]))  # star-forming below Kauffmann
    between = (y[comp] > kauff(x[comp])) & (y[comp] < kewley(x[comp]))
    assert np.mean(between) > 0.95
    assert np.median(y[sey]) > 0.6 and np.median(y[lin]) < 0.2 and np.median(x[lin]) > -0.1
    # LINERs and Seyferts separate in [O III]/Hβ at similar [N II]/Hα
    assert np.median(y[sey]) - np.median(y[lin]) > 0.5


def test_line_strength_scatter_at_fixed_continuum(basic, rich):
    _, _, hbeta_ew = stellar_templates()

    def scatter(m):
        from fastspec.mock import calzetti_k

        t = m.truth
        keep = t["line_flux"][:, LINE["Hbeta"]] > 0
        if "line_class" in t:
            keep &= t["line_class"] != CLASSES.index("broad-line AGN")  # its power law adds window light
        ebv = t["ebv"].astype(np.float64)
        win = (m.wave_rest > 5300) & (m.wave_rest < 5850)
        cont = np.median(t["spec_rest"][:, win], axis=1) * 10 ** (0.4 * 0.44 * ebv * calzetti_k(np.array([5575.0]))[0])
        hb = t["line_flux"][:, LINE["Hbeta"]] * 10 ** (0.4 * ebv * calzetti_k(np.array([4862.68]))[0])
        r = np.log10(hb[keep] / cont[keep] / (t["weights"] @ hbeta_ew)[keep])
        return np.std(r)

    assert 0.13 < scatter(basic) < 0.2
    assert 0.45 < scatter(rich) < 0.56


def test_extra_lines_are_in_the_spectrum(rich):
    for name in EXTRA[:4]:
        j = LINE[name]
        lam0 = LINE_WAVE[j]
        strong = np.argsort(rich.truth["line_flux"][:, j])[::-1][:5]
        for n in strong:
            s_kms = math.hypot(rich.truth["vdisp_gas"][n], C_KMS / (2.3548 * 2000))
            sig = lam0 * s_kms / C_KMS
            flux, width = _line_moments(rich.wave_rest, rich.truth["spec_rest"][n], lam0, max(5 * sig, 10))
            np.testing.assert_allclose(flux, rich.truth["line_flux"][n, j], rtol=0.1, err_msg=name)


def test_gas_dispersion_and_lsf_set_the_line_width():
    lsf = C_KMS / (2.3548 * 2000)
    for features in (["gas_dispersion", "lsf"], ["lsf"]):
        m = make_mock(400, seed=3, features=features)
        j = LINE["OIII_5007"]  # no neighbour in the sidebands
        gas = m.truth["vdisp_gas"] if "gas_dispersion" in features else m.truth["vdisp"]
        if "gas_dispersion" in features:  # independent within a population (their medians differ between)
            act = ~m.truth["quiescent"]
            assert abs(np.corrcoef(np.log(m.truth["vdisp_gas"][act]), np.log(m.truth["vdisp"][act]))[0, 1]) < 0.2
        else:
            np.testing.assert_array_equal(m.truth["vdisp_gas"], m.truth["vdisp"])
        for n in np.argsort(m.truth["line_flux"][:, j])[::-1][:6]:
            sig = LINE_WAVE[j] * math.hypot(gas[n], lsf) / C_KMS
            _, width = _line_moments(m.wave_rest, m.truth["spec_rest"][n], LINE_WAVE[j], max(6 * sig, 12))
            np.testing.assert_allclose(width, sig, rtol=0.12, err_msg=str(features))


def test_calibration_curve_multiplies_flux_and_divides_ivar(basic):
    m = _only("calibration")
    wave = m.wave_obs
    x = 2 * (wave - wave[0]) / (wave[-1] - wave[0]) - 1
    for n in range(5):
        a = m.truth["calibration"][n].astype(np.float64)
        c = np.exp(legendre.legval(x, [0.0, *a]))
        ok = (basic.ivar[n] > 0) & (m.ivar[n] > 0)
        ratio = (m.flux[n] * m.norm[n])[ok] / (basic.flux[n] * basic.norm[n])[ok]
        np.testing.assert_allclose(ratio, c[ok], rtol=2e-4)
        np.testing.assert_allclose((m.ivar[n] / m.norm[n] ** 2)[ok] / (basic.ivar[n] / basic.norm[n] ** 2)[ok],
                                   1 / c[ok] ** 2, rtol=2e-4)
    assert 0.02 < m.truth["calibration"].std() < 0.04


def test_ivar_scale_misstates_the_noise(basic):
    m = _only("ivar_scale")
    np.testing.assert_array_equal(m.flux, basic.flux)
    s = m.truth["ivar_scale"].astype(np.float64)
    ok = (m.ivar > 0) & (basic.ivar > 0)
    ratio = np.where(ok, m.ivar / np.where(ok, basic.ivar, 1), np.nan)
    np.testing.assert_allclose(np.nanmedian(ratio, axis=1), s, rtol=1e-5)
    assert 0.1 < np.std(np.log(s)) < 0.2


def test_sky_residuals_only_near_sky_lines_and_not_in_ivar(basic):
    from fastspec.mockvar import OH_FOREST

    m = _only("sky_residuals")
    np.testing.assert_array_equal(m.ivar * 0 + (m.ivar > 0), basic.ivar * 0 + (basic.ivar > 0))
    d = (m.flux * m.norm[:, None]) - (basic.flux * basic.norm[:, None])
    lines = np.concatenate([m.instrument.sky_lines, OH_FOREST])
    near = (np.abs(m.wave_obs[:, None] - lines[None, :]) < 12.5).any(axis=1)
    # away from the lines the two agree (up to the float32 renormalisation), near them they differ
    assert np.abs(d[:, ~near]).max() < 1e-3 * np.abs(basic.flux * basic.norm[:, None]).max()
    big = m.truth["sky_residual"] > 1
    ok = m.ivar > 0
    pull = np.where(ok, d * np.sqrt(np.where(ok, basic.ivar / basic.norm[:, None] ** 2, 0)), 0)
    assert np.abs(pull[big][:, near]).max() > 2  # residuals of several σ that ivar does not know about


def test_broad_line_agn_have_broad_balmer_lines(rich):
    b = rich.truth["broad"]
    agn = rich.truth["line_class"] == CLASSES.index("broad-line AGN")
    np.testing.assert_array_equal(b[:, 2] > 0, agn)
    assert np.all(b[agn, 2] * 2.3548 >= 1500 - 1e-3) and np.all(b[agn, 0] > 0)
    # galaxy-selected broad-line AGN: broad Hα 1–5× the (attenuated) narrow Hα, power law ≤ 0.2 of the light
    ratio = b[agn, 0] / rich.truth["line_flux"][agn, LINE_NAMES.index("Halpha")]
    assert ratio.min() >= 1 - 1e-9 and ratio.max() <= 5 + 1e-9
    assert b[agn, 3].min() >= 0.02 and b[agn, 3].max() <= 0.2
    # the broad Hα wings (30–60 Å from the line, beyond [N II]) carry flux that narrow-line galaxies lack
    w = rich.wave_rest
    wing = (np.abs(w - 6564.61) > 30) & (np.abs(w - 6564.61) < 60)
    far = (np.abs(w - 6564.61) > 120) & (np.abs(w - 6564.61) < 160)
    excess = rich.truth["spec_rest"][:, wing].mean(1) / rich.truth["spec_rest"][:, far].mean(1) - 1
    # the broad base is weak (1–5× the narrow Hα, as in galaxy-selected samples), but half the broad-line AGN still
    # lift the wings beyond what 99% of the other galaxies show
    assert np.median(excess[agn]) > 2 * max(np.percentile(excess[~agn], 99), 0.005)
    assert np.median(excess[~agn]) < 0.01


def test_cli_features(tmp_path, capsys):
    path = tmp_path / "rich.h5"
    assert cli.main(["mock", "-n", "8", "-o", str(path), "--features", "bpt,lsf", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "line_class" in out
    import h5py

    with h5py.File(path) as f:
        assert f.attrs["mock_features"] == "bpt,lsf" and f.attrs["mock_lsf_kms"] > 60
        assert f["truth/line_flux"].shape == (8, len(LINE_NAMES))
    assert cli.main(["mock", "-n", "8", "-o", str(path), "--features", "nope"]) == 2
    assert "unknown mock feature(s) 'nope'" in capsys.readouterr().err


def test_rerender_same_galaxies_fresh_noise_other_redshift():
    from fastspec.mock import MockGenerator

    gen = MockGenerator(seed=5, observed_truth=True, features="rich")
    orig = make_mock(1100, seed=5, observed_truth=True, features="rich")
    rows = np.array([3, 1050, 3, 700])  # two chunks, a repeated row
    same = gen.rerender(rows, orig.z[rows], noise_seed=9)
    # at their own redshift: the same galaxy and noiseless spectrum (up to the normalisation), new noise
    for k in ("weights", "line_class", "vdisp_gas", "calibration", "z"):
        np.testing.assert_array_equal(same.truth[k], orig.truth[k][rows], err_msg=k)
    np.testing.assert_allclose(same.truth["model_obs"] * same.norm[:, None],
                               orig.truth["model_obs"][rows] * orig.norm[rows, None], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(same.object_id, orig.object_id[rows])
    assert not np.allclose(same.flux[0], orig.flux[3]) and not np.allclose(same.flux[0], same.flux[2])
    # at another redshift: the noiseless observed spectrum is the restframe truth seen at λ/(1+z) (np.interp)
    z_new = np.array([0.05, 0.3, 0.45, 0.2])
    moved = gen.rerender(rows, z_new, noise_seed=10)
    np.testing.assert_array_equal(moved.z, z_new)
    for i in range(len(rows)):
        expect = np.interp(moved.wave_obs / (1 + z_new[i]), moved.wave_rest, moved.truth["spec_rest"][i])
        ok = moved.wave_obs / (1 + z_new[i]) >= moved.wave_rest[0]
        close = np.isclose(moved.truth["model_obs"][i, ok], expect[ok], rtol=2e-3, atol=2e-3)
        assert close.mean() > 0.95, (i, close.mean())  # the rest: line peaks, interpolated from a coarser grid
    # the noise is fresh and has unit variance against the noiseless spectrum
    ok = moved.ivar > 0
    pull = (moved.flux - moved.truth["model_obs"])[ok] * np.sqrt(moved.ivar[ok] / moved.truth["ivar_scale"].repeat(ok.sum(1)))
    assert 0.9 < np.std(pull) < 1.15
    with pytest.raises(MockError, match="re-render redshifts must lie in"):
        gen.rerender(rows, 0.7, noise_seed=1)
    with pytest.raises(MockError, match="non-empty 1-d array"):
        gen.rerender([], 0.1, noise_seed=1)
