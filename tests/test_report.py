"""Reports: every figure written as a real PNG, the summary's numbers equal to independent computations
(χ² from a `fastspec encode` latents file, the sample's redshifts, the loss history), the redshift-moved
spectrum loses exactly the pixels that leave the grid, and errors name the file and field."""
import json
import os

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from fastspec import encode as E
from fastspec import report as R
from fastspec.h5format import SpectraWriter
from fastspec.instruments import get_instrument
from fastspec.model import ModelConfig, SpectrumAutoencoder, load_model

SDSS = get_instrument("sdss")
TINY = dict(instrument="sdss", n_latent=4, encoder_channels=(8, 16, 32), encoder_hidden=(16,),
            decoder_hidden=(16, 64))


def write_mockish(path, n, seed=0):
    """Two-template mixtures with emission lines, redshifted, with truth/weights as the mock stores them."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(0.01, 0.4, n)
    wave = SDSS.wave_obs[None, :] / (1 + z[:, None])
    weights = rng.dirichlet([1, 1], n)
    red = np.clip((wave - 3500) / 4000, 0.2, 1.5)
    blue = np.clip((7500 - wave) / 4000, 0.2, 1.5)
    flux = weights[:, :1] * red + weights[:, 1:] * blue
    for line in (3728.5, 4862.7, 5008.2, 6564.6):
        flux += 2 * weights[:, 1:] * np.exp(-0.5 * ((wave - line) / 2.5) ** 2)
    flux += rng.standard_normal(flux.shape) * 0.05
    ivar = np.full(flux.shape, 400.0)
    mask = SDSS.sky_mask()[None, :].repeat(n, 0)
    with SpectraWriter(path, "sdss") as w:
        w.write(flux, ivar, mask, z, np.full(n, 1e-4), np.arange(n) + 500, extra={"truth/weights": weights})
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    torch.manual_seed(1)
    run = d / "run"
    SpectrumAutoencoder(ModelConfig(**TINY)).eval().save(run / "final.pt")
    history = {"train": [{"step": s, "spectra": 64 * s, "loss": 10.0 / s, "lr": 1e-3} for s in range(1, 40)],
               "val": [{"step": s, "spectra": 64 * s, "loss": 12.0 / s} for s in (10, 20, 39)],
               "loss_kind": "paper", "title": "test run"}
    (run / "history.json").write_text(json.dumps(history))
    data = write_mockish(d / "mock.h5", 90)
    return d, str(run / "final.pt"), data, history


def test_report_writes_every_figure_and_true_numbers(setup):
    d, model, data, history = setup
    out = d / "out"
    s = R.make_report(model, [data], out, n_spectra=60, n_examples=2, device="cpu", progress=False)
    expected = ["reconstructions", "redshift_invariance", "latents_z", "latents_truth", "chi2", "loss"]
    assert sorted(s["figures"]) == sorted(expected)
    md = (out / "report.md").read_text()
    for key in expected:
        img = mpimg.imread(out / f"{key}.png")
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400, key
        assert img[..., :3].std() > 0.05, f"{key}.png is blank"
        assert f"]({key}.png)" in md
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    assert s == json.loads((out / "summary.json").read_text())
    assert s["n_spectra_in_data"] == 90 and s["n_sample"] == 60
    assert s["training"]["final_train_loss"] == history["train"][-1]["loss"]
    assert s["training"]["best_val_loss"] == min(v["loss"] for v in history["val"])

    # the sample is 60 of the 90 rows; its χ² median must equal that of `fastspec encode --chi2` on those rows
    E.encode_files(load_model(model), [data], d / "lat.h5", chi2=True, progress=False)
    with E.LatentsFile(d / "lat.h5") as lf:
        chi2_all, z_all = lf["chi2"], lf["Z"]
    zr = s["z_range"]
    assert z_all.min() <= zr[0] <= zr[1] <= z_all.max()
    sample = R.read_sample([data], 60)
    rows = sample["row"]
    assert len(np.unique(rows)) == 60 and rows.max() < 90
    np.testing.assert_array_equal(sample["z"], z_all[rows])
    assert s["chi2_median"] == pytest.approx(float(np.median(chi2_all[rows])), rel=1e-5)
    assert f"{s['chi2_median']:.3g}" in md


def test_report_with_latents_file_uses_every_spectrum(setup):
    d, model, data, _ = setup
    lat = d / "lat-all.h5"
    E.encode_files(load_model(model), [data], lat, chi2=True, progress=False)
    with E.LatentsFile(lat) as lf:
        med = float(np.median(lf["chi2"]))
    s = R.make_report(model, [data], d / "out2", n_spectra=30, n_examples=1, latents=lat, progress=False)
    assert "lat-all.h5 (90 spectra)" in s["latents_from"]
    assert s["chi2_median"] == pytest.approx(med, rel=1e-6)

    other = d / "other.pt"
    SpectrumAutoencoder(ModelConfig(**TINY)).save(other)
    with pytest.raises(R.ReportError, match="lat-all.h5: attribute model_sha256: latents made by another model"):
        R.make_report(other, [data], d / "out3", n_spectra=20, n_examples=1, latents=lat, progress=False)


def test_redshift_moved_spectrum_loses_exactly_the_pixels_off_the_grid(setup):
    d, model, data, _ = setup
    m = load_model(model)
    sample = R.read_sample([data], 40)
    sample["latents"] = E.encode_arrays(m, sample["y"], sample["w"], sample["z"])["latents"]
    inv = R._redshift_invariance(m, sample, SDSS.wave_obs, "fp32", 4)
    z0 = inv["z"]
    assert z0 == pytest.approx(sample["z"].min())  # every row is fully observed, so the lowest z is chosen
    np.testing.assert_allclose(inv["z_new"], R.INVARIANCE_Z)
    w0 = sample["w"][inv["index"]]
    for j, z_new in enumerate(inv["z_new"]):
        # pixel λ of the moved spectrum shows restframe λ/(1+z_new), observed originally at λ(1+z0)/(1+z_new)
        src = SDSS.wave_obs * (1 + z0) / (1 + z_new)
        off = (src < SDSS.wave_obs[0] - 1e-6) | (src > SDSS.wave_obs[-1] + 1e-6)
        assert np.all(inv["w"][j][off] == 0) and np.all(inv["y"][j][off] == 0)
        inside = ~off & (np.interp(src, SDSS.wave_obs, w0) == w0.max())
        inside[[0, -1]] = False  # pixels within half a pixel of the grid ends may go either way
        assert inside.sum() > 0.5 * SDSS.L * (1 + z0) / (1 + max(z_new, z0)) - 300
        assert np.mean(inv["w"][j][inside] > 0) > 0.99
    assert inv["latents"].shape == (5, 4) and np.isfinite(inv["ratio"])


def test_cli_report_errors_name_the_file(setup, tmp_path, capsys):
    from fastspec import cli

    d, model, data, _ = setup
    assert cli.main(["report", str(tmp_path / "none.pt"), data, "-o", str(tmp_path / "o"), "-q"]) == 1
    assert "none.pt" in capsys.readouterr().err
    assert cli.main(["report", model, str(tmp_path / "missing.h5"), "-o", str(tmp_path / "o"), "-q"]) == 1
    assert "missing.h5" in capsys.readouterr().err
    desi = tmp_path / "desi.h5"
    L = get_instrument("desi").L
    with SpectraWriter(desi, "desi") as w:
        w.write(np.ones((3, L)), np.ones((3, L)), np.zeros((3, L), bool), [0.1, 0.2, 0.3], [0] * 3, [1, 2, 3])
    assert cli.main(["report", model, str(desi), "-o", str(tmp_path / "o"), "-q"]) == 1
    assert "desi.h5: field wave_obs is not the grid of the model's instrument" in capsys.readouterr().err


def test_report_shows_outlier_scores(setup):
    from fastspec.outliers import write_scores

    d, model, data, _ = setup
    rng = np.random.default_rng(0)
    lp = rng.normal(-5, 2, 90)
    lp[17] = -40.0
    parts = [{"latents": np.zeros((90, 5), np.float32), "Z": np.linspace(0.01, 0.4, 90),
              "object_id": np.arange(90, dtype=np.uint64) + 500}]
    write_scores(d / "scores.h5", [data], parts, lp, {})
    s = R.make_report(model, [data], d / "out-s", n_spectra=20, n_examples=1, scores=d / "scores.h5",
                      progress=False)
    assert (d / "out-s" / "log_prob.png").exists() and s["figures"]["log_prob"] == "log_prob.png"
    assert s["outlier_scores"]["least_probable"][0] == {"object_id": "517", "z": pytest.approx(parts[0]["Z"][17]),
                                                        "log_prob": -40.0}
    assert "Outlier scores" in (d / "out-s" / "report.md").read_text()
    with pytest.raises(R.ReportError, match="not a fastspec-outliers file"):
        R.make_report(model, [data], d / "out-s", n_spectra=20, n_examples=1, scores=data, progress=False)
