"""Training: `train(TrainConfig)` — the engine behind `fastspec train` (DESIGN §2, Training and encoding).

Adam with a one-cycle schedule, mixed precision (fp16 with loss scaling, bf16, or off), gradient clipping, a
validation split by a stable hash of object_id, redshift augmentation and consistency regularisation as
options, a tqdm bar with spectra/s and losses, atomic checkpoints and exact resume, and DDP under `torchrun`.

Exact resume rests on three things: the loader's order is a pure function of (seed, epoch, shards) and can
skip the first k batches of an epoch; every random draw of a step (augmentation redshifts) comes from a
generator seeded by (seed, step, shard), so it needs no saved state and does not depend on world_size; and
the checkpoint carries everything else (weights, optimizer, scheduler, loss scaler, the global RNGs of every
rank, the position in the epoch, the loss accumulators and history).

On CPU, training by default changes the C library's allocator for the whole process (`retain_cpu_memory`, see
fastspec.memory) so that each step reuses the memory the last one freed; switch it off where the process has
other work to do.

Files in the run directory (only rank 0 writes, each to a temporary name renamed when complete):
    checkpoint.pt   latest full training state (resume from it with --resume)
    best.pt         the model with the lowest validation loss so far (SpectrumAutoencoder.load)
    final.pt        the model at the end of training (SpectrumAutoencoder.load)
    history.json    train / validation losses, learning rate, throughput
    loss.png        the loss curves
    config.json     the training configuration
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .atomic import atomic_path, write_json
from .augment import augment
from .errors import FastspecError
from .kernels import set_backend
from .loader import SpectraLoader, stable_seed, validation_mask
from .losses import consistency_loss
from .memory import retain_freed_cpu_memory
from .model import ModelConfig, SpectrumAutoencoder
from .optim import Adam as CpuAdam
from .plotting import pyplot, save_figure
from .restframe import mean_from_sums, weighted_sums
from .spectra_io import open_spectra
from .validate import find_bad_rows

CHECKPOINT_FORMAT = "fastspec-checkpoint"
CHECKPOINT_VERSION = 1
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
INIT_DECODER = ("mean", "none")


class TrainDataError(FastspecError, ValueError):
    """Training data that cannot be used as given; the message names file, row and field."""


@dataclass
class TrainConfig:
    """Everything a training run needs. `model` holds ModelConfig fields (instrument defaults to the data's)."""

    data: list[str]
    out: str
    model: dict = field(default_factory=dict)
    epochs: int | None = None  # total length: epochs, or ...
    steps: int | None = None  # ... optimizer steps (one of the two; default 10 epochs)
    batch_size: int = 64  # global batch, all ranks together
    lr: float = 1e-3  # peak learning rate of the one-cycle schedule
    one_cycle: bool = True
    pct_start: float = 0.3
    weight_decay: float = 0.0
    # auto: bf16 autocast where the hardware computes in bf16 (CPUs with AVX512-BF16 / AMX, CUDA sm_80+),
    # fp16 with loss scaling on older GPUs, else fp32. The decoder always runs in fp32 (model.decode).
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    clip: float | None = 1.0  # max gradient norm; None or 0 = off
    seed: int = 0
    loss: str = "paper"  # "paper" (Σw r²/Σw over the batch), "spectrum" (per spectrum) or "spender"
    init_decoder: str = "mean"  # "mean": output starts at the training set's mean restframe spectrum; "none"
    init_sample: int = 2048  # training spectra that estimate that mean
    augment: bool = False  # train on redshift-augmented copies too
    augment_noise: bool = False  # ... with added noise (spender's augmentation)
    augment_mask: bool = False  # ... with a random masked window
    consistency: float = 0.0  # weight of the latent consistency penalty (needs augmented copies)
    # None: spender 0.3's mean batch latent variance (per rank under DDP); "per_dim": each latent dimension's own
    # batch variance; "whiten": the batch covariance (no gain from stretching any direction); a number: a fixed σ
    consistency_sigma: float | str | None = None
    val_fraction: float = 0.1
    val_every: int | None = None  # steps between validations; None = once per epoch
    checkpoint_every: int = 500  # steps
    log_every: int = 10  # steps per history entry / progress update
    backend: str = "auto"  # kernel backend
    exclude_bad: bool = False  # drop bad rows (reported) instead of stopping with an error
    resume: bool = False
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps; resume continues
    device: str = "auto"
    num_workers: int = 2
    worker_type: str = "thread"  # loader readers: "thread" or "process" (see fastspec.loader)
    block_rows: int = 256
    shuffle_blocks: int = 8
    shards: int | None = None  # data shards; default world_size (see fastspec.loader)
    progress: bool = True
    compile: bool = False
    # CPU training: keep freed memory in the process between steps (fastspec.memory.retain_freed_cpu_memory,
    # process-wide and permanent). On by default: 1.1-1.2x faster steps, 13-18% less CPU time, the same peak;
    # the process keeps its peak afterwards (bench/bench_allocator.py, bench/results/allocator.json).
    retain_cpu_memory: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- distributed ----------------------------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device_pref: str) -> _Dist:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    use_cuda = torch.cuda.is_available() and device_pref != "cpu"
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), True)


def _pick_device(pref: str, d: _Dist) -> torch.device:
    if pref in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", d.local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    dev = torch.device(pref)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", d.local_rank % max(1, torch.cuda.device_count()))
    return dev


def _all_reduce_sum(values: list[float], d: _Dist, device) -> list[float]:
    if not d.enabled:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _all_gather_object(obj, d: _Dist) -> list:
    if not d.enabled:
        return [obj]
    import torch.distributed as dist

    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def _broadcast_object(obj, d: _Dist):
    if not d.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---- data checks ----------------------------------------------------------------------------------------


def check_grid(paths, instrument) -> None:
    """Every file's wavelength grid must be the model instrument's grid."""
    for p in paths:
        with open_spectra(p) as f:
            if f.instrument.name != instrument.name:
                raise TrainDataError(
                    f"{p}: field wave_obs / attribute instrument: the file holds {f.instrument.name} spectra, "
                    f"the model is for {instrument.name}"
                )
            want = instrument.wave_obs
            if f.wave_obs.shape != want.shape or not np.allclose(f.wave_obs, want, rtol=1e-7, atol=0):
                raise TrainDataError(
                    f"{p}: field wave_obs does not match the {instrument.name} grid of the model "
                    f"({f.wave_obs.size} pixels from {f.wave_obs[0]:.2f} Å vs {want.size} from {want[0]:.2f} Å)"
                )


def scan_bad_rows(paths, z_max: float, d: _Dist | None = None, block_rows: int = 1024,
                  progress: bool = True) -> dict[str, dict[int, str]]:
    """{path: {row: reason}} over all files; DDP ranks scan disjoint blocks and share the result."""
    d = d or _Dist()
    jobs = []
    for p in paths:
        with open_spectra(p) as f:
            n = len(f)
        jobs.extend((p, s, min(s + block_rows, n)) for s in range(0, n, block_rows))
    mine = jobs[d.rank :: d.world_size]
    found: dict[str, dict[int, str]] = {}
    bar = _tqdm(total=sum(j[2] - j[1] for j in mine), desc="checking rows", unit="spec",
                disable=not (progress and d.main))
    handles: dict = {}
    try:
        for p, s, e in mine:
            f = handles.get(p) or handles.setdefault(p, open_spectra(p))
            bad = find_bad_rows(f.read(s, e), z_max=z_max, path=p)
            if bad:
                found.setdefault(p, {}).update({int(k): str(v) for k, v in bad.items()})
            bar.update(e - s)
    finally:
        bar.close()
        for f in handles.values():
            f.close()
    merged: dict[str, dict[int, str]] = {}
    for part in _all_gather_object(found, d):
        for p, rows in part.items():
            merged.setdefault(p, {}).update(rows)
    return merged


def _bad_rows_message(bad: dict[str, dict[int, str]], limit: int = 10) -> str:
    total = sum(len(v) for v in bad.values())
    lines = [f"{total} bad row(s) in the training data:"]
    shown = 0
    for p, rows in bad.items():
        for r in sorted(rows):
            if shown == limit:
                break
            lines.append(f"  {p}: row {r}: {rows[r]}")
            shown += 1
    if total > shown:
        lines.append(f"  ... and {total - shown} more")
    lines.append("Fix the files (see `fastspec validate`) or pass --exclude-bad to leave these rows out.")
    return "\n".join(lines)


# ---- the step ---------------------------------------------------------------------------------------------


class TrainStep(nn.Module):
    """The per-batch loss as one module, so DDP sees one forward (and syncs gradients) per step."""

    def __init__(self, model: nn.Module, loss: str = "paper", consistency_sigma: float | str | None = None,
                 world_size: int = 1):
        super().__init__()
        self.model = model
        self.kind = loss
        self.sigma = consistency_sigma
        self.world_size = world_size

    def forward(self, y, w, z, y_aug=None, w_aug=None, z_aug=None, consistency: float = 0.0,
                aug_loss: bool = True):
        """Returns (per-spectrum loss (N,), augmented-copy loss (N,) or None, consistency penalty (N,) or None).

        The augmented copy is reconstructed only when its loss is wanted (`aug_loss`); consistency alone needs
        just its latents."""
        need_latents = consistency > 0 and y_aug is not None
        if need_latents:
            s = self.model.encode(y, z)
            loss = self._loss_from_latents(y, w, z, s)
        else:
            s = None
            loss = self._loss_from_latents(y, w, z, None)
        loss_aug = cons = None
        if y_aug is not None:
            if need_latents:
                s_aug = self.model.encode(y_aug, z_aug)
                if aug_loss:
                    loss_aug = self._loss_from_latents(y_aug, w_aug, z_aug, s_aug)
                cons = consistency_loss(s.float(), s_aug.float(), self.sigma)
            elif aug_loss:
                loss_aug = self._loss_from_latents(y_aug, w_aug, z_aug, None)
        return loss, loss_aug, cons

    def _loss_from_latents(self, y, w, z, s):
        if self.kind != "paper" or self.world_size == 1:
            return self.model.loss(y, w, z, kind=self.kind, s=s)
        # the paper's batch normalisation over the global batch: ranks hold equal local batches, so the
        # global mean Σ w·valid per spectrum is the mean of the ranks' means
        import torch.distributed as dist

        chi2, wsum = self.model.loss_terms(y, w, z, s)
        mean_weight = wsum.mean().detach().clone()
        dist.all_reduce(mean_weight)
        return chi2 / (mean_weight / self.world_size).clamp_min(torch.finfo(chi2.dtype).tiny)


def _shard_generators(seed: int, step: int, shards: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(stable_seed(seed, step, s, 7) & 0x7FFF_FFFF_FFFF_FFFF) for s in shards]


def augment_batch(y, w, z, wave_obs, z_max: float, seed: int, step: int, shards: list[int],
                  noise: bool = False, mask: bool = False):
    """Redshift-augmented copy of a batch (z' ~ U(0, z_max), optional noise and masking as in spender).

    Each shard's sub-batch draws from its own generator seeded by (seed, step, shard): no generator state
    to checkpoint, and DDP ranks draw exactly what a single process with the same shards draws."""
    n = y.shape[0] // len(shards)
    out_y, out_w, out_z = [], [], []
    for k, g in enumerate(_shard_generators(seed, step, shards)):
        sl = slice(k * n, (k + 1) * n)
        z_new = torch.rand(n, generator=g) * z_max
        ya, wa, za = augment(y[sl], w[sl], z[sl], generator=g, redshift=True, noise=noise, mask=mask,
                             z_max=z_max, z_new=z_new.to(y.device), wave_obs=wave_obs)
        out_y.append(ya)
        out_w.append(wa)
        out_z.append(za.to(z.dtype))
    return torch.cat(out_y), torch.cat(out_w), torch.cat(out_z)


# ---- helpers ------------------------------------------------------------------------------------------------


def _tqdm(**kw):
    from tqdm.auto import tqdm

    kw.setdefault("dynamic_ncols", True)
    kw.setdefault("file", sys.stderr)
    return tqdm(**kw)


def _write_json(obj, path: str) -> None:
    write_json(path, obj, sync=False, indent=1, default=str)


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _fingerprint(paths) -> list[dict]:
    out = []
    for p in paths:
        with open_spectra(p) as f:
            out.append({"path": os.path.abspath(p), "rows": len(f), "instrument": f.instrument.name})
    return out


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def plot_history(history: dict, path: str) -> None:
    """loss.png: train and validation loss against spectra seen, learning rate below."""
    plt = pyplot(style=False)
    train = history.get("train", [])
    val = history.get("val", [])
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=[3, 1])
    if train:
        x = [h["spectra"] for h in train]
        ax.plot(x, [h["loss"] for h in train], lw=1, color="C0", label="train")
        ax_lr.plot(x, [h["lr"] for h in train], lw=1, color="C2")
    if val:
        ax.plot([h["spectra"] for h in val], [h["loss"] for h in val], "o-", ms=4, color="C1", label="validation")
    losses = [h["loss"] for h in train + val if math.isfinite(h["loss"]) and h["loss"] > 0]
    if losses and max(losses) / min(losses) > 20:
        ax.set_yscale("log")
    ax.set_ylabel(f"loss ({history.get('loss_kind', 'paper')})")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(history.get("title", "fastspec training"))
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("spectra seen")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=110, bbox_inches=None)


# ---- training ---------------------------------------------------------------------------------------------


# What a resumed run takes from its checkpoint: everything that decides the result. Run-control settings
# (workers, device, backend, progress, checkpoint/log/validation cadence, stop_after) may change.
RESUME_FIXED = ("epochs", "steps", "batch_size", "lr", "one_cycle", "pct_start", "weight_decay", "precision",
                "clip", "seed", "loss", "augment", "augment_noise", "augment_mask", "consistency",
                "consistency_sigma", "val_fraction", "exclude_bad", "block_rows", "shuffle_blocks")


def _merge_resumed(cfg: TrainConfig, old: dict, where: str) -> None:
    """Take the checkpointed run's settings where `cfg` leaves the default; refuse real changes."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for key in RESUME_FIXED:
        if key not in old:
            continue
        now = getattr(cfg, key)
        if now == old[key]:
            continue
        if now == defaults[key]:
            setattr(cfg, key, old[key])
        else:
            raise ValueError(f"{where}: --{key.replace('_', '-')} was {old[key]} in the checkpointed run, "
                             f"{now} now; a resumed run keeps its settings (exact resume)")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively (autocast then speeds the encoder up ~3x on CPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        try:
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        except AttributeError:  # torch builds without the probes
            return False
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' → bf16 where native, fp16 on CUDA without bf16 (V100), else fp32; other values as given."""
    if precision != "auto":
        return precision
    if native_bf16(device):
        return "bf16"
    return "fp16" if device.type == "cuda" else "fp32"


def _check_options(cfg: TrainConfig) -> None:
    """Refuse settings that contradict each other; fill in the default length (10 epochs)."""
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    if cfg.init_decoder not in INIT_DECODER:
        raise ValueError(f"init_decoder must be one of {', '.join(INIT_DECODER)}, got {cfg.init_decoder!r}")
    if cfg.epochs is not None and cfg.steps is not None:
        raise ValueError("give either epochs or steps, not both")
    if cfg.epochs is None and cfg.steps is None:
        cfg.epochs = 10
    if cfg.consistency < 0:
        raise ValueError("consistency weight must be ≥ 0")
    if isinstance(cfg.consistency_sigma, str) and cfg.consistency_sigma not in ("per_dim", "whiten"):
        raise ValueError(f"consistency_sigma must be a number, None, 'per_dim' or 'whiten', got {cfg.consistency_sigma!r}")


def _data_instrument(paths):
    with open_spectra(paths[0]) as f:
        return f.instrument


class Trainer:
    """One training run: data, model, optimizer and the loop. `train(config)` is the usual entry point;
    `fastspec profile` drives `run` under the torch profiler."""

    def __init__(self, config: TrainConfig, dist_info: _Dist | None = None):
        cfg = config
        if not cfg.data:
            raise TrainDataError("no training data given")
        self.ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
        ckpt = self._read_checkpoint(cfg) if cfg.resume else None
        _check_options(cfg)
        self.cfg = cfg
        self._setup_process(dist_info)
        self._setup_data(ckpt)
        self._setup_model_and_optimiser(ckpt)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.spectra_seen = 0
        self.best_val = math.inf
        self.acc = {"loss": 0.0, "aug": 0.0, "cons": 0.0, "n": 0}
        self.history = {"train": [], "val": [], "loss_kind": cfg.loss,
                        "title": f"{self.model_cfg.instrument}, S={self.model_cfg.n_latent}, "
                                 f"batch {cfg.batch_size}, {cfg.precision}"
                                 + (", augment" if cfg.augment else "")
                                 + (f", consistency {cfg.consistency:g}" if cfg.consistency else "")}
        if ckpt is not None:
            self._restore(ckpt)
        self.train_time = 0.0

    # ---- setup ----

    def _read_checkpoint(self, cfg: TrainConfig) -> dict:
        """The training state to resume from; takes the checkpointed run's settings into `cfg`."""
        if not os.path.exists(self.ckpt_path):
            raise FileNotFoundError(f"{self.ckpt_path}: nothing to resume (no checkpoint in {cfg.out})")
        ckpt = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{self.ckpt_path}: not a fastspec training checkpoint")
        _merge_resumed(cfg, ckpt["train_config"], self.ckpt_path)
        return ckpt

    def _setup_process(self, dist_info: _Dist | None) -> None:
        """Ranks, device, kernel backend and (if asked) the CPU allocator; the data files must exist."""
        cfg = self.cfg
        self.d = dist_info or _setup_distributed(cfg.device)
        self.device = _pick_device(cfg.device, self.d)
        cfg.precision = resolve_precision(cfg.precision, self.device)  # recorded resolved: resume keeps it
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL collectives (all_gather_object) use the current device
        elif cfg.retain_cpu_memory:
            retain_freed_cpu_memory()
        self.paths = [os.fspath(p) for p in cfg.data]
        for p in self.paths:
            if not os.path.exists(p):
                raise TrainDataError(f"{p}: no such file")
        set_backend(cfg.backend)

    def _setup_data(self, ckpt: dict | None) -> None:
        """Model configuration and grid check, bad rows (checked once, then kept in the checkpoint), the
        validation split by object_id hash, the loaders and the length of the run."""
        cfg = self.cfg
        if ckpt is not None:
            model_cfg = ModelConfig.from_saved(ckpt["model_config"])
        else:
            kw = dict(cfg.model)
            kw.setdefault("instrument", _data_instrument(self.paths).name)
            model_cfg = ModelConfig.from_dict(kw)
        self.model_cfg = model_cfg
        self.instrument = model_cfg.get_instrument()
        self.z_max = float(model_cfg.z_max)
        check_grid(self.paths, self.instrument)
        self.bad_rows = self._bad_rows(ckpt)
        train_rows, val_rows = [], []
        for p in self.paths:
            with open_spectra(p) as f:
                ids = f.read_column("object_id")
            is_val = validation_mask(ids, cfg.val_fraction)
            ok = np.ones(len(ids), dtype=bool)
            for r in self.bad_rows.get(p, {}):
                ok[r] = False
            train_rows.append(ok & ~is_val)
            val_rows.append(ok & is_val)
        self.n_train = int(sum(r.sum() for r in train_rows))
        self.n_val = int(sum(r.sum() for r in val_rows))
        self.shards = int(cfg.shards or self.d.world_size)
        if self.shards % self.d.world_size:
            raise ValueError(f"shards ({self.shards}) must be a multiple of the world size ({self.d.world_size})")
        if cfg.batch_size % self.shards:
            raise ValueError(f"batch size {cfg.batch_size} is not divisible by {self.shards} data shards")
        common = dict(block_rows=cfg.block_rows, shuffle_blocks=cfg.shuffle_blocks, seed=cfg.seed,
                      rank=self.d.rank, world_size=self.d.world_size, shards=self.shards,
                      num_workers=cfg.num_workers, worker_type=cfg.worker_type, device=self.device)
        self.train_loader = SpectraLoader(self.paths, cfg.batch_size, shuffle=True, drop_last=True,
                                          rows=train_rows, **common)
        self.val_loader = None
        if self.n_val:
            self.val_loader = SpectraLoader(self.paths, cfg.batch_size, shuffle=False, drop_last=False,
                                            rows=val_rows, **{**common, "num_workers": min(1, cfg.num_workers)})
        if self.train_loader.batches_per_epoch(0) == 0:
            raise TrainDataError(
                f"{self.n_train} training spectra do not fill one batch of {cfg.batch_size} "
                f"({self.shards} shard(s)); use a smaller --batch-size"
            )
        # Length of the run in steps (batches per epoch may differ by one between epochs with several shards).
        if cfg.steps is not None:
            self.total_steps = int(cfg.steps)
        else:
            self.total_steps = sum(self.train_loader.batches_per_epoch(e) for e in range(cfg.epochs))

    def _bad_rows(self, ckpt: dict | None) -> dict[str, dict[int, str]]:
        """{path: {row: reason}}: from the checkpoint, or scanned (an error unless exclude_bad)."""
        if ckpt is not None:
            if ckpt["data"] != _fingerprint(self.paths):
                raise TrainDataError(
                    f"{self.ckpt_path}: the checkpoint was trained on other files "
                    f"({[f['path'] for f in ckpt['data']]}, {[f['rows'] for f in ckpt['data']]} rows); "
                    "resume needs the same data"
                )
            return {p: {int(r): s for r, s in rows.items()} for p, rows in ckpt["bad_rows"].items()}
        bad = scan_bad_rows(self.paths, self.z_max, self.d, progress=self.cfg.progress)
        if bad and not self.cfg.exclude_bad:
            raise TrainDataError(_bad_rows_message(bad))
        n_bad = sum(len(v) for v in bad.values())
        if n_bad and self.d.main:
            reasons: dict[str, int] = {}
            for rows in bad.values():
                for why in rows.values():
                    key = why.split(":")[0]
                    reasons[key] = reasons.get(key, 0) + 1
            print(f"excluding {n_bad} bad row(s): " + ", ".join(f"{k} {v}" for k, v in reasons.items()),
                  file=sys.stderr)
        return bad

    def _setup_model_and_optimiser(self, ckpt: dict | None) -> None:
        """The model (seeded), the step module (under DDP / torch.compile if asked), Adam, the learning-rate
        schedule and the loss scaler; `_restore` loads their state on resume."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.model = SpectrumAutoencoder(self.model_cfg).to(self.device)
        if ckpt is None and cfg.init_decoder == "mean":
            self._init_decoder_to_mean()  # before DDP: its wrapper broadcasts rank 0's parameters
        self.step_module = TrainStep(self.model, cfg.loss, cfg.consistency_sigma, self.d.world_size)
        self.forward = self.step_module
        if self.d.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = DDP(self.step_module, device_ids=ids)
        if cfg.compile:
            self.forward = torch.compile(self.forward)
        # The same Adam either way; fastspec's spares a CPU process torch.optim's import of torch._dynamo
        # (~150 MB, 0.7 s), torch's foreach version runs fewer kernels on a GPU. Checkpoints move between them.
        adam = torch.optim.Adam if self.device.type == "cuda" else CpuAdam
        self.optimizer = adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        if cfg.one_cycle:
            self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
                self.optimizer, max_lr=cfg.lr, total_steps=max(self.total_steps, 2), pct_start=cfg.pct_start)
        else:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")

    def _init_decoder_to_mean(self) -> None:
        """Decoder output ← the weighted mean restframe spectrum of the first ⌈init_sample / batch⌉ global
        batches in the loader's order. Under DDP each rank sums its part of those batches and the sums are
        added up, so every world size starts from the same spectrum; the torch RNG state is left as it was."""
        n_batches = max(1, math.ceil(self.cfg.init_sample / self.cfg.batch_size))
        wave_obs = self.model.wave_obs.double().cpu().numpy()
        wave_rest = self.model.wave_rest.double().cpu().numpy()
        wx = np.zeros(wave_rest.shape[0])
        ws = np.zeros(wave_rest.shape[0])
        rng = torch.get_rng_state()
        for i, b in enumerate(self.train_loader.iterate(epoch=0)):
            if i == n_batches:
                break
            a, c = weighted_sums(b.y.float().cpu().numpy(), b.w.float().cpu().numpy(),
                                 b.z.double().cpu().numpy(), wave_obs, wave_rest)
            wx += a
            ws += c
        torch.set_rng_state(rng)
        if self.d.enabled:
            import torch.distributed as dist

            sums = torch.from_numpy(np.stack([wx, ws])).to(self.device)
            dist.all_reduce(sums)
            wx, ws = sums.cpu().numpy()
        self.model.init_output(mean_from_sums(wx, ws))

    # ---- state ----

    def _restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        pos = ckpt["position"]
        self.step, self.epoch, self.batch_in_epoch = pos["step"], pos["epoch"], pos["batch_in_epoch"]
        self.spectra_seen = pos["spectra_seen"]
        self.best_val = ckpt.get("best_val", math.inf)
        self.acc = dict(ckpt["accumulators"])
        self.history = ckpt["history"]
        rngs = ckpt["rng"]
        if len(rngs) == self.d.world_size:
            _set_rng_state(rngs[self.d.rank])
        else:
            _set_rng_state(rngs[0])
            if self.d.main:
                print(f"note: checkpoint from {len(rngs)} rank(s), resuming on {self.d.world_size}; "
                      "dropout draws will differ", file=sys.stderr)
        old = ckpt["train_config"]
        if int(old.get("shards") or 1) != self.shards and self.d.main:
            print(f"note: data shards changed ({old.get('shards')} → {self.shards}): the batch order changes",
                  file=sys.stderr)

    def checkpoint(self) -> None:
        self._flush_losses()
        rngs = _all_gather_object(_rng_state(), self.d)
        if not self.d.main:
            return
        os.makedirs(self.cfg.out, exist_ok=True)
        cfg_dict = self.cfg.to_dict()
        cfg_dict["shards"] = self.shards
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "model_config": self.model_cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": rngs,
            "position": {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                         "spectra_seen": self.spectra_seen},
            "accumulators": self.acc,
            "best_val": self.best_val,
            "history": self.history,
            "train_config": cfg_dict,
            "data": _fingerprint(self.paths),
            "bad_rows": {p: {str(r): s for r, s in rows.items()} for p, rows in self.bad_rows.items()},
        }
        with atomic_path(self.ckpt_path) as tmp:  # synced: exact resume starts from this file
            torch.save(state, tmp)
        _write_json(self.history, os.path.join(self.cfg.out, "history.json"))

    def write_reports(self) -> None:
        """history.json and loss.png (the plot only at the end of a run: it costs about a second)."""
        if not self.d.main:
            return
        _write_json(self.history, os.path.join(self.cfg.out, "history.json"))
        if self.history["train"] or self.history["val"]:
            plot_history(self.history, os.path.join(self.cfg.out, "loss.png"))

    # ---- evaluation ----

    @torch.no_grad()
    def validate(self) -> float:
        if self.val_loader is None:
            return math.nan
        self.model.eval()
        total, count = 0.0, 0.0
        for b in self.val_loader.iterate(epoch=0):
            with _autocast(self.device, self.cfg.precision):
                if self.cfg.loss == "paper":  # Σχ² / Σ w·valid over the whole validation set
                    chi2, wsum = self.model.loss_terms(b.y, b.w, b.z)
                    total += float(chi2.float().sum())
                    count += float(wsum.float().sum())
                else:
                    loss = self.model.loss(b.y, b.w, b.z, kind=self.cfg.loss)
                    total += float(loss.float().sum())
                    count += len(loss)
        self.model.train()
        total, count = _all_reduce_sum([total, count], self.d, self.device)
        return total / count if count > 0 else math.nan

    # ---- the loop ----

    def train_step(self, batch) -> None:
        cfg = self.cfg
        y, w, z = batch.y, batch.w, batch.z
        need_aug = cfg.augment or cfg.consistency > 0
        aug = (None, None, None)
        if need_aug:
            with torch.no_grad():
                aug = augment_batch(y, w, z, self.model.wave_obs, self.z_max, cfg.seed, self.step,
                                    self.train_loader.my_shards, cfg.augment_noise, cfg.augment_mask)
        with _autocast(self.device, cfg.precision):
            loss_vec, loss_aug, cons = self.forward(y, w, z, *aug, consistency=cfg.consistency,
                                                    aug_loss=cfg.augment)
            loss = loss_vec.float().mean()
            total = loss
            if cfg.augment and loss_aug is not None:
                # Mean of both copies keeps the loss on the same scale as a run without augmentation.
                total = 0.5 * (loss + loss_aug.float().mean())
            if cons is not None:
                total = total + cfg.consistency * cons.float().mean()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.profiler.record_function("backward"):
            self.scaler.scale(total).backward()
        with torch.profiler.record_function("optimizer"):
            if cfg.clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
        self._last_index = batch.index.clone()  # names the rows if the loss turns non-finite; not the batch,
        # which would keep its whole chunk of rows in memory while the next one is read
        self._pending.append(loss.detach())
        if loss_aug is not None:
            self._pending_aug.append(loss_aug.detach().float().mean())
        if cons is not None:
            self._pending_cons.append(cons.detach().float().mean())
        self.step += 1
        self.batch_in_epoch += 1
        self.spectra_seen += cfg.batch_size

    def _flush_losses(self) -> None:
        # Losses stay on the device between log steps: one sync per log step, not per step.
        if not self._pending:
            return
        pending = {"loss": self._pending, "aug": self._pending_aug, "cons": self._pending_cons}
        keys = [k for k, v in pending.items() if v]
        flat = torch.cat([torch.stack(pending[k]).float() for k in keys])
        if self.d.enabled:
            # Ranks hold equal local batches: the mean of their means is the global batch mean.
            import torch.distributed as dist

            dist.all_reduce(flat)
            flat /= self.d.world_size
        values = dict(zip(keys, flat.cpu().split([len(pending[k]) for k in keys])))
        self._pending, self._pending_aug, self._pending_cons = [], [], []
        if not torch.isfinite(values["loss"]).all():
            rows = [self.train_loader.locate(i) for i in self._last_index[:3].tolist()]
            raise FloatingPointError(
                f"non-finite training loss near step {self.step} (precision {self.cfg.precision}); "
                f"last batch starts with {', '.join(f'{p} row {r}' for p, r in rows)}. "
                "Try --precision fp32, a lower --lr, or `fastspec validate` on the data."
            )
        # One value at a time, in step order: the sums then do not depend on where a run was interrupted.
        for key, vals in values.items():
            for v in vals.tolist():
                self.acc[key] += v
        self.acc["n"] += len(values["loss"])

    def _log(self, elapsed: float) -> dict:
        n = max(self.acc["n"], 1)
        entry = {"step": self.step, "epoch": self.epoch, "spectra": self.spectra_seen,
                 "loss": self.acc["loss"] / n, "lr": self.scheduler.get_last_lr()[0]}
        if self.cfg.augment:
            entry["loss_aug"] = self.acc["aug"] / n
        if self.cfg.consistency:
            entry["consistency"] = self.acc["cons"] / n
        if elapsed > 0:
            entry["spectra_per_s"] = self._window_spectra / elapsed
        self.history["train"].append(entry)
        self.acc = {"loss": 0.0, "aug": 0.0, "cons": 0.0, "n": 0}
        return entry

    def _validate_and_record(self) -> float:
        val = self.validate()
        if math.isfinite(val):
            self.history["val"].append({"step": self.step, "epoch": self.epoch, "spectra": self.spectra_seen,
                                        "loss": val})
            if val < self.best_val:
                self.best_val = val
                if self.d.main:
                    os.makedirs(self.cfg.out, exist_ok=True)
                    self.model.save(os.path.join(self.cfg.out, "best.pt"),
                                extra={"step": self.step, "val_loss": val})
        return val

    def run(self, max_steps: int | None = None, on_step=None, write_files: bool = True) -> dict:
        """Train until the configured length (or `max_steps` more steps); returns a summary.

        write_files=False (profiling) skips config, checkpoint, validation at the end and final model."""
        cfg = self.cfg
        stop = self.total_steps
        if cfg.stop_after is not None:
            stop = min(stop, int(cfg.stop_after))
        if max_steps is not None:
            stop = min(stop, self.step + int(max_steps))
        if self.d.main and write_files:
            os.makedirs(cfg.out, exist_ok=True)
            cfg_dict = cfg.to_dict()
            cfg_dict.update(shards=self.shards, world_size=self.d.world_size, total_steps=self.total_steps,
                            n_train=self.n_train, n_val=self.n_val, model=self.model_cfg.to_dict())
            _write_json(cfg_dict, os.path.join(cfg.out, "config.json"))
        self._pending, self._pending_aug, self._pending_cons = [], [], []
        self._last_index = None
        self.model.train()
        bar = _tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                    disable=not (cfg.progress and self.d.main))
        last_val = self.history["val"][-1]["loss"] if self.history["val"] else math.nan
        t_window = time.perf_counter()
        self._window_spectra = 0
        t_start = time.perf_counter()
        try:
            while self.step < stop:
                n_batches = self.train_loader.batches_per_epoch(self.epoch)
                if self.batch_in_epoch >= n_batches:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    continue
                it = self.train_loader.iterate(self.epoch, skip_batches=self.batch_in_epoch)
                while self.step < stop:
                    with torch.profiler.record_function("loader_wait"):
                        batch = next(it, None)
                    if batch is None:
                        break
                    self.train_step(batch)
                    batch = None  # a batch is a view of its chunk: let the chunk go before the next read
                    self._window_spectra += cfg.batch_size
                    if on_step is not None:
                        on_step(self)
                    end_of_epoch = self.batch_in_epoch >= n_batches
                    # Not at an early stop: its partial window goes into the checkpoint, so a resumed
                    # run's history matches an uninterrupted one.
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps or end_of_epoch:
                        self._flush_losses()
                        now = time.perf_counter()
                        entry = self._log(now - t_window)
                        t_window, self._window_spectra = now, 0
                        bar.set_postfix({"spec/s": f"{entry.get('spectra_per_s', 0):.0f}",
                                         "loss": f"{entry['loss']:.4g}", "val": f"{last_val:.4g}"},
                                        refresh=False)
                    bar.update(1)
                    val_due = (cfg.val_every and self.step % cfg.val_every == 0) or (
                        not cfg.val_every and end_of_epoch)
                    if val_due:
                        last_val = self._validate_and_record()
                        bar.set_postfix({"loss": f"{self.history['train'][-1]['loss']:.4g}",
                                         "val": f"{last_val:.4g}"}, refresh=False)
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < stop:
                        self.checkpoint()
                    if end_of_epoch:
                        break
                it.close()
                if self.batch_in_epoch >= n_batches:
                    self.epoch += 1
                    self.batch_in_epoch = 0
        finally:
            bar.close()
        self._flush_losses()
        self.train_time += time.perf_counter() - t_start
        finished = self.step >= self.total_steps
        if not write_files:
            return {"step": self.step, "finished": finished, "train_time_s": self.train_time}
        if finished and (not self.history["val"] or self.history["val"][-1]["step"] != self.step):
            last_val = self._validate_and_record()
        self.checkpoint()
        self.write_reports()
        if finished and self.d.main:
            self.model.save(os.path.join(cfg.out, "final.pt"),
                        extra={"step": self.step, "history": self.history})
        return {"step": self.step, "epoch": self.epoch, "finished": finished, "spectra_seen": self.spectra_seen,
                "val_loss": last_val, "best_val": self.best_val, "train_time_s": self.train_time,
                "n_train": self.n_train, "n_val": self.n_val}

    def close(self, finished_cleanly: bool = False) -> None:
        self.train_loader.close()
        if self.val_loader is not None:
            self.val_loader.close()
        if self.d.initialized_here:
            import torch.distributed as dist

            if finished_cleanly:
                # rank 0 still writes files after the last collective: without a barrier the other rank tears
                # its gloo pairs down while rank 0's side is live, which once aborted a rank at exit in CI
                dist.barrier()
            dist.destroy_process_group()


def train(config: TrainConfig) -> dict:
    """Run (or resume) training as configured; returns a summary dict (rank 0's view under DDP)."""
    trainer = Trainer(config)
    ok = False
    try:
        summary = trainer.run()
        ok = True
        return summary
    finally:
        trainer.close(finished_cleanly=ok)
