"""`fastspec encode`: encode spectra files into latents (resumable, shardable); see fastspec.encode."""
from __future__ import annotations

import sys
import time

from .common import usage_error

PRECISIONS = ("fp32", "bf16", "fp16")  # as fastspec.encode.PRECISIONS; importing it here would load torch


def register(sub):
    p = sub.add_parser(
        "encode",
        help="encode spectra files into latents (HDF5), resumable and shardable",
        description="Stream spectra files through a trained encoder in large batches and write latents, "
        "object_id and Z (optionally reduced chi2 and the restframe model) to one HDF5 file, rows in input "
        "order. Interrupted runs resume where they stopped when started again with the same arguments. "
        "Under torchrun every rank encodes a contiguous share and rank 0 merges the shares; with --shard i/n "
        "run the shares yourself and merge them with `fastspec encode --merge -o OUT`.",
    )
    p.add_argument("model", nargs="?", help="trained model (final.pt / best.pt from fastspec train)")
    p.add_argument("data", nargs="*", help="spectra files (fastspec HDF5), encoded in the order given")
    p.add_argument("-o", "--out", required=True, help="output latents file (HDF5)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="spectra per forward pass (default: 64 on CPU — as fast as 256 there at 0.6x the peak memory, "
                   "bench/results/encode-whole.md — and 4096 on CUDA)")
    p.add_argument("--precision", choices=["auto", *PRECISIONS], default="auto",
                   help="auto (default): bf16 autocast where the hardware has bf16 (CPUs with AVX512-BF16/AMX, GPUs "
                   "from A100 on; the same held-out χ² as fp32 at 3x the speed on such a CPU, "
                   "bench/results/encode-whole.md), fp16 on older GPUs, else fp32; or fp32, bf16 (CPU/CUDA), fp16 "
                   "(CUDA only)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--backend", choices=["auto", "triton", "numba", "torch"], default=None,
                   help="kernel backend (default: auto = Triton on CUDA, numba on CPU)")
    p.add_argument("--chi2", action="store_true", help="also write the reduced chi2 of each reconstruction")
    p.add_argument("--restframe", action="store_true",
                   help="also write the restframe model spec_rest (N, R) and wave_rest (large: R floats per row)")
    p.add_argument("--refine", type=int, default=0, metavar="N",
                   help="then optimise each spectrum's latents for up to N steps through the frozen decoder "
                   "(writes the refined latents, chi2_before, chi2_after, refine_steps; ~100 is enough; default 0)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="encode only the I-th of N contiguous row ranges into OUT.shard-I-of-N")
    p.add_argument("--merge", action="store_true",
                   help="merge the finished OUT.shard-*-of-N files into OUT (no MODEL/DATA needed)")
    p.add_argument("--flush-rows", type=int, default=None,
                   help="rows per flushed block, the resume granularity (default: 32 batches)")
    p.add_argument("--workers", type=int, default=None,
                   help="background reader processes (default: 0 on CPU, 4 on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-resume", action="store_true", help="discard a partial output instead of resuming it")
    p.add_argument("--keep-shards", action="store_true", help="keep the shard files after merging")
    p.set_defaults(func=run)


def _err(msg: str) -> int:
    return usage_error("encode", msg)


def run(args) -> int:
    import torch

    from .. import encode as E
    from ..h5format import SpectraFormatError
    from ..model import load_model

    progress = not args.quiet
    if args.merge:
        if args.model or args.data:
            return _err("--merge takes only -o OUT (the shard files are found beside it)")
        try:
            E.merge_shards(args.out, remove=not args.keep_shards, progress=progress)
        except E.EncodeError as err:
            return _err(str(err))
        if progress:
            print(f"merged shards into {args.out}", file=sys.stderr)
        return 0
    if not args.model or not args.data:
        return _err("give a MODEL and at least one DATA file (or --merge -o OUT)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.backend:
        from ..kernels import set_backend

        set_backend(args.backend)

    env = E.shard_from_env()
    try:
        shard = E.parse_shard(args.shard) if args.shard else (env[:2] if env else None)
    except E.EncodeError as err:
        return _err(str(err))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and env:
        device = f"cuda:{env[2]}"  # torchrun: one GPU per local rank
    if device.startswith("cuda") and not torch.cuda.is_available():
        return _err(f"--device {device}: no CUDA device available")
    batch_size = args.batch_size or (4096 if device.startswith("cuda") else 64)

    if not device.startswith("cuda"):
        from ..memory import retain_freed_cpu_memory

        # keep the large conv outputs' memory in the process between batches instead of page-faulting it
        # in again every batch (≈ 10–15 % on CPU); this process only encodes, so its peak is its footprint
        retain_freed_cpu_memory()
    try:
        model = load_model(args.model, device=device)
    except (E.EncodeError, FileNotFoundError, ValueError) as err:
        return _err(str(err))
    from ..train import resolve_precision

    precision = resolve_precision(args.precision, next(model.parameters()).device)
    t0 = time.perf_counter()
    try:
        stats = E.encode_files(
            model, args.data, args.out, shard=shard, batch_size=batch_size, flush_rows=args.flush_rows,
            precision=precision, chi2=args.chi2, restframe=args.restframe, workers=args.workers,
            progress=progress, model_path=args.model, resume=not args.no_resume, refine=args.refine,
        )
    except (E.EncodeError, SpectraFormatError) as err:
        print(f"fastspec encode: error: {err}", file=sys.stderr)
        return 1
    if progress and stats.n:
        print(
            f"encoded {stats.n} spectra in {stats.seconds:.1f} s ({stats.spectra_per_s:,.0f} spectra/s) → "
            f"{stats.out}; waiting for data {stats.wait_s:.1f} s, compute {stats.compute_s:.1f} s, "
            f"writing {stats.write_s:.1f} s (overlapped)",
            file=sys.stderr,
        )
    if shard is not None and not stats.already_complete:
        i, n = shard
        if env and i == 0:
            E.wait_for_shards(args.out, n, progress=progress)
            try:
                E.merge_shards(args.out, n, remove=not args.keep_shards, progress=progress)
            except E.EncodeError as err:
                return _err(str(err))
            if progress:
                print(f"merged {n} shards into {args.out} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        elif not env and progress:
            print(f"shard {i}/{n} done; when all {n} are: fastspec encode --merge -o {args.out}", file=sys.stderr)
    return 0
