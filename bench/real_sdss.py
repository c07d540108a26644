"""The real SDSS DR14 galaxies of ../shared/data/real/sdss-dr14 as a train/test split for benchmarks.

The folder holds 697 spec-lite files of 662 galaxies (its MANIFEST.tsv: `object_group` marks repeat
observations of one galaxy). `split` ingests them onto the SDSS grid once (cached in the work folder) and
writes train.h5 / test.h5 split **by object_group** (a stable hash of the group, never by spectrum), so every
observation of a held-out galaxy is held out. Bright, nearby, high-S/N galaxies: not representative of the
SDSS main sample; say so wherever a number comes from them.
"""
from __future__ import annotations

import os
from pathlib import Path

from fastspec.science.data import dr14_manifest, dr14_split, group_fraction  # noqa: F401  (re-exported)

SHARED = Path(os.environ.get("FASTSPEC_SHARED", Path(__file__).resolve().parents[2] / "shared"))
DR14 = SHARED / "data" / "real" / "sdss-dr14"


def manifest(real_dir=DR14) -> dict[str, dict]:
    return dr14_manifest(real_dir)


def split(work, test_fraction: float = 0.35, real_dir=DR14) -> dict:
    """Ingest (once) and split by object_group (fastspec.science.data.dr14_split); paths and counts."""
    return dr14_split(real_dir, work, test_fraction)


def default_model(work, steps: int = 2000) -> str:
    """A model trained with `fastspec train`'s defaults (validation every 250 steps) on the train split, cached
    in work/default-run-STEPS (≈ 7.5 min on 2 cores for 2000 steps); returns its best.pt."""
    import subprocess
    import sys

    run = Path(work) / f"default-run-{steps}"
    best = run / "best.pt"
    if not best.exists():
        data = split(work)
        subprocess.run([sys.executable, "-m", "fastspec", "train", data["train"], "-o", str(run), "--steps",
                        str(steps), "--val-every", "250", "-q"], check=True)
    return str(best if best.exists() else run / "final.pt")
