"""Benchmark of the encoder's fused conv-block op, InstanceNorm1d → PReLU → MaxPool1d, at the encoder's three
shapes on the SDSS grid: (N, 128, 3921) pool 5, (N, 256, 785) pool 11, (N, 512, 72) no pool.

Side by side in one process: the torch modules as spender runs them (nn.InstanceNorm1d, nn.PReLU,
nn.MaxPool1d), fastspec's plain-torch reference (backend 'torch') and the fused op
`fastspec.kernels.instance_norm_prelu_pool` (numba on CPU, Triton on CUDA). For forward and forward+backward
it reports time, spectra/s, GB/s over the minimal traffic (fwd: read x, write y; +bwd: read g and x again,
write dx), that as a percentage of the copy bandwidth measured in the same run (bench.common.bandwidth_floor),
the speed-ups over both torch forms and the peak extra memory (bench_attention.peak_extra_bytes).

    .venv/bin/python bench/bench_conv_block.py                       # CPU, N = 16, 64
    .venv/bin/python bench/bench_conv_block.py --device cuda --sizes 256,1024 --dtype bf16
Results: bench/results/conv_block.json/.csv (conv_block_cuda.* on CUDA).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import DTYPES, peak_extra_bytes, wall_and_cpu  # noqa: E402
from common import bandwidth_floor, machine_info, print_table, write_results  # noqa: E402
from fastspec.kernels import instance_norm_prelu_pool, use_backend  # noqa: E402

# (name, channels, length, pool, padding): the conv blocks' outputs in the SDSS encoder (L = 3921 → 785 → 72)
SHAPES = [("block1", 128, 3921, 5, 2), ("block2", 256, 785, 11, 5), ("block3", 512, 72, 1, 0)]
IMPLS = ("torch_modules", "torch_ref", "fused")


def make_impl(impl: str, C: int, pool: int, padding: int, device: str, dtype: torch.dtype):
    """(fn(x) -> y, slopes): one way to run the block after its convolution."""
    slopes = (torch.rand(C, device=device) * 0.5).to(dtype)
    if impl == "torch_modules":
        act = nn.PReLU(C).to(device=device, dtype=dtype)
        with torch.no_grad():
            act.weight.copy_(slopes)
        layers = [nn.InstanceNorm1d(C), act] + ([nn.MaxPool1d(pool, padding=padding)] if pool > 1 else [])
        return nn.Sequential(*layers).to(device=device, dtype=dtype), act.weight
    backend = "torch" if impl == "torch_ref" else "auto"
    slopes.requires_grad_()

    def fn(x):
        with use_backend(backend):
            return instance_norm_prelu_pool(x, slopes, pool, padding)

    return fn, slopes


def run_case(impl: str, mode: str, shape: tuple, N: int, dtype: torch.dtype, device: str, repeat: int,
             bw: float) -> dict:
    name, C, L, pool, padding = shape
    L_out = (L + 2 * padding - pool) // pool + 1
    fn, slopes = make_impl(impl, C, pool, padding, device, dtype)
    x = torch.randn(N, C, L, device=device, dtype=dtype)
    es = x.element_size()
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fn(x)

        nbytes = (N * C * L + N * C * L_out) * es
        out_bytes = N * C * L_out * es
    else:
        xg = x.detach().requires_grad_()
        g = torch.randn(N, C, L_out, device=device, dtype=dtype)

        def call():
            y = fn(xg)
            return y, torch.autograd.grad(y, (xg, slopes), g)

        nbytes = (N * C * L + N * C * L_out + N * C * L_out + N * C * L + N * C * L) * es
        out_bytes = (N * C * L_out + N * C * L) * es
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    t, cpu = wall_and_cpu(call, repeat, sync)
    extra = peak_extra_bytes(call, device)
    gbs = nbytes / t / 1e9
    return {"block": name, "shape": f"({N}, {C}, {L}) pool {pool}", "impl": impl, "mode": mode, "N": N,
            "dtype": str(dtype).replace("torch.", ""), "device": device, "time_ms": t * 1e3, "cpu_ms": cpu * 1e3,
            "spectra_per_s": N / t, "GB_per_s": gbs, "pct_of_bw": 100 * gbs / bw,
            "extra_MB": None if extra is None else extra / 1e6, "out_MB": out_bytes / 1e6}


def measure(N: int, dtype: torch.dtype, device: str, repeat: int, bw: float, impls=IMPLS,
            shapes=SHAPES) -> list[dict]:
    """Every shape × mode × impl at one N, with the speed-ups over both torch forms."""
    rows = []
    for shape in shapes:
        for mode in ("fwd", "fwd+bwd"):
            case = [run_case(impl, mode, shape, N, dtype, device, repeat, bw) for impl in impls]
            base = {r["impl"]: r["time_ms"] for r in case}
            for r in case:
                for ref in ("torch_modules", "torch_ref"):
                    r[f"speedup_vs_{ref}"] = base[ref] / r["time_ms"] if ref in base else None
            rows += case
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--sizes", default=None, help="comma-separated N (default 16,64; 256,1024 on CUDA)")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-write", action="store_true", help="print only, do not write bench/results")
    args = ap.parse_args(argv)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_conv_block: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    sizes = [int(s) for s in (args.sizes or ("256,1024" if device.startswith("cuda") else "16,64")).split(",")]
    dtype = DTYPES[args.dtype]
    info = machine_info()
    bw = bandwidth_floor(device)
    print(f"# {info.get('gpu') or info.get('cpu', '')}  torch {info['torch']}  copy bandwidth {bw:.1f} GB/s "
          f"({device})", flush=True)
    rows = [r for N in sizes for r in measure(N, dtype, device, args.repeat, bw)]
    cols = ["block", "impl", "mode", "N", "time_ms", "spectra_per_s", "GB_per_s", "pct_of_bw",
            "speedup_vs_torch_modules", "speedup_vs_torch_ref", "extra_MB", "out_MB"]
    print_table(rows, cols, title=f"InstanceNorm1d → PReLU → MaxPool1d, {args.dtype} on {device}")
    if not args.no_write:
        name = "conv_block" if device == "cpu" else "conv_block_cuda"
        payload = {"benchmark": "instance_norm_prelu_pool", "dtype": args.dtype, "device": device,
                   "bandwidth_floor_GBps": bw, "machine": info, "rows": rows}
        print("wrote", write_results(name, payload, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
