"""How many calibration archs does the latency price need? Re-fits a timed bench/latency.py session (no timing)
on k calibration archs' whole-model rows and generations and judges per-call and end-to-end prices on 20 other archs,
over `--splits` seeded draws per k.

    python bench/latency_calibration_size.py --work runs/bench_latency_q [--work runs/bench_latency_q_2threads] \
        --out bench/results/latency_calibration_size.json

Every split draws k calibration archs and, from the rest, the same number of judged archs (`--judged`), so the
figures for different k are judged alike. `calibration_bias_sd_pct` is the spread over splits of the mean signed
per-call error: a common offset the calibration's own estimation error puts on every judged arch.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, report  # noqa: E402
from ditnas.latency_models.predictor import LatencyPredictor  # noqa: E402
from ditnas.latency_models.stage import table_generations  # noqa: E402
from ditnas.latency_models.table import LatencyTable  # noqa: E402


def judge(table: LatencyTable, k: int, judged: int, splits: int) -> dict:
    gens = table_generations(table.root)
    models = table.model_rows()
    keys = sorted(models["key"])
    if k + judged > len(keys):
        raise SystemExit(f"{table.root}: {len(keys)} whole-model rows cannot give {k} calibration + {judged} judged archs")
    bias, within, med, e2e_within, e2e_med = [], [], [], [], []
    for seed in range(splits):
        cal = set(random.Random(seed).sample(keys, k))
        test = set(random.Random(1000 + seed).sample([x for x in keys if x not in cal], judged))
        cal_archs = set(models[models["key"].isin(cal)]["arch"])
        held = models[models["key"].isin(test)].reset_index(drop=True)
        pred = LatencyPredictor.fit(table.without_keys(set(keys) - cal), generations=gens[gens["arch"].isin(cal_archs)])
        v = pred.validate(held)
        bias.append(statistics.fmean(r["err_pct"] for r in v["rows"]))
        within.append(v["within_10pct"])
        med.append(v["median_abs_err_pct"])
        errs = [abs(pred.predict_generation(table.space.parse(r.arch), int(r.steps), r.guidance) - r.p50) / r.p50 * 100
                for r in gens[gens["arch"].isin(set(held["arch"]))].itertuples()]
        e2e_within.append(float(np.mean(np.array(errs) <= 10)))
        e2e_med.append(float(np.median(errs)))
    return {"calibration_archs": k, "judged_archs": judged, "splits": splits,
            "calibration_bias_sd_pct": round(float(np.std(bias)), 3),
            "within_10pct_mean": round(statistics.fmean(within), 4), "median_abs_err_pct_mean": round(statistics.fmean(med), 3),
            "e2e_within_10pct_mean": round(statistics.fmean(e2e_within), 4), "e2e_within_10pct_min": round(min(e2e_within), 4),
            "e2e_median_abs_err_pct_mean": round(statistics.fmean(e2e_med), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, action="append", required=True, help="a timed bench/latency.py session (repeatable)")
    p.add_argument("--out", type=Path, default=Path("bench/results/latency_calibration_size.json"))
    p.add_argument("--sizes", default="8,12,16,20")
    p.add_argument("--judged", type=int, default=20)
    p.add_argument("--splits", type=int, default=20)
    args = p.parse_args()
    result = {"machine": machine("torch", "executorch"), "sessions": {}}
    rows = []
    for work in args.work:
        table = LatencyTable.load(work / "table")
        threads = table.identity.get("threads")
        out = [judge(table, int(k), args.judged, args.splits) for k in args.sizes.split(",")]
        result["sessions"][str(work)] = {"threads": threads, "sizes": out}
        rows += [(f"{work.name} ({threads} thread(s)), {o['calibration_archs']} calibration archs",
                  f"per-call within 10% {o['within_10pct_mean']}, median {o['median_abs_err_pct_mean']}%, bias sd "
                  f"{o['calibration_bias_sd_pct']}% | e2e within 10% {o['e2e_within_10pct_mean']} (min "
                  f"{o['e2e_within_10pct_min']}), median {o['e2e_median_abs_err_pct_mean']}%") for o in out]
    report(rows, result, args.out)


if __name__ == "__main__":
    main()
