"""`ditnas search` as a stage: checkpoint + latency table + total budget -> Optuna study + results folder.

    sensitivity (cached) -> DP problem per steps value and stream width -> DP seeds -> Optuna ask/tell
    -> trials.{parquet,csv}, pareto.{parquet,csv}, manifest.json (+ study.journal by default)

Rerunning the same command continues the same study (each run adds `trials` trials) and rewrites the
tables from the whole study.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import optuna
import torch

import ditnas
from ditnas.arch import Arch
from ditnas.errors import DitnasError
from ditnas.io import write_json
from ditnas.latency_models.table import space_key, space_to_dict
from ditnas.search.dp import to_arch
from ditnas.search.objectives import EVAL_SEED, EvalContext
from ditnas.search.optuna_search import (
    SAMPLERS,
    make_sampler,
    open_storage,
    pareto_frame,
    run_study,
    trials_frame,
    write_tables,
)
from ditnas.search.problem import (
    build_problem,
    check_coverage,
    dp_results,
    min_reachable_ms,
)
from ditnas.search.sensitivity import slot_sensitivity
from ditnas.search.space import SearchChoices
from ditnas.supernet.run import VAL_BATCH

Progress = Callable[[str, int, int, str], None]  # (phase, done, total, what); phases: sensitivity, search
MANIFEST = "manifest.json"


def _space_diff(a, b) -> list[str]:
    da, db = space_to_dict(a), space_to_dict(b)
    return [f"{k}: checkpoint {da.get(k)} vs table {db.get(k)}" for k in sorted(set(da) | set(db))
            if k != "steps" and da.get(k) != db.get(k)]  # steps does not change per-step latency


def check_space_match(supernet_space, table) -> None:
    """DitnasError naming the fields when the table was profiled for another search space."""
    if table.space is None:
        raise DitnasError(f"{table.describe()} records no search space; rebuild it with `ditnas profile`")
    diff = _space_diff(supernet_space, table.space)
    if diff:
        raise DitnasError(
            f"the checkpoint's search space does not match latency table {table.describe()} ({'; '.join(diff)}); "
            "profile the table with the checkpoint (`ditnas profile --checkpoint …`)"
        )


def _fmt_ms(x: float) -> str:
    """Short text for ms that is never below x (the user copies a minimum as a budget)."""
    for digits in (4, 6, 8, 10):
        text = f"{x:.{digits}g}"
        if float(text) >= x:
            return text
    return repr(float(x))


def study_name_for(checkpoint_sha: str, table_id: str, budget_ms_total: float, steps: Sequence[int],
                   memory_limit: float | None) -> str:
    text = json.dumps([checkpoint_sha, table_id, float(budget_ms_total), sorted(int(s) for s in steps), memory_limit])
    return f"ditnas-search-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def dp_seeds(choices: SearchChoices, predictor, sens, budget_ms_total: float, steps: Sequence[int], n_seeds: int,
             *, buckets: int = 2000) -> list[tuple[Arch, int]]:
    """Up to `n_seeds` distinct (arch, steps) the exact DP finds under `budget_ms_total`: for each steps
    value and stream width the best layouts (and points along the DP's own front), best summed
    sensitivity score first, round-robin over steps values. Steps values the budget cannot reach
    give none."""
    space = choices.space
    pooled: list[tuple[float, Arch, int]] = []
    for s in steps:
        for w in space.widths:
            try:
                problem = build_problem(choices, predictor, sens, budget_ms_total / s, buckets=buckets, stream_width=w)
                results = dp_results(problem, n_seeds)
            except DitnasError:
                continue  # this stream width (or steps value) cannot fit the budget
            base = replace(space.max_arch(), steps=s)
            for r in results:
                arch = to_arch(r, choices, base)
                # a layout narrower than w was priced with the stream at w: exact only when latency grows
                # with width, so keep the seed only if the predictor agrees it fits (noisy tables)
                if predictor.predict(arch) <= budget_ms_total / s * (1 + 1e-9):
                    pooled.append((r.score, arch, s))
    pooled.sort(key=lambda item: -item[0])
    seeds: list[tuple[Arch, int]] = []
    seen: set[tuple[Arch, int]] = set()
    by_steps = {s: [(a, st) for _, a, st in pooled if st == s] for s in steps}
    while len(seeds) < n_seeds and any(by_steps.values()):
        for s in steps:
            while by_steps[s]:
                item = by_steps[s].pop(0)
                if item not in seen:
                    seen.add(item)
                    seeds.append(item)
                    break
            if len(seeds) >= n_seeds:
                break
    return seeds


def run_search(
    checkpoint: Path,
    table: Path,
    budget_ms_total: float,
    steps: list[int],
    trials: int,
    out: Path,
    storage: str | None = None,
    sampler: str = "nsga2",
    seed: int = 0,
    n_seeds: int = 16,
    progress: Progress | None = None,
    *,
    memory_limit_mb: float | None = None,
    n_eval: int = VAL_BATCH,
    eval_seed: int = EVAL_SEED,
    buckets: int = 2000,
    cache_dir: Path | None = None,
    study_name: str | None = None,
    population_size: int = 24,
    context: EvalContext | None = None,
) -> dict[str, Any]:
    """Search archs × steps under `budget_ms_total` (ms for a whole generation = steps × per-step).

    `cache_dir` (sensitivity cache) defaults to `<checkpoint folder>/search_cache`, shared by every
    search on that checkpoint. `context` lets a caller (tests, a sweep) reuse a loaded EvalContext.
    Returns the manifest (also written to `<out>/manifest.json`)."""
    started = time.time()
    out = Path(out)
    steps = sorted({int(s) for s in steps})
    if not steps or steps[0] < 1:
        raise DitnasError(f"--steps {steps}: give one or more denoising step counts >= 1")
    if not (math.isfinite(float(budget_ms_total)) and budget_ms_total > 0):
        raise DitnasError(f"--budget-ms {budget_ms_total}: give a positive total latency budget in ms")
    if trials < 0:
        raise DitnasError(f"--trials {trials} must be >= 0")
    if sampler not in SAMPLERS:
        raise DitnasError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    # storage first: an unreachable URL fails before minutes of loading
    store, store_desc = open_storage(storage, out)

    ctx = context or EvalContext.from_paths(checkpoint, table, n_eval, eval_seed, steps)
    if ctx.table is None:
        raise DitnasError("search needs a latency table; pass --table")
    ctx.objectives.steps = tuple(steps)
    space = ctx.space
    check_space_match(space, ctx.table)
    check_coverage(ctx.table, space)
    predictor = ctx.objectives.predictor
    choices = SearchChoices.from_space(space)

    cache = Path(cache_dir) if cache_dir is not None else Path(ctx.checkpoint).parent / "search_cache"
    sens = slot_sensitivity(
        ctx.supernet, ctx.objectives.batch, checkpoint_sha256=ctx.checkpoint_sha256, n=ctx.n, seed=ctx.seed,
        cache_dir=cache, choices=choices,
        progress=(lambda d, t, w: progress("sensitivity", d, t, w)) if progress else None,
    )

    # feasibility of the budget, per steps value
    minimum = min_reachable_ms(choices, predictor, sens)
    reachable = [s for s in steps if budget_ms_total / s >= minimum]
    if not reachable:
        per = ", ".join(f"{_fmt_ms(s * minimum)} ms at {s} steps" for s in steps)
        raise DitnasError(
            f"--budget-ms {budget_ms_total:g} is below the cheapest reachable arch: {per} "
            f"({_fmt_ms(minimum)} ms per step on {ctx.table.describe()}); raise the budget or use fewer --steps"
        )

    seeds = dp_seeds(choices, predictor, sens, budget_ms_total, reachable, n_seeds, buckets=buckets)

    name = study_name or study_name_for(ctx.checkpoint_sha256, ctx.table_id, budget_ms_total, steps, memory_limit_mb)
    memory_limit = None if memory_limit_mb is None else float(memory_limit_mb) * 2**20
    study = run_study(
        ctx.objectives.evaluate, choices, steps=steps, budget_ms=float(budget_ms_total), n_trials=int(trials),
        storage=store, study_name=name,
        sampler=make_sampler(sampler, seed, population_size=population_size),
        seeds=seeds, memory_limit_bytes=memory_limit, base=space.max_arch(),
        progress=(lambda d, t, w: progress("search", d, t, w)) if progress else None,
    )

    out.mkdir(parents=True, exist_ok=True)
    all_trials = trials_frame(study)
    front = pareto_frame(study)
    files = write_tables(all_trials, out, "trials") + write_tables(front, out, "pareto")
    sens_file = write_tables(sens, out, "sensitivity")
    best = front.sort_values("quality").iloc[0].to_dict() if len(front) else None
    manifest = {
        "kind": "ditnas.search",
        "study_name": name,
        "storage": store_desc,
        "dashboard": f"optuna-dashboard {store_desc}",
        "inputs": {
            "checkpoint": str(ctx.checkpoint),
            "checkpoint_sha256": ctx.checkpoint_sha256,
            "table": str(ctx.table.root or table),
            "table_id": ctx.table_id,
            "device": ctx.table.identity,
            "space_key": space_key(space),
            "calibration": asdict(predictor.calibration),
        },
        "budget_ms_total": float(budget_ms_total),
        "budget_ms_per_step": {str(s): budget_ms_total / s for s in steps},
        "min_reachable_ms_per_step": minimum,
        "steps": steps,
        "steps_reachable": reachable,
        "memory_limit_mb": memory_limit_mb,
        "sampler": sampler,
        "seed": seed,
        "eval": {"n": ctx.n, "seed": ctx.seed, "quality": "weight-sharing validation flow-matching loss (lower is better)"},
        "dp": {"buckets": buckets, "n_seeds": n_seeds, "seeds": [{"arch": str(a), "steps": s} for a, s in seeds]},
        "sensitivity_cache": str(cache),
        "trials_this_run": int(trials),
        "trials_total": len(all_trials),
        "trials_complete": int((all_trials["state"] == "COMPLETE").sum()) if len(all_trials) else 0,
        "trials_feasible": int(all_trials["feasible"].sum()) if len(all_trials) else 0,
        "pareto_size": len(front),
        "best": None if best is None else {"number": int(best["number"]), "arch": str(best["arch"]), "steps": int(best["steps"]),
                                            "latency_ms": float(best["latency_ms"]), "quality": float(best["quality"])},
        "files": files + sens_file,
        "seconds_this_call": round(time.time() - started, 2),
        "versions": {"ditnas": ditnas.__version__, "optuna": optuna.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
    }
    write_json(out / MANIFEST, manifest)
    return manifest
