"""Learning curve: the held-out median χ² of each variant at snapshots taken during training, against the
weighted PCA's, to tell whether a model was still improving when its training budget ran out."""
from __future__ import annotations

import os

import numpy as np
import torch

from ...plotting import pyplot, save_figure
from ..config import ScienceConfig
from ..context import Context, Experiment
from ..labels import COLORS, ci, fmt, label
from ..stats import bootstrap_ci
from ..training import encode


def measure(cfg: ScienceConfig, models: dict, training: dict, test: dict, enc_test: dict,
            pca_chi2: np.ndarray) -> dict:
    """Held-out median χ² of each variant at the snapshots taken during training (and at the end), on the first
    n_curve test spectra, with the weighted PCA's median χ² on the same spectra as the line to beat."""
    n = min(cfg.n_curve, len(test["z"]))
    sub = {k: test[k][:n] for k in ("y", "w", "z")}
    out = {"n_spectra": n, "pca_median_chi2": float(np.nanmedian(pca_chi2[:n])),
           "pca_median_chi2_ci68": bootstrap_ci(np.nanmedian, pca_chi2[:n]), "variants": {}}
    for v, model in models.items():
        name = f"ae_{v}"
        final_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
        pts = []
        for step in training[name].get("curve_steps", []):
            path = os.path.join(cfg.workdir, f"model-{v}", f"curve-{step}.pt")
            if not os.path.exists(path):
                continue
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            chi2 = encode(model, sub, chi2=True)["chi2"]
            pts.append({"step": int(step), "spectra_seen": int(step) * cfg.batch_size,
                        "median_chi2": float(np.nanmedian(chi2))})
        model.load_state_dict(final_state)
        chi2 = enc_test[name]["chi2"][:n]
        pts.append({"step": cfg.steps, "spectra_seen": cfg.steps * cfg.batch_size, "median_chi2": float(np.nanmedian(chi2)),
                    "median_chi2_ci68": bootstrap_ci(np.nanmedian, chi2)})
        out["variants"][name] = pts
    return out


def plot(path, lc: dict, budget: str) -> str:
    """Median χ² against training spectra seen, per variant, with the PCA's as a line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    for name, pts in lc["variants"].items():
        ax.plot([p["spectra_seen"] for p in pts], [p["median_chi2"] for p in pts], "o-", ms=4, color=COLORS[name],
                label=label(name))
    ax.axhline(lc["pca_median_chi2"], color=COLORS["pca"], ls="--", lw=1.2,
               label=f"weighted restframe PCA (same S): {lc['pca_median_chi2']:.3f}")
    ax.axhline(1, color="k", ls=":", lw=0.8, label="noiseless truth ≈ 1")
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import ScalarFormatter

    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xlabel("training spectra seen")
    ax.set_ylabel(f"median reduced χ², {lc['n_spectra']} held-out mocks")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    ax.set_title(f"learning curve: is the autoencoder still improving toward the PCA? ({budget})", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def run(ctx: Context) -> tuple[dict, dict]:
    lc = measure(ctx.cfg, ctx.models, ctx.training, ctx.test, ctx.enc["test"], ctx.baseline.test["chi2"])
    return lc, {"learning_curve": plot(ctx.figure("learning_curve"), lc, ctx.budget)}


def findings(r: dict) -> list[str]:
    out = []
    lc = r["learning_curve"]
    seg = []
    for k, pts in lc["variants"].items():
        trend = ""
        if len(pts) >= 2:
            a = pts[-2]
            trend = f", {fmt(a['median_chi2'])} at {a['spectra_seen']} spectra seen"
        seg.append(f"{label(k)} {fmt(pts[-1]['median_chi2'])} after {pts[-1]['spectra_seen']} spectra{trend}")
    out.append(f"**Learning curve** (median χ² of {lc['n_spectra']} held-out mocks): " + "; ".join(seg)
               + f"; the weighted PCA: {fmt(lc['pca_median_chi2'])}.")
    return out


def markdown(r: dict) -> list[str]:
    L = []
    lc = r["learning_curve"]
    L += ["", "### Learning curve", "",
          f"Median reduced χ² of the first {lc['n_spectra']} held-out mocks under the weights at a few points of "
          "each training run (the one-cycle learning rate is still high at the early points); the weighted "
          f"restframe PCA with as many components reaches {fmt(lc['pca_median_chi2'])} "
          f"{ci(lc.get('pca_median_chi2_ci68'))} on the same spectra.", "",
          "| variant | " + " | ".join(f"{p['spectra_seen']} spectra" for p in next(iter(lc["variants"].values())))
          + " |", "|---|" + "---|" * len(next(iter(lc["variants"].values())))]
    for k, pts in lc["variants"].items():
        L.append(f"| {label(k)} | " + " | ".join(fmt(p["median_chi2"], ".4g") for p in pts) + " |")
    return L


EXPERIMENT = Experiment("learning_curve", run, findings, markdown)
