"""Where in the spectrum each model loses: χ² and error against the noiseless truth of every held-out pixel,
stacked by restframe wavelength and split into emission-line pixels and continuum."""
from __future__ import annotations

import numpy as np

from ...plotting import pyplot, save_figure
from ..context import Context, Experiment
from ..labels import COLORS, fmt, label

# restframe windows counted as emission-line pixels in the residual breakdown (± this many Å of each line)
LINE_HALF_WIDTH = 10.0


def measure(models_obs: dict, test: dict, wave_obs, wave_rest, n_bins: int = 340) -> dict:
    """Where in the spectrum each model loses: the χ² contribution w·(y − ŷ)² and the error against the noiseless
    truth w·(ŷ − y_true)² of every valid pixel, stacked by restframe wavelength λ_obs/(1+z) in bins, and split
    into emission-line pixels (within ±LINE_HALF_WIDTH Å restframe of a mock line) and continuum."""
    from ...mock import LINE_WAVE

    wave_obs = np.asarray(wave_obs, np.float64)
    lam = wave_obs[None, :] / (1 + np.asarray(test["z"], np.float64)[:, None])
    edges = np.linspace(float(wave_rest[0]), float(wave_rest[-1]), n_bins + 1)
    idx = np.clip(np.searchsorted(edges, lam, side="right") - 1, 0, n_bins - 1)
    near = np.zeros(lam.shape, bool)
    for lw in LINE_WAVE:
        near |= np.abs(lam - lw) <= LINE_HALF_WIDTH
    y, w, truth = test["y"].astype(np.float64), test["w"].astype(np.float64), test["truth/model_obs"]
    out = {"bin_edges": edges, "line_half_width": LINE_HALF_WIDTH, "models": {},
           "definition": "Per valid weighted pixel: chi2 = w (y − ŷ)², signal error = w (ŷ − y_true)²; per restframe "
                         "bin the mean and median over the pixels of all held-out spectra; for line / continuum "
                         "pixels the pooled mean, and the median over spectra of each spectrum's mean (robust to the "
                         "few spectra far off at the grid ends); a perfect model has chi2 = 1, signal error = 0"}
    for name, (spec, valid) in models_obs.items():
        good = (w > 0) & valid
        c = np.where(good, w * (y - spec) ** 2, 0.0)
        e = np.where(good, w * (spec - truth) ** 2, 0.0)
        cnt = np.bincount(idx[good], minlength=n_bins)
        binned = {"n_pixels": cnt,
                  "mean_chi2": np.bincount(idx[good], c[good], n_bins) / np.maximum(cnt, 1),
                  "mean_signal_error": np.bincount(idx[good], e[good], n_bins) / np.maximum(cnt, 1)}
        # medians per bin: a few spectra far off (the grid ends, where few training spectra reach) dominate means
        order = np.argsort(idx[good], kind="stable")
        bounds = np.concatenate([[0], np.cumsum(cnt)])
        for key, vals in (("median_chi2", c[good][order]), ("median_signal_error", e[good][order])):
            binned[key] = np.array([np.median(vals[a:b]) if b > a else np.nan for a, b in zip(bounds[:-1], bounds[1:])])
        for k in ("mean_chi2", "mean_signal_error"):
            binned[k] = np.where(cnt > 0, binned[k], np.nan)
        split = {}
        for part, sel in (("lines", good & near), ("continuum", good & ~near)):
            npx = int(sel.sum())
            # per spectrum: the mean over its pixels of this kind; then the median over spectra (robust)
            per = np.where(sel, e, 0).sum(1) / np.where(sel.sum(1) > 0, sel.sum(1), np.nan)
            per_c = np.where(sel, c, 0).sum(1) / np.where(sel.sum(1) > 0, sel.sum(1), np.nan)
            split[part] = {"n_pixels": npx, "mean_chi2": float(c[sel].sum() / max(npx, 1)),
                           "mean_signal_error": float(e[sel].sum() / max(npx, 1)),
                           "median_over_spectra_chi2": float(np.nanmedian(per_c)),
                           "median_over_spectra_signal_error": float(np.nanmedian(per)),
                           "share_of_total_signal_error": float(e[sel].sum() / max(e[good].sum(), 1e-300))}
        out["models"][name] = {"binned": binned, **split}
    return out


def plot(path, res: dict, budget: str) -> str:
    """Per-pixel χ² and signal error against restframe wavelength, per model."""
    from ...mock import LINES

    plt = pyplot()
    edges = np.asarray(res["bin_edges"])
    mid = 0.5 * (edges[1:] + edges[:-1])
    fig, axes = plt.subplots(2, 1, figsize=(13, 7), sharex=True)
    for name, m in res["models"].items():
        b = m["binned"]
        col = COLORS.get(name, "0.5")
        axes[0].plot(mid, b["median_chi2"], lw=1, color=col, label=f"{label(name)}: lines "
                     f"{m['lines']['median_over_spectra_chi2']:.2f}, continuum {m['continuum']['median_over_spectra_chi2']:.2f}")
        axes[0].plot(mid, b["mean_chi2"], lw=0.7, ls=":", color=col)
        axes[1].plot(mid, b["median_signal_error"], lw=1, color=col,
                     label=f"{label(name)}: lines {m['lines']['median_over_spectra_signal_error']:.3f}, continuum "
                           f"{m['continuum']['median_over_spectra_signal_error']:.3f}")
        axes[1].plot(mid, b["mean_signal_error"], lw=0.7, ls=":", color=col)
    for ax in axes:
        for _, lw in LINES:
            ax.axvline(lw, color="0.85", lw=0.6, zorder=0)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[0].axhline(1, color="k", ls=":", lw=0.8)
    axes[0].set_ylabel("w (y − ŷ)² per pixel")
    axes[1].set_ylabel("w (ŷ − y_true)² per pixel")
    axes[1].set_xlabel("restframe wavelength [Å] (grey: mock emission lines)")
    axes[0].set_title("where the models lose: χ² and error against the noiseless truth stacked by restframe "
                      "wavelength; solid: median per bin, dotted: mean (legend: median over spectra of the mean over "
                      f"line pixels ±{res['line_half_width']:.0f} Å / continuum)", fontsize=9)
    fig.suptitle(f"Fidelity by wavelength ({budget})", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def run(ctx: Context) -> tuple[dict, dict]:
    obs_models = {k: (v["spec_obs"], v["valid"]) for k, v in ctx.enc["test"].items()}
    obs_models["pca"] = (ctx.baseline.test["spec_obs"], ctx.baseline.test["valid"])
    byw = measure(obs_models, ctx.test, ctx.wave_obs, ctx.wave_rest)
    return byw, {"fidelity_by_wavelength": plot(ctx.figure("fidelity_by_wavelength"), byw, ctx.budget)}


def findings(r: dict) -> list[str]:
    out = []
    bw = r["fidelity_by_wavelength"]["models"]
    out.append("**Where the models lose** (error against the noiseless truth per pixel in noise variances, median "
               "over spectra, emission-line pixels / continuum; share of the pooled error in line pixels): "
               + ", ".join(f"{label(k)} {fmt(m['lines']['median_over_spectra_signal_error'])} / "
                           f"{fmt(m['continuum']['median_over_spectra_signal_error'])} "
                           f"({fmt(m['lines']['share_of_total_signal_error'], '.0%')})" for k, m in bw.items()) + ".")
    return out


def markdown(r: dict) -> list[str]:
    L = []
    bw = r["fidelity_by_wavelength"]
    L += ["", "### Where in the spectrum", "",
          f"{bw['definition']}. Line pixels: within ±{bw['line_half_width']:.0f} Å restframe of a mock emission "
          "line.", "",
          "| model | line pixels: χ² median (mean) | continuum: χ² median (mean) | line pixels: signal error "
          "median (mean) | continuum: signal error median (mean) | share of the pooled signal error in line "
          "pixels |", "|---|---|---|---|---|---|"]
    for k, m in bw["models"].items():
        cell = [f"{fmt(m[p]['median_over_spectra_' + q])} ({fmt(m[p]['mean_' + q])})"
                for q in ("chi2", "signal_error") for p in ("lines", "continuum")]
        L.append(f"| {label(k)} | " + " | ".join(cell)
                 + f" | {fmt(m['lines']['share_of_total_signal_error'], '.0%')} |")
    return L


EXPERIMENT = Experiment("fidelity_by_wavelength", run, findings, markdown)
