"""Experiment 4, latents carry the physics: held-out R² of simple regressors (kNN, quadratic ridge) from each
model's S numbers per spectrum to the true mixture weights, line strengths, velocity dispersion and dust."""
from __future__ import annotations

import numpy as np

from ...mock import LINE_NAMES
from ...plotting import pyplot, save_figure
from ..baselines import crossfit_r2
from ..context import Context, Experiment
from ..labels import COLORS, fmt, label

# Regression targets from the mock truth: line strengths as log10(0.5 + F), F in stored-flux·Å (≈ equivalent
# width against the 5300–5850 Å continuum); the 0.5 Å softening keeps line-free galaxies finite.
LINE_TARGETS = {"Halpha": ("Halpha",), "Hbeta": ("Hbeta",), "OIII_5007": ("OIII_5007",),
                "OII_3727": ("OII_3726", "OII_3729"), "NII_6584": ("NII_6584",)}
LINE_SOFTENING = 0.5


def physics_targets(data) -> tuple[list[str], np.ndarray]:
    """(names, (n, T) array) of the regression targets from the truth columns."""
    names, cols = [], []
    wts = data["truth/weights"]
    for t in range(wts.shape[1]):
        names.append(f"weight_template{t}")
        cols.append(wts[:, t])
    lf = data["truth/line_flux"]
    for name, parts in LINE_TARGETS.items():
        f = sum(lf[:, LINE_NAMES.index(p)].astype(np.float64) for p in parts)
        names.append(f"log10({LINE_SOFTENING}+F_{name})")
        cols.append(np.log10(LINE_SOFTENING + np.maximum(f, 0)))
    names += ["vdisp_kms", "ebv"]
    cols += [data["truth/vdisp"], data["truth/ebv"]]
    return names, np.stack(cols, 1).astype(np.float64)


def measure(predictors: dict, targets: np.ndarray, names: list[str], seed: int) -> dict:
    """Held-out R² (2-fold cross-fitting) of each target from each set of predictors, by kNN and by quadratic ridge."""
    out = {"targets": names, "regressors": {"knn": "k = 10 nearest neighbours, standardised predictors",
                                            "ridge2": "ridge (α = 1) on standardised linear + quadratic terms"},
           "protocol": "2-fold cross-fitting on the held-out test set (each half predicted from the other)",
           "r2": {}}
    for name, X in predictors.items():
        out["r2"][name] = {}
        for method in ("knn", "ridge2"):
            r2 = crossfit_r2(X, targets, "knn" if method == "knn" else "ridge", seed=seed)
            out["r2"][name][method] = {t: float(v) for t, v in zip(names, r2)}
    return out


def plot(path, phys, budget) -> str:
    """Held-out R² per target and predictor set, one panel per regressor."""
    plt = pyplot()
    names = phys["targets"]
    models = list(phys["r2"])
    fig, axes = plt.subplots(2, 1, figsize=(13, 7), sharex=True)
    x = np.arange(len(names))
    wdt = 0.8 / len(models)
    for ax, method in zip(axes, ("knn", "ridge2")):
        for k, m in enumerate(models):
            vals = [phys["r2"][m][method][t] for t in names]
            ax.bar(x - 0.4 + (k + 0.5) * wdt, np.clip(vals, -0.2, 1), wdt, color=COLORS.get(m, "0.5"), label=label(m))
            for xi, v in zip(x - 0.4 + (k + 0.5) * wdt, vals):
                if v < -0.2:  # clipped bar: say how far below it goes
                    ax.text(xi, -0.19, f"{v:.2g}", rotation=90, fontsize=6, ha="center", va="bottom")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_ylim(-0.2, 1)
        ax.set_ylabel(f"held-out R² ({method})")
        ax.set_title(phys["regressors"][method], fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=len(models))
    axes[1].set_xticks(x, [n.replace("weight_template", "w").replace("log10(0.5+F_", "log F ").rstrip(")") for n in names],
                       rotation=30, fontsize=8)
    fig.suptitle(f"Experiment 4 — latents carry the physics: R² of true mock parameters predicted from S numbers "
                 f"({budget})", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def run(ctx: Context) -> tuple[dict, dict]:
    tnames, targets = physics_targets(ctx.test)
    predictors = {k: v["latents"] for k, v in ctx.enc["test"].items()}
    predictors["pca"] = ctx.baseline.test["coeffs"]
    phys = measure(predictors, targets, tnames, ctx.cfg.seed)
    return phys, {"physics": plot(ctx.figure("physics"), phys, ctx.budget)}


def findings(r: dict) -> list[str]:
    out = []
    p = r["latent_physics"]["r2"]
    means = {k: float(np.mean([max(p[k][m][t] for m in p[k]) for t in r["latent_physics"]["targets"]])) for k in p}
    out.append("**Latents carry the physics:** mean over the targets of the best held-out R² (kNN or quadratic ridge): "
               + ", ".join(f"{label(k)} {fmt(v, '.2f')}" for k, v in means.items()) + ".")
    return out


def markdown(r: dict) -> list[str]:
    L = []
    p = r["latent_physics"]
    L += ["", "## 4. Latents carry the physics (held-out R²)", "",
          f"{p['protocol']}; regressors: kNN — {p['regressors']['knn']}; ridge2 — {p['regressors']['ridge2']}. "
          "Predictors: the S latents of each AE variant, or the S PCA coefficients.", ""]
    heads = p["targets"]
    L += ["| predictors | regressor | " + " | ".join(h.replace("weight_template", "w").replace("log10(0.5+F_", "logF ")
                                                   .rstrip(")") for h in heads) + " |",
          "|---|---|" + "---|" * len(heads)]
    for k, by in p["r2"].items():
        for meth, vals in by.items():
            L.append(f"| {label(k)} | {meth} | " + " | ".join(fmt(vals[h], '.2f') for h in heads) + " |")
    return L


EXPERIMENT = Experiment("latent_physics", run, findings, markdown)
