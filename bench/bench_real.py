"""Real SDSS galaxies: the default training recipe's autoencoder against a weighted restframe PCA (issue 16 §5).

    python bench/bench_real.py                  # S = 2, 4, 6, 10, 2000 steps each (~7 min each on 2 idle cores)
    python bench/bench_real.py --latents 10 --steps 600 --out /tmp/real   # a quick look

What it does, on the DR14 galaxies of ../shared/data/real/sdss-dr14 split by object_group (bench/real_sdss.py:
473 training / 218 held-out spectra):
* trains one model per latent size S as a user would: a whole `fastspec train` process with the default
  settings (precision auto, decoder started at the mean spectrum, batch-normalised paper loss, one-cycle lr)
  and a fixed number of steps; its wall time and peak RSS are measured from outside (os.wait4). With
  --grid-check, one more run at the largest S on the log-linear restframe grid oversampled 2×;
* evaluates on the held-out galaxies the model with the best validation loss (`best.pt`, validation spectra
  drawn from the training set only): reduced χ² of one encoder pass and of refined latents
  (`fastspec.fit.refine`), and a weighted restframe PCA with the same S fitted on the same training spectra and
  evaluated the same way (coefficients fitted to the observed spectrum, χ² against it with its own ivar);
* repeat observations: the latent distance between two spectra of one galaxy against the distance to the
  nearest other galaxy (self-retrieval: is the other observation the nearest neighbour?).
Writes real.json / real.md and figures into --out. Runs resume: a finished training run is reused.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_info  # noqa: E402
from real_sdss import split  # noqa: E402

from fastspec.encode import encode_arrays  # noqa: E402
from fastspec.fit import refine  # noqa: E402
from fastspec.model import SpectrumAutoencoder  # noqa: E402
from fastspec.plotting import pyplot, save_figure  # noqa: E402
from fastspec.restframe import to_restframe  # noqa: E402
from fastspec.science import WeightedPCA, bootstrap_ci, median_snr, observed_arrays  # noqa: E402
from fastspec.science.stats import repeat_retrieval as repeats  # noqa: E402

# --grid-check: the default (linear restframe grid) against these, at the largest S (the log grid without
# oversampling is compared in bench/results/restgrid: its floor is the highest of the three)
GRID_CHECK = {"log-2x": {"rest_grid": "log", "oversample": 2}}


def load_arrays(path) -> dict:
    with h5py.File(path, "r") as f:
        y, w = observed_arrays(f["spectrum_flux"][:], f["spectrum_ivar"][:], f["spectrum_mask"][:])
        return dict(y=y, w=w, z=f["Z"][:].astype(np.float64), wave_obs=f["wave_obs"][:].astype(np.float64),
                    group=f["source/object_group"][:], subclass=f["source/subclass"][:].astype(str),
                    object_id=f["object_id"][:])


# ---- training: whole processes ------------------------------------------------------------------------------


def train_run(train_h5: str, run_dir: Path, S: int, steps: int, extra: list[str], threads: int | None) -> dict:
    """`fastspec train` as a user runs it; reuses a finished run, resumes an interrupted one."""
    stamp = run_dir / "bench_run.json"
    if stamp.exists() and (run_dir / "best.pt").exists():
        return json.loads(stamp.read_text())
    argv = [sys.executable, "-m", "fastspec", "train", train_h5, "-o", str(run_dir), "--n-latent", str(S),
            "--steps", str(steps), "--val-every", "250", "-q", *extra]
    if threads:
        argv += ["--threads", str(threads)]
    if (run_dir / "checkpoint.pt").exists():
        argv.append("--resume")
    print(f"bench_real: {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"bench_real: training S={S} failed (exit {proc.returncode})")
    hist = json.loads((run_dir / "history.json").read_text())
    rec = {"S": S, "steps": steps, "argv": argv[1:], "wall_s": round(wall, 1),
           "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
           "resumed": "--resume" in argv, "val": hist.get("val", []), "run": hist.get("title")}
    stamp.write_text(json.dumps(rec, indent=1))
    return rec


# ---- evaluation ----------------------------------------------------------------------------------------------


def ae_eval(model_path: Path, test: dict, refine_steps: int) -> dict:
    model = SpectrumAutoencoder.load(model_path).eval()
    one = encode_arrays(model, test["y"], test["w"], test["z"], chi2=True, observed=True)
    parts = {"latents": [], "chi2": [], "steps": []}
    t0 = time.perf_counter()
    for a in range(0, len(test["z"]), 256):
        r = refine(model, torch.as_tensor(test["y"][a:a + 256]), torch.as_tensor(test["w"][a:a + 256]),
                   torch.as_tensor(test["z"][a:a + 256], dtype=torch.float32), steps=refine_steps)
        parts["latents"].append(r.latents.numpy())
        parts["chi2"].append(r.chi2_after.numpy())
        parts["steps"].append(r.steps.numpy())
    refine_s = time.perf_counter() - t0
    ref = {k: np.concatenate(v) for k, v in parts.items()}
    with torch.no_grad():
        y_ref, _ = model.generate(torch.as_tensor(ref["latents"]), torch.as_tensor(test["z"], dtype=torch.float32))
    return {"chi2_one": one["chi2"], "latents_one": one["latents"], "spec_one": one["spec_obs"],
            "valid": one["valid"], "chi2_ref": ref["chi2"], "latents_ref": ref["latents"], "spec_ref": y_ref.numpy(),
            "refine_steps": ref["steps"], "refine_ms_per_spectrum": 1e3 * refine_s / len(test["z"]),
            "wave_rest": model.wave_rest.double().numpy(), "rest_grid": model.config.rest_spacing,
            "n_rest": int(model.wave_rest.shape[0])}


def pca_eval(train: dict, test: dict, S: int, wave_rest: np.ndarray) -> dict:
    xr, wr = to_restframe(train["y"], train["w"], train["z"], train["wave_obs"], wave_rest)
    pca = WeightedPCA(S).fit(xr, wr)
    fit = pca.fit_observed(test["y"], test["w"], test["z"], wave_rest, test["wave_obs"])
    return {"chi2": fit["chi2"], "coeffs": fit["coeffs"], "spec": fit["spec_obs"]}


def summary(chi2) -> dict:
    c = np.asarray(chi2, np.float64)
    c = c[np.isfinite(c)]
    return {"median": float(np.median(c)), "ci68": bootstrap_ci(np.median, c), "p16": float(np.percentile(c, 16)),
            "p84": float(np.percentile(c, 84)), "n": int(c.size)}


# ---- figures -------------------------------------------------------------------------------------------------


def fig_chi2_vs_S(path, res: dict, n_test: int, steps: int) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    Ss = sorted(int(s) for s in res["ae"])
    for key, label, color, ls in (("pca", "weighted PCA", "k", "--"), ("one_pass", "AE, one encoder pass", "C0", "-"),
                                  ("refined", "AE, refined latents", "C3", "-")):
        rows = [res["pca"][str(S)] if key == "pca" else res["ae"][str(S)][key] for S in Ss]
        med = np.array([r["median"] for r in rows])
        lo = np.array([r["ci68"][0] for r in rows])
        hi = np.array([r["ci68"][1] for r in rows])
        ax.errorbar(Ss, med, yerr=[med - lo, hi - med], color=color, ls=ls, marker="o", ms=4, capsize=3, label=label)
    ax.axhline(1, color="0.5", lw=0.8, ls=":")
    ax.set_xticks(Ss)
    ax.set_xlabel("latent size / PCA components S")
    ax.set_ylabel("held-out median reduced χ²")
    ax.set_title(f"{n_test} held-out real SDSS spectra (AE: {steps} steps, default recipe)")
    ax.legend()
    return save_figure(fig, path)


def fig_scatter(path, chi2_ae, chi2_pca, snr, S) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    lim = [0.5, max(np.nanpercentile(chi2_ae, 99), np.nanpercentile(chi2_pca, 99)) * 1.1]
    sc = axes[0].scatter(chi2_pca, chi2_ae, c=np.log10(snr), s=10, cmap="viridis")
    axes[0].plot(lim, lim, "k:", lw=0.8)
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel(f"PCA-{S} reduced χ²")
    axes[0].set_ylabel(f"AE-{S} refined reduced χ²")
    fig.colorbar(sc, ax=axes[0], label="log10 median S/N")
    win = np.mean(chi2_ae < chi2_pca)
    axes[0].set_title(f"per held-out spectrum: AE better for {100 * win:.0f}%")
    ratio = chi2_ae / chi2_pca
    axes[1].scatter(snr, ratio, s=10, color="C3")
    axes[1].axhline(1, color="k", lw=0.8, ls=":")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("median S/N per pixel")
    axes[1].set_ylabel("χ²(AE refined) / χ²(PCA)")
    axes[1].set_title("where the AE loses: against S/N")
    fig.tight_layout()
    return save_figure(fig, path)


def fig_reconstructions(path, test, idx, ae, pca, S) -> str:
    """Whole spectra and two zooms (Hβ–[O III], Hα–[N II]) of a few held-out galaxies."""
    plt = pyplot()
    wave = test["wave_obs"]
    fig, axes = plt.subplots(len(idx), 3, figsize=(14, 2.6 * len(idx)), gridspec_kw={"width_ratios": [3, 1, 1]})
    for row, i in enumerate(idx):
        ok = test["w"][i] > 0
        y = np.where(ok, test["y"][i], np.nan)
        for col, (lo, hi) in enumerate([(wave[0], wave[-1]), (4820, 5030), (6520, 6610)]):
            ax = axes[row, col]
            lam = wave if col == 0 else wave / (1 + test["z"][i])
            sel = (lam >= lo) & (lam <= hi)
            if not sel.any():
                ax.set_visible(False)
                continue
            ax.plot(lam[sel], y[sel], color="0.6", lw=0.6, label="data")
            ax.plot(lam[sel], np.where(ae["valid"][i], pca["spec"][i], np.nan)[sel], color="k", lw=0.8, ls="--",
                    label=f"PCA-{S} χ² {pca['chi2'][i]:.2f}")
            ax.plot(lam[sel], np.where(ae["valid"][i], ae["spec_one"][i], np.nan)[sel], color="C0", lw=0.8,
                    label=f"AE one pass χ² {ae['chi2_one'][i]:.2f}")
            ax.plot(lam[sel], np.where(ae["valid"][i], ae["spec_ref"][i], np.nan)[sel], color="C3", lw=0.8,
                    label=f"AE refined χ² {ae['chi2_ref'][i]:.2f}")
            if col == 0:
                ax.set_title(f"{test['subclass'][i].strip('-') or 'galaxy'}, z = {test['z'][i]:.3f}", fontsize=9, loc="left")
                ax.set_xlabel("observed wavelength (Å)")
                ax.legend(fontsize=6, ncol=4, loc="upper right")
            else:
                ax.set_xlabel("restframe wavelength (Å)")
            finite = y[sel][np.isfinite(y[sel])]
            if finite.size:
                span = np.percentile(finite, [0.5, 99.5])
                pad = 0.15 * (span[1] - span[0])
                ax.set_ylim(span[0] - pad, span[1] + pad)
    fig.tight_layout()
    return save_figure(fig, path)


def fig_training(path, runs: dict) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for k, (name, rec) in enumerate(runs.items()):
        val = rec["val"]
        if not val:
            continue
        step = np.array([v["step"] for v in val])
        loss = np.array([v["loss"] for v in val])
        wall = rec["wall_s"] * step / max(step.max(), 1)
        axes[0].plot(step, loss, marker=".", color=f"C{k}", label=name)
        axes[1].plot(wall / 60, loss, marker=".", color=f"C{k}", label=name)
    for ax, xl in zip(axes, ("optimiser step (batch 64)", "wall time of the training process (min, pro rata)")):
        ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel("validation loss (Σχ² / Σw, paper eq. 1)")
        ax.legend(fontsize=7)
    fig.suptitle("learning curves on the validation spectra (10% of the training set)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


# ---- main ----------------------------------------------------------------------------------------------------


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"# Real SDSS DR14 galaxies: autoencoder against weighted PCA ({res['date']})", "",
             f"Machine: {m.get('cpu', '?')}, {m['cpu_count']} CPUs, torch {m['torch']}, load average at start "
             f"{res['load_start']}, at end {res['load_end']}. Data: {res['data']['n_train']} training spectra "
             f"({res['data']['groups_train']} galaxies), {res['data']['n_test']} held-out spectra "
             f"({res['data']['groups_test']} galaxies), split by object_group. Bright, nearby, high-S/N galaxies "
             f"(median S/N {res['data']['median_sn_test']:.0f}): not the SDSS main sample.", "",
             f"Each AE: one `fastspec train` process, default settings, {res['steps']} steps of batch 64, then "
             f"`best.pt` (lowest validation loss; validation spectra are 10% of the training set). Refined: "
             f"`fastspec.fit.refine`, up to {res['refine_steps']} Adam steps per spectrum. PCA: weighted restframe "
             "PCA on the same training spectra, coefficients fitted to each observed spectrum. χ²: reduced, "
             "fastspec.losses.CHI2_DEFINITION; medians with bootstrap 68% intervals over held-out spectra.", "",
             "| S | AE one pass | AE refined | PCA | AE refined < PCA (spectra) | train wall (whole process) | "
             "peak RSS | refine ms/spectrum |", "|---|---|---|---|---|---|---|---|"]

    def f(r):
        return f"{r['median']:.3f} [{r['ci68'][0]:.3f}, {r['ci68'][1]:.3f}]"

    for S in sorted(res["ae"], key=int):
        a = res["ae"][S]
        lines.append(f"| {S} | {f(a['one_pass'])} | {f(a['refined'])} | {f(res['pca'][S])} | "
                     f"{100 * a['refined_beats_pca']:.0f}% | {a['train']['wall_s'] / 60:.1f} min | "
                     f"{a['train']['peak_rss_mb']:.0f} MB | {a['refine_ms_per_spectrum']:.1f} |")
    if res.get("grid_check"):
        g = res["grid_check"]
        lines += ["", f"Restframe grids at S = {g['S']} (same recipe and steps):", "",
                  "| restframe grid | R | AE one pass | AE refined | train wall |", "|---|---|---|---|---|"]
        for tag, r in g.items():
            if tag != "S":
                lines.append(f"| {tag} | {r['n_rest']} | {f(r['one_pass'])} | {f(r['refined'])} | "
                             f"{r['wall_s'] / 60:.1f} min |")
    lines += ["", "Repeat observations (held-out galaxies with ≥ 2 spectra): latent distance to the other "
              "observation over the distance to the nearest other galaxy, per dimension standardised; "
              "self-retrieval = fraction whose nearest neighbour is the same galaxy.", "",
              "| latents | spectra | median ratio | self-retrieval |", "|---|---|---|---|"]
    for name, r in res["repeats"].items():
        if r.get("n_spectra"):
            lines.append(f"| {name} | {r['n_spectra']} ({r['n_galaxies']} galaxies) | {r['median_ratio']:.2f} "
                         f"[{r['ratio_ci68'][0]:.2f}, {r['ratio_ci68'][1]:.2f}] | {100 * r['self_retrieval']:.0f}% |")
    lines += ["", "Figures: " + ", ".join(f"`{Path(p).name}`" for p in res["figures"]), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latents", default="2,4,6,10", help="latent sizes S (default 2,4,6,10)")
    p.add_argument("--steps", type=int, default=2000, help="training steps per model (default 2000)")
    p.add_argument("--refine-steps", type=int, default=200, help="refinement steps per spectrum (default 200)")
    p.add_argument("--grid-check", action="store_true", help="also train the largest S on the linear restframe grid")
    p.add_argument("--work", default=str(Path(__file__).resolve().parent / "work" / "real"),
                   help="ingested data and training runs (default bench/work/real)")
    p.add_argument("--out", default=str(RESULTS / "real"), help="results folder (default bench/results/real)")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    work, out = Path(a.work), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    data = split(work)
    train, test = load_arrays(data["train"]), load_arrays(data["test"])
    snr = median_snr(test["y"], test["w"])
    Ss = [int(s) for s in a.latents.split(",")]
    runs = {}
    for S in Ss:
        runs[f"S={S}"] = train_run(data["train"], work / f"run-S{S}-{a.steps}", S, a.steps, [], a.threads)
    if a.grid_check:
        for tag, cfg in GRID_CHECK.items():
            runs[f"S={Ss[-1]} {tag}"] = train_run(data["train"], work / f"run-S{Ss[-1]}-{a.steps}-{tag}", Ss[-1],
                                                  a.steps, ["--model-config", json.dumps(cfg)], a.threads)
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(), "steps": a.steps,
           "refine_steps": a.refine_steps, "load_start": [round(v, 2) for v in load_start],
           "data": {k: v for k, v in data.items() if k.startswith(("n_", "groups_"))}, "ae": {}, "pca": {},
           "repeats": {}, "figures": []}
    res["data"]["median_sn_test"] = float(np.nanmedian(snr))
    evals = {}
    for S in Ss:
        print(f"bench_real: evaluating S={S}", file=sys.stderr, flush=True)
        rec = runs[f"S={S}"]
        ae = evals[S] = ae_eval(work / f"run-S{S}-{a.steps}" / "best.pt", test, a.refine_steps)
        pca = evals[("pca", S)] = pca_eval(train, test, S, ae["wave_rest"])
        res["pca"][str(S)] = summary(pca["chi2"])
        res["ae"][str(S)] = {"one_pass": summary(ae["chi2_one"]), "refined": summary(ae["chi2_ref"]),
                             "refined_beats_pca": float(np.mean(ae["chi2_ref"] < pca["chi2"])),
                             "one_pass_beats_pca": float(np.mean(ae["chi2_one"] < pca["chi2"])),
                             "refine_ms_per_spectrum": ae["refine_ms_per_spectrum"],
                             "refine_steps_median": float(np.median(ae["refine_steps"])),
                             "rest_grid": ae["rest_grid"], "n_rest": ae["n_rest"],
                             "train": {k: rec[k] for k in ("wall_s", "cpu_s", "peak_rss_mb", "resumed", "run")}}
    if a.grid_check:
        S = Ss[-1]
        res["grid_check"] = {"S": S, "default": {"one_pass": res["ae"][str(S)]["one_pass"],
                                                 "refined": res["ae"][str(S)]["refined"], "n_rest": evals[S]["n_rest"],
                                                 "wall_s": runs[f"S={S}"]["wall_s"]}}
        for tag in GRID_CHECK:
            ev = ae_eval(work / f"run-S{S}-{a.steps}-{tag}" / "best.pt", test, a.refine_steps)
            res["grid_check"][tag] = {"one_pass": summary(ev["chi2_one"]), "refined": summary(ev["chi2_ref"]),
                                      "n_rest": ev["n_rest"], "wall_s": runs[f"S={S} {tag}"]["wall_s"]}
    S = Ss[-1]
    res["repeats"] = {f"AE-{S} one pass": repeats(evals[S]["latents_one"], test["group"]),
                      f"AE-{S} refined": repeats(evals[S]["latents_ref"], test["group"]),
                      f"PCA-{S} coefficients": repeats(evals[("pca", S)]["coeffs"], test["group"])}
    res["figures"] = [
        fig_chi2_vs_S(out / "chi2_vs_S.png", res, len(test["z"]), a.steps),
        fig_scatter(out / "chi2_ae_vs_pca.png", evals[S]["chi2_ref"], evals[("pca", S)]["chi2"], snr, S),
        fig_reconstructions(out / "reconstructions.png", test, pick(evals[S]["chi2_ref"], evals[("pca", S)]["chi2"]),
                            evals[S], evals[("pca", S)], S),
        fig_training(out / "training.png", runs),
    ]
    res["load_end"] = [round(v, 2) for v in os.getloadavg()]
    (out / "real.json").write_text(json.dumps(res, indent=1))
    (out / "real.md").write_text(markdown(res))
    print(markdown(res))
    return 0


def pick(chi2_ae, chi2_pca) -> list[int]:
    """Three ordinary held-out spectra (both χ² < 5; the few that neither model fits are in the scatter
    figure): where the AE wins most against the PCA, the median case, where it loses most."""
    ok = np.flatnonzero((chi2_ae < 5) & (chi2_pca < 5))
    order = ok[np.argsort(np.log(chi2_ae[ok] / chi2_pca[ok]))]
    return [int(order[0]), int(order[len(order) // 2]), int(order[-1])]


if __name__ == "__main__":
    raise SystemExit(main())
