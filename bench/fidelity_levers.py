"""Benchmark: which supernet-training lever makes the weight-sharing signal rank archs right?

One ablation table, each lever a supernet trained with the default config plus its overrides, scored the
way bench/fidelity.py scores the search's signal: the supernet's weight-sharing loss of 12 archs (max,
min, 10 random; seed 0) against the same archs trained standalone for 1000 steps (Kendall τ, τ on the
random archs, Spearman ρ, best-at-budget agreement within the standalone seed spread, mean gap). The
ground truth and the 200-step proxy come from the same cached runs as bench/fidelity.py (shared
`--work`: run either first, the other reuses them).

Compute is counted in subnet-steps (one forward + backward of one subnet on one batch): the default
supernet spends 1000 steps x 3 subnets (max and two random); the proxy over a default search spends
its trials x 200 (issue: the supernet's compute must stay at or below that, 64 x 200 = 12,800).

    python bench/fidelity_levers.py --out bench/results/fidelity_levers.json --jobs 2 [--levers a,b,...]

Training runs in --jobs worker processes (1 torch thread each); each lever's supernet trains into
--work/levers/<name> and resumes from its checkpoint if interrupted; the JSON is rewritten after every
finished job (`"partial": true` until the end).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

from common import machine, report  # noqa: E402
from fidelity import DEFAULT_SEARCH_TRIALS, _env, best_at_budget, draw_archs, job, kendall_tau, spearman_rho  # noqa: E402

from ditnas.config import load_config  # noqa: E402
from ditnas.data import load_split  # noqa: E402
from ditnas.io import read_json, write_json  # noqa: E402
from ditnas.supernet.train import CHECKPOINT_NAME, build_supernet, load_supernet, train_supernet  # noqa: E402

# name -> (supernet-only overrides, subnets trained per step, what it tests)
SANDWICH = ["train.sampler=sandwich", "train.num_random=1"]  # the default until 2026-12-07
LEVERS: dict[str, tuple[list[str], int, str]] = {
    "sandwich": (SANDWICH, 3, "the sandwich rule: max + min + 1 random per step, 1000 steps"),
    "uniform2": ([], 3, "the default: max + 2 random (no min every step: min's loss no longer favoured)"),
    "fair_sandwich": (SANDWICH + ["train.fair_sampling=true"], 3, "the sandwich rule with fair per-slot sampling of the random subnet"),
    "fair_uniform2": (["train.fair_sampling=true"], 3, "max + 2 fair random"),
    "fair_uniform2_x3": (["train.fair_sampling=true", "train.steps=3000"], 3,
                         "max + 2 fair random, 3000 steps (3x the default's compute)"),
    "sandwich_x3": (SANDWICH + ["train.steps=3000"], 3, "the sandwich rule, 3000 steps (3x compute)"),
    "private_mod": (["model.private_mod=true"], 3, "the default with per-op private adaLN modulation (every op x width "
                    "its own shift/scale/gate)"),
    "progressive": (["train.progressive_ops=0.3"], 3, "the default with progressive shrinking: the first 30% of steps "
                    "train the reference op only (elastic width/ratio/depth), then every op"),
    "uniform2_x4": (["train.steps=4000"], 3, "the default for 4000 steps: 12,000 subnet-steps, just under the proxy's "
                    "12,800 for a default search (the longest schedule the issue's compute rule allows)"),
    "uniform4": (["train.num_random=4", "train.steps=600"], 5, "max + 4 random per step for 600 steps: the default's "
                 "3000 subnet-steps as fewer, wider steps (more random subnets per step)"),
    "uniform4_seed1": (["train.num_random=4", "train.steps=600", "train.seed=1"], 5, "uniform4 at train.seed 1"),
    "uniform2_seed1": (["train.seed=1"], 3, "the default at train.seed 1: how far tau moves between two supernets of one "
                       "recipe (every lever above is one supernet at seed 0)"),
    "graft_uniform2": (["train.steps=900", "graft.teacher_steps=300"], 3,
                       "grafted (max arch alone 300 steps, then every other op per slot by activation distillation), "
                       "then the default for 900 steps: 300 + 2700 subnet-steps"),
}
GRAFTED = {"graft_uniform2"}  # levers whose supernet starts from `ditnas graft` (supernet/graft.py)


RERANK_TOP, RERANK_STEPS = 4, (200, 500)  # search.rerank_top / rerank_steps as scored here


def train_lever(spec: dict[str, Any]) -> dict[str, Any]:
    """Train (or finish) one lever's supernet; seconds are this call's (a resumed run says so)."""
    torch.set_num_threads(1)
    cfg = load_config(None, spec["overrides"] + spec["lever"])
    cfg = replace(cfg, train=replace(cfg.train, checkpoint_every=250, threads=1))
    out = Path(spec["folder"])
    timing = out / "timing.json"
    if timing.exists():
        return {**spec, **read_json(timing, missing="", damaged=""), "reused": True}
    resumed = (out / CHECKPOINT_NAME).exists()
    start = time.perf_counter()
    split = load_split(cfg.data)
    graft = {}
    if spec["name"] in GRAFTED:
        from ditnas.supernet.graft import GRAFTED_NAME, graft_supernet

        if not (out / "graft" / "graft.json").exists():
            graft_supernet(cfg, out / "graft", split=split)
        graft = read_json(out / "graft" / "graft.json", missing="", damaged="")
        cfg = replace(cfg, train=replace(cfg.train, init=str(out / "graft" / GRAFTED_NAME)))
    trainer = train_supernet(cfg, out, split=split)
    result = {"seconds": time.perf_counter() - start, "steps": trainer.step, "resumed": resumed,
              **({"teacher_steps": graft["teacher_steps"], "teacher_seconds": graft["teacher_seconds"],
                  "graft_seconds": graft["graft_seconds"]} if graft else {})}
    write_json(timing, result)
    return {**spec, **result, "reused": False}


def work(spec: dict[str, Any]) -> dict[str, Any]:
    return train_lever(spec) if spec["kind"] == "lever" else job(spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("runs/bench_fidelity"), help="shared with bench/fidelity.py")
    parser.add_argument("--levers", default=",".join(LEVERS), help=f"comma-separated, of {', '.join(LEVERS)}")
    parser.add_argument("--archs", type=int, default=12)
    parser.add_argument("--arch-seed", type=int, default=0)
    parser.add_argument("--proxy-steps", type=int, default=200)
    parser.add_argument("--spread-archs", type=int, default=3)
    parser.add_argument("--spread-seed", type=int, default=1)
    parser.add_argument("--budgets", type=int, default=5)
    parser.add_argument("--tolerance-pct", type=float, default=None,
                        help="agreement tolerance instead of the measured seed spread (with --spread-archs 0)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--truth-from", type=Path, default=None,
                        help="reuse the standalone truth and proxy losses of an earlier run's JSON (same archs): "
                             "levers only; the rerank, which needs the 500-step proxy, is then not scored")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    load_at_start = machine()["loadavg_at_start"]
    levers = [name.strip() for name in args.levers.split(",") if name.strip()]
    unknown = [n for n in levers if n not in LEVERS]
    if unknown:
        parser.error(f"unknown lever(s) {', '.join(unknown)}; choose from {', '.join(LEVERS)}")

    cfg, split, space, batch = _env([])
    truth_steps = cfg.train.steps
    archs = draw_archs(space, args.archs, args.arch_seed)
    names = list(archs)
    random_names = [n for n in names if n.startswith("r")]
    from ditnas.latency_models.flops import arch_macs_analytic

    ref = build_supernet(cfg, space)
    macs = {n: int(arch_macs_analytic(ref, a)) for n, a in archs.items()}
    del ref
    cache = args.work / "search_cache"
    base = {"overrides": [], "cache": str(cache), "work": str(args.work)}
    # the same specs bench/fidelity.py queues (same cache keys): ground truth at 1000, proxy at 200
    proxy_at = sorted({s for s in (50, 100, 500) if s < truth_steps} | {args.proxy_steps, truth_steps})
    queue = [{**base, "kind": "proxy", "name": n, "arch": str(archs[n]), "seed": None, "at": proxy_at}
             for n in sorted(names, key=lambda n: -macs[n])]
    queue += [{**base, "kind": "proxy", "name": n, "arch": str(archs[n]), "seed": args.spread_seed,
               "at": [args.proxy_steps, truth_steps]} for n in random_names[: args.spread_archs]]
    # long levers first: better packing over the workers
    order = sorted(levers, key=lambda n: -int(next((o.split("=")[1] for o in LEVERS[n][0] if o.startswith("train.steps=")),
                                                    truth_steps)))
    queue = [{**base, "kind": "lever", "name": n, "lever": LEVERS[n][0], "folder": str(args.work / "levers" / n)}
             for n in order] + queue
    done: dict[str, dict] = {}
    if args.truth_from:  # standalone training is deterministic: an earlier run's truth and proxy are these runs'
        earlier = read_json(args.truth_from, missing="pass a JSON this benchmark wrote", damaged="")
        if earlier.get("archs") != {n: str(a) for n, a in archs.items()}:
            parser.error(f"--truth-from {args.truth_from} scored other archs; use the same --archs/--arch-seed")
        proxy_values = (earlier.get(f"proxy{args.proxy_steps}") or {}).get("values", {})
        for n in names:
            curve = {str(truth_steps): {"ema": earlier["standalone"][n]}}
            if n in proxy_values:
                curve[str(args.proxy_steps)] = {"ema": proxy_values[n]}
            done[f"proxy:{n}:None"] = {"curve": curve}
        queue = [q for q in queue if q["kind"] == "lever"]

    def value(name: str, steps: int, seed=None) -> float | None:
        r = done.get(f"proxy:{name}:{seed}")
        return None if r is None or str(steps) not in r["curve"] else float(r["curve"][str(steps)]["ema"])

    def summarize(final: bool) -> dict[str, Any]:
        truth = {n: value(n, truth_steps) for n in names}
        have = [n for n in names if truth[n] is not None]
        spreads = [100.0 * abs(a - b) / ((a + b) / 2) for n in random_names[: args.spread_archs]
                   if (a := value(n, truth_steps)) is not None and (b := value(n, truth_steps, args.spread_seed)) is not None]
        tolerance = args.tolerance_pct if args.tolerance_pct is not None else (max(spreads) if spreads else 0.0)
        costs = sorted(macs[n] for n in names)
        budgets = [costs[1] + k * (costs[-1] - costs[1]) / (args.budgets - 1) for k in range(args.budgets)]

        def score(values: dict[str, float]) -> dict[str, Any] | None:
            use = [n for n in have if n in values]
            if len(use) < 3:
                return None
            sig, tru = [values[n] for n in use], [truth[n] for n in use]
            ru = [n for n in use if n in random_names]
            out = {"kendall_tau": kendall_tau(sig, tru), "spearman_rho": spearman_rho(sig, tru),
                   "kendall_tau_random_only": kendall_tau([values[n] for n in ru], [truth[n] for n in ru]) if len(ru) > 2 else None,
                   "gap_pct_mean": statistics.mean(100.0 * (values[n] - truth[n]) / truth[n] for n in use),
                   "values": {n: values[n] for n in use}}
            if len(use) == len(names):
                b = best_at_budget(sig, tru, [macs[n] for n in use], budgets, tolerance)
                out["best_at_budget_agreement"] = b["agreement"]
                out["picks"] = [use[r["signal_pick"]] for r in b["per_budget"]]
                out["rerank"] = rerank_agreement(values, truth, tolerance, budgets)
            return out

        def rerank_agreement(values: dict[str, float], truth: dict[str, float], tolerance: float,
                             budgets: list[float]) -> dict[str, Any] | None:
            """search --rerank-top K on these archs: per budget, the signal's top K that fit, successive
            halving on the cached proxy losses at RERANK_STEPS (ditnas/search/rerank.py), pick at the end."""
            from ditnas.search.rerank import successive_halving

            proxy = {(n, s): value(n, s) for n in names for s in RERANK_STEPS}
            if any(v is None for v in proxy.values()):
                return None
            rows = []
            for budget in budgets:
                fit = sorted((n for n in names if macs[n] <= budget), key=lambda n: values[n])
                r = successive_halving(fit[:RERANK_TOP], lambda n, s: proxy[(n, s)], list(RERANK_STEPS))
                best = min(fit, key=lambda n: truth[n])
                rows.append({"budget": budget, "candidates": fit[:RERANK_TOP], "pick": r["pick"], "standalone_best": best,
                             "agree": truth[r["pick"]] <= truth[best] * (1 + tolerance / 100.0),
                             "pick_gap_pct": 100.0 * (truth[r["pick"]] - truth[best]) / truth[best]})
            cost = RERANK_TOP * RERANK_STEPS[0] + sum(
                max(1, -(-RERANK_TOP // 2 ** i)) * s for i, s in enumerate(RERANK_STEPS) if i)
            return {"top": RERANK_TOP, "steps": list(RERANK_STEPS), "agreement": sum(r["agree"] for r in rows) / len(rows),
                    "train_steps_per_search": cost, "per_budget": rows}

        rows: dict[str, Any] = {}
        for n in levers:
            r = done.get(f"lever:{n}")
            if r is None:
                continue
            model, _, _ = load_supernet(Path(r["folder"]) / CHECKPOINT_NAME)
            from ditnas.search.signals import make_signal

            sig = make_signal("supernet", 0, model, batch, threads=1)
            overrides, per_step, what = LEVERS[n]
            rows[n] = {"what": what, "overrides": overrides, "steps": r["steps"],
                       "subnet_steps": r["steps"] * per_step + r.get("teacher_steps", 0),
                       "train_seconds": r["seconds"], "resumed": r.get("resumed", False),
                       **{k: r[k] for k in ("teacher_steps", "teacher_seconds", "graft_seconds") if k in r},
                       **(score({a: sig(archs[a]) for a in names}) or {})}
            if n in GRAFTED:  # graft-and-score: the grafted supernet before any supernet training
                grafted, _, _ = load_supernet(Path(r["folder"]) / "graft" / "grafted.pt")
                sig = make_signal("supernet", 0, grafted, batch, threads=1)
                rows[f"{n}:grafted_only"] = {
                    "what": "the grafted supernet before supernet training (each op regressed on the teacher alone)",
                    "overrides": overrides, "steps": 0, "subnet_steps": r.get("teacher_steps", 0),
                    "graft_seconds": r.get("graft_seconds"), **(score({a: sig(archs[a]) for a in names}) or {})}
        proxy = score({n: v for n in names if (v := value(n, args.proxy_steps)) is not None})
        return {"benchmark": "fidelity_levers", "partial": not final, "date": time.strftime("%Y-%m-%d"),
                "truth": f"standalone from scratch, {truth_steps} steps, EMA val flow loss (bench/fidelity.py's cache)",
                "archs": {n: str(a) for n, a in archs.items()}, "standalone": truth,
                "standalone_seed_spread_pct": tolerance, "tolerance_source": "given (--tolerance-pct)"
                if args.tolerance_pct is not None else f"measured on {len(spreads)} seed pairs", "budgets_macs": budgets,
                "compute_budget_subnet_steps": DEFAULT_SEARCH_TRIALS * args.proxy_steps,
                "compute_budget_rule": f"proxy over a default search: {DEFAULT_SEARCH_TRIALS} trials x {args.proxy_steps} steps",
                "levers": rows, f"proxy{args.proxy_steps}": proxy,
                "truth_from": str(args.truth_from) if args.truth_from else None,
                "wall_seconds": round(time.time() - started, 1),
                "machine": {**machine("torch"), "loadavg_at_start": load_at_start, "threads_per_job": 1, "jobs": args.jobs}}

    def finished(r: dict[str, Any]) -> None:
        key = f"lever:{r['name']}" if r["kind"] == "lever" else f"{r['kind']}:{r['name']}:{r['seed']}"
        done[key] = r
        print(f"[{time.time() - started:7.0f}s] done {key} ({r.get('seconds', 0):.0f}s)", flush=True)
        write_json(args.out, summarize(False))

    if args.jobs <= 1:
        for spec in queue:
            finished(work(spec))
    else:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            for r in [pool.apply_async(work, (s,)) for s in queue]:
                finished(r.get())
    result = summarize(True)
    rows = []
    for n, v in result["levers"].items():
        rr = v.get("rerank") or {}
        rows.append((f"{n} ({v['subnet_steps']} subnet-steps)",
                     f"τ {v['kendall_tau']:.2f} / τ random {v['kendall_tau_random_only']:.2f} / ρ {v['spearman_rho']:.2f} / "
                     f"agreement {v.get('best_at_budget_agreement', float('nan')):.2f} / gap {v['gap_pct_mean']:.1f}% / "
                     f"+rerank top {RERANK_TOP} agreement {rr.get('agreement', float('nan')):.2f}"))
    p = result[f"proxy{args.proxy_steps}"]
    if p:
        rows.append((f"proxy {args.proxy_steps} steps ({result['compute_budget_subnet_steps']} for a default search)",
                     f"τ {p['kendall_tau']:.2f} / τ random {p['kendall_tau_random_only']:.2f} / ρ {p['spearman_rho']:.2f} / "
                     f"agreement {p.get('best_at_budget_agreement', float('nan')):.2f}"))
    rows.append(("standalone seed spread % (max)", f"{result['standalone_seed_spread_pct']:.2f}"))
    report(rows, result, args.out)


if __name__ == "__main__":
    main()
