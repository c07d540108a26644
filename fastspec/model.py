"""The spectrum autoencoder of Melchior, Hahn & Liang 2022 (DESIGN §1): encoder, decoder, redshift-resample.

`SpectrumAutoencoder(ModelConfig(...))` maps observed spectra y (N, L) on an instrument grid `wave_obs` to
latents s (N, S), decodes them into restframe spectra on the linear grid `wave_rest` (R pixels) and redshifts
those back onto any observed grid. Attention pooling and the redshift-resample run through the public
`fastspec.kernels` ops, so the backend switch (`fastspec.kernels.use_backend`) picks Triton, numba or torch.

A model is fully described by its `ModelConfig` (JSON-serialisable): `save` writes config + state_dict, and
`SpectrumAutoencoder.load` rebuilds the model from the checkpoint alone. `ModelConfig.spender()` and
`SpectrumAutoencoder.from_spender` reproduce spender 0.3's architecture, grids and parameter names.
"""
from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import fit, kernels
from .atomic import atomic_path
from .errors import FastspecError
from .instruments import Instrument, get_instrument

ACTIVATIONS = ("leakyrelu", "speculator")
GRIDS = ("fastspec", "spender")
LOSS_KINDS = ("paper", "spectrum", "spender")
REST_GRIDS = ("auto", "log", "linear")
CHECKPOINT_FORMAT = "fastspec.model"
CHECKPOINT_VERSION = 1

# spender 0.3's observed grids, exactly as its instrument classes build them (float32 10**arange for SDSS and
# BOSS, which rounds the exponent and puts pixels up to 0.005 Å off the float64 grid; float64 linspace for DESI).
_SPENDER_OBS = {
    "sdss": ("log", 3.578, 3.97, 0.0001),
    "boss": ("log", 3.549, 4.0175, 0.0001),
    "desi": ("lin", 3600.0, 9824.0, 7781),
}


class ModelConfigError(FastspecError, ValueError):
    """A model configuration or checkpoint that cannot describe a model."""


def _spender_wave_obs(name: str) -> torch.Tensor:
    kind, a, b, c = _SPENDER_OBS[name]
    if kind == "log":
        return 10 ** torch.arange(a, b, c)
    return torch.linspace(a, b, c, dtype=torch.float64)


@dataclass
class ModelConfig:
    """Everything needed to rebuild a `SpectrumAutoencoder`.

    instrument: 'sdss' | 'boss' | 'desi', or a dict ``{name, start, step, L, loglinear}`` for a custom grid.
    n_latent: latent size S. z_max: largest redshift the restframe grid covers.
    conditioned: append z to the encoder MLP's input (the paper) or not (spender ≥ 0.3).
    activation: decoder activation, 'leakyrelu' (paper) or 'speculator' (spender; learnable γ, β per feature).
    dropout: dropout probability after each conv block's activation (0 disables it).
    fused_blocks: run InstanceNorm → PReLU → MaxPool of each conv block as the fused kernel op
        `fastspec.kernels.instance_norm_prelu_pool` (same function and parameters; less time and memory) or,
        if False, as the plain torch modules (for comparison).
    grid: 'fastspec' (float64 instrument grid, R = ceil(L·(1+z_max))) or 'spender' (spender's float32 grids,
        R = int(L·(1+z_max))). n_rest overrides R.
    rest_grid: the restframe grid's spacing (grid='fastspec' only). 'linear' (default): uniform in λ from
        λ_min/(1+z_max) to λ_max with R = ceil(L·(1+z_max))·oversample (spender's kind; at SDSS z_max 0.5 its
        1.16 Å pixels are coarser than the SDSS pixels blueward of 5,030 Å restframe, finer redward). 'log':
        uniform in log10 λ with the instrument's step divided by `oversample` (SDSS, z_max 0.5: R = 11363
        oversampled 2×, 5682 not). 'auto': 'log' for log-linear instruments (SDSS, BOSS), 'linear' for linear
        ones (DESI). Why linear is the default: the log grid oversampled 2× represents sharp lines far better —
        the round trip of noiseless mocks through it costs 0.012 noise variances per emission-line pixel at
        S/N 10 against 0.13 for the linear grid (bench/results/restgrid/) — but models trained on the 473 real
        DR14 spectra fit held-out galaxies worse with it (median χ² 1.47 vs 1.35 in one pass, 1.10 vs 1.07
        refined; two seeds each, bench/results/real/): its twice as many restframe pixels are each constrained
        by fewer data. Checkpoints written before this option existed load as 'linear'.
    oversample: restframe pixels per instrument pixel; None (default): 2 on a log grid, 1 on a linear one.
    """

    instrument: str | dict = "sdss"
    n_latent: int = 10
    z_max: float = 0.5
    conditioned: bool = True
    activation: str = "leakyrelu"
    dropout: float = 0.0
    grid: str = "fastspec"
    n_rest: int | None = None
    encoder_channels: tuple = (128, 256, 512)
    encoder_kernels: tuple = (5, 11, 21)
    encoder_pools: tuple = (5, 11)
    encoder_hidden: tuple = (128, 64, 32)
    decoder_hidden: tuple = (64, 256, 1024)
    leaky_slope: float = 0.01
    fused_blocks: bool = True
    rest_grid: str = "linear"
    oversample: int | None = None
    extra: dict = field(default_factory=dict)  # free-form notes (JSON), e.g. provenance of a converted model

    def __post_init__(self):
        for name in ("encoder_channels", "encoder_kernels", "encoder_pools", "encoder_hidden", "decoder_hidden"):
            val = getattr(self, name)
            try:
                val = tuple(int(v) for v in val)
            except (TypeError, ValueError) as err:
                raise ModelConfigError(f"ModelConfig.{name} must be a list of integers, got {val!r}") from err
            if any(v <= 0 for v in val):
                raise ModelConfigError(f"ModelConfig.{name} must hold positive integers, got {val!r}")
            setattr(self, name, val)
        if isinstance(self.instrument, Instrument):
            inst = self.instrument
            self.instrument = {"name": inst.name, "start": inst.start, "step": inst.step, "L": inst.L,
                               "loglinear": inst.loglinear}
        if isinstance(self.instrument, str):
            self.instrument = self.instrument.strip().lower()
        self.get_instrument()  # raises for unknown names / malformed dicts
        if not (isinstance(self.n_latent, int) and self.n_latent > 0):
            raise ModelConfigError(f"ModelConfig.n_latent must be a positive integer, got {self.n_latent!r}")
        if not (0.0 <= float(self.z_max) < 10.0):
            raise ModelConfigError(f"ModelConfig.z_max must be in [0, 10), got {self.z_max!r}")
        self.z_max = float(self.z_max)
        if self.activation not in ACTIVATIONS:
            raise ModelConfigError(f"ModelConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not (0.0 <= float(self.dropout) < 1.0):
            raise ModelConfigError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.fused_blocks, bool):
            raise ModelConfigError(f"ModelConfig.fused_blocks must be true or false, got {self.fused_blocks!r}")
        if self.rest_grid not in REST_GRIDS:
            raise ModelConfigError(f"ModelConfig.rest_grid must be one of {REST_GRIDS}, got {self.rest_grid!r}")
        if self.oversample is not None and not (isinstance(self.oversample, int) and 1 <= self.oversample <= 16):
            raise ModelConfigError(f"ModelConfig.oversample must be an integer in [1, 16] or None (auto), "
                                   f"got {self.oversample!r}")
        if self.grid not in GRIDS:
            raise ModelConfigError(f"ModelConfig.grid must be one of {GRIDS}, got {self.grid!r}")
        if self.grid == "spender" and not (isinstance(self.instrument, str) and self.instrument in _SPENDER_OBS):
            raise ModelConfigError(
                f"ModelConfig.grid='spender' needs instrument one of {tuple(_SPENDER_OBS)}, got {self.instrument!r}"
            )
        if self.n_rest is not None and not (isinstance(self.n_rest, int) and self.n_rest >= 2):
            raise ModelConfigError(f"ModelConfig.n_rest must be an integer ≥ 2 or None, got {self.n_rest!r}")
        if len(self.encoder_kernels) != len(self.encoder_channels):
            raise ModelConfigError("ModelConfig.encoder_kernels needs one kernel size per encoder channel count")
        if len(self.encoder_pools) != len(self.encoder_channels) - 1:
            raise ModelConfigError("ModelConfig.encoder_pools needs one pool size between consecutive conv blocks")
        if self.encoder_channels[-1] % 2:
            raise ModelConfigError("ModelConfig.encoder_channels[-1] must be even (split into values and keys)")
        # the encoder must leave at least one position for attention pooling
        T = self.get_instrument().L
        for p in self.encoder_pools:
            T = (T + 2 * (p // 2) - p) // p + 1
        if T < 1:
            raise ModelConfigError(f"ModelConfig.encoder_pools {self.encoder_pools} leave no positions to pool")

    # --- construction helpers -------------------------------------------------------------------------------
    @classmethod
    def spender(cls, instrument: str = "sdss", n_latent: int = 10, z_max: float = 0.5, **kw) -> ModelConfig:
        """The configuration of spender 0.3's `SpectrumAutoencoder` (unconditioned, Speculator, spender grids)."""
        kw.setdefault("conditioned", False)
        kw.setdefault("activation", "speculator")
        return cls(instrument=instrument, n_latent=n_latent, z_max=z_max, grid="spender", **kw)

    def get_instrument(self) -> Instrument:
        if isinstance(self.instrument, dict):
            d = self.instrument
            missing = {"name", "start", "step", "L", "loglinear"} - set(d)
            if missing:
                raise ModelConfigError(f"ModelConfig.instrument dict lacks {sorted(missing)}")
            return Instrument(str(d["name"]), float(d["start"]), float(d["step"]), int(d["L"]),
                              bool(d["loglinear"]))
        try:
            return get_instrument(self.instrument)
        except ValueError as err:
            raise ModelConfigError(f"ModelConfig.instrument: {err}") from err

    @property
    def n_obs(self) -> int:
        return self.get_instrument().L

    @property
    def rest_spacing(self) -> str:
        """'log' or 'linear': the restframe grid this config builds ('auto' resolved by the instrument)."""
        if self.grid == "spender":
            return "linear"
        if self.rest_grid == "auto":
            return "log" if self.get_instrument().loglinear else "linear"
        return self.rest_grid

    @property
    def n_restframe(self) -> int:
        if self.n_rest is not None:
            return self.n_rest
        L = self.n_obs
        if self.grid == "spender":
            return int(L * (1 + self.z_max))
        inst = self.get_instrument()
        if self.rest_spacing == "log":
            span = math.log10(inst.wave_max * (1.0 + self.z_max) / inst.wave_min)
            return int(math.ceil(span / self._log_step() - 1e-9)) + 1
        return inst.n_rest(self.z_max) * self.rest_oversample

    @property
    def rest_oversample(self) -> int:
        """Restframe pixels per instrument pixel ('oversample'; None resolved: 2 on a log grid, else 1)."""
        if self.oversample is not None:
            return self.oversample
        return 2 if self.rest_spacing == "log" else 1

    def _log_step(self) -> float:
        inst = self.get_instrument()
        # a linear instrument: the finest relative pixel size (at its red end)
        step = inst.step if inst.loglinear else inst.step / (inst.wave_max * math.log(10.0))
        return step / self.rest_oversample

    def grids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(wave_obs (L,), wave_rest (R,)) as float32 tensors, in Å."""
        R = self.n_restframe
        if self.grid == "spender":
            # as spender's training scripts build them (train/train_sdss.py)
            wave_obs = _spender_wave_obs(self.instrument)
            lo = wave_obs.min() / (1 + self.z_max)
            wave_rest = torch.linspace(lo, wave_obs.max(), R, dtype=torch.float32)
            return wave_obs.float(), wave_rest
        inst = self.get_instrument()
        wave_obs = inst.wave_obs
        lo = inst.wave_min / (1.0 + self.z_max)
        if self.rest_spacing == "log":
            # starts at λ_min/(1+z_max) and steps by the instrument's Δlog λ: covers λ_max with R pixels
            wave_rest = 10.0 ** (math.log10(lo) + self._log_step() * np.arange(R, dtype=np.float64))
        else:
            wave_rest = np.linspace(lo, inst.wave_max, R, dtype=np.float64)
        return torch.from_numpy(wave_obs).float(), torch.from_numpy(wave_rest).float()

    # --- (de)serialisation ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        if not isinstance(d, dict):
            raise ModelConfigError(f"model config must be a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ModelConfigError(f"unknown model config field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_saved(cls, d: dict) -> ModelConfig:
        """`from_dict` for a config read from a checkpoint: those written before the log-linear restframe grid
        existed hold no `rest_grid` and were built on the linear grid."""
        if not isinstance(d, dict):
            raise ModelConfigError(f"model config must be a dict, got {type(d).__name__}")
        return cls.from_dict({"rest_grid": "linear", **d})


# --- building blocks ---------------------------------------------------------------------------------------


class SpeculatorActivation(nn.Module):
    """`(γ + (1−γ)·sigmoid(β·x))·x` with learnable γ, β per feature (Alsing et al. 2020, eq. 8), +1 if plus_one.

    Initialised like spender's (standard normal γ and β).
    """

    def __init__(self, n_feature: int, plus_one: bool = False):
        super().__init__()
        self.plus_one = plus_one
        self.beta = nn.Parameter(torch.randn(n_feature))
        self.gamma = nn.Parameter(torch.randn(n_feature))

    def forward(self, x):
        x = (self.gamma + (1 - self.gamma) * torch.sigmoid(self.beta * x)) * x
        return x + 1 if self.plus_one else x

    def extra_repr(self) -> str:
        return f"{self.beta.numel()}, plus_one={self.plus_one}"


def _mlp(sizes, acts) -> nn.Sequential:
    """Linear layers between consecutive `sizes`, each followed by its activation (None = identity).

    Layer i sits at index 2i and its activation at 2i+1, a fixed pattern the spender key map relies on.
    """
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        layers.append(acts[i] if acts[i] is not None else nn.Identity())
    return nn.Sequential(*layers)


class ConvBlock(nn.Module):
    """Conv1d → InstanceNorm1d → PReLU (→ Dropout) (→ the encoder's MaxPool1d); padding k//2 keeps the length.

    fused: InstanceNorm, PReLU and the pooling run as one kernel op (`kernels.instance_norm_prelu_pool`),
    and a block on the spectrum itself (one input channel) includes its conv (`kernels.spectrum_conv_block`:
    on CPU the largest activation of the encoder is then never stored); with dropout active (training,
    p > 0) the op stops after the activation so that dropout still sits between activation and pooling. The
    modules (norm, act, drop) are kept either way: the parameters, their names and the unfused path are the
    same.
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int, dropout: float = 0.0, fused: bool = False):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2)
        self.norm = nn.InstanceNorm1d(c_out)
        self.act = nn.PReLU(c_out)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fused = fused

    @staticmethod
    def _fusable_pool(pool) -> tuple[int, int] | None:
        """(window, padding) of a MaxPool1d the fused op reproduces (stride = window, no dilation/ceil)."""
        if pool is None:
            return 1, 0
        k, s, p, d = (v[0] if isinstance(v, (tuple, list)) else v
                      for v in (pool.kernel_size, pool.stride, pool.padding, pool.dilation))
        if s != k or d != 1 or pool.ceil_mode or pool.return_indices:
            return None
        return int(k), int(p)

    def _plain_conv(self) -> bool:
        c = self.conv
        return (c.stride == (1,) and c.dilation == (1,) and c.groups == 1 and c.padding_mode == "zeros"
                and c.padding == (c.kernel_size[0] // 2,))

    def forward(self, x, pool: nn.MaxPool1d | None = None):
        dropping = self.training and isinstance(self.drop, nn.Dropout) and self.drop.p > 0
        fusable = self._fusable_pool(pool) if self.fused else None
        if fusable is not None and not dropping and self.conv.in_channels == 1 and self._plain_conv():
            return kernels.spectrum_conv_block(x[:, 0], self.conv.weight, self.conv.bias, self.act.weight,
                                               *fusable, eps=self.norm.eps)
        x = self.conv(x)
        if fusable is not None and not dropping:
            return kernels.instance_norm_prelu_pool(x, self.act.weight, *fusable, eps=self.norm.eps)
        if fusable is not None:
            x = kernels.instance_norm_prelu_pool(x, self.act.weight, eps=self.norm.eps)
        else:
            x = self.act(self.norm(x))
        x = self.drop(x)
        return pool(x) if pool is not None else x


class SpectrumEncoder(nn.Module):
    """Observed spectrum y (N, L) [and z (N,)] → latents s (N, S): conv blocks, attention pooling, MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.conditioned = cfg.conditioned
        self.n_latent = cfg.n_latent
        chans, ks = cfg.encoder_channels, cfg.encoder_kernels
        self.blocks = nn.ModuleList(
            ConvBlock(1 if i == 0 else chans[i - 1], chans[i], ks[i], cfg.dropout, fused=cfg.fused_blocks)
            for i in range(len(chans))
        )
        # padding p//2 as in spender: SDSS 3921 → 785 → 72 positions
        self.pools = nn.ModuleList(nn.MaxPool1d(p, padding=p // 2) for p in cfg.encoder_pools)
        self.n_feature = chans[-1] // 2
        sizes = [self.n_feature + int(cfg.conditioned), *cfg.encoder_hidden, cfg.n_latent]
        # last layer linear so that latents can centre on 0
        self.mlp = _mlp(sizes, [nn.PReLU(n) for n in cfg.encoder_hidden] + [None])

    def features(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Values h and attention keys k, each (N, C, T), from the conv blocks."""
        x = y.unsqueeze(1)
        for i, block in enumerate(self.blocks):
            x = block(x, self.pools[i] if i < len(self.pools) else None)
        h, k = torch.split(x, [self.n_feature, self.n_feature], dim=1)
        return h, k

    def pooled(self, y: torch.Tensor) -> torch.Tensor:
        """The attention-pooled features e (N, C) of y: everything of the encoder that does not see z."""
        h, k = self.features(y)
        return kernels.attention_pool(h, k)

    def head(self, e: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Latents (N, S) from pooled features e (N, C) [and z (N,)]. Split from `pooled` so that redshift
        fitting runs the convolutions once per spectrum and only this small MLP at each trial redshift."""
        if self.conditioned:
            if z is None:
                raise ValueError("this encoder is conditioned on the redshift: pass z (N,)")
            e = torch.cat([e, z.to(e.dtype).unsqueeze(1)], dim=1)
        return self.mlp(e)

    def forward(self, y: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.pooled(y), z)


class SpectrumDecoder(nn.Module):
    """Latents s (N, S) → restframe spectrum x (N, R): MLP S → 64 → 256 → 1024 → R."""

    def __init__(self, cfg: ModelConfig, n_rest: int):
        super().__init__()
        self.n_latent = cfg.n_latent
        hidden = cfg.decoder_hidden
        if cfg.activation == "speculator":
            acts = [SpeculatorActivation(n) for n in hidden] + [SpeculatorActivation(n_rest, plus_one=True)]
        else:
            # LeakyReLU after every layer, output included, as the paper's / spender's LeakyReLU decoder
            acts = [nn.LeakyReLU(cfg.leaky_slope) for _ in range(len(hidden) + 1)]
        self.mlp = _mlp([cfg.n_latent, *hidden, n_rest], acts)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.mlp(s)


# --- the autoencoder ---------------------------------------------------------------------------------------


class SpectrumAutoencoder(nn.Module):
    """Encoder → latents → restframe decoder → redshift-resample onto an observed grid.

    Buffers `wave_obs` (L,) and `wave_rest` (R,) are float32 wavelengths in Å; they stay float32 when the
    model is cast to half precision (a 16-bit grid would be off by several Å).
    """

    _GRID_BUFFERS = ("wave_obs", "wave_rest")

    def __init__(self, config: ModelConfig | dict | None = None, **overrides):
        super().__init__()
        if config is None:
            config = ModelConfig(**overrides)
        elif isinstance(config, dict):
            config = ModelConfig.from_dict({**config, **overrides})
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        wave_obs, wave_rest = config.grids()
        self.register_buffer("wave_obs", wave_obs)
        self.register_buffer("wave_rest", wave_rest)
        self.encoder = SpectrumEncoder(config)
        self.decoder = SpectrumDecoder(config, len(wave_rest))

    @property
    def n_latent(self) -> int:
        return self.config.n_latent

    @property
    def instrument(self) -> Instrument:
        return self.config.get_instrument()

    def _apply(self, fn, recurse=True):
        grids = {name: self._buffers[name] for name in self._GRID_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in grids.items():
            new = self._buffers[name]
            if new.dtype.itemsize < 4:  # keep wavelengths at ≥ 32 bits whatever the parameters become
                self._buffers[name] = old.to(device=new.device, dtype=torch.float32)
        return self

    # --- input checks (shapes only: value checks would synchronise the GPU on every batch) -------------------
    def _check_y(self, y, name="y"):
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (N, L), got {type(y).__name__}")
        L = self.wave_obs.shape[0]
        if y.ndim != 2 or y.shape[1] != L:
            raise ValueError(
                f"{name} has shape {tuple(y.shape)} but this model's {self.instrument.name} grid needs (N, {L})"
            )
        return y

    def as_redshifts(self, z, n: int, device, name="z") -> torch.Tensor:
        """z as a float32 tensor (n,) on `device`: a scalar is broadcast, spender's (n, 1) flattened."""
        z = torch.as_tensor(z, device=device)
        if z.ndim == 0:
            z = z.expand(n)
        elif z.ndim == 2 and z.shape[1] == 1:  # spender's (N, 1)
            z = z[:, 0]
        if z.ndim != 1 or z.shape[0] != n:
            raise ValueError(f"{name} must have shape ({n},) to match the batch, got {tuple(z.shape)}")
        return z.float().contiguous()

    # --- the model ---------------------------------------------------------------------------------------------
    def encode(self, y: torch.Tensor, z=None) -> torch.Tensor:
        """Latents (N, S) of normalised observed spectra y (N, L); z (N,) is used only if conditioned."""
        self._check_y(y)
        if self.config.conditioned:
            if z is None:
                raise ValueError("this model is conditioned on the redshift (config.conditioned): pass z")
            z = self.as_redshifts(z, y.shape[0], y.device)
        else:
            z = None
        return self.encoder(y, z)

    def decode(self, s: torch.Tensor) -> torch.Tensor:
        """Restframe spectra (N, R) on `wave_rest` from latents s (N, S)."""
        if s.ndim != 2 or s.shape[1] != self.n_latent:
            raise ValueError(f"latents must have shape (N, {self.n_latent}), got {tuple(s.shape)}")
        # Outside autocast, in the decoder's own dtype: bf16's 8-bit mantissa puts ~0.3% errors on the
        # restframe model, which at the S/N of bright galaxies (50-100) adds ~0.05 to χ²; the decoder costs
        # ~1% of a training step, the encoder's convolutions the rest.
        with torch.autocast(device_type=s.device.type, enabled=False):
            return self.decoder(s.to(self.decoder.mlp[0].weight.dtype))

    def _grid(self, wave_obs):
        if wave_obs is None:
            return self.wave_obs
        if isinstance(wave_obs, (str, Instrument)):
            wave_obs = get_instrument(wave_obs).wave_obs
        if isinstance(wave_obs, torch.Tensor):
            grid = wave_obs.detach().to(self.wave_rest.device)
        else:
            # numpy stays float64: the kernels take it as is and cache its description by content
            grid = np.asarray(wave_obs, dtype=np.float64)
        if grid.ndim != 1 or grid.shape[0] < 1:
            raise ValueError(f"wave_obs must be a 1-D wavelength grid, got shape {tuple(grid.shape)}")
        return grid

    def generate(self, s: torch.Tensor, z, wave_obs=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Spectra (N, M) and valid (N, M) bool of latents s at redshifts z on a grid.

        wave_obs: None (this model's instrument), an instrument name ('sdss', 'boss', 'desi') or any increasing
        wavelength array (Å). Pixels whose restframe wavelength falls outside `wave_rest` are 0 and not valid.
        """
        return self.redshift(self.decode(s), z, wave_obs)

    def redshift(self, x_rest: torch.Tensor, z, wave_obs=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Restframe spectra x_rest (N, R) on `wave_rest` moved to redshifts z and resampled onto a grid
        (`wave_obs` as in `generate`): spectra (N, M) and valid (N, M) bool."""
        z = self.as_redshifts(z, x_rest.shape[0], x_rest.device)
        return kernels.resample(x_rest, z, self.wave_rest, self._grid(wave_obs))

    def forward(self, y: torch.Tensor, z, s: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Observed-frame reconstruction ŷ (N, L) of y at redshifts z, and valid (N, L) bool."""
        self._check_y(y)
        z = self.as_redshifts(z, y.shape[0], y.device)
        if s is None:
            s = self.encode(y, z)
        return self.redshift(self.decode(s), z)

    def loss_terms(self, y: torch.Tensor, w: torch.Tensor, z, s: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ_l w·valid·(y−ŷ)², Σ_l w·valid) per spectrum (N,), both from one fused kernel call (ŷ is never
        materialised); the second carries no gradient."""
        self._check_y(y)
        self._check_y(w, "w")
        z = self.as_redshifts(z, y.shape[0], y.device)
        if s is None:
            s = self.encode(y, z)
        x = self.decode(s)
        return kernels.resample_loss(x, z, self.wave_rest, self.wave_obs, y, w, return_weight=True)

    def loss(self, y: torch.Tensor, w: torch.Tensor, z, kind: str = "paper",
             s: torch.Tensor | None = None, mean_weight: torch.Tensor | float | None = None) -> torch.Tensor:
        """Per-spectrum reconstruction loss (N,) whose mean over the batch is the training loss.

        kind='paper': eq. (1) of the paper, Σ_{n,l} w·valid·(y−ŷ)² / Σ_{n,l} w·valid with both sums over the
            whole batch, so every pixel counts by its inverse variance and a bright spectrum more than a faint
            one. Returned as χ²_n / w̄ with w̄ the batch's mean Σ_l w·valid (pass `mean_weight` to use the
            global batch's under data parallelism), so that loss.mean() is that ratio.
        kind='spectrum': Σ_l w·valid·(y−ŷ)² / Σ_l w·valid per spectrum (every spectrum counts the same;
            fastspec's 'paper' before 0.2). Both give 0 for a spectrum without valid weight.
        kind='spender': Σ ½·w·valid·(y−ŷ)² / L (spender's `_loss`, per spectrum).
        """
        if kind not in LOSS_KINDS:
            raise ValueError(f"loss kind must be one of {LOSS_KINDS}, got {kind!r}")
        chi2, wsum = self.loss_terms(y, w, z, s)
        tiny = torch.finfo(wsum.dtype).tiny
        if kind == "spender":
            return 0.5 * chi2 / y.shape[1]
        if kind == "spectrum":
            return chi2 / wsum.clamp_min(tiny)
        if mean_weight is None:
            mean_weight = wsum.mean()
        return chi2 / torch.as_tensor(mean_weight, dtype=chi2.dtype, device=chi2.device).clamp_min(tiny)

    def refine(self, y: torch.Tensor, w: torch.Tensor, z, **kw):
        """Each spectrum's latents (and z if fit_z=True) optimised through the frozen decoder; see
        `fastspec.fit.refine` for the options and what it returns."""
        return fit.refine(self, y, w, z, **kw)

    def fit_redshift(self, y: torch.Tensor, w: torch.Tensor, **kw):
        """Each spectrum's redshift (with uncertainty, χ² and a reliability Δχ²) from this model alone: a scan
        of χ²(z) over [0, z_max] and a joint refinement of latents and z; see `fastspec.redshift.fit_redshift`
        for the options and what it returns."""
        from .redshift import fit_redshift

        return fit_redshift(self, y, w, **kw)

    @torch.no_grad()
    def init_output(self, mean_rest, weight_scale: float = 0.1) -> None:
        """Start the decoder's output at a mean restframe spectrum (R,) on `wave_rest`.

        The last layer's bias becomes that spectrum (the Speculator output activation is made the identity
        at init, γ = 1, and the +1 is taken off), its weights are scaled by `weight_scale` so the latents
        start as small corrections around it. Training then spends no steps learning the mean: on real SDSS
        galaxies the held-out χ² after 600 steps fell from 2.1 to 1.55 (bench/results/recipe.md).
        """
        mean = torch.as_tensor(mean_rest, dtype=torch.float32)
        if mean.shape != self.wave_rest.shape:
            raise ValueError(f"mean restframe spectrum must have shape {tuple(self.wave_rest.shape)}, "
                             f"got {tuple(mean.shape)}")
        last = self.decoder.mlp[-2]
        act = self.decoder.mlp[-1]
        if isinstance(act, SpeculatorActivation):
            act.gamma.fill_(1.0)
            mean = mean - 1.0
        last.bias.copy_(mean.to(last.bias))
        last.weight.mul_(weight_scale)

    # --- checkpoints ---------------------------------------------------------------------------------------
    def save(self, path, extra: dict | None = None) -> Path:
        """Write config + state_dict (+ `extra`, e.g. optimizer state) to `path` atomically."""
        path = Path(path)
        payload = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "state_dict": OrderedDict((k, v.detach().cpu()) for k, v in self.state_dict().items()),
            "extra": extra if extra is not None else {},
        }
        with atomic_path(path) as tmp:  # synced: a checkpoint is what a long run leaves behind
            torch.save(payload, tmp)
        return path

    @classmethod
    def load(cls, path, map_location="cpu", return_extra: bool = False, weights_only: bool = True):
        """Rebuild a model from a checkpoint written by `save` (returns (model, extra) if return_extra)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such model checkpoint")
        try:
            payload = torch.load(path, map_location=map_location, weights_only=weights_only)
        except Exception as err:
            hint = " (if you trust the file, pass weights_only=False)" if weights_only else ""
            raise ModelConfigError(f"{path}: cannot read model checkpoint: {err}{hint}") from err
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise ModelConfigError(f"{path}: not a fastspec model checkpoint (field 'format' missing or wrong)")
        if payload.get("format_version", 0) > CHECKPOINT_VERSION:
            raise ModelConfigError(f"{path}: checkpoint format_version {payload['format_version']} is newer than "
                                   f"this fastspec understands ({CHECKPOINT_VERSION})")
        for key in ("config", "state_dict"):
            if key not in payload:
                raise ModelConfigError(f"{path}: checkpoint lacks field {key!r}")
        try:
            model = cls(ModelConfig.from_saved(payload["config"]))
        except ModelConfigError as err:
            raise ModelConfigError(f"{path}: field 'config': {err}") from err
        try:
            model.load_state_dict(payload["state_dict"])
        except RuntimeError as err:
            raise ModelConfigError(f"{path}: field 'state_dict' does not fit its config: {err}") from err
        if isinstance(map_location, (str, torch.device)):
            model.to(map_location)
        return (model, payload.get("extra", {})) if return_extra else model

    # --- spender compatibility -----------------------------------------------------------------------------
    @classmethod
    def from_spender(cls, state_dict, instrument: str = "sdss", z_max: float | None = None,
                     **config_overrides) -> SpectrumAutoencoder:
        """A model with the weights of a spender `SpectrumAutoencoder.state_dict()` (or a path to a file
        holding one, or spender's checkpoint dict with key 'model').

        Architecture (latent size, activation, z-conditioning of legacy models with 257 encoder inputs,
        restframe size) is read off the weights; the grids are spender's for `instrument`, with z_max read
        off the stored `decoder.wave_rest` unless given. The stored grids are loaded as they are.
        """
        if isinstance(state_dict, (str, Path)):
            state_dict = torch.load(state_dict, map_location="cpu", weights_only=True)
        if isinstance(state_dict, dict) and "model" in state_dict and not any(
                k.startswith("encoder.") for k in state_dict):
            state_dict = state_dict["model"]
            if isinstance(state_dict, (list, tuple)):
                state_dict = state_dict[0]
        sd = spender_to_fastspec_state_dict(state_dict)
        wave_rest = sd["wave_rest"]
        if z_max is None:
            wave_obs0 = _spender_wave_obs(instrument)[0].item()
            z_max = round(wave_obs0 / float(wave_rest[0]) - 1.0, 4)
        def linear_sizes(part):
            idx = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(part + r"\.mlp\.(\d+)\.weight", k))
                         and int(m.group(1)) % 2 == 0)
            return [tuple(sd[f"{part}.mlp.{i}.weight"].shape) for i in idx]

        enc, dec = linear_sizes("encoder"), linear_sizes("decoder")
        n_feature = sd["encoder.blocks.2.conv.weight"].shape[0] // 2
        cfg_kw = dict(
            n_latent=int(dec[0][1]),
            conditioned=int(enc[0][1]) == n_feature + 1,
            activation="speculator" if "decoder.mlp.1.beta" in sd else "leakyrelu",
            n_rest=int(wave_rest.shape[0]),
            encoder_hidden=tuple(int(o) for o, _ in enc[:-1]),
            decoder_hidden=tuple(int(o) for o, _ in dec[:-1]),
        )
        cfg_kw.update(config_overrides)
        cfg = ModelConfig.spender(instrument=instrument, z_max=z_max, **cfg_kw)
        model = cls(cfg)
        for name in cls._GRID_BUFFERS:
            if name in sd:
                ours = getattr(model, name)
                if sd[name].shape != ours.shape:
                    raise ModelConfigError(f"spender state_dict: {name} has {sd[name].shape[0]} pixels, "
                                           f"the {instrument} spender grid {ours.shape[0]}")
                if not torch.allclose(sd[name].double(), ours.double(), rtol=0, atol=1e-3):
                    warnings.warn(f"spender state_dict: stored {name} differs from spender's {instrument} grid "
                                  f"for z_max={z_max}; using the stored one", stacklevel=2)
            else:
                sd[name] = getattr(model, name)
        model.load_state_dict(sd)
        return model

    def to_spender_state_dict(self) -> OrderedDict:
        """This model's weights under spender 0.3's parameter names (inverse of `from_spender`'s key map)."""
        return fastspec_to_spender_state_dict(self.state_dict())


# --- spender key map ---------------------------------------------------------------------------------------
# spender's MLP puts Linear, activation and a dummy Identity at 3i, 3i+1, 3i+2; ours Linear, activation at 2i,
# 2i+1. spender's conv blocks are Sequential(conv, norm, prelu); ours name them.
_CONV_PART = {"0": "conv", "2": "act"}
_CONV_PART_INV = {v: k for k, v in _CONV_PART.items()}


def spender_to_fastspec_state_dict(state_dict) -> OrderedDict:
    """Rename a spender 0.3 `SpectrumAutoencoder` state_dict to fastspec's names."""
    out = OrderedDict()
    unknown = []
    for key, val in state_dict.items():
        key = key.replace("encoder.mlp.mlp.", "encoder.mlp.")  # older spender: MLP wrapped once more
        if key == "decoder.wave_rest":
            out["wave_rest"] = val
        elif key == "encoder.instrument.wave_obs":
            out["wave_obs"] = val
        elif key.startswith("encoder.instrument.lsf"):
            raise ModelConfigError("spender state_dict has a line-spread function (encoder.instrument.lsf); "
                                   "fastspec models do not convolve with an LSF")
        elif key.startswith("encoder.instrument."):
            continue  # e.g. skyline_mask: data preparation, not model state
        elif m := re.fullmatch(r"encoder\.conv(\d)\.(\d)\.(\w+)", key):
            if m.group(2) not in _CONV_PART:
                unknown.append(key)
                continue
            out[f"encoder.blocks.{int(m.group(1)) - 1}.{_CONV_PART[m.group(2)]}.{m.group(3)}"] = val
        elif m := re.fullmatch(r"(encoder|decoder)\.mlp\.(\d+)\.(\w+)", key):
            i, r = divmod(int(m.group(2)), 3)
            if r == 2:
                unknown.append(key)
                continue
            out[f"{m.group(1)}.mlp.{2 * i + r}.{m.group(3)}"] = val
        else:
            unknown.append(key)
    if unknown:
        raise ModelConfigError(f"spender state_dict has keys fastspec cannot map: {unknown}")
    for need in ("wave_rest", "decoder.mlp.0.weight", "encoder.mlp.0.weight", "encoder.blocks.2.conv.weight"):
        if need not in out:
            raise ModelConfigError(f"spender state_dict lacks the weights for {need!r}")
    return out


def fastspec_to_spender_state_dict(state_dict) -> OrderedDict:
    """Rename a fastspec state_dict to spender 0.3's names (the inverse of `spender_to_fastspec_state_dict`)."""
    out = OrderedDict()
    for key, val in state_dict.items():
        if key == "wave_rest":
            out["decoder.wave_rest"] = val
        elif key == "wave_obs":
            out["encoder.instrument.wave_obs"] = val
        elif m := re.fullmatch(r"encoder\.blocks\.(\d+)\.(\w+)\.(\w+)", key):
            if m.group(2) not in _CONV_PART_INV:
                raise ModelConfigError(f"fastspec key {key!r} has no spender counterpart")
            out[f"encoder.conv{int(m.group(1)) + 1}.{_CONV_PART_INV[m.group(2)]}.{m.group(3)}"] = val
        elif m := re.fullmatch(r"(encoder|decoder)\.mlp\.(\d+)\.(\w+)", key):
            i, r = divmod(int(m.group(2)), 2)
            out[f"{m.group(1)}.mlp.{3 * i + r}.{m.group(3)}"] = val
        else:
            raise ModelConfigError(f"fastspec key {key!r} has no spender counterpart")
    return out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_model(path, device="cpu") -> SpectrumAutoencoder:
    """A trained model from a checkpoint written by `SpectrumAutoencoder.save` (final.pt / best.pt of a
    training run) on `device`, in eval mode: what encoding and reports start from."""
    return SpectrumAutoencoder.load(path, map_location=device).eval()


__all__ = [
    "ModelConfig", "ModelConfigError", "SpectrumAutoencoder", "SpectrumEncoder", "SpectrumDecoder",
    "SpeculatorActivation", "ConvBlock", "spender_to_fastspec_state_dict", "fastspec_to_spender_state_dict",
    "count_parameters", "load_model",
]
