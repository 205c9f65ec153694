"""Build the DP's inputs from a latency predictor and sensitivity scores, and turn DP layouts into seeds.

Costs (ms per denoising step) of the DP (`dp.DPProblem`, method.md §1.4):

- cell (slot ℓ, choice o, stage r): the predictor's p50 of the block cell (op, width, MLP ratio,
  tokens at stage r); `skip` costs 0; cells the space does not allow, or that the sensitivity table
  did not score, are inf;
- fixed: patch_embed + final, down/up: the transition cells — all priced at one residual-stream width.
  `# assumption`: the stream is as wide as the widest block, which the additive DP cannot see, so a
  problem is built for one stream width w (default: the space's max, 1.0) with block widths limited to
  <= w. A layout whose widest block is w is priced exactly; a narrower one is priced with the stream
  at w, an upper bound when latency grows with width (true of real tables, not always of noisy
  ones: `stage.py` builds one problem per width, pools the seeds and keeps those the predictor
  confirms fit the budget).
- calibration: the DP asks the predictor for its additive decomposition (`LatencyPredictor.cell_cost`
  per cell, `fixed_cost` once; `decompose(arch)` sums to `predict(arch)`) and moves the fixed cost
  into the budget (`DPProblem.budget_ms = budget − fixed`): the DP's layout cost plus the fixed cost
  then equals `predictor.predict(arch)` for layouts whose stream width is w. A cell term that a
  negative per-block calibration would make negative is clipped to 0 ms (an over-estimate, so still
  never over budget).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd

from ditnas.arch import SearchSpace
from ditnas.config import SearchConfig
from ditnas.errors import DitnasError
from ditnas.latency_models.programs import Cell
from ditnas.search.dp import (
    DPProblem,
    DPResult,
    k_best,
    solve,
    solve_two_phase,
)
from ditnas.search.sensitivity import score_array
from ditnas.search.space import SearchChoices


def check_coverage(table, space: SearchSpace, *, limit: int = 20) -> None:
    """DitnasError listing the cells of `space` the latency table lacks (LatencyTable.coverage)."""
    missing = table.coverage(space)
    if len(missing):
        keys = list(missing["key"])
        shown = ", ".join(keys[:limit]) + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")
        raise DitnasError(
            f"latency table {table.describe()} lacks {len(keys)} cells the search space needs: {shown}; "
            "profile them (`ditnas profile` on the same session folder measures only what is missing)"
        )


def calibration_offset(predictor, calibrated: bool = True) -> float:
    """The predictor's fixed cost, which the DP leaves out of its layout costs."""
    return float(predictor.fixed_cost(calibrated))


def _tokens(space: SearchSpace, stage: int) -> int:
    return space.max_arch().tokens(stage)


def cost_tables(choices: SearchChoices, predictor, *, stream_width: float | None = None, calibrated: bool = True
                ) -> tuple[np.ndarray, float, float, float]:
    """(cost (slots, choices, 2), fixed, down, up) in ms per step; see the module docstring."""
    space = choices.space
    w = float(space.widths[-1] if stream_width is None else stream_width)
    if w not in space.widths:
        raise DitnasError(f"stream width {w} is not a width of the space {list(space.widths)}")
    mask = choices.mask()
    cost = np.full(mask.shape, np.inf)
    priced: dict[tuple, float] = {}
    # calls per step that run slot i's block (PDG: 2 at the dense ends, pdg_latency.py); 1 for every other pricing
    weights = predictor.slot_weights(choices.depth) if hasattr(predictor, "slot_weights") else [1] * choices.depth
    for i in range(choices.depth):
        for o, choice in enumerate(choices.all_choices):
            for r in (0, 1):
                if not mask[i, o, r]:
                    continue
                if choice.is_skip:
                    cost[i, o, r] = 0.0
                    continue
                if choice.width > w:
                    continue  # belongs to a wider stream's problem
                key = (choice.op, choice.width, choice.mlp_ratio, r)
                if key not in priced:
                    cell = Cell("block", choice.op, choice.width, choice.mlp_ratio, _tokens(space, r), r)
                    priced[key] = max(0.0, predictor.cell_cost(cell, calibrated))
                cost[i, o, r] = weights[i] * priced[key]

    def other(kind: str, stage: int) -> float:
        return max(0.0, predictor.cell_cost(Cell(kind, width=w, tokens=_tokens(space, stage), stage=stage), calibrated))

    fixed = other("patch_embed", 0) + other("final", 0)
    half = bool(mask[:, :, 1].any())
    down = other("down", 0) if half else 0.0
    up = other("up", 1) if half else 0.0
    return cost, fixed, down, up


def build_problem(
    choices: SearchChoices,
    predictor,
    scores: pd.DataFrame | np.ndarray,
    budget_ms_step: float,
    *,
    buckets: int = SearchConfig.dp_buckets,
    stream_width: float | None = None,
    calibrated: bool = True,
) -> DPProblem:
    """The DPProblem for a per-step budget (the search divides a total budget by the steps).

    `scores`: the sensitivity table (`sensitivity.slot_sensitivity`) or a (slots, choices, 2) array;
    unscored cells are forbidden."""
    cost, fixed, down, up = cost_tables(choices, predictor, stream_width=stream_width, calibrated=calibrated)
    score = score_array(scores, choices) if isinstance(scores, pd.DataFrame) else np.asarray(scores, dtype=float)
    if score.shape != cost.shape:
        raise DitnasError(f"scores have shape {score.shape}; the space needs {cost.shape} (slots, choices, stages)")
    cost = np.where(np.isfinite(score), cost, np.inf)
    score = np.where(np.isfinite(cost), score, 0.0)
    budget = float(budget_ms_step) - calibration_offset(predictor, calibrated)
    return DPProblem(cost, score, budget, down_cost=down, up_cost=up, fixed_cost=fixed, buckets=int(buckets),
                     stages=choices.stages, labels=tuple(c.token() for c in choices.all_choices))


def min_reachable_ms(choices: SearchChoices, predictor, scores=None, *, calibrated: bool = True) -> float:
    """Cheapest per-step latency over every stream width (ms, calibrated like `build_problem`)."""
    best = math.inf
    for w in choices.space.widths:
        cost, fixed, down, up = cost_tables(choices, predictor, stream_width=w, calibrated=calibrated)
        if scores is not None:
            s = score_array(scores, choices) if isinstance(scores, pd.DataFrame) else np.asarray(scores)
            cost = np.where(np.isfinite(s), cost, np.inf)
        probe = DPProblem(cost, np.zeros_like(cost), 1e12, down, up, fixed, stages=choices.stages)
        best = min(best, probe.min_cost_ms())
    return best + calibration_offset(predictor, calibrated)


def _small(problem: DPProblem) -> bool:
    return problem.n_slots * problem.n_choices <= 200


def dp_results(problem: DPProblem, k: int) -> list[DPResult]:
    """Up to k distinct feasible layouts, best score first.

    Small problems: `k_best` (Yen's on the expanded DAG, with at most 64 buckets to bound the graph).
    Otherwise: `solve`, `solve_two_phase`, then `solve` at budgets shrunk step by step toward the
    cheapest layout (points along the DP's own front — diverse seeds for a multi-objective search).
    """
    if k < 1:
        return []
    out: list[DPResult] = []
    seen: set[tuple] = set()

    def add(res: DPResult) -> None:
        key = (res.choice, res.stage)
        if key not in seen and len(out) < k:
            seen.add(key)
            out.append(res)

    if _small(problem):
        try:
            for res in k_best(replace(problem, buckets=min(problem.buckets, 64), bucket_ms=None), k, max_nodes=50_000):
                add(res)
        except DitnasError:
            pass  # too coarse or too big: fall through to the exact DP
    add(solve(problem))
    if len(out) < k:
        try:
            add(solve_two_phase(problem).result)
        except DitnasError:
            pass
    low = problem.min_cost_ms()
    top = problem.budget_ms
    for f in np.linspace(1.0, 0.0, 4 * k + 1)[1:]:
        if len(out) >= k:
            break
        budget = low + f * (top - low)
        try:
            add(solve(replace(problem, budget_ms=budget)))
        except DitnasError:
            continue  # within bucket rounding of the minimum
    out.sort(key=lambda r: -r.score)
    return out
