"""Benchmark of attention pooling at the encoder's shapes (N, 256, 72): fused kernel vs plain torch.

Side by side in one process: `torch.softmax` pooling as spender writes it, fastspec's torch reference
(backend 'torch', defined -inf semantics), and the fused op (numba on CPU, Triton on CUDA). h and k are the
two channel halves of one (N, 512, 72) tensor, as the encoder passes them. For forward and forward+backward
it reports time, spectra/s, achieved GB/s over the minimal traffic (fwd: read h, k, write e; +bwd: read g, h, k,
write dh, dk), that traffic's time at the measured copy bandwidth (bench.common.bandwidth_floor), the speedups
over both torch forms, and the peak extra memory per case (CPU: resident-set high-water above the
resident set before the call, reset through /proc/self/clear_refs; CUDA: max_memory_allocated) next to the
size of the outputs.

    .venv/bin/python bench/bench_attention.py                    # CPU, N = 64 … 4096, ~1-2 min on 2 cores
    .venv/bin/python bench/bench_attention.py --threads 1        # one core: robust on a busy machine
    .venv/bin/python bench/bench_attention.py --device cuda      # when a GPU is lent (N up to 16384)
Results: bench/results/attention.json/.csv (attention_1thread.*, attention_cuda.*).
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bandwidth_floor, machine_info, print_table, write_results  # noqa: E402
from fastspec.kernels import attention_pool, use_backend  # noqa: E402

C, T = 256, 72
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def softmax_pool(h, k):
    """spender's attention pooling: plain torch ops."""
    return (h * torch.softmax(k, dim=-1)).sum(dim=-1)


def reference_pool(h, k):
    with use_backend("torch"):
        return attention_pool(h, k)


def fused_pool(h, k):
    with use_backend("auto"):
        return attention_pool(h, k)


IMPLS = {"torch_softmax": softmax_pool, "torch_ref": reference_pool, "fused": fused_pool}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_extra_bytes(fn, device: str) -> int | None:
    """Peak memory above the level before one call of fn (its outputs included, freed afterwards)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    except OSError:
        return None
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def _numba_threads():
    try:
        import numba

        return numba.get_num_threads()
    except ImportError:
        return None


def wall_and_cpu(fn, repeat: int, sync=None) -> tuple[float, float]:
    """Median wall time and median process CPU time (all threads) of fn() after one warm-up call; CPU time
    is less sensitive than wall time to other jobs on a busy machine."""
    fn()
    walls, cpus = [], []
    for _ in range(repeat):
        if sync:
            sync()
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        if sync:
            sync()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def run_case(impl: str, mode: str, N: int, dtype: torch.dtype, device: str, repeat: int, bw: float) -> dict:
    pool = IMPLS[impl]
    x = torch.randn(N, 2 * C, T, dtype=dtype, device=device)
    h, k = x[:, :C], x[:, C:]
    es = x.element_size()
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return pool(h, k)

        nbytes = (2 * N * C * T + N * C) * es
        out_bytes = N * C * es
    else:
        hg = h.detach().requires_grad_()
        kg = k.detach().requires_grad_()
        g = torch.randn(N, C, dtype=dtype, device=device)

        def fn():
            e = pool(hg, kg)
            return e, torch.autograd.grad(e, (hg, kg), g)

        nbytes = (2 * N * C * T + N * C + N * C + 2 * N * C * T + 2 * N * C * T) * es
        out_bytes = (N * C + 2 * N * C * T) * es
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    t, cpu = wall_and_cpu(fn, repeat, sync)
    # Twice for small cases, keeping the larger: the kernel's resident-set counters can lag.
    extras = [peak_extra_bytes(fn, device) for _ in range(2 if N < 2048 else 1)]
    extra = None if None in extras else max(extras)
    gbs = nbytes / t / 1e9
    return {
        "impl": impl, "mode": mode, "N": N, "dtype": str(dtype).replace("torch.", ""), "device": device,
        "time_ms": t * 1e3, "cpu_ms": cpu * 1e3, "spectra_per_s": N / t, "GB_per_s": gbs, "floor_ms": nbytes / (bw * 1e9) * 1e3,
        "pct_of_bw": 100 * gbs / bw, "extra_MB": None if extra is None else extra / 1e6,
        "out_MB": out_bytes / 1e6, "extra_over_out": None if extra is None else extra / out_bytes,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--sizes", default=None, help="comma-separated N (default 64,256,1024,4096; +16384 on CUDA)")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch and numba (default: all); results go to attention_<n>thread.*")
    ap.add_argument("--no-write", action="store_true", help="print only, do not write bench/results")
    args = ap.parse_args(argv)

    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_attention: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    default_sizes = "64,256,1024,4096" + (",16384" if device.startswith("cuda") else "")
    sizes = [int(s) for s in (args.sizes or default_sizes).split(",")]
    impls = args.impls.split(",")
    for name in impls:
        if name not in IMPLS:
            print(f"bench_attention: unknown impl {name!r}; choose from {', '.join(IMPLS)}", file=sys.stderr)
            return 2
    dtype = DTYPES[args.dtype]
    if args.threads:
        import numba

        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)

    info = machine_info()
    load_before = os.getloadavg()
    bw = bandwidth_floor(device)
    print(f"# {info.get('cpu', '')} {info.get('gpu', '')}  torch {info['torch']}  threads {info['torch_threads']}  "
          f"copy bandwidth {bw:.1f} GB/s ({device})  load average {load_before[0]:.1f}", flush=True)
    # Compile / load the kernels outside the timings.
    xw = torch.randn(2, 2 * C, T, dtype=dtype, device=device, requires_grad=True)
    fused_pool(xw[:, :C], xw[:, C:]).sum().backward()

    rows = []
    for N in sizes:
        repeat = args.repeat if N < 2048 else max(3, args.repeat // 2)
        for mode in ("fwd", "fwd+bwd"):
            base = {}
            for impl in impls:
                row = run_case(impl, mode, N, dtype, device, repeat, bw)
                base[impl] = row["time_ms"]
                rows.append(row)
            for row in rows[-len(impls):]:
                for ref in ("torch_softmax", "torch_ref"):
                    row[f"speedup_vs_{ref}"] = base[ref] / row["time_ms"] if ref in base else None
                print(f"  {impl:>13} {mode:>7} N={N:<6} {row['time_ms']:9.2f} ms  {row['GB_per_s']:7.2f} GB/s",
                      flush=True)
            gc.collect()
    print()
    load_after = os.getloadavg()
    cols = ["impl", "mode", "N", "time_ms", "cpu_ms", "spectra_per_s", "GB_per_s", "floor_ms", "pct_of_bw",
            "speedup_vs_torch_softmax", "speedup_vs_torch_ref", "extra_MB", "out_MB", "extra_over_out"]
    print_table(rows, cols, title=f"attention_pool (N, {C}, {T}) {args.dtype} on {device}")
    if not args.no_write:
        name = "attention" if device == "cpu" else "attention_cuda"
        if args.threads:
            name += f"_{args.threads}thread"
        payload = {"benchmark": "attention_pool", "shape": f"(N, {C}, {T}) halves of (N, {2 * C}, {T})",
                   "dtype": args.dtype, "device": device, "bandwidth_floor_GBps": bw, "machine": info,
                   "load_average_1min": {"before": load_before[0], "after": load_after[0]},
                   "threads": {"torch": torch.get_num_threads(), "numba": _numba_threads()},
                   "rows": rows}
        print("wrote", write_results(name, payload, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
