"""Benchmark: how well does the latency table + calibrated predictor price whole models on the
ExecuTorch XNNPACK runtime of this host, and what does XNNPACK buy over eager torch?

    python bench/latency.py --out bench/results/latency.json [--held-out 30] [--calibration 12]

1. profiles every cell of the default search space plus (held-out + calibration) whole models on
   `executorch-xnnpack` at 1 thread into a resumable session (`--work`): every program is lowered
   (reused when already on disk), then all are timed in one interleaved pass;
2. fits the predictor on the table minus the held-out whole models and validates on those (split 0
   is the headline; `--splits` seeded splits give its spread);
3. times eager torch against the .pte on the same inputs, interleaved call by call, for max/mid/min;
4. sums the delegation reports of every lowered program.
Prints a table and writes JSON with within_10pct, within_10pct_uncalibrated, median_abs_err_pct,
xnnpack_speedup_vs_eager and delegated_share.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from common import machine

from ditnas.io import write_json
from ditnas.latency_models.backends import get_backend
from ditnas.latency_models.predictor import LatencyPredictor
from ditnas.config import LatencyConfig, load_config
from ditnas.latency_models.profile import profile_space, supernet_for_profiling
from ditnas.latency_models.programs import model_program
from ditnas.latency_models.stage import build_table


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
    args = parser.parse_args()

    supernet = supernet_for_profiling(load_config(args.config, args.set))
    n_models = args.held_out + args.calibration
    started = time.perf_counter()

    def show(i: int, n: int, key: str) -> None:
        if key and (i % 10 == 0 or i == n - 1):
            print(f"  [{i + 1}/{n}] {key}", flush=True)

    print(f"profiling the space + {n_models} whole models on executorch-xnnpack ...", flush=True)
    latency_cfg = LatencyConfig(backend="executorch-xnnpack", models=n_models, warmup=args.warmup, iters=args.iters,
                                threads=args.threads, seed=0)
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
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
