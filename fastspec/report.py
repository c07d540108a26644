"""Reports: what a trained model does to a set of spectra, as PNG figures and a short Markdown summary.

`make_report(model, data, out_dir)` writes into `out_dir`:

    reconstructions.png      like Figure 2 of Melchior+22: observed spectra with their weights, the model in
                             the observed frame, the restframe model extended beyond the observed range, and
                             zooms on [O II], Hβ + [O III] and Hα + [N II]
    redshift_invariance.png  like Figure 3: one spectrum moved to z = 0 … 0.5 (pixels moved off the grid
                             removed), its reconstructions, and its latent trajectory against the sample
    latents_z.png            latent pairs coloured by redshift
    latents_truth.png        (mock data) latents coloured by the true template mixture weights
    loss.png                 training and validation loss (from history.json beside the model)
    chi2.png                 distribution of the reduced χ² of the reconstructions
    log_prob.png             (with scores from `fastspec outliers`) the distribution of the latents'
                             log-probability under the flow, against redshift, the least probable marked
    report.md, summary.json  the numbers, and the figures with captions

The figures use a sample of the data (`n_spectra`, evenly spread blocks of rows); a latents file from
`fastspec encode --chi2` of the same data can supply the latents and χ² of every spectrum instead.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np
import torch

from .atomic import write_text
from .encode import LatentsFile, encode_arrays, prepare, weights_sha256
from .errors import FastspecError
from .losses import CHI2_DEFINITION
from .model import load_model
from .plotting import (
    pick_examples,
    plot_reconstructions,
    plot_redshift_invariance,
    pyplot,
    save_figure,
    standardised_pca,
)
from .spectra_io import open_spectra

INVARIANCE_Z = (0.0, 0.12, 0.25, 0.38, 0.5)


class ReportError(FastspecError, ValueError):
    """Inputs a report cannot be made from; the message names the file and field."""


# ---- data -----------------------------------------------------------------------------------------------


def read_sample(paths, n_spectra: int, n_blocks: int = 16) -> dict:
    """Up to `n_spectra` rows spread over all files in `n_blocks` contiguous blocks (contiguous reads are
    fast; spreading them avoids a sample that is one plate or one HEALPix pixel).

    Returns y, w, z (as the training loader prepares them), flux, object_id, source (file index, row) and,
    for mocks, truth columns ("truth/weights", ...) when every file has them.
    """
    files = [open_spectra(p) for p in paths]
    try:
        sizes = np.array([len(f) for f in files])
        total = int(sizes.sum())
        if total == 0:
            raise ReportError(f"{', '.join(map(str, paths))}: no spectra to report on")
        n = min(int(n_spectra), total)
        k = max(1, min(n_blocks, n))
        starts = np.linspace(0, total - -(-n // k), k).astype(int)
        lens = np.full(k, n // k)
        lens[: n % k] += 1
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        truth_cols = None
        for f in files:
            cols = {c for c in f.columns() if c.startswith("truth/")}
            truth_cols = cols if truth_cols is None else truth_cols & cols
        truth_cols = sorted(c for c in truth_cols or () if c != "truth/spec_rest")
        parts = {k_: [] for k_ in ("y", "w", "z", "flux", "object_id", "file", "row", *truth_cols)}
        for g0, m in zip(starts, lens):
            g, stop = int(g0), int(g0) + int(m)
            while g < stop:
                fi = int(np.searchsorted(offsets, g, side="right") - 1)
                lo, hi = g - offsets[fi], min(stop, offsets[fi + 1]) - offsets[fi]
                b = files[fi].read(lo, hi)
                y, w, z = prepare(b)
                parts["y"].append(y)
                parts["w"].append(w)
                parts["z"].append(b.z)
                parts["flux"].append(b.flux)
                parts["object_id"].append(np.asarray(b.object_id))
                parts["file"].append(np.full(hi - lo, fi))
                parts["row"].append(np.arange(lo, hi))
                for c in truth_cols:
                    parts[c].append(np.asarray(files[fi].read_column(c, lo, hi)))
                g = offsets[fi] + hi
        out = {k_: np.concatenate(v) for k_, v in parts.items()}
        out["wave_obs"] = files[0].wave_obs
        out["n_total"] = total
        bad = ~np.isfinite(out["z"])
        if bad.any():
            i = int(np.argmax(bad))
            raise ReportError(f"{paths[out['file'][i]]}: row {out['row'][i]}, field Z: not a finite redshift")
        return out
    finally:
        for f in files:
            f.close()


def read_history(model_path, history_path=None) -> dict | None:
    """The training history (history.json beside the model, or `history_path`), or None."""
    path = history_path or os.path.join(os.path.dirname(os.path.abspath(model_path)), "history.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            hist = json.load(f)
    except (OSError, ValueError) as err:
        raise ReportError(f"{path}: cannot read the training history ({err})") from None
    if not isinstance(hist, dict) or not isinstance(hist.get("train", []), list):
        raise ReportError(f"{path}: field 'train' must be a list of {{spectra, loss}} entries")
    hist["path"] = path
    return hist


# ---- figures --------------------------------------------------------------------------------------------


def _corner(fig, latents, color, cmap, norm, dims, label):
    k = len(dims)
    axes = fig.subplots(k, k, squeeze=False)
    sc = None
    for a in range(k):
        for b in range(k):
            ax = axes[a, b]
            if b > a:
                ax.set_visible(False)
                continue
            if a == b:
                ax.hist(latents[:, dims[a]], bins=40, color="0.5")
                ax.set_yticks([])
            else:
                sc = ax.scatter(latents[:, dims[b]], latents[:, dims[a]], c=color, cmap=cmap, norm=norm, s=2, lw=0,
                                rasterized=True)
            if a == k - 1:
                ax.set_xlabel(f"$s_{{{dims[b]}}}$")
            else:
                ax.set_xticklabels([])
            if b == 0 and a > 0:
                ax.set_ylabel(f"$s_{{{dims[a]}}}$")
            elif b > 0:
                ax.set_yticklabels([])
            ax.tick_params(labelsize=7)
    if sc is not None:
        if k > 2:  # horizontal colour bar in the empty upper-right triangle
            box = axes[0, k - 1].get_position()
            cax = fig.add_axes([box.x0 - box.width, box.y0 + 0.6 * box.height, 2 * box.width, 0.12 * box.height])
            cb = fig.colorbar(sc, cax=cax, orientation="horizontal")
        else:
            cb = fig.colorbar(sc, ax=axes.ravel().tolist(), shrink=0.8, pad=0.02)
        cb.set_label(label)
    return axes


def plot_latents_z(path, latents, z, max_dims: int = 5) -> str:
    plt = pyplot()
    import matplotlib as mpl

    dims = list(range(min(max_dims, latents.shape[1])))
    fig = plt.figure(figsize=(2.0 * len(dims) + 1.5, 2.0 * len(dims)))
    norm = mpl.colors.Normalize(*np.percentile(z, [1, 99]))
    _corner(fig, latents, z, "viridis", norm, dims, "redshift z")
    more = f" (first {len(dims)} of {latents.shape[1]})" if latents.shape[1] > len(dims) else ""
    fig.suptitle(f"Latents s{more} of {len(z)} spectra, coloured by redshift", fontsize=10)
    return save_figure(fig, path)


def plot_latents_truth(path, latents, weights) -> str:
    """Latent principal components coloured by each true template weight (mock data)."""
    plt = pyplot()
    project, frac = standardised_pca(latents)
    p = project(latents)
    k = weights.shape[1]
    fig, axes = plt.subplots(1, k, figsize=(2.9 * k, 3.0), squeeze=False, sharex=True, sharey=True)
    for t in range(k):
        ax = axes[0, t]
        sc = ax.scatter(p[:, 0], p[:, 1], c=weights[:, t], cmap="magma", s=3, lw=0, vmin=0,
                        vmax=max(np.percentile(weights[:, t], 99), 1e-6), rasterized=True)
        cb = fig.colorbar(sc, ax=ax, shrink=0.85, pad=0.02)
        cb.ax.tick_params(labelsize=7)
        ax.set_title(f"true weight of template {t}", fontsize=9)
        ax.set_xlabel(f"PC 1 of standardised latents ({100 * frac[0]:.0f}%)", fontsize=8)
        if t == 0:
            ax.set_ylabel(f"latent PC 2 ({100 * frac[1]:.0f}%)" if len(frac) > 1 else "latent PC 2")
    fig.suptitle("Latents (first two principal components of the standardised latents) coloured by the mock's "
                 "true mixture weights "
                 "(fractions of 5300–5850 Å light)", fontsize=10, y=1.02)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_loss(path, hist) -> str:
    plt = pyplot()
    train, val = hist.get("train", []), hist.get("val", [])
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([h["spectra"] for h in train], [h["loss"] for h in train], lw=1, color="tab:blue", label="training")
        if any("loss_aug" in h for h in train):
            ax.plot([h["spectra"] for h in train if "loss_aug" in h], [h["loss_aug"] for h in train if "loss_aug" in h],
                    lw=0.8, color="tab:purple", alpha=0.7, label="training, redshift-augmented copies")
    if val:
        ax.plot([h["spectra"] for h in val], [h["loss"] for h in val], "o-", ms=3.5, color="tab:orange",
                label="validation")
    losses = [h["loss"] for h in train + val if isinstance(h.get("loss"), (int, float))
              and math.isfinite(h["loss"]) and h["loss"] > 0]
    if losses and max(losses) / min(losses) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("spectra seen in training")
    ax.set_ylabel(f"loss ({hist.get('loss_kind', 'paper')}: Σ w (y − ŷ)² / Σ w)"
                  if hist.get("loss_kind", "paper") == "paper" else f"loss ({hist.get('loss_kind')})")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"Training history — {hist.get('title', '')}", fontsize=9)
    return save_figure(fig, path)


def plot_chi2(path, chi2, z) -> str:
    plt = pyplot()
    ok = np.isfinite(chi2) & (chi2 > 0)
    c = chi2[ok]
    fig, (ax, ax_z) = plt.subplots(1, 2, figsize=(11, 3.8), width_ratios=[1.2, 1])
    if c.size:
        lo, hi = np.percentile(c, [0.2, 99.8])
        bins = np.geomspace(max(lo, 1e-3) / 1.2, hi * 1.2, 50)
        ax.hist(np.clip(c, bins[0], bins[-1]), bins=bins, color="tab:blue", alpha=0.8)
        med = float(np.median(c))
        ax.axvline(med, color="k", lw=1, label=f"median {med:.2f}")
        ax.axvline(1.0, color="tab:red", ls="--", lw=1, label="1 (residuals at the noise level)")
        ax.set_xscale("log")
        ax.legend()
        ax_z.scatter(z[ok], c, s=3, lw=0, color="tab:blue", alpha=0.6, rasterized=True)
        ax_z.axhline(1.0, color="tab:red", ls="--", lw=1)
        ax_z.set_yscale("log")
    ax.set_xlabel("reduced χ² of the reconstruction")
    ax.set_ylabel("spectra")
    ax.set_title(f"{ok.sum()} spectra" + (f" ({(~ok).sum()} without a defined χ²)" if (~ok).any() else ""),
                 fontsize=9)
    ax_z.set_xlabel("redshift z")
    ax_z.set_ylabel("reduced χ²")
    ax_z.set_title("χ² against redshift", fontsize=9)
    fig.suptitle("Reconstruction quality: reduced χ² = Σ w·valid·(y − ŷ)² / (N_valid − S)", fontsize=10, y=1.02)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_log_prob(path, log_prob, z) -> str:
    plt = pyplot()
    ok = np.isfinite(log_prob)
    lp, zz = log_prob[ok], z[ok]
    fig, (ax, ax_z) = plt.subplots(1, 2, figsize=(11, 3.8), width_ratios=[1.2, 1])
    lo = np.percentile(lp, 1) if lp.size else 0.0
    ax.hist(lp, bins=50, color="tab:purple", alpha=0.8)
    ax.axvline(lo, color="k", ls="--", lw=1, label=f"1st percentile {lo:.1f}")
    ax.set_yscale("log")
    ax.legend()
    ax.set_xlabel("log-probability of the latents under the flow [nats]")
    ax.set_ylabel("spectra")
    ax.set_title(f"{ok.sum()} spectra; low = unusual", fontsize=9)
    ax_z.scatter(zz, lp, s=4, lw=0, color="tab:purple", alpha=0.6, rasterized=True)
    low = lp < lo
    ax_z.scatter(zz[low], lp[low], s=14, facecolor="none", edgecolor="tab:red", label="below 1st percentile")
    ax_z.set_xlabel("redshift z")
    ax_z.set_ylabel("log-probability")
    ax_z.legend()
    fig.suptitle("Outlier scores (fastspec outliers)", fontsize=10, y=1.02)
    fig.tight_layout()
    return save_figure(fig, path)


# ---- the report ---------------------------------------------------------------------------------------


def _redshift_invariance(model, sample, wave_obs, precision, n_latent) -> dict:
    from .augment import redshift_augment

    z = sample["z"]
    good_frac = (sample["w"] > 0).mean(1)
    # a well-observed spectrum at low redshift: moving it up in z keeps most of its pixels
    cand = np.where((good_frac > 0.8) & (z < np.percentile(z, 25)))[0]
    i = int(cand[np.argmin(z[cand])]) if cand.size else int(np.argmin(z))
    zs = np.array(INVARIANCE_Z)
    device = next(model.parameters()).device
    y = torch.as_tensor(np.repeat(sample["y"][i: i + 1], len(zs), 0), device=device)
    w = torch.as_tensor(np.repeat(sample["w"][i: i + 1], len(zs), 0), device=device)
    y_new, w_new, z_new = redshift_augment(y, w, torch.full((len(zs),), float(z[i]), device=device),
                                           torch.as_tensor(zs, dtype=torch.float32, device=device),
                                           wave_obs=torch.as_tensor(wave_obs, device=device))
    y_new, w_new = y_new.cpu().numpy(), w_new.cpu().numpy()
    res = encode_arrays(model, y_new, w_new, zs, precision=precision, chi2=True, restframe=True, observed=True)
    spread = res["latents"].std(0)
    sample_sd = np.where(sample["latents"].std(0) > 0, sample["latents"].std(0), 1)
    return {"index": i, "object_id": sample["object_id"][i], "z": float(z[i]), "z_new": zs, "y": y_new,
            "w": w_new, **res, "ratio": float(np.mean(spread / sample_sd))}


def make_report(model_path, data, out_dir, *, n_spectra: int = 1000, n_examples: int = 3, latents=None,
                history=None, device: str = "cpu", precision: str = "fp32", batch_size: int = 128,
                progress: bool = True, scores=None) -> dict:
    """Write the figures, report.md and summary.json for `model_path` on the spectra files `data`.

    latents: optional latents file (from `fastspec encode --chi2` on the same data) whose latents and χ² of
    every spectrum replace the sample's in the latent and χ² figures. Returns the summary dict.
    """
    t0 = time.perf_counter()
    data = [os.fspath(p) for p in ([data] if isinstance(data, (str, os.PathLike)) else data)]
    os.makedirs(out_dir, exist_ok=True)

    def say(msg):
        if progress:
            print(f"report: {msg}", file=sys.stderr, flush=True)

    model = load_model(model_path, device)
    model_sha = weights_sha256(model)
    if latents is not None:  # check before the slow part
        with LatentsFile(latents) as lf:
            if lf.attrs.get("model_sha256") != model_sha:
                raise ReportError(f"{latents}: attribute model_sha256: latents made by another model")
    cfg = model.config
    n_latent = int(cfg.n_latent)
    wave_rest = model.wave_rest.detach().cpu().double().numpy()
    say(f"reading a sample of up to {n_spectra} spectra from {len(data)} file(s)")
    sample = read_sample(data, n_spectra)
    wave_obs = sample["wave_obs"]
    model_grid = model.wave_obs.detach().cpu().double().numpy()
    if wave_obs.shape != model_grid.shape or np.max(np.abs(wave_obs - model_grid)) > 0.01:
        raise ReportError(f"{data[0]}: field wave_obs is not the grid of the model's instrument "
                          f"({model.instrument.name}, {model_grid.shape[0]} pixels)")
    say(f"encoding {len(sample['z'])} spectra")
    enc = encode_arrays(model, sample["y"], sample["w"], sample["z"], batch_size=batch_size, precision=precision,
                        chi2=True)
    sample["latents"], sample["chi2"] = enc["latents"], enc["chi2"]
    figures = {}

    idx = pick_examples(sample["z"], sample["chi2"], n_examples)
    rec = encode_arrays(model, sample["y"][idx], sample["w"][idx], sample["z"][idx], precision=precision,
                        chi2=True, restframe=True, observed=True)
    figures["reconstructions"] = plot_reconstructions(os.path.join(out_dir, "reconstructions.png"), sample, rec,
                                                      idx, wave_obs, wave_rest, cfg.z_max)
    say("redshift-invariance test")
    inv = _redshift_invariance(model, sample, wave_obs, precision, n_latent)
    figures["redshift_invariance"] = plot_redshift_invariance(os.path.join(out_dir, "redshift_invariance.png"),
                                                              inv, sample["latents"], wave_obs, wave_rest)

    all_latents, all_z, all_chi2, latent_source = sample["latents"], sample["z"], sample["chi2"], "sample"
    if latents is not None:
        with LatentsFile(latents) as lf:
            all_latents, all_z = lf["latents"], lf["Z"]
            all_chi2 = lf["chi2"] if "chi2" in lf else all_chi2
            latent_source = f"{os.path.basename(os.fspath(latents))} ({len(all_z)} spectra)"
    say("latent-space and χ² figures")
    figures["latents_z"] = plot_latents_z(os.path.join(out_dir, "latents_z.png"), all_latents, all_z)
    if "truth/weights" in sample:
        figures["latents_truth"] = plot_latents_truth(os.path.join(out_dir, "latents_truth.png"),
                                                      sample["latents"], sample["truth/weights"])
    chi2_z = all_z if len(all_chi2) == len(all_z) else sample["z"]
    figures["chi2"] = plot_chi2(os.path.join(out_dir, "chi2.png"), all_chi2, chi2_z)
    hist = read_history(model_path, history)
    if hist is not None:
        figures["loss"] = plot_loss(os.path.join(out_dir, "loss.png"), hist)
    score_summary = None
    if scores is not None:
        from .outliers import OutlierError, read_scores

        try:
            sc = read_scores(scores)
        except OutlierError as err:
            raise ReportError(str(err)) from None
        figures["log_prob"] = plot_log_prob(os.path.join(out_dir, "log_prob.png"), sc["log_prob"], sc["Z"])
        lp = sc["log_prob"][np.isfinite(sc["log_prob"])]
        order = np.argsort(sc["log_prob"])
        score_summary = {"file": os.fspath(scores), "n": int(len(sc["log_prob"])),
                         "median": float(np.median(lp)) if lp.size else None,
                         "p1": float(np.percentile(lp, 1)) if lp.size else None,
                         "least_probable": [{"object_id": str(sc["object_id"][i]), "z": float(sc["Z"][i]),
                                             "log_prob": float(sc["log_prob"][i])} for i in order[:5]]}

    finite = np.isfinite(all_chi2)
    summary = {
        "model": os.path.abspath(model_path),
        "model_sha256": model_sha,
        "config": cfg.to_dict(),
        "n_parameters": int(sum(p.numel() for p in model.parameters())),
        "data": data,
        "n_spectra_in_data": int(sample["n_total"]),
        "n_sample": int(len(sample["z"])),
        "latents_from": latent_source,
        "z_range": [float(np.min(sample["z"])), float(np.max(sample["z"]))],
        "chi2_definition": CHI2_DEFINITION,
        "chi2_median": float(np.median(all_chi2[finite])) if finite.any() else None,
        "chi2_p16_p84": [float(v) for v in np.percentile(all_chi2[finite], [16, 84])] if finite.any() else None,
        "chi2_fraction_below_2": float(np.mean(all_chi2[finite] < 2)) if finite.any() else None,
        "redshift_invariance": {"object_id": int(inv["object_id"]) if np.issubdtype(type(inv["object_id"]), np.integer)
                                else str(inv["object_id"]), "z": inv["z"], "z_new": list(map(float, inv["z_new"])),
                                "latent_spread_over_sample_sigma": inv["ratio"]},
        "examples": [{"object_id": str(sample["object_id"][i]), "z": float(sample["z"][i]),
                      "chi2": float(c)} for i, c in zip(idx, rec["chi2"])],
        "precision": precision,
        "device": str(device),
        "figures": {k: os.path.basename(v) for k, v in figures.items()},
    }
    if score_summary is not None:
        summary["outlier_scores"] = score_summary
    if hist is not None:
        tr, va = hist.get("train", []), hist.get("val", [])
        summary["training"] = {"history": hist["path"], "final_train_loss": tr[-1]["loss"] if tr else None,
                               "final_val_loss": va[-1]["loss"] if va else None,
                               "best_val_loss": min(h["loss"] for h in va) if va else None,
                               "spectra_seen": tr[-1]["spectra"] if tr else None}
    summary["seconds"] = time.perf_counter() - t0
    write_text(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2, default=str), sync=False)
    write_text(os.path.join(out_dir, "report.md"), _markdown(summary), sync=False)
    say(f"wrote {len(figures)} figures, report.md and summary.json to {out_dir} ({summary['seconds']:.1f} s)")
    return summary


def _fmt(v, spec=".3g"):
    return "—" if v is None else format(v, spec)


def _markdown(s: dict) -> str:
    cfg = s["config"]
    inst = cfg["instrument"]["name"] if isinstance(cfg["instrument"], dict) else cfg["instrument"]
    inv = s["redshift_invariance"]
    lines = [
        "# fastspec report",
        "",
        f"Model `{s['model']}` (sha256 {s['model_sha256'][:12]}…): {inst}, S = {cfg['n_latent']} latents, "
        f"z_max = {cfg['z_max']}, {'z-conditioned' if cfg['conditioned'] else 'unconditioned'} encoder, "
        f"{cfg['activation']} decoder, {s['n_parameters']:,} parameters.",
        "",
        f"Data: {', '.join(f'`{p}`' for p in s['data'])} — {s['n_spectra_in_data']:,} spectra; figures use a "
        f"sample of {s['n_sample']:,} (z = {s['z_range'][0]:.3f}–{s['z_range'][1]:.3f}); latent and χ² figures "
        f"use the {s['latents_from']}. Precision {s['precision']} on {s['device']}.",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| median reduced χ² | {_fmt(s['chi2_median'])} |",
        f"| χ² 16th–84th percentile | {' – '.join(_fmt(v) for v in s['chi2_p16_p84'] or [None, None])} |",
        f"| fraction with χ² < 2 | {_fmt(s['chi2_fraction_below_2'], '.1%') if s['chi2_fraction_below_2'] is not None else '—'} |",
        f"| redshift invariance: latent spread over z = {inv['z_new'][0]:g}…{inv['z_new'][-1]:g} / sample σ "
        f"| {_fmt(inv['latent_spread_over_sample_sigma'])} |",
    ]
    tr = s.get("training")
    if tr:
        lines += [
            f"| final training loss | {_fmt(tr['final_train_loss'])} |",
            f"| final / best validation loss | {_fmt(tr['final_val_loss'])} / {_fmt(tr['best_val_loss'])} |",
            f"| spectra seen in training | {tr['spectra_seen']:,} |" if tr["spectra_seen"] else "",
        ]
    sc = s.get("outlier_scores")
    if sc:
        lines += [f"| outlier log-probability: median / 1st percentile ({sc['n']} spectra) | "
                  f"{_fmt(sc['median'])} / {_fmt(sc['p1'])} |"]
    lines += ["", f"Reduced χ²: {s['chi2_definition']}.", ""]
    if sc:
        lines += ["Least probable spectra: " + ", ".join(f"{e['object_id']} (z = {e['z']:.3f}, "
                                                         f"log p = {e['log_prob']:.1f})"
                                                         for e in sc["least_probable"]), ""]
    captions = {
        "reconstructions": "Reconstructions (cf. Figure 2 of Melchior et al. 2022). Grey: observed spectrum with "
        "±1σ from its weights, red bands masked pixels; orange: the model in the observed frame; blue: the "
        "restframe model over its whole grid, shifted to the galaxy's redshift — it extends beyond the "
        "observed range (dotted lines). Right: restframe zooms on [O II], Hβ + [O III] and Hα + [N II].",
        "redshift_invariance": f"Redshift invariance (cf. Figure 3): object {inv['object_id']} (z = {inv['z']:.3f}) "
        "moved to each z with its out-of-range pixels removed, encoded and decoded. A redshift-invariant "
        "encoder keeps the latents in place (ratio of their spread to the sample's σ ≪ 1).",
        "latents_z": "Latent pairs coloured by redshift: latents that trace z rather than the restframe spectrum "
        "show a gradient here.",
        "latents_truth": "Mock data: latents coloured by the true mixture weight of each template; a good latent "
        "space orders the spectra by their physical composition.",
        "loss": "Training and validation loss against the number of spectra seen.",
        "chi2": "Distribution of the reduced χ² of the reconstructions, and against redshift.",
        "log_prob": "Log-probability of each spectrum's latents under the normalising flow of `fastspec outliers` "
        "(low = unusual), and against redshift; circled: below the 1st percentile.",
    }
    titles = {"reconstructions": "Reconstructions", "redshift_invariance": "Redshift invariance",
              "latents_z": "Latent space by redshift", "latents_truth": "Latent space by true mixture weights",
              "loss": "Loss curves", "chi2": "Reconstruction χ²", "log_prob": "Outlier scores"}
    for key, fname in s["figures"].items():
        lines += [f"## {titles.get(key, key)}", "", f"![{key}]({fname})", "", captions.get(key, ""), ""]
    if "loss" not in s["figures"]:
        lines += ["(No history.json beside the model: no loss curves.)", ""]
    return "\n".join(line for line in lines if line is not None) + "\n"
