"""How far to trust one search's quality signal (`search.fidelity_archs`): a few of the archs the search
evaluated are trained standalone, and the signal's ranking of them is compared with that ground truth.

bench/fidelity.py measures this once for the default space; a user's own space, data or schedule may
rank differently, so the search can measure it on its own results when asked (it costs `n` standalone
training runs of `fidelity_steps` steps, cached in the signal cache like the proxy signal). The held-out
archs are spread across the signal's ranking of the feasible trials (the best, the worst and evenly
spaced ranks between), so the check asks the question the search depends on: does a better signal mean
a better arch?
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from ditnas.errors import DitnasError


def pick_held_out(trials: pd.DataFrame, n: int) -> list[str]:
    """`n` distinct feasible layouts at evenly spaced ranks of the signal (best and worst included)."""
    done = trials[(trials["state"] == "COMPLETE") & trials["feasible"].astype(bool)] if len(trials) else trials
    if not len(done):
        return []
    by_arch = done.sort_values("quality").drop_duplicates("arch")  # one row per layout (steps are another axis)
    archs = list(by_arch["arch"])
    if len(archs) <= n:
        return archs
    picks = sorted({round(i * (len(archs) - 1) / (n - 1)) for i in range(n)})
    return [archs[i] for i in picks]


def rank_agreement(signal: list[float], truth: list[float]) -> dict[str, float]:
    from scipy.stats import kendalltau, spearmanr

    return {"kendall_tau": float(kendalltau(signal, truth).statistic),
            "spearman_rho": float(spearmanr(signal, truth).statistic)}


def check_fidelity(signal: Any, standalone: Any, space: Any, archs: list[str], *,
                   progress: Any | None = None) -> dict[str, Any]:
    """The search's `signal` vs `standalone` (a proxy QualitySignal trained long: the ground truth) on `archs`."""
    if len(archs) < 3:
        raise DitnasError(f"the fidelity check needs >= 3 distinct feasible archs among the trials, the search has "
                          f"{len(archs)}; run more trials (search.trials) or set search.fidelity_archs=0")
    rows = []
    for i, text in enumerate(archs):
        arch = space.parse(text, source="search trials")
        rows.append({"arch": text, "signal": float(signal(arch)), "standalone": float(standalone(arch))})
        if progress is not None:
            progress(i + 1, len(archs), text)
    sig, tru = [r["signal"] for r in rows], [r["standalone"] for r in rows]
    pick, best = min(range(len(rows)), key=lambda i: sig[i]), min(range(len(rows)), key=lambda i: tru[i])
    return {
        "archs": len(rows),
        "standalone_steps": standalone.steps,
        **rank_agreement(sig, tru),
        "signal_best": rows[pick]["arch"],
        "standalone_best": rows[best]["arch"],
        "signal_best_gap_pct": 100.0 * (tru[pick] - tru[best]) / tru[best],
        "rows": rows,
        "reading": "Kendall tau / Spearman rho of the search's quality signal against the same archs trained "
                   f"standalone from scratch for {standalone.steps} steps (1 = same order, 0 = unrelated, < 0 = "
                   "reversed); signal_best_gap_pct: how much worse, trained standalone, the signal's favourite of "
                   "these archs is than the best of them",
    }
