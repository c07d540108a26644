"""`fastspec ingest` on every bundled real survey file, checked against values read independently with
astropy (and plain numpy for the expected pixel placement, masks, camera combination and normalisation);
damaged files must give a per-file reason naming the file, not a traceback."""
from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
from astropy.io import fits

from fastspec import cli
from fastspec.ingest import ingest
from fastspec.instruments import SKY_LINES
from fastspec.surveys.desi import read_desi
from fastspec.surveys.sdss import read_sdss

# Grids as DESIGN §1 states them (not taken from fastspec.instruments, to keep the expectation independent).
GRIDS = {
    "sdss": dict(log=True, start=3.578, step=1e-4, L=3921),
    "boss": dict(log=True, start=3.549, step=1e-4, L=4685),
    "desi": dict(log=False, start=3600.0, step=0.8, L=7781),
}
SKY_HALFWIDTH = 5.0


def grid_wave(name):
    g = GRIDS[name]
    x = g["start"] + g["step"] * np.arange(g["L"])
    return 10**x if g["log"] else x


def sky_mask(wave):
    return (np.abs(wave[:, None] - SKY_LINES[None, :]) <= SKY_HALFWIDTH).any(axis=1)


def expected_norm(flux, good, wave, z):
    rest = wave / (1 + z)
    sel = good & (rest >= 5300) & (rest <= 5850)
    if not sel.any():
        return None
    m = float(np.median(flux[sel]))
    return m if m > 0 else None


def read_h5(path):
    with h5py.File(path, "r") as h:
        out = {k: h[k][:] for k in ("spectrum_flux", "spectrum_ivar", "spectrum_mask", "Z", "Z_ERR", "object_id",
                                    "norm", "wave_obs")}
        out["file"] = [f.decode() if isinstance(f, bytes) else f for f in h["source/file"][:]]
        out["row"] = h["source/row"][:]
        out["instrument"] = h.attrs["instrument"]
        out["instrument"] = out["instrument"].decode() if isinstance(out["instrument"], bytes) else out["instrument"]
    return out


def sdss_expected(path, grid):
    """Independent astropy read of one SDSS/BOSS file, placed on `grid` by rounding the pixel coordinate."""
    with fits.open(path) as h:
        d = h[1].data
        loglam = np.asarray(d["loglam"], np.float64)
        flux = np.asarray(d["flux"], np.float64)
        ivar = np.asarray(d["ivar"], np.float64)
        and_mask = np.asarray(d["and_mask"])
        meta = h[2].data[0]
        z, z_err, specobjid = float(meta["Z"]), float(meta["Z_ERR"]), meta["SPECOBJID"]
    g = GRIDS[grid]
    coord = (loglam - g["start"]) / g["step"]
    idx = np.rint(coord).astype(int)
    assert np.abs(coord - idx).max() < 0.05
    oid = int(specobjid.strip()) if isinstance(specobjid, str) else int(specobjid)
    return dict(idx=idx, flux=flux, ivar=ivar, and_mask=and_mask, z=z, z_err=z_err, object_id=oid)


def check_sdss_row(h5, i, e, grid):
    wave = grid_wave(grid)
    L = GRIDS[grid]["L"]
    on = (e["idx"] >= 0) & (e["idx"] < L)
    idx = e["idx"][on]
    flux, ivar, mask, norm = h5["spectrum_flux"][i], h5["spectrum_ivar"][i], h5["spectrum_mask"][i], h5["norm"][i]
    np.testing.assert_allclose(flux[idx] * np.float64(norm), e["flux"][on], rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(ivar[idx] / np.float64(norm) ** 2, e["ivar"][on], rtol=1e-6, atol=1e-30)
    # mask True = bad: pipeline and_mask, ivar <= 0, sky lines, grid pixels without data
    expect_bad = np.ones(L, bool)
    expect_bad[idx] = (e["and_mask"][on] != 0) | (e["ivar"][on] <= 0)
    expect_bad |= sky_mask(wave)
    np.testing.assert_array_equal(mask, expect_bad)
    uncovered = np.ones(L, bool)
    uncovered[idx] = False
    assert (flux[uncovered] == 0).all() and (ivar[uncovered] == 0).all()
    assert h5["Z"][i] == e["z"] and h5["Z_ERR"][i] == np.float32(e["z_err"])
    assert int(h5["object_id"][i]) == e["object_id"]
    raw_flux = np.zeros(L)
    raw_flux[idx] = e["flux"][on]
    n = expected_norm(raw_flux, ~expect_bad, wave, e["z"])
    assert n is not None and norm == pytest.approx(n, rel=1e-6)


@pytest.fixture(scope="module")
def sdss_files(real_data_dir):
    files = sorted((real_data_dir / "sdss").glob("spec-*.fits"))
    assert len(files) >= 20
    return files


@pytest.fixture(scope="module")
def sdss_ingested(sdss_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("ingest") / "sdss.h5"
    report = ingest([str(f) for f in sdss_files], out, jobs=1, progress=False)
    return out, report


def test_every_sdss_file_matches_astropy(sdss_files, sdss_ingested):
    out, report = sdss_ingested
    h5 = read_h5(out)
    assert report.instrument == "boss" == h5["instrument"]  # SDSS mixed with BOSS → the BOSS grid
    np.testing.assert_allclose(h5["wave_obs"], grid_wave("boss"), rtol=1e-12)
    rows = {f: i for i, f in enumerate(h5["file"])}
    by_file = {r.file: r for r in report.files}
    n_checked = 0
    for f in sdss_files:
        e = sdss_expected(f, "boss")
        rep = by_file[str(f)]
        assert rep.error is None, rep.error
        # which spectra can be normalised, decided independently
        L = GRIDS["boss"]["L"]
        raw_flux, good = np.zeros(L), np.zeros(L, bool)
        raw_flux[e["idx"]] = e["flux"]
        good[e["idx"]] = (e["and_mask"] == 0) & (e["ivar"] > 0)
        good &= ~sky_mask(grid_wave("boss"))
        if expected_norm(raw_flux, good, grid_wave("boss"), e["z"]) is None:
            assert str(f) not in rows
            assert rep.n_ingested == 0 and "no valid normalisation" in rep.skipped[0]["reason"]
            continue
        check_sdss_row(h5, rows[str(f)], e, "boss")
        assert h5["row"][rows[str(f)]] == 0
        n_checked += 1
    assert n_checked == report.n_ingested == len(h5["Z"]) >= 20


def test_astropy_reader_writes_the_same_file(sdss_files, real_data_dir, tmp_path):
    # a few files of each layout (SDSS spec, spec-lite, BOSS with unsigned SPECOBJID) through both readers
    pick = [f for f in sdss_files if f.name in (
        "spec-0266-51602-0001.fits", "spec-0266-51602-0013.fits", "spec-10000-57346-0009.fits",
        "spec-3586-55181-0003.fits")]
    desi = sorted((real_data_dir / "desi").glob("*.fits"))
    for files, name in ((pick, "sdss"), (desi, "desi")):
        ingest([str(f) for f in files], tmp_path / f"{name}-fast.h5", jobs=1, progress=False, reader="fast")
        ingest([str(f) for f in files], tmp_path / f"{name}-astropy.h5", jobs=1, progress=False, reader="astropy")
        a, b = read_h5(tmp_path / f"{name}-fast.h5"), read_h5(tmp_path / f"{name}-astropy.h5")
        assert len(a["Z"]) == len(files) - (2 if name == "desi" else 0)
        for k in ("spectrum_flux", "spectrum_ivar", "spectrum_mask", "Z", "Z_ERR", "object_id", "norm"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def desi_expected(coadd, redrock, mask_fn=None):
    """Inverse-variance combination of the cameras, computed here from astropy reads."""
    L = GRIDS["desi"]["L"]
    with fits.open(coadd) as h:
        tid = np.asarray(h["FIBERMAP"].data["TARGETID"])
        N = tid.size
        sw, swf, sf, ncam = np.zeros((N, L)), np.zeros((N, L)), np.zeros((N, L)), np.zeros(L)
        for cam in "BRZ":
            wave = np.asarray(h[f"{cam}_WAVELENGTH"].data, np.float64)
            idx = np.rint((wave - 3600.0) / 0.8).astype(int)
            assert np.abs((wave - 3600.0) / 0.8 - idx).max() < 1e-6
            f = np.asarray(h[f"{cam}_FLUX"].data, np.float64)
            iv = np.asarray(h[f"{cam}_IVAR"].data, np.float64)
            m = np.asarray(h[f"{cam}_MASK"].data)
            w = np.where((m == 0) & (iv > 0), iv, 0.0)
            sw[:, idx] += w
            swf[:, idx] += w * f
            sf[:, idx] += f
            ncam[idx] += 1
    with fits.open(redrock) as h:
        r = h["REDSHIFTS"].data
        z = {int(t): (float(a), float(b)) for t, a, b in zip(r["TARGETID"], r["Z"], r["ZERR"])}
    with np.errstate(invalid="ignore", divide="ignore"):
        flux = np.where(sw > 0, swf / sw, sf / ncam)
    return dict(tid=tid, flux=flux, ivar=sw, z=z)


def check_desi(h5, i, e, row):
    wave = grid_wave("desi")
    norm = np.float64(h5["norm"][i])
    np.testing.assert_allclose(h5["spectrum_flux"][i] * norm, e["flux"][row], rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(h5["spectrum_ivar"][i] / norm**2, e["ivar"][row], rtol=1e-6, atol=1e-30)
    bad = (e["ivar"][row] <= 0) | sky_mask(wave)
    np.testing.assert_array_equal(h5["spectrum_mask"][i], bad)
    tid = int(e["tid"][row])
    assert int(h5["object_id"][i]) == tid
    assert h5["Z"][i] == e["z"][tid][0] and h5["Z_ERR"][i] == np.float32(e["z"][tid][1])
    n = expected_norm(e["flux"][row], ~bad, wave, e["z"][tid][0])
    assert norm == pytest.approx(n, rel=1e-6)


def test_desi_coadds_combine_cameras_by_inverse_variance(real_data_dir, tmp_path):
    coadds = sorted((real_data_dir / "desi").glob("coadd-*.fits"))
    assert len(coadds) == 2
    # redrock files are found beside the coadds
    report = ingest([str(c) for c in coadds], tmp_path / "desi.h5", jobs=1, progress=False)
    h5 = read_h5(tmp_path / "desi.h5")
    assert h5["instrument"] == "desi" and report.n_ingested == len(h5["Z"]) == 2
    for i, c in enumerate(coadds):
        assert h5["file"][i] == str(c)
        e = desi_expected(c, c.with_name(c.name.replace("coadd-", "redrock-")))
        check_desi(h5, i, e, int(h5["row"][i]))
        # the B/R and R/Z overlaps really hold two cameras, so the combination was exercised
        overlap = (grid_wave("desi") >= 5760) & (grid_wave("desi") <= 5800)
        assert overlap.sum() == 51


def test_desi_masked_camera_pixels(real_data_dir, tmp_path):
    """Pipeline-masked and ivar=0 pixels inside and outside camera overlaps (the bundled files have none)."""
    src = real_data_dir / "desi" / "coadd-4-80613-thru20210324.fits"
    coadd = tmp_path / "coadd-x.fits"
    with fits.open(src) as h:
        h["R_MASK"].data[0, 0:20] = 4  # R start overlaps B (5760-5800 Å): B alone must be used there
        h["B_IVAR"].data[0, -10:] = 0  # B end overlaps R: R alone
        h["B_MASK"].data[0, -30:-25] = 1
        h["R_MASK"].data[0, 21:26] = 2  # the same grid pixels (R starts at B pixel 2700): ivar 0, mask True
        h["Z_MASK"].data[0, 1000:1010] = 8  # single-camera pixels
        h.writeto(coadd)
    shutil.copy(real_data_dir / "desi" / "redrock-4-80613-thru20210324.fits", tmp_path / "redrock-x.fits")
    rep, spec = read_desi(coadd, tmp_path / "redrock-x.fits")
    assert rep.n_ingested == 1 and rep.error is None
    e = desi_expected(coadd, tmp_path / "redrock-x.fits")
    h5 = dict(spectrum_flux=spec.flux, spectrum_ivar=spec.ivar, spectrum_mask=spec.mask, norm=spec.norm,
              object_id=spec.object_id, Z=spec.z, Z_ERR=spec.z_err)
    check_desi(h5, 0, e, 0)
    idx_r0 = int(round((5760 - 3600) / 0.8))
    assert not spec.mask[0, idx_r0: idx_r0 + 20].any() or sky_mask(grid_wave("desi"))[idx_r0: idx_r0 + 20].any()
    assert spec.mask[0, 2751 - 30: 2751 - 25].all()  # both cameras masked
    assert (spec.ivar[0, 2751 - 30: 2751 - 25] == 0).all()
    assert spec.mask[0, 4900 + 1000: 4900 + 1010].all()


def test_explicit_redrock_matched_by_targetid_and_spectype(real_data_dir, tmp_path):
    desi = real_data_dir / "desi"
    coadd = tmp_path / "coadd-a.fits"
    shutil.copy(desi / "coadd-4-80613-thru20210324.fits", coadd)
    # no redrock beside it → a clear per-file reason
    rep = ingest([str(coadd)], tmp_path / "x.h5", jobs=1, progress=False)
    assert rep.n_ingested == 0 and "no redrock file found" in rep.files[0].error and str(coadd) in rep.files[0].error
    assert not (tmp_path / "x.h5").exists()
    # given explicitly under another name: matched by TARGETID
    other = tmp_path / "zcat.fits"
    shutil.copy(desi / "redrock-4-80613-thru20210324.fits", other)
    rep = ingest([str(coadd), str(other)], tmp_path / "x.h5", jobs=1, progress=False)
    assert rep.n_ingested == 1 and rep.files[0].redrock == str(other)
    # SPECTYPE selection
    rep = ingest([str(coadd), str(other)], tmp_path / "y.h5", jobs=1, progress=False, spectypes=["QSO"])
    assert rep.n_ingested == 0 and "SPECTYPE GALAXY not in QSO" in rep.files[0].skipped[0]["reason"]


def test_boss_file_on_sdss_grid_reports_dropped_pixels(real_data_dir):
    f = real_data_dir / "sdss" / "spec-4055-55359-0006.fits"
    rep, spec = read_sdss(f, "sdss")
    e = sdss_expected(f, "sdss")
    h5 = dict(spectrum_flux=spec.flux, spectrum_ivar=spec.ivar, spectrum_mask=spec.mask, norm=spec.norm,
              object_id=spec.object_id, Z=spec.z, Z_ERR=spec.z_err)
    check_sdss_row(h5, 0, e, "sdss")
    n_out = int(((e["idx"] < 0) | (e["idx"] >= GRIDS["sdss"]["L"])).sum())
    assert n_out > 0 and rep.notes == [
        f"{n_out} pixels outside the sdss grid (3784–9333 Å) dropped ({int((e['ivar'][(e['idx'] < 0) | (e['idx'] >= 3921)] > 0).sum())} with ivar > 0)"  # noqa: E501
    ]


def test_mixed_surveys_jobs_and_report(real_data_dir, tmp_path, capsys):
    """The whole folder through the CLI with 2 workers: DESI (the minority) skipped with its reason, the rest
    identical to a serial run, the JSON report complete."""
    out, rpt = tmp_path / "all.h5", tmp_path / "report.json"
    folder = tmp_path / "real"  # the small sdss/ and desi/ sets only: sdss-dr14/ holds 697 more files
    folder.mkdir()
    for sub in ("sdss", "desi"):
        shutil.copytree(real_data_dir / sub, folder / sub)
    rc = cli.main(["ingest", str(folder), "-o", str(out), "-j", "2", "--report", str(rpt), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    report = json.loads(rpt.read_text())
    assert report["instrument"] == "boss" and report["written"]
    files = {f["file"]: f for f in report["files"]}
    for c in (folder / "desi").glob("coadd-*.fits"):
        assert "ingest DESI and SDSS/BOSS files into separate outputs" in files[str(c)]["error"]
        assert c.name in text
    serial = ingest(sorted(str(f) for f in (folder / "sdss").glob("*.fits")), tmp_path / "serial.h5",
                    jobs=1, progress=False)
    a, b = read_h5(out), read_h5(tmp_path / "serial.h5")
    assert report["n_ingested"] == serial.n_ingested == len(a["Z"])
    for k in ("spectrum_flux", "spectrum_ivar", "spectrum_mask", "Z", "object_id", "norm"):
        np.testing.assert_array_equal(a[k], b[k])
    assert a["file"] == b["file"]  # input order kept


def test_append(sdss_files, tmp_path):
    out = tmp_path / "a.h5"
    ingest([str(f) for f in sdss_files[:3]], out, instrument="sdss", jobs=1, progress=False)
    ingest([str(f) for f in sdss_files[3:5]], out, instrument="sdss", jobs=1, progress=False, append=True)
    h5 = read_h5(out)
    assert h5["file"] == [str(f) for f in sdss_files[:5]]


# ------------------------------------------------------------------------------------------- damaged files


def damaged_copies(real_data_dir, tmp_path):
    """Truncated (first half of the bytes) and corrupted (bytes overwritten in the middle of the data the
    reader uses) copies of an SDSS spec-lite, a full SDSS spec and a DESI coadd."""
    rng = np.random.default_rng(0)
    out = {}
    for name, hdu in (("sdss/spec-0266-51602-0013.fits", "COADD"), ("sdss/spec-0266-51602-0001.fits", "COADD"),
                      ("desi/coadd-4-80613-thru20210324.fits", "B_FLUX")):
        src = real_data_dir / name
        raw = src.read_bytes()
        sub = tmp_path / name.split("/")[0]
        sub.mkdir(exist_ok=True)
        t = sub / ("trunc-" + src.name)
        t.write_bytes(raw[: len(raw) // 2])
        with fits.open(src) as h:
            start = h.fileinfo(hdu)["datLoc"]
            size = h[hdu].header["NAXIS1"] * h[hdu].header["NAXIS2"] * abs(h[hdu].header["BITPIX"]) // 8
        mid = start + size // 2
        buf = bytearray(raw)
        buf[mid: mid + 4096] = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
        c = sub / ("corrupt-" + src.name)
        c.write_bytes(bytes(buf))
        if "desi" in name:
            shutil.copy(src.with_name(src.name.replace("coadd-", "redrock-")), sub / ("redrock-trunc-" + src.name[6:]))
            shutil.copy(src.with_name(src.name.replace("coadd-", "redrock-")),
                        sub / ("redrock-corrupt-" + src.name[6:]))
        out[t] = "truncated"
        out[c] = "corrupted"
    return out


@pytest.mark.parametrize("reader", ["fast", "astropy"])
def test_truncated_and_corrupted_files_are_skipped_with_reason(real_data_dir, tmp_path, reader):
    bad = damaged_copies(real_data_dir, tmp_path)
    good = real_data_dir / "sdss" / "spec-0266-51602-0107.fits"
    sdss_bad = [str(p) for p in bad if p.parent.name == "sdss"]
    rep = ingest([str(good)] + sdss_bad, tmp_path / "mixed.h5", jobs=1, progress=False, reader=reader)
    assert rep.n_ingested == 1
    for f in rep.files[1:]:
        assert f.error and f.error.startswith(f.file + ": ")
        assert ("truncated" if "trunc-" in f.file else "corrupted") in f.error, f.error
    desi_bad = [str(p) for p in bad if p.parent.name == "desi"]
    rep = ingest(desi_bad, tmp_path / "desi.h5", jobs=1, progress=False, reader=reader)
    assert rep.n_ingested == 0 and not (tmp_path / "desi.h5").exists()
    for f in rep.files:
        assert ("truncated" if "trunc-" in f.file else "corrupted") in f.error, f.error


def test_only_bad_files_exit_1_with_message(real_data_dir, tmp_path, capsys):
    bad = damaged_copies(real_data_dir, tmp_path)
    notfits = tmp_path / "spec-0001-50000-0001.fits"
    notfits.write_text("<html>404 Not Found</html>\n" * 200)
    paths = [str(p) for p in bad if p.parent.name == "sdss"] + [str(notfits)]
    rc = cli.main(["ingest", *paths, "-o", str(tmp_path / "o.h5"), "--no-progress", "-j", "1"])
    cap = capsys.readouterr()
    assert rc == 1 and not (tmp_path / "o.h5").exists()
    assert "nothing could be ingested from 5 file(s)" in cap.err
    assert "Traceback" not in cap.out + cap.err
    for p in paths:
        assert p.rsplit("/", 1)[1] in cap.out
    assert "not a FITS file" in cap.out


def test_missing_field_names_file_hdu_and_field(real_data_dir, tmp_path):
    src = real_data_dir / "sdss" / "spec-0266-51602-0013.fits"
    with fits.open(src) as h:
        cols = [c for c in h[2].columns if c.name != "Z"]
        h[2] = fits.BinTableHDU.from_columns(cols, header=h[2].header, name="SPECOBJ")
        path = tmp_path / src.name
        h.writeto(path)
    rep = ingest([str(path)], tmp_path / "o.h5", jobs=1, progress=False)
    err = rep.files[0].error
    assert err.startswith(str(path)) and "HDU 2 (SPECOBJ) has no field Z" in err


def test_gzipped_file_and_instrument_mismatch(real_data_dir, tmp_path):
    import gzip

    src = real_data_dir / "sdss" / "spec-0266-51602-0107.fits"
    gz = tmp_path / (src.name + ".gz")
    gz.write_bytes(gzip.compress(src.read_bytes()))
    (tmp_path / "trunc").mkdir()
    bad_gz = tmp_path / "trunc" / gz.name
    bad_gz.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    coadd = real_data_dir / "desi" / "coadd-4-80613-thru20210324.fits"
    rep = ingest([str(gz), str(bad_gz), str(coadd)], tmp_path / "o.h5", instrument="sdss", jobs=1,
                 progress=False)
    assert rep.n_ingested == 1
    assert "truncated" in rep.files[1].error
    assert "the output instrument is sdss" in rep.files[2].error
    check_sdss_row(read_h5(tmp_path / "o.h5"), 0, sdss_expected(src, "sdss"), "sdss")


# ------------------------------------------------------------------------------------------- SDSS DR7 spSpec

EMLINE, BRIGHTSKY = 1 << 30, 1 << 23


def make_spspec(real_data_dir, tmp_path, name="spSpec-51602-0266-001.fit", rows=5):
    """A DR7 spSpec file built from the published layout (DR7 data model): a primary image whose rows are flux,
    continuum-subtracted flux, error (sigma), mask, [...]; the grid in COEFF0/COEFF1; redshift and ids in the
    header; binary tables after it (HDU 1: emission-line fits with columns wave, waveErr, ...). The values are
    those of the DR16 file of the same plate/MJD/fiber, with mask bits and bad errors added."""
    src = real_data_dir / "sdss" / "spec-0266-51602-0001.fits"
    with fits.open(src) as h:
        d, meta = h[1].data, h[2].data[0]
        loglam = np.asarray(d["loglam"], np.float64)
        flux = np.asarray(d["flux"], np.float32)
        ivar = np.asarray(d["ivar"], np.float64)
        mask = np.asarray(d["and_mask"], np.int64)
        z, z_err = float(meta["Z"]), float(meta["Z_ERR"])
    err = np.where(ivar > 0, 1 / np.sqrt(np.where(ivar > 0, ivar, 1)), 0.0).astype(np.float32)
    err[100:105] = -1.0  # error ≤ 0: no information
    mask[2000:2040] |= EMLINE  # an emission line: informational, not bad
    mask[2100:2110] |= BRIGHTSKY  # bad
    image = np.zeros((rows, flux.size), np.float32)
    image[0], image[1], image[2], image[3] = flux, flux - np.median(flux), err, mask.astype(np.float32)
    hdu = fits.PrimaryHDU(image)
    coeff0 = round(float(loglam[0]), 4)
    assert abs(coeff0 - loglam[0]) < 1e-6
    for k, v in dict(COEFF0=coeff0, COEFF1=1e-4, CRVAL1=coeff0, CD1_1=1e-4, Z=z, Z_ERR=z_err, Z_CONF=0.99,
                     Z_STATUS=4, Z_WARNIN=0, SPEC_CLN=2, PLATEID=266, MJD=51602, FIBERID=1,
                     OBJID="587722 40 2 176 147", NAME="51602-0266-001", VACUUM=True).items():
        hdu.header[k] = v
    lines = fits.BinTableHDU.from_columns([fits.Column(name=n, format="E", array=np.zeros(3, np.float32))
                                           for n in ("wave", "waveErr", "waveMin", "height", "sigma")])
    path = tmp_path / name
    fits.HDUList([hdu, lines]).writeto(path)
    return path, src


def spspec_expected(path, grid):
    """Independent astropy read of the spSpec file, placed on `grid` by rounding the pixel coordinate."""
    with fits.open(path) as h:
        data, head = np.asarray(h[0].data, np.float64), h[0].header
        wave_log = head["COEFF0"] + head["COEFF1"] * np.arange(data.shape[1])
        z, z_err = head["Z"], head["Z_ERR"]
    g = GRIDS[grid]
    idx = np.rint((wave_log - g["start"]) / g["step"]).astype(int)
    mask = data[3].astype(np.int64)
    good = (data[2] > 0) & ((mask & ~EMLINE) == 0)
    ivar = np.where(good, 1 / np.where(good, data[2], 1) ** 2, 0.0)
    return dict(idx=idx, flux=data[0], ivar=ivar, and_mask=(~good).astype(int), z=z, z_err=z_err)


@pytest.mark.parametrize("reader", ["fast", "astropy"])
def test_sdss_dr7_spspec_matches_astropy(real_data_dir, tmp_path, reader):
    path, dr16 = make_spspec(real_data_dir, tmp_path)
    renamed, _ = make_spspec(real_data_dir, tmp_path, name="galaxy.fits", rows=4)  # recognised by its header
    rep = ingest([str(path), str(renamed)], tmp_path / "dr7.h5", jobs=1, progress=False, reader=reader)
    assert [f.error for f in rep.files] == [None, None] and rep.n_ingested == 2
    assert rep.instrument == "sdss" and rep.files[0].kind == "sdss-dr7-spspec"
    h5 = read_h5(tmp_path / "dr7.h5")
    e = spspec_expected(path, "sdss")
    with fits.open(dr16) as h:
        e["object_id"] = int(h[2].data["SPECOBJID"][0])  # DR16's SPECOBJID of the same plate/MJD/fiber
    for i in range(2):
        check_sdss_row(h5, i, e, "sdss")
    sdss_px = e["idx"]
    assert h5["spectrum_mask"][0][sdss_px[2100:2110]].all()  # BRIGHTSKY: bad
    assert h5["spectrum_mask"][0][sdss_px[100:105]].all()  # error ≤ 0: bad, ivar 0
    assert (h5["spectrum_ivar"][0][sdss_px[100:105]] == 0).all()
    line = sdss_px[2000:2040]
    assert not h5["spectrum_mask"][0][line][~sky_mask(grid_wave("sdss"))[line]].any()  # EMLINE: kept
    with h5py.File(tmp_path / "dr7.h5") as h:
        assert h["source/plate"][0] == 266 and h["source/mjd"][0] == 51602 and h["source/fiber"][0] == 1
        assert h["source/class"][0] == b"GALAXY"


def test_sdss_dr7_class_and_missing_card(real_data_dir, tmp_path):
    path, _ = make_spspec(real_data_dir, tmp_path)
    rep = ingest([str(path)], tmp_path / "o.h5", jobs=1, progress=False, spectypes=["QSO"])
    assert rep.n_ingested == 0 and "SPEC_CLN GALAXY not in QSO" in rep.files[0].skipped[0]["reason"]
    with fits.open(path, mode="update") as h:
        del h[0].header["Z"]
    rep = ingest([str(path)], tmp_path / "o.h5", jobs=1, progress=False)
    assert rep.files[0].error == f"{path}: HDU 0 (primary) header has no Z card"


# ------------------------------------------------------------------------------------------- unknown files


def _unknown_files(d):
    """Files no survey reads, one of each kind fastspec should name."""
    out = {}
    cube = fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((5, 4, 4), np.float32), name="FLUX"),
                         fits.ImageHDU(np.zeros((5, 4, 4), np.float32), name="IVAR"),
                         fits.ImageHDU(np.zeros((5, 4, 4), np.int32), name="MASK"),
                         fits.ImageHDU(np.arange(5.0), name="WAVE")])
    out["manga-7443-12703-LOGCUBE.fits"] = (cube, "a MaNGA data cube")
    iraf = fits.PrimaryHDU(np.ones(100, np.float32))
    iraf.header.update(CRVAL1=3.6, CDELT1=1e-4, DC_FLAG=1, CTYPE1="LINEAR")
    out["ngc1234.fits"] = (fits.HDUList([iraf]), "an IRAF 1-D spectrum image (shape (100,)")
    eso_head = fits.PrimaryHDU()
    eso_head.header["PRODCATG"] = "SCIENCE.SPECTRUM"
    eso_tab = fits.BinTableHDU.from_columns([fits.Column(name=n, format="10E", array=np.zeros((1, 10)))
                                             for n in ("WAVE", "FLUX", "ERR")])
    out["ADP.2017-01-01T00:00:00.000.fits"] = (fits.HDUList([eso_head, eso_tab]), "an ESO Phase 3 spectrum")
    tab = fits.BinTableHDU.from_columns([fits.Column(name=n, format="E", array=np.zeros(3)) for n in ("ra", "dec")])
    out["catalog.fits"] = (fits.HDUList([fits.PrimaryHDU(), tab]), "a table with columns ra, dec (HDU 1)")
    for name, (hdul, _) in out.items():
        hdul.writeto(d / name)
    return {d / name: what for name, (_, what) in out.items()}


@pytest.mark.parametrize("reader", ["fast", "astropy"])
def test_unknown_files_are_named_with_what_would_be_needed(tmp_path, reader):
    files = _unknown_files(tmp_path)
    rep = ingest([str(p) for p in files], tmp_path / "o.h5", jobs=1, progress=False, reader=reader)
    assert rep.n_ingested == 0 and not (tmp_path / "o.h5").exists()
    for f, (p, what) in zip(rep.files, files.items()):
        assert f.error.startswith(f"{p}: {what}"), f.error
        assert "fastspec.ingest.from_arrays" in f.error


# ------------------------------------------------------------------------------------------- arrays


def test_from_arrays_writes_what_ingest_writes(real_data_dir, tmp_path):
    """Arrays read with astropy go through the same placement, masks and normalisation as the file: the two
    outputs hold the same numbers, and the arrays' rows can be appended to an ingest output."""
    from fastspec.ingest import from_arrays

    files = [real_data_dir / "sdss" / n for n in ("spec-0266-51602-0001.fits", "spec-1045-52725-0628.fits")]
    ingest([str(f) for f in files], tmp_path / "files.h5", instrument="sdss", jobs=1, progress=False)
    e = [sdss_expected(f, "sdss") for f in files]
    with fits.open(files[0]) as h0, fits.open(files[1]) as h1:
        loglam = [np.asarray(h[1].data["loglam"], np.float64) for h in (h0, h1)]
        mask = [np.asarray(h[1].data["and_mask"]) for h in (h0, h1)]
    n = min(x.size for x in loglam)  # a common length, each row with its own wavelengths
    spectra, rep = from_arrays(np.stack([10 ** x[:n] for x in loglam]), np.stack([x["flux"][:n] for x in e]),
                               np.stack([x["ivar"][:n] for x in e]), [x["z"] for x in e],
                               z_err=[x["z_err"] for x in e], object_id=[x["object_id"] for x in e],
                               mask=np.stack([m[:n] for m in mask]), output=tmp_path / "arrays.h5")
    assert rep.instrument == "sdss" and rep.n_ingested == 2 and rep.error is None  # inferred from the grid
    a, b = read_h5(tmp_path / "files.h5"), read_h5(tmp_path / "arrays.h5")
    for i, x in enumerate(e):
        x = {k: (v[:n] if isinstance(v, np.ndarray) else v) for k, v in x.items()}
        check_sdss_row(b, i, x, "sdss")
        covered = np.zeros(GRIDS["sdss"]["L"], bool)
        covered[x["idx"]] = True
        np.testing.assert_array_equal(a["spectrum_flux"][i][covered], b["spectrum_flux"][i][covered])
    np.testing.assert_array_equal(a["object_id"], b["object_id"])
    from_arrays(10 ** loglam[0], e[0]["flux"], e[0]["ivar"], e[0]["z"], z_err=e[0]["z_err"], instrument="sdss",
                mask=mask[0], object_id=[e[0]["object_id"]], output=tmp_path / "files.h5", append=True,
                source="my-arrays")
    c = read_h5(tmp_path / "files.h5")
    assert c["file"][-1] == "my-arrays" and len(c["Z"]) == 3
    for k in ("spectrum_flux", "spectrum_ivar", "spectrum_mask", "norm", "Z", "Z_ERR", "object_id"):
        np.testing.assert_array_equal(c[k][2], a[k][0], err_msg=k)


def test_from_arrays_checks_name_row_and_field(tmp_path):
    from fastspec.ingest import IngestError, from_arrays

    wave = 10 ** (3.6 + 1e-4 * np.arange(3000))
    rng = np.random.default_rng(1)
    flux = rng.normal(5, 1, (3, 3000))
    ivar = np.full((3, 3000), 4.0)
    flux[1, 7] = np.nan
    with pytest.raises(IngestError, match=r"^cube: row 1: field flux: pixel 7 is nan \(not finite"):
        from_arrays(wave, flux, ivar, [0.1, 0.1, 0.1], source="cube")
    flux[1, 7] = 1.0
    with pytest.raises(IngestError, match=r"field ivar has shape \(3, 10\), expected \(3, 3000\)"):
        from_arrays(wave, flux, ivar[:, :10], [0.1, 0.1, 0.1])
    with pytest.raises(IngestError, match=r"field wave: wavelengths are not on the sdss grid .* never interpolates"):
        from_arrays(wave * 1.0001, flux, ivar, [0.1, 0.1, 0.1], instrument="sdss")
    with pytest.raises(IngestError, match=r"lie on no known instrument grid"):
        from_arrays(np.linspace(4000, 8000, 3000), flux, ivar, [0.1, 0.1, 0.1])
    spectra, rep = from_arrays(wave, flux, ivar, [0.1, np.nan, 0.1], object_id=[5, 6, 7])
    assert rep.n_ingested == 2 and list(spectra.object_id) == [5, 7]
    assert rep.skipped == [{"row": 1, "object_id": 6, "reason": "z is nan"}]
    assert spectra.extra["source/row"].tolist() == [0, 2]
