"""The restframe grid's own floor: noiseless true spectra through each restframe grid and back (issue 16 §2).

    python bench/bench_restgrid.py            # 2000 SDSS mocks as the science check's test set; ~1 min
    python bench/bench_restgrid.py --timing   # also the resample kernels' speed on each grid (quiet machine!)

A model can at best reproduce the true restframe spectrum *sampled on its restframe grid*; the redshift-resample
then interpolates linearly between those samples. For each grid this takes the mocks' noiseless restframe truth
point-sampled on the grid (the mock renders every spectrum on a fine log grid and samples it at any wavelengths
asked for; here that grid is made 1e-5 in log10 λ instead of the mocks' usual 5e-5, so that the "truth" is
smooth on the scale of every grid compared, the 2× oversampled one included), redshifts and resamples it with `fastspec.kernels.resample` onto the SDSS pixels
and compares it with the noiseless observed truth (the same fine spectrum sampled at the observed pixels):
    floor = w·(y_true − y_roundtrip)², w = the mock's ivar (masked pixels 0), in noise variances per pixel,
pooled over the emission-line pixels (restframe within ±10 Å of a mock line) and over all valid pixels; and the
reduced χ² it adds to a spectrum that is otherwise fitted perfectly. No training: this is the floor no training
removes. Held-out χ² of trained models on both grids: bench/bench_real.py --grid-check.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_info  # noqa: E402

from fastspec import kernels, mock  # noqa: E402
from fastspec.mock import LINE_NAMES, LINE_WAVE, MockGenerator, MockSpectra  # noqa: E402
from fastspec.model import ModelConfig  # noqa: E402

GRIDS = {"linear (spender's kind, R = 5882)": dict(rest_grid="linear"),
         "log, Δlog10 λ = 1e-4 (R = 5682)": dict(rest_grid="log", oversample=1),
         "log, oversampled 2× (the default, R = 11363)": dict(rest_grid="log", oversample=2)}


def mocks_on(wave_rest: np.ndarray, n: int, seed: int, fine_dlog: float, snr: float | None) -> MockSpectra:
    """The science check's kind of test mocks, rendered on a fine grid of step `fine_dlog`, with the restframe
    truth sampled on `wave_rest`."""
    if mock.FINE_DLOG != fine_dlog:
        mock.FINE_DLOG = fine_dlog
        mock._basis.cache_clear()
    gen = MockGenerator("sdss", seed, 0.5, 0.0, "sdss", snr, True, True, 10**9)
    gen.wave_rest = np.asarray(wave_rest, np.float64)  # where the renderer samples the restframe truth
    gen.logw_rest = np.log10(gen.wave_rest)
    return MockSpectra.concat(list(gen.rows(0, n)))


def floor(m: MockSpectra, wave_rest: np.ndarray, half_width: float = 10.0) -> dict:
    w = np.where(m.mask | ~(m.ivar > 0), 0.0, m.ivar).astype(np.float64)
    truth = m.truth
    y_rt, valid = kernels.resample(torch.as_tensor(truth["spec_rest"], dtype=torch.float32),
                                   torch.as_tensor(m.z, dtype=torch.float32), wave_rest, m.wave_obs)
    y_rt, valid = y_rt.double().numpy(), valid.numpy()
    e = w * valid * (truth["model_obs"].astype(np.float64) - y_rt) ** 2
    lam_rest = m.wave_obs[None, :] / (1 + m.z[:, None])
    near = (np.abs(lam_rest[..., None] - LINE_WAVE).min(-1) <= half_width) & valid & (w > 0)
    every = valid & (w > 0)
    per_spectrum = e.sum(1) / every.sum(1)
    dist = np.abs(lam_rest[..., None] - LINE_WAVE)
    by_line = {}
    for j, name in enumerate(LINE_NAMES):
        sel = (dist[..., j] <= half_width) & valid & (w > 0)
        by_line[name] = float(e[sel].mean()) if sel.any() else None
    return {"by_line": by_line, "line_pixels": int(near.sum()), "floor_lines": float(e[near].mean()),
            "floor_all": float(e[every].mean()), "chi2_added_median": float(np.median(per_spectrum)),
            "chi2_added_p90": float(np.percentile(per_spectrum, 90)),
            "floor_lines_p99_pixel": float(np.percentile(e[near], 99))}


def timing(wave_rest: np.ndarray, wave_obs: np.ndarray, n: int = 256, reps: int = 15) -> dict:
    """resample_loss forward + backward (a training step's kernel work), median over reps, ms."""
    g = torch.Generator().manual_seed(0)
    x = (1 + 0.1 * torch.rand(n, len(wave_rest), generator=g)).requires_grad_(True)
    z = 0.5 * torch.rand(n, generator=g)
    y = torch.rand(n, len(wave_obs), generator=g)
    w = torch.rand(n, len(wave_obs), generator=g)
    times = []
    for i in range(reps + 2):
        t0 = time.perf_counter()
        kernels.resample_loss(x, z, wave_rest, wave_obs, y, w).sum().backward()
        if i >= 2:  # the first calls compile / warm caches
            times.append(time.perf_counter() - t0)
        x.grad = None
    return {"resample_loss_fwd_bwd_ms": 1e3 * float(np.median(times)), "n": n}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=2000, help="mock spectra (default 2000, as the science check's test set)")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--snr", type=float, default=None,
                   help="median S/N per pixel of the mocks (default: the mocks' SDSS default, 10); the floor in "
                   "noise variances grows as S/N²")
    p.add_argument("--fine-dlog", type=float, default=1e-5, help="the mock renderer's grid step (default 1e-5)")
    p.add_argument("--timing", action="store_true", help="also time the resample kernels on each grid")
    p.add_argument("--out", default=str(RESULTS / "restgrid"), help="results folder (default bench/results/restgrid)")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(),
           "load_start": [round(v, 2) for v in os.getloadavg()], "n": a.n, "fine_dlog": a.fine_dlog, "grids": {}}
    for name, kw in GRIDS.items():
        wave_obs, wave_rest = ModelConfig(instrument="sdss", z_max=0.5, **kw).grids()
        wave_rest = wave_rest.double().numpy()
        m = mocks_on(wave_rest, a.n, a.seed, a.fine_dlog, a.snr)
        r = {"R": len(wave_rest), **floor(m, wave_rest)}
        if a.timing:
            r.update(timing(wave_rest, wave_obs.double().numpy()))
        res["grids"][name] = r
        print(name, json.dumps(r), file=sys.stderr, flush=True)
    res["load_end"] = [round(v, 2) for v in os.getloadavg()]
    snr = float(np.median(m.truth["snr"]))
    lines = [f"# Restframe grid floor: noiseless truth through the grid and back ({res['date']})", "",
             f"{a.n} SDSS mocks (science check's test kind, median S/N {snr:.0f}, z ≤ 0.5). Machine: "
             f"{res['machine'].get('cpu', '?')}, {res['machine']['cpu_count']} CPUs, load {res['load_start']} → "
             f"{res['load_end']}. Truth rendered on a Δlog10 λ = {a.fine_dlog:g} grid. Floor in noise variances per "
             "pixel (w·Δ²); line pixels: restframe within ±10 Å of a mock emission line.", "",
             "| restframe grid | R | floor, line pixels (mean) | line pixels p99 | floor, all pixels | "
             "χ² added, median spectrum | p90 |" + (" resample_loss fwd+bwd N=256 |" if a.timing else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if a.timing else "")]
    for name, r in res["grids"].items():
        lines.append(f"| {name} | {r['R']} | {r['floor_lines']:.4f} | {r['floor_lines_p99_pixel']:.3f} | "
                     f"{r['floor_all']:.5f} | {r['chi2_added_median']:.5f} | {r['chi2_added_p90']:.5f} |"
                     + (f" {r['resample_loss_fwd_bwd_ms']:.1f} ms |" if a.timing else ""))
    names = list(res["grids"])
    lines += ["", "Mean floor by line (pixels within ±10 Å restframe):", "",
              "| line | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for j, ln in enumerate(LINE_NAMES):
        vals = [res["grids"][g]["by_line"][ln] for g in names]
        lines.append(f"| {ln} ({LINE_WAVE[j]:.0f} Å) | " + " | ".join("–" if v is None else f"{v:.3f}" for v in vals) + " |")
    tag = "" if a.snr is None else f"-snr{a.snr:g}"
    (out / f"restgrid{tag}.json").write_text(json.dumps(res, indent=1))
    (out / f"restgrid{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
