"""Concurrent-writer load on one Optuna study storage: a journal file and a real PostgreSQL server.

    python bench/storage_load.py [--processes 4] [--trials 50] [--out bench/results/storage_load.json]
                                 [--objective real|cheap|both]

`--processes` writers start at once (a barrier file releases them after their imports) and each adds
`--trials` trials to ONE study in the shared storage, so processes × trials trials in all (default
4 × 50 = 200). Writers:

- `real`: the real `ditnas search --storage <shared>` CLI, i.e. `study.open_study` and the real
  objective path (`run_search` -> `run_study` -> `EvalContext.evaluate`: a supernet forward on a tiny
  6-step-trained supernet and a host-torch latency table, ~35 ms a trial here);
- `cheap`: the same storage and study code (`open_storage`, `open_study`, `run_study`) with a cheap
  deterministic objective, so the storage itself is the bottleneck.

Each run is then checked as tests/test_storage_load.py checks it (count, unique numbers, every trial
COMPLETE with both objectives, each writer owns exactly its trials, the study loads cleanly) and the
figures are printed and written: trials/s over the span from the first trial's start to the last
trial's end, and over the wall time from the barrier to the last writer's exit (startup included).
PostgreSQL is started in a temporary folder from the OS binaries, as the tests do.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from common import machine, report  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--trials", type=int, default=50, help="trials per writer")
    ap.add_argument("--objective", choices=("real", "cheap", "both"), default="both")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "storage_load.json")
    args = ap.parse_args(argv)

    import test_search_optuna
    from test_search_objectives import build_env
    from test_storage_load import assert_sound, check_study, run_load

    from ditnas.search.objectives import torch_threads

    objectives = ("real", "cheap") if args.objective == "both" else (args.objective,)
    work = Path(tempfile.mkdtemp(prefix="ditnas-storage-load-"))
    t_start = time.strftime("%Y-%m-%dT%H:%M:%S")
    results: dict[str, dict] = {}
    with torch_threads(1):
        env = build_env(work / "env")
    pg = contextlib.contextmanager(test_search_optuna.postgres_url.__wrapped__)()  # the tests' server fixture
    with pg as url:
        for objective in objectives:
            cheap = objective == "cheap"
            for kind in ("journal", "postgres"):
                key = f"{kind}_{objective}"
                root = work / key
                storage = str(root / "shared" / "study.journal") if kind == "journal" else url
                budget = 1e6 if objective == "real" else 2e6  # distinct study names in the one database
                run = run_load(env, storage, root, processes=args.processes, trials=args.trials, cheap=cheap,
                               budget_ms=budget, name=f"load-{key}")
                fig = check_study(storage, root, run, name=f"load-{key}" if cheap else None)
                try:
                    assert_sound(run, fig)
                    fig["sound"] = True
                except AssertionError as exc:
                    fig["sound"] = False
                    fig["failure"] = str(exc)[:500]
                fig["wall_trials_per_s"] = fig["trials"] / run["wall_s"]
                fig["objective"] = run["objective"]
                fig.pop("per_writer", None)
                results[key] = fig
                print(f"{key}: {fig['trials']} trials, lost {fig['lost']}, duplicated {fig['duplicated']}, "
                      f"{fig['trials_per_s']:.2f} trials/s (wall {fig['wall_trials_per_s']:.2f})", flush=True)
    primary = "real" if "real" in objectives else "cheap"
    result = {
        "processes": args.processes,
        "trials": args.processes * args.trials,
        "journal_trials_per_s": round(results[f"journal_{primary}"]["trials_per_s"], 3),
        "postgres_trials_per_s": round(results[f"postgres_{primary}"]["trials_per_s"], 3),
        "primary_objective": primary,
        "lost": sum(r["lost"] for r in results.values()),
        "duplicated": sum(r["duplicated"] for r in results.values()),
        "states_all_complete": all(r["states"] == {"COMPLETE": r["expected"]} for r in results.values()),
        "sound": all(r["sound"] for r in results.values()),
        "duplicated_seed_trials": sum(r["dp_seed_trials"] - r["dp_seed_layouts"] for r in results.values()),
        "runs": results,
        "date": t_start,
        "machine": machine("optuna", "sqlalchemy", "psycopg2-binary", "torch"),
        "notes": "trials_per_s: completed trials / (last trial end - first trial start); wall: from the barrier "
                 "to the last writer's exit (its imports happen before the barrier). duplicated_seed_trials: "
                 "extra evaluations of an enqueued seed (open_study's skip_if_exists is check-then-insert "
                 "across processes); not a lost or corrupted trial.",
    }
    rows = [("processes x trials", f"{args.processes} x {args.trials} = {result['trials']} per storage")]
    for key, r in results.items():
        rows.append((f"{key} trials/s (span | wall)", f"{r['trials_per_s']:.2f} | {r['wall_trials_per_s']:.2f}"))
        rows.append((f"{key} lost / duplicated / states", f"{r['lost']} / {r['duplicated']} / {r['states']}"))
        rows.append((f"{key} seed trials / seed layouts", f"{r['dp_seed_trials']} / {r['dp_seed_layouts']}"))
    rows.append(("all sound", result["sound"]))
    report(rows, result, args.out)
    return result


if __name__ == "__main__":
    main()
