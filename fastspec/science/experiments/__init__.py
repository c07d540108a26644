"""The experiments of a science run, in the order they run and appear in the findings and on the Markdown page.

Each module measures one thing and exports EXPERIMENT (fastspec.science.context.Experiment): its numbers and
figures from the run's Context, its findings and its section of the page from the results. Adding an experiment
is adding a module here and its EXPERIMENT to the list.
"""
from . import (
    extended_restframe,
    fidelity,
    fidelity_by_wavelength,
    latent_physics,
    learning_curve,
    method_scan,
    real_heldout,
    real_spectra,
    redshift_invariance,
)

EXPERIMENTS = [
    fidelity.EXPERIMENT,
    method_scan.EXPERIMENT,
    learning_curve.EXPERIMENT,
    fidelity_by_wavelength.EXPERIMENT,
    extended_restframe.EXPERIMENT,
    redshift_invariance.EXPERIMENT,
    latent_physics.EXPERIMENT,
    real_spectra.EXPERIMENT,
    real_heldout.EXPERIMENT,
]

__all__ = ["EXPERIMENTS"]
