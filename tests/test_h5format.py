"""The HDF5 spectra layout: round trip, chunking, attributes, append, atomicity, big-endian input, errors."""
import os

import h5py
import numpy as np
import pytest
import torch

from fastspec.h5format import FORMAT, FORMAT_VERSION, SpectraFile, SpectraWriter
from fastspec.spectra import SpectraFormatError
from fastspec.spectra_io import open_spectra

L_SDSS = 3921


def _rows(n, L=L_SDSS, seed=0, id0=0):
    rng = np.random.default_rng(seed)
    return dict(
        flux=rng.normal(1.0, 0.3, (n, L)).astype(np.float32),
        ivar=rng.uniform(0.0, 4.0, (n, L)).astype(np.float32),
        mask=rng.random((n, L)) < 0.1,
        z=rng.uniform(0.0, 0.5, n),
        z_err=rng.uniform(1e-5, 1e-4, n).astype(np.float32),
        object_id=np.arange(id0, id0 + n, dtype=np.uint64) + np.uint64(2**62),
        norm=rng.uniform(0.5, 20.0, n).astype(np.float32),
    )


def _extra(n, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "truth/coeffs": rng.random((n, 5)),
        "truth/sigma_v": rng.uniform(50, 300, n).astype(np.float32),
        "source/file": np.array([f"spec-{i:04d}.fits" for i in range(n)]),
    }


def _files_in(d):
    return sorted(os.listdir(d))


def test_round_trip_every_column(tmp_path):
    path = tmp_path / "s.h5"
    r, ex = _rows(7), _extra(7)
    with SpectraWriter(path, "sdss") as w:
        w.write(**r, extra=ex)
    with SpectraFile(path) as f:
        assert len(f) == f.n == 7
        b = f.read()
        np.testing.assert_array_equal(b.flux, r["flux"])
        np.testing.assert_array_equal(b.ivar, r["ivar"])
        np.testing.assert_array_equal(b.mask, r["mask"])
        np.testing.assert_array_equal(b.z, r["z"])
        np.testing.assert_array_equal(b.z_err, r["z_err"])
        np.testing.assert_array_equal(b.object_id, r["object_id"])  # ids above 2**62 survive exactly
        np.testing.assert_array_equal(b.norm, r["norm"])
        assert (b.flux.dtype, b.ivar.dtype, b.mask.dtype, b.z.dtype, b.object_id.dtype) == (
            np.float32, np.float32, np.bool_, np.float64, np.uint64)
        np.testing.assert_array_equal(b.weights, np.where(r["mask"], 0, r["ivar"]))
        np.testing.assert_array_equal(f.read_column("truth/coeffs"), ex["truth/coeffs"])
        np.testing.assert_array_equal(f.read_column("truth/sigma_v"), ex["truth/sigma_v"])
        np.testing.assert_array_equal(f.read_column("source/file"), ex["source/file"].astype("S"))
        np.testing.assert_array_equal(f.read_column("truth/coeffs", 2, 4), ex["truth/coeffs"][2:4])
        assert set(f.columns()) >= {"truth/coeffs", "truth/sigma_v", "source/file", "wave_obs", "norm"}
        part = f.read(3, 5)
        assert part.start == 3 and len(part) == 2
        np.testing.assert_array_equal(part.flux, r["flux"][3:5])
        with pytest.raises(SpectraFormatError, match=r"s\.h5: no field 'truth/missing'"):
            f.read_column("truth/missing")
        with pytest.raises(IndexError, match=r"rows \[5, 2\)"):
            f.read(5, 2)


def test_attrs_and_grid(tmp_path):
    path = tmp_path / "s.h5"
    with SpectraWriter(path, "desi", attrs={"source": "unit test"}) as w:
        w.write(**_rows(2, L=7781))
    with h5py.File(path, "r") as h:
        assert h.attrs["format"] == FORMAT == "fastspec-spectra"
        assert h.attrs["format_version"] == FORMAT_VERSION
        assert h.attrs["instrument"] == "desi"
        assert h.attrs["source"] == "unit test"
        np.testing.assert_allclose(h["wave_obs"][:], 3600.0 + 0.8 * np.arange(7781), rtol=0, atol=1e-9)
    with SpectraFile(path) as f:
        assert f.instrument.name == "desi"
        np.testing.assert_array_equal(f.wave_obs, f.instrument.wave_obs)
    path2 = tmp_path / "t.h5"
    with SpectraWriter(path2, "sdss") as w:
        w.write(**_rows(1))
    with SpectraFile(path2) as f:
        np.testing.assert_allclose(f.wave_obs, 10 ** (3.578 + 1e-4 * np.arange(L_SDSS)), rtol=1e-12)


def test_chunked_by_rows(tmp_path):
    path = tmp_path / "s.h5"
    with SpectraWriter(path, "sdss") as w:
        w.write(**_rows(100), extra=_extra(100))
    with h5py.File(path, "r") as h:
        for name in ("spectrum_flux", "spectrum_ivar", "spectrum_mask", "Z", "Z_ERR", "object_id", "norm",
                     "truth/coeffs", "source/file"):
            ds = h[name]
            assert ds.chunks is not None, name
            assert ds.chunks[1:] == ds.shape[1:], f"{name}: a chunk must hold whole rows"
            assert ds.maxshape[0] is None, f"{name}: must be appendable"
        rows = h["spectrum_flux"].chunks[0]
        assert 16 <= rows <= 100 and rows * L_SDSS * 4 <= (1 << 20)


def test_compressed_file_round_trips_and_streams(tmp_path):
    from fastspec.loader.mapped import MappedFile

    path = tmp_path / "c.h5"
    rows = _rows(40)
    with SpectraWriter(path, "sdss", compression=6) as w:
        w.write(**rows, extra=_extra(40))
    with SpectraWriter(path, "sdss", append=True) as w:  # appended rows go through the same filters
        w.write(**_rows(5, seed=3, id0=40), extra=_extra(5))
    with h5py.File(path, "r") as h:
        for name in ("spectrum_flux", "spectrum_ivar", "spectrum_mask", "Z", "source/file"):
            assert h[name].compression == "gzip" and h[name].shuffle, name
        assert h["wave_obs"].compression is None
    with SpectraFile(path) as f:
        assert len(f) == 45 and MappedFile.open(f) is None  # no memory map of filtered data: read via h5py
        np.testing.assert_array_equal(f.read(0, 40).flux, rows["flux"])
    with pytest.raises(ValueError, match="compression must be a gzip level 1-9"):
        SpectraWriter(tmp_path / "x.h5", "sdss", compression="lzf")


def test_zero_row_file_is_valid(tmp_path):
    path = tmp_path / "empty.h5"
    with SpectraWriter(path, "boss"):
        pass
    with SpectraFile(path) as f:
        assert len(f) == 0
        b = f.read()
        assert b.flux.shape == (0, 4685) and len(b) == 0


def test_append_adds_rows(tmp_path):
    path = tmp_path / "s.h5"
    a, b = _rows(3, seed=1, id0=0), _rows(4, seed=2, id0=3)
    with SpectraWriter(path, "sdss", append=True) as w:  # append to a missing file creates it
        w.write(**a, extra=_extra(3))
    with SpectraWriter(path, "sdss", append=True) as w:
        assert w.n == 3
        w.write(**b, extra=_extra(4, seed=5))
    with SpectraFile(path) as f:
        assert len(f) == 7
        got = f.read()
        np.testing.assert_array_equal(got.flux, np.concatenate([a["flux"], b["flux"]]))
        np.testing.assert_array_equal(got.object_id, np.concatenate([a["object_id"], b["object_id"]]))
        np.testing.assert_array_equal(got.z, np.concatenate([a["z"], b["z"]]))
        files = f.read_column("source/file")
        assert files.shape == (7,) and files[3] == b"spec-0000.fits"
    assert _files_in(tmp_path) == ["s.h5"]


def test_append_strings_longer_than_before_are_kept(tmp_path):
    path = tmp_path / "s.h5"
    with SpectraWriter(path, "sdss") as w:
        w.write(**_rows(1), extra={"source/file": np.array(["a"])})
        w.write(**_rows(1), extra={"source/file": np.array(["a-much-longer-name.fits"])})
    with SpectraFile(path) as f:
        assert list(f.read_column("source/file")) == [b"a", b"a-much-longer-name.fits"]


def test_append_refuses_other_instrument(tmp_path):
    path = tmp_path / "s.h5"
    with SpectraWriter(path, "sdss") as w:
        w.write(**_rows(2))
    before = path.read_bytes()
    with pytest.raises(SpectraFormatError, match=r"s\.h5: cannot append desi spectra to a file of instrument 'sdss'"):
        SpectraWriter(path, "desi", append=True)
    assert path.read_bytes() == before
    assert _files_in(tmp_path) == ["s.h5"]


def test_append_refuses_non_fastspec_file(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as h:
        h["x"] = np.arange(3)
    with pytest.raises(SpectraFormatError, match=r"other\.h5: cannot append: not a fastspec spectra file"):
        SpectraWriter(path, "sdss", append=True)


def test_append_must_give_the_same_columns(tmp_path):
    path = tmp_path / "s.h5"
    with SpectraWriter(path, "sdss") as w:
        w.write(**_rows(2), extra={"truth/a": np.zeros(2)})
    with pytest.raises(SpectraFormatError, match=r"missing truth/a; new truth/b"):
        with SpectraWriter(path, "sdss", append=True) as w:
            w.write(**_rows(2), extra={"truth/b": np.zeros(2)})
    with SpectraFile(path) as f:
        assert len(f) == 2 and "truth/b" not in f.columns()


def test_exception_leaves_no_file_and_no_tmp(tmp_path):
    path = tmp_path / "s.h5"
    with pytest.raises(RuntimeError, match="boom"):
        with SpectraWriter(path, "sdss") as w:
            w.write(**_rows(2))
            raise RuntimeError("boom")
    assert _files_in(tmp_path) == []


@pytest.mark.parametrize("append", [False, True])
def test_exception_leaves_existing_file_untouched(tmp_path, append):
    path = tmp_path / "s.h5"
    with SpectraWriter(path, "sdss") as w:
        w.write(**_rows(2))
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with SpectraWriter(path, "sdss", append=append) as w:
            w.write(**_rows(3, seed=9))
            assert not os.path.samefile(w.tmp, path)
            raise RuntimeError("interrupted")
    assert path.read_bytes() == before
    assert _files_in(tmp_path) == ["s.h5"]


def test_writer_errors_name_file_and_field(tmp_path):
    path = tmp_path / "s.h5"
    r = _rows(3)
    with pytest.raises(SpectraFormatError, match=r"s\.h5.*field spectrum_ivar has shape \(3, 100\), expected \(3, 3921\)"):
        with SpectraWriter(path, "sdss") as w:
            w.write(**{**r, "ivar": np.ones((3, 100))})
    with pytest.raises(SpectraFormatError, match=r"field Z has shape \(2,\), expected \(3,\)"):
        with SpectraWriter(path, "sdss") as w:
            w.write(**{**r, "z": np.zeros(2)})
    with pytest.raises(SpectraFormatError, match=r"extra field truth/x has \(2,\) rows, expected 3"):
        with SpectraWriter(path, "sdss") as w:
            w.write(**r, extra={"truth/x": np.zeros(2)})
    with pytest.raises(SpectraFormatError, match=r"row 1: object_id: negative value -5"):
        with SpectraWriter(path, "sdss") as w:
            w.write(**{**r, "object_id": np.array([1, -5, 2])})
    with pytest.raises(SpectraFormatError, match=r"row 2: object_id: 'J1234' is not a non-negative integer"):
        with SpectraWriter(path, "sdss") as w:
            w.write(**{**r, "object_id": np.array([b"1", b"2", b"J1234"])})
    assert _files_in(tmp_path) == []


def test_object_id_decimal_strings_are_parsed(tmp_path):
    # SDSS SPECOBJID is a right-aligned string in the FITS tables; 299646907137943552 > 2**53.
    path = tmp_path / "s.h5"
    with SpectraWriter(path, "sdss") as w:
        w.write(**{**_rows(2), "object_id": np.array([b"    299646907137943552", b"7"])})
    with SpectraFile(path) as f:
        assert f.read().object_id.tolist() == [299646907137943552, 7]


def _write_raw(path, byteorder=">", instrument="sdss", wave=None, version=FORMAT_VERSION, n=4, seed=3):
    """A fastspec-layout file written with h5py directly, arrays in the given byte order."""
    r = _rows(n, seed=seed)
    bo = byteorder
    with h5py.File(path, "w") as h:
        h.attrs["format"] = FORMAT
        h.attrs["format_version"] = version
        h.attrs["instrument"] = instrument
        h["wave_obs"] = (10 ** (3.578 + 1e-4 * np.arange(L_SDSS)) if wave is None else wave).astype(bo + "f8")
        h["spectrum_flux"] = r["flux"].astype(bo + "f4")
        h["spectrum_ivar"] = r["ivar"].astype(bo + "f4")
        h["spectrum_mask"] = r["mask"]
        h["Z"] = r["z"].astype(bo + "f8")
        h["Z_ERR"] = r["z_err"].astype(bo + "f4")
        h["object_id"] = r["object_id"].astype(bo + "u8")
        h["norm"] = r["norm"].astype(bo + "f4")
    return r


def test_reads_big_endian_arrays(tmp_path):
    path = tmp_path / "be.h5"
    r = _write_raw(path, ">")
    with h5py.File(path, "r") as h:
        assert h["spectrum_flux"].dtype.byteorder == ">"  # the test really stores big-endian data
    with open_spectra(path) as f:
        assert isinstance(f, SpectraFile)
        b = f.read()
        for got, want in ((b.flux, r["flux"]), (b.ivar, r["ivar"]), (b.z, r["z"]), (b.z_err, r["z_err"]),
                          (b.object_id, r["object_id"]), (b.norm, r["norm"])):
            assert got.dtype.byteorder in "=|", got.dtype
            np.testing.assert_array_equal(got, want)
        t = torch.from_numpy(b.flux)  # torch refuses big-endian arrays
        assert torch.equal(t, torch.from_numpy(r["flux"]))
        assert f.read_column("Z").dtype.byteorder in "=|"


def test_reader_errors_name_file_and_field(tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(SpectraFormatError, match=r"junk\.h5: cannot open as HDF5"):
        SpectraFile(junk)
    with pytest.raises(SpectraFormatError, match=r"junk\.h5: cannot open as HDF5"):
        open_spectra(junk)

    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as h:
        h["spectrum_flux"] = np.zeros((2, 3))
    with pytest.raises(SpectraFormatError, match=r"other\.h5: not a fastspec spectra file \(format attribute None\)"):
        SpectraFile(other)
    with pytest.raises(SpectraFormatError, match=r"other\.h5: neither a fastspec spectra file .* nor a Multimodal"):
        open_spectra(other)

    newer = tmp_path / "newer.h5"
    _write_raw(newer, "<", version=FORMAT_VERSION + 1)
    with pytest.raises(SpectraFormatError, match=r"newer\.h5: format_version 2 is newer than this fastspec \(1\)"):
        SpectraFile(newer)

    unknown = tmp_path / "unknown.h5"
    _write_raw(unknown, "<", instrument="lamost")
    with pytest.raises(SpectraFormatError, match=r"unknown\.h5: instrument attribute: unknown instrument 'lamost'"):
        SpectraFile(unknown)

    shifted = tmp_path / "shifted.h5"
    wave = 10 ** (3.578 + 1e-4 * np.arange(L_SDSS))
    wave[100:] = 10 ** (3.5781 + 1e-4 * np.arange(100, L_SDSS))  # a one-pixel shift from pixel 100 on
    _write_raw(shifted, "<", wave=wave)
    with pytest.raises(SpectraFormatError, match=r"shifted\.h5: wave_obs: differs from the sdss grid first at pixel 100"):
        SpectraFile(shifted)
    with SpectraFile(shifted, check_grid=False) as f:  # validate reads such files to report every problem
        assert len(f) == 4

    good = tmp_path / "good.h5"
    _write_raw(good, "<")
    with pytest.raises(SpectraFormatError, match=r"good\.h5: instrument: the file holds sdss spectra, desi was asked"):
        SpectraFile(good, instrument="desi")
    with SpectraFile(good, instrument="SDSS") as f:
        assert f.instrument.name == "sdss"


def test_object_id_error_names_the_file_row_when_appending(tmp_path):
    path = tmp_path / "s.h5"
    with SpectraWriter(path, "sdss") as w:
        w.write(**_rows(5))
    with pytest.raises(SpectraFormatError, match=r"s\.h5: row 6: object_id: negative value -1"):
        with SpectraWriter(path, "sdss", append=True) as w:
            w.write(**{**_rows(3), "object_id": np.array([0, -1, 2])})
    with SpectraFile(path) as f:
        assert len(f) == 5
