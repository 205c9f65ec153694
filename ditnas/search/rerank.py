"""Multi-fidelity final pick (`search.rerank_top`): the search's best few feasible archs by its cheap
signal are re-scored by training them, in successive-halving rungs, and the pick is by the trained loss.

Why: the weight-sharing loss ranks archs poorly (bench/fidelity.py: Kendall τ 0.15 on the default
space), while a short from-scratch run ranks well (τ 0.73 at 200 steps, 0.82 at 500) but costs a
training run per arch. Training only the search's top-k spends that cost where the decision is made.

Rungs (`search.rerank_steps`, e.g. 200, 500): every candidate is trained to the first rung's steps;
the better half (at least one) goes on to the next rung, and so on; the pick is the best at the last
rung any candidate reached. This is synchronous successive halving, written out because with a
handful of candidates known up front it is exact, where Optuna's asynchronous SuccessiveHalvingPruner
would judge each candidate only against those that happened to run before it. Trained losses go
through the signal cache, so a rerun trains nothing again.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

KEEP = 0.5  # share of candidates promoted to the next rung (η = 2)


def top_candidates(trials: pd.DataFrame, k: int) -> pd.DataFrame:
    """The `k` best feasible, complete trials by the search's signal, one per layout."""
    if not len(trials):
        return trials
    done = trials[(trials["state"] == "COMPLETE") & trials["feasible"].astype(bool)]
    return done.sort_values(["quality", "latency_ms"]).drop_duplicates("arch").head(k)


def successive_halving(candidates: list[str], score_at: Any, rungs: list[int], progress: Any | None = None) -> dict[str, Any]:
    """`score_at(arch_text, steps) -> loss` (lower is better) over `rungs`; returns the rungs and the pick."""
    alive = list(candidates)
    history = []
    sizes = [len(alive)]
    for _ in rungs[1:]:
        sizes.append(max(1, math.ceil(sizes[-1] * KEEP)))
    total, done = sum(sizes), 0
    for i, steps in enumerate(rungs):
        scores = {}
        for arch in alive:
            scores[arch] = float(score_at(arch, steps))
            done += 1
            if progress is not None:
                progress(done, total, f"{steps} steps: {arch}")
        ranked = sorted(alive, key=lambda a: scores[a])
        history.append({"steps": steps, "scores": scores, "ranked": ranked})
        if i < len(rungs) - 1:
            alive = ranked[:max(1, math.ceil(len(ranked) * KEEP))]
    last = history[-1]
    return {"rungs": history, "pick": last["ranked"][0], "pick_steps": last["steps"],
            "pick_loss": last["scores"][last["ranked"][0]]}
