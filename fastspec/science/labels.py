"""How the science pages name and show things: each model's label and colour (the same in every figure and
table) and the number formats of the Markdown."""
from __future__ import annotations

import math

from .config import VARIANTS

COLORS = {"ae_a": "tab:blue", "ae_b": "tab:orange", "ae_c": "tab:green", "ae_d": "tab:red", "pca": "tab:purple",
          "ae_a_refined": "navy", "ae_b_refined": "saddlebrown", "ae_c_refined": "darkgreen",
          "ae_d_refined": "darkred",
          "pca_every_pixel": "tab:pink", "oii_oracle": "0.2", "oii_lines": "tab:olive",
          "truth_model": "0.4"}


def label(name: str) -> str:
    """What tables and legends call a model: its variant's label (refined latents marked), or the baseline's."""
    if name.startswith("ae_") and name.endswith("_refined"):
        return f"AE {VARIANTS[name[3:-8]]['label']}, refined latents"
    if name.startswith("ae_"):
        return f"AE {VARIANTS[name[3:]]['label']}"
    return {"pca": "weighted restframe PCA", "truth_model": "noiseless truth (perfect model)",
            "pca_every_pixel": "weighted PCA fitted on every pixel",
            "oii_oracle": "oracle ceiling: the mocks' [O II] relation on the true class, Hβ, [N II]/Hα, dust",
            "oii_lines": "trivial baseline: Hβ, Hα, [N II] measured on the spectrum + the mocks' relation",
            }.get(name, name)


def fmt(v, spec=".3g") -> str:
    """`v` formatted by `spec`; an em dash for a missing or non-finite number."""
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def ci(interval, spec=".3g") -> str:
    """'[lo, hi]' for a 68% interval, '' when there is none."""
    if not interval or interval[0] is None:
        return ""
    return f"[{fmt(interval[0], spec)}, {fmt(interval[1], spec)}]"
