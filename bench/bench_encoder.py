"""Training-step throughput and peak memory with the encoder's fused conv blocks, side by side with spender 0.3,
on this CPU, plus the per-op breakdown of the best configuration and a convergence check.

Cases (each one process per round, rounds interleaved so that load on a shared machine hits every case alike):
  spender fp32 / bf16              spender 0.3 at its defaults (bf16: torch.autocast)
  spender fp32 / bf16 +retain      the same with fastspec's CPU allocator setting applied
                                   (`fastspec.memory.retain_freed_cpu_memory`), to separate what the allocator
                                   gives from what the kernels give
  fastspec fp32 torch-blocks       fastspec with ModelConfig(fused_blocks=False): plain torch InstanceNorm1d,
                                   PReLU and MaxPool1d modules around the convolutions
  fastspec fp32 fused / bf16 fused fastspec's default: fused blocks (numba), the first block's conv included
  fastspec bf16 fused -retain      fused, without the allocator setting (every other fastspec case has it)
  fastspec bf16 fused compiled     fused, encoder under torch.compile(fullgraph=True) (batch 64 only: each
                                   process compiles for ~1 min on the loaded 2-core machine)
fastspec runs spender's architecture (ModelConfig.spender: unconditioned encoder, Speculator decoder, spender's
grids), loaded with the very weights spender's model was initialised with, and spender's loss
(Σ ½·w·(y − ŷ)²/L), so both train the same network on the same batches of mock SDSS spectra
(fastspec.mock.make_mock). A step is forward + backward + Adam. Peak memory is the process's peak resident
set during the full-size steps minus its size after one step on 2 spectra (which holds the libraries, the
model, Adam's state and everything initialised lazily): the working set of a training step. The absolute peak
and the model + optimizer state are in the JSON too.

The breakdown is one more step of the best fastspec case (and of spender fp32) under torch.profiler: self CPU
time per op category. The convergence check trains spender fp32 and fastspec fp32/bf16 fused from the same
weights on the same batch sequence and reports the loss curves.

    .venv/bin/python bench/bench_encoder.py [--batches 64 256] [--steps 2] [--rounds 2] [--converge-steps 30]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, peak_mb, print_table, reset_peak, rss_mb, spender_sdss_model, write_results  # noqa: E402

Z_MAX = 0.5
CASES = {
    "spender fp32": dict(impl="spender", precision="fp32", retain=False),
    "spender bf16": dict(impl="spender", precision="bf16", retain=False),
    "spender fp32 +retain": dict(impl="spender", precision="fp32", retain=True),
    "spender bf16 +retain": dict(impl="spender", precision="bf16", retain=True),
    "fastspec fp32 torch-blocks": dict(impl="fastspec", precision="fp32", fused=False, retain=True),
    "fastspec fp32 fused": dict(impl="fastspec", precision="fp32", fused=True, retain=True),
    "fastspec bf16 fused": dict(impl="fastspec", precision="bf16", fused=True, retain=True),
    "fastspec bf16 fused -retain": dict(impl="fastspec", precision="bf16", fused=True, retain=False),
    # torch.compile of the encoder (fullgraph; the custom ops trace as they are); the warm-up step compiles
    "fastspec bf16 fused compiled": dict(impl="fastspec", precision="bf16", fused=True, retain=True,
                                         compile=True, max_batch=64),
}
BEST = "fastspec bf16 fused"
CATEGORIES = ("conv", "fused block", "norm", "activation", "pool", "attention", "resample", "mlp", "cast",
              "optimizer", "other")


# ---------------------------------------------------------------------------------------------- child side

def _build(case: dict):
    """(model, loss_fn(y, w, z) -> scalar); fastspec gets spender's initial weights."""
    sp, inst = spender_sdss_model(0, Z_MAX)
    if case["impl"] == "spender":
        return sp, lambda y, w, z: sp.loss(y, w, instrument=inst, z=z)
    from fastspec.model import SpectrumAutoencoder

    model = SpectrumAutoencoder.from_spender(sp.state_dict(), instrument="sdss", z_max=Z_MAX,
                                             fused_blocks=case["fused"])
    if case.get("compile"):
        import torch

        model.encoder = torch.compile(model.encoder, fullgraph=True)
    return model, lambda y, w, z: model.loss(y, w, z, kind="spender").sum()


def _category(ev) -> str:
    """The op category of a profiler event: the optimizer scope wins, then the event's own name, then the
    nearest enclosing op with a telling name (aten::mul inside PreluKernelBackward0 is activation)."""
    chain = []
    e = ev
    while e is not None:
        chain.append(e.name.lower())
        e = e.cpu_parent
    if any("optimizer" in n or "zero_grad" in n for n in chain):
        return "optimizer"
    for n in chain:
        if "instance_norm_prelu_pool" in n or "spectrum_block" in n:
            return "fused block"
        if "attention" in n or "softmax" in n:
            return "attention"
        if "resample" in n or "interp" in n or "searchsorted" in n:
            return "resample"
        if "conv" in n:
            return "conv"
        if "batch_norm" in n or "instance_norm" in n:
            return "norm"
        if "prelu" in n or "leaky" in n or "sigmoid" in n or "speculator" in n:
            return "activation"
        if "pool" in n:
            return "pool"
        if "addmm" in n or n == "aten::mm" or "mmbackward" in n or "linear" in n:
            return "mlp"
        if n in ("aten::to", "aten::_to_copy", "aten::copy_") or "tocopybackward" in n:
            return "cast"
    return "other"


def run_case(case: dict, data_path: str) -> dict:
    if case["retain"]:
        from fastspec.memory import retain_freed_cpu_memory

        retain_freed_cpu_memory()
    import spender  # noqa: F401  (both impls build spender's model; imports before the baseline)
    import torch

    from fastspec import kernels

    data = torch.load(data_path)
    if case["impl"] == "fastspec":
        kernels.attention_pool, kernels.resample_loss, kernels.instance_norm_prelu_pool  # noqa: B018
    B = case["batch"]
    n_all = data["y"].shape[0]

    def batch(k):
        i = (k * B) % (n_all - B + 1)
        return data["y"][i:i + B], data["w"][i:i + B], data["z"][i:i + B]

    rss_libs = rss_mb()
    model, loss_fn = _build(case)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=case.get("lr", 1e-3))
    bf16 = case["precision"] == "bf16"
    losses = []

    def step(k, n=B):
        y, w, z = batch(k)
        y, w, z = y[:n], w[:n], z[:n]
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(y, w, z)
        loss.float().backward()
        with torch.profiler.record_function("optimizer"):
            opt.step()
        losses.append(float(loss.detach()) / B)

    out = {}
    if case.get("converge"):
        for k in range(case["converge"]):
            step(k)
        return {"losses": losses}
    # A step on 2 spectra first: lazy initialisation (numba code from its cache, oneDNN, Adam's state) is then
    # part of the baseline, and the peak above it is the working set of a training step at this batch size.
    step(0, 2)
    rss0 = rss_mb()
    reset = reset_peak()
    step(0)  # warm-up at full size: autocast weight casts, allocator, primitive caches
    wall, cpu = [], []
    for k in range(1, 1 + case["steps"]):
        t0, c0 = time.perf_counter(), time.process_time()
        step(k)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = peak_mb()
    out.update(step_s=wall, step_cpu_s=cpu, peak_mb=peak - rss0, peak_abs_mb=peak, state_mb=rss0 - rss_libs, rss_libs_mb=rss_libs,
               peak_since="full-size steps" if reset else "process start")
    if case.get("breakdown"):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            step(1 + case["steps"])
            out["profiled_step_s"] = time.perf_counter() - t0
        cats = dict.fromkeys(CATEGORIES, 0.0)
        for ev in prof.events():
            if ev.self_cpu_time_total:
                cats[_category(ev)] += ev.self_cpu_time_total / 1e3
        out["breakdown_ms"] = {k: round(v, 1) for k, v in cats.items()}
        top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
        out["top_ops_ms"] = [(e.key, round(e.self_cpu_time_total / 1e3, 1)) for e in top]
    return out


# --------------------------------------------------------------------------------------------- parent side

def _child(case: dict, data_path: str, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(case), "--data", data_path],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _load() -> float:
    return os.getloadavg()[0]


def _median(v):
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    p.add_argument("--steps", type=int, default=2, help="timed steps per case and round (after 1 warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="rounds over all cases (interleaved)")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--converge-steps", type=int, default=30)
    p.add_argument("--converge-batch", type=int, default=32)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--name", default="encoder")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(run_case(json.loads(a.child), a.data)))
        return 0

    import torch

    from fastspec.mock import make_mock

    info = machine_info()
    info["load_avg_start"] = os.getloadavg()
    n_mock = max(max(a.batches) * (a.steps + 3), a.converge_batch * a.converge_steps)
    mock = make_mock(n_mock, "sdss", seed=0, z_max=Z_MAX, restframe_truth=False)
    data = {"y": torch.from_numpy(mock.flux), "w": torch.from_numpy(mock.ivar * ~mock.mask),
            "z": torch.from_numpy(mock.z.astype("float32"))}
    results: dict = {"machine": info, "cases": {}, "args": vars(a)}
    with tempfile.TemporaryDirectory(prefix="bench-encoder-") as tmp:
        data_path = os.path.join(tmp, "mock.pt")
        torch.save(data, data_path)
        runs = {(name, B): [] for B in a.batches for name in a.cases if B <= CASES[name].get("max_batch", B)}
        for rnd in range(a.rounds):
            for B in a.batches:
                for name in a.cases:
                    if B > CASES[name].get("max_batch", B):
                        continue
                    case = dict(CASES[name], batch=B, steps=a.steps,
                                breakdown=rnd == a.rounds - 1 and B == min(a.batches)
                                and name in (BEST, "spender fp32"))
                    t0 = time.time()
                    res = _child(case, data_path, a.timeout)
                    res["load_avg"] = _load()
                    runs[(name, B)].append(res)
                    err = res.get("error")
                    print(f"round {rnd + 1}/{a.rounds} batch {B:4d} {name:28s} "
                          + (f"ERROR {err[-300:]}" if err else
                             f"steps {', '.join(f'{s:.2f}' for s in res['step_s'])} s  peak {res['peak_mb']:.0f} MB")
                          + f"  ({time.time() - t0:.0f} s, load {res['load_avg']:.1f})", flush=True)
        conv = {}
        if a.converge_steps:
            for name in ("spender fp32", "fastspec fp32 fused", BEST):
                case = dict(CASES[name], batch=a.converge_batch, steps=0, converge=a.converge_steps)
                conv[name] = _child(case, data_path, a.timeout)
                print(f"convergence {name:28s} " + ("ERROR " + conv[name]["error"][-300:] if "error" in conv[name]
                      else " ".join(f"{v:.3g}" for v in conv[name]["losses"])), flush=True)

    rows = []
    for (name, B), rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            rows.append({"case": name, "batch": B, "error": rs[0]["error"][-200:]})
            continue
        steps = [s for r in ok for s in r["step_s"]]
        cpu = [s for r in ok for s in r["step_cpu_s"]]
        rows.append({"case": name, "batch": B, "step_min_s": min(steps), "step_median_s": _median(steps),
                     "cpu_median_s": _median(cpu),
                     "spectra_per_s": B / _median(steps), "peak_mb": max(r["peak_mb"] for r in ok),
                     "peak_abs_mb": max(r["peak_abs_mb"] for r in ok), "n_steps": len(steps)})
    by = {(r["case"], r["batch"]): r for r in rows if "error" not in r}
    for r in rows:
        if "error" in r:
            continue
        for ref in ("spender fp32", "spender bf16"):
            base = by.get((ref, r["batch"]))
            if base:
                r[f"x_{ref.replace(' ', '_')}"] = round(base["step_median_s"] / r["step_median_s"], 2)
                r[f"mem_vs_{ref.replace(' ', '_')}"] = round(r["peak_mb"] / base["peak_mb"], 2)
    cols = ["case", "batch", "step_min_s", "step_median_s", "cpu_median_s", "spectra_per_s", "peak_mb",
            "peak_abs_mb",
            "x_spender_fp32",
            "x_spender_bf16", "mem_vs_spender_fp32", "mem_vs_spender_bf16"]
    info["load_avg_end"] = os.getloadavg()
    print()
    print_table(rows, cols, title=f"training step, SDSS, S=10, spender architecture — {info.get('cpu', '')}, "
                                  f"{info['cpu_count']} cores, load {info['load_avg_start'][0]:.1f} → "
                                  f"{info['load_avg_end'][0]:.1f}")
    breakdown = {}
    for name in (BEST, "spender fp32"):
        for r in runs.get((name, min(a.batches)), []):
            if "breakdown_ms" in r:
                breakdown[name] = r
    if breakdown:
        brows = []
        for cat in CATEGORIES:
            brow = {"category": cat}
            for name, r in breakdown.items():
                tot = sum(r["breakdown_ms"].values())
                brow[f"{name} ms"] = r["breakdown_ms"][cat]
                brow[f"{name} %"] = round(100 * r["breakdown_ms"][cat] / tot, 1) if tot else 0.0
            brows.append(brow)
        print()
        print_table(brows, title=f"self CPU time per op category, one profiled step, batch {min(a.batches)}")
    if conv and all("losses" in c for c in conv.values()):
        print()
        crow = []
        for name, c in conv.items():
            ls = c["losses"]
            k = max(1, len(ls) // 6)
            crow.append({"case": name, "loss_first": sum(ls[:k]) / k, "loss_last": sum(ls[-k:]) / k,
                         "ratio_last_first": sum(ls[-k:]) / sum(ls[:k])})
        print_table(crow, title=f"convergence: loss per spectrum, first vs last {k} of {a.converge_steps} steps "
                                f"(batch {a.converge_batch}, Adam 1e-3, same weights and batches)")
    targets = {}
    for B in a.batches:
        best, s32, s16 = by.get((BEST, B)), by.get(("spender fp32", B)), by.get(("spender bf16", B))
        if best and s32 and s16:
            targets[B] = {
                "throughput_vs_spender_fp32": round(s32["step_median_s"] / best["step_median_s"], 2),
                "target_vs_spender_fp32": 3.0,
                "throughput_vs_spender_bf16": round(s16["step_median_s"] / best["step_median_s"], 2),
                "target_vs_spender_bf16": 1.5,
                "peak_memory_vs_spender_fp32": round(best["peak_mb"] / s32["peak_mb"], 2),
                "peak_memory_vs_spender_bf16": round(best["peak_mb"] / s16["peak_mb"], 2),
                "target_memory": 0.5,
            }
    if targets:
        print()
        print("targets (issue 4):", json.dumps(targets, indent=1))
    results.update(rows=rows, runs={f"{k[0]} @ {k[1]}": v for k, v in runs.items()}, breakdown=breakdown,
                   convergence=conv, targets=targets)
    path = write_results(a.name, results, rows)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
