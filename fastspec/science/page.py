"""The Markdown page of a science run (science-<mode>.md), from its results alone: the header with the training
budget and the machine, the findings and sections of every experiment in order, and the figures."""
from __future__ import annotations

from .experiments import EXPERIMENTS
from .labels import fmt

CAVEATS = {
    "quick": "Quick mode trains each variant for a few minutes on a CPU (bf16 autocast) with an encoder of "
             "16/32/64 channels (the paper: 128/256/512 on a GPU for many epochs of ~500k spectra); the learning "
             "curve shows whether the models were still improving when the budget ran out, and every number here "
             "is a statement about that budget, not about the architecture's limit. Every variant is trained with "
             "two seeds (section 1b gives both and their spread); the other sections use the first seed, and their "
             "brackets give the test-set sampling error only, so differences smaller than the seed spread of 1b "
             "may be training noise. The full mode (`fastspec science --full`, a GPU) uses the paper's "
             "encoder, 100k mocks and 40k steps of 256.",
    "full": "Full mode: the paper's encoder, 100k mocks, 40k steps of 256 spectra per variant.",
    "smoke": "Smoke mode checks that the code runs; its numbers mean nothing.",
}


def findings(r: dict) -> list[str]:
    """One sentence per experiment: what the paper reports and what these numbers say (computed, not typed)."""
    out = []
    for exp in EXPERIMENTS:
        if exp.key in r:
            out += exp.findings(r)
    return out


def claims(r: dict) -> list[dict]:
    """Every experiment's claims rows, in order."""
    out = []
    for exp in EXPERIMENTS:
        if exp.key in r and exp.claims is not None:
            out += exp.claims(r)
    return out


def markdown(r: dict) -> str:
    """The results as a Markdown page: tables per experiment, the figures, and the training budget."""
    cfg = r["config"]
    variants = list(r["variants"])
    L = [f"# fastspec science check — {r['mode']} mode", "",
         "Findings of Melchior, Hahn & Liang 2022 (\"Autoencoding Galaxy Spectra\") measured against mock ground "
         "truth (fastspec.mock) and on the bundled real SDSS spectra. Produced by `fastspec science` (or `bench/science.py`).", "",
         f"**Training budget behind every number:** {r['training_budget']}; S = {cfg['n_latent']} latents, "
         f"{r['model_parameters']:,} parameters, {cfg['precision']}, lr {cfg['lr']} one-cycle. "
         f"Test sets: {cfg['n_test']} held-out mocks (SDSS-like n(z)), {cfg['n_lowz']} low-z mocks "
         f"(uniform z in {cfg['lowz_range'][0]}–{cfg['lowz_range'][1]}).", ""]
    m = r.get("machine", {})
    L += [f"Machine: {m.get('cpu', '?')} × {m.get('cpu_count', '?')} cores, torch {m.get('torch', '?')}"
          f"{', GPU ' + m['gpu'] if m.get('gpu') else ''}; load average (1, 5, 15 min) at the start of the analysis "
          f"{', '.join(fmt(x, '.1f') for x in (r.get('load_average_start') or []))}; total "
          f"{fmt(r['timings'].get('end_to_end_s', r['timings']['total_s']), '.0f')} s wall (training "
          f"{fmt(sum(float(t.get('wall_s') or 0) for t in r.get('scan_training', r['training']).values()), '.0f')} s "
          f"for {len(r.get('scan_training', r['training']))} trainings"
          + (f", trained in an earlier run: {', '.join(r['timings']['training_reused'])}"
             if r["timings"].get("training_reused") else "") + "), "
          f"{fmt(r['timings'].get('end_to_end_cpu_s', r['timings'].get('total_cpu_s')), '.0f')} CPU s — on an idle machine between "
          f"{fmt((r['timings'].get('idle_wall_estimate_s') or [None])[0], '.0f')} and "
          f"{fmt((r['timings'].get('idle_wall_estimate_s') or [None, None])[1], '.0f')} s.", ""]
    if r.get("note"):
        L += [f"*Note:* {r['note']}", ""]
    rows = claims(r)
    if rows:
        L += ["## The paper's claims", "", "| claim (Melchior, Hahn & Liang 2022) | measured here | verdict |", "|---|---|---|"]
        L += [f"| {c['claim']} | {c['measured']} | **{c['verdict']}** |" for c in rows]
        L += [""]
    L += ["## Findings", ""] + [f"- {line}" for line in findings(r)]
    L += ["", f"*Caveat:* {CAVEATS.get(r['mode'], '')}", "",
          "## Training", "", "| variant | steps | spectra seen | train time [s] | final val loss |", "|---|---|---|---|---|"]
    for k in variants:
        t = r["training"][k]
        L.append(f"| {r['variants'][k]} | {t.get('step')} | {t.get('spectra_seen')} | {fmt(t.get('train_time_s'), '.0f')} "
                 f"| {fmt(t.get('val_loss'), '.4g')} |")
    for exp in EXPERIMENTS:
        if exp.key in r:
            L += exp.markdown(r)
    L += ["", "## Figures", ""]
    for k, path in r["figures"].items():
        L += [f"### {k.replace('_', ' ')}", "", f"![{k}]({path})", ""]
    return "\n".join(L) + "\n"
