"""What a spender 0.3 user writes to train on, or encode, a fastspec HDF5 file: spender ships neither a file
pipeline nor a training command, so this is the plain loop its train_sdss.py and README suggest — h5py reads,
masked pixels zeroed with numpy, spender's SDSS SpectrumAutoencoder, Adam with a one-cycle schedule, spender's
loss, latents written with h5py. It imports nothing from fastspec (bench/common.py builds spender's model as its
train_sdss.py does), so the process runs with spender's and torch's defaults; bench/wholeproc.py times it as a
whole process beside `fastspec train` / `fastspec encode`.

    python bench/spender_user.py train FILE.h5 --epochs 1 --batch-size 64 [--precision bf16] [-o MODEL.pt]
    python bench/spender_user.py encode FILE.h5 -o LATENTS.h5 [--batch-size 64] [--precision bf16]

The last stdout line is a JSON summary (spectra, steps, final training and validation loss).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import h5py
import numpy as np
import torch
from common import spender_sdss_model  # stdlib-only at import: the process stays free of fastspec

Z_MAX = 0.5


def read_rows(h: h5py.File, a: int, b: int):
    """(y, w, z) of rows a:b: masked and ivar ≤ 0 pixels get weight 0 and flux 0."""
    flux = h["spectrum_flux"][a:b]
    ivar = h["spectrum_ivar"][a:b]
    mask = h["spectrum_mask"][a:b]
    w = np.where(mask | ~(ivar > 0), np.float32(0), ivar).astype(np.float32)
    y = np.where(w > 0, flux, np.float32(0)).astype(np.float32)
    return torch.from_numpy(y), torch.from_numpy(w), torch.from_numpy(h["Z"][a:b].astype(np.float32))


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def train(args) -> dict:
    model, inst = spender_sdss_model(args.seed, Z_MAX)
    with h5py.File(args.file, "r") as h:
        n = len(h["Z"])
        n_val = max(1, int(round(n * args.val_fraction)))
        n_train = n - n_val
        batches = [(a, min(a + args.batch_size, n_train)) for a in range(0, n_train, args.batch_size)]
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.epochs * len(batches))
        rng = np.random.default_rng(args.seed)
        model.train()
        last = float("nan")
        for epoch in range(args.epochs):
            for k in rng.permutation(len(batches)):
                y, w, z = read_rows(h, *batches[k])
                with autocast(args.precision):
                    loss = model.loss(y, w, instrument=inst, z=z)
                opt.zero_grad(set_to_none=True)
                loss.float().backward()
                opt.step()
                sched.step()
                last = float(loss.detach())
            model.eval()
            total, count = 0.0, 0
            with torch.no_grad():
                for a in range(n_train, n, args.batch_size):
                    y, w, z = read_rows(h, a, min(a + args.batch_size, n))
                    with autocast(args.precision):
                        total += float(model.loss(y, w, instrument=inst, z=z, individual=True).float().sum())
                    count += len(z)
            model.train()
            print(f"epoch {epoch + 1}: train loss {last:.5f}, val loss {total / count:.5f}", file=sys.stderr, flush=True)
    if args.out:
        tmp = args.out + ".tmp"
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, args.out)
    return {"spectra": n_train * args.epochs, "steps": args.epochs * len(batches), "train_loss": last,
            "val_loss": total / count, "n_val": count}


def encode(args) -> dict:
    model, _ = spender_sdss_model(args.seed, Z_MAX)
    if args.model:
        model.load_state_dict(torch.load(args.model))
    model.eval()
    tmp = args.out + ".tmp"
    with h5py.File(args.file, "r") as h, h5py.File(tmp, "w") as out:
        n = len(h["Z"])
        lat = out.create_dataset("latents", (n, 10), np.float32)
        zs = out.create_dataset("Z", (n,), np.float64)
        ids = out.create_dataset("object_id", (n,), np.uint64)
        for a in range(0, n, args.batch_size):
            b = min(a + args.batch_size, n)
            y, _, _ = read_rows(h, a, b)
            with torch.no_grad(), autocast(args.precision):
                lat[a:b] = model.encode(y).float().numpy()
            zs[a:b] = h["Z"][a:b]
            ids[a:b] = h["object_id"][a:b]
    os.replace(tmp, args.out)
    return {"spectra": n}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("file")
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--val-fraction", type=float, default=0.1)
    t.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("-o", "--out", default=None, help="write the trained state_dict here")
    e = sub.add_parser("encode")
    e.add_argument("file")
    e.add_argument("-o", "--out", required=True)
    e.add_argument("--model", default=None, help="a state_dict written by `train -o`")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    e.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    res = train(args) if args.cmd == "train" else encode(args)
    res["in_process_s"] = round(time.perf_counter() - t0, 3)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
