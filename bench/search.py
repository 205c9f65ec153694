"""Benchmark: is the search stage exact, fast, and does DP seeding pay off with real objectives?

    python bench/search.py --out bench/results/search.json [--checkpoint runs/t5/checkpoint.pt]
        [--table runs/bench_latency/table] [--budget-ms X] [--trials 60] [--seeds 5] [--dp-seeds 16]
        [--population 24] [--at 8,16,32,60]

The runs. For each sampler seed s = 0 … `--seeds`−1, `run_search` (the `ditnas search` stage, called in
one place: `search_once`) runs twice, each in a fresh journal, with NSGA-II (population `--population`)
seeded with s and exactly `--trials` trials:
- *seeded*: `--dp-seeds` exact-DP layouts enqueued first (they are trials 1 … d and count as trials);
- *cold*: no DP layouts (`n_seeds=0`).
Both runs of a seed draw from the same sampler stream (a paired comparison). All runs share one
`EvalContext` (n=128 eval items, seed 1234, 1 torch thread), so an arch is evaluated once across runs.
The budget (total ms, steps × per step) is `--budget-ms`, else midway between the min reachable
per-step latency and the `max` arch's predicted per-step latency, × `--steps`.

Hypervolume (HV), both objectives minimised:
- points: the *feasible* complete trials (predicted total latency <= budget) as
  (latency_ms total, quality = weight-sharing val flow loss on the n=128 search batch);
- reference point r, one for every run and seed, fixed after all runs:
  r = (budget_ms, 1.1 × the largest feasible quality any run observed);
- exact 2-D HV (sort by latency, sweep the running best quality, add strips); HV(run, k) is the HV of the
  feasible points among the run's first k trials (1-based, in trial-number order, every asked trial counts);
- reported values are normalised by the area of the box between the ideal point (min reachable
  latency × steps, the smallest feasible quality any run observed) and r; no trial count or ratio below
  depends on the normalisation (the reference point does matter).

Figures written to the JSON:
- `dp_matches_bruteforce`, `dp_seconds_n28` (and all of `bench/search_dp.py`'s figures under `dp`): that
  script's `main()` run through an import of its module, with a temporary --out.
- `trials_ratio_seeded_vs_cold` (headline, goal <= 1/3): per seed, T_cold = the cold run's trial count
  (`--trials`) and k_seeded = the first k with HV(seeded, k) >= HV(cold, T_cold) (relative tolerance
  1e-12) and HV(seeded, k) > 0. ratio(seed) = k_seeded / T_cold. The headline is the mean over seeds.
  If the seeded run never reaches that HV within its own trials, the seed is *censored*: k_seeded is
  counted as seeded trials + 1, the seed is listed in `trials_ratio.censored_seeds`, and the mean is then
  only a lower bound (`trials_ratio.mean_is_lower_bound`). `trials_ratio_goal_status`: "met" (mean <= 1/3
  and no seed censored), "missed" (mean > 1/3; censoring would only raise it), else "not established".
  `trials_ratio` also holds the per-seed values, min, median, max, and the ratio of means
  (Σ k_seeded ÷ Σ T_cold). If the cold run has no feasible trial at all (HV 0) the seed is flagged
  `cold_final_hv_zero` (the target is then "any feasible point").
- `hv_at_equal_trials`: for each k in `--at` (those <= `--trials`) and k = all trials: HV(seeded, k) and
  HV(cold, k) per seed (normalised), their means over seeds, the mean difference seeded − cold and the
  number of seeds in which seeded > cold, = cold, < cold.
- `secondary_trials_to_95pct_of_final` (kept only for comparison with earlier reports, NOT the
  headline): per seed, the first k at which each run reaches 0.95 × max(final seeded HV, final cold HV);
  a run that never does is shown as trials + 1 and flagged censored. No ratio is formed from it.
- `hv_final_mean`, per seed `hv_gain_after_dp_seeds` (HV(seeded, T) − HV(seeded, d), d = DP layouts
  enqueued: what the sampler added after the seeds), feasible trials per run, the HV curves of every run.
- `best_vs_baselines`: the best feasible arch of the seeded runs (lowest n=128 loss) vs a uniform-
  interleave arch (`lcha`/`ssa`, else `sa`/`ssa`, slot by slot at the space's stage layout, no skips) and
  an all-SA arch, each at the widest width (then largest MLP ratio) whose predicted total latency fits the
  budget, all scored with the weight-sharing val loss on n=512 (seed 1234); the unconstrained max arch
  for reference.
- `inputs` (checkpoint sha256, table id, device, calibration, budget, trials, seeds; and, when the files
  exist, fields of the checkpoint's `run.json` and of the profiling session's `manifest.json` next to
  the table: steps trained, training wall time, session start/end), `seconds` (wall
  time per phase and per run), machine info with the load average at start and at end.

Quality is memoised per arch across all runs (one `EvalContext`, `Objectives` caches), and the
per-slot sensitivity scores come from the cache in `<checkpoint folder>/search_cache`, so reruns are cheap.
Evaluation uses 1 torch thread (`torch.set_num_threads(1)`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

warnings.filterwarnings("ignore", category=FutureWarning)

import optuna
import pandas as pd
import torch

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, report

from ditnas.arch import Arch
from ditnas.config import SearchConfig
from ditnas.errors import DitnasError
from ditnas.latency_models.stage import table_dir
from ditnas.search.baselines import baseline_layouts
from ditnas.search.objectives import EvalContext
from ditnas.supernet.flow import EVAL_SEED
from ditnas.search.problem import min_reachable_ms
from ditnas.search.sensitivity import slot_sensitivity
from ditnas.search.space import SearchChoices
from ditnas.search.stage import check_space_match, run_search

import search_dp  # bench/search_dp.py: dp_matches_bruteforce, dp_seconds_n28

SEARCH_N = 128  # eval items per candidate during the search (cheap)
FINAL_N = 512  # eval items for the best-vs-baselines comparison (the `ditnas train` validation size)
SECONDARY_FRACTION = 0.95  # the old "95% of final" crossing, kept as a secondary figure only
REF_MARGIN = 1.1
HV_AT = (8, 16, 32, 60)  # default k for the HV-at-equal-trials figure (plus k = all trials)
RATIO_GOAL = 1 / 3



# ----- DP figures: bench/search_dp.py through its module ---------------------------------------------
def dp_figures(seed: int = 0) -> dict:
    """Run `search_dp.main()` (its own argument parser, a temporary --out) and return its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "search_dp.json"
        argv = sys.argv
        sys.argv = ["search_dp.py", "--out", str(out), "--seed", str(seed)]
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                search_dp.main()
        finally:
            sys.argv = argv
        return json.loads(out.read_text())


# ----- hypervolume -----------------------------------------------------------------------------------
def hypervolume_2d(points, ref: tuple[float, float]) -> float:
    """Exact area dominated by `points` (both coordinates minimised) and bounded by `ref`.

    Sort by the first coordinate; each point that improves the running best second coordinate adds the
    strip [q, best_q) × [l, ref_l). Hand check: ref (1, 1), points (0, .5), (.5, 0) -> 1·.5 + .5·.5 = .75,
    the union of the two rectangles (.5 + .5 − .25)."""
    rl, rq = ref
    pts = sorted((float(l), float(q)) for l, q in points if l < rl and q < rq)
    hv, best_q = 0.0, rq
    for l, q in pts:
        if q < best_q:
            hv += (rl - l) * (best_q - q)
            best_q = q
    return hv


def hv_curve(trials: pd.DataFrame, ref: tuple[float, float]) -> list[float]:
    """Hypervolume of the feasible complete trials among the first k trials, k = 1..len(trials)."""
    out, points = [], []
    for row in trials.sort_values("number").itertuples(index=False):
        if row.state == "COMPLETE" and bool(row.feasible):
            points.append((row.latency_ms, row.quality))
        out.append(hypervolume_2d(points, ref))
    return out


def trials_to_reach(curve: list[float], target: float) -> tuple[int, bool]:
    """(first 1-based k with curve[k-1] >= target, reached?); len(curve) + 1 when never reached."""
    for k, hv in enumerate(curve, start=1):
        if hv >= target * (1 - 1e-12) and hv > 0:
            return k, True
    return len(curve) + 1, False


# ----- baselines (ditnas.search.baselines) -------------------------------------------------------
def describe_arch(arch: Arch, steps: int, obj_search, obj_final, budget_ms: float) -> dict:
    total = steps * obj_final.step_ms(arch)
    return {"arch": str(arch), "quality_val_loss_n512": obj_final.quality(arch),
            "quality_val_loss_n128": obj_search.quality(arch), "latency_ms": total,
            "latency_ms_step": obj_final.step_ms(arch), "fits_budget": bool(total <= budget_ms),
            "params": obj_final.params(arch)}



# ----- the figures from the HV curves (pure functions of the curves) ---------------------------------
def trials_to_cold_final(seeded_curve: list[float], cold_curve: list[float]) -> dict:
    """The headline figure for one seed: trials the seeded run needs to reach the HV the cold run has at
    its last trial, ÷ the cold run's trial count. Censored (counted as len(seeded) + 1) if never reached."""
    if not cold_curve:
        raise ValueError("the cold run has no trials")
    target = cold_curve[-1]
    k, reached = trials_to_reach(seeded_curve, target)
    return {"cold_trials": len(cold_curve), "seeded_trials": len(seeded_curve), "cold_final_hv_raw": target,
            "trials_seeded_to_cold_final": k if reached else None, "counted_as": k, "censored": not reached,
            "cold_final_hv_zero": target <= 0, "ratio": k / len(cold_curve)}


def ratio_summary(entries: list[dict]) -> dict:
    """Mean (headline), median, max, ratio of means, censored seeds over per-seed `trials_to_cold_final`."""
    ratios = [e["ratio"] for e in entries]
    censored = [e["seed"] for e in entries if e["censored"]]
    mean = statistics.fmean(ratios)
    # with censored seeds the mean is a lower bound: above the goal it is still a miss, below it proves nothing
    status = "missed" if mean > RATIO_GOAL else "not established (censored seeds)" if censored else "met"
    return {"mean": mean, "median": statistics.median(ratios), "max": max(ratios), "min": min(ratios),
            "ratio_of_means": sum(e["counted_as"] for e in entries) / sum(e["cold_trials"] for e in entries),
            "per_seed": entries, "censored_seeds": censored, "n_censored": len(censored),
            "mean_is_lower_bound": bool(censored), "goal": "<= 1/3", "goal_status": status,
            "goal_met": status == "met"}


def hv_at_equal_trials(curves: dict[int, tuple[list[float], list[float]]], ks: list[int], box: float) -> dict:
    """HV(seeded, k) and HV(cold, k) (normalised by `box`) per seed for each k, and their means over seeds.
    `curves[seed] = (seeded curve, cold curve)`; k = "all" is each run's last trial."""
    out = {}
    n = min(min(len(s), len(c)) for s, c in curves.values())
    for k in [k for k in ks if k <= n] + ["all"]:
        rows = []
        for seed, (cs, cc) in sorted(curves.items()):
            hs, hc = (cs[-1], cc[-1]) if k == "all" else (cs[k - 1], cc[k - 1])
            rows.append({"seed": seed, "seeded": hs / box, "cold": hc / box})
        diff = [r["seeded"] - r["cold"] for r in rows]
        out[str(k)] = {"trials": n if k == "all" else k,
                       "seeded_mean": statistics.fmean(r["seeded"] for r in rows),
                       "cold_mean": statistics.fmean(r["cold"] for r in rows),
                       "seeded_minus_cold_mean": statistics.fmean(diff),
                       "seeds_seeded_better": sum(d > 1e-12 for d in diff),
                       "seeds_equal": sum(abs(d) <= 1e-12 for d in diff),
                       "seeds_cold_better": sum(d < -1e-12 for d in diff), "per_seed": rows}
    return out


def secondary_95(seeded_curve: list[float], cold_curve: list[float]) -> dict:
    """The old figure, secondary only: first k at which each run reaches 0.95 × max(final seeded, final cold)."""
    final = max(seeded_curve[-1], cold_curve[-1])
    ks, rs = trials_to_reach(seeded_curve, SECONDARY_FRACTION * final)
    kc, rc = trials_to_reach(cold_curve, SECONDARY_FRACTION * final)
    return {"seeded": ks, "seeded_censored": not rs, "cold": kc, "cold_censored": not rc}


# ----- provenance of the inputs (their own JSON manifests, if next to them) ---------------------------
def manifest_fields(path: Path, keys: tuple[str, ...]) -> dict | None:
    """`keys` of the JSON file at `path` (e.g. the checkpoint's run.json: steps trained, wall time), or None."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return {"file": str(path), **{k: data.get(k) for k in keys}}


# ----- the one call into the search stage ------------------------------------------------------------
def search_once(ctx: EvalContext, checkpoint: Path, table: Path, budget_ms: float, steps: int, trials: int,
                out: Path, *, seed: int, dp_seeds: int, population: int, name: str) -> tuple[pd.DataFrame, dict]:
    """One `ditnas search` run in a fresh journal under `out`: NSGA-II with sampler seed `seed`, `dp_seeds`
    DP layouts enqueued first (0 = cold). Returns (trials by number, manifest). The only `run_search` call."""
    if (out / "study.journal").exists():
        (out / "study.journal").unlink()  # a fresh study: run_search continues an existing journal
    cfg = SearchConfig(budget_ms=budget_ms, steps=(steps,), trials=trials, sampler="nsga2", seed=seed,
                       dp_seeds=dp_seeds, population=population)
    manifest = run_search(cfg, checkpoint, table, out, context=ctx, study_name=name)
    df = pd.read_parquet(out / "trials.parquet").sort_values("number").reset_index(drop=True)
    return df, manifest


# ----- main ------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/t5/checkpoint.pt"))
    parser.add_argument("--table", type=Path, default=Path("runs/bench_latency/table"))
    parser.add_argument("--budget-ms", type=float, default=None,
                        help="total budget (steps × per step); default: midway between the min reachable and the max arch")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--trials", type=int, default=60, help="trials per run (seeded and cold alike)")
    parser.add_argument("--seeds", type=int, default=5, help="sampler seeds (each: one seeded and one cold run)")
    parser.add_argument("--dp-seeds", type=int, default=16, help="DP layouts enqueued in the seeded runs")
    parser.add_argument("--population", type=int, default=24, help="NSGA-II population size")
    parser.add_argument("--at", type=str, default=",".join(map(str, HV_AT)),
                        help="trial counts k for the HV-at-equal-trials figure (k = all is always added)")
    parser.add_argument("--work", type=Path, default=None, help="keep the studies here (default: a temporary folder)")
    args = parser.parse_args()
    if args.trials < 1 or args.seeds < 1:
        sys.exit("error: --trials and --seeds must be >= 1")
    at = sorted({int(k) for k in args.at.split(",") if k.strip()})
    started = time.time()
    torch.set_num_threads(1)
    info = machine("torch", "optuna", "numpy", "pandas", torch_threads=torch.get_num_threads())

    troot = table_dir(args.table)
    if not (troot / "table.json").exists():
        sys.exit(f"error: no latency table at {args.table} (table.json missing); build one, e.g. "
                 "`ditnas profile --backend host-torch --out runs/bench_search_profile --models 0 --warmup 2 --iters 10` "
                 "and pass --table runs/bench_search_profile/table")
    if not args.checkpoint.exists():
        sys.exit(f"error: checkpoint {args.checkpoint} not found")

    # 1. the DP figures
    t0 = time.time()
    dp = dp_figures()
    dp_seconds = time.time() - t0

    # 2. objectives, sensitivity (cached), budget
    t0 = time.time()
    ctx = EvalContext.from_paths(args.checkpoint, args.table, n=SEARCH_N, seed=EVAL_SEED, steps=(args.steps,))
    space, predictor, obj = ctx.space, ctx.objectives.predictor, ctx.objectives
    check_space_match(space, ctx.table)
    choices = SearchChoices.from_space(space)
    sens = slot_sensitivity(ctx.supernet, obj.batch, checkpoint_sha256=ctx.checkpoint_sha256, n=ctx.n, seed=ctx.seed,
                            cache_dir=Path(ctx.checkpoint).parent / "search_cache", choices=choices)
    min_step = float(min_reachable_ms(choices, predictor, sens))
    max_step = float(predictor.predict(space.max_arch()))
    if args.budget_ms is None:
        budget = float(args.steps * (min_step + max_step) / 2)
        budget_rule = "midway between the min reachable and the max arch latency, × steps"
    else:
        budget = float(args.budget_ms)
        budget_rule = "--budget-ms"
    setup_seconds = time.time() - t0
    print(f"table {troot} ({ctx.table.describe()}), budget {budget:.4g} ms "
          f"(min reachable {args.steps * min_step:.4g}, max arch {args.steps * max_step:.4g} ms at {args.steps} steps)")

    # 3. seeded vs cold runs
    t0 = time.time()
    runs: dict[tuple[int, str], pd.DataFrame] = {}
    seeds_enqueued: dict[int, list] = {}
    run_seconds: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_search_")))
        for seed in range(args.seeds):
            for kind in ("seeded", "cold"):
                ts = time.time()
                df, manifest = search_once(ctx, args.checkpoint, args.table, budget, args.steps, args.trials,
                                           work / f"{kind}-{seed}", seed=seed,
                                           dp_seeds=args.dp_seeds if kind == "seeded" else 0,
                                           population=args.population, name=f"bench-{kind}-{seed}")
                runs[(seed, kind)] = df
                if kind == "seeded":
                    seeds_enqueued[seed] = manifest["dp"]["seeds"]
                run_seconds[f"{kind}-{seed}"] = round(time.time() - ts, 2)
                print(f"  seed {seed} {kind:<6} {len(df)} trials, {int(df['feasible'].sum())} feasible, "
                      f"{len(obj._quality)} archs evaluated so far, {time.time() - ts:.1f} s", flush=True)
    search_seconds = time.time() - t0

    # 4. hypervolume: one reference point for every run
    feasible = pd.concat([df[(df["state"] == "COMPLETE") & df["feasible"]] for df in runs.values()])
    q_max = float(feasible["quality"].max()) if len(feasible) else 1.0
    q_min = float(feasible["quality"].min()) if len(feasible) else 0.0
    ref = (budget, REF_MARGIN * q_max)
    ideal = (args.steps * min_step, q_min)
    box = (ref[0] - ideal[0]) * (ref[1] - ideal[1])
    curves = {seed: (hv_curve(runs[(seed, "seeded")], ref), hv_curve(runs[(seed, "cold")], ref))
              for seed in range(args.seeds)}
    headline, per_seed, secondary = [], [], []
    for seed, (cs, cc) in curves.items():
        h = trials_to_cold_final(cs, cc)
        h["cold_final_hv"] = h.pop("cold_final_hv_raw") / box
        headline.append({"seed": seed, **h})
        secondary.append({"seed": seed, **secondary_95(cs, cc)})
        d = len(seeds_enqueued[seed])
        per_seed.append({"seed": seed, "hv_final_seeded": cs[-1] / box, "hv_final_cold": cc[-1] / box,
                         "dp_seeds_enqueued": d,
                         # how much the sampler added after the enqueued DP layouts (0: the seeds are the front)
                         "hv_after_dp_seeds": cs[min(d, len(cs)) - 1] / box if d else None,
                         "hv_gain_after_dp_seeds": (cs[-1] - cs[min(d, len(cs)) - 1]) / box if d else None,
                         "feasible_seeded": int(runs[(seed, "seeded")]["feasible"].sum()),
                         "feasible_cold": int(runs[(seed, "cold")]["feasible"].sum()),
                         "hv_seeded_curve": [round(x / box, 5) for x in cs],
                         "hv_cold_curve": [round(x / box, 5) for x in cc]})
    ratio = ratio_summary(headline)
    equal = hv_at_equal_trials(curves, at, box)
    hv_seeded_mean = statistics.fmean(p["hv_final_seeded"] for p in per_seed)
    hv_cold_mean = statistics.fmean(p["hv_final_cold"] for p in per_seed)

    # 5. best feasible (seeded runs) vs baselines, n=512
    t0 = time.time()
    final_ctx = EvalContext.from_paths(args.checkpoint, args.table, n=FINAL_N, seed=EVAL_SEED, steps=(args.steps,))
    fobj = final_ctx.objectives
    seeded_feasible = pd.concat([runs[(s, "seeded")] for s in range(args.seeds)])
    seeded_feasible = seeded_feasible[(seeded_feasible["state"] == "COMPLETE") & seeded_feasible["feasible"]]
    best = None
    if len(seeded_feasible):
        row = seeded_feasible.sort_values(["quality", "latency_ms"]).iloc[0]
        best = describe_arch(space.parse(str(row["arch"])), args.steps, obj, fobj, budget)
    baselines = {}
    # as before this bench's baselines are priced steps x the per-step prediction (its budget is per step x steps)
    for name, fit in baseline_layouts(space, lambda a: args.steps * float(predictor.predict(a)), budget, args.steps).items():
        if fit["fits"]:
            entry = describe_arch(fit["arch"], args.steps, obj, fobj, budget)
            entry["fits"] = True
            if best is not None:
                entry["best_minus_baseline_loss_n512"] = best["quality_val_loss_n512"] - entry["quality_val_loss_n512"]
            baselines[name] = entry
        else:
            baselines[name] = {k: v for k, v in fit.items() if k != "arch"}
    reference_max = describe_arch(space.max_arch(), args.steps, obj, fobj, budget)
    baseline_seconds = time.time() - t0

    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    result = {
        "dp_matches_bruteforce": dp["dp_matches_bruteforce"],
        "dp_seconds_n28": dp["dp_seconds_n28"],
        "trials_ratio_seeded_vs_cold": ratio["mean"],
        "trials_ratio_seeded_vs_cold_definition": (
            "per seed: first k (1-based, DP seeds included) at which HV(seeded, k) >= HV(cold, all its trials), "
            "divided by the cold run's trial count; mean over seeds. Censored seeds (never reached) count as "
            "seeded trials + 1 and make the mean a lower bound."),
        "trials_ratio_goal": "<= 1/3",
        "trials_ratio_goal_status": ratio["goal_status"],
        "trials_ratio_censored_seeds": ratio["censored_seeds"],
        "trials_ratio": ratio,
        "hv_at_equal_trials": equal,
        "hv_final_mean": {"seeded": hv_seeded_mean, "cold": hv_cold_mean},
        "secondary_trials_to_95pct_of_final": {
            "definition": (f"NOT the headline. Per seed and run: first k at which HV(run, k) >= {SECONDARY_FRACTION} "
                           "× max(final seeded HV, final cold HV); trials + 1 and censored if never"),
            "per_seed": secondary},
        "best_vs_baselines": {"budget_ms": budget, "steps": args.steps, "best_seeded": best, **baselines,
                              "max_arch_unconstrained": reference_max,
                              "quality": f"weight-sharing validation flow-matching loss on n={FINAL_N} (lower is better)"},
        "hypervolume": {
            "points": "feasible complete trials (latency_ms total <= budget), (latency_ms total, val loss n=128)",
            "reference_point": {"latency_ms": ref[0], "quality": ref[1],
                                "rule": f"(budget, {REF_MARGIN} × max feasible quality over all runs and seeds)"},
            "ideal_point": {"latency_ms": ideal[0], "quality": ideal[1],
                            "rule": "(min reachable latency × steps, min feasible quality over all runs)"},
            "normalised_by": "area of the box between the ideal and the reference point",
            "box_area": box,
            "per_seed": per_seed,
        },
        "dp": dp,
        "inputs": {
            "checkpoint": str(args.checkpoint), "checkpoint_sha256": ctx.checkpoint_sha256,
            "table": str(troot), "table_id": ctx.table_id, "table_describe": ctx.table.describe(),
            "device": ctx.table.identity, "calibration": asdict(predictor.calibration),
            "budget_ms": budget, "budget_rule": budget_rule, "budget_ms_per_step": budget / args.steps,
            "min_reachable_ms_per_step": min_step, "max_arch_ms_per_step": max_step, "steps": args.steps,
            "trials_per_run": args.trials, "seeds": args.seeds, "sampler": "nsga2", "population_size": args.population,
            "dp_seeds": args.dp_seeds, "search_eval": {"n": SEARCH_N, "seed": EVAL_SEED},
            "final_eval": {"n": FINAL_N, "seed": EVAL_SEED}, "sensitivity_cells": len(sens),
            # how the inputs were made, from their own manifests (training wall time, profiling session times)
            "checkpoint_run": manifest_fields(Path(args.checkpoint).parent / "run.json",
                                              ("step", "finished", "seconds_this_call", "val_flow_loss_ema")),
            "table_session": manifest_fields(troot.parent / "manifest.json",
                                             ("session_id", "created_at", "updated_at", "warmup", "iters")),
        },
        "archs_evaluated": len(obj._quality),
        "seconds": {"dp": round(dp_seconds, 2), "setup": round(setup_seconds, 2), "search": round(search_seconds, 2),
                    "baselines": round(baseline_seconds, 2), "total": round(time.time() - started, 2),
                    "per_run": run_seconds},
        "machine": {**info, "loadavg_at_end": None if load_end is None else [round(x, 2) for x in load_end]},
    }

    def fmt_arch(entry: dict | None) -> str:
        if entry is None:
            return "none feasible"
        if not entry.get("fits", True) and "quality_val_loss_n512" not in entry:
            return entry["note"]
        return (f"loss {entry['quality_val_loss_n512']:.4f}, {entry['latency_ms']:.4g} ms  "
                f"{entry['arch'].split('] ', 1)[-1]}")

    def fmt_k(e: dict) -> str:
        return f"{e['counted_as']} (censored)" if e["censored"] else str(e["counted_as"])

    goal = ratio["goal_status"]
    rows = [
        ("table", f"{troot} ({ctx.table.describe()}, id {ctx.table_id})"),
        ("budget (ms, total)", f"{budget:.4g} at {args.steps} steps ({budget_rule})"),
        ("trials per run, seeds", f"{args.trials}, {args.seeds} (seeded: {args.dp_seeds} DP layouts first)"),
        ("dp == brute force", f"{dp['dp_matches_bruteforce']:.0%} of {dp['instances']}, N <= {dp['max_slots']}"),
        ("dp seconds, N=28 O=4 B=2000", f"{dp['dp_seconds_n28']:.4f}"),
        ("seeded trials to cold's final HV", " ".join(fmt_k(e) for e in headline)
         + f"  (cold: {args.trials} trials)"),
        ("ratio per seed", " ".join(f"{e['ratio']:.3f}" + ("(censored)" if e["censored"] else "") for e in headline)),
        ("trials_ratio_seeded_vs_cold", f"mean {ratio['mean']:.3f}, median {ratio['median']:.3f}, max {ratio['max']:.3f}"
         f" (goal <= 0.333: {goal}; censored seeds: {ratio['censored_seeds'] or 'none'})"),
    ]
    for k, e in equal.items():
        rows.append((f"HV at k={e['trials']}" + (" (all)" if k == "all" else ""),
                     f"seeded {e['seeded_mean']:.3f}, cold {e['cold_mean']:.3f}  (seeded better in "
                     f"{e['seeds_seeded_better']}, equal {e['seeds_equal']}, cold better {e['seeds_cold_better']})"))
    rows += [
        ("feasible trials per run", "seeded " + " ".join(str(p["feasible_seeded"]) for p in per_seed)
                                    + "; cold " + " ".join(str(p["feasible_cold"]) for p in per_seed)),
        ("secondary: trials to 95% of final", "seeded " + " ".join(
            f"{s['seeded']}" + ("(censored)" if s["seeded_censored"] else "") for s in secondary) + "; cold " + " ".join(
            f"{s['cold']}" + ("(censored)" if s["cold_censored"] else "") for s in secondary)),
        ("HV ref (ms, loss)", f"({ref[0]:.4g}, {ref[1]:.4f})"),
        ("best feasible (seeded)", fmt_arch(best)),
    ]
    for name, entry in baselines.items():
        rows.append((name, fmt_arch(entry)))
    rows += [("max arch (unconstrained)", fmt_arch(reference_max)),
             ("archs evaluated", str(len(obj._quality))),
             ("seconds", f"{result['seconds']['total']:.0f} (search {search_seconds:.0f})")]
    report(rows, result, args.out)


if __name__ == "__main__":
    main()
