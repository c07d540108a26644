"""What every fastspec figure shares: matplotlib without a display, one house style, atomic PNG files, and the
choice of which example spectra a figure shows. Used by training (loss.png), reports and the science checks.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import atomic_path

STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
         "figure.dpi": 110, "savefig.dpi": 110}


def pyplot(style: bool = True):
    """matplotlib.pyplot on the Agg backend (no display needed), with the report style if `style`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if style:
        plt.rcParams.update(STYLE)
    return plt


def save_figure(fig, path, **savefig_kw) -> str:
    """Write `fig` to `path` atomically (format from its suffix, tight bounding box unless given) and close it.

    Not synced to disk: a figure is cheap to make again."""
    savefig_kw.setdefault("bbox_inches", "tight")
    savefig_kw.setdefault("format", Path(path).suffix.lstrip(".") or "png")
    with atomic_path(path, sync=False) as tmp:
        fig.savefig(tmp, **savefig_kw)
    pyplot(style=False).close(fig)
    return str(path)


def pick_examples(z, chi2, k: int) -> list[int]:
    """k spectra spread over the redshift range (quantiles), each the median-χ² one among its neighbours."""
    order = np.argsort(z)
    picks = []
    for q in np.linspace(0.1, 0.9, k) if k > 1 else [0.5]:
        lo, hi = int(q * len(z)) - 10, int(q * len(z)) + 10
        cand = order[max(lo, 0): max(hi, 1)]
        c = chi2[cand]
        c = np.where(np.isfinite(c), c, np.inf)
        i = int(cand[np.argsort(c)[len(cand) // 2]])
        if i not in picks:
            picks.append(i)
    return picks


__all__ = ["STYLE", "pyplot", "save_figure", "pick_examples"]
