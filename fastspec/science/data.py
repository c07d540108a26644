"""The spectra a science run measures on: the training mock file, held-out and low-z mock sets with their truth,
held-out spectra moved to other redshifts, the bundled real SDSS spectra, and the real SDSS DR14 galaxies split
into training and held-out galaxies by object_group."""
from __future__ import annotations

import os

import numpy as np
import torch

from ..mock import make_mock, write_mock
from .config import ScienceConfig, say


def observed_arrays(flux, ivar, mask) -> tuple[np.ndarray, np.ndarray]:
    """(y, w) as training sees them: w = ivar with masked / ivar ≤ 0 pixels zeroed, y zeroed there too."""
    w = np.where(mask | ~(ivar > 0), np.float32(0), ivar).astype(np.float32)
    y = np.where(w > 0, flux, np.float32(0)).astype(np.float32)
    return y, w


def mock_set(n, seed, id_offset, z_dist="sdss", z_range=(0.0, 0.5), restframe=True, observed=True,
             features="basic", snr_median=None) -> dict:
    """In-memory mock spectra as arrays: y, w, z, object_id, snr and the truth columns (`truth/...`)."""
    m = make_mock(n, "sdss", seed=seed, z_min=z_range[0], z_max=z_range[1], z_dist=z_dist,
                  restframe_truth=restframe, observed_truth=observed, id_offset=id_offset, features=features,
                  snr_median=snr_median)
    y, w = observed_arrays(m.flux, m.ivar, m.mask)
    out = {"y": y, "w": w, "z": m.z.astype(np.float64), "object_id": m.object_id, "wave_obs": m.wave_obs,
           "wave_rest_truth": m.wave_rest}
    out.update({f"truth/{k}": v for k, v in m.truth.items()})
    return out


def median_snr(y, w) -> np.ndarray:
    """Median of y·sqrt(w) over weighted pixels, per spectrum."""
    snr = np.where(w > 0, y * np.sqrt(w), np.nan)
    return np.nanmedian(snr, axis=1)


def mock_file(cfg, path, n, seed, id_offset) -> str:
    """The training mock file, reused if it exists with the same parameters."""
    import h5py

    from ..mockvar import parse_features

    features = ",".join(parse_features(cfg.mock_features)) or "basic"
    if os.path.exists(path):
        with h5py.File(path, "r") as f:
            if (f.attrs.get("mock_seed") == seed and len(f["Z"]) == n and int(f["object_id"][0]) == id_offset
                    and f.attrs.get("mock_features", "basic") == features):
                say(cfg, f"reusing {path}")
                return path
    say(cfg, f"writing {n} training mock spectra ({cfg.mock_features} features) to {path}")
    write_mock(path, n, "sdss", seed=seed, restframe_truth=False, id_offset=id_offset, progress=cfg.progress,
               features=cfg.mock_features)
    return path


def held_out_sets(cfg: ScienceConfig) -> tuple[dict, dict]:
    """The held-out test set (SDSS-like n(z)) and the low-z set (z uniform in cfg.lowz_range, restframe truth only),
    each from a seed and an object_id range of its own."""
    say(cfg, f"making {cfg.n_test} held-out and {cfg.n_lowz} low-z mock spectra")
    test = mock_set(cfg.n_test, cfg.seed + 1000, 10**9, features=cfg.mock_features)  # rerendered_copies' generator
    lowz = mock_set(cfg.n_lowz, cfg.seed + 2000, 2 * 10**9, z_dist="uniform", z_range=cfg.lowz_range,
                    observed=False, features=cfg.mock_features)
    return test, lowz


def moved_copies(data: dict, idx, z_new) -> dict:
    """Spectra idx moved to every redshift in z_new on their own observed grid (fastspec.augment)."""
    from ..augment import redshift_augment

    idx = np.asarray(idx)
    K = len(z_new)
    y = torch.as_tensor(np.repeat(data["y"][idx], K, 0))
    w = torch.as_tensor(np.repeat(data["w"][idx], K, 0))
    z = torch.as_tensor(np.repeat(data["z"][idx], K).astype(np.float32))
    zn = torch.as_tensor(np.tile(np.asarray(z_new, np.float32), len(idx)))
    y2, w2, z2 = redshift_augment(y, w, z, zn, wave_obs=np.asarray(data["wave_obs"], np.float64))
    return {"y": y2.numpy(), "w": w2.numpy(), "z": z2.numpy().astype(np.float64)}


def invariance_sample(cfg: ScienceConfig, test: dict, wave_obs) -> tuple[np.ndarray, dict]:
    """Which held-out spectra the invariance experiment moves (cfg.n_invariance of those with
    z ≤ cfg.invariance_z_native_max, drawn with the run's seed) and their copies at every z of cfg.invariance_z
    (K = len(cfg.invariance_z) consecutive rows per spectrum)."""
    rng = np.random.default_rng(cfg.seed)
    cand = np.flatnonzero(test["z"] <= cfg.invariance_z_native_max)
    inv_idx = np.sort(rng.choice(cand, size=min(cfg.n_invariance, cand.size), replace=False))
    return inv_idx, moved_copies({**test, "wave_obs": wave_obs}, inv_idx, cfg.invariance_z)


def rerendered_copies(cfg: ScienceConfig, inv_idx, z_own=None) -> dict:
    """The held-out galaxies inv_idx rendered again by the mock generator at every z of cfg.invariance_z — the
    same physical parameters, fresh noise and bad pixels (MockGenerator.rerender) — in the layout of
    invariance_sample's copies (K consecutive rows per galaxy): an invariance test independent of the training's
    augmentation operator. With z_own (one z per galaxy, its own): one re-render each at that z, the noise floor
    of the test (what fresh noise alone moves)."""
    from ..mock import MockGenerator

    K = len(cfg.invariance_z) if z_own is None else 1
    z = (np.tile(np.asarray(cfg.invariance_z, np.float64), len(inv_idx)) if z_own is None
         else np.asarray(z_own, np.float64))
    gen = MockGenerator("sdss", cfg.seed + 1000, 0.5, 0.0, "sdss", None, False, False, 10**9, cfg.mock_features)
    m = gen.rerender(np.repeat(np.asarray(inv_idx), K), z, noise_seed=cfg.seed + (3000 if z_own is None else 4000))
    y, w = observed_arrays(m.flux, m.ivar, m.mask)
    return {"y": y, "w": w, "z": m.z.astype(np.float64)}


def real_sdss_files(real_dir) -> list[str]:
    """The bundled SDSS-I/II spectrograph files (the SDSS grid; BOSS spectra need a BOSS model)."""
    import csv

    real_dir = os.fspath(real_dir)
    with open(os.path.join(real_dir, "MANIFEST.tsv")) as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return [os.path.join(real_dir, r["file"]) for r in rows if r["instrument"] == "SDSS" and r["file"].startswith("sdss/")]


def real_set(real_dir, workdir) -> dict:
    """Ingest the bundled SDSS spectra (fastspec.ingest) and read them back as arrays."""
    from ..ingest import ingest
    from ..spectra_io import open_spectra

    paths = real_sdss_files(real_dir)
    out = os.path.join(workdir, "real-sdss.h5")
    if os.path.exists(out):
        os.remove(out)
    rep = ingest(paths, out, instrument="sdss", jobs=1, progress=False)
    with open_spectra(out) as f:
        b = f.read()
        src = f.read_column("source/plate"), f.read_column("source/mjd"), f.read_column("source/fiber")
        wave_obs = np.asarray(f.wave_obs, np.float64)
    y, w = observed_arrays(b.flux, b.ivar, b.mask)
    names = [f"spec-{p:04d}-{m}-{fi:04d}" for p, m, fi in zip(*src)]
    skipped = [{"file": os.path.relpath(fr.file, real_dir), "reason": fr.reason}
               for fr in rep.files if not fr.n_ingested]
    return {"y": y, "w": w, "z": b.z.astype(np.float64), "object_id": np.asarray(names), "n_files": len(paths),
            "skipped": skipped, "wave_obs": wave_obs}


def dr14_manifest(real_dir) -> dict[str, dict]:
    """MANIFEST.tsv of the DR14 folder: {filename: row} (object_group, subclass, sn_median, zwarning, …)."""
    import csv

    with open(os.path.join(os.fspath(real_dir), "MANIFEST.tsv")) as fh:
        return {r["filename"]: r for r in csv.DictReader(fh, delimiter="\t")}


def group_fraction(groups) -> np.ndarray:
    """A stable number in [0, 1) per object_group (blake2b of its decimal text)."""
    import hashlib

    return np.array([int(hashlib.blake2b(str(int(g)).encode(), digest_size=8).hexdigest(), 16) / 2.0**64
                     for g in groups])


def dr14_split(real_dir, workdir, test_fraction: float = 0.35) -> dict:
    """Ingest the DR14 spec-lite files once (cached as workdir/dr14.h5) and write train.h5 / test.h5 split by
    object_group — every observation of a held-out galaxy is held out. Returns the paths and counts."""
    from pathlib import Path

    from ..h5format import SpectraWriter
    from ..ingest import ingest
    from ..spectra_io import open_spectra

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    whole = work / "dr14.h5"
    if not whole.exists():
        files = sorted(str(p) for p in Path(real_dir).glob("spec-*.fits"))
        if not files:
            raise FileNotFoundError(f"{real_dir}: no spec-*.fits files (the SDSS DR14 folder)")
        ingest(files, whole, instrument="sdss", jobs=min(2, os.cpu_count() or 1), progress=False)
    rows = dr14_manifest(real_dir)
    with open_spectra(whole) as f:
        data = f.read()
        names = [os.path.basename(p.decode() if isinstance(p, bytes) else str(p)) for p in f.read_column("source/file")]
    group = np.array([int(rows[n]["object_group"]) for n in names])
    test = group_fraction(group) < test_fraction
    extra = {"source/object_group": group,
             "source/sn_median": np.array([float(rows[n]["sn_median"]) for n in names], np.float32),
             "source/subclass": np.array([(rows[n]["subclass"] or "-").encode() for n in names]),
             "source/zwarning": np.array([int(rows[n]["zwarning"]) for n in names])}
    out = {"n_spectra": len(names), "n_files": len(rows)}
    for tag, sel in (("train", ~test), ("test", test)):
        path = work / f"{tag}.h5"
        idx = np.flatnonzero(sel)
        if not path.exists() or os.path.getmtime(path) < os.path.getmtime(whole):
            with SpectraWriter(path, "sdss") as w:
                w.write(data.flux[idx], data.ivar[idx], data.mask[idx], data.z[idx], data.z_err[idx],
                        data.object_id[idx], data.norm[idx], extra={k: v[idx] for k, v in extra.items()})
        out[tag] = str(path)
        out[f"n_{tag}"] = int(sel.sum())
        out[f"groups_{tag}"] = int(len(set(group[sel])))
    if set(group[test]) & set(group[~test]):
        raise RuntimeError("a galaxy on both sides of the DR14 split: a bug")
    return out


def dr14_arrays(path) -> dict:
    """A DR14 split file as arrays: y, w, z, wave_obs, object_group, subclass."""
    from ..spectra_io import open_spectra

    with open_spectra(path) as f:
        b = f.read()
        group = f.read_column("source/object_group")
        sub = f.read_column("source/subclass")
        wave_obs = np.asarray(f.wave_obs, np.float64)
    y, w = observed_arrays(b.flux, b.ivar, b.mask)
    return {"y": y, "w": w, "z": b.z.astype(np.float64), "wave_obs": wave_obs, "group": np.asarray(group),
            "subclass": np.array([s.decode() if isinstance(s, bytes) else str(s) for s in sub])}
