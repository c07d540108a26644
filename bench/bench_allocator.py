"""What `TrainConfig.retain_cpu_memory` (fastspec.memory.retain_freed_cpu_memory) buys CPU training: time per
step, page faults per step and peak resident memory of the real training loop, with and without it.

Each case is `fastspec.train.Trainer` as `fastspec train` runs it (paper architecture, S = 10, 2 loader
threads, clipping, logging; no validation or checkpoints) on SDSS mocks made with `fastspec mock`, in its own
process: `--warmup` steps (numba compilation, first allocations), then `--steps` timed steps. Cases run
side by side, one process at a time, alternating which goes first in each round, so load from other users of
a shared machine hits both alike; the load average is recorded around every case.

Reported per case: median and min time per step over all rounds' timed steps, minor page faults per step,
peak RSS of the timed steps (VmHWM reset after the warm-up), peak RSS of the whole process, and RSS at the
end (a process that retains keeps its peak).

    .venv/bin/python bench/bench_allocator.py [--batch 64] [--steps 20] [--rounds 3] [--precisions fp32 bf16]
Writes bench/results/allocator.json and .csv.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, peak_mb, print_table, reset_peak, rss_mb, write_results  # noqa: E402


def run_child(case: dict) -> dict:
    """One training run in this process; returns its per-step numbers."""
    from fastspec.train import TrainConfig, Trainer

    with tempfile.TemporaryDirectory(prefix="bench_allocator_") as out:
        cfg = TrainConfig(data=[case["data"]], out=out, model={"n_latent": 10, "z_max": 0.5},
                          steps=case["warmup"] + case["steps"], batch_size=case["batch"],
                          precision=case["precision"], val_fraction=0.0, checkpoint_every=0, progress=False,
                          log_every=10, seed=0, retain_cpu_memory=case["retain"])
        trainer = Trainer(cfg)
        try:
            trainer.run(max_steps=case["warmup"], write_files=False)
            peak_process = peak_mb()
            reset = reset_peak()
            marks = [time.perf_counter()]
            faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            cpu0 = time.process_time()
            trainer.run(max_steps=case["steps"], on_step=lambda _: marks.append(time.perf_counter()),
                        write_files=False)
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
            cpu = time.process_time() - cpu0
            peak_steps = peak_mb()
        finally:
            trainer.close()
    steps = [b - a for a, b in zip(marks, marks[1:])]
    from fastspec.memory import retaining_freed_cpu_memory

    return {"step_s": steps, "cpu_s_per_step": cpu / len(steps), "faults_per_step": faults / len(steps),
            "peak_steps_mb": peak_steps if reset else None, "peak_process_mb": max(peak_process, peak_steps),
            "rss_end_mb": rss_mb(), "retaining": retaining_freed_cpu_memory()}


def _child(case: dict, timeout: float) -> dict:
    load0 = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)], capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"case {case} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["load_before"], res["load_after"] = load0, os.getloadavg()[0]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per case and round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--n", type=int, default=2000, help="mock spectra")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per case")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))), flush=True)
        return 0

    info = machine_info()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_allocator_") as tmp:
        data = os.path.join(tmp, "mock-sdss.h5")
        subprocess.run([sys.executable, "-m", "fastspec", "mock", "-n", str(args.n), "-o", data, "--seed", "0",
                        "--no-restframe-truth", "--no-progress"], check=True)
        for r in range(args.rounds):
            for precision in args.precisions:
                order = (True, False) if r % 2 == 0 else (False, True)
                for retain in order:
                    case = dict(data=data, batch=args.batch, steps=args.steps, warmup=args.warmup,
                                precision=precision, retain=retain)
                    res = _child(case, args.timeout)
                    print(f"round {r} {precision} retain={retain}: median step "
                          f"{statistics.median(res['step_s']):.3f} s, {res['faults_per_step']:.0f} faults/step, "
                          f"peak {res['peak_steps_mb']} MB, load {res['load_before']:.2f}→{res['load_after']:.2f}",
                          flush=True)
                    runs.append({"round": r, "precision": precision, "retain": retain, **res})
    rows = []
    for precision in args.precisions:
        for retain in (True, False):
            mine = [x for x in runs if x["precision"] == precision and x["retain"] == retain]
            steps = [s for x in mine for s in x["step_s"]]
            rows.append({
                "precision": precision, "retain": retain, "batch": args.batch, "rounds": len(mine),
                "median_step_s": round(statistics.median(steps), 4), "min_step_s": round(min(steps), 4),
                "round_medians_s": [round(statistics.median(x["step_s"]), 3) for x in mine],
                "cpu_s_per_step": round(statistics.median(x["cpu_s_per_step"] for x in mine), 3),
                "faults_per_step": round(statistics.median(x["faults_per_step"] for x in mine)),
                "peak_steps_mb": round(max(x["peak_steps_mb"] or 0 for x in mine), 1),
                "peak_process_mb": round(max(x["peak_process_mb"] for x in mine), 1),
                "rss_end_mb": round(max(x["rss_end_mb"] for x in mine), 1),
            })
        on, off = rows[-2], rows[-1]
        on["speedup_vs_off"] = round(off["median_step_s"] / on["median_step_s"], 3)
        # paired: each round's on/off processes ran next to each other
        pairs = [statistics.median(b["step_s"]) / statistics.median(a["step_s"])
                 for a, b in zip([x for x in runs if x["precision"] == precision and x["retain"]],
                                 [x for x in runs if x["precision"] == precision and not x["retain"]])]
        on["paired_speedups"] = [round(p, 3) for p in pairs]
    print_table(rows, ["precision", "retain", "batch", "rounds", "median_step_s", "min_step_s", "cpu_s_per_step",
                       "faults_per_step", "peak_steps_mb", "peak_process_mb", "rss_end_mb", "speedup_vs_off"],
                title=f"CPU training step, batch {args.batch}, with and without retain_cpu_memory")
    path = write_results("allocator", {"machine": info, "args": vars(args), "rows": rows, "runs": runs,
                                       "load_average_end": os.getloadavg()}, rows)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
