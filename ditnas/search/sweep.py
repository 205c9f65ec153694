"""`ditnas sweep` as a stage: one DP-seeded study per (budget, device table), all driven from one
process over a Ray cluster (ray_cluster.py connects, ray_driver.py runs the studies).

Every study is built exactly as `ditnas search` builds its own (study.py: the same budget check —
an unreachable budget is refused, naming the table —, the same DP seeds, the same sampler
settings), and its results go through the same atomic parquet/CSV writer:

    <out>/<table>/<budget>ms/{trials,pareto}.{parquet,csv}, study.json
    <out>/front.{parquet,csv}      every feasible front, with table and budget columns
    <out>/sweep.json               inputs, config, cluster, versions, per-study counts

Rerunning the same command tops each study up to `search.trials` finished trials.

The quality signal is `search.quality` as in `ditnas search` (a trained one, proxy or finetune, trains on the
workers and caches beside the checkpoint; its studies are named apart). `search.rerank_top` and
`search.fidelity_archs` run on the driver after the studies, once per study, exactly as `ditnas search` runs them
(stage.search_rerank / search_fidelity); their records land in the study's study.json and in sweep.json, and a
reranked study's pick is its `best`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ditnas.config import SearchConfig, SweepConfig
from ditnas.errors import ConfigFieldError, DitnasError
from ditnas.io import versions, write_json
from ditnas.search.optuna_search import decode, distributions, open_storage, pareto_frame, trials_frame, write_tables
from ditnas.search.ray_cluster import connect
from ditnas.search.ray_driver import JobSummary, Result, StudyJob, evaluate_arch_task, run_studies

JOURNAL = "sweep.journal"


def budget_dir(budget_ms: float) -> str:
    """Folder name of a budget: 12.5 -> '12.5ms'."""
    return f"{float(budget_ms):g}ms"


def study_name(prefix: str, table_name: str, budget_ms: float, quality: str = "supernet", quality_steps: int = 0) -> str:
    """One study per (table, budget); another quality signal's losses must not join the same study."""
    name = f"{prefix}-{table_name}-{budget_dir(budget_ms)}"
    return name if quality == "supernet" else f"{name}-{quality}{quality_steps}"


@dataclass
class SweepStudy:
    """One (device table, budget) cell of a sweep and its prepared job."""

    table_name: str
    budget_ms: float
    job: StudyJob
    out_dir: Path


def write_study_results(cell: SweepStudy, summary: JobSummary) -> dict[str, Any]:
    """`trials` and `pareto` tables (parquet + CSV, atomic) and `study.json` in the cell's folder;
    returns the cell's row of the sweep manifest."""
    study = cell.job.study
    trials = trials_frame(study)
    front = pareto_frame(study)
    files = write_tables(trials, cell.out_dir, "trials") + write_tables(front, cell.out_dir, "pareto")
    info = {"table": cell.table_name, "budget_ms": cell.budget_ms, "study_name": study.study_name,
            "dir": str(cell.out_dir), "trials": len(trials), "complete": summary.complete,
            "failed": summary.failed, "stale_failed": summary.stale_failed, "front": len(front),
            "errors": summary.errors[:10], "files": files}
    write_json(cell.out_dir / "study.json", info)
    return info


def run_sweep(cells: Sequence[SweepStudy], out: Path, *, storage_desc: str, max_in_flight: int | None = None,
              retries: int = 2, resources: Mapping[str, float] | None = None, num_cpus: float = 1.0,
              extra_manifest: Mapping[str, Any] | None = None,
              on_result: Callable[[str, int, Result | None], None] | None = None) -> dict[str, Any]:
    """Run every cell's study interleaved, then write per-cell tables, `front` (all feasible fronts,
    with table and budget columns) and `sweep.json`. Independent of how the cells were built (tests
    use toy evaluators)."""
    import ray

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    summaries = run_studies([c.job for c in cells], max_in_flight=max_in_flight, retries=retries,
                            resources=resources, num_cpus=num_cpus, on_result=on_result)
    seconds = time.time() - t0
    infos, fronts = [], []
    for cell, summary in zip(cells, summaries, strict=True):
        infos.append(write_study_results(cell, summary))
        front = pareto_frame(cell.job.study)
        if len(front):
            front.insert(0, "budget_ms", cell.budget_ms)
            front.insert(0, "table", cell.table_name)
            fronts.append(front)
    combined = pd.concat(fronts, ignore_index=True) if fronts else pd.DataFrame(columns=["table", "budget_ms", "number"])
    files = write_tables(combined, out, "front")
    manifest = {
        "kind": "ditnas.sweep", "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(seconds, 2),
        "storage": storage_desc, "studies": infos, "files": files,
        "cluster": {"nodes": len([n for n in ray.nodes() if n.get("Alive")]),
                    "resources": {k: float(v) for k, v in ray.cluster_resources().items()}},
        "task": {"num_cpus": num_cpus, "resources": dict(resources or {}), "retries": retries},
        **dict(extra_manifest or {}),
        "versions": versions("optuna", "ray", "torch"),
    }
    write_json(out / "sweep.json", manifest)
    return manifest


def sweep(
    search_cfg: SearchConfig,
    sweep_cfg: SweepConfig,
    checkpoint: Path | str,
    tables: Sequence[Path | str],
    out: Path | str,
    *,
    resources: Mapping[str, float] | None = None,
    on_result: Callable[[str, int, Result | None], None] | None = None,
    progress: Callable[[str, int, int, str], None] | None = None,
) -> dict[str, Any]:
    """(budget × device table) searches over a Ray cluster: one study per pair in one storage
    (`search.storage`, default the journal `out/sweep.journal`). `search.budget_ms` is not used: the
    budgets are `sweep.budgets_ms`. Every study is checked and seeded as `ditnas search` does."""
    from optuna.trial import TrialState

    # lazy: the single-machine search's helpers load torch
    from ditnas.latency_models.stage import load_predictor, table_dir
    from ditnas.search.objectives import EvalContext
    from ditnas.search.problem import check_coverage
    from ditnas.search.sensitivity import slot_sensitivity
    from ditnas.search.space import SearchChoices
    from ditnas.search.stage import check_space_match
    from ditnas.search.study import check_budget, check_priced, dp_seeds, open_study
    from ditnas.supernet.flow import EVAL_SEED, VAL_BATCH

    search_cfg.check()
    sweep_cfg.check()
    if search_cfg.stream_chunk:  # its Ray workers price with the tables' whole-clip predictors
        raise ConfigFieldError("search.stream_chunk", f"{search_cfg.stream_chunk}: `ditnas sweep` prices whole-clip calls "
                               "only; run `ditnas search --stream-chunk K --target-fps F` once per target instead")
    if search_cfg.guidance == "pdg":  # its Ray workers price one batch-1 (or CFG batch-2) call per step
        raise ConfigFieldError("search.guidance", "pdg: `ditnas sweep` prices none or cfg generations only; run "
                               "`ditnas search --guidance pdg` once per budget instead")
    budgets = [float(b) for b in sweep_cfg.budgets_ms]
    tables = [Path(t) for t in tables]
    checkpoint, out = Path(checkpoint), Path(out)
    steps = search_cfg.sorted_steps
    if not tables:
        raise DitnasError("sweep needs at least one latency table (`--tables`)")
    for p in [checkpoint, *tables]:
        if not p.exists():
            raise DitnasError(f"{p} does not exist; pass an existing {'checkpoint' if p == checkpoint else 'latency table'}")
    # a table folder inside a session (`<session>/table`) is named after its session
    names = [t.parent.name if t.name == "table" else t.stem for t in tables]
    if len(set(names)) != len(names):
        raise DitnasError(f"device tables must have distinct folder names (they name the result folders): {names}")
    n_eval = int(search_cfg.eval_items or VAL_BATCH)  # the same fixed batch as `ditnas search`
    # the driver checks budgets and prices DP seeds: the supernet's replacement sensitivity (cached
    # beside the checkpoint, shared with `ditnas search`) and each table's predictor; candidates are
    # evaluated on the workers
    ctx = EvalContext.from_paths(checkpoint, None, n_eval, EVAL_SEED, steps)
    space = ctx.space
    choices = SearchChoices.from_space(space)
    base = space.max_arch()
    sens = slot_sensitivity(ctx.supernet, ctx.objectives.batch, checkpoint_sha256=ctx.checkpoint_sha256, n=ctx.n,
                            seed=ctx.seed, cache_dir=checkpoint.parent / "search_cache", choices=choices)
    del ctx
    plans = []
    for table, tname in zip(tables, names, strict=True):
        table_obj, predictor = load_predictor(table_dir(table))
        check_space_match(space, table_obj)
        check_coverage(table_obj, space)
        check_priced(search_cfg, table_obj, predictor)
        for b in budgets:
            try:
                fit = check_budget(choices, predictor, sens, b, steps, table_obj.describe(), search_cfg.guidance)
            except ConfigFieldError as exc:  # the budget is one of sweep.budgets_ms, not search.budget_ms
                raise ConfigFieldError("sweep.budgets_ms", exc.detail) from None
            plans.append((table, tname, b, predictor, fit))

    conn = connect(sweep_cfg.ray_address)
    store, storage_desc = open_storage(search_cfg.storage or str(out / JOURNAL), out)
    dists = distributions(choices, steps)

    def make_params(trial: Any) -> tuple[str, int]:
        for name, d in dists.items():
            trial.suggest_categorical(name, d.choices)
        arch, s = decode(choices, trial.params, base, steps)
        return str(arch), s

    memory_limit = None if search_cfg.memory_mb is None else float(search_cfg.memory_mb) * 2**20
    cells, seeded = [], {}
    for table, tname, b, predictor, fit in plans:
        seeds = dp_seeds(choices, predictor, sens, b, fit.reachable, search_cfg.dp_seeds, buckets=search_cfg.dp_buckets,
                         guidance=search_cfg.guidance)
        name = study_name(sweep_cfg.prefix, tname, b, search_cfg.quality, search_cfg.quality_steps)
        study = open_study(search_cfg, choices, store, name, b, seeds,
                           constant_liar=True, user_attrs={"table": str(table)})
        seeded[f"{tname}/{budget_dir(b)}"] = [{"arch": str(a), "steps": s} for a, s in seeds]
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)))

        def constraints(result: Result, b: float = b) -> dict[str, float]:
            c = {"latency": float(result["latency_ms"]) - b}
            if memory_limit is not None:
                c["memory"] = float(result["memory_bytes"]) - memory_limit
            return c

        job = StudyJob(study, evaluate_arch_task, make_params, max(0, int(search_cfg.trials) - done),
                       eval_args=(str(checkpoint), str(table), n_eval, EVAL_SEED, search_cfg.guidance, search_cfg.quality,
                                  search_cfg.quality_steps), constraints_fn=constraints,
                       label=f"{tname}/{budget_dir(b)}")
        cells.append(SweepStudy(tname, b, job, out / tname / budget_dir(b)))
    extra = {"checkpoint": str(checkpoint), "tables": [str(t) for t in tables], "budgets_ms": budgets,
             "steps": steps, "config": {"search": {**asdict(search_cfg), "storage": storage_desc},
                                        "sweep": asdict(sweep_cfg)},
             "eval": {"n": n_eval, "seed": EVAL_SEED}, "dp_seeds": seeded,
             "ray": {"address": conn.address, "token_auth": conn.token_auth}}
    manifest = run_sweep(cells, out, storage_desc=storage_desc, max_in_flight=sweep_cfg.max_in_flight,
                         retries=sweep_cfg.retries, resources=resources, num_cpus=sweep_cfg.num_cpus,
                         extra_manifest=extra, on_result=on_result)
    if search_cfg.rerank_top or search_cfg.fidelity_archs:
        check_after_search(search_cfg, checkpoint, n_eval, cells, manifest, out, progress)
    return manifest


def check_after_search(search_cfg: SearchConfig, checkpoint: Path, n_eval: int, cells: Sequence[SweepStudy],
                       manifest: dict[str, Any], out: Path, progress: Callable[[str, int, int, str], None] | None) -> None:
    """`search.rerank_top` and `search.fidelity_archs` on every finished study, on the driver, as `ditnas search`
    runs them; each study's study.json gets `best`, `rerank` and `fidelity`, sweep.json the same per study."""
    from ditnas.search.objectives import EvalContext
    from ditnas.search.stage import best_by, best_record, search_fidelity, search_rerank
    from ditnas.supernet.flow import EVAL_SEED

    ctx = EvalContext.from_paths(checkpoint, None, n_eval, EVAL_SEED)
    cache = checkpoint.parent / "search_cache"  # where the workers' trained signals are cached
    signal = ctx.use_quality(search_cfg.quality, search_cfg.quality_steps, cache)
    for cell, info in zip(cells, manifest["studies"], strict=True):
        trials = trials_frame(cell.job.study)
        feasible = trials[(trials["state"] == "COMPLETE") & trials["feasible"].astype(bool)] if len(trials) else trials
        if not len(feasible):
            info.update(best=None, best_by="no feasible trial", rerank=None, fidelity=None)
        else:
            best, rerank = feasible.sort_values(["quality", "latency_ms"]).iloc[0].to_dict(), None
            if search_cfg.rerank_top:
                best, rerank = search_rerank(search_cfg, ctx, trials, cache, progress)
            fidelity = search_fidelity(search_cfg, ctx, signal, trials, cache, progress) if search_cfg.fidelity_archs else None
            info.update(best=best_record(best), best_by=best_by(search_cfg, rerank), rerank=rerank, fidelity=fidelity)
        write_json(cell.out_dir / "study.json", info)
    write_json(out / "sweep.json", manifest)
