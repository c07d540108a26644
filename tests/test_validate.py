"""Validation: per-row checks (find_bad_rows), whole-file checks with statistics (validate_file), and the
`fastspec validate` command (output and exit codes through fastspec.cli.main)."""
import csv
import json
import re

import h5py
import numpy as np
import pytest
from astropy.io import fits

from fastspec import cli
from fastspec.h5format import SpectraFile, SpectraWriter
from fastspec.spectra import Spectra, SpectraFormatError
from fastspec.validate import find_bad_rows, validate_file

L = 3921


def _clean(n, seed=0):
    rng = np.random.default_rng(seed)
    return dict(
        flux=rng.normal(1.0, 0.3, (n, L)).astype(np.float32),
        ivar=rng.uniform(0.5, 4.0, (n, L)).astype(np.float32),
        mask=rng.random((n, L)) < 0.1,
        z=rng.uniform(0.01, 0.45, n),
        z_err=np.full(n, 1e-4, np.float32),
        object_id=np.arange(n, dtype=np.uint64),
        norm=rng.uniform(1, 10, n).astype(np.float32),
    )


def _spoil(r):
    """Known problems at known rows."""
    r["z"][3] = 0.73
    r["z"][5] = np.nan
    r["flux"][7, [10, 20, 30]] = np.nan
    r["ivar"][7, [10, 20, 30]] = 1.0
    r["mask"][7, [10, 20, 30]] = False
    r["flux"][8, 40] = np.nan  # masked: carries no weight, not a problem
    r["mask"][8, 40] = True
    r["ivar"][9, 12] = -1.0
    r["ivar"][11] = 0.0
    r["norm"][13] = np.nan
    r["z"][15] = -0.01
    r["ivar"][17, 5] = np.inf
    return r


def _batch(r, start=0, problems=None):
    return Spectra(r["flux"], r["ivar"], r["mask"], r["z"], r["z_err"], r["object_id"], r["norm"],
                   start=start, problems=problems or {})


def _write(path, r, instrument="sdss"):
    with SpectraWriter(path, instrument) as w:
        w.write(**r)


def test_find_bad_rows_names_row_and_field():
    bad = find_bad_rows(_batch(_spoil(_clean(20))), z_max=0.5)
    assert sorted(bad) == [3, 5, 7, 9, 11, 13, 15, 17]
    assert bad[3] == "Z: 0.73 outside the model's range [0, 0.5]"
    assert bad[5] == "Z: NaN"
    assert bad[7] == "spectrum_flux: NaN/inf at 3 pixels where ivar > 0 and unmasked (first at pixel 10)"
    assert bad[9] == "spectrum_ivar: negative at pixel 12"
    assert bad[11] == "spectrum_ivar: all weights zero"
    assert bad[13] == "norm: not finite"
    assert bad[15] == "Z: -0.01 outside the model's range [0, 0.5]"
    assert bad[17] == "spectrum_ivar: NaN/inf at pixel 5"


def test_find_bad_rows_offsets_z_range_and_reader_problems():
    r = _spoil(_clean(20))
    reader = {106: "spectrum_lambda: pixel 0 at 3800.123 Å is 0.40 pixels off the sdss grid"}
    bad = find_bad_rows(_batch(r, start=100, problems=reader))  # no z_max: only z >= 0 is required
    assert 103 not in bad  # z = 0.73 is fine without a z_max
    assert bad[115] == "Z: -0.01 outside the model's range [0, inf]"
    assert bad[106] == reader[106]
    assert min(bad) >= 100
    r["z"][7] = np.inf
    both = find_bad_rows(_batch(r), z_max=0.5)[7]
    assert both.startswith("spectrum_flux: NaN/inf at 3 pixels") and both.endswith("; Z: inf")


def test_find_bad_rows_clean_and_shape_errors():
    r = _clean(6)
    assert find_bad_rows(_batch(r), z_max=0.5) == {}
    r["ivar"] = r["ivar"][:, :100]
    with pytest.raises(SpectraFormatError, match=r"f\.h5: rows 0–5: field spectrum_ivar has shape \(6, 100\)"):
        find_bad_rows(_batch(r), path="f.h5")


def _median_snr_reference(r):
    meds = []
    for f, iv, m in zip(r["flux"], r["ivar"], r["mask"]):
        w = (iv > 0) & ~m & np.isfinite(f)
        if w.any():
            meds.append(np.median(f[w].astype(np.float64) * np.sqrt(iv[w])))
    return float(np.median(meds))


def test_validate_clean_file_statistics(tmp_path):
    r = _clean(30)
    path = tmp_path / "clean.h5"
    _write(path, r)
    rep = validate_file(path, z_max=0.5)
    assert rep.ok and rep.n_rows == 30 and rep.n_bad == 0 and rep.problems == []
    assert rep.kind == "fastspec" and rep.instrument == "sdss" and rep.format_version == 1
    assert rep.z_min_found == pytest.approx(r["z"].min()) and rep.z_max_found == pytest.approx(r["z"].max())
    assert rep.z_median == pytest.approx(np.median(r["z"]))
    assert rep.masked_fraction == pytest.approx(r["mask"].mean())
    assert rep.median_snr == pytest.approx(_median_snr_reference(r), rel=1e-5)
    rep.raise_for_problems()  # nothing to raise


def test_validate_reports_problems_and_raises(tmp_path):
    r = _spoil(_clean(20))
    path = tmp_path / "bad.h5"
    _write(path, r)
    rep = validate_file(path, z_max=0.5, max_report=3)
    assert not rep.ok and rep.n_bad == 8 and rep.n_problems == 8
    assert rep.problems == [(3, "Z", "0.73 outside the model's range [0, 0.5]"), (5, "Z", "NaN"),
                            (7, "spectrum_flux", "NaN/inf at 3 pixels where ivar > 0 and unmasked (first at pixel 10)")]
    assert rep.bad_by_reason == {
        "Z: missing (NaN/inf)": 1, "Z: outside the model's range": 2, "norm: not finite": 1,
        "spectrum_flux: NaN/inf where ivar > 0": 1, "spectrum_ivar: NaN/inf": 1,
        "spectrum_ivar: all weights zero": 1, "spectrum_ivar: negative": 1}
    with pytest.raises(SpectraFormatError) as info:
        rep.raise_for_problems(limit=2)
    msg = str(info.value)
    assert msg.startswith(f"{path}: row 3: Z: 0.73 outside the model's range [0, 0.5]\n{path}: row 5: Z: NaN\n")
    assert "... and 6 more problem(s)" in msg and "8 bad rows of 20" in msg


def test_validate_reads_in_blocks(tmp_path, monkeypatch):
    r = _spoil(_clean(20))
    path = tmp_path / "bad.h5"
    _write(path, r)
    whole = validate_file(path, z_max=0.5)
    calls = []
    original = SpectraFile.read

    def spy(self, start=0, stop=None):
        calls.append((start, stop))
        return original(self, start, stop)

    monkeypatch.setattr(SpectraFile, "read", spy)
    blocked = validate_file(path, z_max=0.5, block_rows=6)
    assert calls == [(0, 6), (6, 12), (12, 18), (18, 20)]
    assert blocked.problems == whole.problems and blocked.bad_by_reason == whole.bad_by_reason
    assert blocked.masked_fraction == pytest.approx(whole.masked_fraction)
    assert blocked.z_median == whole.z_median


def _raw(path, r, wave, instrument="sdss", version=1, zerr=None):
    with h5py.File(path, "w") as h:
        h.attrs["format"] = "fastspec-spectra"
        if version is not None:
            h.attrs["format_version"] = version
        h.attrs["instrument"] = instrument
        h["wave_obs"] = wave
        h["spectrum_flux"], h["spectrum_ivar"], h["spectrum_mask"] = r["flux"], r["ivar"], r["mask"]
        h["Z"], h["Z_ERR"] = r["z"], r["z_err"] if zerr is None else zerr
        h["object_id"], h["norm"] = r["object_id"], r["norm"]


def test_validate_grid_instrument_and_format(tmp_path):
    r = _clean(4)
    wave = 10 ** (3.578 + 1e-4 * np.arange(L))
    shifted = wave.copy()
    shifted[250:] *= 10**0.5e-4  # half a pixel off from pixel 250
    _raw(tmp_path / "grid.h5", r, shifted)
    rep = validate_file(tmp_path / "grid.h5")
    assert rep.problems[0][:2] == (None, "wave_obs")
    assert "differs from the sdss grid first at pixel 250" in rep.problems[0][2]
    assert rep.rows_checked and rep.n_bad == 0  # the rows are still checked

    _raw(tmp_path / "ok.h5", r, wave)
    rep = validate_file(tmp_path / "ok.h5", instrument="desi")
    assert rep.problems == [(None, "instrument", "the file holds sdss spectra, desi was given")]
    with pytest.raises(SpectraFormatError, match=r"ok\.h5: instrument: the file holds sdss spectra, desi was given"):
        rep.raise_for_problems()
    assert validate_file(tmp_path / "ok.h5", instrument="sdss").ok

    _raw(tmp_path / "nover.h5", r, wave, version=None)
    assert validate_file(tmp_path / "nover.h5").problems == [(None, "format_version", "missing")]
    _raw(tmp_path / "newer.h5", r, wave, version=7)
    rep = validate_file(tmp_path / "newer.h5")
    assert rep.problems == [(None, "format_version", "7 is newer than this fastspec (1)")] and not rep.rows_checked

    _raw(tmp_path / "zerr.h5", r, wave, zerr=np.zeros(3, np.float32))
    rep = validate_file(tmp_path / "zerr.h5")
    assert rep.problems == [(None, "Z_ERR", "has shape (3,), expected (4,)")] and not rep.rows_checked

    with h5py.File(tmp_path / "ok.h5", "a") as h:
        h["truth/coeffs"] = np.zeros((5, 3))
    assert validate_file(tmp_path / "ok.h5").problems == [(None, "truth/coeffs", "has 5 rows, expected 4 like Z")]


def test_validate_mmu_file(tmp_path):
    from test_mmu import _sdss_rows, write_mmu

    rng = np.random.default_rng(7)
    lams, fl, iv, mk = _sdss_rows(rng, [0, 0, 3], [3900, 3900, 3800])
    lams[1] = (10 ** (3.578 + 1e-4 * (np.arange(3900) + 0.4))).astype(np.float32)
    fl[2] = -np.abs(fl[2])
    path = tmp_path / "mmu.hdf5"
    write_mmu(path, lams, fl, iv, mk, [0.1, 0.2, 0.3], [1e-5] * 3, np.array([b"1", b"2", b"3"]))
    rep = validate_file(path, z_max=0.5)
    assert rep.kind == "mmu" and rep.instrument == "sdss" and rep.n_rows == 3
    assert rep.n_bad == 2
    assert rep.problems[0][:2] == (1, "spectrum_lambda") and "0.40 pixels off the sdss grid" in rep.problems[0][2]
    assert (2, "norm", "not finite") in rep.problems
    rep = validate_file(path, instrument="desi")
    assert rep.problems[0][1] == "spectrum_lambda" and "row 0: wavelengths are not on the desi grid" in rep.problems[0][2]


def test_validate_unreadable_inputs(tmp_path):
    (tmp_path / "junk.h5").write_bytes(b"junk")
    rep = validate_file(tmp_path / "junk.h5")
    assert rep.problems[0][:2] == (None, "file") and "cannot open as HDF5" in rep.problems[0][2]
    assert validate_file(tmp_path / "missing.h5").problems == [(None, "file", "does not exist")]


def test_median_snr_matches_the_manifest_on_real_spectra(tmp_path, real_data_dir):
    manifest = {row["file"]: row for row in csv.DictReader(open(real_data_dir / "MANIFEST.tsv"), delimiter="\t")}
    for name in ("sdss/spec-0266-51602-0001.fits", "sdss/spec-0266-51602-0573.fits"):
        with fits.open(real_data_dir / name) as h:
            d = h[1].data
            k0 = int(round((float(d["loglam"][0]) - 3.578) / 1e-4))
            flux, ivar = np.zeros((1, L), np.float32), np.zeros((1, L), np.float32)
            flux[0, k0:k0 + len(d)] = d["flux"]
            ivar[0, k0:k0 + len(d)] = d["ivar"]
            z = float(h[2].data["Z"][0])
        path = tmp_path / name.replace("/", "_").replace(".fits", ".h5")
        _write(path, dict(flux=flux, ivar=ivar, mask=~(ivar > 0), z=[z], z_err=[0], object_id=[1]))
        rep = validate_file(path, z_max=1.0)
        assert rep.ok
        # MANIFEST quotes the median of flux·√ivar over ivar > 0 to three figures.
        assert rep.median_snr == pytest.approx(float(manifest[name]["median_snr_per_pix"]), rel=6e-3)
        assert rep.z_median == pytest.approx(float(manifest[name]["z"]), rel=1e-5)


# ---- the command ------------------------------------------------------------------------------------------


def test_cli_clean_file_exits_0(tmp_path, capsys):
    path = tmp_path / "clean.h5"
    _write(path, _clean(10))
    assert cli.main(["validate", str(path), "--z-max", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "fastspec format v1" in out and "sdss" in out
    assert re.search(r"^rows +10$", out, re.M) and re.search(r"^bad rows +0$", out, re.M)
    assert re.search(r"^status +OK$", out, re.M) and "1 of 1 file(s) clean" in out


def test_cli_problems_exit_1_with_table_and_json(tmp_path, capsys):
    good, bad = tmp_path / "good.h5", tmp_path / "bad.h5"
    _write(good, _clean(10))
    _write(bad, _spoil(_clean(20)))
    js = tmp_path / "report.json"
    rc = cli.main(["validate", str(good), str(bad), "--z-max", "0.5", "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 1
    assert f"{bad}: row 3: Z: 0.73 outside the model's range [0, 0.5]" in out
    assert re.search(r"^  Z: outside the model's range +2$", out, re.M)
    assert re.search(r"^  spectrum_ivar: all weights zero +1$", out, re.M)
    assert "1 of 2 file(s) clean; 1 with problems" in out
    table = [line for line in out.splitlines() if line.startswith(("file ", "good.h5", "bad.h5"))]
    assert table[-2].split()[:3] == ["good.h5", "10", "0"] and table[-1].split()[:3] == ["bad.h5", "20", "8"]
    reports = json.loads(js.read_text())
    assert [r["ok"] for r in reports] == [True, False]
    assert reports[1]["problems"][0] == {"row": 3, "field": "Z", "message": "0.73 outside the model's range [0, 0.5]"}
    assert reports[1]["bad_by_reason"]["spectrum_ivar: negative"] == 1
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []


def test_cli_bad_arguments(tmp_path, capsys):
    path = tmp_path / "clean.h5"
    _write(path, _clean(2))
    assert cli.main(["validate", str(path), "--instrument", "lamost"]) == 2
    assert "--instrument: unknown instrument 'lamost'" in capsys.readouterr().out
    assert cli.main(["validate", str(path), "--instrument", "desi"]) == 1
    assert "instrument: the file holds sdss spectra, desi was given" in capsys.readouterr().out
    assert cli.main(["validate", str(tmp_path / "nope.h5")]) == 1
    assert "nope.h5: file: does not exist" in capsys.readouterr().out
