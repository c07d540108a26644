"""The autoencoder variants of a science run: train each (or reuse a finished run of the same configuration), load
it, encode spectra with it, and draw the training curves; with the clocks the run's timings read."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..atomic import atomic_path, write_json
from ..encode import encode_arrays
from ..model import load_model
from ..plotting import pyplot, save_figure
from .config import VARIANTS, ScienceConfig, say
from .labels import COLORS


def cpu_seconds() -> float:
    """CPU seconds of this process (all threads) and its finished children."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def load_average():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


@dataclass(frozen=True)
class Run:
    """One training of a science run: a variant at a latent size with a seed. The primary run of each variant
    (n_latent, the run's seed) is the one every experiment reads; the others feed the S/seed scan."""

    variant: str
    n_latent: int
    seed: int
    primary: bool = False

    @property
    def key(self) -> str:
        return f"ae_{self.variant}" if self.primary else f"ae_{self.variant}_S{self.n_latent}_seed{self.seed}"

    @property
    def dirname(self) -> str:
        return f"model-{self.variant}" if self.primary else f"model-{self.variant}-S{self.n_latent}-seed{self.seed}"


def primary_run(cfg: ScienceConfig, variant: str) -> Run:
    return Run(variant, cfg.n_latent, cfg.seed, primary=True)


def all_runs(cfg: ScienceConfig) -> list[Run]:
    """The primary run of every variant, then the other seeds of every variant at n_latent, then the S scan of
    cfg.scan_variant (every seed)."""
    seeds = [cfg.seed + i for i in range(max(1, cfg.n_seeds))]
    runs = [primary_run(cfg, v) for v in cfg.variants]
    runs += [Run(v, cfg.n_latent, s) for v in cfg.variants for s in seeds[1:]]
    if cfg.scan_variant in cfg.variants:
        runs += [Run(cfg.scan_variant, S, s) for S in cfg.s_scan if S != cfg.n_latent for s in seeds]
    return runs


def _variant_train_config(cfg: ScienceConfig, variant: str, data_path: str, run: Run | None = None):
    from ..train import TrainConfig

    run = run or primary_run(cfg, variant)
    v = VARIANTS[variant]
    cons = cfg.consistency if v["consistency"] is None else v["consistency"]
    model = {"n_latent": run.n_latent, "z_max": 0.5, **cfg.model}
    return TrainConfig(
        data=[data_path], out=os.path.join(cfg.workdir, run.dirname), model=model, steps=cfg.steps,
        batch_size=cfg.batch_size, lr=cfg.lr, precision=cfg.precision, seed=run.seed, augment=v["augment"],
        consistency=float(cons), consistency_sigma=v.get("consistency_sigma"), val_fraction=0.05, checkpoint_every=0, log_every=10, device=cfg.device,
        num_workers=cfg.num_workers, progress=cfg.progress, block_rows=256, shuffle_blocks=8,
    )


def _same_config(path: str, want: dict) -> bool:
    if not os.path.exists(path):
        return False
    with open(path) as fh:
        have = json.load(fh)
    keys = ("data", "model", "steps", "batch_size", "lr", "precision", "seed", "augment", "consistency",
            "consistency_sigma", "val_fraction")
    return all(json.dumps(have.get(k), sort_keys=True) == json.dumps(want.get(k), sort_keys=True) for k in keys)


def train_variant(cfg: ScienceConfig, variant: str, data_path: str, run: Run | None = None) -> dict:
    """Train (or reuse a finished run with the same configuration) and return a training summary."""
    run = run or primary_run(cfg, variant)
    tc = _variant_train_config(cfg, variant, data_path, run)
    final = os.path.join(tc.out, "final.pt")
    want = tc.to_dict()
    want["model"] = {**{"n_latent": run.n_latent, "z_max": 0.5}, **cfg.model}
    cached = os.path.join(tc.out, "science-train.json")
    what = f"variant {variant}" + ("" if run.primary else f" (S = {run.n_latent}, seed {run.seed})")
    if os.path.exists(final) and _same_config(cached, {**want, "data": [os.path.abspath(data_path)]}):
        say(cfg, f"{what}: reusing the trained model in {tc.out}")
        with open(cached) as fh:
            return {**json.load(fh)["summary"], "reused": True}
    say(cfg, f"training {what} ({VARIANTS[variant]['label']}): {cfg.steps} steps of {cfg.batch_size}")
    from ..train import Trainer

    # the learning curve reads the primary runs only
    marks = set(curve_steps(cfg.steps, cfg.curve_fractions)) if run.primary else set()
    for old in os.listdir(tc.out) if os.path.isdir(tc.out) else ():
        if old.startswith("curve-") and old.endswith(".pt"):
            os.remove(os.path.join(tc.out, old))

    def snapshot(trainer):
        # weights at a few points of the run, for the learning curve (evaluated after training)
        if trainer.step in marks:
            state = {k: v.detach().to("cpu", copy=True) for k, v in trainer.model.state_dict().items()}
            path = os.path.join(tc.out, f"curve-{trainer.step}.pt")
            with atomic_path(path, sync=False) as tmp:
                torch.save(state, tmp)

    t0, c0 = time.perf_counter(), cpu_seconds()
    trainer = Trainer(tc)
    try:
        summary = trainer.run(on_step=snapshot)
    finally:
        trainer.close()
    summary["curve_steps"] = sorted(marks)
    summary["wall_s"] = time.perf_counter() - t0
    summary["cpu_s"] = cpu_seconds() - c0
    summary["load_average_after"] = load_average()
    summary["augment"] = tc.augment
    summary["consistency"] = tc.consistency
    summary["consistency_sigma"] = tc.consistency_sigma
    with open(os.path.join(tc.out, "history.json")) as fh:
        hist = json.load(fh)
    summary["final_train_loss"] = hist["train"][-1]["loss"] if hist["train"] else None
    summary["val_losses"] = [h["loss"] for h in hist["val"]]
    rec = {**want, "data": [os.path.abspath(data_path)]}
    write_json(cached, {**rec, "summary": summary}, sync=False, indent=1, default=str)
    return summary


def curve_steps(steps: int, fractions) -> list[int]:
    """Steps (before the last) at which the learning curve takes a snapshot of the weights."""
    return sorted({min(steps - 1, max(1, round(f * steps))) for f in fractions} - {0}) if steps > 1 else []


def load_variant(cfg: ScienceConfig, variant: str, run: Run | None = None):
    """The trained model of `variant`'s primary run, or of `run` (its final checkpoint in the work directory)."""
    run = run or primary_run(cfg, variant)
    return load_model(os.path.join(cfg.workdir, run.dirname, "final.pt"), cfg.device)


def encode(model, data, **kw) -> dict:
    """fastspec.encode.encode_arrays of a set's y, w and z in batches of 128 (kw: chi2, observed, restframe, refine)."""
    return encode_arrays(model, data["y"], data["w"], data["z"], batch_size=128, **kw)


def encode_variants(cfg: ScienceConfig, models: dict, test: dict, lowz: dict, moved: dict,
                    rerendered: dict | None = None) -> dict:
    """Everything the experiments read of the variants' encodings, made once per variant: {"test", "refined"
    (latents of the first cfg.n_refine refined, with cfg.refine_steps), "lowz", "moved", "rerendered"} -> {model name: encoding}."""
    enc = {"test": {}, "refined": {}, "lowz": {}, "moved": {}, "rerendered": {}}
    # refinement costs ~100 decoder passes a spectrum: the first n_refine held-out spectra, as for the S/seed scan
    n_ref = min(cfg.n_refine, len(test["z"]))
    sub = {k: test[k][:n_ref] for k in ("y", "w", "z")}
    for v, model in models.items():
        name = f"ae_{v}"
        enc["test"][name] = encode(model, test, chi2=True, observed=True)
        if cfg.refine_steps:
            enc["refined"][f"{name}_refined"] = encode(model, sub, chi2=True, observed=True, refine=cfg.refine_steps)
        enc["lowz"][name] = encode(model, lowz, restframe=True)
        enc["moved"][name] = encode(model, moved, chi2=True)
        if rerendered is not None:
            enc["rerendered"][name] = encode(model, rerendered, chi2=True)
    return enc


def scan_encodings(cfg: ScienceConfig, runs: list[Run], test: dict, enc: dict) -> dict:
    """For every run: its held-out χ² with one encoder pass (all test spectra) and with refined latents (the first
    cfg.n_refine), reusing the primary runs' encodings. {run key: {variant, S, seed, chi2, chi2_refined}}."""
    n_ref = min(cfg.n_refine, len(test["z"]))
    sub = {k: test[k][:n_ref] for k in ("y", "w", "z")}
    out = {}
    for run in runs:
        if run.primary:
            one = enc["test"][run.key]["chi2"]
            ref = enc["refined"].get(f"{run.key}_refined", {}).get("chi2")
            ref = ref[:n_ref] if ref is not None else None
        else:
            say(cfg, f"encoding the held-out spectra with {run.key}")
            model = load_variant(cfg, run.variant, run)
            one = encode(model, test, chi2=True)["chi2"]
            ref = encode(model, sub, chi2=True, refine=cfg.refine_steps)["chi2"] if cfg.refine_steps else None
        out[run.key] = {"variant": run.variant, "S": run.n_latent, "seed": run.seed, "chi2": one, "chi2_refined": ref}
    return out


def read_histories(cfg: ScienceConfig) -> dict:
    """The loss history (history.json) of each variant's training run."""
    histories = {}
    for v in cfg.variants:
        with open(os.path.join(cfg.workdir, f"model-{v}", "history.json")) as fh:
            histories[v] = json.load(fh)
    return histories


def plot_training(path, histories: dict) -> str:
    """Training (and augmented-copy) and validation loss of each variant against spectra seen."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(11, 4.2))
    for v, h in histories.items():
        col = COLORS[f"ae_{v}"]
        tr = h.get("train", [])
        ax.plot([e["spectra"] for e in tr], [e["loss"] for e in tr], lw=1, color=col, label=f"{VARIANTS[v]['label']} train")
        if any("loss_aug" in e for e in tr):
            ax.plot([e["spectra"] for e in tr], [e.get("loss_aug", np.nan) for e in tr], lw=0.7, ls=":", color=col,
                    label=f"{VARIANTS[v]['label']} augmented copies")
        va = h.get("val", [])
        ax.plot([e["spectra"] for e in va], [e["loss"] for e in va], "o--", ms=4, color=col, label=f"{VARIANTS[v]['label']} validation")
    ax.set_yscale("log")
    ax.set_xlabel("spectra seen")
    ax.set_ylabel("loss Σ w (y − ŷ)² / Σ w")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: the curves fill the axes
    ax.grid(alpha=0.3)
    ax.set_title("training of the variants (first seed)", fontsize=10)
    return save_figure(fig, path)
