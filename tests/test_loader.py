"""Streaming loader: every row once per epoch with the values the file holds (read back with plain h5py),
deterministic order (seed, epoch, shards) independent of workers and world size, disjoint DDP shards,
cheap mid-epoch resume, the stable validation split, and errors that name file, row and field."""
import hashlib
import os

import h5py
import numpy as np
import pytest
import torch

from fastspec.h5format import SpectraWriter
from fastspec.instruments import get_instrument
from fastspec.loader import SpectraLoader, stable_fraction, validation_mask
from fastspec.spectra import SpectraFormatError

L = get_instrument("sdss").L


def write(path, n, seed=0, id0=0, instrument="sdss", nan_rows=(), masked_nan_rows=()):
    inst = get_instrument(instrument)
    rng = np.random.default_rng(seed)
    flux = rng.normal(1.0, 0.2, (n, inst.L)).astype(np.float32)
    ivar = rng.uniform(10, 50, (n, inst.L)).astype(np.float32)
    mask = rng.random((n, inst.L)) < 0.05
    ivar[:, :7] = 0.0  # pixels without data
    for r in nan_rows:
        flux[r, 100] = np.nan
    for r in masked_nan_rows:
        flux[r, 200] = np.nan
        mask[r, 200] = True
    with SpectraWriter(path, instrument) as w:
        w.write(flux, ivar, mask, rng.uniform(0, 0.5, n), np.full(n, 1e-4), np.arange(id0, id0 + n))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("loader")
    return [write(d / "a.h5", 203, seed=1, id0=1000), write(d / "b.h5", 117, seed=2, id0=5000)]


def reference(paths):
    """(y, w, z) per global row from plain h5py: y = flux where w > 0 else 0, w = ivar where not masked."""
    ys, ws, zs = [], [], []
    for p in paths:
        with h5py.File(p, "r") as h:
            flux, ivar, mask = h["spectrum_flux"][:], h["spectrum_ivar"][:], h["spectrum_mask"][:]
            w = np.where(mask | (ivar <= 0), 0.0, ivar).astype(np.float32)
            ys.append(np.where(w > 0, flux, 0.0).astype(np.float32))
            ws.append(w)
            zs.append(h["Z"][:].astype(np.float32))
    return np.concatenate(ys), np.concatenate(ws), np.concatenate(zs)


def order(loader, epoch=0, skip=0):
    return torch.cat([b.index for b in loader.iterate(epoch, skip_batches=skip)]).numpy()


def test_every_row_once_with_the_file_values(files):
    y_ref, w_ref, z_ref = reference(files)
    loader = SpectraLoader(files, batch_size=16, block_rows=32, shuffle_blocks=2, seed=3, num_workers=0,
                           drop_last=False)
    seen = []
    for b in loader:
        assert b.y.dtype == torch.float32 and b.y.shape[1] == L and b.w.shape == b.y.shape
        i = b.index.numpy()
        np.testing.assert_array_equal(b.y.numpy(), y_ref[i])
        np.testing.assert_array_equal(b.w.numpy(), w_ref[i])
        np.testing.assert_array_equal(b.z.numpy(), z_ref[i])
        seen.append(i)
    seen = np.concatenate(seen)
    assert sorted(seen.tolist()) == list(range(203 + 117))
    # shuffled across files, not in file order
    assert not np.array_equal(seen, np.arange(len(seen)))
    assert loader.locate(203 + 5) == (str(files[1]), 5)


def test_order_depends_on_seed_and_epoch_not_on_workers(files):
    kw = dict(batch_size=16, block_rows=32, shuffle_blocks=2)
    a = SpectraLoader(files, seed=7, num_workers=0, **kw)
    b = SpectraLoader(files, seed=7, num_workers=2, **kw)
    o0 = order(a, 0)
    np.testing.assert_array_equal(o0, order(b, 0))
    np.testing.assert_array_equal(order(a, 1), order(b, 1))
    c = SpectraLoader(files, seed=7, num_workers=2, worker_type="process", **kw)
    np.testing.assert_array_equal(order(c, 1), order(a, 1))
    np.testing.assert_array_equal(order(c, 0), o0)  # persistent worker processes follow the epoch
    assert not np.array_equal(o0, order(a, 1))
    assert not np.array_equal(o0, order(SpectraLoader(files, seed=8, num_workers=0, **kw), 0))
    assert len(o0) == len(a) * 16 == (320 // 16) * 16  # drop_last: whole batches only
    b.close()
    c.close()


def test_unshuffled_is_file_order(files):
    loader = SpectraLoader(files, batch_size=50, shuffle=False, num_workers=0, drop_last=False)
    np.testing.assert_array_equal(order(loader), np.arange(320))


def test_ranks_read_disjoint_shards_that_make_up_the_global_batch(files):
    kw = dict(batch_size=32, block_rows=16, shuffle_blocks=3, seed=11, num_workers=0)
    single = list(SpectraLoader(files, shards=2, **kw).iterate(2))
    ranks = [list(SpectraLoader(files, rank=r, world_size=2, **kw).iterate(2)) for r in (0, 1)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) > 0
    for t, b in enumerate(single):
        r0, r1 = ranks[0][t].index, ranks[1][t].index
        assert len(r0) == len(r1) == 16
        torch.testing.assert_close(torch.cat([r0, r1]), b.index, rtol=0, atol=0)
        torch.testing.assert_close(torch.cat([ranks[0][t].y, ranks[1][t].y]), b.y, rtol=0, atol=0)
    rows0 = torch.cat([b.index for b in ranks[0]]).numpy()
    rows1 = torch.cat([b.index for b in ranks[1]]).numpy()
    assert not set(rows0) & set(rows1)
    # each rank reads whole blocks of its own: no block is shared between ranks
    assert not {i // 16 for i in rows0 if i < 203} & {i // 16 for i in rows1 if i < 203}


def test_skip_batches_resumes_mid_epoch_and_skips_reading(files, monkeypatch):
    kw = dict(batch_size=16, block_rows=16, shuffle_blocks=2, seed=5, num_workers=0)
    full = order(SpectraLoader(files, **kw), 1)
    loader = SpectraLoader(files, **kw)
    reads = []
    from fastspec.loader.reader import ChunkReader

    orig = ChunkReader.read_block

    def counting_read(self, fi, start, stop, dest, *out):
        reads.append((fi, start, stop, int((dest >= 0).sum())))
        return orig(self, fi, start, stop, dest, *out)

    monkeypatch.setattr(ChunkReader, "read_block", counting_read)
    tail = order(loader, 1, skip=13)
    np.testing.assert_array_equal(tail, full[13 * 16 :])
    # whole blocks of block_rows contiguous rows, and the chunks before the resume point not at all
    assert all(stop - start <= 16 for _, start, stop, _ in reads)
    assert len(reads) < len(loader.plan.blocks)
    assert sum(k for *_, k in reads) < 320 - 13 * 16 + 2 * 16  # at most the partly used chunk extra


def test_row_selection_and_stable_validation_split(files):
    ids = np.concatenate([h5py.File(p, "r")["object_id"][:] for p in files])
    # independent: blake2b keyed with the salt over the 8 little-endian bytes of each id
    expect = np.array([int.from_bytes(hashlib.blake2b(int(i).to_bytes(8, "little"), digest_size=8,
                                                      key=b"fastspec-val").digest(), "little") / 2**64
                       for i in ids])
    np.testing.assert_array_equal(stable_fraction(ids), expect)
    is_val = validation_mask(ids, 0.25)
    assert 0.1 < is_val.mean() < 0.4
    rows = [is_val[:203], is_val[203:]]
    val = SpectraLoader(files, batch_size=8, shuffle=False, drop_last=False, num_workers=0, rows=rows)
    trn = SpectraLoader(files, batch_size=8, seed=1, drop_last=False, num_workers=0, rows=[~r for r in rows])
    v, t = order(val), order(trn)
    np.testing.assert_array_equal(np.sort(v), np.flatnonzero(is_val))
    np.testing.assert_array_equal(np.sort(t), np.flatnonzero(~is_val))
    with pytest.raises(ValueError, match="validation fraction"):
        validation_mask(ids, 1.0)
    # index arrays work like masks; out-of-range indices are refused with the file named
    sel = SpectraLoader(files, batch_size=4, shuffle=False, drop_last=False, num_workers=0,
                        rows=[np.array([3, 1, 4]), None])
    assert order(sel)[:3].tolist() == [1, 3, 4]
    with pytest.raises(ValueError, match="a.h5: row index out of range"):
        SpectraLoader(files, batch_size=4, num_workers=0, rows=[np.array([500]), None])


def test_masked_nan_is_zeroed_and_weighted_nan_names_file_row_field(tmp_path):
    p = write(tmp_path / "nan.h5", 40, masked_nan_rows=[3])
    b = next(iter(SpectraLoader([p], batch_size=40, shuffle=False, num_workers=0)))
    assert torch.isfinite(b.y).all() and b.y[3, 200] == 0 and b.w[3, 200] == 0
    q = write(tmp_path / "bad.h5", 40, nan_rows=[17])
    with pytest.raises(SpectraFormatError, match=r"bad\.h5: row 17, field spectrum_flux"):
        list(SpectraLoader([q], batch_size=8, shuffle=False, num_workers=0))
    # excluding the row (what --exclude-bad does) makes the file usable
    keep = np.ones(40, bool)
    keep[17] = False
    assert len(order(SpectraLoader([q], batch_size=8, shuffle=False, num_workers=0, drop_last=False,
                                   rows=[keep]))) == 39


def test_bad_arguments_are_explained(files, tmp_path):
    with pytest.raises(ValueError, match="multiple of shards"):
        SpectraLoader(files, batch_size=15, shards=2, num_workers=0)
    with pytest.raises(ValueError, match="rank 2 is not in a world of size 2"):
        SpectraLoader(files, batch_size=16, rank=2, world_size=2, num_workers=0)
    desi = write(tmp_path / "desi.h5", 4, instrument="desi")
    with pytest.raises(SpectraFormatError, match="desi.h5: instrument 'desi' differs"):
        SpectraLoader([files[0], desi], batch_size=4, num_workers=0)


def test_real_sdss_spectra_from_an_mmu_file(tmp_path, real_data_dir):
    """Real SDSS spectra (astropy-read FITS) in a Multimodal Universe file: big-endian, per-row wavelengths,
    padded rows, string SPECOBJIDs. The loader's general path must deliver the flux and weights the FITS
    files hold, placed on the SDSS grid and normalised by the median in 5300–5850 Å restframe."""
    from astropy.io import fits

    from fastspec.instruments import SKY_LINES

    names = ["spec-0266-51602-0573.fits", "spec-0266-51602-0638.fits", "spec-1045-52725-0628.fits"]
    rows = []
    for n in names:
        with fits.open(real_data_dir / "sdss" / n) as h:
            d, s = h[1].data, h[2].data
            rows.append(dict(loglam=d["loglam"].astype(np.float64), flux=d["flux"], ivar=d["ivar"],
                             mask=d["and_mask"] != 0, z=float(s["Z"][0]), z_err=float(s["Z_ERR"][0]),
                             oid=str(s["SPECOBJID"][0]).encode()))
    rows.append(dict(rows[0], loglam=rows[0]["loglam"] + 0.5e-4, oid=b"1"))  # half a pixel off the grid
    Lmax = max(len(r["flux"]) for r in rows)

    def pad(key, fill):
        return np.stack([np.concatenate([r[key], np.full(Lmax - len(r[key]), fill)]) for r in rows])

    path = tmp_path / "mmu.hdf5"
    with h5py.File(path, "w") as h:  # as MMU's builders write it: padded rows have lambda -1, mask True
        h["spectrum_lambda"] = np.where(np.isnan(pad("loglam", np.nan)), -1.0,
                                        10 ** pad("loglam", 0.0)).astype(">f4")
        h["spectrum_flux"] = pad("flux", 0.0).astype(">f4")
        h["spectrum_ivar"] = pad("ivar", 0.0).astype(">f4")
        h["spectrum_mask"] = pad("mask", True).astype(bool)
        h["Z"] = np.array([r["z"] for r in rows]).astype(">f8")
        h["Z_ERR"] = np.array([r["z_err"] for r in rows]).astype(">f4")
        h["object_id"] = np.array([r["oid"] for r in rows])

    inst = get_instrument("sdss")
    wave = inst.wave_obs
    sky = (np.abs(wave[:, None] - SKY_LINES[None, :]) <= inst.sky_halfwidth).any(axis=1)
    with pytest.raises(SpectraFormatError, match=r"mmu\.hdf5: row 3: spectrum_lambda"):
        list(SpectraLoader([path], batch_size=4, shuffle=False, num_workers=0, drop_last=False))
    loader = SpectraLoader([path], batch_size=3, shuffle=False, num_workers=0, drop_last=False,
                           rows=[np.array([True, True, True, False])])
    b = next(iter(loader))
    for i, r in enumerate(rows[:3]):
        k0 = int(round((r["loglam"][0] - inst.start) / inst.step))
        F, I, M = np.zeros(L), np.zeros(L), np.ones(L, bool)
        F[k0 : k0 + len(r["flux"])] = r["flux"]
        I[k0 : k0 + len(r["flux"])] = r["ivar"]
        M[k0 : k0 + len(r["flux"])] = r["mask"]
        M |= (I <= 0) | sky
        rest = wave / (1 + r["z"])
        norm = np.median(F[(rest >= 5300) & (rest <= 5850) & ~M])
        w_ref = np.where(M, 0.0, I * norm**2)
        y_ref = np.where(w_ref > 0, F / norm, 0.0)
        np.testing.assert_allclose(b.w[i].numpy(), w_ref, rtol=2e-5)
        np.testing.assert_allclose(b.y[i].numpy(), y_ref, rtol=2e-5, atol=1e-6)
        assert b.z[i].item() == pytest.approx(r["z"], rel=1e-6)
    # string ids hash like any other: the split is stable and not degenerate
    ids = np.array([r["oid"] for r in rows[:3]])
    np.testing.assert_array_equal(stable_fraction(ids), stable_fraction(ids.copy()))
    assert len(set(stable_fraction(ids).tolist())) == 3


def test_memory_mapped_reads_match_plain_h5py_at_any_chunk_alignment(tmp_path):
    """Uncompressed files are read through a memory map. Appends of odd sizes put HDF5 chunks at byte offsets
    that are not multiples of 4; every value must still be the file's, masked NaN zeroed, a weighted NaN
    named by file, row and field. Files the map cannot read as they are (compressed, big-endian) go
    through h5py and give the same batches."""
    from fastspec.h5format import SpectraFile
    from fastspec.loader.mapped import MappedFile

    rng = np.random.default_rng(4)
    path = tmp_path / "appended.h5"
    with SpectraWriter(path, "sdss") as wr:
        for k in (50, 37, 91, 29):
            flux = rng.normal(1.0, 0.2, (k, L)).astype(np.float32)
            ivar = rng.uniform(10, 50, (k, L)).astype(np.float32)
            mask = rng.random((k, L)) < 0.05
            flux[::7, 300] = np.nan  # masked NaN in every append
            mask[::7, 300] = True
            wr.write(flux, ivar, mask, rng.uniform(0, 0.5, k), np.full(k, 1e-4), np.arange(k))
    with SpectraFile(path) as f:
        mapped = MappedFile.open(f)
        assert mapped is not None
        offsets = np.concatenate([c[3] for c in mapped.columns[:2]])
        mapped.close()
    assert (offsets % 4 != 0).any()  # the case under test really occurs

    y_ref, w_ref, z_ref = reference([path])

    def check(p, **kw):
        seen = 0
        loader = SpectraLoader([p], batch_size=24, block_rows=40, shuffle_blocks=2, seed=2, num_workers=0,
                               drop_last=False, **kw)
        for b in loader:
            i = b.index.numpy()
            np.testing.assert_array_equal(b.y.numpy(), y_ref[i])
            np.testing.assert_array_equal(b.w.numpy(), w_ref[i])
            np.testing.assert_array_equal(b.z.numpy(), z_ref[i])
            seen += len(i)
        loader.close()
        assert seen == 207

    check(path)
    check(path, memory_map=False)

    for name, column, kw in [("gzip.h5", "spectrum_flux", dict(compression="gzip", chunks=(16, L))),
                             ("bigendian.h5", "spectrum_ivar", dict(dtype=">f4"))]:
        other = tmp_path / name
        with h5py.File(path, "r") as src, h5py.File(other, "w") as dst:
            for key, value in src.attrs.items():
                dst.attrs[key] = value
            for key in src:
                if key == column:
                    dst.create_dataset(key, data=src[key][:], **kw)
                else:
                    src.copy(key, dst)
        with SpectraFile(other) as f:
            assert MappedFile.open(f) is None
        check(other)

    # a weighted NaN past the first chunk: the message names the file's row, not the row within a chunk
    with h5py.File(path, "r+") as h:
        h["spectrum_flux"][150, 1000] = np.nan
        h["spectrum_mask"][150, 1000] = False
        h["spectrum_ivar"][150, 1000] = 20.0
    with pytest.raises(SpectraFormatError, match=r"appended\.h5: row 150, field spectrum_flux: .* pixel 1000"):
        list(SpectraLoader([path], batch_size=8, shuffle=True, num_workers=0))


def test_batches_spanning_chunks_are_views_not_copies(files):
    """Consecutive chunks of a shard write into one allocation, so a batch that takes rows from two chunks is
    a view of it: the batches inside the first slab share one storage, and the rows are still the file's."""
    from fastspec.loader.stream import SLAB_ROWS

    y_ref, _, _ = reference(files)
    loader = SpectraLoader(files, batch_size=24, block_rows=32, shuffle_blocks=1, seed=1, num_workers=0)
    sizes = []
    for c in loader.plan.chunks(0, 0):  # the first slab's chunks: until it holds SLAB_ROWS rows
        if sum(sizes) >= SLAB_ROWS:
            break
        sizes.append(c.n_out)
    inside = sum(sizes) // 24  # batches wholly inside the first slab
    ends = np.cumsum(sizes)[:-1]
    assert inside >= 2 and any(t * 24 < e < (t + 1) * 24 for e in ends for t in range(inside))  # some span
    batches = list(loader.iterate(0))
    assert len({b.y.untyped_storage().data_ptr() for b in batches[:inside]}) == 1
    for b in batches:
        np.testing.assert_array_equal(b.y.numpy(), y_ref[b.index.numpy()])


def _count_chunks(loader, monkeypatch, batch: int) -> tuple[set, list]:
    """Watch `loader`'s pool: (data pointers of the chunk allocations alive now, [most alive at once])."""
    pool, live, peak = loader._pool, set(), [0]

    def counting_empty(shape, dtype, empty=pool.empty):
        t = empty(shape, dtype)
        if len(shape) == 2 and shape[0] != batch:  # a chunk's y or w, not a batch copied across chunks
            live.add(t.data_ptr())
            peak[0] = max(peak[0], len(live))
        return t

    def counting_release(size, buf, release=pool._release):
        live.discard(np.frombuffer(buf, np.uint8).ctypes.data)
        release(size, buf)

    monkeypatch.setattr(pool, "empty", counting_empty)
    monkeypatch.setattr(pool, "_release", counting_release)
    return live, peak


def test_chunks_in_memory_are_bounded_on_cpu(files, monkeypatch):
    """A CPU consumer holds its chunk, the rest of the previous one (for a batch that spans both) and the one
    being read: at most 3 chunks are in memory at once, however long the epoch. Counted
    at the pool, which hands out every chunk's memory and takes it back once no batch views it."""
    import fastspec.loader.stream as stream

    monkeypatch.setattr(stream, "SLAB_ROWS", 1)  # one allocation per chunk and field
    y_ref, _, _ = reference(files)
    batch = 24
    for num_workers in (2, 0):
        loader = SpectraLoader(files, batch_size=batch, block_rows=16, shuffle_blocks=2, seed=4,
                               num_workers=num_workers, device="cpu")
        assert loader.ahead == 1  # the CPU default: one chunk read ahead
        assert len(loader.plan.chunks(0, 0)) >= 8
        live, peak = _count_chunks(loader, monkeypatch, batch)
        rows = 0
        for b in loader.iterate(0):
            np.testing.assert_array_equal(b.y.numpy(), y_ref[b.index.numpy()])
            rows += len(b.z)
            b = None  # as a training step: the batch is let go before the next is asked for
        assert rows == batch * (320 // batch)
        assert 2 <= peak[0] / 2 <= 3, f"{peak[0] / 2} chunks in memory at once with {num_workers} workers"
        assert not live  # every chunk back in the pool once the pass ends
        loader.close()
    with pytest.raises(ValueError, match="prefetch must be at least 1 chunk per reader, got 0"):
        SpectraLoader(files, batch_size=batch, prefetch=0)
    assert SpectraLoader(files, batch_size=batch, num_workers=2, prefetch=3).ahead == 6


def _mapped_rss_kb(path) -> int:
    """Resident kB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()
            if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # a mapping's header line
                inside = len(head) >= 6 and head[5] == str(path)
            elif inside and line.startswith("Rss:"):
                total += int(head[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc/self/smaps")
def test_a_streamed_file_does_not_stay_in_the_resident_set(tmp_path):
    """Blocks read through the memory map are dropped from the process's page tables once read (the page cache
    keeps them): an epoch over a 100 MB file must not leave the file resident, and a second epoch reads the same."""
    path = tmp_path / "big.h5"
    write(path, 3000, seed=9)
    size_kb = os.path.getsize(path) // 1024
    loader = SpectraLoader([path], batch_size=64, block_rows=128, shuffle_blocks=4, seed=1, num_workers=0)
    first = [b.index.numpy().copy() for b in loader.iterate(epoch=0)]
    assert sum(len(i) for i in first) == 3000 - 3000 % 64
    resident = _mapped_rss_kb(path)
    assert 0 <= resident < 0.1 * size_kb, (resident, size_kb)
    y_ref, w_ref, _ = reference([path])
    for b in loader.iterate(epoch=1):  # refaulted from the page cache: the same values
        i = b.index.numpy()
        np.testing.assert_array_equal(b.y.numpy(), y_ref[i])
        np.testing.assert_array_equal(b.w.numpy(), w_ref[i])
    assert _mapped_rss_kb(path) < 0.1 * size_kb
    loader.close()
