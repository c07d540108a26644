"""Experiment 2, extended restframe: the [O II] flux the restframe models give galaxies whose [O II] lies blueward
of the observed range, against the truth (with a control group where it is observed)."""
from __future__ import annotations

import textwrap

import numpy as np

from ...mock import LINE_NAMES, LINE_WAVE, OII_RATIO, calzetti_k
from ...mockvar import oii_relation
from ...plotting import pyplot, save_figure
from ..context import Context, Experiment
from ..labels import COLORS, ci, fmt, label
from ..stats import bootstrap_ci, nmad, pearson, r2_score

# [O II] 3727,3729 flux: continuum-subtracted integral over LINE, continuum a straight line through the
# medians of the two sidebands (restframe vacuum Å).
OII_WINDOW = (3708.0, 3750.0)
OII_SIDEBANDS = ((3680.0, 3705.0), (3753.0, 3780.0))


def line_flux(wave, spec, window=OII_WINDOW, sidebands=OII_SIDEBANDS) -> np.ndarray:
    """Continuum-subtracted line flux ∫(f − c) dλ over `window` (trapezoids), c a straight line through the
    medians of the two sidebands; wave (R,) restframe Å, spec (N, R)."""
    wave = np.asarray(wave, np.float64)
    spec = np.asarray(spec, np.float64)
    centres, levels = [], []
    for lo, hi in sidebands:
        sel = (wave >= lo) & (wave <= hi)
        if sel.sum() < 3:
            raise ValueError(f"sideband {lo}–{hi} Å holds {sel.sum()} pixels of the grid {wave[0]:.0f}–{wave[-1]:.0f} Å")
        centres.append(0.5 * (lo + hi))
        levels.append(np.median(spec[:, sel], axis=1))
    slope = (levels[1] - levels[0]) / (centres[1] - centres[0])
    sel = (wave >= window[0]) & (wave <= window[1])
    lam = wave[sel]
    cont = levels[0][:, None] + slope[:, None] * (lam[None, :] - centres[0])
    return np.trapezoid(spec[:, sel] - cont, lam, axis=1)


# Lines measured on the observed spectrum for the trivial baseline: window and sidebands (restframe vacuum Å).
BASELINE_LINES = {"Hbeta": ((4852.0, 4874.0), ((4815.0, 4840.0), (4885.0, 4910.0))),
                  "Halpha": ((6557.0, 6572.0), ((6480.0, 6530.0), (6600.0, 6650.0))),
                  "NII_6584": ((6577.0, 6593.0), ((6480.0, 6530.0), (6600.0, 6650.0)))}


def oracle_prediction(lowz: dict) -> np.ndarray:
    """The ceiling: [O II] as the mocks' own relation predicts it from the truth (fastspec.mockvar.oii_relation) —
    the galaxy's class, its true Hβ and [N II]/Hα, its dust, and the mean of the lognormal scatter the relation
    draws with. What is left is that scatter, drawn independently of everything else the galaxy shows: no model
    of the spectrum can predict it."""
    lf = lowz["truth/line_flux"].astype(np.float64)
    ebv = lowz["truth/ebv"].astype(np.float64)
    k = calzetti_k(np.asarray(LINE_WAVE, np.float64))
    j = {n: LINE_NAMES.index(n) for n in ("Hbeta", "Halpha", "NII_6584", "OII_3726", "OII_3729")}
    intrinsic = {n: lf[:, i] * 10.0 ** (0.4 * k[i] * ebv) for n, i in j.items()}  # undo the dust
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.log10(intrinsic["NII_6584"] / intrinsic["Halpha"])
    # basic mocks store no class: star-forming or LINER-like, by the quiescent flag
    cls = lowz["truth/line_class"] if "truth/line_class" in lowz else np.where(lowz["truth/quiescent"], 3, 0)
    median, scatter = oii_relation(cls, np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0))
    oii = intrinsic["Hbeta"] * 10.0 ** median * np.exp(0.5 * (scatter * np.log(10.0)) ** 2)
    r = OII_RATIO  # 3729 / 3726
    att = (r * 10.0 ** (-0.4 * k[j["OII_3729"]] * ebv) + 10.0 ** (-0.4 * k[j["OII_3726"]] * ebv)) / (1 + r)
    return oii * att


def line_baseline(lowz: dict, wave_obs, wave_rest) -> np.ndarray:
    """The trivial baseline: Hβ, Hα and [N II] 6584 measured on the observed (noisy) spectrum, then the star-forming
    relation the mocks draw [O II] from, log [O II]/Hβ = 0.35 − 0.5 (log [N II]/Hα + 0.45), without dust."""
    wave_obs = np.asarray(wave_obs, np.float64)
    rest = np.empty((len(lowz["z"]), len(wave_rest)))
    for i, (y, w, z) in enumerate(zip(lowz["y"], lowz["w"], lowz["z"])):
        ok = w > 0
        rest[i] = np.interp(wave_rest, wave_obs[ok] / (1 + z), y[ok])
    f = {k: line_flux(wave_rest, rest, win, side) for k, (win, side) in BASELINE_LINES.items()}
    x = np.log10(np.clip(f["NII_6584"], 1e-3, None) / np.clip(f["Halpha"], 1e-3, None))
    return np.clip(f["Hbeta"], 0, None) * 10.0 ** (0.35 - 0.5 * (np.clip(x, -1.5, 0.5) + 0.45))


def _agreement(pred, ref) -> dict:
    d = pred - ref
    n = len(d)
    return {
        "pearson_r": pearson(pred, ref),
        "pearson_r_ci68": bootstrap_ci(pearson, pred, ref),
        "spearman_r": pearson(np.argsort(np.argsort(pred)), np.argsort(np.argsort(ref))) if n > 2 else None,
        "r2": float(r2_score(ref[:, None], pred[:, None])[0]) if n > 2 else None,
        "bias_median": float(np.median(d)) if n else None,
        "scatter_nmad": nmad(d),
        "rms": float(np.sqrt(np.mean(d**2))) if n else None,
    }


def measure(rest_models: dict, lowz: dict, wave_rest: np.ndarray, wave_obs_min: float,
            predictions: dict | None = None) -> tuple[dict, dict]:
    """[O II] flux of the restframe models for galaxies with [O II] unobserved / observed.

    The reference is the same measurement on the noiseless true restframe spectrum (so the measurement's own
    systematics, e.g. Balmer absorption in the window, cancel); agreement with the catalogue line flux is
    reported too, and the measurement on the true spectrum against the catalogue gives the method's floor.
    predictions: other [O II] predictors ({name: flux}, e.g. the oracle and the line baseline), scored alike."""
    lf = lowz["truth/line_flux"]
    catalogue = (lf[:, LINE_NAMES.index("OII_3726")] + lf[:, LINE_NAMES.index("OII_3729")]).astype(np.float64)
    rest_lo = wave_obs_min / (1 + lowz["z"])  # bluest restframe wavelength observed
    groups = {"unobserved": rest_lo > OII_WINDOW[1] + 5, "observed": rest_lo < OII_SIDEBANDS[0][0] - 5}
    ref = line_flux(lowz["wave_rest_truth"], lowz["truth/spec_rest"])
    out = {"definition": f"[O II] 3727+3729 flux, ∫(f − continuum) dλ over {OII_WINDOW[0]:.0f}–{OII_WINDOW[1]:.0f} Å "
                         f"restframe, continuum a line through the sideband medians {OII_SIDEBANDS}; units: stored "
                         "flux × Å; reference: the same measurement on the noiseless true restframe spectrum",
           "unobserved_means": f"λ_obs,min/(1+z) > {OII_WINDOW[1] + 5:.0f} Å (the whole [O II] window is unseen)",
           "n": {g: int(m.sum()) for g, m in groups.items()},
           "reference_spread_nmad": {g: nmad(ref[m]) for g, m in groups.items()},
           "reference_std": {g: float(np.std(ref[m])) if m.any() else None for g, m in groups.items()},
           "measurement_floor_vs_catalogue": {g: _agreement(ref[m], catalogue[m]) for g, m in groups.items()},
           "models": {}}
    preds = {name: line_flux(wave_rest, spec) for name, spec in rest_models.items()}
    preds.update(predictions or {})
    for name, p in preds.items():
        out["models"][name] = {g: {**_agreement(p[m], ref[m]),
                                   "pearson_r_vs_catalogue": pearson(p[m], catalogue[m])}
                               for g, m in groups.items()}
    if "oii_lines" in preds:  # paired bootstrap: is a model's r above the trivial baseline's beyond the test set's noise?
        m, base = groups["unobserved"], preds["oii_lines"]
        for name, p in preds.items():
            if name != "oii_lines":
                out["models"][name]["unobserved"]["r_minus_baseline_ci68"] = bootstrap_ci(
                    lambda a, b, c: pearson(a, c) - pearson(b, c), p[m], base[m], ref[m])
    return out, {"ref": ref, "catalogue": catalogue, "groups": groups, "preds": preds}


def versus_baseline(row: dict) -> str:
    """'above' / 'below' / 'indistinguishable from' the trivial baseline, by the paired bootstrap's 68% interval."""
    lo, hi = row.get("r_minus_baseline_ci68") or (None, None)
    if lo is None:
        return "not compared with"
    return "above" if lo > 0 else "below" if hi < 0 else "indistinguishable from"


def plot(path, ext, lowz, wave_rest, rest_models, wave_obs_min, budget) -> str:
    """Predicted against true [O II] flux per model, and one galaxy whose [O II] is unobserved."""
    plt = pyplot()
    names = list(ext["preds"])
    ncol = 3
    nrow = -(-(len(names) + 1) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 4.3 * nrow), squeeze=False)
    axes = axes.ravel()
    for ax in axes[len(names) + 1:]:
        ax.set_visible(False)
    true = ext["ref"]
    lim = (min(-1.0, np.percentile(true, 0.5)), np.percentile(true, 99.5) * 1.3)
    for ax, name in zip(axes, names):
        p = ext["preds"][name]
        for g, col in (("observed", "0.65"), ("unobserved", COLORS.get(name, "tab:red"))):
            m = ext["groups"][g]
            r = pearson(p[m], true[m])
            ax.scatter(true[m], p[m], s=5, lw=0, color=col, alpha=0.7, rasterized=True,
                       label=f"[O II] {g} (n={m.sum()}): r = {r:.2f}, NMAD = {nmad(p[m] - true[m]):.2f}")
        ax.plot(lim, lim, "k--", lw=0.8)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xlim(lim)
        ax.set_ylim(lim)
        ax.set_xlabel("[O II] 3727+3729 flux of the true restframe spectrum [flux × Å]")
        ax.set_ylabel("[O II] flux of the restframe model")
        ax.set_title(textwrap.fill(label(name), 55), fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    # one unobserved example: truth, models, observed edge
    ax = axes[len(names)]
    m = np.flatnonzero(ext["groups"]["unobserved"])
    if m.size:
        i = int(m[np.argsort(true[m])[int(0.8 * m.size)]])  # a strong line, to see the prediction
        wt = lowz["wave_rest_truth"]
        sel = (wt > 3640) & (wt < 3900)
        ax.plot(wt[sel], lowz["truth/spec_rest"][i, sel], color="k", lw=1.2, label="true restframe spectrum")
        sel = (wave_rest > 3640) & (wave_rest < 3900)
        for name, spec in rest_models.items():
            ax.plot(wave_rest[sel], spec[i, sel], color=COLORS.get(name, "tab:red"), lw=1, label=_short(name))
        for name in ("oii_oracle", "oii_lines"):
            if name in ext["preds"]:  # a flux, drawn as the height of a box of the window's width
                h = ext["preds"][name][i] / (OII_WINDOW[1] - OII_WINDOW[0])
                ax.hlines(np.median(lowz["truth/spec_rest"][i, (wt > 3753) & (wt < 3780)]) + h, *OII_WINDOW,
                          color=COLORS.get(name, "k"), lw=1.5, ls="--", label=f"{_short(name)} (window mean)")
        edge = wave_obs_min / (1 + lowz["z"][i])
        ax.axvspan(edge, 3900, color="0.9", lw=0, label="observed part")
        ax.axvline(3728.5, color="tab:green", ls="--", lw=0.7)
        ax.set_xlim(3640, 3900)
        ax.set_xlabel("restframe wavelength [Å]")
        ax.set_ylabel("normalised flux")
        ax.set_title(f"example: z = {lowz['z'][i]:.4f}, [O II] unobserved", fontsize=9)
        ax.legend(fontsize=6, loc="upper left", framealpha=0.85)
    fig.suptitle(f"Experiment 2 — extended restframe: [O II] predicted where it is not observed ({budget})",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the suptitle
    return save_figure(fig, path)


def _short(name: str) -> str:
    """Short legend names for the example panel (the scatter panels carry the full labels)."""
    if name.startswith("ae_"):
        return f"AE ({name[3:]})"
    return {"pca": "PCA", "pca_every_pixel": "PCA, every pixel", "oii_oracle": "oracle",
            "oii_lines": "line baseline"}.get(name, name)


def run(ctx: Context) -> tuple[dict, dict]:
    lowz, pca, wave_obs, wave_rest = ctx.lowz, ctx.baseline.pca, ctx.wave_obs, ctx.wave_rest
    rest_models = {k: v["spec_rest"] for k, v in ctx.enc["lowz"].items()}
    rest_models["pca"] = pca.restframe(ctx.baseline.lowz["coeffs"])
    rest_models["pca_every_pixel"] = pca.restframe(
        pca.fit_observed(lowz["y"], lowz["w"], lowz["z"], wave_rest, wave_obs, min_coverage=0.0)["coeffs"])
    # the oracle predicts catalogue fluxes; it also knows the measurement's own offset on the true spectrum
    # (continuum structure under the window), so only the [O II] scatter the mocks draw is left
    lf = lowz["truth/line_flux"].astype(np.float64)
    catalogue = lf[:, LINE_NAMES.index("OII_3726")] + lf[:, LINE_NAMES.index("OII_3729")]
    offset = line_flux(lowz["wave_rest_truth"], lowz["truth/spec_rest"]) - catalogue
    others = {"oii_oracle": oracle_prediction(lowz) + offset, "oii_lines": line_baseline(lowz, wave_obs, wave_rest)}
    ext, ext_arrays = measure(rest_models, lowz, wave_rest, float(wave_obs[0]), others)
    return ext, {"oii_extended": plot(ctx.figure("oii_extended"), ext_arrays, lowz, wave_rest, rest_models,
                                      float(wave_obs[0]), ctx.budget)}


def findings(r: dict) -> list[str]:
    out = []
    e = r["extended_restframe"]["models"]
    parts = [f"{label(k)} r = {fmt(e[k]['unobserved']['pearson_r'], '.2f')} (NMAD {fmt(e[k]['unobserved']['scatter_nmad'])}; "
             f"observed [O II]: r = {fmt(e[k]['observed']['pearson_r'], '.2f')})" for k in e]
    out.append("**Extended restframe:** [O II] of galaxies where it is not observed, against the truth: " + "; ".join(parts)
               + ". The paper shows (Fig. 2) plausible [O II] predicted beyond the observed range.")
    if "oii_oracle" in e:
        o, b = e["oii_oracle"]["unobserved"], e["oii_lines"]["unobserved"]
        best = max((k for k in e if k.startswith("ae_")), key=lambda k: e[k]["unobserved"]["pearson_r"] or -1,
                   default=None)
        if best:
            rb = e[best]["unobserved"]["pearson_r"] or float("nan")
            verdict = f"{versus_baseline(e[best]['unobserved'])} the trivial baseline (paired bootstrap, 68%)"
            out[-1] += (f" For scale: the oracle ceiling (the mocks' own [O II] relation applied to the true class, Hβ, "
                        "[N II]/Hα and dust, plus the measurement's offset on the true spectrum) "
                        f"reaches r = {fmt(o['pearson_r'], '.2f')}, the trivial baseline (Hβ, Hα, [N II] measured on the "
                        f"spectrum, the mocks' own relation) r = {fmt(b['pearson_r'], '.2f')}: the best autoencoder "
                        f"(r = {fmt(rb, '.2f')}) is {verdict} and reaches "
                        f"{fmt(rb / o['pearson_r'] if o['pearson_r'] else None, '.0%')} of the ceiling.")
    return out


def markdown(r: dict) -> list[str]:
    L = []
    e = r["extended_restframe"]
    L += ["", "## 2. Extended restframe: [O II] where it is not observed", "",
          f"{e['definition']}. Unobserved: {e['unobserved_means']} (n = {e['n']['unobserved']}); control group with "
          f"[O II] observed: n = {e['n']['observed']}. Spread of the reference flux (NMAD): unobserved "
          f"{fmt(e['reference_spread_nmad']['unobserved'])}, observed {fmt(e['reference_spread_nmad']['observed'])}. "
          "Measurement floor (the measurement on the true spectrum vs the catalogue line flux): Pearson r "
          f"{fmt(e['measurement_floor_vs_catalogue']['unobserved']['pearson_r'], '.3f')} (unobserved), median bias "
          f"{fmt(e['measurement_floor_vs_catalogue']['unobserved']['bias_median'])}.", "",
          "| model | [O II] | Pearson r | Spearman r | R² | median bias | NMAD scatter | r vs catalogue flux |",
          "|---|---|---|---|---|---|---|---|"]
    for k, groups in e["models"].items():
        for g, s in groups.items():
            L.append(f"| {label(k)} | {g} | {fmt(s['pearson_r'], '.3f')} {ci(s.get('pearson_r_ci68'), '.2f')} "
                     f"| {fmt(s['spearman_r'], '.3f')} | {fmt(s['r2'], '.3f')} "
                     f"| {fmt(s['bias_median'])} | {fmt(s['scatter_nmad'])} | {fmt(s['pearson_r_vs_catalogue'], '.3f')} |")
    return L


def claims(r: dict) -> list[dict]:
    e = r["extended_restframe"]["models"]
    aes = [k for k in e if k.startswith("ae_") and not k.endswith("_refined")]
    if not aes or "oii_lines" not in e:
        return []
    rs = {k: e[k]["unobserved"]["pearson_r"] for k in aes}
    base, oracle = e["oii_lines"]["unobserved"]["pearson_r"], e["oii_oracle"]["unobserved"]["pearson_r"]
    pca = e.get("pca", {}).get("unobserved", {}).get("pearson_r")
    vs = [versus_baseline(e[k]["unobserved"]) for k in aes]
    if all(v == "above" for v in vs):
        verdict = "reproduced (every variant above the trivial baseline"
    elif all(v in ("above", "indistinguishable from") for v in vs):
        above = [f"({k[3:]})" for k, v in zip(aes, vs) if v == "above"]
        verdict = ("reproduced (every variant as good as the trivial baseline, which is given the mocks' own relation; "
                   f"above it: {', '.join(above) or 'none'}")
    elif any(v in ("above", "indistinguishable from") for v in vs):
        verdict = f"partly reproduced ({', '.join(f'({k[3:]}) {v}' for k, v in zip(aes, vs))} the trivial baseline"
    else:
        verdict = "not reproduced (every variant below the trivial baseline"
    return [{"claim": "the extended restframe model predicts [O II] where it was never observed",
             "measured": "Pearson r with the truth: " + ", ".join(f"({k[3:]}) {fmt(x, '.2f')}" for k, x in rs.items())
                         + f"; PCA {fmt(pca, '.2f')}; trivial line baseline {fmt(base, '.2f')}; oracle ceiling "
                         f"{fmt(oracle, '.2f')}",
             "verdict": verdict + "; paired bootstrap of r, 68%; one seed)"}]


EXPERIMENT = Experiment("extended_restframe", run, findings, markdown, claims=claims)
