"""`ditnas run` as a user runs it: wall time per stage and what the final model is worth.

    python bench/run.py [--out bench/results/run.json] [--folder runs/bench_run] [--config FILE]
                        [--set field=value ...]

Runs the `ditnas` CLI (the installed entry point, a fresh process) into a fresh run folder (the
folder is deleted first: nothing is reused), timing the whole command (a fresh clone's first run has an
empty per-user lowering cache: `DITNAS_CACHE_DIR=<empty folder>` measures that; the JSON records the
cache's state); then reads `run.json` for the
stages' wall seconds and metrics and prints a table. Figures, as the stages measured them:

- `wall_seconds` (goal <= 600 on this 2-core machine, install excluded) and `stage_seconds`;
- the 4-step student: FD and label accuracy on the digits judge (distill stage, `compress.distill
  .eval_samples` samples, no CFG), and the 28-step max net's FD and accuracy from the train stage's
  quality evaluation (its own sample count and the sampler's CFG scale, named beside it) -- so
  `student_fd_ratio` compares two sample sizes and guidance settings when they differ: read it as
  an indication, bench/distill.py measures the ratio at equal settings;
- the student's measured generation on the ExecuTorch XNNPACK runtime (export stage, this host,
  `compress.export.threads` threads) and the max net's measured 28-step generation from the profile
  (search stage's `max_net_ms`, 1 thread): `speedup_vs_max_net` is their ratio when both were
  measured at the same thread count, else null with the reason;
- the report's path.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

from common import machine, report  # noqa: E402


def _get(d: dict, *path: str, default=None):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return default
        d = d[key]
    return d


def summarize(manifest: dict, wall: float) -> dict:
    stages = manifest.get("stages", {})
    # the quality stage's since it runs in the background; a run folder of older ditnas kept it in train
    train_q = _get(stages, "quality", "metrics", "quality", default=None) or _get(stages, "train", "metrics", "quality",
                                                                                   default={}) or {}
    teacher = train_q.get("max") or next(iter(train_q.values()), {}) if isinstance(train_q, dict) else {}
    distill = _get(stages, "distill", "metrics", default={}) or {}
    timing = _get(stages, "export", "metrics", "timing", default={}) or {}
    search = _get(stages, "search", "metrics", default={}) or {}
    sampler = _get(stages, "export", "metrics", "sampler", default={}) or {}
    # the shipped program's whole generation: the unrolled one when the export chose it (compress.export.sampler)
    student_ms = sampler.get("unrolled_ms") if sampler.get("shipped") == "unrolled" else timing.get("pte_generation_ms")
    max_net_ms = search.get("max_net_ms")
    table_threads = 1  # the profile's latency.threads default; the export check's threads are recorded
    same_threads = timing.get("threads") == table_threads
    speedup = (max_net_ms / student_ms) if (student_ms and max_net_ms and same_threads) else None
    return {
        "wall_seconds": round(wall, 1),
        "goal_wall_seconds": 600,
        "wall_goal_met": wall <= 600,
        "stage_seconds": {name: rec.get("wall_s") for name, rec in stages.items()},
        "stage_status": {name: rec.get("status") for name, rec in stages.items()},
        "student": {"steps": _get(manifest, "config", "compress", "distill", "student_steps"),
                    "fd": distill.get("fd"), "label_accuracy": distill.get("label_accuracy"),
                    "samples": _get(manifest, "config", "compress", "distill", "eval_samples")},
        "max_net_28_steps": {"fd": teacher.get("fd"), "label_accuracy": teacher.get("label_accuracy"),
                             "samples": teacher.get("n_fd"), "cfg_scale": teacher.get("cfg_scale")},
        "student_fd_ratio": (distill["fd"] / teacher["fd"]) if distill.get("fd") and teacher.get("fd") else None,
        "student_generation_ms_measured": student_ms,
        "student_generation_threads": timing.get("threads"),
        "student_sampler": {k: sampler.get(k) for k in ("shipped", "why", "host_loop_ms", "unrolled_ms")},
        "max_net_generation_ms": max_net_ms,
        "max_net_generation_source": "measured" if "measured" in str(search.get("budget_source")) else "predicted",
        "speedup_vs_max_net": speedup,
        "speedup_note": None if speedup is not None else
        f"not comparable: student timed at {timing.get('threads')} threads, table at {table_threads}",
        "chosen_arch": _get(stages, "search", "outputs", "best", "arch"),
        "budget_ms": search.get("budget_ms"),
        "report": _get(stages, "report", "outputs", "html"),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "results" / "run.json")
    ap.add_argument("--folder", type=Path, default=Path("runs/bench_run"))
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--resummarize", action="store_true",
                    help="re-read --folder's run.json into --out (keeps the measured wall time and machine)")
    args = ap.parse_args(argv)
    if args.resummarize:
        old = json.loads(args.out.read_text())
        keep = {k: old[k] for k in ("benchmark", "machine", "log")}
        result = {**keep, **summarize(json.loads((args.folder / "run.json").read_text()), old["wall_seconds"])}
        report([("wall seconds", result["wall_seconds"])], result, args.out)
        return result
    if args.folder.exists():
        shutil.rmtree(args.folder)  # a fresh run folder: nothing reused
    exe = shutil.which("ditnas") or sys.exit("the ditnas command is not on PATH; pip install -e . first")
    cmd = [exe, "run", "--out", str(args.folder), "--no-progress"]
    cmd += ["--config", str(args.config)] if args.config else []
    cmd += [a for item in args.overrides for a in ("--set", item)]
    info = machine("torch", "executorch", command=" ".join(cmd[1:]))
    # a warm per-user cache of lowered programs (lowered_cache.py) skips most of the lowering: say which
    from ditnas.latency_models.lowered_cache import default_root

    cache = default_root()
    entries = sum(1 for _ in (cache / "lowered").glob("*/*")) if cache is not None and (cache / "lowered").is_dir() else 0
    info["lowering_cache"] = {"root": str(cache) if cache else "off", "entries_at_start": entries,
                              "state": "off" if cache is None else ("cold (empty)" if entries == 0 else "warm")}
    log = args.folder.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"`{' '.join(cmd)}` failed (exit {proc.returncode}); see {log}")
    manifest = json.loads((args.folder / "run.json").read_text())
    result = {"benchmark": "run", "machine": info, "log": str(log), **summarize(manifest, wall)}
    rows = [("wall seconds (goal <= 600)", result["wall_seconds"]),
            ("lowering cache at start", f"{info['lowering_cache']['state']} ({info['lowering_cache']['root']})")]
    rows += [(f"  {name}", f"{sec} s ({result['stage_status'][name]})") for name, sec in result["stage_seconds"].items()]
    rows += [("student FD / label acc", f"{result['student']['fd']} / {result['student']['label_accuracy']}"),
             ("max net (28 steps) FD / label acc", f"{result['max_net_28_steps']['fd']} / "
                                                   f"{result['max_net_28_steps']['label_accuracy']}"),
             ("student FD ratio", result["student_fd_ratio"]),
             ("student generation ms (measured .pte)", result["student_generation_ms_measured"]),
             ("max net generation ms", f"{result['max_net_generation_ms']} ({result['max_net_generation_source']})"),
             ("speed-up vs max net", result["speedup_vs_max_net"] or result["speedup_note"]),
             ("report", result["report"])]
    report(rows, result, args.out)
    return result


if __name__ == "__main__":
    main()
