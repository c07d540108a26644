"""`fastspec profile`: a short training run under the torch profiler, per kernel backend; see fastspec.profile."""
from __future__ import annotations

import os
import sys

from .common import add_data_argument, expand_data, say, usage_error


def register(sub):
    p = sub.add_parser(
        "profile",
        help="profile a short training run: time per op category and a Chrome trace per kernel backend",
        description="Run a few training steps under torch.profiler for each kernel backend, print where the "
        "time goes (convolutions, norms, activations, pooling, MLPs, resample, attention, casts, optimizer, "
        "loader wait) and write DIR/trace-BACKEND.json (open in chrome://tracing or ui.perfetto.dev) and "
        "DIR/profile.json.",
    )
    add_data_argument(p)
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="where traces and profile.json go")
    p.add_argument("--steps", type=int, default=10, help="profiled steps per backend (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="unprofiled steps first (default 3)")
    p.add_argument("--backend", default="all",
                   help="all, or a comma list of numba, torch, triton (default all: Triton only on CUDA "
                   "unless named, as on CPU it runs in the slow interpreter)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--n-latent", type=int, default=10)
    p.add_argument("--z-max", type=float, default=0.5)
    p.add_argument("--workers", type=int, default=2, help="background reader threads (default 2)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=run)


def _err(msg: str) -> int:
    return usage_error("profile", msg)


def run(args) -> int:
    import torch

    cuda = torch.cuda.is_available() and args.device != "cpu"
    if args.backend == "all":
        backends = ["triton", "torch"] if cuda else ["numba", "torch"]
    else:
        backends = [b.strip() for b in args.backend.split(",") if b.strip()]
        bad = [b for b in backends if b not in ("numba", "torch", "triton")]
        if bad:
            return _err(f"unknown backend(s) {bad}; choose from numba, torch, triton or all")
        if cuda and "numba" in backends:
            return _err("numba runs on CPU tensors only: use --device cpu to profile it")
    if "triton" in backends and not cuda:
        # The interpreter is read when the kernels are defined, so it must be set before they are imported.
        if "fastspec.kernels.triton_utils" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            return _err("triton on CPU needs TRITON_INTERPRET=1 set before the kernels are imported")
        os.environ["TRITON_INTERPRET"] = "1"
        print("note: no CUDA; the triton backend runs in the Triton interpreter (correct but very slow)",
              file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..atomic import write_json
    from ..profile import format_table, profile_training

    try:
        data = expand_data(args.data)
        results = profile_training(
            data, args.out, backends=backends, steps=args.steps, warmup=args.warmup, batch_size=args.batch_size,
            precision=args.precision, model={"n_latent": args.n_latent, "z_max": args.z_max},
            num_workers=args.workers, device=args.device, progress=not args.quiet)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        return _err(str(err))
    say(args, f"training step, batch {args.batch_size}, {args.precision}, {args.steps} profiled steps "
        f"(self time per op category per step)")
    say(args, format_table(results))
    write_json(os.path.join(args.out, "profile.json"), results, sync=False, indent=1)
    for b, r in results.items():
        say(args, f"trace ({b}): {r['trace']}")
    return 0
