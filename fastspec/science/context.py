"""What the runner and the experiments agree on: the Context every experiment reads (the run's data sets, trained
variants, PCA baseline and encodings, made once) and the Experiment record each experiment module exports."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import numpy as np

from .baselines import PCABaseline
from .config import ScienceConfig
from .data import median_snr


@dataclass
class Context:
    """The inputs of every experiment of one run."""

    cfg: ScienceConfig
    fig_dir: str  # where the figures go (<out_dir>/science-<mode>/)
    budget: str  # the training budget in words, for figure titles
    wave_obs: np.ndarray  # the SDSS observed grid
    wave_rest: np.ndarray  # the models' restframe grid
    test: dict  # held-out mocks (data.mock_set)
    lowz: dict  # low-z mocks with restframe truth only
    models: dict  # variant letter -> trained model
    training: dict  # "ae_<v>" -> training summary
    baseline: PCABaseline
    inv_idx: np.ndarray  # rows of `test` moved in redshift (data.invariance_sample)
    moved: dict  # those rows at every z of cfg.invariance_z, K = len(cfg.invariance_z) consecutive rows each
    enc: dict  # training.encode_variants: "test", "refined", "lowz", "moved" -> {model name: encoding}
    scan: dict = field(default_factory=dict)  # training.scan_encodings: every run's held-out χ² (S/seed scan)

    @property
    def main(self) -> str:
        """The first variant: the one whose example spectra the figures show."""
        return f"ae_{self.cfg.variants[0]}"

    @cached_property
    def test_snr(self) -> np.ndarray:
        """Median S/N per pixel of each held-out spectrum."""
        return median_snr(self.test["y"], self.test["w"])

    def figure(self, name: str) -> str:
        """The path of figure `name`."""
        return os.path.join(self.fig_dir, f"{name}.png")


def _always(cfg: ScienceConfig) -> bool:
    return True


@dataclass(frozen=True)
class Experiment:
    """One experiment, as its module exports it (`EXPERIMENT`) to the runner, the findings and the Markdown page.

    run(ctx) -> (numbers, figures): the JSON-ready results, stored under `key`, and {figure name: path};
    findings(r) -> its sentences of the Findings list; markdown(r) -> the lines of its section. Both read the
    results dict `r` alone (so `--markdown-only` rebuilds the page from the JSON) and are called only when `key`
    is in it. enabled(cfg): whether this run measures it; phase: the timings entry (<phase>_s, <phase>_cpu_s)
    its time counts toward. claims(r): the paper's claims it tests, each {claim, measured, verdict} with verdict
    'reproduced', 'not reproduced' or 'inconclusive' decided over the seeds.
    """

    key: str
    run: Callable[[Context], tuple[dict, dict]]
    findings: Callable[[dict], list[str]]
    markdown: Callable[[dict], list[str]]
    phase: str = "analysis"
    enabled: Callable[[ScienceConfig], bool] = _always
    claims: Callable[[dict], list[dict]] | None = None  # the paper's claims it tests: {claim, measured, verdict}
