"""Outlier scores: a normalising flow fitted to the latents of a training set scores every spectrum by the
log-probability density of its latents (low = unusual), as spender's paper II (Liang, Melchior et al. 2023)
does. The flow is zuko's masked autoregressive flow (`zuko.flows.MAF`) — a maintained, pure-PyTorch library
— on standardised latents; `log_prob` returns the density of the latents themselves (the standardisation's
Jacobian included), in nats.

A fitted flow is saved beside its model (default ``<model>.flow.pt``) with its hyperparameters, the
standardisation and the sha256 of the model whose latents it was fitted to, and reloads without its training
data (`LatentFlow.load`).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .atomic import atomic_path
from .errors import FastspecError

FLOW_FORMAT = "fastspec.latent-flow"
FLOW_VERSION = 1


class OutlierError(FastspecError, ValueError):
    """Latents or flows that cannot be scored (wrong shape, non-finite values, another model's flow)."""


def _zuko():
    try:
        import zuko
    except ImportError as err:  # an optional extra
        raise OutlierError("outlier scores need the zuko package: pip install 'fastspec[outliers]'") from err
    return zuko


@dataclass
class FlowConfig:
    """The flow's hyperparameters: `transforms` autoregressive layers with MLPs of `hidden` units (MAF)."""

    n_latent: int
    transforms: int = 5
    hidden: tuple = (64, 64)


class LatentFlow(torch.nn.Module):
    """A normalising flow on S-dimensional latents; `log_prob(s)` (N,) in nats."""

    def __init__(self, config: FlowConfig, mean=None, std=None, model_sha256: str = ""):
        super().__init__()
        zuko = _zuko()
        self.config = config
        self.model_sha256 = model_sha256
        S = config.n_latent
        self.register_buffer("mean", torch.zeros(S) if mean is None else torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.ones(S) if std is None else torch.as_tensor(std, dtype=torch.float32))
        self.flow = zuko.flows.MAF(S, transforms=config.transforms, hidden_features=tuple(config.hidden))

    def log_prob(self, s: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(s, dtype=torch.float32, device=self.mean.device)
        if s.ndim != 2 or s.shape[1] != self.config.n_latent:
            raise OutlierError(f"latents must have shape (N, {self.config.n_latent}), got {tuple(s.shape)}")
        u = (s - self.mean) / self.std
        return self.flow().log_prob(u) - torch.log(self.std).sum()

    @torch.no_grad()
    def score(self, s, batch_size: int = 65536) -> np.ndarray:
        """log_prob of latents (N, S) as a float64 numpy array, in batches, without gradients."""
        s = torch.as_tensor(np.asarray(s), dtype=torch.float32)
        was = self.training
        self.eval()
        try:
            return np.concatenate([self.log_prob(s[a:a + batch_size]).double().cpu().numpy()
                                   for a in range(0, max(len(s), 1), batch_size)])[: len(s)]
        finally:
            self.train(was)

    def save(self, path) -> str:
        payload = {"format": FLOW_FORMAT, "format_version": FLOW_VERSION, "config": asdict(self.config),
                   "model_sha256": self.model_sha256, "state_dict": self.state_dict()}
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
        return os.fspath(path)

    @classmethod
    def load(cls, path, map_location="cpu") -> LatentFlow:
        path = os.fspath(path)
        try:
            payload = torch.load(path, map_location=map_location, weights_only=True)
        except FileNotFoundError:
            raise OutlierError(f"{path}: flow file not found") from None
        except Exception as err:
            raise OutlierError(f"{path}: cannot read as a latent flow ({err})") from None
        if not isinstance(payload, dict) or payload.get("format") != FLOW_FORMAT:
            raise OutlierError(f"{path}: not a fastspec latent flow (field format)")
        cfg = dict(payload["config"])
        cfg["hidden"] = tuple(cfg.get("hidden", (64, 64)))
        flow = cls(FlowConfig(**cfg), model_sha256=payload.get("model_sha256", ""))
        flow.load_state_dict(payload["state_dict"])
        return flow.eval()


def default_flow_path(model_path) -> str:
    """Where a model's flow lives by default: ``<model>.flow.pt`` beside it."""
    base, _ = os.path.splitext(os.fspath(model_path))
    return base + ".flow.pt"


def check_latents(s, name: str = "latents") -> np.ndarray:
    s = np.asarray(s)
    if s.ndim != 2 or s.shape[0] < 1:
        raise OutlierError(f"{name}: expected latents of shape (N, S), got {s.shape}")
    bad = ~np.isfinite(s).all(1)
    if bad.any():
        raise OutlierError(f"{name}: row {int(np.argmax(bad))} has non-finite latents")
    return s.astype(np.float32)


def fit_flow(latents, *, transforms: int = 5, hidden=(64, 64), steps: int = 2000, lr: float = 2e-3,
             batch_size: int = 256, val_fraction: float = 0.15, weight_decay: float = 1e-4, seed: int = 0,
             patience: int = 300, model_sha256: str = "", progress: bool = False) -> LatentFlow:
    """Fit a flow to training latents (N, S) by maximum likelihood (Adam, cosine schedule) and return the
    state with the best log-likelihood on a held-out `val_fraction` of them (stopping after `patience` steps
    without improvement). The latents are standardised first (mean, std stored with the flow)."""
    s = check_latents(latents, "training latents")
    n, S = s.shape
    if n < 10:
        raise OutlierError(f"training latents: {n} rows are too few to fit a flow (need ≥ 10)")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_val = max(1, int(round(val_fraction * n))) if val_fraction > 0 else 0
    t = torch.as_tensor(s)
    val, train = t[perm[:n_val]], t[perm[n_val:]]
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's RNG state
        torch.manual_seed(seed)
        flow = LatentFlow(FlowConfig(S, transforms, tuple(hidden)), train.mean(0), train.std(0).clamp_min(1e-6),
                          model_sha256=model_sha256)
    opt = torch.optim.AdamW(flow.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    best, best_state, since = -math.inf, None, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="flow", unit="step", dynamic_ncols=True)
    for step in range(steps):
        idx = torch.randint(0, len(train), (min(batch_size, len(train)),), generator=g)
        loss = -flow.log_prob(train[idx]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 24 or step == steps - 1:
            with torch.no_grad():
                ll = float(flow.log_prob(val if n_val else train).mean())
            if ll > best:
                best, best_state, since = ll, {k: v.clone() for k, v in flow.state_dict().items()}, 0
            else:
                since += 25
            if bar is not None:
                bar.set_postfix(val_logp=f"{ll:.3f}")
            if since >= patience:
                break
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if best_state is not None:
        flow.load_state_dict(best_state)
    return flow.eval()


def roc_auc(score_normal, score_anomalous) -> float:
    """Area under the ROC curve for telling anomalous from normal by a score that is higher for anomalies
    (Mann–Whitney U / (n₀ n₁), ties counted half)."""
    a, b = np.asarray(score_normal, np.float64), np.asarray(score_anomalous, np.float64)
    allv = np.concatenate([a, b])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    ranks[order] = np.arange(1, len(allv) + 1)
    for v in np.unique(allv):  # average ranks of ties
        m = allv == v
        if m.sum() > 1:
            ranks[m] = ranks[m].mean()
    u = ranks[len(a):].sum() - len(b) * (len(b) + 1) / 2
    return float(u / (len(a) * len(b)))


# ---- files: `fastspec outliers` ---------------------------------------------------------------------------

OUTLIERS_FORMAT = "fastspec-outliers"
OUTLIERS_VERSION = 1


def read_latents(model, path, *, model_sha256: str | None = None, refine: int = 0, batch_size: int = 256,
                 progress: bool = False) -> dict:
    """Latents (and Z, object_id) of one input: a latents file from `fastspec encode` of this model (checked
    by its model_sha256), or a spectra file, encoded here (optionally refined for `refine` steps)."""
    import h5py

    from . import encode as E
    from .spectra import as_object_id
    from .spectra_io import open_spectra

    path = os.fspath(path)
    if not os.path.exists(path):
        raise OutlierError(f"{path}: input file not found")
    fmt = None
    try:
        with h5py.File(path, "r") as h:
            fmt = h.attrs.get("format")
    except OSError:
        pass
    if fmt == E.LATENTS_FORMAT:
        with E.LatentsFile(path) as lf:
            if model_sha256 and lf.attrs.get("model_sha256") != model_sha256:
                raise OutlierError(f"{path}: attribute model_sha256: latents made by another model")
            s = check_latents(lf["latents"], path)
            return {"latents": s, "Z": lf["Z"], "object_id": lf["object_id"]}
    with open_spectra(path) as f:
        n = len(f)
        parts = {"latents": [], "Z": [], "object_id": []}
        for a in range(0, n, 4096):
            b = f.read(a, min(n, a + 4096))
            y, w, z = E.prepare(b)
            if not np.isfinite(z).all():
                raise OutlierError(f"{path}: row {a + int(np.argmax(~np.isfinite(z)))}, field Z: not a finite "
                                   "redshift (the encoder needs it; fit it first with `fastspec redshift`)")
            enc = E.encode_arrays(model, y, w, z, batch_size=batch_size, refine=refine)
            parts["latents"].append(enc["latents"])
            parts["Z"].append(b.z.astype(np.float64))
            parts["object_id"].append(as_object_id(np.asarray(b.object_id), path, a))
    return {k: np.concatenate(v) for k, v in parts.items()}


def write_scores(out, paths, parts: list[dict], log_prob: np.ndarray, attrs: dict) -> str:
    """The scores file (rows in input order): log_prob, latents, Z, object_id, source_file, source_row."""
    from . import encode as E

    n = len(log_prob)
    S = parts[0]["latents"].shape[1]
    cols = {"log_prob": ((n,), np.float64), "latents": ((n, S), np.float32), "Z": ((n,), np.float64),
            "object_id": ((n,), np.uint64), "source_file": ((n,), np.int32), "source_row": ((n,), np.int64)}
    tmp = os.fspath(out) + ".partial"
    f = E.create_rows_file(tmp, cols, attrs, [os.fspath(p) for p in paths], OUTLIERS_FORMAT, OUTLIERS_VERSION)
    try:
        f["log_prob"][:] = log_prob
        f["latents"][:] = np.concatenate([p["latents"] for p in parts])
        f["Z"][:] = np.concatenate([p["Z"] for p in parts])
        f["object_id"][:] = np.concatenate([p["object_id"] for p in parts])
        f["source_file"][:] = np.concatenate([np.full(len(p["Z"]), i, np.int32) for i, p in enumerate(parts)])
        f["source_row"][:] = np.concatenate([np.arange(len(p["Z"]), dtype=np.int64) for p in parts])
        f.attrs.modify("rows_done", np.int64(n))
        E.finish_output(f, tmp, os.fspath(out))
    except BaseException:
        f.close()
        raise
    return os.fspath(out)


def read_scores(path) -> dict:
    """log_prob, Z, object_id, source_file, source_row of a `fastspec outliers` output."""
    import h5py

    path = os.fspath(path)
    try:
        with h5py.File(path, "r") as h:
            if h.attrs.get("format") != OUTLIERS_FORMAT:
                raise OutlierError(f"{path}: not a {OUTLIERS_FORMAT} file (format {h.attrs.get('format')!r})")
            if not h.attrs.get("complete", False):
                raise OutlierError(f"{path}: incomplete output")
            return {k: h[k][()] for k in ("log_prob", "Z", "object_id", "source_file", "source_row")}
    except OSError as err:
        raise OutlierError(f"{path}: cannot open as HDF5 ({err})") from None


__all__ = ["FlowConfig", "LatentFlow", "OutlierError", "fit_flow", "default_flow_path", "check_latents",
           "roc_auc", "FLOW_FORMAT", "OUTLIERS_FORMAT", "read_latents", "write_scores", "read_scores"]
