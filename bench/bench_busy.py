"""The fused CPU kernels on a busy machine: resample (fwd+bwd) and attention pooling (fwd+bwd) at N = 256 against
the torch code they replace, on a quiet machine and with CPU-bound processes beside them, for several torch/numba
thread counts — side by side in one run, the calls of all methods interleaved round-robin.

Each condition (busy processes × threads) reports per method the minimum and median wall time over the rounds
and the speed-up over the torch reference (minimum over minimum, and the median of the per-round ratios). A
busy process is `python -c 'while True: pass'` at normal priority, started before the condition's warm-up and
killed after it; the load average is recorded before and after every condition.

    .venv/bin/python bench/bench_busy.py                     # busy 0 and 1, threads 2 and 1
    .venv/bin/python bench/bench_busy.py --busy 0 1 2 --threads 2 1 --repeat 15
    .venv/bin/python bench/bench_busy.py --train --threads 0    # whole training processes, OMP_WAIT_POLICY
Writes bench/results/busy.json and busy.md (busy-train.* with --train).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import IMPLS  # noqa: E402
from bench_resample import make_case, make_inputs, set_threads, times_round_robin  # noqa: E402
from common import RESULTS, machine_info  # noqa: E402

C, T = 256, 72  # attention pooling: channels and positions of the paper's encoder


def attention_case(impl: str, N: int):
    x = torch.randn(N, 2 * C, T)
    hg, kg = x[:, :C].detach().requires_grad_(), x[:, C:].detach().requires_grad_()
    g = torch.randn(N, C)
    pool = IMPLS[impl]

    def fn():
        e = pool(hg, kg)
        return torch.autograd.grad(e, (hg, kg), g)
    return fn


def cases(N: int) -> dict:
    """{op: {method: callable}}, the first method of each op the torch reference the speed-ups are over."""
    d = make_inputs(N, "cpu")
    return {"resample fwd+bwd": {m: make_case("resample_fwd_bwd", m, d)[0] for m in ("torch-index", "searchsorted", "numba")},
            "attention_pool fwd+bwd": {m: attention_case(m, N) for m in ("torch_ref", "torch_softmax", "fused")}}


def measure(fns: dict, repeat: int) -> dict:
    m = times_round_robin(fns, {k: repeat for k in fns}, {k: 2 for k in fns})
    ref = next(iter(fns))
    out = {}
    for k in fns:
        ts = sorted(w for w, _ in m[k].values())
        ratios = [m[ref][r][0] / m[k][r][0] for r in m[k] if r in m[ref]]
        out[k] = {"min_ms": ts[0] * 1e3, "median_ms": statistics.median(ts) * 1e3,
                  "speedup_min": min(w for w, _ in m[ref].values()) / ts[0],
                  "speedup_paired_median": statistics.median(ratios)}
    return out


def train_case(data: str, work: Path, busy: int, policy: str | None, steps: int, threads: int | None) -> dict:
    """`fastspec train` as a whole process (the quick science model, bf16, batch 64) with `busy` CPU-bound
    processes beside it and OMP_WAIT_POLICY = policy (None: unset, the OpenMP default of spinning); the median
    spectra/s of its logged steps after the first three, and the wall time."""
    import json as _json
    import shutil

    run = work / f"train-b{busy}-{policy or 'unset'}-t{threads or 'auto'}"
    shutil.rmtree(run, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    argv = [sys.executable, "-m", "fastspec", "train", data, "-o", str(run), "--steps", str(steps), "--batch-size",
            "64", "--lr", "4e-3", "--precision", "bf16", "--model-config", '{"encoder_channels": [16, 32, 64]}',
            "--val-every", "100000", "--checkpoint-every", "0", "-q"] + (["--threads", str(threads)] if threads else [])
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        time.sleep(1.0 if busy else 0.0)
        load0, t0 = os.getloadavg(), time.perf_counter()
        subprocess.run(argv, env=env, check=True)
        wall, load1 = time.perf_counter() - t0, os.getloadavg()
    finally:
        for pr in procs:
            pr.kill()
            pr.wait()
    hist = _json.loads((run / "history.json").read_text())["train"]
    return {"busy": busy, "omp_wait_policy": policy or "unset", "threads": threads or "default",
            "steps": steps, "wall_s": wall, "spectra_per_s_median": statistics.median(e["spectra_per_s"] for e in hist[3:]),
            "load_before": load0, "load_after": load1}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="CPU-bound processes beside (default 0 1)")
    p.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="torch and numba threads (default 2 1)")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--repeat", type=int, default=11)
    p.add_argument("--train", action="store_true",
                   help="instead: `fastspec train` whole processes, quiet and busy, OMP_WAIT_POLICY unset vs PASSIVE")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--policies", nargs="+", default=["unset", "PASSIVE"],
                   help="OMP_WAIT_POLICY values for --train; unset: none in the environment (fastspec then sets "
                   "PASSIVE itself; before it did, the OpenMP default: spinning)")
    p.add_argument("--tag", default=None, help="results name (default busy, or busy-train with --train)")
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.train:
        return main_train(args)
    args.tag = args.tag or "busy"
    res = {"machine": machine_info(), "n": args.n, "repeat": args.repeat, "conditions": []}
    fns = cases(args.n)
    for busy in args.busy:
        for threads in args.threads:
            set_threads(threads)
            procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
            try:
                time.sleep(1.0 if busy else 0.0)
                load0 = os.getloadavg()
                rows = {op: measure(f, args.repeat) for op, f in fns.items()}
                load1 = os.getloadavg()
            finally:
                for pr in procs:
                    pr.kill()
                    pr.wait()
            res["conditions"].append({"busy": busy, "threads": threads, "load_before": load0, "load_after": load1,
                                      "ops": rows})
            print(f"busy {busy}, threads {threads}: " + "; ".join(
                f"{op}: " + ", ".join(f"{k} {v['min_ms']:.1f} ms ({v['speedup_min']:.2f}×)" for k, v in r.items())
                for op, r in rows.items()), flush=True)
    md = [f"# Fused CPU kernels on a busy machine ({args.tag})", "",
          f"{_machine_line(res)}; N = {args.n}, {args.repeat} rounds per condition, all methods of an op "
          "interleaved round-robin. Speed-up: over the first method (the torch reference the kernel replaces), "
          "minimum over minimum and the median of the per-round ratios.", "",
          "| busy processes | threads | op | method | min ms | median ms | × reference (min) | × reference (paired median) | load before → after |",
          "|---|---|---|---|---|---|---|---|---|"]
    for c in res["conditions"]:
        for op, r in c["ops"].items():
            for k, v in r.items():
                md.append(f"| {c['busy']} | {c['threads']} | {op} | {k} | {v['min_ms']:.2f} | {v['median_ms']:.2f} | "
                          f"{v['speedup_min']:.2f} | {v['speedup_paired_median']:.2f} | "
                          f"{c['load_before'][0]:.2f} → {c['load_after'][0]:.2f} |")
    _write_report(Path(args.results), args.tag, res, md)
    return 0


def _machine_line(res: dict) -> str:
    m = res["machine"]
    return f"{m.get('cpu', '?')} × {m.get('cpu_count')} cores, torch {m['torch']}, numba {m.get('numba')}"


def _write_report(out: Path, tag: str, res: dict, md: list[str]) -> None:
    """<tag>.json and <tag>.md in `out`; the Markdown is printed too."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps(res, indent=1))
    (out / f"{tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main_train(args) -> int:
    import tempfile

    from fastspec.mock import write_mock

    tag = args.tag or "busy-train"
    work = Path(tempfile.mkdtemp(prefix="bench-busy-"))
    data = str(work / "mock.h5")
    write_mock(data, 3000, seed=0, features="rich", progress=False)
    rows = []
    for busy in args.busy:
        for policy in [None if p == "unset" else p for p in args.policies]:
            for threads in args.threads:
                r = train_case(data, work, busy, policy, args.train_steps, threads or None)
                rows.append(r)
                print(f"busy {busy}, OMP_WAIT_POLICY {r['omp_wait_policy']}, threads {threads}: "
                      f"{r['spectra_per_s_median']:.0f} spectra/s, {r['wall_s']:.1f} s", flush=True)
    res = {"machine": machine_info(), "rows": rows, "mock": "3000 rich SDSS mocks", "model": "encoder 16/32/64, S=10"}
    md = [f"# `fastspec train` on a busy machine ({tag})", "",
          f"{_machine_line(res)} (threading layer omp). Whole `fastspec train` processes, {args.train_steps} "
          "steps of 64 rich mocks, the science check's quick model, bf16; busy = `python -c 'while True: pass'` "
          "processes beside it. Spectra/s: median of the logged steps after the first three.", "",
          "| busy processes | OMP_WAIT_POLICY | torch threads | spectra/s | wall [s] | load before → after |",
          "|---|---|---|---|---|---|"]
    md += [f"| {r['busy']} | {r['omp_wait_policy']} | {r['threads']} | {r['spectra_per_s_median']:.0f} | "
           f"{r['wall_s']:.1f} | {r['load_before'][0]:.2f} → {r['load_after'][0]:.2f} |" for r in rows]
    _write_report(Path(args.results), tag, res, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
