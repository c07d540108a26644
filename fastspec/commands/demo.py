"""`fastspec demo`: the whole pipeline on built-in defaults — mock spectra, ingest of the bundled real files,
a short training run, bulk encoding and the report — on CPU, with no network."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import encode, ingest, mock, report, train, validate
from .common import default_real_dir

STEPS = (mock, ingest, validate, train, encode, report)  # the commands the demo runs, by their own parsers


def register(sub):
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on mock data and the bundled real files (CPU, ~10 min)",
        description="Make mock spectra, ingest the bundled real SDSS/BOSS/DESI files, train a small model, "
        "encode the spectra and write the report. Every step prints its progress.",
    )
    p.add_argument("-o", "--out", default="demo-output", help="output directory (default: demo-output)")
    p.add_argument("-n", "--n-mock", type=int, default=3000, help="number of mock spectra (default: 3000)")
    p.add_argument("--steps", type=int, default=120, help="training steps (default: 120, about 4 minutes on 2 idle cores)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size (default: 64)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16",
                   help="training/encoding precision on CPU (default: bf16 autocast; fp32 for exact arithmetic)")
    p.add_argument("--real-dir", default=None, help="folder of real FITS files (default: ../shared/data/real)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def _parser() -> argparse.ArgumentParser:
    """A `fastspec` parser with just the commands the demo runs."""
    parser = argparse.ArgumentParser(prog="fastspec")
    sub = parser.add_subparsers(dest="command")
    for command in STEPS:
        command.register(sub)
    return parser


def _step(parser: argparse.ArgumentParser, title: str, argv: list[str]) -> None:
    """Print the command line of one step, then run it as `fastspec` would."""
    print(f"\n== {title}\n$ fastspec {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    args = parser.parse_args(argv)
    rc = args.func(args)
    if rc not in (0, None):
        raise SystemExit(f"demo: step '{title}' failed with exit code {rc}")
    print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)


def run(args) -> int:
    parser = _parser()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    real = Path(args.real_dir) if args.real_dir else default_real_dir()
    mock_file = out / "mock-sdss.h5"
    _step(parser, "mock spectra with ground truth",
          ["mock", "-n", str(args.n_mock), "-o", str(mock_file), "--seed", str(args.seed)])
    sdss_files = sorted(str(p) for p in (real / "sdss").glob("spec-*.fits"))
    desi_files = sorted(str(p) for p in (real / "desi").glob("coadd-*.fits"))
    if sdss_files:
        _step(parser, "ingest the bundled SDSS/BOSS spectra",
              ["ingest", *sdss_files, "-o", str(out / "real-sdss.h5"), "--instrument", "sdss"])
    if desi_files:
        _step(parser, "ingest the bundled DESI spectra",
              ["ingest", *desi_files, "-o", str(out / "real-desi.h5"), "--instrument", "desi"])
    _step(parser, "validate the mock file", ["validate", str(mock_file)])
    run_dir = out / "run"
    train_argv = ["train", str(mock_file), "-o", str(run_dir), "--steps", str(args.steps), "--batch-size",
                  str(args.batch_size), "--seed", str(args.seed), "--augment", "--precision", args.precision]
    if (run_dir / "checkpoint.pt").exists():
        train_argv.append("--resume")  # a demo interrupted during training picks up where it stopped
    _step(parser, "train a small model (paper architecture, S=10, redshift augmentation)", train_argv)
    model = run_dir / "final.pt"
    sets = [("mock", mock_file)] + [("real", p) for p in (out / "real-sdss.h5",) if p.exists()]
    for tag, path in sets:
        latents = out / f"latents-{tag}.h5"
        _step(parser, f"encode the {tag} spectra", ["encode", str(model), str(path), "-o", str(latents), "--chi2",
                                                    "--precision", args.precision])
        _step(parser, f"report on the {tag} spectra", ["report", str(model), str(path), "-o",
                                                       str(out / f"report-{tag}"), "--latents", str(latents),
                                                       "--precision", args.precision])
    print(f"\ndemo finished: outputs in {out.resolve()}")
    for tag, _ in sets:
        print(f"  {tag:4s} spectra: figures and summary in {(out / f'report-{tag}').resolve()}/report.md, "
              f"latents in {(out / f'latents-{tag}.h5').resolve()}")
    return 0
