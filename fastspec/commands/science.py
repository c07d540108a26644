"""`fastspec science`: the findings of Melchior, Hahn & Liang 2022 measured against mock ground truth (issue 6).

Trains four variants (a: no augmentation, b: redshift augmentation, c: augmentation + consistency, d: with a
whitened consistency), each with two seeds, and variant (a) at smaller latent sizes; fits a
weighted restframe PCA baseline, runs the experiments of fastspec.science and writes science-<mode>.json,
science-<mode>.md and the figures in science-<mode>/ under --out. Mocks and trained models are kept in
--workdir; a rerun with the same settings only redoes the analysis.
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from .common import default_real_dir, usage_error

PROG = "fastspec science"


def add_arguments(p, default_out: str) -> None:
    """The options, shared with bench/science.py (which only changes the default results folder)."""
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="CPU mode, < 20 min on an idle 2-core machine")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="GPU mode: the paper's encoder, 100k mocks")
    mode.add_argument("--smoke", dest="mode", action="store_const", const="smoke",
                      help="under a minute; checks the code path only, numbers mean nothing")
    p.add_argument("--workdir", default=None, help="mocks and models (default /tmp/fastspec-science-<mode>)")
    p.add_argument("-o", "--out", default=default_out, help=f"results folder (default {default_out})")
    p.add_argument("--real-dir", default=str(default_real_dir()),
                   help="bundled real spectra (a folder with MANIFEST.tsv); '' to skip (default ../shared/data/real)")
    dr14 = default_real_dir() / "sdss-dr14"
    p.add_argument("--real-dr14", default=str(dr14) if dr14.is_dir() else "",
                   help="SDSS DR14 folder (spec-*.fits + MANIFEST.tsv with object_group): AE and PCA trained and tested "
                   "on real galaxies; '' to skip (default ../shared/data/real/sdss-dr14 when present)")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    p.add_argument("--steps", type=int, default=None, help="override training steps per variant")
    p.add_argument("--batch-size", type=int, default=None, help="override the training batch size")
    p.add_argument("--lr", type=float, default=None, help="override the peak learning rate (one-cycle)")
    p.add_argument("--n-train", type=int, default=None, help="override the number of training mocks")
    p.add_argument("--consistency", type=float, default=None, help="consistency weight of variant (c)")
    p.add_argument("--variants", default=None, help="subset of a,b,c,d (default all four)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None)
    p.add_argument("--seeds", type=int, default=None, help="trainings per variant, with seeds seed, seed+1, … (default 2)")
    p.add_argument("--s-scan", default=None, metavar="S,S,…",
                   help="latent sizes besides 10 trained for variant (a) and compared with the PCA (default 2,4,6)")
    p.add_argument("--mock-features", default=None, metavar="SET",
                   help="mock variation (fastspec.mockvar): rich (default), basic, or a comma list of features")
    p.add_argument("--markdown-only", action="store_true",
                   help="rewrite science-<mode>.md from science-<mode>.json (no training, no experiments)")
    p.add_argument("--note", default=None, help="free text stored in the JSON and shown in the Markdown "
                   "(e.g. the load the training ran under)")


def register(sub):
    p = sub.add_parser(
        "science",
        help="reproduce the paper's findings on mock spectra with ground truth (--quick: CPU, < 20 min)",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    add_arguments(p, default_out="science-results")
    p.set_defaults(func=run)


def machine_info() -> dict:
    """Where the numbers were measured (bench/science.py passes bench/common.py's fuller record)."""
    import datetime as _dt

    import torch

    info = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "hostname": platform.node(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or "?"}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _err(msg: str) -> int:
    return usage_error("science", msg)


def run(args, machine: dict | None = None) -> int:
    import torch

    from ..atomic import write_json, write_text
    from ..science import VARIANTS, ScienceConfig, markdown
    from ..science import run as run_science

    out = Path(args.out)
    if args.markdown_only:
        src = out / f"science-{args.mode}.json"
        if not src.is_file():
            return _err(f"{src} not found: run the experiments first")
        res = json.loads(src.read_text())
        if args.note is not None:
            res["note"] = args.note
            write_json(src, res, sync=False, indent=1)
        write_text(out / f"science-{args.mode}.md", markdown(res), sync=False)
        print(f"{PROG}: wrote {out / f'science-{args.mode}.md'}")
        return 0

    over = {}
    for key in ("steps", "batch_size", "lr", "n_train", "consistency", "precision"):
        if getattr(args, key) is not None:
            over[key] = getattr(args, key)
    for key in ("steps", "batch_size", "n_train"):
        if key in over and over[key] < 1:
            return _err(f"--{key.replace('_', '-')} must be ≥ 1, got {over[key]}")
    if args.variants:
        variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
        bad = [v for v in variants if v not in VARIANTS]
        if bad or not variants:
            return _err(f"--variants takes a comma list of {', '.join(VARIANTS)}, got {args.variants!r}")
        over["variants"] = variants
    if args.seeds is not None:
        if args.seeds < 1:
            return _err(f"--seeds must be ≥ 1, got {args.seeds}")
        over["n_seeds"] = args.seeds
    if args.s_scan is not None:
        try:
            over["s_scan"] = tuple(int(v) for v in args.s_scan.split(",") if v.strip())
        except ValueError:
            over["s_scan"] = (0,)
        if any(v < 1 for v in over["s_scan"]):
            return _err(f"--s-scan takes a comma list of positive latent sizes, got {args.s_scan!r}")
    if args.mock_features is not None:
        from ..mockvar import parse_features

        try:
            parse_features(args.mock_features)
        except ValueError as err:
            return _err(f"--mock-features: {err}")
        over["mock_features"] = args.mock_features
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    real = args.real_dir or None
    if real and not (Path(real) / "MANIFEST.tsv").is_file():
        return _err(f"{real}/MANIFEST.tsv not found (pass --real-dir '' to skip real spectra)")
    dr14 = args.real_dr14 or None
    if dr14 and not (Path(dr14) / "MANIFEST.tsv").is_file():
        return _err(f"{dr14}/MANIFEST.tsv not found (pass --real-dr14 '' to skip the real-galaxy training)")
    cfg = ScienceConfig.for_mode(args.mode, device=device, real_dr14=dr14,
                                 workdir=args.workdir or f"/tmp/fastspec-science-{args.mode}",
                                 out_dir=str(out), real_dir=real, progress=not args.quiet, **over)
    res = run_science(cfg, machine=machine or machine_info(), note=args.note)
    md = out / f"science-{args.mode}.md"
    if not args.quiet:
        print(md.read_text())
    print(f"{PROG}: results in {md}, {out / f'science-{args.mode}.json'} and {out / f'science-{args.mode}'}/")
    return 0 if res else 1
