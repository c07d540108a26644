"""Configuration of a science run: the modes (smoke, quick, full) with their sizes, the model each trains, and
the training variants (a) no augmentation, (b) redshift augmentation, (c) augmentation + consistency (spender
0.3's σ), (d) augmentation + whitened consistency."""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field

import numpy as np

# The paper's encoder has 128/256/512 channels; a CPU trains that at ~20 spectra/s, so the quick mode keeps the
# layout (kernels, pools, attention, MLPs, decoder to the full restframe grid) with 8x fewer channels.
QUICK_MODEL = dict(encoder_channels=(16, 32, 64))
TINY_MODEL = dict(encoder_channels=(4, 8, 16), encoder_hidden=(16, 8, 8), decoder_hidden=(16, 32, 64))

VARIANTS = {
    "a": dict(augment=False, consistency=0.0, label="(a) no augmentation"),
    "b": dict(augment=True, consistency=0.0, label="(b) redshift augmentation"),
    "c": dict(augment=True, consistency=None, label="(c) augmentation + consistency"),  # None: cfg weight
    # (c)'s penalty scales latent distances by the batch's mean variance (spender 0.3), which stretching one
    # direction inflates; (d) whitens them with the batch covariance (fastspec.losses.consistency_loss). A
    # per-dimension σ was tried first and failed: the stretched direction is a rotated one.
    "d": dict(augment=True, consistency=None, consistency_sigma="whiten",
              label="(d) augmentation + whitened consistency"),
}

MODES = {
    # seconds on a laptop: for tests of the experiment code, numbers mean nothing
    "smoke": dict(n_train=320, n_test=96, n_lowz=64, n_invariance=8, n_pca_fit=256, pca_iter=4, pca_scan=(2,),
                  s_scan=(2,), n_refine=32, real_steps=4, steps=4, batch_size=32, lr=2e-3, model=TINY_MODEL,
                  invariance_z=(0.0, 0.25, 0.5)),
    # < 20 min on an idle 2-core CPU with every training (14 on mocks, 2 on real galaxies): bf16 autocast (it
    # reaches the fp32 loss at half the step time), 1200 steps each (1000 on the real galaxies) and latents
    # refined for the first 500 held-out spectra; science-quick.md gives each phase's time.
    "quick": dict(n_train=12000, n_test=2000, n_lowz=800, n_invariance=150, n_pca_fit=4000, pca_iter=25,
                  steps=1200, batch_size=64, lr=4e-3, precision="bf16", model=QUICK_MODEL, n_refine=500,
                  real_steps=1000),
    # a GPU: the paper's architecture, ~100 epochs of 100k spectra
    "full": dict(n_train=100_000, n_test=10_000, n_lowz=4000, n_invariance=1000, n_pca_fit=20_000, pca_iter=30,
                 steps=40_000, batch_size=256, lr=1e-3, model={}, precision="bf16", num_workers=4),
}


@dataclass
class ScienceConfig:
    """One science run. `for_mode` fills the sizes; fields can be overridden."""

    mode: str = "quick"
    n_train: int = 12000
    n_test: int = 2000
    # uniform in lowz_range; experiments/extended_restframe.py counts [O II] unobserved below z ≈ 0.0078
    # (λ_obs,min/(1+z) > 3755 Å, the window's red edge + 5 Å) and observed above z ≈ 0.030 (< 3675 Å, the blue
    # sideband's blue edge − 5 Å)
    n_lowz: int = 800
    lowz_range: tuple = (0.002, 0.035)
    n_invariance: int = 150
    invariance_z: tuple = tuple(np.round(np.linspace(0.0, 0.5, 11), 3))
    invariance_z_native_max: float = 0.15
    n_latent: int = 10
    model: dict = field(default_factory=lambda: dict(QUICK_MODEL))
    steps: int = 3200
    batch_size: int = 64
    lr: float = 4e-3
    precision: str = "bf16"
    consistency: float = 0.1
    variants: tuple = ("a", "b", "c", "d")
    n_seeds: int = 2  # trainings per variant (seeds seed, seed+1, …): the spread between them is reported
    s_scan: tuple = (2, 4, 6)  # latent sizes besides n_latent, trained for scan_variant (each with n_seeds seeds)
    scan_variant: str = "a"
    mock_features: str = "rich"  # fastspec.mockvar: 'rich' (all features), 'basic' (template mixture), or a list
    n_pca_fit: int = 4000
    pca_iter: int = 25
    pca_scan: tuple = (2, 4, 6, 8, 12, 16, 20)  # other PCA ranks: how many dimensions the mocks need
    curve_fractions: tuple = (0.1, 0.25, 0.5, 0.75)  # learning-curve snapshots, as fractions of the steps
    refine_steps: int = 100  # fidelity also with each spectrum's latents refined (fastspec.fit.refine); 0: off
    n_refine: int = 1000  # held-out spectra refined for every run of the S/seed scan (the first n_refine)
    n_curve: int = 500  # held-out spectra the learning curve is measured on (the first n_curve of the test set)
    seed: int = 1
    device: str = "cpu"
    num_workers: int = 0
    workdir: str = "/tmp/fastspec-science"
    out_dir: str = "bench/results"
    real_dir: str | None = None
    real_dr14: str | None = None  # ../shared/data/real/sdss-dr14: AE vs PCA trained on real galaxies (if given)
    real_steps: int = 1500  # training steps of the real-data AE (QUICK_MODEL on ~470 spectra)
    progress: bool = True

    @classmethod
    def for_mode(cls, mode: str, **overrides) -> ScienceConfig:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        kw = {**MODES[mode], **overrides}
        return cls(mode=mode, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def say(cfg, msg: str) -> None:
    """One progress line on stderr, unless the run is quiet."""
    if cfg.progress:
        print(f"science: {msg}", file=sys.stderr, flush=True)
