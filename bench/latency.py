"""Benchmark: how well does the latency table + calibrated predictor price whole models on the
ExecuTorch XNNPACK runtime of this host, and what does XNNPACK buy over eager torch?

    python bench/latency.py --out bench/results/latency.json [--held-out 30] [--calibration 12]

1. profiles every cell of the default search space plus (held-out + calibration) whole models on
   `executorch-xnnpack` at 1 thread into a resumable session (`--work`): every program is lowered
   (reused when already on disk), then all are timed in one interleaved pass;
2. fits the predictor on the table minus the held-out whole models and validates on those (split 0
   is the headline; `--splits` seeded splits give its spread);
3. times eager torch against the .pte on the same inputs, interleaved call by call, for max/mid/min;
4. sums the delegation reports of every lowered program;
5. end to end: the profile also times whole generations of every whole-model arch (28 steps with CFG as
   the exported sampler runs it -- one batch-2 denoiser call per step -- and 4 steps without guidance, each
   .pte lowered with the shipped recipe, timed back to back in a fresh process); the generation pricing is
   fitted on the calibration archs' generations only and judged on the held-out archs' (e2e_*), then the
   same session is re-timed at `--e2e-threads` (programs reused, not lowered again) for e2e_*_<n>threads.
Prints a table and writes JSON with within_10pct, within_10pct_uncalibrated, median_abs_err_pct,
xnnpack_speedup_vs_eager, delegated_share, e2e_within_10pct, e2e_median_abs_err_pct, e2e_max_abs_err_pct.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import machine

from ditnas.console import quiet_third_party
from ditnas.io import write_json
from ditnas.latency_models.backends import get_backend
from ditnas.latency_models.predictor import LatencyPredictor
from ditnas.config import LatencyConfig, load_config
from ditnas.latency_models.profile import profile_space, supernet_for_profiling
from ditnas.latency_models.programs import model_program
from ditnas.latency_models.stage import build_table, table_generations


def interleaved_speedup(supernet, backend, work: Path, archs, iters: int) -> list[dict]:
    """Eager vs .pte on the same inputs, one call of each in turn, 1 thread for both."""
    rows = []
    previous = torch.get_num_threads()
    torch.set_num_threads(backend.threads)
    try:
        for name, arch in archs.items():
            program = model_program(supernet, arch)
            item = backend.reuse(program, work / "speedup") or backend.prepare([program], work / "speedup")[0]
            method = backend.load_method(backend.load(item.artifacts["pte"]), item)
            inputs = list(program.inputs)
            eager, pte = [], []
            with torch.no_grad():
                for _ in range(10):  # warm-up both
                    program.module(*program.inputs)
                    method.execute(inputs)
                for _ in range(iters):
                    t0 = time.perf_counter_ns()
                    program.module(*program.inputs)
                    t1 = time.perf_counter_ns()
                    method.execute(inputs)
                    t2 = time.perf_counter_ns()
                    eager.append((t1 - t0) / 1e6)
                    pte.append((t2 - t1) / 1e6)
            e, p = statistics.median(eager), statistics.median(pte)
            rows.append({"arch": name, "layout": arch.layout(), "eager_ms": e, "xnnpack_ms": p, "speedup": e / p})
    finally:
        torch.set_num_threads(previous)
    return rows


def e2e_validation(table, train, held) -> dict:
    """Generation pricing fitted on the calibration archs' timed generations, judged on the held-out ones."""
    gens = table_generations(table.root)
    if gens is None or gens.empty:
        return {"n": 0}
    held_archs = set(held["arch"])
    fitted = LatencyPredictor.fit(train, generations=gens[~gens["arch"].isin(held_archs)])
    rows = []
    for r in gens[gens["arch"].isin(held_archs)].itertuples(index=False):
        arch = table.space.parse(r.arch, source="held-out generation")
        pred = fitted.predict_generation(arch, int(r.steps), r.guidance)
        err = (pred - float(r.p50)) / float(r.p50) * 100
        rows.append({"arch": r.arch, "steps": int(r.steps), "guidance": r.guidance, "measured_ms": float(r.p50),
                     "p10": float(r.p10), "p90": float(r.p90), "predicted_ms": pred, "err_pct": err,
                     "naive_ms": int(r.steps) * fitted.predict(arch) * (1 if r.guidance == "none" else 2)})
    if not rows:
        return {"n": 0}
    errs = [abs(r["err_pct"]) for r in rows]
    naive = [abs(r["naive_ms"] - r["measured_ms"]) / r["measured_ms"] * 100 for r in rows]
    by_mode = {}
    for (g, st) in sorted({(r["guidance"], r["steps"]) for r in rows}):
        e = [abs(r["err_pct"]) for r in rows if r["guidance"] == g and r["steps"] == st]
        by_mode[f"{g}@{st}"] = {"n": len(e), "within_10pct": sum(x <= 10 for x in e) / len(e),
                                "median_abs_err_pct": statistics.median(e), "max_abs_err_pct": max(e)}
    return {"n": len(rows), "archs": len({r["arch"] for r in rows}),
            "within_10pct": sum(e <= 10 for e in errs) / len(errs), "median_abs_err_pct": statistics.median(errs),
            "max_abs_err_pct": max(errs), "naive_median_abs_err_pct": statistics.median(naive),
            "by_mode": by_mode, "fits": {g: vars(f) for g, f in fitted.generation.fits.items()}, "rows": rows}


def delegation_totals(artifacts: Path) -> dict:
    delegated = total = programs = 0
    fallbacks: set[str] = set()
    for path in sorted(artifacts.rglob("*.delegation.json")):
        report = json.loads(path.read_text())
        delegated += report["compute_delegated"]
        total += report["compute_nodes"]
        fallbacks.update(report["non_delegated_compute_ops"])
        programs += 1
    return {"programs": programs, "compute_delegated": delegated, "compute_nodes": total,
            "delegated_share": delegated / total if total else float("nan"), "non_delegated_compute_ops": sorted(fallbacks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("runs/bench_latency"), help="session folder (resumable)")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--held-out", type=int, default=30)
    parser.add_argument("--calibration", type=int, default=12, help="whole models the calibration is fitted on")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--splits", type=int, default=10, help="random held-out splits for the spread of within_10pct")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--speedup-iters", type=int, default=100)
    parser.add_argument("--e2e-threads", type=int, default=2, help="also time the session at this thread count (0 = skip)")
    parser.add_argument("--generation-iters", type=int, default=5, help="rounds of fresh processes")
    parser.add_argument("--generation-repeats", type=int, default=1,
                        help="generations of each key back to back per round (the round's figure: their median)")
    args = parser.parse_args()
    quiet_third_party()

    supernet = supernet_for_profiling(load_config(args.config, args.set))
    n_models = args.held_out + args.calibration
    started = time.perf_counter()

    def show(i: int, n: int, key: str) -> None:
        if key and (i % 10 == 0 or i == n - 1):
            print(f"  [{i + 1}/{n}] {key}", flush=True)

    print(f"profiling the space + {n_models} whole models on executorch-xnnpack ...", flush=True)
    latency_cfg = LatencyConfig(backend="executorch-xnnpack", models=n_models, warmup=args.warmup, iters=args.iters,
                                threads=args.threads, seed=0, guidance=("none", "cfg"), generation_steps=(4, 28),
                                generation_iters=args.generation_iters, generation_repeats=args.generation_repeats,
                                op_events=False)  # no ETRecords: ~30% of each lowering, never read here
    session = profile_space(supernet, latency_cfg, args.work, progress=show)
    profile_seconds = time.perf_counter() - started
    table, _ = build_table(session, supernet)
    train, held = table.split_models(args.held_out, seed=0)
    predictor = LatencyPredictor.fit(train)
    validation = predictor.validate(held)
    # the headline is split 0; other seeded splits show how much it depends on which archs are held out
    splits = [LatencyPredictor.fit(a).validate(b) for a, b in (table.split_models(args.held_out, seed=s) for s in range(args.splits))]
    spread = {name: {"mean": statistics.fmean(v[name] for v in splits), "min": min(v[name] for v in splits),
                     "max": max(v[name] for v in splits)} for name in ("within_10pct", "median_abs_err_pct")}

    backend = get_backend("executorch-xnnpack", threads=args.threads, etdump=False)
    space = supernet.space
    speed = interleaved_speedup(supernet, backend, args.work, {"max": space.max_arch(), "mid": space.mid_arch(),
                                                              "min": space.min_arch()}, args.speedup_iters)
    delegation = delegation_totals(args.work / "artifacts")
    e2e = e2e_validation(table, train, held)
    e2e_more = {"n": 0}
    if args.e2e_threads and args.e2e_threads != args.threads:
        # the same programs re-timed at another thread count: lowered files reused, not lowered again
        work2 = args.work.with_name(f"{args.work.name}_{args.e2e_threads}threads")
        for sub in ("artifacts", "generations"):
            if (args.work / sub).is_dir() and not (work2 / sub).exists():
                shutil.copytree(args.work / sub, work2 / sub)
        print(f"re-timing the session at {args.e2e_threads} threads ...", flush=True)
        session2 = profile_space(supernet, replace(latency_cfg, threads=args.e2e_threads), work2, progress=show)
        table2, _ = build_table(session2, supernet)
        train2, held2 = table2.split_models(args.held_out, seed=0)
        e2e_more = e2e_validation(table2, train2, held2)
    t = args.e2e_threads
    result = {
        "benchmark": "latency",
        "device": session.device,
        "within_10pct": validation["within_10pct"],
        "within_10pct_uncalibrated": validation["within_10pct_uncalibrated"],
        "median_abs_err_pct": validation["median_abs_err_pct"],
        "median_abs_err_pct_uncalibrated": validation["median_abs_err_pct_uncalibrated"],
        "held_out": validation["n"],
        "splits": {"n": len(splits), **spread},
        "timing_passes": session.manifest.get("passes", []),
        "calibration": validation["calibration"],
        "xnnpack_speedup_vs_eager": statistics.median(r["speedup"] for r in speed),
        "speedup_rows": speed,
        "delegated_share": delegation["delegated_share"],
        "delegation": delegation,
        "cells_measured": int((table.rows["kind"] != "model").sum()),
        "profile_seconds_this_run": profile_seconds,
        "validation_rows": validation["rows"],
        "e2e_definition": "one whole generation: N steps back to back in the host loop (cfg: one batch-2 [cond, null] "
                          "denoiser call per step, the combination inside), .pte lowered with the shipped recipe, "
                          f"{args.threads} thread(s), median of {args.generation_iters} rounds, each a fresh process timing "
                          f"every (arch, steps, guidance) in a new order, {args.generation_repeats} generation(s) back to "
                          "back after one warm-up, their median",
        "e2e_within_10pct": e2e.get("within_10pct"),
        "e2e_median_abs_err_pct": e2e.get("median_abs_err_pct"),
        "e2e_max_abs_err_pct": e2e.get("max_abs_err_pct"),
        "e2e_naive_median_abs_err_pct": e2e.get("naive_median_abs_err_pct"),
        "e2e": e2e,
        f"e2e_within_10pct_{t}threads": e2e_more.get("within_10pct"),
        f"e2e_median_abs_err_pct_{t}threads": e2e_more.get("median_abs_err_pct"),
        f"e2e_max_abs_err_pct_{t}threads": e2e_more.get("max_abs_err_pct"),
        f"e2e_{t}threads": e2e_more,
        "machine": machine("torch", "executorch", threads=args.threads),
    }
    print()
    print(f"{'held-out archs':<28}{validation['n']}")
    print(f"{'within ±10% (calibrated)':<28}{validation['within_10pct']:.3f}")
    print(f"{'within ±10% (table sum)':<28}{validation['within_10pct_uncalibrated']:.3f}")
    print(f"{'median |err| %':<28}{validation['median_abs_err_pct']:.2f} (table sum {validation['median_abs_err_pct_uncalibrated']:.2f})")
    print(f"{'calibration':<28}{validation['calibration']}")
    print(f"{'over ' + str(len(splits)) + ' splits':<28}within ±10% mean {spread['within_10pct']['mean']:.3f} "
          f"(min {spread['within_10pct']['min']:.3f}), median |err| mean {spread['median_abs_err_pct']['mean']:.2f}% "
          f"(max {spread['median_abs_err_pct']['max']:.2f}%)")
    for r in speed:
        print(f"{'speed-up ' + r['arch']:<28}{r['speedup']:.2f}x  (eager {r['eager_ms']:.3f} ms, xnnpack {r['xnnpack_ms']:.3f} ms)")
    print(f"{'delegated share':<28}{delegation['delegated_share']:.4f} over {delegation['programs']} programs "
          f"(fallback ops: {delegation['non_delegated_compute_ops'] or 'none'})")
    for label, block in ((f"{args.threads} thread(s)", e2e), (f"{t} threads", e2e_more)):
        if not block.get("n"):
            continue
        print(f"{'e2e ' + label:<28}{block['n']} held-out generations of {block['archs']} archs: within ±10% "
              f"{block['within_10pct']:.3f}, median |err| {block['median_abs_err_pct']:.2f}%, max {block['max_abs_err_pct']:.1f}% "
              f"(steps x per-step x calls: median {block['naive_median_abs_err_pct']:.1f}%)")
        for mode, m in block["by_mode"].items():
            print(f"{'  ' + mode:<28}within ±10% {m['within_10pct']:.3f}, median {m['median_abs_err_pct']:.2f}%, max {m['max_abs_err_pct']:.1f}%")
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
