"""Benchmark: is the search stage exact, fast, and does DP seeding pay off with real objectives?

    python bench/search.py --out bench/results/search.json [--checkpoint runs/t5/checkpoint.pt]
        [--table runs/bench_latency/table] [--budget-ms X] [--trials 60] [--seeds 5]

Prints a table and writes JSON with:
- dp_matches_bruteforce, dp_seconds_n28 (and the rest of `bench/search_dp.py`'s figures, under `dp`):
  that script's `main()` run through an import of its module, not a copy;
- trials_ratio_seeded_vs_cold: for each of `--seeds` sampler seeds, two `ditnas search` runs
  (`stage.run_search`, NSGA-II, `--trials` trials each, a fresh journal each): *seeded* (the DP layouts
  enqueued first, `--dp-seeds` of them) and *cold* (no seeds). Per seed: trials each run needs to reach
  95% of the final hypervolume, seeded ÷ cold; the headline is the mean of the per-seed ratios (goal <= 1/3).
- best_vs_baselines: the best feasible arch of the seeded runs vs a uniform-interleave arch and an all-SA
  arch at the widest width that fits the same budget, scored with the weight-sharing val loss on n=512.
- inputs (checkpoint sha256, table id, device, budget, trials) and machine info.

Hypervolume (both objectives minimised): the points are the *feasible* complete trials (total latency
<= budget) as (latency_ms total, quality = weight-sharing val loss on the n=128 search batch). One
reference point for every run and seed, fixed after all runs: r = (budget_ms, 1.1 × the largest
feasible quality any run observed). The 2-D hypervolume is exact (sort by latency, sweep the running
best quality, add strips). It is reported normalised by the box between the ideal point (the min
reachable latency, the smallest feasible quality any run observed) and r; normalisation does not move
the 95% crossing. "Final" hypervolume of a seed = the larger of the two runs' hypervolumes after all
trials; "trials to 95%" = the first trial count k (1-based, every asked trial counts, enqueued DP seeds
included) whose first k trials reach 0.95 × final. A run that never gets there counts `trials + 1`
(censored, which understates the cold count and so overstates the ratio: conservative for the goal).

Quality is memoised per arch across all runs (one `EvalContext`, `Objectives` caches), and the
per-slot sensitivity scores come from the cache in `<checkpoint folder>/search_cache`, so reruns are cheap.
Evaluation uses 1 torch thread (`objectives.torch_threads(1)`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
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

from common import machine, report

from ditnas.arch import Arch, Slot
from ditnas.errors import DitnasError
from ditnas.latency_models.stage import table_dir
from ditnas.search.objectives import EVAL_SEED, EvalContext
from ditnas.search.problem import min_reachable_ms
from ditnas.search.sensitivity import slot_sensitivity
from ditnas.search.space import SearchChoices
from ditnas.search.stage import check_space_match, run_search

sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_dp  # bench/search_dp.py: dp_matches_bruteforce, dp_seconds_n28

SEARCH_N = 128  # eval items per candidate during the search (cheap)
FINAL_N = 512  # eval items for the best-vs-baselines comparison (the `ditnas train` validation size)
HV_FRACTION = 0.95
REF_MARGIN = 1.1




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


# ----- baselines -------------------------------------------------------------------------------------
def interleave_pair(space) -> tuple[str, ...]:
    for pair in (("lcha", "ssa"), ("sa", "ssa")):
        if all(op in space.ops for op in pair):
            return pair
    return tuple(space.ops[:2]) if len(space.ops) >= 2 else tuple(space.ops)


def widest_fitting(space, predictor, ops: tuple[str, ...], budget_ms: float, steps: int) -> dict:
    """Every slot a block, slot i running ops[i % len(ops)] at the space's stage layout, one width and MLP
    ratio for all slots: the widest width (then the largest ratio) whose predicted total latency fits."""
    base = space.max_arch()
    tried = []
    for w in sorted(space.widths, reverse=True):
        for r in sorted(space.mlp_ratios, reverse=True):
            slots = [Slot(ops[i % len(ops)], w, r, s.stage) for i, s in enumerate(base.slots)]
            try:
                arch = space.validate(replace(base.with_slots(slots), steps=int(steps)))
            except DitnasError as exc:
                tried.append({"width": w, "mlp_ratio": r, "error": str(exc)})
                continue
            total = steps * float(predictor.predict(arch))
            tried.append({"width": w, "mlp_ratio": r, "latency_ms": total})
            if total <= budget_ms:
                return {"arch": arch, "fits": True, "latency_ms": float(total)}
    cheapest = min((t for t in tried if "latency_ms" in t), key=lambda t: t["latency_ms"], default=None)
    return {"arch": None, "fits": False, "cheapest": cheapest,
            "note": f"cannot fit the budget at any width (ops {'/'.join(ops)}); cheapest "
                    + (f"{cheapest['latency_ms']:.4g} ms at width {cheapest['width']}, ratio {cheapest['mlp_ratio']}"
                       if cheapest else "none valid")}


def describe_arch(arch: Arch, steps: int, obj_search, obj_final, budget_ms: float) -> dict:
    total = steps * obj_final.step_ms(arch)
    return {"arch": str(arch), "quality_val_loss_n512": obj_final.quality(arch),
            "quality_val_loss_n128": obj_search.quality(arch), "latency_ms": total,
            "latency_ms_step": obj_final.step_ms(arch), "fits_budget": bool(total <= budget_ms),
            "params": obj_final.params(arch)}


# ----- main ------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/t5/checkpoint.pt"))
    parser.add_argument("--table", type=Path, default=Path("runs/bench_latency/table"))
    parser.add_argument("--budget-ms", type=float, default=None,
                        help="total budget (steps × per step); default: midway between the min reachable and the max arch")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--trials", type=int, default=60, help="trials per run")
    parser.add_argument("--seeds", type=int, default=5, help="sampler seeds (each: one seeded and one cold run)")
    parser.add_argument("--dp-seeds", type=int, default=16, help="DP layouts enqueued in the seeded runs")
    parser.add_argument("--population", type=int, default=24, help="NSGA-II population size")
    parser.add_argument("--work", type=Path, default=None, help="keep the studies here (default: a temporary folder)")
    args = parser.parse_args()
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
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_search_")))
        for seed in range(args.seeds):
            for kind in ("seeded", "cold"):
                out = work / f"{kind}-{seed}"
                if (out / "study.journal").exists():
                    (out / "study.journal").unlink()  # a fresh study: run_search continues an existing journal
                ts = time.time()
                manifest = run_search(args.checkpoint, args.table, budget, [args.steps], args.trials, out,
                                      sampler="nsga2", seed=seed, n_seeds=args.dp_seeds if kind == "seeded" else 0,
                                      context=ctx, study_name=f"bench-{kind}-{seed}", population_size=args.population)
                df = pd.read_parquet(out / "trials.parquet").sort_values("number").reset_index(drop=True)
                runs[(seed, kind)] = df
                if kind == "seeded":
                    seeds_enqueued[seed] = manifest["dp"]["seeds"]
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
    per_seed = []
    for seed in range(args.seeds):
        cs, cc = hv_curve(runs[(seed, "seeded")], ref), hv_curve(runs[(seed, "cold")], ref)
        final = max(cs[-1], cc[-1])
        ks, rs = trials_to_reach(cs, HV_FRACTION * final)
        kc, rc = trials_to_reach(cc, HV_FRACTION * final)
        per_seed.append({"seed": seed, "trials_to_95_seeded": ks, "trials_to_95_cold": kc,
                         "reached_seeded": rs, "reached_cold": rc, "ratio": ks / kc,
                         "hv_final_seeded": cs[-1] / box, "hv_final_cold": cc[-1] / box,
                         "hv_seeded_curve": [round(h / box, 5) for h in cs],
                         "hv_cold_curve": [round(h / box, 5) for h in cc],
                         "dp_seeds_enqueued": len(seeds_enqueued[seed]),
                         # how much the sampler added after the enqueued DP layouts (0: the seeds are the front)
                         "hv_gain_after_dp_seeds": (cs[-1] - cs[min(len(seeds_enqueued[seed]), len(cs)) - 1]) / box
                         if seeds_enqueued[seed] and cs else None,
                         "feasible_seeded": int(runs[(seed, "seeded")]["feasible"].sum()),
                         "feasible_cold": int(runs[(seed, "cold")]["feasible"].sum())})
    ratios = [p["ratio"] for p in per_seed]
    hv_seeded_mean = statistics.fmean(p["hv_final_seeded"] for p in per_seed)
    hv_cold_mean = statistics.fmean(p["hv_final_cold"] for p in per_seed)
    censored_cold = sum(not p["reached_cold"] for p in per_seed)
    ratio_mean = statistics.fmean(ratios)
    ratio_of_means = (statistics.fmean(p["trials_to_95_seeded"] for p in per_seed)
                      / statistics.fmean(p["trials_to_95_cold"] for p in per_seed))

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
    pair = interleave_pair(space)
    baselines = {}
    for name, ops in ((f"uniform_interleave_{'_'.join(pair)}", pair), ("all_sa", ("sa",))):
        if "sa" not in space.ops and ops == ("sa",):
            baselines[name] = {"fits": False, "note": "the space has no sa op"}
            continue
        fit = widest_fitting(space, predictor, ops, budget, args.steps)
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

    result = {
        "dp_matches_bruteforce": dp["dp_matches_bruteforce"],
        "dp_seconds_n28": dp["dp_seconds_n28"],
        "trials_ratio_seeded_vs_cold": ratio_mean,
        "trials_ratio_goal": "<= 1/3",
        "trials_ratio_of_means": ratio_of_means,
        "trials_ratio_censored_cold_runs": censored_cold,
        "hv_final_mean": {"seeded": hv_seeded_mean, "cold": hv_cold_mean},
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
            "final": "max of the seeded and cold run's hypervolume after all trials, per seed",
            "fraction": HV_FRACTION,
            "never_reached": "counted as trials + 1 (censored)",
            "per_seed": per_seed,
        },
        "dp": dp,
        "inputs": {
            "checkpoint": str(args.checkpoint), "checkpoint_sha256": ctx.checkpoint_sha256,
            "table": str(troot), "table_id": ctx.table_id, "device": ctx.table.identity,
            "calibration": asdict(predictor.calibration),
            "budget_ms": budget, "budget_rule": budget_rule, "budget_ms_per_step": budget / args.steps,
            "min_reachable_ms_per_step": min_step, "max_arch_ms_per_step": max_step, "steps": args.steps,
            "trials_per_run": args.trials, "seeds": args.seeds, "sampler": "nsga2", "population_size": args.population,
            "dp_seeds": args.dp_seeds, "search_eval": {"n": SEARCH_N, "seed": EVAL_SEED},
            "final_eval": {"n": FINAL_N, "seed": EVAL_SEED}, "sensitivity_cells": len(sens),
        },
        "archs_evaluated": len(obj._quality),
        "seconds": {"dp": round(dp_seconds, 2), "setup": round(setup_seconds, 2), "search": round(search_seconds, 2),
                    "baselines": round(baseline_seconds, 2), "total": round(time.time() - started, 2)},
        "machine": info,
    }

    def fmt_arch(entry: dict | None) -> str:
        if entry is None:
            return "none feasible"
        if not entry.get("fits", True) and "quality_val_loss_n512" not in entry:
            return entry["note"]
        return (f"loss {entry['quality_val_loss_n512']:.4f}, {entry['latency_ms']:.4g} ms  "
                f"{entry['arch'].split('] ', 1)[-1]}")

    rows = [
        ("table", f"{troot} ({ctx.table.describe()}, id {ctx.table_id})"),
        ("budget (ms, total)", f"{budget:.4g} at {args.steps} steps ({budget_rule})"),
        ("dp == brute force", f"{dp['dp_matches_bruteforce']:.0%} of {dp['instances']}, N <= {dp['max_slots']}"),
        ("dp seconds, N=28 O=4 B=2000", f"{dp['dp_seconds_n28']:.4f}"),
        ("trials to 95% HV, seeded", " ".join(str(p["trials_to_95_seeded"]) + ("" if p["reached_seeded"] else "+")
                                              for p in per_seed)),
        ("trials to 95% HV, cold", " ".join(str(p["trials_to_95_cold"]) + ("" if p["reached_cold"] else "+")
                                            for p in per_seed)),
        ("ratio seeded/cold (mean)", f"{ratio_mean:.3f} (goal <= 0.333; ratio of means {ratio_of_means:.3f})"),
        ("cold runs censored", f"{censored_cold} of {args.seeds} never reached 95% (counted as trials + 1)"),
        ("final HV (normalised), mean", f"seeded {hv_seeded_mean:.3f}, cold {hv_cold_mean:.3f}"),
        ("feasible trials per run", "seeded " + " ".join(str(p["feasible_seeded"]) for p in per_seed)
                                    + "; cold " + " ".join(str(p["feasible_cold"]) for p in per_seed)),
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
