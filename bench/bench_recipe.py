"""Training-recipe experiments on the real DR14 split: held-out median χ² against spectra seen and wall time.

    python bench/bench_recipe.py run --tag B_mean --init-mean --steps 600       # one experiment → <tag>.json
    python bench/bench_recipe.py summarise bench/results/recipe/runs.json      # table + learning-curve figure

`run` trains in-process with a bare loop (no loader, no checkpoints) so that one change at a time can be
compared: decoder started at the training mean, loss normalisation, learning rate, batch size, bf16 encoder,
encoder width, weight decay, redshift/noise augmentation, latent noise, a linear skip path in the decoder, the
training-set size. Every `--eval-every` steps it records the median reduced χ² of the held-out galaxies (and of
200 training spectra) and the training wall time. The held-out set is also what is looked at while choosing,
so these numbers pick a recipe; bench/bench_real.py measures the chosen one with validation-based selection.
What was learned is in bench/results/recipe/recipe.md; the chosen recipe is `fastspec train`'s default.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real import load_arrays  # noqa: E402
from common import RESULTS  # noqa: E402
from real_sdss import split  # noqa: E402

from fastspec.encode import encode_arrays  # noqa: E402
from fastspec.model import ModelConfig, SpectrumAutoencoder  # noqa: E402
from fastspec.plotting import pyplot, save_figure  # noqa: E402
from fastspec.restframe import mean_spectrum  # noqa: E402


class SkipDecoder(torch.nn.Module):
    """The decoder plus a linear map of the latents (started at zero): a PCA-like path beside the MLP."""

    def __init__(self, dec, S, R):
        super().__init__()
        self.dec, self.mlp = dec, dec.mlp
        self.lin = torch.nn.Linear(S, R, bias=False)
        torch.nn.init.zeros_(self.lin.weight)

    def forward(self, s):
        return self.dec(s) + self.lin(s)


def held_out_chi2(model, d, n=None) -> float:
    sel = slice(None) if n is None else slice(0, n)
    out = encode_arrays(model.eval(), d["y"][sel], d["w"][sel], d["z"][sel], chi2=True)
    model.train()
    return float(np.nanmedian(out["chi2"]))


def run(a) -> int:
    torch.manual_seed(a.seed)
    data = split(a.work)
    tr, te = load_arrays(data["train"]), load_arrays(data["test"])
    if a.train_frac < 1:  # whole galaxies, drawn once
        groups = np.unique(tr["group"])
        keep = np.isin(tr["group"], np.random.default_rng(1).permutation(groups)[: int(len(groups) * a.train_frac)])
        tr = {k: v[keep] if isinstance(v, np.ndarray) and v.shape[:1] == keep.shape else v for k, v in tr.items()}
    cfg = ModelConfig(n_latent=a.S, encoder_channels=tuple(int(c) for c in a.channels.split(",")),
                      **json.loads(a.model_json))
    model = SpectrumAutoencoder(cfg)
    if a.init_mean:
        model.init_output(mean_spectrum(tr["y"], tr["w"], tr["z"], tr["wave_obs"], model.wave_rest.numpy()))
    if a.skip:
        model.decoder = SkipDecoder(model.decoder, a.S, model.wave_rest.shape[0])
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.wd)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.steps, pct_start=0.3)
    Y, W = torch.as_tensor(tr["y"]), torch.as_tensor(tr["w"])
    Z = torch.as_tensor(tr["z"], dtype=torch.float32)
    N, g = len(Z), torch.Generator().manual_seed(a.seed)
    perm, pos, log, t_train = torch.randperm(N, generator=g), 0, [], 0.0

    def record(step):
        r = {"step": step, "seen": step * a.batch, "wall": round(t_train, 1), "test_med": held_out_chi2(model, te),
             "train_med": held_out_chi2(model, tr, 200)}
        log.append(r)
        print(json.dumps(r), flush=True)

    record(0)
    for step in range(1, a.steps + 1):
        t0 = time.perf_counter()
        if pos + a.batch > N:
            perm, pos = torch.randperm(N, generator=g), 0
        idx = perm[pos:pos + a.batch]
        pos += a.batch
        y, w, z = Y[idx], W[idx], Z[idx]
        if a.augment:
            from fastspec.augment import augment

            ga = torch.Generator().manual_seed(a.seed * 100003 + step)
            ya, wa, za = augment(y, w, z, generator=ga, redshift=True, noise="noise" in a.augment, z_max=0.5)[:3]
            y, w, z = torch.cat([y, ya]), torch.cat([w, wa]), torch.cat([z, za.float()])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
            s = model.encode(y, z)  # the decoder runs in fp32 outside autocast (SpectrumAutoencoder.decode)
        if a.latent_noise > 0:
            s = s + a.latent_noise * s.detach().float().std(0) * torch.randn_like(s.float())
        loss = model.loss(y, w, z, kind=a.loss, s=s.float()).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        t_train += time.perf_counter() - t0
        if step % a.eval_every == 0 or step == a.steps:
            record(step)
    out = {"args": vars(a), "log": log}
    if a.refine:
        r = model.eval().refine(torch.as_tensor(te["y"]), torch.as_tensor(te["w"]),
                                torch.as_tensor(te["z"], dtype=torch.float32), steps=300)
        out["log"].append({"refined_before": float(np.nanmedian(r.chi2_before)),
                           "refined_after": float(np.nanmedian(r.chi2_after))})
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"{a.tag}.json").write_text(json.dumps(out, indent=1))
    return 0


# ---- summary -----------------------------------------------------------------------------------------------

WHAT = {  # one line per experiment: what changed against its reference
    "A_base": "fp32, random init, per-spectrum loss, lr 1e-3, batch 64 (the old default)",
    "B_mean": "A + decoder output started at the training set's mean restframe spectrum",
    "C_mean_batch": "B + batch-normalised loss (paper eq. 1)",
    "D_mean_lr3": "B with lr 3e-3",
    "E_mean_lr3_narrow": "D with a narrow encoder (32/64/128 channels)",
    "F_mean_lr10": "B with lr 1e-2 (stopped: diverging)",
    "G_mean_b16": "B with batch 16 (4× the steps: same spectra seen)",
    "H_mean_bf16dec32": "B with a bf16 encoder, fp32 decoder",
    "I_narrow_long": "narrow encoder (32/64/128), 4000 steps",
    "J_mid_long": "mid encoder (64/128/256), 2000 steps",
    "K_bf16_long": "H for 4000 steps",
    "M_bf16_wd": "H for 2500 steps, weight decay 1e-2",
    "N_bf16_aug": "H for 2500 steps, + redshift and noise augmented copies (2× the work per step)",
    "O_bf16_lnoise": "H for 2500 steps, latent noise 0.1σ during training",
    "Q_bf16_skip": "H for 2500 steps, + linear skip path in the decoder",
    "S_full": "H for 2500 steps (473 training spectra)",
    "S_half": "S_full on half the training galaxies (235 spectra)",
    "S_quarter": "S_full on a quarter of the training galaxies (118 spectra)",
}


PCA_BY_SIZE = {118: 1.009, 235: 0.979, 473: 0.961}  # weighted PCA-10, same spectra, same held-out galaxies

FINDINGS = """
## What was learned

* **Start the decoder at the mean spectrum** (B vs A): the held-out χ² starts at 7.1 instead of ~3,000 and
  reaches 1.55 in 600 steps instead of 2.12. The largest single gain; now `fastspec train --init-decoder mean`
  (the default).
* **bf16 encoder, fp32 decoder** (H vs B): the same χ² (1.567 vs 1.547) at 3.5× less wall time per step on this
  CPU (native bf16). The decoder stays fp32: bf16's 8-bit mantissa puts ~0.3% errors on the restframe model,
  visible in χ² at the S/N of these galaxies. Now precision `auto` (bf16 where the CPU/GPU has it natively).
* **More steps, with selection by validation** (K): 1.26 at 2,500 steps, then overfitting (training spectra
  reach 0.68 while held-out ones rise to 1.33 at 4,000). `best.pt` keeps the model with the lowest validation
  loss.
* **Batch-normalised loss** (C vs B): no difference here (1.58 vs 1.55, within run-to-run scatter) — these
  galaxies have similar S/N, where per-spectrum and per-batch normalisation weigh them alike. Kept as the
  default because it is the paper's eq. (1) and right when S/N varies.
* **Did not help**: lr 3e-3 (1.64, unstable) and 1e-2 (diverged); batch 16 (same χ² per spectrum seen, no gain
  per wall time); weight decay 1e-2 (1.28 vs 1.27); redshift + noise augmentation (1.31 at 2× the cost);
  latent noise (1.38); a narrower encoder (7× faster per step but 1.37–1.97); a linear skip path in the
  decoder (1.26 vs 1.27, refined 1.049 vs 1.052: within noise).
* **The AE is data-limited here**: with 118 / 235 / 473 training spectra the refined AE's gap to the PCA-10
  trained on the same spectra is +0.41 / +0.17 / +0.09 — it halves per doubling, while the PCA gains
  little (1.009 → 0.961). On this trend the refined AE would pass the PCA at ~1,000–2,000 training spectra;
  with 473 it does not. Latent refinement closes about two thirds of the one-pass gap (1.27 → 1.05).
"""


def summarise(a) -> int:
    runs = json.loads(Path(a.runs).read_text())
    lines = ["# Training recipe on real galaxies (SDSS DR14, 473 training / 218 held-out spectra)", "",
             "Each row changes one thing (see `what`); median reduced χ² of the 218 held-out spectra after one "
             "encoder pass at the end of training, at its lowest point during training (the held-out set was "
             "looked at to choose: an optimistic number), and after latent refinement where run; training wall "
             "time on 2 cores (Intel Xeon, in-process loop; one experiment at a time from a queue, but the machine "
             "was not guaranteed otherwise idle: compare wall times within ±20%). All with S = 10 on the linear restframe grid (the runs predate the log grid). The weighted "
             "PCA-10 on the same spectra: 0.961 (118 / 235 training spectra: 1.009 / 0.979).", "",
             "| run | what | steps × batch | final | lowest (step) | refined | train wall |",
             "|---|---|---|---|---|---|---|"]
    for tag, r in runs.items():
        steps = [x for x in r["log"] if "step" in x]
        best = min(steps, key=lambda x: x["test_med"])
        ref = [x["refined_after"] for x in r["log"] if "refined_after" in x]
        lines.append(f"| {tag} | {WHAT.get(tag, '')} | {steps[-1]['step']} × {r['args']['batch']} | "
                     f"{steps[-1]['test_med']:.3f} | {best['test_med']:.3f} ({best['step']}) | "
                     f"{f'{ref[0]:.3f}' if ref else '–'} | {steps[-1]['wall'] / 60:.1f} min |")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    groups = [("what helps", ["A_base", "B_mean", "C_mean_batch", "H_mean_bf16dec32", "K_bf16_long"]),
              ("what did not", ["H_mean_bf16dec32", "D_mean_lr3", "E_mean_lr3_narrow", "G_mean_b16", "M_bf16_wd",
                                "N_bf16_aug", "O_bf16_lnoise", "Q_bf16_skip", "S_full"]),
              ("training-set size", ["S_quarter", "S_half", "S_full"])]
    for ax, (title, tags) in zip(axes, groups):
        for k, tag in enumerate(t for t in tags if t in runs):
            steps = [x for x in runs[tag]["log"] if "step" in x and x["step"] > 0]
            ax.plot([x["wall"] / 60 for x in steps], [x["test_med"] for x in steps], marker=".", color=f"C{k % 10}",
                    label=tag)
        if title == "training-set size":
            for k, (n, v) in enumerate(PCA_BY_SIZE.items()):
                ax.axhline(v, color=f"C{k}", ls="--", lw=0.8, label=f"PCA-10 ({n} spectra)")
        else:
            ax.axhline(0.961, color="k", ls="--", lw=0.8, label="PCA-10 (473 spectra)")
        ax.set_yscale("log")
        ax.set_ylim(0.9, 12)
        ax.set_xlabel("training wall time, 2 cores (min)")
        ax.set_ylabel("held-out median reduced χ²")
        ax.set_title(title)
        ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, Path(a.out) / "recipe.png")
    (Path(a.out) / "recipe.md").write_text("\n".join(lines) + "\n" + FINDINGS)
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="one experiment")
    r.add_argument("--tag", default="run")
    r.add_argument("--steps", type=int, default=600)
    r.add_argument("--batch", type=int, default=64)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--init-mean", action="store_true", help="decoder output started at the training mean")
    r.add_argument("--loss", default="spectrum", choices=["paper", "spectrum", "spender"])
    r.add_argument("--bf16", action="store_true", help="encoder under bf16 autocast")
    r.add_argument("--channels", default="128,256,512")
    r.add_argument("--S", type=int, default=10)
    r.add_argument("--eval-every", type=int, default=100)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--wd", type=float, default=0.0)
    r.add_argument("--skip", action="store_true")
    r.add_argument("--train-frac", type=float, default=1.0)
    r.add_argument("--refine", action="store_true")
    r.add_argument("--latent-noise", type=float, default=0.0)
    r.add_argument("--augment", default="", help="'z' or 'z,noise'")
    r.add_argument("--model-json", default='{"rest_grid": "linear"}', help="more ModelConfig fields")
    r.add_argument("--work", default=str(Path(__file__).resolve().parent / "work" / "real"))
    r.add_argument("--out", default=str(RESULTS / "recipe"))
    s = sub.add_parser("summarise", help="table and figure from the runs' JSON")
    s.add_argument("runs", nargs="?", default=str(RESULTS / "recipe" / "runs.json"))
    s.add_argument("--out", default=str(RESULTS / "recipe"))
    a = p.parse_args(argv)
    return run(a) if a.cmd == "run" else summarise(a)


if __name__ == "__main__":
    raise SystemExit(main())
