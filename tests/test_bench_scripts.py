"""The redshift and outlier benchmarks (bench/bench_redshift.py, bench/bench_outliers.py) run end to end on tiny
inputs — the mock set through its default path (mock files made and a model trained by `fastspec train`), the
real set on the bundled SDSS sample — and write tables whose numbers agree with their JSON."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench_env(tmp_path_factory):
    from test_encode import TINY

    from fastspec.model import ModelConfig, SpectrumAutoencoder

    sys.path.insert(0, str(BENCH))
    d = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    SpectrumAutoencoder(ModelConfig(**TINY)).eval().save(d / "tiny.pt")
    import mock_split

    # the default path: mock files written and a model trained with `fastspec train` (2 steps)
    ms = mock_split.split(d / "work" / "mock", n_train=96, n_test=6, train_steps=2)
    yield d, ms
    sys.path.remove(str(BENCH))


def test_mock_split_is_cached_and_held_out(bench_env):
    import mock_split

    from fastspec.spectra_io import open_spectra

    d, ms = bench_env
    assert Path(ms["model"]).parent.name == "mock-run-96-2" and Path(ms["model"]).exists()
    again = mock_split.split(d / "work" / "mock", n_train=96, n_test=6, train_steps=2)
    assert again == ms
    with open_spectra(ms["train"]) as a, open_spectra(ms["test"]) as b:
        assert not set(a.read().object_id.tolist()) & set(b.read().object_id.tolist())


def test_redshift_bench_both_sets(bench_env):
    import bench_redshift

    from fastspec.data import sample
    from fastspec.redshift import C_KMS, nmad

    d, ms = bench_env
    res_dir = d / "res"
    rc = bench_redshift.main(["--work", str(d / "work"), "--model", str(d / "tiny.pt"), "--test",
                              str(sample("sdss")), "--limit", "3", "--n-mock", "2", "--n-kcorrect", "6",
                              "--mock-train-n", "96", "--mock-train-steps", "2", "--node-steps", "0",
                              "--results", str(res_dir), "--tag", "t"])
    assert rc == 0
    res = json.loads((res_dir / "t.json").read_text())
    md = (res_dir / "t.md").read_text()
    assert res["real"]["n"] == 3 and res["mock"]["all"]["n"] == 2 and res["kcorrect"]["all"]["n"] == 3
    assert res["mock_model"] == str(Path(ms["model"]).resolve())
    # the mock set's NMAD recomputed from the fitted rows of its own file is what the table says
    kc = res["kcorrect"]
    assert sum(r["n"] for r in kc["by_z"]) == 3 and sum(r["n"] for r in kc["by_sn"]) == 3
    row = next(line for line in md.splitlines() if line.startswith("| held-out fastspec.mock (vs truth z)"))
    assert f"{kc['all']['nmad_dz_1pz']:.2e}" in row and "| 3 |" in row
    z_true = np.array(res["mock"]["rows"]["z_true"])
    dv = (np.array(res["mock"]["rows"]["z_fit"]) - z_true) / (1 + z_true) * C_KMS
    assert res["mock"]["all"]["nmad_kms"] == pytest.approx(nmad(dv), rel=1e-6)


def test_outliers_bench_both_sets(bench_env):
    import bench_outliers

    from fastspec.data import sample

    d, ms = bench_env
    res_dir = d / "res-out"
    s = str(sample("sdss"))
    rc = bench_outliers.main(["--work", str(d / "work"), "--model", str(d / "tiny.pt"), "--train", s, "--test", s,
                              "--mock-train-n", "96", "--n-kcorrect", "6", "--mock-train-steps", "2", "--results", str(res_dir),
                              "--tag", "o", "--flow-steps", "20"])
    assert rc == 0
    res = json.loads((res_dir / "o.json").read_text())
    for part in ("mock", "real"):
        kinds = res[part]["kinds"]
        assert set(kinds) == set(bench_outliers.KINDS)
        assert all(0 <= k["auc_neg_log_prob"] <= 1 and 0 <= k["auc_chi2"] <= 1 for k in kinds.values())
    assert res["mock"]["n_test"] == 6 and res["real"]["n_test"] == 100
    assert len(res["real"]["extremes"]) == 7
    for png in ("o-mock-injected.png", "o-injected.png", "o-extremes.png"):
        assert (res_dir / png).stat().st_size > 10_000
