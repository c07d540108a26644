"""Experiment 5, real spectra: the reduced χ² of the bundled real SDSS spectra under the mock-trained models and the
weighted PCA, against mocks of the same S/N (runs only with cfg.real_dir)."""
from __future__ import annotations

import numpy as np

from ...plotting import plot_reconstructions, pyplot, save_figure
from ..config import ScienceConfig
from ..context import Context, Experiment
from ..data import median_snr, real_set
from ..labels import COLORS, fmt, label
from ..stats import chi2_summary
from ..training import encode


def plot(path, real, real_chi2, mock_snr, mock_chi2, budget) -> str:
    """χ² of the real spectra against S/N beside the held-out mocks', and per real spectrum."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    snr_r = median_snr(real["y"], real["w"])
    for name, c in mock_chi2.items():
        axes[0].scatter(mock_snr, c, s=2, lw=0, alpha=0.25, color=COLORS[name], rasterized=True)
    for name, c in real_chi2.items():
        axes[0].scatter(snr_r, c, s=28, marker="*", color=COLORS[name], edgecolor="k", lw=0.4,
                        label=f"real SDSS, {label(name)}: median {np.nanmedian(c):.2f}")
    axes[0].axhline(1, color="k", ls=":", lw=0.8)
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    axes[0].set_xticks([2, 3, 5, 10, 20, 30, 50])
    axes[0].xaxis.set_major_formatter(ScalarFormatter())
    axes[0].xaxis.set_minor_formatter(NullFormatter())
    axes[0].set_xlabel("median S/N per pixel")
    axes[0].set_ylabel("reduced χ²")
    axes[0].legend(fontsize=7)
    axes[0].set_title("real spectra (stars) against held-out mocks (dots) of the same models", fontsize=9)
    order = np.argsort(real["z"])
    names = list(real_chi2)
    wdt = 0.8 / len(names)
    for k, name in enumerate(names):
        axes[1].bar(np.arange(len(order)) - 0.4 + (k + 0.5) * wdt, real_chi2[name][order], wdt,
                    color=COLORS[name], label=label(name))
    axes[1].set_yscale("log")
    axes[1].axhline(1, color="k", ls=":", lw=0.8)
    axes[1].set_xticks(np.arange(len(order)), [f"{real['z'][i]:.3f}" for i in order], rotation=90, fontsize=6)
    axes[1].set_xlabel("real spectrum (by redshift)")
    axes[1].set_ylabel("reduced χ²")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"Experiment 5 — {len(real['z'])} real SDSS spectra under mock-trained models ({budget})", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def run(ctx: Context) -> tuple[dict, dict]:
    cfg, models, pca, test_snr = ctx.cfg, ctx.models, ctx.baseline.pca, ctx.test_snr
    wave_obs, wave_rest = ctx.wave_obs, ctx.wave_rest
    # the held-out mocks' χ² per model, for the same-S/N comparison
    mock_chi2 = {**{k: v["chi2"] for k, v in ctx.enc["test"].items()}, "pca": ctx.baseline.test["chi2"]}
    real = real_set(cfg.real_dir, cfg.workdir)
    real_chi2 = {}
    for v, model in models.items():
        real_chi2[f"ae_{v}"] = encode(model, real, chi2=True)["chi2"]
    pca_real = pca.fit_observed(real["y"], real["w"], real["z"], wave_rest, wave_obs)
    real_chi2["pca"] = pca_real["chi2"]
    real_snr = median_snr(real["y"], real["w"])
    out = {
        "files": real["n_files"], "n_ingested": int(len(real["z"])), "skipped": real["skipped"],
        "z_range": [float(real["z"].min()), float(real["z"].max())],
        "snr_median": float(np.median(real_snr)),
        "chi2": {k: chi2_summary(c) for k, c in real_chi2.items()},
        "per_spectrum": [{"spectrum": str(real["object_id"][i]), "z": float(real["z"][i]),
                          "snr": float(real_snr[i]),
                          **{f"chi2_{k}": float(c[i]) for k, c in real_chi2.items()}}
                         for i in range(len(real["z"]))],
        "mock_same_snr": {},
    }
    lo, hi = np.percentile(real_snr, [10, 90])
    same = (test_snr >= lo) & (test_snr <= hi)
    for k in real_chi2:
        c = mock_chi2[k][same]
        out["mock_same_snr"][k] = chi2_summary(c)
    out["mock_same_snr"]["snr_range"] = [float(lo), float(hi)]
    out["mock_same_snr"]["n"] = int(same.sum())
    figures = {"real": plot(ctx.figure("real"), real, real_chi2, test_snr, {k: mock_chi2[k] for k in real_chi2},
                            ctx.budget)}
    order = np.argsort(real_chi2[ctx.main])
    ex_r = [int(order[len(order) // 4]), int(order[len(order) // 2]), int(order[-1])]
    rec = encode(models[cfg.variants[0]], {k: real[k][ex_r] for k in ("y", "w", "z")}, chi2=True,
                 restframe=True, observed=True)
    figures["reconstructions_real"] = plot_reconstructions(
        ctx.figure("reconstructions_real"), real, rec, ex_r, wave_obs, wave_rest, 0.5)
    return out, figures


def enabled(cfg: ScienceConfig) -> bool:
    return bool(cfg.real_dir)


def findings(r: dict) -> list[str]:
    out = []
    rs = r["real_spectra"]
    out.append("**Real SDSS spectra:** median χ² " + ", ".join(
        f"{label(k)} {fmt(v['median'])} (mocks at the same S/N {fmt(rs['mock_same_snr'][k]['median'])})"
        for k, v in rs["chi2"].items()) + ": the gap between the two is what the mocks miss of real galaxies "
        "(and of real noise, sky residuals and calibration).")
    return out


def markdown(r: dict) -> list[str]:
    L = []
    rs = r["real_spectra"]
    ms = rs["mock_same_snr"]
    L += ["", "## 5. Real SDSS spectra under mock-trained models", "",
          f"{rs['n_ingested']} of {rs['files']} bundled SDSS-spectrograph files ingested (z = {fmt(rs['z_range'][0])}–"
          f"{fmt(rs['z_range'][1])}, median S/N {fmt(rs['snr_median'])}); mocks in the same S/N range "
          f"({fmt(ms['snr_range'][0])}–{fmt(ms['snr_range'][1])}, n = {ms['n']}) for comparison.", "",
          "| model | real: median χ² | real: 16–84% | mocks at the same S/N: median χ² |", "|---|---|---|---|"]
    for k, c in rs["chi2"].items():
        L.append(f"| {label(k)} | {fmt(c['median'])} | {fmt(c['p16'])}–{fmt(c['p84'])} | {fmt(ms[k]['median'])} |")
    return L


EXPERIMENT = Experiment("real_spectra", run, findings, markdown, phase="real", enabled=enabled)
