"""Streaming search on clips: is the streamed-clip price right, and does the searched layout beat the obvious ones
at the same streaming FPS?

On configs/video.yaml's space (T = 4 latent frames of 16x16, sa/lcha/ssa, 4 slots, frame-causal), pinned to ONE
torch thread (`torch.set_num_threads(1)`) and timing at 1 ExecuTorch thread:

1. profiles the space with streaming cells (`latency.stream_chunk: 1`: every block at every chunk position, and
   whole streams of 8 calibration archs at 1 and 4 steps per chunk) and fits the StreamingPredictor (4 steps);
2. trains the causal supernet (video.yaml's train section) and searches at a target FPS (`--target-fps`; default
   the rate halfway, in ms, between the cheapest reachable arch and the max net);
3. picks the obvious layouts at the same FPS: all-SA and a uniform LCHA/SSA interleave (every slot the same width
   and MLP ratio, no skips), each the slowest of its family that still meets the target;
4. measures a whole streamed 4-step clip of every one of them and of `--held-out` random archs on the runtime
   (chunk programs exported, then `--rounds` fresh processes each timing one clip of every arch in a new order,
   median over rounds: latency_models/stream_timing.py) against the prediction:
   `stream_within_10pct`, `stream_median_abs_err_pct`, `stream_max_abs_err_pct` (held-out: no arch of the fit);
   and the same error for stream fits on the first 3, 4, 6 and 8 calibration archs with and without the
   per-program term (`stream_fit_ablation`);
5. trains the three layouts standalone (`--quality-steps`, same seed and data) and scores them: validation
   flow-matching loss (the search's protocol) and, on 28-step whole-clip samples, frame label accuracy and FD.

    python -m bench.video_search --out bench/results/video_search.json
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import torch

import ditnas
from bench.common import machine, report
from ditnas.arch import Arch, Slot
from ditnas.config import load_config
from ditnas.data import load_split
from ditnas.judge import evaluate_samples, load_or_train_judge
from ditnas.latency_models.profile import profile_space, supernet_for_profiling
from ditnas.latency_models.stage import build_table
from ditnas.latency_models.stream_latency import StreamingPredictor
from ditnas.latency_models.stream_programs import export_stream_programs
from ditnas.latency_models.stream_timing import stream_p50, time_streams_in_rounds
from ditnas.search.problem import min_reachable_ms
from ditnas.search.space import SearchChoices
from ditnas.search.stage import run_search
from ditnas.supernet.flow import EVAL_SEED, euler_sample, eval_flow_loss, fixed_eval_batch
from ditnas.supernet.train import StandaloneTrainer, train_supernet
from ditnas.video_quality import frame_label_accuracy, frames_of, judge_split

CHUNK, STEPS = 1, 4
# assumption: video.yaml's space at one MLP ratio and 3 whole-model rows (half the programs to lower: the bench has
# to finish in well under an hour on 2 shared cores); everything else as the video run prices it
BENCH_SETS = ["space.mlp_ratios=[2]", "latency.models=3", "latency.generation_steps=[4]",
              "latency.generation_iters=10",  # 10 rounds of fresh processes for the calibration streams
              "latency.stream_models=8"]  # 16 calibration streams: fits on the first 3, 4, 6 and 8 archs are compared
FIT_ARCHS = (3, 4, 6, 8)


def uniform_family(space, ops: tuple[str, ...]) -> list[Arch]:
    """Every arch with `ops` cycled over the slots, one width and MLP ratio for all, no skips."""
    base = space.max_arch()
    return [base.with_slots([Slot(ops[i % len(ops)], w, r, s) for i, s in enumerate(space.stage_pattern)])
            for w in space.widths for r in space.mlp_ratios]


def slowest_within(pred: StreamingPredictor, family: list[Arch], budget_ms: float) -> Arch | None:
    fits = [a for a in family if pred.predict(a) <= budget_ms]
    return max(fits, key=pred.predict) if fits else None


def measure_all(pred: StreamingPredictor, supernet, archs: dict[str, Arch], rounds: int, work: Path) -> dict[str, dict]:
    """Every arch's chunk programs exported (kept in `work`: a rerun re-times, it does not lower again), then whole
    streamed 4-step clips timed in `rounds` fresh processes, each timing one clip of every arch in a new order
    (stream_timing.py: one process per arch varied 30-45% here), against the prediction."""
    from ditnas.manifest import MANIFEST

    jobs = []
    for name, arch in archs.items():
        folder = work / f"{arch.key()}_chunk{CHUNK}"
        if not (folder / MANIFEST).exists():
            export_stream_programs(supernet.extract(arch).eval().set_causal(True), CHUNK, pred.frames, folder)
        jobs.append((name, folder, STEPS))
    show = lambda i, n, what: print(f"  [{i}/{n}] {what}", flush=True)  # noqa: E731
    timed = time_streams_in_rounds(jobs, 1, rounds, warmup=1, iters=1, seed=0, progress=show)["streams"]
    out = {}
    for name, arch in archs.items():
        ms = stream_p50(timed[name]["total_ms"])
        flat = [c for rnd in timed[name]["chunk_ms"] for c in rnd]
        predicted = pred.predict(arch)
        out[name] = {"arch": str(arch), "predicted_ms": round(predicted, 3), "measured_ms": round(ms, 3),
                     "err_pct": round((predicted - ms) / ms * 100, 2), "measured_fps": round(pred.frames / ms * 1e3, 1),
                     "predicted_fps": round(pred.fps(arch), 1),
                     "chunk_ms": [round(statistics.median(col), 3) for col in zip(*flat)],
                     "rounds_ms": [round(r[0], 3) for r in timed[name]["total_ms"]]}
    return out


def fit_ablation(base, rows: list[dict], held: list[dict]) -> list[dict]:
    """The held-out error of stream fits on the first k calibration archs' streams, with and without the
    per-program term (stream_latency.StreamFit): what the term and each extra calibration arch buy."""
    order = list(dict.fromkeys(r["arch"] for r in rows))
    out = []
    for k in FIT_ARCHS:
        if k > len(order):
            continue
        mine = [r for r in rows if r["arch"] in order[:k]]
        for term in (True, False):
            p = StreamingPredictor.fit_rows(base, CHUNK, STEPS, mine, program_term=term)
            signed = [(p.predict(base.space.parse(h["arch"])) - h["measured_ms"]) / h["measured_ms"] * 100 for h in held]
            errs = [abs(e) for e in signed]
            out.append({"calibration_archs": k, "program_term": term, "method": p.fit.method,
                        "fit": {n: round(getattr(p.fit, n), 4) for n in ("alpha", "delta", "beta", "gamma")},
                        "within_10pct": round(sum(e <= 10 for e in errs) / len(errs), 3),
                        "median_abs_err_pct": round(statistics.median(errs), 2), "max_abs_err_pct": round(max(errs), 2),
                        "mean_signed_err_pct": round(statistics.mean(signed), 2)})
    return out


def quality(arch: Arch, cfg, split, steps: int, judge, samples: int) -> dict:
    """Standalone training of `arch` (frame-causal, the run's data and seed), then its scores."""
    trainer = StandaloneTrainer(arch, cfg, split)
    began = time.perf_counter()
    losses = [trainer.train_step() for _ in range(steps)]
    seconds = time.perf_counter() - began
    model = copy.deepcopy(trainer.model)
    model.load_state_dict(trainer.ema.state_dict())
    model.eval()
    null = arch.num_classes
    batch = fixed_eval_batch(split.val_x, split.val_y, 512, EVAL_SEED, null)
    val = eval_flow_loss(model, batch)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(samples) % split.num_classes
    clips = euler_sample(model, labels, tuple(split.latent_shape), steps=28, cfg_scale=2.0, null_label=null, generator=g)
    free = evaluate_samples(judge, frames_of(clips)[:, :, None], None, judge_split(split).val_x)
    return {"arch": str(arch), "train_steps": steps, "train_seconds": round(seconds, 1),
            "loss_last_20": round(sum(losses[-20:]) / len(losses[-20:]), 4), "val_flow_loss": round(val, 5),
            "frame_label_accuracy": round(frame_label_accuracy(judge, clips, labels), 4), "fd_frames": round(free["fd"], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/video_search.json"))
    p.add_argument("--work", type=Path, default=Path("runs/bench_video_search"), help="resumable work folder")
    p.add_argument("--target-fps", type=float, default=None)
    p.add_argument("--held-out", type=int, default=8)
    p.add_argument("--rounds", type=int, default=10,
                   help="fresh processes, each timing one stream of every arch in a new order (median over rounds)")
    p.add_argument("--quality-steps", type=int, default=400)
    p.add_argument("--samples", type=int, default=64, help="clips sampled per layout for the judge")
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--merge-into", type=Path, default=Path("bench/results/video.json"),
                   help="bench/video.py's JSON: the layout comparison is copied into it as `layouts` (one file per issue item)")
    args = p.parse_args()
    torch.set_num_threads(1)
    began = time.perf_counter()
    load0 = machine("torch", "executorch", threads=1)
    cfg = load_config(Path(ditnas.__file__).parent / "configs" / "video.yaml", BENCH_SETS)
    split = load_split(cfg.data)
    work = args.work

    # 1. streaming latency table (latency does not depend on weights: a fresh supernet prices the same cells)
    t0 = time.perf_counter()
    fresh = supernet_for_profiling(cfg)
    session = profile_space(fresh, cfg.latency, work / "profile", progress=None)
    table, base = build_table(session, fresh)
    pred = StreamingPredictor.load(base, table.root, CHUNK, STEPS)
    profile_s = time.perf_counter() - t0

    # 2. supernet + search at the target FPS
    t0 = time.perf_counter()
    train_supernet(cfg, work / "train")
    train_s = time.perf_counter() - t0
    choices = SearchChoices.from_space(table.space)
    cheapest, top = min_reachable_ms(choices, pred), pred.predict(table.space.max_arch())
    budget = cheapest + 0.5 * (top - cheapest)
    fps = args.target_fps or pred.frames / budget * 1e3
    budget = pred.frames / fps * 1e3
    t0 = time.perf_counter()
    search_cfg = replace(cfg.search, target_fps=fps, budget_ms=None, trials=args.trials)
    m = run_search(search_cfg, work / "train" / "checkpoint.pt", table.root, work / f"search_fps{fps:.1f}")
    search_s = time.perf_counter() - t0
    searched = table.space.parse(m["best"]["arch"])

    # 3. the obvious layouts at the same FPS
    layouts = {"searched": searched,
               "all_sa": slowest_within(pred, uniform_family(table.space, ("sa",)), budget),
               "interleave_lcha_ssa": slowest_within(pred, uniform_family(table.space, ("lcha", "ssa")), budget)}

    # 4. predicted vs measured streams
    supernet = fresh
    calibration = {r["arch"] for r in pred.rows}
    rng = random.Random(7)
    held = []
    while len(held) < args.held_out:
        a = table.space.sample(rng)
        if str(a) not in calibration and a not in held and a not in layouts.values():
            held.append(a)
    measured = measure_all(pred, supernet, {**{n: a for n, a in layouts.items() if a is not None},
                                            **{f"held_{i}": a for i, a in enumerate(held)}}, args.rounds, work / "streams")
    timed = {name: measured[name] for name, a in layouts.items() if a is not None}
    held_rows = [measured[f"held_{i}"] for i in range(len(held))]
    rows_all = list(timed.values()) + held_rows
    errs = [abs(r["err_pct"]) for r in rows_all]
    ablation = fit_ablation(base, pred.rows, [r for r in rows_all if r["arch"] not in calibration])

    # the streams measured so far land on disk first: the quality stage below trains for many minutes
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"partial": "streams measured; layout quality not yet", "held_out": held_rows,
                                    "layouts": timed, "stream_errs_pct": errs}, indent=2, default=str) + "\n")

    # 5. quality at the same FPS
    judge = load_or_train_judge(judge_split(split), work / "judge")
    q_cfg = replace(cfg, model=replace(cfg.model, causal=True))
    qualities = {name: quality(a, q_cfg, split, args.quality_steps, judge, args.samples)
                 for name, a in layouts.items() if a is not None}

    result = {
        "machine": load0, "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "space": str(table.space.max_arch()), "config": "ditnas/configs/video.yaml + " + " ".join(BENCH_SETS), "chunk": CHUNK, "steps_per_chunk": STEPS, "frames": pred.frames,
        "latency_definition": pred.definition(), "stream_fit": pred.describe()["fit"],
        "calibration_archs": sorted(calibration),
        "target_fps": round(fps, 2), "budget_ms": round(budget, 3),
        "cheapest_predicted_fps": round(pred.frames / cheapest * 1e3, 1),
        "max_net_predicted_fps": round(pred.fps(table.space.max_arch()), 1),
        "layouts": {name: {"arch": str(a) if a else None, "stream": timed.get(name), "quality": qualities.get(name)}
                    for name, a in layouts.items()},
        "held_out": held_rows,
        "stream_within_10pct": round(sum(e <= 10 for e in errs) / len(errs), 3),
        "stream_median_abs_err_pct": round(statistics.median(errs), 2),
        "stream_max_abs_err_pct": round(max(errs), 2),
        "stream_n_archs": len(errs),
        "stream_fit_ablation": ablation,
        "search": {"trials": m["trials_total"], "feasible": m["trials_feasible"], "seconds": round(search_s, 1),
                   "best": m["best"]},
        "seconds": {"profile": round(profile_s, 1), "train": round(train_s, 1), "search": round(search_s, 1),
                    "total": round(time.perf_counter() - began, 1)},
    }
    rows = [("target FPS (latent frames/s)", result["target_fps"]), ("budget ms per clip", result["budget_ms"])]
    for name, entry in result["layouts"].items():
        s, q = entry["stream"] or {}, entry["quality"] or {}
        rows.append((f"{name}: {entry['arch']}", f"pred {s.get('predicted_fps')} / meas {s.get('measured_fps')} FPS; "
                     f"val loss {q.get('val_flow_loss')}; frame acc {q.get('frame_label_accuracy')}; FD {q.get('fd_frames')}"))
    rows += [("stream within 10%", result["stream_within_10pct"]), ("stream median |err| %", result["stream_median_abs_err_pct"]),
             ("stream max |err| %", result["stream_max_abs_err_pct"])]
    rows += [(f"fit on {a['calibration_archs']} archs, {'with' if a['program_term'] else 'without'} program term",
              f"within 10% {a['within_10pct']}, median {a['median_abs_err_pct']}%, max {a['max_abs_err_pct']}%, "
              f"mean signed {a['mean_signed_err_pct']:+}%") for a in ablation]
    report(rows, result, args.out)
    if args.merge_into.is_file():
        merged = json.loads(args.merge_into.read_text())
        merged["layouts"] = {"source": f"bench/video_search.py ({args.out}, {result['date']})",
                             "target_fps": result["target_fps"], "budget_ms": result["budget_ms"], **result["layouts"]}
        args.merge_into.write_text(json.dumps(merged, indent=2) + "\n")


if __name__ == "__main__":
    main()
