"""Reading Multimodal Universe files: snapping padded per-row lambdas onto the grid, big-endian arrays, Z_ERR/ZERR,
string ids, normalisation, instrument inference — against values computed here independently, and real SDSS/BOSS
spectra read with astropy."""
import h5py
import numpy as np
import pytest
from astropy.io import fits

from fastspec.h5format import SpectraFile, SpectraWriter
from fastspec.instruments import SKY_LINES
from fastspec.mmu import MMUSpectraFile
from fastspec.spectra import SpectraFormatError
from fastspec.spectra_io import open_spectra

SDSS_L, BOSS_L, DESI_L = 3921, 4685, 7781


def _pad(rows, fill, mode):
    Lmax = max(len(r) for r in rows)
    out = []
    for r in rows:
        r = np.asarray(r)
        if mode == "edge":
            out.append(np.pad(r, (0, Lmax - len(r)), mode="edge"))
        else:
            out.append(np.pad(r, (0, Lmax - len(r)), constant_values=fill))
    return np.stack(out)


def write_mmu(path, lams, fluxes, ivars, masks, z, z_err, object_id, zerr_name="Z_ERR", byteorder=">"):
    """An MMU-like file as the builders write it: rows padded at the end (lambda -1, mask True, ivar 0,
    edge flux), every column top-level, big-endian by default."""
    bo = byteorder
    with h5py.File(path, "w") as h:
        h["spectrum_lambda"] = _pad(lams, -1, "const").astype(bo + "f4")
        h["spectrum_flux"] = _pad(fluxes, 0, "edge").astype(bo + "f4")
        h["spectrum_ivar"] = _pad(ivars, 0, "const").astype(bo + "f4")
        h["spectrum_mask"] = _pad(masks, True, "const").astype(bool)
        h["Z"] = np.asarray(z).astype(bo + "f8")
        h[zerr_name] = np.asarray(z_err).astype(bo + "f4")
        oid = np.asarray(object_id)
        h["object_id"] = oid if oid.dtype.kind == "S" else oid.astype(bo + oid.dtype.str[1:])
        h["VDISP"] = np.arange(len(z), dtype=bo + "f4")


def _sky(wave):
    return (np.abs(wave[:, None] - SKY_LINES[None, :]) <= 5.0).any(axis=1)


def _expected(wave_obs, grid_index, lam, flux, ivar, mask, z):
    """Per-row reference with explicit loops: place pixels, build the mask, normalise by the window median."""
    L = wave_obs.size
    F, I, M = np.zeros(L), np.zeros(L), np.ones(L, bool)
    for j in range(len(lam)):
        t = grid_index + j
        if 0 <= t < L:
            F[t], I[t], M[t] = flux[j], ivar[j], mask[j]
    M = M | (I <= 0) | _sky(wave_obs)
    rest = wave_obs / (1 + z)
    sel = (rest >= 5300) & (rest <= 5850) & ~M & (I > 0)
    norm = np.median(F[sel]) if sel.any() else np.nan
    if np.isfinite(norm) and norm > 0:
        return F / norm, I * norm**2, M, norm
    return F, I, M, np.nan


def _sdss_rows(rng, starts, lengths):
    lams, fl, iv, mk = [], [], [], []
    for k0, n in zip(starts, lengths):
        lams.append((10 ** (3.578 + 1e-4 * (k0 + np.arange(n)))).astype(np.float32))
        fl.append(rng.normal(5.0, 1.0, n))
        iv.append(rng.uniform(0.5, 2.0, n) * (rng.random(n) > 0.05))
        mk.append(rng.random(n) < 0.05)
    return lams, fl, iv, mk


def test_sdss_like_padded_big_endian(tmp_path):
    rng = np.random.default_rng(1)
    # Row starts relative to the SDSS grid: inside, at 0, and 12 pixels *before* it (those pixels are dropped);
    # row 3 runs past the grid's end.
    starts, lengths = [5, 0, -12, 30], [3850, 3700, 3840, 3900]
    lams, fl, iv, mk = _sdss_rows(rng, starts, lengths)
    z = np.array([0.05, 0.1, 0.02, 0.3])
    ids = np.array([b"  299646907137943552", b"  299646907137943553", b"  1", b"  2"])
    path = tmp_path / "healpix=1" / "001-of-001.hdf5"
    path.parent.mkdir()
    write_mmu(path, lams, fl, iv, mk, z, [1e-5] * 4, ids)
    with h5py.File(path, "r") as h:
        assert h["spectrum_flux"].dtype.byteorder == ">" and h["spectrum_lambda"][1, -1] == -1
    with open_spectra(path) as f:
        assert isinstance(f, MMUSpectraFile) and f.kind == "mmu"
        assert f.instrument.name == "sdss" and len(f) == f.n == 4
        np.testing.assert_array_equal(f.wave_obs, f.instrument.wave_obs)
        b = f.read()
        assert b.flux.shape == (4, SDSS_L) and b.flux.dtype == np.float32 and b.problems == {}
        wave = 10 ** (3.578 + 1e-4 * np.arange(SDSS_L))
        for r in range(4):
            F, I, M, norm = _expected(wave, starts[r], lams[r], fl[r], iv[r], mk[r], z[r])
            np.testing.assert_array_equal(b.mask[r], M)
            np.testing.assert_allclose(b.norm[r], norm, rtol=1e-6)
            np.testing.assert_allclose(b.flux[r], F, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(b.ivar[r], I, rtol=1e-5)
        np.testing.assert_array_equal(b.z, z)
        np.testing.assert_allclose(b.z_err, 1e-5)
        assert b.object_id.dtype.kind == "S" and b.object_id[0] == b"  299646907137943552"
        # Block reads agree with the whole read.
        part = f.read(2, 4)
        assert part.start == 2
        np.testing.assert_array_equal(part.flux, b.flux[2:4])
        np.testing.assert_array_equal(f.read_column("Z_ERR"), b.z_err)
        np.testing.assert_array_equal(f.read_column("spectrum_flux", 1, 3), b.flux[1:3])
        np.testing.assert_array_equal(f.read_column("VDISP"), np.arange(4, dtype=np.float32))
        assert f.read_column("VDISP").dtype.byteorder in "=|"
        with pytest.raises(SpectraFormatError, match=r"001-of-001\.hdf5: no field 'ZWARNING'"):
            f.read_column("ZWARNING")


def test_desi_like_zerr_int_ids_and_inferred_instrument(tmp_path):
    rng = np.random.default_rng(2)
    lam = (3600.0 + 0.8 * np.arange(DESI_L)).astype(np.float32)
    n = 3
    fl = [rng.normal(2.0, 0.5, DESI_L) for _ in range(n)]
    iv = [rng.uniform(1, 3, DESI_L) for _ in range(n)]
    mk = [np.zeros(DESI_L, bool) for _ in range(n)]
    ids = np.array([39633345008634465, 39089837499744649, 7], dtype=np.int64)
    z = np.array([0.37, 0.007, 0.2])
    path = tmp_path / "desi.hdf5"
    write_mmu(path, [lam] * n, fl, iv, mk, z, [1e-6, 2e-5, 3e-4], ids, zerr_name="ZERR")
    with MMUSpectraFile(path) as f:
        assert f.instrument.name == "desi"
        b = f.read()
        np.testing.assert_array_equal(b.object_id, ids)
        assert b.object_id.dtype.byteorder in "=|"
        np.testing.assert_allclose(b.z_err, [1e-6, 2e-5, 3e-4], rtol=1e-6)
        np.testing.assert_array_equal(f.read_column("Z_ERR"), b.z_err)
        wave = 3600.0 + 0.8 * np.arange(DESI_L)
        for r in range(n):
            F, I, M, norm = _expected(wave, 0, lam, fl[r], iv[r], mk[r], z[r])
            np.testing.assert_allclose(b.norm[r], norm, rtol=1e-6)
            np.testing.assert_allclose(b.flux[r], F, rtol=1e-5)
            np.testing.assert_array_equal(b.mask[r], M)


def test_boss_range_infers_boss_and_sdss_range_infers_sdss(tmp_path):
    # SDSS pixels lie on the BOSS grid too (same log step); the wavelength range decides.
    rng = np.random.default_rng(3)
    boss = _sdss_rows(rng, [-290 + 120, -290 + 100], [4500, 4560])  # 3.549 + 1e-4·k in SDSS-relative indices
    write_mmu(tmp_path / "boss.h5", *boss, [0.2, 0.6], [1e-4] * 2, np.array([1, 2]))
    sdss = _sdss_rows(rng, [10, 20], [3800, 3850])
    write_mmu(tmp_path / "sdss.h5", *sdss, [0.2, 0.1], [1e-4] * 2, np.array([1, 2]))
    with MMUSpectraFile(tmp_path / "boss.h5") as f:
        assert f.instrument.name == "boss" and f.read().flux.shape == (2, BOSS_L)
        # row 0 starts 120 pixels into the BOSS grid
        b = f.read(0, 1)
        assert np.all(b.mask[0, :120]) and np.all(b.ivar[0, :120] == 0)
    with MMUSpectraFile(tmp_path / "sdss.h5") as f:
        assert f.instrument.name == "sdss"
    with MMUSpectraFile(tmp_path / "sdss.h5", instrument="boss") as f:  # the user's choice wins
        b = f.read()
        assert f.instrument.name == "boss" and b.flux.shape == (2, BOSS_L)
        # SDSS pixel k sits at BOSS pixel k + 290
        np.testing.assert_allclose(b.flux[0, 300] * b.norm[0], sdss[1][0][0], rtol=1e-5)


def test_off_grid_rows_and_rows_without_norm_are_reported(tmp_path):
    rng = np.random.default_rng(4)
    lams, fl, iv, mk = _sdss_rows(rng, [0, 0, 0], [3900, 3900, 3900])
    lams[1] = (10 ** (3.578 + 1e-4 * (np.arange(3900) + 0.4))).astype(np.float32)  # 0.4 pixel off the grid
    fl[2] = -np.abs(fl[2])  # negative median in the window: no valid norm
    path = tmp_path / "m.h5"
    write_mmu(path, lams, fl, iv, mk, [0.1, 0.1, 0.1], [1e-5] * 3, np.array([1, 2, 3]))
    with MMUSpectraFile(path) as f:
        b = f.read()
    assert list(b.problems) == [1]
    assert b.problems[1].startswith("spectrum_lambda: pixel 0 at ") and "0.40 pixels off the sdss grid" in b.problems[1]
    assert b.mask[1].all() and (b.weights[1] == 0).all()
    assert np.isnan(b.norm[2]) and np.isfinite(b.norm[0])
    np.testing.assert_allclose(b.flux[2, :3900], fl[2], rtol=1e-6)  # raw flux kept where no norm exists


def test_given_instrument_must_fit_the_lambdas(tmp_path):
    rng = np.random.default_rng(5)
    path = tmp_path / "m.h5"
    write_mmu(path, *_sdss_rows(rng, [0], [3000]), [0.1], [1e-5], np.array([1]))
    with pytest.raises(SpectraFormatError, match=r"m\.h5: row 0: spectrum_lambda: wavelengths are not on the desi grid"):
        MMUSpectraFile(path, instrument="desi")


def test_unknown_grid_and_missing_fields_are_named(tmp_path):
    path = tmp_path / "lamost.h5"
    lam = np.exp(np.log(3700.0) + 2.3e-4 * np.arange(100)).astype(np.float32)  # a grid fastspec does not know
    write_mmu(path, [lam], [np.ones(100)], [np.ones(100)], [np.zeros(100, bool)], [0.1], [1e-5], np.array([1]))
    with pytest.raises(SpectraFormatError, match=r"lamost\.h5: spectrum_lambda: wavelengths 3700\.00.* lie on no known"):
        MMUSpectraFile(path)
    bad = tmp_path / "noz.h5"
    with h5py.File(bad, "w") as h:
        h["spectrum_lambda"] = np.ones((2, 5), np.float32)
        h["spectrum_flux"] = np.ones((2, 5), np.float32)
        h["spectrum_ivar"] = np.ones((2, 4), np.float32)
    with pytest.raises(SpectraFormatError, match=r"noz\.h5: not an MMU spectra file: missing field\(s\) Z"):
        open_spectra(bad)
    with h5py.File(bad, "a") as h:
        h["Z"] = np.zeros(2)
        h["object_id"] = np.arange(2)
    with pytest.raises(SpectraFormatError, match=r"noz\.h5: field spectrum_ivar has shape \(2, 4\), expected \(2, 5\)"):
        open_spectra(bad)


def _real_rows(paths):
    lams, fl, iv, mk, z, zerr, ids = [], [], [], [], [], [], []
    for p in paths:
        with fits.open(p) as h:
            d, s = h[1].data, h[2].data
            lams.append((10 ** d["loglam"].astype(np.float64)).astype(np.float32))
            fl.append(d["flux"])
            iv.append(d["ivar"])
            mk.append((d["and_mask"] != 0) | (d["ivar"] <= 1e-6))
            z.append(s["Z"][0])
            zerr.append(s["Z_ERR"][0])
            ids.append(str(s["SPECOBJID"][0]).encode())  # a string in SDSS files, uint64 in BOSS ones
    return lams, fl, iv, mk, np.array(z), np.array(zerr), np.array(ids)


def test_real_sdss_spectra_through_an_mmu_file(tmp_path, real_data_dir):
    names = ["spec-0266-51602-0573.fits", "spec-0266-51602-0638.fits", "spec-1045-52725-0628.fits"]
    paths = [real_data_dir / "sdss" / n for n in names]
    lams, fl, iv, mk, z, zerr, ids = _real_rows(paths)
    assert fl[0].dtype.byteorder == ">"  # astropy hands FITS arrays over big-endian
    path = tmp_path / "real.hdf5"
    write_mmu(path, lams, fl, iv, mk, z, zerr, ids)
    wave = 10 ** (3.578 + 1e-4 * np.arange(SDSS_L))
    with MMUSpectraFile(path) as f:
        assert f.instrument.name == "sdss"
        b = f.read()
    for r, p in enumerate(paths):
        with fits.open(p) as h:
            loglam = h[1].data["loglam"].astype(np.float64)
        k0 = int(round((loglam[0] - 3.578) / 1e-4))
        F, I, M, norm = _expected(wave, k0, lams[r], fl[r].astype(np.float64), iv[r], mk[r], z[r])
        assert np.isfinite(norm) and b.problems == {}
        np.testing.assert_allclose(b.norm[r], norm, rtol=1e-6)
        np.testing.assert_allclose(b.flux[r], F, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b.ivar[r], I, rtol=1e-5)
        np.testing.assert_array_equal(b.mask[r], M)
        assert b.object_id[r].strip() == ids[r].strip()
    np.testing.assert_allclose(b.z, z)
    # The rows go into a fastspec file unchanged, string SPECOBJIDs parsed to uint64.
    out = tmp_path / "copy.h5"
    with SpectraWriter(out, "sdss") as w:
        w.write(b.flux, b.ivar, b.mask, b.z, b.z_err, b.object_id, norm=b.norm)
    with SpectraFile(out) as g:
        c = g.read()
        np.testing.assert_array_equal(c.flux, b.flux)
        assert c.object_id[0] == int(ids[0])


def test_real_boss_spectrum_infers_boss(tmp_path, real_data_dir):
    paths = [real_data_dir / "sdss" / "spec-4055-55359-0006.fits", real_data_dir / "sdss" / "spec-0266-51602-0013.fits"]
    lams, fl, iv, mk, z, zerr, ids = _real_rows(paths)
    path = tmp_path / "boss.hdf5"
    write_mmu(path, lams, fl, iv, mk, z, zerr, ids)
    with MMUSpectraFile(path) as f:
        assert f.instrument.name == "boss"
        b = f.read()
    wave = 10 ** (3.549 + 1e-4 * np.arange(BOSS_L))
    for r, p in enumerate(paths):
        with fits.open(p) as h:
            loglam = h[1].data["loglam"].astype(np.float64)
        k0 = int(round((loglam[0] - 3.549) / 1e-4))
        F, I, M, norm = _expected(wave, k0, lams[r], fl[r].astype(np.float64), iv[r], mk[r], z[r])
        np.testing.assert_allclose(b.flux[r], F, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(b.mask[r], M)


def test_without_mask_column_with_targetid(tmp_path):
    # Older MMU DESI files have no spectrum_mask and name the id TARGETID: mask = ivar <= 0 | sky lines.
    rng = np.random.default_rng(6)
    lam = (3600.0 + 0.8 * np.arange(DESI_L)).astype(np.float32)
    flux, ivar = rng.normal(3, 1, (2, DESI_L)), rng.uniform(0.5, 2, (2, DESI_L))
    ivar[0, 100:110] = 0
    path = tmp_path / "old.h5"
    with h5py.File(path, "w") as h:
        h["spectrum_lambda"] = np.stack([lam, lam])
        h["spectrum_flux"], h["spectrum_ivar"] = flux.astype(">f4"), ivar.astype(">f4")
        h["Z"], h["ZERR"] = np.array([0.1, 0.2]), np.array([1e-5, 2e-5], np.float32)
        h["TARGETID"] = np.array([5, 6], dtype=">i8")
    with MMUSpectraFile(path) as f:
        b = f.read()
        np.testing.assert_array_equal(f.read_column("object_id"), [5, 6])
    wave = 3600.0 + 0.8 * np.arange(DESI_L)
    for r in range(2):
        F, I, M, norm = _expected(wave, 0, lam, flux[r], ivar[r], np.zeros(DESI_L, bool), [0.1, 0.2][r])
        np.testing.assert_array_equal(b.mask[r], M)
        np.testing.assert_allclose(b.flux[r], F, rtol=1e-5)
    assert b.mask[0, 100:110].all() and b.object_id.tolist() == [5, 6]


def test_empty_file_needs_an_instrument(tmp_path):
    path = tmp_path / "empty.h5"
    write_mmu(path, [np.ones(5)], [np.ones(5)], [np.ones(5)], [np.zeros(5, bool)], [0.1], [0.0], np.array([1]))
    with h5py.File(path, "a") as h:
        for k in list(h):
            data = h[k][:0]
            del h[k]
            h[k] = data
    with pytest.raises(SpectraFormatError, match=r"empty\.h5: no rows to infer the instrument from"):
        MMUSpectraFile(path)
    with MMUSpectraFile(path, instrument="boss") as f:
        assert len(f) == 0 and f.read().flux.shape == (0, BOSS_L)
