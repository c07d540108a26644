"""Outlier scores (fastspec.outliers) with injected anomalies, on held-out mocks and real SDSS galaxies.

A flow is fitted to the latents of a training set (encoder at the catalogue z). The held-out spectra are the
normal set; copies of them with one injected anomaly each — of kinds the training set lacks — are the
anomalous sets: a wrong catalogue redshift (encoded at z ± 0.02…0.1), a broad-line quasar component (power
law + broad Balmer and Mg II lines), a stellar spectrum at z = 0 in place of the galaxy, a flux-calibration
failure (a power-law tilt), a sky-subtraction residual (unmasked residuals of the strong night-sky lines).
ROC AUC per kind of −log p (the flow) and, for comparison, of the reconstruction χ².
Sets: mock — held-out `fastspec.mock` spectra with a model trained on other mocks (bench/mock_split.py);
real — the by-object_group split of ../shared/data/real/sdss-dr14, with a figure of the least and most
probable held-out galaxies and their reconstructions.

    python bench/bench_outliers.py                     # both sets; trains what is not cached in bench/work
    python bench/bench_outliers.py --set real --model RUN/best.pt --train train.h5 --test test.h5
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_info  # noqa: E402

from fastspec.encode import encode_arrays, prepare  # noqa: E402
from fastspec.model import load_model  # noqa: E402
from fastspec.outliers import fit_flow, roc_auc  # noqa: E402
from fastspec.plotting import pyplot, save_figure  # noqa: E402
from fastspec.spectra_io import open_spectra  # noqa: E402

SKY = np.array([5578.5, 5891.6, 6301.7, 6365.5, 7246.0, 7276.4, 7341.0, 7751.1, 7794.1, 7821.5, 7913.7, 7964.6,
                8344.6, 8399.2, 8430.2, 8465.4, 8885.9, 8919.6, 8943.4, 8988.4, 9314.0])
KINDS = ("wrong_redshift", "quasar", "star", "flux_calibration", "sky_residual")


def load(path):
    with open_spectra(path) as f:
        b = f.read()
        cols = set(f.columns())
        sub = f.read_column("source/class") if "source/class" in cols else np.array([b""] * len(b.z))
        sn = f.read_column("source/sn_median") if "source/sn_median" in cols else np.full(len(b.z), np.nan)
        wave = f.wave_obs
    y, w, z = prepare(b)
    return {"y": y, "w": w, "z": z.astype(np.float64), "id": np.asarray(b.object_id), "sub": sub, "sn": sn,
            "wave": wave}


def norm_median(f, wave, z):
    win = (wave / (1 + z) > 5300) & (wave / (1 + z) < 5850)
    return np.median(f[win]) if win.any() else np.median(f)


def inject(kind, d, rng):
    """(y, w, z) of the held-out spectra with one anomaly of `kind` each."""
    y, w, z, wave = d["y"].copy(), d["w"].copy(), d["z"].copy(), d["wave"].astype(np.float64)
    n = len(z)
    sig = 1 / np.sqrt(np.where(w > 0, w, np.inf))
    noise = rng.standard_normal(y.shape) * sig
    for i in range(n):
        rest = wave / (1 + z[i])
        if kind == "wrong_redshift":
            z[i] = max(0.003, z[i] + rng.choice([-1, 1]) * rng.uniform(0.02, 0.1))
        elif kind == "quasar":
            amp = rng.uniform(0.3, 1.0)
            q = (rest / 5500.0) ** -1.5
            for line, ew in ((6564.6, 300.0), (4862.7, 80.0), (4341.7, 30.0), (2799.0, 60.0)):
                s = line * 5000 / 2.355 / 299792.458
                q = q + (ew / (s * np.sqrt(2 * np.pi))) * np.exp(-0.5 * ((rest - line) / s) ** 2) * (line / 5500.0) ** -1.5
            q *= amp / np.median(q)
            y[i] = np.where(w[i] > 0, y[i] + q, 0)
        elif kind == "star":
            T = rng.uniform(4000, 9000)
            lam = wave * 1e-10
            bb = 1 / (lam**5 * (np.exp(6.626e-34 * 2.998e8 / (lam * 1.381e-23 * T)) - 1))
            for line, depth, width in ((6564.6, 0.3, 8), (4862.7, 0.35, 8), (4341.7, 0.35, 8), (4102.9, 0.35, 8),
                                       (3934.8, 0.5 * 6000 / T, 6), (3969.6, 0.5 * 6000 / T, 6),
                                       (5175.0, 0.2 * 6000 / T, 10), (5894.0, 0.25 * 6000 / T, 5)):
                bb = bb * (1 - min(depth, 0.8) * np.exp(-0.5 * ((wave - line) / width) ** 2))
            bb /= norm_median(bb, wave, z[i])
            y[i] = np.where(w[i] > 0, bb + noise[i], 0)
        elif kind == "flux_calibration":
            alpha = rng.choice([-1, 1]) * rng.uniform(0.8, 2.0)
            tilt = (wave / 6000.0) ** alpha
            y[i] = y[i] * tilt / norm_median(tilt, wave, z[i])
            w[i] = w[i] / np.maximum(tilt / norm_median(tilt, wave, z[i]), 1e-3) ** 2
        elif kind == "sky_residual":
            typ = np.median(sig[i][w[i] > 0])
            r = np.zeros_like(wave)
            for line in SKY:
                r += rng.uniform(5, 30) * typ * rng.choice([-1, 1]) * np.exp(-0.5 * ((wave - line) / 1.5) ** 2)
            ok = w[i] > 0
            cont = np.where(ok, y[i], np.interp(wave, wave[ok], y[i][ok]))  # masked pixels hold 0: fill them
            unmask = ~ok & (np.abs(r) > typ)  # the pipeline did not mask these residuals
            w[i] = np.where(unmask, 1 / typ**2, w[i])
            y[i] = np.where(w[i] > 0, cont + r + np.where(unmask, rng.standard_normal(len(wave)) * typ, 0), 0)
    return y.astype(np.float32), w.astype(np.float32), z


def injected_aucs(model, flow, test, rng) -> tuple[dict, dict, np.ndarray, np.ndarray]:
    """ROC AUC per injected kind (−log p and χ²) of `test` against copies with one anomaly each."""
    base = encode_arrays(model, test["y"], test["w"], test["z"], chi2=True)
    lp0, chi0 = flow.score(base["latents"]), base["chi2"]
    kinds, examples = {}, {}
    for kind in KINDS:
        y, w, z = inject(kind, test, rng)
        enc = encode_arrays(model, y, w, z.astype(np.float32), chi2=True)
        lp = flow.score(enc["latents"])
        kinds[kind] = {"auc_neg_log_prob": roc_auc(-lp0, -lp), "auc_chi2": roc_auc(chi0, enc["chi2"]),
                       "median_log_prob": float(np.median(lp)), "median_chi2": float(np.median(enc["chi2"]))}
        examples[kind] = (y[0], w[0])
    return kinds, examples, lp0, chi0


def evaluate(model_path, train_path, test_path, seed: int = 0, flow_steps: int = 2000) -> dict:
    """Flow on the training latents; AUCs of the injected kinds on the held-out set."""
    model = load_model(model_path)
    train, test = load(train_path), load(test_path)
    s_train = encode_arrays(model, train["y"], train["w"], train["z"])["latents"]
    flow = fit_flow(s_train, transforms=3, hidden=(32, 32), steps=flow_steps, seed=seed)
    kinds, examples, lp0, chi0 = injected_aucs(model, flow, test, np.random.default_rng(seed))
    return {"model": model, "test": test, "lp0": lp0, "chi0": chi0, "examples": examples,
            "summary": {"model": os.path.abspath(model_path), "train": os.path.abspath(train_path),
                        "test": os.path.abspath(test_path), "n_train": len(train["z"]), "n_test": len(test["z"]),
                        "train_logp_median": float(np.median(flow.score(s_train))),
                        "test_logp_median": float(np.median(lp0)), "test_chi2_median": float(np.median(chi0)),
                        "kinds": kinds}}


def fig_injected(path, ev) -> None:
    """One example of each injected kind over its original spectrum."""
    plt = pyplot()
    test, r = ev["test"], ev["summary"]["kinds"]
    fig, axes = plt.subplots(len(KINDS), 1, figsize=(11, 1.8 * len(KINDS)), sharex=True)
    for ax, kind in zip(axes, KINDS):
        y, w = ev["examples"][kind]
        ax.plot(test["wave"], np.where(w > 0, y, np.nan), color="tab:red", lw=0.5, label="injected")
        ax.plot(test["wave"], np.where(test["w"][0] > 0, test["y"][0], np.nan), color="0.4", lw=0.5, label="original")
        ax.set_title(f"{kind}: AUC(−log p) = {r[kind]['auc_neg_log_prob']:.3f}, AUC(χ²) = "
                     f"{r[kind]['auc_chi2']:.3f}", fontsize=8)
    axes[0].legend(fontsize=7)
    axes[-1].set_xlabel("observed wavelength [Å]")
    fig.tight_layout()
    save_figure(fig, path)


def fig_extremes(path, ev, subclass) -> list[dict]:
    """The least and most probable held-out galaxies with their reconstructions, labelled by SDSS subclass."""
    model, test, lp0 = ev["model"], ev["test"], ev["lp0"]
    order = np.argsort(lp0)
    picks = list(order[:4]) + list(order[-3:])
    rec = encode_arrays(model, test["y"][picks], test["w"][picks], test["z"][picks].astype(np.float32),
                        chi2=True, observed=True)
    plt = pyplot()
    fig, axes = plt.subplots(len(picks), 1, figsize=(11, 2.0 * len(picks)), sharex=True)
    wave = test["wave"]
    for ax, i, yh, c in zip(axes, picks, rec["spec_obs"], rec["chi2"]):
        good = test["w"][i] > 0
        k = 5
        sm = np.convolve(np.where(good, test["y"][i], np.nan), np.ones(k) / k, mode="same")
        ax.plot(wave, sm, color="k", lw=0.6, label="observed (5-px mean)")
        ax.plot(wave, np.where(good, yh, np.nan), color="tab:orange", lw=0.6, alpha=0.8, label="reconstruction")
        lo, hi = np.nanpercentile(np.r_[sm, yh[good]], [0.5, 99.5])
        resid = np.convolve(np.where(good, test["y"][i] - yh, np.nan), np.ones(k) / k, mode="same")
        base = lo - 0.25 * (hi - lo)
        ax.plot(wave, base + resid, color="tab:blue", lw=0.5, label="residual (offset)")
        ax.axhline(base, color="tab:blue", lw=0.3, ls=":")
        ax.set_ylim(base - 0.25 * (hi - lo), hi + 0.15 * (hi - lo))
        sub = subclass.get(str(test["id"][i]), "")
        tag = "LEAST probable" if i in order[:4] else "most probable"
        ax.set_title(f"{tag}: object {test['id'][i]}  z = {test['z'][i]:.4f}  log p = {lp0[i]:.1f}  "
                     f"χ²_red = {c:.2f}  S/N = {test['sn'][i]:.0f}  {sub}", fontsize=8)
    axes[0].legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("observed wavelength [Å]")
    fig.tight_layout()
    save_figure(fig, path)
    return [{"object_id": str(test["id"][i]), "z": float(test["z"][i]), "log_prob": float(lp0[i]),
             "chi2": float(c), "subclass": subclass.get(str(test["id"][i]), "")} for i, c in zip(picks, rec["chi2"])]


def auc_table(summary) -> list[str]:
    md = ["| injected anomaly | ROC AUC of −log p (flow) | ROC AUC of χ²_red | median log p | median χ²_red |",
          "|---|---|---|---|---|"]
    for kind, r in summary["kinds"].items():
        md.append(f"| {kind} | {r['auc_neg_log_prob']:.3f} | {r['auc_chi2']:.3f} | {r['median_log_prob']:.2f} | "
                  f"{r['median_chi2']:.2f} |")
    return md + ["", f"Normal (held-out) set: median log p {summary['test_logp_median']:.2f} (training set "
                 f"{summary['train_logp_median']:.2f}), median χ²_red {summary['test_chi2_median']:.2f}.", ""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", choices=["real", "mock", "all"], default="all",
                    help="real: DR14 split; mock: fastspec.mock spectra with a mock-trained model; all (default)")
    ap.add_argument("--model", default=None, help="model for the real set (default: bench/real_sdss.py's "
                    "default_model, trained and cached if missing)")
    ap.add_argument("--train", default=None, help="real training spectra (default: the DR14 split)")
    ap.add_argument("--test", default=None, help="real held-out spectra (default: the DR14 split)")
    ap.add_argument("--mock-model", default=None, help="model for the mock set (default: bench/mock_split.py's)")
    ap.add_argument("--mock-train-n", type=int, default=3000, help="training mocks for the mock set's model")
    ap.add_argument("--n-kcorrect", type=int, default=200, help="held-out fastspec.mock spectra (the normal set)")
    ap.add_argument("--flow-steps", type=int, default=2000, help="flow training steps (default 2000)")
    ap.add_argument("--mock-train-steps", type=int, default=1500, help="its training steps (the demo's 1500)")
    ap.add_argument("--work", default=str(Path(__file__).resolve().parent / "work"), help="cache folder")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--manifest", default=str(Path(__file__).resolve().parents[2] / "shared/data/real/sdss-dr14/MANIFEST.tsv"),
                    help="the real spectra's MANIFEST.tsv (subclass labels for the figure)")
    ap.add_argument("--tag", default="outliers")
    ap.add_argument("--results", default=str(RESULTS), help="where the .json, .md and figures go")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work, results = Path(args.work), Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = {"machine": machine_info(), "load_average": os.getloadavg()}
    md = [f"# Outlier scores with injected anomalies ({args.tag})", "",
          "A flow (zuko MAF, 3 transforms) is fitted to the encoder latents of a training set; the held-out "
          "spectra are the normal set, and a copy of each with one injected anomaly per kind (of kinds the "
          "training set lacks) the anomalous set. ROC AUC of −log p (the flow) and, for comparison, of the "
          "reconstruction χ²_red.", ""]
    if args.set in ("mock", "all"):
        import mock_split

        ms = mock_split.split(work / "mock", n_train=args.mock_train_n, n_test=args.n_kcorrect,
                             train_steps=args.mock_train_steps)
        ev = evaluate(args.mock_model or ms["model"], ms["train"], ms["test"], flow_steps=args.flow_steps)
        res["mock"] = ev["summary"]
        fig_injected(results / f"{args.tag}-mock-injected.png", ev)
        md += [f"## Mocks: {ev['summary']['n_test']} held-out `fastspec.mock` spectra", "",
               f"Model `{ev['summary']['model']}` trained on {ev['summary']['n_train']} other mocks "
               "(bench/mock_split.py: `fastspec train` defaults); the flow on their latents.", ""]
        md += auc_table(ev["summary"]) + [f"![mock injected]({args.tag}-mock-injected.png)", ""]
    if args.set in ("real", "all"):
        if args.model is None or args.train is None or args.test is None:
            import real_sdss

            split = real_sdss.split(work / "real")
            args.train, args.test = args.train or split["train"], args.test or split["test"]
            args.model = args.model or real_sdss.default_model(work / "real")
        ev = evaluate(args.model, args.train, args.test, flow_steps=args.flow_steps)
        subclass = {}
        if Path(args.manifest).exists():
            import csv

            with open(args.manifest) as fh:
                subclass = {r["specobjid"]: r["subclass"] or "-" for r in csv.DictReader(fh, delimiter="\t")}
        ev["summary"]["extremes"] = fig_extremes(results / f"{args.tag}-extremes.png", ev, subclass)
        fig_injected(results / f"{args.tag}-injected.png", ev)
        res["real"] = ev["summary"]
        md += [f"## Real: {ev['summary']['n_test']} held-out SDSS DR14 galaxies (split by object_group)", "",
               f"Model `{ev['summary']['model']}` trained on the {ev['summary']['n_train']} training spectra.", ""]
        md += auc_table(ev["summary"]) + ["The least and most probable held-out galaxies:", "",
                                          f"![extremes]({args.tag}-extremes.png)", "",
                                          f"![injected]({args.tag}-injected.png)", ""]
    res["seconds"] = time.perf_counter() - t0
    res["load_average_after"] = os.getloadavg()
    (results / f"{args.tag}.json").write_text(json.dumps(res, indent=2, default=float))
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    md += [f"{res['seconds']:.0f} s on {args.threads} torch thread(s); load average before/after "
           f"{res['load_average']} / {res['load_average_after']}.", "", "Machine:", "", "```", lscpu.strip(),
           "```", ""]
    (results / f"{args.tag}.md").write_text("\n".join(md))
    print("\n".join(md[:md.index("Machine:")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
