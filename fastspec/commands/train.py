"""`fastspec train`: train (or resume) an autoencoder on spectra files; see fastspec.train."""
from __future__ import annotations

import argparse
import os
import sys

from .common import add_data_argument, expand_data, usage_error


def _sigma(text: str):
    if text in ("per-dim", "per_dim"):
        return "per_dim"
    if text == "whiten":
        return "whiten"
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--consistency-sigma takes a positive number, per-dim or whiten, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"--consistency-sigma must be positive, got {text!r}")
    return v


def register(sub):
    p = sub.add_parser(
        "train",
        help="train an autoencoder on spectra files (Adam + one-cycle, mixed precision, DDP via torchrun)",
        description="Train a spectrum autoencoder on fastspec HDF5 spectra files. Writes RUNDIR/checkpoint.pt "
        "(resume with --resume), best.pt and final.pt (models for `fastspec encode`), history.json and "
        "loss.png. A validation split is taken by a stable hash of object_id. For several GPUs or nodes "
        "launch with `torchrun --nproc-per-node N -m fastspec train ...`; --batch-size is the global batch.",
    )
    add_data_argument(p)
    p.add_argument("-o", "--out", required=True, metavar="RUNDIR", help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from RUNDIR/checkpoint.pt (exact resume)")
    g = p.add_argument_group("length and optimiser")
    g.add_argument("--epochs", type=int, default=None, help="epochs to train (default 10)")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps to train (instead of --epochs)")
    g.add_argument("--batch-size", type=int, default=64, help="global batch size (default 64)")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    g.add_argument("--no-one-cycle", action="store_true", help="constant learning rate instead of one-cycle")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto (default): bf16 autocast where the hardware has bf16 (CPUs with AVX512-BF16/AMX, "
                   "GPUs from A100 on), fp16 with loss scaling on older GPUs, else fp32. The decoder always "
                   "runs in fp32")
    g.add_argument("--clip", type=float, default=1.0, help="max gradient norm, 0 = off (default 1)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--loss", choices=["paper", "spectrum", "spender"], default="paper",
                   help="paper (default): Σw(y−ŷ)²/Σw over the whole batch (eq. 1); spectrum: the same per "
                   "spectrum, averaged; spender: Σ½w(y−ŷ)²/L")
    g.add_argument("--init-decoder", choices=["mean", "none"], default="mean",
                   help="mean (default): the decoder's output starts at the mean restframe spectrum of the "
                   "first 2,048 training spectra; none: at PyTorch's random initialisation")
    g = p.add_argument_group("augmentation and regularisation")
    g.add_argument("--augment", action="store_true",
                   help="also train on copies moved to a random redshift in [0, z_max]")
    g.add_argument("--augment-noise", action="store_true", help="add noise to the augmented copies")
    g.add_argument("--augment-mask", action="store_true", help="mask a random window in the augmented copies")
    g.add_argument("--consistency", type=float, default=0.0, metavar="WEIGHT",
                   help="weight of the latent consistency penalty between a spectrum and its augmented copy")
    g.add_argument("--consistency-sigma", type=_sigma, default=None, metavar="SIGMA|per-dim|whiten",
                   help="latent distance scale: a number; per-dim (each latent dimension scaled by its batch variance); "
                   "or whiten (the batch covariance: stretching any direction cannot lower the penalty) (default: the "
                   "batch's mean latent variance, as spender 0.3)")
    g = p.add_argument_group("model (new runs; a resumed run keeps its model)")
    g.add_argument("--n-latent", type=int, default=10, help="latent size S (default 10)")
    g.add_argument("--z-max", type=float, default=0.5, help="largest redshift the model covers (default 0.5)")
    g.add_argument("--activation", choices=["leakyrelu", "speculator"], default="leakyrelu",
                   help="decoder activation: leakyrelu (paper) or speculator (spender)")
    g.add_argument("--unconditioned", action="store_true", help="do not give z to the encoder MLP (spender ≥ 0.3)")
    g.add_argument("--dropout", type=float, default=0.0)
    g.add_argument("--model-config", default=None, metavar="JSON",
                   help="more ModelConfig fields as a JSON object or a JSON file, e.g. "
                   "'{\"encoder_channels\": [64, 128, 256]}' (overrides the options above)")
    g = p.add_argument_group("data")
    g.add_argument("--val-fraction", type=float, default=0.1, help="validation fraction by object_id hash")
    g.add_argument("--exclude-bad", action="store_true",
                   help="leave out rows that fail the checks (reported with a count) instead of stopping")
    g.add_argument("--workers", type=int, default=2, help="background readers (default 2)")
    g.add_argument("--worker-type", choices=["thread", "process"], default="thread",
                   help="readers as threads (default) or processes (for Python-heavy readers such as MMU files)")
    g.add_argument("--block-rows", type=int, default=256, help="rows per contiguous read (default 256)")
    g.add_argument("--shuffle-blocks", type=int, default=8, help="blocks shuffled together (default 8)")
    g.add_argument("--shards", type=int, default=None,
                   help="data shards (default: the number of ranks); fixes the batch order across world sizes")
    g = p.add_argument_group("run")
    g.add_argument("--val-every", type=int, default=None, help="steps between validations (default: each epoch)")
    g.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (default 500)")
    g.add_argument("--log-every", type=int, default=10, help="steps per history entry (default 10)")
    g.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                   help="stop at this step with a checkpoint; --resume continues the same schedule")
    g.add_argument("--backend", choices=["auto", "triton", "numba", "torch"], default="auto",
                   help="kernel backend (default auto: Triton on CUDA, numba on CPU)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--compile", action="store_true", help="torch.compile the training step")
    g.add_argument("--retain-cpu-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU training: keep memory freed by one step in the process for the next instead of "
                   "returning it to the OS (glibc; changes this process's allocator for good; see "
                   "bench/bench_allocator.py for what it buys) (default on). A process started with "
                   "GLIBC_TUNABLES=glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=131072 keeps those settings "
                   "instead: ~15%% less peak memory, ~15%% slower (bench/results/train-whole.md)")
    p.set_defaults(func=run)


def _json_arg(text: str) -> dict:
    """A JSON object given inline or as a file name."""
    import json

    if os.path.isfile(text):
        with open(text) as f:
            text = f.read()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not a JSON object or a JSON file ({err})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _err(msg: str) -> int:
    return usage_error("train", msg)


def run(args) -> int:
    import torch

    from ..h5format import SpectraFormatError
    from ..instruments import InstrumentError
    from ..model import ModelConfigError
    from ..train import TrainConfig, TrainDataError, train

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        data = expand_data(args.data)
    except FileNotFoundError as err:
        return _err(str(err))
    model = dict(n_latent=args.n_latent, z_max=args.z_max, activation=args.activation,
                 conditioned=not args.unconditioned, dropout=args.dropout)
    if args.model_config:
        try:
            model.update(_json_arg(args.model_config))
        except ValueError as err:
            return _err(f"--model-config: {err}")
    cfg = TrainConfig(
        data=data, out=args.out, model=model, epochs=args.epochs, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, one_cycle=not args.no_one_cycle, weight_decay=args.weight_decay, precision=args.precision,
        clip=args.clip or None, seed=args.seed, loss=args.loss, init_decoder=args.init_decoder, augment=args.augment,
        augment_noise=args.augment_noise, augment_mask=args.augment_mask, consistency=args.consistency,
        consistency_sigma=args.consistency_sigma, val_fraction=args.val_fraction, val_every=args.val_every,
        checkpoint_every=args.checkpoint_every, log_every=args.log_every, backend=args.backend,
        exclude_bad=args.exclude_bad, resume=args.resume, stop_after=args.stop_after, device=args.device,
        num_workers=args.workers, worker_type=args.worker_type, block_rows=args.block_rows,
        shuffle_blocks=args.shuffle_blocks, shards=args.shards, progress=not args.quiet, compile=args.compile,
        retain_cpu_memory=args.retain_cpu_memory,
    )
    try:
        summary = train(cfg)
    except (TrainDataError, SpectraFormatError, InstrumentError, ModelConfigError, FileNotFoundError,
            FloatingPointError, ValueError) as err:
        return _err(str(err))
    if int(os.environ.get("RANK", "0")) == 0 and not args.quiet:
        state = "finished" if summary["finished"] else "stopped (resume with --resume)"
        print(f"{state} at step {summary['step']} ({summary['spectra_seen']} spectra seen, "
              f"{summary['n_train']} training / {summary['n_val']} validation spectra); "
              f"validation loss {summary['val_loss']:.5g}, best {summary['best_val']:.5g}; "
              f"results in {args.out}", file=sys.stderr)
    return 0
