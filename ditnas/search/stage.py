"""`ditnas search` as a stage: checkpoint + latency table + the search config section -> Optuna study
+ results folder.

    sensitivity (cached) -> budget check -> DP seeds (study.py) -> Optuna ask/tell
    -> trials.{parquet,csv}, pareto.{parquet,csv}, manifest.json (+ study.journal by default)

Rerunning the same command continues the same study (each run adds `cfg.trials` trials) and rewrites
the tables from the whole study.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ditnas.config import SearchConfig
from ditnas.errors import DitnasError
from ditnas.io import versions, write_json
from ditnas.latency_models.stream_latency import search_predictor
from ditnas.search.baselines import score_baselines
from ditnas.search.objectives import EvalContext
from ditnas.search.optuna_search import open_storage, pareto_frame, run_study, trials_frame, write_tables
from ditnas.search.problem import check_coverage
from ditnas.search.sensitivity import slot_sensitivity
from ditnas.search.space import SearchChoices
from ditnas.search.study import check_budget, check_priced, dp_seeds, open_study, study_name_for
from ditnas.supernet.flow import EVAL_SEED, VAL_BATCH

Progress = Callable[[str, int, int, str], None]  # (phase, done, total, what); phases: sensitivity, search
MANIFEST = "manifest.json"
QUALITY_TEXT = {
    "supernet": "weight-sharing validation flow-matching loss (lower is better)",
    "proxy": "validation flow-matching loss after training the arch from scratch for {steps} steps (EMA weights; lower is better)",
    "finetune": "validation flow-matching loss after fine-tuning the extracted arch for {steps} steps (EMA weights; lower is better)",
}


def _space_diff(a, b) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
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


def search_fidelity(cfg: SearchConfig, ctx: EvalContext, signal: Any, trials: Any, cache: Path,
                    progress: Progress | None) -> dict[str, Any]:
    """The search's signal against standalone training on `cfg.fidelity_archs` of its own feasible archs."""
    from ditnas.search.fidelity import check_fidelity, pick_held_out

    steps = cfg.fidelity_steps or ctx.config.train.steps
    # the ground truth: from scratch, the checkpoint's recipe, `steps` steps; cached like the proxy signal
    standalone = ctx.new_signal("proxy", int(steps), cache)
    archs = pick_held_out(trials, cfg.fidelity_archs)
    report = check_fidelity(signal, standalone, ctx.space, archs,
                            progress=(lambda d, t, w: progress("fidelity", d, t, w)) if progress else None)
    return {**report, "trained_steps_this_call": standalone.trained_steps}


def best_record(row: dict[str, Any]) -> dict[str, Any]:
    """The manifest's `best` entry of a trials-table row."""
    return {"number": int(row["number"]), "arch": str(row["arch"]), "steps": int(row["steps"]),
            "latency_ms": float(row["latency_ms"]), "quality": float(row["quality"])}


def best_by(cfg: SearchConfig, rerank: dict[str, Any] | None) -> str:
    """What chose `best`: the search's signal, or the rerank's trained loss."""
    return "signal" if rerank is None else f"rerank: {cfg.rerank_signal} loss after {rerank['pick_steps']} steps"


def search_rerank(cfg: SearchConfig, ctx: EvalContext, trials: Any, cache: Path,
                  progress: Progress | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The search's top `cfg.rerank_top` feasible archs re-scored by training (search/rerank.py); the pick's
    trial row and the record of the rungs."""
    from ditnas.search.rerank import successive_halving, top_candidates

    top = top_candidates(trials, cfg.rerank_top)
    signals: dict[int, Any] = {}

    def score_at(text: str, steps: int) -> float:
        if steps not in signals:
            signals[steps] = ctx.new_signal(cfg.rerank_signal, steps, cache)
        return signals[steps](ctx.space.parse(text, source="search trials"))

    result = successive_halving(list(top["arch"]), score_at, list(cfg.rerank_steps),
                                (lambda d, t, w: progress("rerank", d, t, w)) if progress else None)
    row = top[top["arch"] == result["pick"]].iloc[0].to_dict()
    result.update({"signal": cfg.rerank_signal, "candidates": list(top["arch"]),
                   "signal_pick": str(top["arch"].iloc[0]), "changed_pick": result["pick"] != str(top["arch"].iloc[0]),
                   "trained_steps_this_call": sum(s.trained_steps for s in signals.values())})
    return row, result


def run_search(
    cfg: SearchConfig,
    checkpoint: Path,
    table: Path,
    out: Path,
    *,
    progress: Progress | None = None,
    cache_dir: Path | None = None,
    study_name: str | None = None,
    context: EvalContext | None = None,
) -> dict[str, Any]:
    """Search archs x steps under `cfg.budget_ms`: ms for one whole generation with `cfg.guidance`
    (generation_latency.py defines it; the manifest's `latency_definition` says it in words).

    `cache_dir` (sensitivity cache) defaults to `<checkpoint folder>/search_cache`, shared by every
    search on that checkpoint. `context` lets a caller (tests, a benchmark) reuse a loaded EvalContext.
    Returns the manifest (also written to `<out>/manifest.json`)."""
    started = time.time()
    out = Path(out)
    cfg.check()
    budget = cfg.needs_budget() if cfg.target_fps is None else None  # a target FPS needs the clip's frames (below)
    steps = cfg.sorted_steps
    # storage first: an unreachable URL fails before minutes of loading
    store, store_desc = open_storage(cfg.storage, out)

    ctx = context or EvalContext.from_paths(checkpoint, table, cfg.eval_items or VAL_BATCH, EVAL_SEED, steps)
    if ctx.table is None:
        raise DitnasError("search needs a latency table; pass one (`--table`)")
    check_priced(cfg, ctx.table, ctx.objectives.predictor)
    ctx.objectives.steps = tuple(steps)
    ctx.objectives.guidance = cfg.guidance
    space = ctx.space
    if cfg.stream_chunk or cfg.guidance == "pdg":  # a streamed clip (stream_latency.py) or a PDG step (pdg_latency.py)
        ctx.objectives.use_predictor(search_predictor(ctx.objectives.predictor, ctx.table.root, cfg.stream_chunk, steps[0],
                                                      cfg.guidance, cfg.pdg_dense))
    if budget is None:
        budget = cfg.needs_budget(frames=space.latent[1])
    check_space_match(space, ctx.table)
    check_coverage(ctx.table, space)
    predictor = ctx.objectives.predictor
    choices = SearchChoices.from_space(space)

    cache = Path(cache_dir) if cache_dir is not None else Path(ctx.checkpoint).parent / "search_cache"
    signal = ctx.use_quality(cfg.quality, cfg.quality_steps, cache)  # quality signal (search.quality); trained ones cache here
    trained_before = signal.trained_steps
    sens = slot_sensitivity(
        ctx.supernet, ctx.objectives.batch, checkpoint_sha256=ctx.checkpoint_sha256, n=ctx.n, seed=ctx.seed,
        cache_dir=cache, choices=choices,
        progress=(lambda d, t, w: progress("sensitivity", d, t, w)) if progress else None,
    )
    fit = check_budget(choices, predictor, sens, budget, steps, ctx.table.describe(), cfg.guidance)
    seeds = dp_seeds(choices, predictor, sens, budget, fit.reachable, cfg.dp_seeds, buckets=cfg.dp_buckets,
                     guidance=cfg.guidance)

    name = study_name or study_name_for(ctx.checkpoint_sha256, ctx.table_id, budget, steps, cfg.memory_mb, cfg.guidance)
    if study_name is None and cfg.quality != "supernet":  # another signal's losses must not join the same study
        name = f"{name}-{cfg.quality}{cfg.quality_steps}"
    if study_name is None and cfg.stream_chunk:  # streamed-clip latencies must not join a whole-clip study
        name = f"{name}-stream{cfg.stream_chunk}"
    memory_limit = None if cfg.memory_mb is None else float(cfg.memory_mb) * 2**20
    study = open_study(cfg, choices, store, name, budget, seeds)
    run_study(
        study, ctx.objectives.evaluate, choices, steps=steps, budget_ms=budget, n_trials=int(cfg.trials),
        memory_limit_bytes=memory_limit, base=space.max_arch(),
        progress=(lambda d, t, w: progress("search", d, t, w)) if progress else None,
    )

    # the obvious layouts at the same budget, priced and scored as the trials (the report marks them)
    baselines = score_baselines(ctx.objectives, space, budget, steps[0])

    out.mkdir(parents=True, exist_ok=True)
    all_trials = trials_frame(study)
    front = pareto_frame(study)
    files = write_tables(all_trials, out, "trials") + write_tables(front, out, "pareto")
    sens_file = write_tables(sens, out, "sensitivity")
    best = front.sort_values("quality").iloc[0].to_dict() if len(front) else None
    rerank = None
    if cfg.rerank_top and best is not None:
        best, rerank = search_rerank(cfg, ctx, all_trials, cache, progress)
    fidelity = None
    if cfg.fidelity_archs:
        fidelity = search_fidelity(cfg, ctx, signal, all_trials, cache, progress)
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
            "space_key": space.key(),
            "calibration": asdict(predictor.calibration),
        },
        "config": {**asdict(cfg), "storage": store_desc},
        "budget_ms_total": budget,
        "latency_definition": fit.definition,
        "guidance": cfg.guidance,
        "generation_pricing": {g: asdict(f) for g, f in predictor.generation.fits.items()},
        "budget_ms_per_step": {str(s): fit.per_step(s) for s in steps},
        "streaming": predictor.describe() if cfg.stream_chunk else None,
        "path_drop": predictor.describe() if cfg.guidance == "pdg" else None,
        "min_reachable_ms_per_step": fit.min_ms_per_step,
        "steps": steps,
        "steps_reachable": fit.reachable,
        "memory_limit_mb": cfg.memory_mb,
        "sampler": cfg.sampler,
        "seed": cfg.seed,
        "eval": {"n": ctx.n, "seed": ctx.seed, "quality": QUALITY_TEXT[cfg.quality].format(steps=cfg.quality_steps)},
        "quality": {**signal.describe(), "trained_steps_this_call": signal.trained_steps - trained_before},
        "dp": {"buckets": cfg.dp_buckets, "n_seeds": cfg.dp_seeds, "seeds": [{"arch": str(a), "steps": s} for a, s in seeds]},
        "sensitivity_cache": str(cache),
        "trials_this_run": int(cfg.trials),
        "trials_total": len(all_trials),
        "trials_complete": int((all_trials["state"] == "COMPLETE").sum()) if len(all_trials) else 0,
        "trials_feasible": int(all_trials["feasible"].sum()) if len(all_trials) else 0,
        "pareto_size": len(front),
        "best": None if best is None else best_record(best),
        "best_by": best_by(cfg, rerank),
        "rerank": rerank,
        "baselines": baselines,
        "fidelity": fidelity,
        "files": files + sens_file,
        "seconds_this_call": round(time.time() - started, 2),
        "versions": versions("optuna", "torch"),
    }
    write_json(out / MANIFEST, manifest)
    return manifest
