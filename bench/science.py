"""Science check (issue 6): the findings of Melchior, Hahn & Liang 2022 measured against mock ground truth.

    .venv/bin/python bench/science.py --quick          # < 20 min on an idle 2-core CPU (small encoder)
    .venv/bin/python bench/science.py --full           # a GPU: the paper's architecture, 100k mocks

Trains three variants (a: no augmentation, b: redshift augmentation, c: augmentation + consistency), fits a
weighted restframe PCA baseline, runs the five experiments of fastspec.science and writes
bench/results/science-<mode>.json, science-<mode>.md and the figures in bench/results/science-<mode>/.
Mocks and trained models are kept in --workdir; a rerun with the same settings only redoes the analysis.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import RESULTS, machine_info  # noqa: E402

DEFAULT_REAL = Path(os.environ.get("FASTSPEC_SHARED", HERE.parent.parent / "shared")) / "data" / "real"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick", help="CPU mode, < 20 min idle")
    mode.add_argument("--full", dest="mode", action="store_const", const="full", help="GPU mode")
    mode.add_argument("--smoke", dest="mode", action="store_const", const="smoke",
                      help="seconds; checks the code path only, numbers mean nothing")
    p.add_argument("--workdir", default=None, help="mocks and models (default /tmp/fastspec-science-<mode>)")
    p.add_argument("--out", default=str(RESULTS), help=f"results folder (default {RESULTS})")
    p.add_argument("--real-dir", default=str(DEFAULT_REAL), help="bundled real spectra (MANIFEST.tsv); '' to skip")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    p.add_argument("--steps", type=int, default=None, help="override training steps per variant")
    p.add_argument("--n-train", type=int, default=None, help="override the number of training mocks")
    p.add_argument("--consistency", type=float, default=None, help="consistency weight of variant (c)")
    p.add_argument("--variants", default=None, help="subset of a,b,c (default all three)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None)
    p.add_argument("--markdown-only", action="store_true",
                   help="rewrite science-<mode>.md from science-<mode>.json (no training, no experiments)")
    p.add_argument("--note", default=None, help="free text stored in the JSON and shown in the Markdown "
                   "(e.g. the load the training ran under)")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)

    import torch

    from fastspec.science import ScienceConfig, markdown, run

    if args.markdown_only:
        import json

        src = Path(args.out, f"science-{args.mode}.json")
        if not src.is_file():
            print(f"bench/science.py: error: {src} not found: run the experiments first", file=sys.stderr)
            return 2
        res = json.loads(src.read_text())
        if args.note is not None:
            res["note"] = args.note
            tmp = src.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(res, indent=1))
            os.replace(tmp, src)
        Path(args.out, f"science-{args.mode}.md").write_text(markdown(res))
        print(Path(args.out, f"science-{args.mode}.md").read_text())
        return 0

    over = {}
    if args.steps is not None:
        over["steps"] = args.steps
    if args.n_train is not None:
        over["n_train"] = args.n_train
    if args.consistency is not None:
        over["consistency"] = args.consistency
    if args.variants:
        over["variants"] = tuple(v.strip() for v in args.variants.split(","))
    if args.precision:
        over["precision"] = args.precision
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    real = args.real_dir or None
    if real and not (Path(real) / "MANIFEST.tsv").is_file():
        print(f"bench/science.py: error: {real}/MANIFEST.tsv not found (pass --real-dir '' to skip real spectra)",
              file=sys.stderr)
        return 2
    cfg = ScienceConfig.for_mode(args.mode, device=device, workdir=args.workdir or f"/tmp/fastspec-science-{args.mode}",
                                 out_dir=args.out, real_dir=real, progress=not args.quiet, **over)
    res = run(cfg, machine=machine_info(), note=args.note)
    print(Path(args.out, f"science-{args.mode}.md").read_text())
    return 0 if res else 1


if __name__ == "__main__":
    sys.exit(main())
