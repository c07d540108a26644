"""Outlier scores (fastspec.outliers): the flow's log-probability against a Gaussian with a known density,
save/reload without training data, ROC AUC against a direct count, and errors."""
import math
import os

import numpy as np
import pytest
import torch

from fastspec.outliers import LatentFlow, OutlierError, check_latents, fit_flow, roc_auc

pytest.importorskip("zuko")


def gaussian(n, seed, S=4):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(S, S)) * 0.6 + np.diag([2.0, 1.0, 0.5, 0.2])
    cov = A @ A.T
    mean = rng.normal(size=S) * 3
    x = rng.multivariate_normal(mean, cov, size=n)
    return x.astype(np.float32), mean, cov


def log_density(x, mean, cov):
    S = len(mean)
    d = x - mean
    ic = np.linalg.inv(cov)
    return -0.5 * (np.einsum("ni,ij,nj->n", d, ic, d) + S * math.log(2 * math.pi) + np.linalg.slogdet(cov)[1])


@pytest.fixture(scope="module")
def fitted():
    x, mean, cov = gaussian(20000, seed=0)
    flow = fit_flow(x, transforms=2, hidden=(16, 16), steps=1000, lr=3e-3, batch_size=1024, seed=0)
    return flow, mean, cov


def test_flow_log_prob_matches_a_known_gaussian_density(fitted):
    flow, mean, cov = fitted
    rng = np.random.default_rng(9)
    x = rng.multivariate_normal(mean, cov, size=5000).astype(np.float32)
    lp, truth = flow.score(x), log_density(x, mean, cov)
    # the mean log-probability of fresh samples is minus the entropy of the Gaussian
    entropy = 0.5 * (len(mean) * (1 + math.log(2 * math.pi)) + np.linalg.slogdet(cov)[1])
    assert abs(lp.mean() + entropy) < 0.1, (lp.mean(), -entropy)
    # on the same samples the gap is the KL divergence from the truth to the flow: ≥ 0, and small (measured
    # 0.036 nats over 4 dimensions with this budget; 1000 steps of 1024 samples)
    kl = truth.mean() - lp.mean()
    assert -0.01 < kl < 0.08, kl
    # and point by point it follows the true density
    assert np.median(np.abs(lp - truth)) < 0.15
    assert np.corrcoef(lp, truth)[0, 1] > 0.98


def test_save_and_reload_without_training_data(fitted, tmp_path):
    flow, mean, cov = fitted
    flow.model_sha256 = "abc"
    path = flow.save(tmp_path / "m.flow.pt")
    again = LatentFlow.load(path)
    x = gaussian(50, seed=3)[0]
    np.testing.assert_array_equal(again.score(x), flow.score(x))
    assert again.model_sha256 == "abc"
    with pytest.raises(OutlierError, match="not a fastspec latent flow"):
        torch.save({"x": 1}, tmp_path / "junk.pt")
        LatentFlow.load(tmp_path / "junk.pt")
    with pytest.raises(OutlierError, match="flow file not found"):
        LatentFlow.load(tmp_path / "none.pt")
    with pytest.raises(OutlierError, match=r"shape \(N, 4\)"):
        flow.score(np.zeros((3, 5)))


def test_roc_auc_against_a_direct_count():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=40), rng.normal(size=30) + 1
    a[:5] = b[:5]  # ties count half
    direct = np.mean([(bj > ai) + 0.5 * (bj == ai) for ai in a for bj in b])
    assert math.isclose(roc_auc(a, b), direct, rel_tol=1e-12)
    assert roc_auc([0, 1], [2, 3]) == 1.0 and roc_auc([2, 3], [0, 1]) == 0.0


def test_latent_errors():
    with pytest.raises(OutlierError, match="row 2 has non-finite latents"):
        check_latents(np.array([[0.0, 1], [1, 2], [np.nan, 0]]), "train.h5")
    with pytest.raises(OutlierError, match="too few"):
        fit_flow(np.zeros((5, 3)))


def test_cli_fits_saves_reuses_and_scores(tmp_path, capsys):
    import h5py
    from test_encode import TINY, write_spectra

    from fastspec import cli
    from fastspec.model import ModelConfig, SpectrumAutoencoder
    from fastspec.outliers import read_scores

    torch.manual_seed(0)
    SpectrumAutoencoder(ModelConfig(**TINY)).eval().save(tmp_path / "m.pt")
    model = str(tmp_path / "m.pt")
    train = write_spectra(tmp_path / "train.h5", 40, seed=1, id0=0)
    test = write_spectra(tmp_path / "test.h5", 9, seed=2, id0=500)
    out = tmp_path / "scores.h5"
    assert cli.main(["outliers", model, test, "-o", str(out), "-q"]) == 2
    assert "give --train" in capsys.readouterr().err
    assert cli.main(["outliers", model, test, "-o", str(out), "--train", train, "--steps", "50",
                     "--transforms", "1", "-q"]) == 0
    assert os.path.exists(tmp_path / "m.flow.pt")
    a = read_scores(out)
    assert a["log_prob"].shape == (9,) and np.all(np.isfinite(a["log_prob"]))
    np.testing.assert_array_equal(a["object_id"], np.arange(500, 509))
    # a latents file of the same model (fp32, as outliers encodes spectra) scores the same; the flow is reused
    # without --train
    assert cli.main(["encode", model, test, "-o", str(tmp_path / "lat.h5"), "--precision", "fp32", "-q"]) == 0
    assert cli.main(["outliers", model, str(tmp_path / "lat.h5"), "-o", str(tmp_path / "s2.h5"), "-q"]) == 0
    np.testing.assert_allclose(read_scores(tmp_path / "s2.h5")["log_prob"], a["log_prob"], rtol=1e-5)
    # another model's flow / latents are refused; a spectrum without Z names file, row, field
    torch.manual_seed(1)
    SpectrumAutoencoder(ModelConfig(**TINY)).eval().save(tmp_path / "other.pt")
    assert cli.main(["outliers", str(tmp_path / "other.pt"), test, "-o", str(out), "--flow",
                     str(tmp_path / "m.flow.pt"), "-q"]) == 1
    assert "another model" in capsys.readouterr().err
    assert cli.main(["outliers", str(tmp_path / "other.pt"), str(tmp_path / "lat.h5"), "-o", str(out),
                     "--train", train, "--steps", "20", "-q"]) == 1
    assert "lat.h5: attribute model_sha256" in capsys.readouterr().err
    with h5py.File(test, "r+") as h:
        h["Z"][4] = np.nan
    assert cli.main(["outliers", model, test, "-o", str(out), "-q"]) == 1
    assert "test.h5: row 4, field Z: not a finite" in capsys.readouterr().err
