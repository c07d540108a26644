"""What every fastspec figure shares: matplotlib without a display, one house style, atomic PNG files, the
choice of which example spectra a figure shows, and the two figures both `fastspec report` and `fastspec science`
draw (reconstructions like Figure 2 of Melchior+22, redshift invariance like its Figure 3). Used by training
(loss.png), reports and the science checks.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import atomic_path

STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
         "figure.dpi": 110, "savefig.dpi": 110}


def pyplot(style: bool = True):
    """matplotlib.pyplot on the Agg backend (no display needed), with the report style if `style`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if style:
        plt.rcParams.update(STYLE)
    return plt


def save_figure(fig, path, **savefig_kw) -> str:
    """Write `fig` to `path` atomically (format from its suffix, tight bounding box unless given) and close it.

    Not synced to disk: a figure is cheap to make again."""
    savefig_kw.setdefault("bbox_inches", "tight")
    savefig_kw.setdefault("format", Path(path).suffix.lstrip(".") or "png")
    with atomic_path(path, sync=False) as tmp:
        fig.savefig(tmp, **savefig_kw)
    pyplot(style=False).close(fig)
    return str(path)


def pick_examples(z, chi2, k: int) -> list[int]:
    """k spectra spread over the redshift range (quantiles), each the median-χ² one among its neighbours."""
    order = np.argsort(z)
    picks = []
    for q in np.linspace(0.1, 0.9, k) if k > 1 else [0.5]:
        lo, hi = int(q * len(z)) - 10, int(q * len(z)) + 10
        cand = order[max(lo, 0): max(hi, 1)]
        c = chi2[cand]
        c = np.where(np.isfinite(c), c, np.inf)
        i = int(cand[np.argsort(c)[len(cand) // 2]])
        if i not in picks:
            picks.append(i)
    return picks


# ---- the figures `fastspec report` and `fastspec science` both draw --------------------------------------

# Restframe zoom windows (Å, vacuum) and the lines marked in them.
ZOOMS = [
    ("[O II] λ3727,3729", (3700.0, 3760.0), [("[O II]", 3728.5)]),
    ("Hβ + [O III] λ4960,5008", (4830.0, 5030.0), [("Hβ", 4862.7), ("[O III]", 4960.3), ("[O III]", 5008.2)]),
    ("Hα + [N II] λ6550,6585", (6520.0, 6610.0), [("[N II]", 6549.9), ("Hα", 6564.6), ("[N II]", 6585.3)]),
]
FLUX_LABEL = "normalised flux $f_\\lambda$"
OBS_LABEL = "observed wavelength $\\lambda_{\\rm obs}$ [Å]"
REST_LABEL = "restframe wavelength $\\lambda_{\\rm rest}$ [Å]"


def _ylim(*arrays, lo=1.0, hi=99.5, pad=0.12):
    v = np.concatenate([np.asarray(a, float).ravel() for a in arrays if a is not None and np.size(a)])
    v = v[np.isfinite(v)]
    if not v.size:
        return None
    a, b = np.percentile(v, [lo, hi])
    span = max(b - a, 1e-6)
    return a - pad * span, b + pad * span


def _masked_spans(x, bad):
    """Contiguous runs of True in `bad` as (x_start, x_stop) pairs."""
    if not bad.any():
        return []
    d = np.diff(np.concatenate([[0], bad.astype(int), [0]]))
    starts, stops = np.where(d == 1)[0], np.where(d == -1)[0] - 1
    return [(x[a], x[b]) for a, b in zip(starts, stops)]


def plot_reconstructions(path, sample, rec, idx, wave_obs, wave_rest, z_max) -> str:
    """Figure 2: per example a wide observed-frame panel (top axis restframe) and three restframe zooms."""
    plt = pyplot()
    n = len(idx)
    fig = plt.figure(figsize=(13, 3.4 * n + 0.6))
    grid = fig.add_gridspec(n, 4, width_ratios=[3.4, 1, 1, 1], hspace=0.75, wspace=0.28)
    handles = None
    for r, i in enumerate(idx):
        z = float(sample["z"][i])
        y, w = sample["y"][i], sample["w"][i]
        y_model, valid = rec["spec_obs"][r], rec["valid"][r].astype(bool)
        x_rest = rec["spec_rest"][r]
        good = w > 0
        sigma = np.where(good, 1 / np.sqrt(np.where(good, w, 1)), np.nan)
        ax = fig.add_subplot(grid[r, 0])
        y_show = np.where(good, y, np.nan)
        ax.fill_between(wave_obs, y_show - sigma, y_show + sigma, color="0.8", lw=0, step="mid",
                        label="data ±1σ (from the weights)")
        ax.plot(wave_obs, y_show, color="0.35", lw=0.5, drawstyle="steps-mid", label="observed spectrum")
        for a, b in _masked_spans(wave_obs, ~good):
            ax.axvspan(a, b, color="tab:red", alpha=0.12, lw=0)
        ax.plot(wave_rest * (1 + z), x_rest, color="tab:blue", lw=0.8, alpha=0.8,
                label="restframe model, whole restframe grid")
        ax.plot(wave_obs[valid], y_model[valid], color="tab:orange", lw=0.8, label="model in the observed frame")
        ax.axvspan(np.nan, np.nan, color="tab:red", alpha=0.12, label="masked pixels (w = 0)")
        for edge in (wave_obs[0], wave_obs[-1]):
            ax.axvline(edge, color="k", ls=":", lw=0.8)
        ax.plot([], [], color="k", ls=":", lw=0.8, label="observed range")
        ax.set_xlim(wave_rest[0] * (1 + z), max(wave_rest[-1] * (1 + z), wave_obs[-1]))
        lim = _ylim(y[good], x_rest, lo=0.5, hi=99.8)
        if lim:
            ax.set_ylim(lim)
        ax.set_xlabel(OBS_LABEL)
        ax.set_ylabel(FLUX_LABEL)
        top = ax.secondary_xaxis("top", functions=(lambda lam, z=z: lam / (1 + z), lambda lam, z=z: lam * (1 + z)))
        top.set_xlabel(REST_LABEL, fontsize=8)
        top.tick_params(labelsize=8)
        chi2 = rec["chi2"][r]
        ax.text(0.01, 0.96, f"object_id {sample['object_id'][i]}\nz = {z:.3f}, reduced χ² = {chi2:.2f}",
                transform=ax.transAxes, fontsize=8, va="top", bbox=dict(fc="white", ec="0.7", alpha=0.85))
        if handles is None:
            handles = ax.get_legend_handles_labels()
        lam_rest_obs = wave_obs / (1 + z)
        for c, (name, (lo, hi), lines) in enumerate(ZOOMS):
            zx = fig.add_subplot(grid[r, c + 1])
            sel = (lam_rest_obs >= lo) & (lam_rest_obs <= hi)
            rsel = (wave_rest >= lo) & (wave_rest <= hi)
            zx.plot(wave_rest[rsel], x_rest[rsel], color="tab:blue", lw=1.0)
            if sel.any():
                ys = np.where(good[sel], y[sel], np.nan)
                zx.fill_between(lam_rest_obs[sel], ys - sigma[sel], ys + sigma[sel], color="0.8", lw=0, step="mid")
                zx.plot(lam_rest_obs[sel], ys, color="0.35", lw=0.6, drawstyle="steps-mid")
                vm = sel & valid
                zx.plot(lam_rest_obs[vm], y_model[vm], color="tab:orange", lw=1.0)
                lim = _ylim(ys, x_rest[rsel], lo=0, hi=100, pad=0.1)
            else:
                zx.text(0.5, 0.9, "not observed\n(restframe model only)", transform=zx.transAxes, ha="center",
                        va="top", fontsize=7, color="0.3")
                lim = _ylim(x_rest[rsel], lo=0, hi=100, pad=0.3)
            if lim:
                zx.set_ylim(lim)
            for lname, lam in lines:
                zx.axvline(lam, color="tab:green", lw=0.6, ls="--", alpha=0.7)
                zx.text(lam, 0.98, lname + " ", transform=zx.get_xaxis_transform(), rotation=90,
                        fontsize=6, va="top", ha="right", color="tab:green")
            zx.set_xlim(lo, hi)
            zx.set_title(name, fontsize=8)
            zx.set_xlabel(REST_LABEL, fontsize=8)
            zx.tick_params(labelsize=7)
    fig.legend(*handles, loc="upper center", ncol=6, fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.985))
    fig.suptitle(f"Reconstructions: restframe model on {wave_rest[0]:.0f}–{wave_rest[-1]:.0f} Å (z_max = {z_max:g}); "
                 "zooms in the restframe, green dashed: emission lines", y=1.005, fontsize=10)
    return save_figure(fig, path)


def standardised_pca(latents):
    """Principal axes of the standardised latents (each dimension scaled to unit variance, so one latent
    with a large range does not take every component). Returns (project, variance fractions)."""
    mu = latents.mean(0)
    sd = latents.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    u, s, vt = np.linalg.svd((latents - mu) / sd, full_matrices=False)
    var = s**2 / max(len(latents) - 1, 1)
    return (lambda x: ((x - mu) / sd) @ vt[:2].T), var / var.sum()


def plot_redshift_invariance(path, inv, sample_latents, wave_obs, wave_rest) -> str:
    """Figure 3: a spectrum moved in redshift, its reconstructions and its latent trajectory."""
    plt = pyplot()
    import matplotlib as mpl

    zs = inv["z_new"]
    # plasma without its pale yellow end, which vanishes on white
    cmap = mpl.colors.ListedColormap(mpl.colormaps["plasma"](np.linspace(0, 0.85, 256)))
    norm = mpl.colors.Normalize(0, max(0.5, zs.max()))
    fig = plt.figure(figsize=(13.5, 7.4))
    grid = fig.add_gridspec(2, 3, width_ratios=[1.5, 1.5, 1.15], height_ratios=[1, 1], hspace=0.38, wspace=0.36)
    ax_obs = fig.add_subplot(grid[:, 0])
    good_all = inv["w"] > 0
    step = 1.1 * np.nanpercentile(np.where(good_all, inv["y"], np.nan), 99.5) if good_all.any() else 1.0
    for j, z in enumerate(zs):
        offset = j * step
        good = inv["w"][j] > 0
        ax_obs.plot(wave_obs, np.where(good, inv["y"][j], np.nan) + offset, color="0.6", lw=0.5,
                    label="moved spectrum" if j == 0 else None)
        v = inv["valid"][j].astype(bool)
        ax_obs.plot(wave_obs[v], inv["spec_obs"][j][v] + offset, color=cmap(norm(z)), lw=0.8,
                    label="its reconstruction" if j == 0 else None)
        ax_obs.text(1.01, offset + 0.3 * step, f"z = {z:.2f}", fontsize=8, color=cmap(norm(z)), va="center",
                    ha="left", fontweight="bold", transform=ax_obs.get_yaxis_transform())
    ax_obs.set_ylim(-0.3 * step, (len(zs) + 0.3) * step)
    ax_obs.set_xlabel(OBS_LABEL)
    ax_obs.set_ylabel(FLUX_LABEL + " + offset")
    ax_obs.legend(loc="upper right", fontsize=7)
    ax_obs.set_title("observed frame", fontsize=9)

    sub = grid[:, 1].subgridspec(2, 1, height_ratios=[6, 1], hspace=0.05)
    ax_rest = fig.add_subplot(sub[0])
    ax_bar = fig.add_subplot(sub[1], sharex=ax_rest)
    for j, z in enumerate(zs):
        ax_rest.plot(wave_rest, inv["spec_rest"][j], color=cmap(norm(z)), lw=0.7, alpha=0.85,
                     label=f"encoded at z = {z:.2f}")
        ax_bar.plot([wave_obs[0] / (1 + z), wave_obs[-1] / (1 + z)], [j, j], color=cmap(norm(z)), lw=3,
                    solid_capstyle="butt")
    ax_bar.set_ylim(-0.8, len(zs) - 0.2)
    ax_bar.set_yticks([])
    ax_bar.set_ylabel("observed", fontsize=7)
    ax_bar.set_xlabel(REST_LABEL)
    plt.setp(ax_rest.get_xticklabels(), visible=False)
    ax_rest.set_ylabel(FLUX_LABEL)
    lim = _ylim(inv["spec_rest"], lo=0.5, hi=99.8)
    if lim:
        ax_rest.set_ylim(lim)
    ax_rest.legend(loc="upper right", fontsize=7)
    ax_rest.set_title("restframe models (bars below: restframe range observed at each z)", fontsize=9)

    project, frac = standardised_pca(sample_latents)
    p_sample, p_traj = project(sample_latents), project(inv["latents"])
    ax_pc = fig.add_subplot(grid[0, 2])
    ax_pc.scatter(p_sample[:, 0], p_sample[:, 1], s=3, color="0.75", lw=0, label="whole sample", rasterized=True)
    ax_pc.plot(p_traj[:, 0], p_traj[:, 1], color="k", lw=0.8, zorder=3)
    sc = ax_pc.scatter(p_traj[:, 0], p_traj[:, 1], c=zs, cmap=cmap, norm=norm, s=40, edgecolor="k", zorder=4,
                       label="moved spectrum")
    cb = fig.colorbar(sc, ax=ax_pc, pad=0.02, shrink=0.9)
    cb.set_label("z moved to", fontsize=8)
    ax_pc.set_xlabel(f"PC 1 of standardised latents ({100 * frac[0]:.0f}% of variance)")
    ax_pc.set_ylabel(f"latent PC 2 ({100 * frac[1]:.0f}%)" if len(frac) > 1 else "latent PC 2")
    ax_pc.legend(loc="best", fontsize=7, markerscale=1.2)
    ax_pc.set_title("latent trajectory against the sample", fontsize=9)

    ax_s = fig.add_subplot(grid[1, 2])
    sd = sample_latents.std(0)
    sd = np.where(sd > 0, sd, 1)
    std_traj = (inv["latents"] - sample_latents.mean(0)) / sd
    ax_s.axhspan(-1, 1, color="0.88", lw=0, label="sample ±1σ")
    for d in range(std_traj.shape[1]):
        ax_s.plot(zs, std_traj[:, d], "-o", ms=3, lw=0.8, label=f"$s_{{{d}}}$")
    ax_s.set_xlabel("redshift the spectrum was moved to")
    ax_s.set_ylabel("standardised latent $(s_i - \\bar s_i)/\\sigma_i$")
    ax_s.set_title(f"latents vs z (spread / sample σ = {inv['ratio']:.2f})", fontsize=9)
    ax_s.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)
    fig.suptitle(f"Redshift invariance: object_id {inv['object_id']} (observed at z = {inv['z']:.3f}) moved to "
                 f"z = {', '.join(f'{z:g}' for z in zs)}; pixels moved off the observed grid removed", fontsize=10)
    return save_figure(fig, path)


__all__ = ["STYLE", "pyplot", "save_figure", "pick_examples", "ZOOMS", "FLUX_LABEL", "OBS_LABEL", "REST_LABEL",
           "plot_reconstructions", "standardised_pca", "plot_redshift_invariance"]
