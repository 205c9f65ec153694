"""Benchmark: is Path-Drop Guidance priced right, and can the search tell when it beats CFG?

Runs on a finished `bench/latency.py` session (`--work`: its cells, whole models and none/cfg generations are
reused, nothing of it is re-timed). For the first `--archs` whole-model archs of that session:

1. lowers the PDG denoiser of each (generation.DenoiserProgram(guidance="pdg"): the full net on the label + the
   dense-only net, `--dense` slots at each end, on the null label, the combination inside) with the shipped recipe
   and times whole generations (4 and 28 steps back to back) in `--rounds` rounds of fresh processes, each timing
   one generation of every (arch, steps) in a new order -- appended to the session's generations;
2. prices each with the table's predictor as the search would (`PathDropPricing`): `derived` = the none fit applied
   to full + dense-only calls (what a table without pdg generations gives), `fitted` = fitted on the pdg
   generations of the first half of the archs, judged on the other half;
3. PDG vs CFG per (arch, steps): measured ratio, and whether the predicted cheaper mode is the measured one
   (`choice_agreement`: what `--guidance cfg` vs `--guidance pdg` searches at one budget rely on).

    python bench/pdg_latency.py --work runs/bench_latency_r20b --out bench/results/pdg_latency.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from common import machine, report

from ditnas.config import LatencyConfig, SampleConfig, load_config
from ditnas.console import quiet_third_party
from ditnas.latency_models.generation_latency import summarize_generations
from ditnas.latency_models.generation_profile import measure_generations, read_generation_samples
from ditnas.latency_models.pdg_latency import PathDropPricing
from ditnas.latency_models.predictor import LatencyPredictor
from ditnas.latency_models.profile import _open_session, DEFAULT_KINDS, supernet_for_profiling
from ditnas.latency_models.stage import build_table


def errors(rows: list[dict]) -> dict:
    errs = [abs(r["err_pct"]) for r in rows]
    return {"n": len(errs), "within_10pct": sum(e <= 10 for e in errs) / len(errs),
            "median_abs_err_pct": statistics.median(errs), "max_abs_err_pct": max(errs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True, help="a finished bench/latency.py session folder")
    p.add_argument("--out", type=Path, default=Path("bench/results/pdg_latency.json"))
    p.add_argument("--config", type=Path, default=Path("ditnas/configs/default.yaml"))
    p.add_argument("--archs", type=int, default=12)
    p.add_argument("--dense", type=int, default=1)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--models", type=int, default=42, help="the latency bench's whole models (its session identity)")
    args = p.parse_args()
    quiet_third_party()
    load0 = machine("torch", "executorch", threads=1)
    began = time.perf_counter()
    supernet = supernet_for_profiling(load_config(args.config, []))
    # the latency bench's settings (its session identity); only guidance and the dense count are new
    lat = LatencyConfig(backend="executorch-xnnpack", models=args.models, warmup=10, iters=200, threads=1, seed=0,
                        guidance=("pdg",), generation_steps=(4, 28), generation_iters=args.rounds, op_events=False,
                        pdg_dense=args.dense)
    session, _, _, archs = _open_session(supernet, lat, args.work, DEFAULT_KINDS, None)
    archs = archs[: args.archs]
    show = lambda i, n, what: print(f"  [{i}/{n}] {what}", flush=True)  # noqa: E731
    measure_generations(supernet, archs, lat, session, cfg_scale=SampleConfig.cfg_scale, progress=show, workers=2)
    table, predictor = build_table(session, supernet)
    every = summarize_generations(read_generation_samples(session.root))  # all archs of the session, every mode
    gens = every[every["arch"].isin({str(a) for a in archs})]
    pdg_rows = gens[gens["guidance"] == "pdg"]
    cfg_rows = gens[gens["guidance"] == "cfg"].set_index(["arch", "steps"])["p50"]

    # derived: the none fit only (as on a table without pdg generations)
    derived_pred = LatencyPredictor.fit(table, generations=every[every["guidance"] != "pdg"])
    derived = PathDropPricing(derived_pred, args.dense)
    assert derived_pred.generation.fit_for("pdg").method == "derived_from_none"
    # fitted: the pdg generations of the first half, judged on the second
    first = {str(a) for a in archs[: len(archs) // 2]}
    fitted_pred = LatencyPredictor.fit(table, generations=every[(every["guidance"] != "pdg") | every["arch"].isin(first)])
    fitted = PathDropPricing(fitted_pred, args.dense)

    rows = []
    for r in pdg_rows.itertuples(index=False):
        arch = table.space.parse(r.arch, source="pdg row")
        d = derived.predict_generation(arch, int(r.steps))
        f = fitted.predict_generation(arch, int(r.steps))
        cfg_measured = float(cfg_rows.get((r.arch, r.steps), float("nan")))
        cfg_pred = derived_pred.predict_generation(arch, int(r.steps), "cfg")
        rows.append({"arch": r.arch, "steps": int(r.steps), "measured_ms": float(r.p50), "p10": float(r.p10),
                     "p90": float(r.p90), "derived_ms": d, "derived_err_pct": (d - r.p50) / r.p50 * 100,
                     "fitted_ms": f, "fitted_err_pct": (f - r.p50) / r.p50 * 100, "held_out": r.arch not in first,
                     "cfg_measured_ms": cfg_measured, "cfg_predicted_ms": cfg_pred,
                     "pdg_over_cfg_measured": float(r.p50) / cfg_measured,
                     "pdg_over_cfg_predicted": d / cfg_pred,
                     "dense_only_share": predictor.predict_dense_only(arch, args.dense) / predictor.predict(arch)})
    derived_err = errors([{"err_pct": r["derived_err_pct"]} for r in rows])
    fitted_err = errors([{"err_pct": r["fitted_err_pct"]} for r in rows if r["held_out"]])
    agree = [(r["pdg_over_cfg_predicted"] < 1) == (r["pdg_over_cfg_measured"] < 1) for r in rows]
    result = {
        "benchmark": "pdg_latency",
        "session": str(args.work), "archs": len(archs), "dense": args.dense, "rounds": args.rounds,
        "definition": derived_pred.generation.definition("pdg"),
        "pdg_derived_within_10pct": derived_err["within_10pct"],
        "pdg_derived_median_abs_err_pct": derived_err["median_abs_err_pct"],
        "pdg_derived_max_abs_err_pct": derived_err["max_abs_err_pct"],
        "pdg_fitted_within_10pct_held_out": fitted_err["within_10pct"],
        "pdg_fitted_median_abs_err_pct_held_out": fitted_err["median_abs_err_pct"],
        "pdg_fitted_max_abs_err_pct_held_out": fitted_err["max_abs_err_pct"],
        "pdg_over_cfg_measured_median": statistics.median(r["pdg_over_cfg_measured"] for r in rows),
        "pdg_cheaper_measured_share": sum(r["pdg_over_cfg_measured"] < 1 for r in rows) / len(rows),
        "choice_agreement": sum(agree) / len(agree),
        "fits": {"derived": vars(derived_pred.generation.fit_for("pdg")), "fitted": vars(fitted_pred.generation.fit_for("pdg"))},
        "rows": rows, "seconds": time.perf_counter() - began, "machine": load0,
    }
    table_rows = [("archs x steps", f"{len(rows)} ({len(archs)} archs x 4, 28 steps), dense {args.dense}, {args.rounds} rounds"),
                  ("derived (none fit): within ±10%", f"{derived_err['within_10pct']:.3f}"),
                  ("derived: median / max |err| %", f"{derived_err['median_abs_err_pct']:.2f} / {derived_err['max_abs_err_pct']:.1f}"),
                  ("fitted, held-out: within ±10%", f"{fitted_err['within_10pct']:.3f} (n {fitted_err['n']})"),
                  ("fitted: median / max |err| %", f"{fitted_err['median_abs_err_pct']:.2f} / {fitted_err['max_abs_err_pct']:.1f}"),
                  ("PDG / CFG measured (median)", f"{result['pdg_over_cfg_measured_median']:.3f}"),
                  ("PDG cheaper than CFG (measured)", f"{result['pdg_cheaper_measured_share']:.3f} of rows"),
                  ("cheaper mode predicted right", f"{result['choice_agreement']:.3f}")]
    report(table_rows, result, args.out)


if __name__ == "__main__":
    sys.exit(main())
