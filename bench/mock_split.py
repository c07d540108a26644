"""Held-out kcorrect mocks (fastspec.mock) and a model trained on separate mocks, for benchmarks that need
ground truth: the train file, the held-out test file (other seed, disjoint object_ids) and a model trained
with `fastspec train`'s defaults on the train file — the demo's recipe (1500 steps, validation every 250,
best.pt). Everything is cached in the work folder under names with the sizes, so a second benchmark
reuses the same files and model.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fastspec.mock import write_mock

WORK = Path(__file__).resolve().parent / "work" / "mock"  # where the benchmarks keep them


def paths(work=WORK, n_train: int = 3000, n_test: int = 200, train_steps: int = 1500) -> dict:
    """{"train", "test", "run", "model"} under `work`, whether made yet or not."""
    work = Path(work)
    run = work / f"mock-run-{n_train}-{train_steps}"
    return {"train": work / f"mock-train-{n_train}.h5", "test": work / f"mock-test-{n_test}.h5", "run": run,
            "model": run / "best.pt"}


def split(work, n_train: int = 3000, n_test: int = 200, train_steps: int = 1500, seed: int = 0) -> dict:
    """Paths {"train", "test", "model"}; makes what is missing (training ≈ 5 min on 2 idle cores)."""
    p = paths(work, n_train, n_test, train_steps)
    train, test, run, model = p["train"], p["test"], p["run"], p["model"]
    train.parent.mkdir(parents=True, exist_ok=True)
    if not train.exists():
        write_mock(train, n_train, seed=seed, progress=False)
    if not test.exists():  # another seed and object_ids from 10^7: no spectrum is shared with training
        write_mock(test, n_test, seed=seed + 1000, id_offset=10_000_000, progress=False)
    if not model.exists():
        subprocess.run([sys.executable, "-m", "fastspec", "train", str(train), "-o", str(run), "--steps",
                        str(train_steps), "--val-every", "250", "--seed", str(seed), "-q"], check=True)
    return {"train": str(train), "test": str(test), "model": str(model if model.exists() else run / "final.pt")}
