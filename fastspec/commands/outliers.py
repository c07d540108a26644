"""`fastspec outliers`: score spectra by the log-probability of their latents under a normalising flow fitted
to a training set's latents; see fastspec.outliers."""
from __future__ import annotations

import os
import sys
import time

from .common import expand_data, usage_error


def register(sub):
    p = sub.add_parser(
        "outliers",
        help="outlier scores: log-probability of each spectrum's latents under a flow (low = unusual)",
        description="Fit a normalising flow (zuko MAF) to the latents of the --train spectra (or latents files) "
        "and save it beside the model (MODEL.flow.pt, reused on later runs), then write the log-probability "
        "of every input's latents to OUT (HDF5: log_prob, latents, Z, object_id, source_file, source_row). "
        "Inputs are latents files from `fastspec encode` of the same model, or spectra files (encoded here).",
    )
    p.add_argument("model", help="trained model (final.pt / best.pt from fastspec train)")
    p.add_argument("data", nargs="+", help="latents files (fastspec encode) or spectra files to score")
    p.add_argument("-o", "--out", required=True, help="output scores file (HDF5)")
    p.add_argument("--train", nargs="+", default=None,
                   help="latents or spectra files whose latents the flow is fitted to (needed unless the flow exists)")
    p.add_argument("--flow", default=None, help="flow file (default: MODEL with suffix .flow.pt)")
    p.add_argument("--refit", action="store_true", help="fit the flow again even if the flow file exists")
    p.add_argument("--refine", type=int, default=0, metavar="N",
                   help="for spectra inputs: refine the encoder's latents for up to N steps first (default 0)")
    p.add_argument("--steps", type=int, default=2000, help="flow training steps (default 2000)")
    p.add_argument("--transforms", type=int, default=5, help="autoregressive layers of the flow (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="device for encoding spectra inputs (default cpu)")
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np

    from .. import outliers as O
    from ..encode import EncodeError, weights_sha256
    from ..h5format import SpectraFormatError
    from ..model import load_model

    def say(msg):
        if not args.quiet:
            print(f"outliers: {msg}", file=sys.stderr, flush=True)

    try:
        data = expand_data(args.data)
        train = expand_data(args.train) if args.train else None
        model = load_model(args.model, device=args.device)
    except (FileNotFoundError, ValueError) as err:
        return usage_error("outliers", str(err))
    sha = weights_sha256(model)
    flow_path = args.flow or O.default_flow_path(args.model)
    t0 = time.perf_counter()
    try:
        if os.path.exists(flow_path) and not args.refit:
            flow = O.LatentFlow.load(flow_path)
            if flow.model_sha256 and flow.model_sha256 != sha:
                raise O.OutlierError(f"{flow_path}: flow fitted to another model's latents (model_sha256); "
                                     "pass --refit with --train")
            say(f"using the flow {flow_path}")
        else:
            if not train:
                return usage_error("outliers", f"no flow at {flow_path}: give --train files to fit one")
            parts = [O.read_latents(model, p, model_sha256=sha, refine=args.refine) for p in train]
            s = np.concatenate([p["latents"] for p in parts])
            say(f"fitting a flow to {len(s)} training latents")
            flow = O.fit_flow(s, transforms=args.transforms, steps=args.steps, seed=args.seed, model_sha256=sha,
                              progress=not args.quiet)
            flow.save(flow_path)
            say(f"saved the flow to {flow_path}")
        parts = [O.read_latents(model, p, model_sha256=sha, refine=args.refine) for p in data]
        for p, part in zip(data, parts):
            if part["latents"].shape[1] != flow.config.n_latent:
                raise O.OutlierError(f"{p}: latents have {part['latents'].shape[1]} dimensions, the flow "
                                     f"{flow.config.n_latent}")
        lp = flow.score(np.concatenate([p["latents"] for p in parts]))
        O.write_scores(args.out, data, parts, lp, {"model": os.path.abspath(args.model), "model_sha256": sha,
                                                   "flow": os.path.abspath(flow_path), "refine": args.refine})
    except (O.OutlierError, EncodeError, SpectraFormatError) as err:
        print(f"fastspec outliers: error: {err}", file=sys.stderr)
        return 1
    say(f"scored {len(lp)} spectra in {time.perf_counter() - t0:.1f} s → {args.out}; log_prob median "
        f"{np.median(lp):.2f}, 1st percentile {np.percentile(lp, 1):.2f}")
    return 0
