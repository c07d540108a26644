"""`fastspec redshift`: fit every spectrum's redshift with a trained model (resumable, shardable); see
fastspec.redshift."""
from __future__ import annotations

import sys
import time

from .common import expand_data, usage_error


def register(sub):
    p = sub.add_parser(
        "redshift",
        help="fit redshifts with a trained model (HDF5 out: z, z_err, chi2, delta_chi2), resumable and shardable",
        description="For each spectrum, scan chi2(z) over the model's redshift range (latents from the "
        "encoder at each trial z, amplitude fitted), take the best and the best distinct secondary minimum, "
        "refine latents and z jointly through the fused resample-loss kernel, and write z_fit, z_err "
        "(Delta chi2 = 1), chi2, chi2_reduced, delta_chi2 (secondary minus best: small = ambiguous), "
        "z_secondary, z_scan, latents, and the input's Z and object_id, rows in input order. Interrupted runs "
        "resume when started again with the same arguments; --shard i/n runs one share, --merge joins them.",
    )
    p.add_argument("model", nargs="?", help="trained model (final.pt / best.pt from fastspec train)")
    p.add_argument("data", nargs="*", help="spectra files (fastspec HDF5) or folders of them, in the order given")
    p.add_argument("-o", "--out", required=True, help="output redshifts file (HDF5)")
    p.add_argument("--z-min", type=float, default=0.0, help="lowest redshift scanned (default 0)")
    p.add_argument("--z-max", type=float, default=None, help="highest redshift scanned (default: the model's z_max)")
    p.add_argument("--step", type=float, default=None,
                   help="trial spacing in ln(1+z) (default: half the restframe grid's median pixel)")
    p.add_argument("--nodes", type=int, default=32,
                   help="redshifts at which the encoder's latents are computed for the scan (default 32)")
    p.add_argument("--node-steps", type=int, default=30, metavar="N",
                   help="Adam steps fitting the scan's latents at each node redshift (default 30; 0: the encoder's "
                   "latents as they are, faster, fine for redshifts the model was trained on)")
    p.add_argument("--refine", type=int, default=100, metavar="N",
                   help="Adam steps of the joint latent + z refinement (default 100; 0 skips it)")
    p.add_argument("--dv-secondary", type=float, default=1500.0,
                   help="km/s that separate a distinct secondary minimum from the best (default 1500)")
    p.add_argument("--batch-size", type=int, default=None, help="spectra per batch (default: 64 on CPU, 512 on CUDA)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--backend", choices=["auto", "triton", "numba", "torch"], default=None,
                   help="kernel backend (default: auto = Triton on CUDA, numba on CPU)")
    p.add_argument("--shard", default=None, metavar="I/N", help="fit only the I-th of N contiguous row ranges")
    p.add_argument("--merge", action="store_true", help="merge the finished OUT.shard-*-of-N files into OUT")
    p.add_argument("--flush-rows", type=int, default=None, help="rows per flushed block (default: 8 batches)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-resume", action="store_true", help="discard a partial output instead of resuming it")
    p.set_defaults(func=run)


def _err(msg: str) -> int:
    return usage_error("redshift", msg)


def run(args) -> int:
    import torch

    from .. import encode as E
    from .. import redshift as Z
    from ..h5format import SpectraFormatError
    from ..model import load_model

    progress = not args.quiet
    if args.merge:
        if args.model or args.data:
            return _err("--merge takes only -o OUT (the shard files are found beside it)")
        try:
            Z.merge_redshift_shards(args.out, progress=progress)
        except Z.RedshiftError as err:
            return _err(str(err))
        return 0
    if not args.model or not args.data:
        return _err("give a MODEL and at least one DATA file (or --merge -o OUT)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.backend:
        from ..kernels import set_backend

        set_backend(args.backend)
    try:
        shard = E.parse_shard(args.shard) if args.shard else None
        data = expand_data(args.data)
    except (E.EncodeError, FileNotFoundError) as err:
        return _err(str(err))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        return _err(f"--device {device}: no CUDA device available")
    try:
        model = load_model(args.model, device=device)
    except (FileNotFoundError, ValueError) as err:
        return _err(str(err))
    t0 = time.perf_counter()
    try:
        stats = Z.redshift_files(
            model, data, args.out, shard=shard, batch_size=args.batch_size or (512 if device.startswith("cuda") else 64),
            flush_rows=args.flush_rows, progress=progress, model_path=args.model, resume=not args.no_resume,
            z_min=args.z_min, z_max=args.z_max, step=args.step, n_nodes=args.nodes, refine_steps=args.refine,
            dv_secondary=args.dv_secondary, node_steps=args.node_steps,
        )
    except (Z.RedshiftError, E.EncodeError, SpectraFormatError) as err:
        print(f"fastspec redshift: error: {err}", file=sys.stderr)
        return 1
    if progress and stats.n:
        print(f"fitted {stats.n} redshifts in {time.perf_counter() - t0:.1f} s "
              f"({stats.spectra_per_s:,.2f} spectra/s) → {stats.out}", file=sys.stderr)
    if progress and shard is not None and not stats.already_complete:
        print(f"shard {shard[0]}/{shard[1]} done; when all are: fastspec redshift --merge -o {args.out}",
              file=sys.stderr)
    return 0
