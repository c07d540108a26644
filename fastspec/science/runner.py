"""One science run end to end: mocks → training → PCA baseline → encodings → every experiment of EXPERIMENTS →
science-<mode>.json, science-<mode>.md and the figures, with the wall and CPU time of each phase."""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager

import numpy as np
import torch

from ..atomic import write_text
from ..instruments import get_instrument
from ..losses import CHI2_DEFINITION
from .baselines import WeightedPCA, fit_pca_baseline
from .config import VARIANTS, ScienceConfig, say
from .context import Context
from .data import held_out_sets, invariance_sample, mock_file, rerendered_copies
from .experiments import EXPERIMENTS
from .page import markdown
from .training import (
    all_runs,
    cpu_seconds,
    encode_variants,
    load_average,
    load_variant,
    plot_training,
    read_histories,
    scan_encodings,
    train_variant,
)


@contextmanager
def _timed(timings: dict, phase: str):
    """Add the wall and CPU seconds of the block to timings[<phase>_s] and timings[<phase>_cpu_s]."""
    t0, c0 = time.perf_counter(), cpu_seconds()
    yield
    timings[f"{phase}_s"] = timings.get(f"{phase}_s", 0.0) + time.perf_counter() - t0
    timings[f"{phase}_cpu_s"] = timings.get(f"{phase}_cpu_s", 0.0) + cpu_seconds() - c0


def run(cfg: ScienceConfig, machine: dict | None = None, note: str | None = None) -> dict:
    """Every experiment; writes figures to <out_dir>/science-<mode>/, numbers to science-<mode>.json and a
    Markdown page to science-<mode>.md. Returns the results dict."""
    t_start, c_start = time.perf_counter(), cpu_seconds()
    timings = {}
    os.makedirs(cfg.workdir, exist_ok=True)
    fig_dir = os.path.join(cfg.out_dir, f"science-{cfg.mode}")
    os.makedirs(fig_dir, exist_ok=True)
    load_start = load_average()
    torch.manual_seed(cfg.seed)

    with _timed(timings, "data"):
        train_path = mock_file(cfg, os.path.join(cfg.workdir, f"train-{cfg.mode}.h5"), cfg.n_train, cfg.seed, 0)
        test, lowz = held_out_sets(cfg)
        wave_obs = get_instrument("sdss").wave_obs

    with _timed(timings, "training"):
        runs = all_runs(cfg)
        training = {v: train_variant(cfg, v, train_path) for v in cfg.variants}  # the primary runs first
        scan_training = {r.key: (training[r.variant] if r.primary else train_variant(cfg, r.variant, train_path, r))
                          for r in runs}
    models = {v: load_variant(cfg, v) for v in cfg.variants}
    wave_rest = next(iter(models.values())).wave_rest.double().numpy()
    n_params = int(sum(p.numel() for p in next(iter(models.values())).parameters()))
    budget = (f"{cfg.mode} mode: {cfg.steps} steps × {cfg.batch_size} spectra from {cfg.n_train} mocks, "
              f"encoder channels {tuple(cfg.model.get('encoder_channels', (128, 256, 512)))}")

    with _timed(timings, "pca"):
        baseline = fit_pca_baseline(cfg, train_path, test, lowz, wave_obs, wave_rest)

    with _timed(timings, "encode"):
        say(cfg, "encoding held-out, low-z and moved spectra with every variant")
        inv_idx, moved = invariance_sample(cfg, test, wave_obs)
        rerendered = rerendered_copies(cfg, inv_idx)
        enc = encode_variants(cfg, models, test, lowz, moved, rerendered)
        scan = scan_encodings(cfg, runs, test, enc)

    results = {
        "experiment": "fastspec science: the findings of Melchior, Hahn & Liang 2022 against mock ground truth",
        "mode": cfg.mode, "config": cfg.to_dict(), "machine": machine or {}, "load_average_start": load_start,
        "note": note,
        "training_budget": budget, "model_parameters": n_params, "chi2_definition": CHI2_DEFINITION,
        "variants": {f"ae_{v}": VARIANTS[v]["label"] for v in cfg.variants},
        "training": {f"ae_{v}": training[v] for v in cfg.variants},
        "scan_training": {k: {kk: t.get(kk) for kk in ("wall_s", "cpu_s", "reused", "val_losses")}
                          for k, t in scan_training.items()},
        "pca": {"method": WeightedPCA.__doc__.split("\n")[0].strip(), "n_components": cfg.n_latent,
                "n_fit": baseline.n_fit, "iterations": len(baseline.pca.history),
                "weighted_ssr_history": baseline.pca.history},
    }
    ctx = Context(cfg=cfg, fig_dir=fig_dir, budget=budget, wave_obs=wave_obs, wave_rest=wave_rest, test=test,
                  lowz=lowz, models=models, training=results["training"], baseline=baseline, inv_idx=inv_idx,
                  moved=moved, enc=enc, scan=scan)
    figures = {}
    for exp in EXPERIMENTS:
        if exp.enabled(cfg):
            with _timed(timings, exp.phase):
                results[exp.key], figs = exp.run(ctx)
            figures.update(figs)
    figures["training"] = plot_training(os.path.join(fig_dir, "training.png"), read_histories(cfg))

    timings["total_s"] = time.perf_counter() - t_start
    timings["total_cpu_s"] = cpu_seconds() - c_start
    # Models reused from an earlier run of the same configuration: count the training as it was recorded then.
    reused = [k for k, t in scan_training.items() if t.get("reused")]
    timings["training_reused"] = reused
    extra_wall = sum(float(scan_training[k].get("wall_s") or 0) for k in reused)
    extra_cpu = sum(float(scan_training[k].get("cpu_s") or 0) for k in reused)
    timings["end_to_end_s"] = timings["total_s"] + extra_wall
    timings["end_to_end_cpu_s"] = timings["total_cpu_s"] + extra_cpu
    # On an idle machine the wall time lies between CPU time / cores (all of it parallel) and CPU time.
    timings["idle_wall_estimate_s"] = [timings["end_to_end_cpu_s"] / max(1, torch.get_num_threads()),
                                       timings["end_to_end_cpu_s"]]
    results["timings"] = timings
    results["load_average_end"] = load_average()
    results["figures"] = {k: os.path.relpath(p, cfg.out_dir) for k, p in figures.items()}
    write_text(os.path.join(cfg.out_dir, f"science-{cfg.mode}.json"), json.dumps(_jsonable(results), indent=1),
               sync=False)
    write_text(os.path.join(cfg.out_dir, f"science-{cfg.mode}.md"), markdown(results), sync=False)
    say(cfg, f"done in {timings['total_s']:.0f} s: {cfg.out_dir}/science-{cfg.mode}.md")
    return results


def _jsonable(obj):
    """`obj` with numpy arrays and scalars as lists and Python numbers, and non-finite floats as None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj
