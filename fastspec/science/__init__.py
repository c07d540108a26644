"""Science checks: does fastspec reproduce what Melchior, Hahn & Liang 2022 report? (issue 6)

Mock spectra carry their ground truth (fastspec.mock), so each finding of the paper becomes a number:

1. fidelity — reduced χ² of held-out mock spectra under AE-S (S latents) against a weighted restframe PCA
   with S components fitted to the same training spectra, and the model error against the noiseless truth
   in units of the noise ("residuals below the noise"); with its learning curve and where in the spectrum
   each model loses;
2. extended restframe — for galaxies whose [O II] 3727 lies blueward of the observed range, the [O II] flux
   of the restframe model against the true one;
3. redshift invariance — held-out spectra moved to z = 0 … z_max (fastspec.augment.redshift_augment), the
   latent displacement relative to the sample's latent spread, for models trained (a) without augmentation,
   (b) with redshift augmentation, (c) with augmentation and consistency regularisation;
4. latents carry the physics — held-out R² of simple regressors (kNN, quadratic ridge) from latents to the
   true mixture weights, line strengths, velocity dispersion and dust;
5. real spectra — reduced χ² of the bundled real SDSS spectra under the mock-trained models.

`run(ScienceConfig.for_mode("quick"))` does everything (mocks → training → experiments → figures → JSON and
Markdown); `fastspec science` (and bench/science.py) is its command line. Models and mocks are cached in a work
directory, so a rerun with the same configuration only redoes the analysis.

Modules: config (modes, variants), data (mock, moved and real spectra), baselines (weighted PCA, regressors),
stats, training (train, load, encode the variants), labels (names, colours, number formats), context (what the
runner hands each experiment), experiments/ (one module per experiment, listed in EXPERIMENTS), page (the
Markdown) and runner (run).
"""
from .baselines import PCABaseline, WeightedPCA, crossfit_r2, knn_predict, quadratic_features, ridge_predict
from .config import MODES, QUICK_MODEL, TINY_MODEL, VARIANTS, ScienceConfig
from .context import Context, Experiment
from .data import median_snr, mock_set, moved_copies, observed_arrays, real_sdss_files, real_set
from .experiments import EXPERIMENTS
from .experiments.extended_restframe import OII_SIDEBANDS, OII_WINDOW, line_flux
from .experiments.fidelity_by_wavelength import LINE_HALF_WIDTH
from .experiments.latent_physics import LINE_SOFTENING, LINE_TARGETS, physics_targets
from .experiments.redshift_invariance import cross_chi2
from .labels import COLORS
from .page import CAVEATS, findings, markdown
from .runner import run
from .stats import bootstrap_ci, chi2_summary, latent_displacement, nmad, pearson, r2_score, signal_error
from .training import curve_steps, load_variant, train_variant

__all__ = [
    "CAVEATS", "COLORS", "EXPERIMENTS", "LINE_HALF_WIDTH", "LINE_SOFTENING", "LINE_TARGETS", "MODES",
    "OII_SIDEBANDS", "OII_WINDOW", "QUICK_MODEL", "TINY_MODEL", "VARIANTS", "Context", "Experiment", "PCABaseline",
    "ScienceConfig", "WeightedPCA", "bootstrap_ci", "chi2_summary", "cross_chi2", "crossfit_r2", "curve_steps",
    "findings", "knn_predict", "latent_displacement", "line_flux", "load_variant", "markdown", "median_snr",
    "mock_set", "moved_copies", "nmad", "observed_arrays", "pearson", "physics_targets", "quadratic_features",
    "r2_score", "real_sdss_files", "real_set", "ridge_predict", "run", "signal_error", "train_variant",
]
