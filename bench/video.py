"""Video: a bidirectional teacher and a frame-causal student on moving digits, 2-in-1 distilled into a 4-step streamer.

Trains (budgeted, pinned to ONE torch thread: `torch.set_num_threads(1)`) a bidirectional teacher and a causal
student standalone on moving digits (T = 4, 16x16), runs compress/video_distill.py's two stages (KD, then
step + streaming distillation on the student's own autoregressive rollouts), and scores with the frame judge
(ditnas/video_quality.py): per-frame label accuracy, temporal consistency (generated / real consecutive-frame
cosine), FD on frames. Also: the streamed-vs-whole-clip causal error of the student, the Streamer's eager-torch
FPS, the teacher's figures beside the student's, the teacher's quality at a few step counts of its one
training run (`teacher_steps_sweep`), and the DISTILLED student's chunk programs exported as .pte
(latency_models/stream_programs.py) and timed as a whole streamed generation on this host's ExecuTorch XNNPACK
runtime in a fresh process (`stream_fps_host`), with their parity to the eager Streamer on the same noise.
Prints a table, writes JSON (default bench/results/video.json) plus a frame strip and a GIF of each model's
clips beside it. ~30 min at 1 thread on the 2-core VM (docs/benchmarks.md, "Video").

    python -m bench.video --out bench/results/video.json
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import torch

from bench.common import machine, report
from ditnas.latency_models.stream_programs import StreamPrograms, run_stream_pte, stream_generate_eager
from ditnas.latency_models.stream_timing import stream_fps_host
from ditnas.compress.video_distill import (
    VideoDistillConfig,
    distill_video,
    generate_recomputed,
    rollout,
)
from ditnas.config import load_config
from ditnas.data import load_split
from ditnas.judge import evaluate_samples, load_or_train_judge
from ditnas.supernet.flow import euler_sample, time_grid
from ditnas.supernet.streaming import StreamCache, Streamer
from ditnas.supernet.train import StandaloneTrainer, build_space
from ditnas.video_quality import frame_label_accuracy, frames_of, judge_split, save_frame_strip, save_gif, temporal_consistency

TEACHER = "sa:1:2 | sa:1:2 sa:1:2 | sa:1:2"  # a plain bidirectional DiT, 64 wide
STUDENT = "lcha:0.75:2 | ssa:0.75:2 lcha:0.75:2 | lcha:0.75:2"  # S2DiT-style sandwich, 48 wide, causal
# the teacher's schedule: long enough that its frames show digits (teacher_steps_sweep in video.json;
# docs/benchmarks.md "Video"); assumption: tuned here on this data, no paper sets it
TEACHER_STEPS, TEACHER_BATCH, TEACHER_LR = 2000, 16, 2e-3


def step_counts(text: str) -> tuple[int, ...]:
    """argparse type of --teacher-sweep: comma-separated positive step counts."""
    try:
        steps = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        steps = ()
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"--teacher-sweep {text!r}: give comma-separated step counts >= 1, e.g. 300,1000")
    return steps


def config(frames: int, causal: bool, steps: int, batch: int = 16, lr: float = 2e-3):
    return load_config(None, [
        "data.source=moving_digits", f"data.frames={frames}", "data.image_size=16",
        "space.depth=4", "space.stage_pattern=[0,1,1,0]", "space.skippable=[]", "space.ops=[sa,lcha,ssa]",
        "space.widths=[0.5,0.75,1.0]", "space.mlp_ratios=[2.0]", f"model.causal={str(causal).lower()}",
        f"train.steps={steps}", f"train.batch_size={batch}", f"train.lr={lr}", "train.warmup_steps=30",
    ])


def train(arch: str, cfg, split, steps: int, milestones: tuple[int, ...] = (),
          at_milestone: Callable[[int, torch.nn.Module], dict] | None = None,
          ) -> tuple[torch.nn.Module, list[float], float, dict[str, dict]]:
    """Standalone flow matching; returns the EMA weights' model, the losses, the training seconds and, per
    milestone step < `steps` (and at `steps`), `at_milestone(step, EMA model)`'s dict plus the training
    seconds and loss so far -- one run scored along the way, so a sweep over step counts costs one training."""
    trainer = StandaloneTrainer(build_space(cfg, split).parse(arch), cfg, split)
    losses: list[float] = []
    seconds, sweep = 0.0, {}
    for stop in sorted({m for m in milestones if 0 < m < steps} | {steps}):
        began = time.perf_counter()
        losses += [trainer.train_step() for _ in range(stop - trainer.step)]
        seconds += time.perf_counter() - began  # training only: the milestone's scoring is not counted
        model = copy.deepcopy(trainer.model)
        model.load_state_dict(trainer.ema.state_dict())
        model.eval()
        if at_milestone is not None:
            sweep[str(stop)] = {**at_milestone(stop, model), "train_seconds": round(seconds, 1),
                                "loss_last_20": round(sum(losses[-20:]) / len(losses[-20:]), 4)}
    return model, losses, seconds, sweep


def scores(judge, split, clips: torch.Tensor, labels: torch.Tensor) -> dict:
    free = evaluate_samples(judge, frames_of(clips)[:, :, None], None, judge_split(split).val_x)
    return {"frame_label_accuracy": round(frame_label_accuracy(judge, clips, labels), 4),
            "temporal_consistency": round(temporal_consistency(judge, clips, split.val_x), 4),
            "fd_frames": round(free["fd"], 2)}


class RuntimeStreamer:
    """The .pte chunk programs behind the Streamer interface `rollout` uses (chunk, new_cache, step, commit),
    so the runtime generates with the bench's own sampler (the shifted time grid) clip for clip."""

    def __init__(self, programs: StreamPrograms) -> None:
        self.programs, self.chunk = programs, programs.chunk

    def new_cache(self, batch: int) -> StreamCache:
        if batch != self.programs.batch:
            raise ValueError(f"the chunk programs were exported for batch {self.programs.batch}, not {batch}")
        return self.programs.new_cache()

    def step(self, x, t, y, cache):
        return self.programs.step(x, t, y, cache)

    def commit(self, clean, y, cache):
        return self.programs.commit(clean, y, cache)


@torch.no_grad()
def stream_on_runtime(student: torch.nn.Module, chunk: int, frames: int, steps: int, times: torch.Tensor,
                      noise: torch.Tensor, labels: torch.Tensor, folder: Path, clips: int = 10, rounds: int = 10) -> dict:
    """Export the distilled student's chunk programs into `folder` and time a whole streamed generation on the
    ExecuTorch XNNPACK runtime in `rounds` fresh processes (stream_timing.stream_fps_host, 1 thread, batch 1; one
    process varied 30-45% between processes on a loaded host, stream_timing.py); then,
    in this process, check the programs against eager torch on the bench's noise, one clip at a time (the
    programs are batch 1): `run_stream_pte` vs `stream_generate_eager` (stream_programs' loop, unshifted
    time grid) and `rollout` on the programs vs on the Streamer (the bench's sampler, `times`)."""
    host = stream_fps_host(student, chunk, frames, steps=steps, threads=1, warmup=1, iters=5, rounds=rounds, workdir=folder)
    programs = StreamPrograms(folder, threads=1)
    streamer = Streamer(student, chunk)
    err_loop = err_rollout = scale = 0.0
    for i in range(clips):
        z, y = noise[i:i + 1], labels[i:i + 1]
        pte, _ = run_stream_pte(programs, z, y, steps)
        ref, _ = stream_generate_eager(streamer, z, y, steps)
        err_loop = max(err_loop, (pte - ref).abs().max().item())
        pte = rollout(RuntimeStreamer(programs), z, y, times).clip
        ref = rollout(streamer, z, y, times).clip
        err_rollout = max(err_rollout, (pte - ref).abs().max().item())
        scale = max(scale, ref.abs().max().item())
    return {"host": host, "stream_pte_max_abs_err": err_loop, "stream_pte_rollout_max_abs_err": err_rollout,
            "clips": clips, "clip_max_abs": scale}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/video.json"))
    p.add_argument("--work", type=Path, default=Path("runs/bench_video"))
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--teacher-steps", type=int, default=TEACHER_STEPS)
    p.add_argument("--teacher-batch", type=int, default=TEACHER_BATCH)
    p.add_argument("--teacher-lr", type=float, default=TEACHER_LR)
    p.add_argument("--teacher-sweep", type=step_counts, default=(300, 1000), help="teacher step counts below --teacher-steps scored "
                   "on the way (comma-separated; the final teacher is always scored)")
    p.add_argument("--student-steps", type=int, default=300)
    p.add_argument("--kd-steps", type=int, default=100)
    p.add_argument("--distill-steps", type=int, default=150)
    p.add_argument("--method", default="regression", choices=["regression", "dmd"])
    p.add_argument("--chunk", type=int, default=1)
    p.add_argument("--clips", type=int, default=100, help="generated clips scored per model")
    p.add_argument("--rounds", type=int, default=10, help="fresh processes timing the student's streamed clip (median)")
    args = p.parse_args()
    torch.set_num_threads(1)  # the whole bench runs on ONE thread (budget and comparability on a shared machine)
    host = machine("torch", "executorch", threads=1)  # here, so loadavg_at_start is the start's
    started = time.time()
    args.work.mkdir(parents=True, exist_ok=True)

    t_cfg = config(args.frames, False, args.teacher_steps, args.teacher_batch, args.teacher_lr)
    s_cfg = config(args.frames, True, args.student_steps)
    split = load_split(t_cfg.data)
    judge = load_or_train_judge(judge_split(split), args.work / "judge", progress=False)

    # the same labels and noise for every model (and every teacher milestone)
    labels = torch.arange(args.clips) % split.num_classes
    shape = tuple(split.latent_shape)
    noise = torch.randn((args.clips, *shape), generator=torch.Generator().manual_seed(1234))
    null = split.num_classes

    def teacher_clips(model: torch.nn.Module) -> torch.Tensor:
        return euler_sample(model, labels, shape, steps=28, cfg_scale=2.0, null_label=null,
                            generator=torch.Generator(), noise=noise).clamp(-1, 1)

    milestone_clips: dict[int, tuple[torch.Tensor, float]] = {}

    def score_teacher(step: int, model: torch.nn.Module) -> dict:
        began = time.perf_counter()
        with torch.no_grad():
            clips = teacher_clips(model)
        milestone_clips[step] = (clips, time.perf_counter() - began)
        return scores(judge, split, clips, labels)

    teacher, t_losses, t_sec, t_sweep = train(TEACHER, t_cfg, split, args.teacher_steps, args.teacher_sweep,
                                              score_teacher)
    x_teacher, teacher_gen_sec = milestone_clips[args.teacher_steps]  # the final teacher's clips, scored above
    student0, s_losses, s_sec, _ = train(STUDENT, s_cfg, split, args.student_steps)
    assert student0.causal and not teacher.causal

    dcfg = VideoDistillConfig(kd_steps=args.kd_steps, steps=args.distill_steps, method=args.method, chunk=args.chunk,
                              batch_size=16, lr=3e-4, regression_pairs=256 if args.method == "regression" else 0,
                              checkpoint_every=50, eval_clips=32)
    student = copy.deepcopy(student0)
    began = time.perf_counter()
    manifest = distill_video(dcfg, teacher, student, split, args.work / f"distill_{args.method}")
    d_sec = time.perf_counter() - began
    student.eval()

    times = time_grid(dcfg.student_steps, dcfg.shift)
    with torch.no_grad():
        x_before = euler_sample(student0, labels, shape, steps=28, cfg_scale=2.0, null_label=null,
                                generator=torch.Generator(), noise=noise).clamp(-1, 1)
        x_before4 = rollout(Streamer(student0, dcfg.chunk), noise, labels, times).clip.clamp(-1, 1)
        x_after = rollout(Streamer(student, dcfg.chunk), noise, labels, times).clip.clamp(-1, 1)

        # cache parity: Streamer.run vs the whole-clip causal forward at several t; generation vs recomputation
        streamer = Streamer(student, dcfg.chunk)
        g = torch.Generator().manual_seed(5)
        x0 = split.val_x[:16]
        err = 0.0
        for level in (0.1, 0.5, 0.9):
            t = torch.full((16,), level)
            x_t = (1 - level) * x0 + level * torch.randn(x0.shape, generator=g)
            err = max(err, (streamer.run(x_t, t, split.val_y[:16]).output - student(x_t, t, split.val_y[:16])).abs().max().item())
        gen_err = (rollout(streamer, noise[:16], labels[:16], times).clip
                   - generate_recomputed(student, noise[:16], labels[:16], times, dcfg.chunk)).abs().max().item()

        # eager FPS, batch 1: a streamed 4-step generation (4 Euler steps + the commit per chunk)
        one_noise, one_y = noise[:1], labels[:1]
        rollout(streamer, one_noise, one_y, times)  # warm-up
        runs = []
        for _ in range(5):
            began = time.perf_counter()
            rollout(streamer, one_noise, one_y, times)
            runs.append(time.perf_counter() - began)
        gen_fps = sorted(shape[1] / s for s in runs)
        fwd = [streamer.run(x_t[:1], t[:1], one_y).stats for _ in range(5)]
        fwd_fps = sorted(f for s in fwd for f in s.fps)
        runs_t = []
        for _ in range(3):
            began = time.perf_counter()
            euler_sample(teacher, one_y, shape, steps=28, cfg_scale=2.0, null_label=null, generator=torch.Generator(),
                         noise=one_noise)
            runs_t.append(time.perf_counter() - began)
        teacher_fps = sorted(shape[1] / s for s in runs_t)

    # the distilled student on the runtime: its exported chunk programs, timed and checked against eager
    began = time.perf_counter()
    runtime = stream_on_runtime(student, dcfg.chunk, args.frames, dcfg.student_steps, times, noise, labels,
                                args.work / "stream_export", rounds=args.rounds)
    runtime_sec = time.perf_counter() - began
    rt = runtime["host"]

    results_dir = args.out.parent
    for name, clips in (("teacher", x_teacher), ("student_4step_stream", x_after)):
        save_frame_strip(clips[:10], results_dir / f"video_{name}.png")
        save_gif(clips[:10], results_dir / f"video_{name}.gif")

    def median(v: list[float]) -> float:
        return round(v[len(v) // 2], 2)

    result = {
        "machine": host,
        "date": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "data": {"source": "moving_digits", "frames": args.frames, "image_size": 16, "train_clips": int(split.train_x.shape[0]),
                 "val_clips": int(split.val_x.shape[0])},
        "judge_val_accuracy_frames": round(judge.val_accuracy, 4),
        "judge_train_seconds": round(judge.train_seconds, 1),  # 0 extra when load_or_train_judge found it cached
        "real_val_clips": {"frame_label_accuracy": round(frame_label_accuracy(judge, split.val_x, split.val_y), 4),
                           "temporal_consistency": 1.0},
        "teacher": {"arch": TEACHER, "causal": False, "params": teacher.num_params(), "train_steps": args.teacher_steps,
                    "batch_size": args.teacher_batch, "lr": args.teacher_lr,
                    "train_seconds": round(t_sec, 1), "final_loss": round(sum(t_losses[-20:]) / 20, 4),
                    "sampler": "28 Euler steps, CFG 2, whole clip", **scores(judge, split, x_teacher, labels),
                    "gen_fps_eager": median(teacher_fps), "gen_seconds_all_clips": round(teacher_gen_sec, 1)},
        "teacher_steps_sweep": {
            step: {k: v[k] for k in ("frame_label_accuracy", "fd_frames", "temporal_consistency", "train_seconds",
                                     "loss_last_20")} | {"gen_seconds": round(milestone_clips[int(step)][1], 1)}
            for step, v in t_sweep.items()},
        "teacher_steps_sweep_note": (f"ONE teacher training run (batch {args.teacher_batch}, lr {args.teacher_lr}, "
                                     "warm-up 30, EMA 0.999 with warm-up) scored at these step counts with its EMA "
                                     f"weights: {args.clips} clips, 28 Euler steps, CFG 2, the same noise and labels "
                                     "as every model here; train_seconds = cumulative training time at 1 thread "
                                     "(scoring excluded); chance frame accuracy 0.10"),
        "student_before": {"arch": STUDENT, "causal": True, "params": student0.num_params(),
                           "train_steps": args.student_steps, "train_seconds": round(s_sec, 1),
                           "final_loss": round(sum(s_losses[-20:]) / 20, 4),
                           "28_step_cfg_whole_clip": scores(judge, split, x_before, labels),
                           "4_step_stream": scores(judge, split, x_before4, labels)},
        "student": {"arch": STUDENT, "sampler": f"4 Euler steps per chunk of {dcfg.chunk} frame(s), streamed, no CFG",
                    **scores(judge, split, x_after, labels)},
        "frame_label_accuracy": round(frame_label_accuracy(judge, x_after, labels), 4),
        "temporal_consistency": round(temporal_consistency(judge, x_after, split.val_x), 4),
        "cache_max_abs_err": err,
        "cache_max_abs_err_note": "student: Streamer.run (chunked, cached) vs the whole-clip causal forward, t in {0.1,0.5,0.9}",
        "generation_recompute_max_abs_err": gen_err,
        "stream_fps_eager": median(gen_fps),
        "stream_fps_eager_note": ("eager torch, 1 thread, batch 1: latent frames per second of a streamed 4-step "
                                  "generation (4 denoising steps + 1 commit per chunk); median of 5"),
        "stream_forward_fps_eager": median(fwd_fps),
        "stream_forward_fps_eager_note": "eager torch: one forward per chunk (Streamer.run StreamStats), median",
        "stream_fps_host": round(rt["fps"], 2),
        "stream_fps_host_note": (
            f"the DISTILLED student's chunk programs (latency_models/stream_programs.py: one .pte per chunk position, chunk "
            f"{dcfg.chunk}, {rt['programs']} programs) on this host's ExecuTorch XNNPACK runtime, {rt['threads']} "
            f"thread, batch 1: latent frames per second of a whole streamed generation of a T = {args.frames} clip "
            f"({rt['steps']} Euler steps per chunk + 1 commit call per chunk but the last = {rt['program_calls']} "
            f"program calls, host-side Euler updates included), median over {rt['rounds']} fresh processes of each one's "
            "median of 5 after 1 warm-up; "
            "export/lowering time not included (stream_host.export_s)"),
        "stream_host": {k: rt[k] for k in ("total_ms", "chunk_ms", "rounds", "rounds_total_ms", "program_calls", "cache_bytes",
                                           "delegated_subgraphs", "export_s")} | {"wall_s": round(runtime_sec, 1)},
        "stream_pte_max_abs_err": runtime["stream_pte_max_abs_err"],
        "stream_pte_max_abs_err_note": (
            f"max |clip| difference, {runtime['clips']} clips (batch 1, one per label, the bench's noise): the .pte "
            f"stream (run_stream_pte) vs the eager Streamer (stream_generate_eager), {dcfg.student_steps} steps on "
            "stream_programs' unshifted time grid; clips reach max |x| "
            f"{runtime['clip_max_abs']:.2f}"),
        "stream_pte_rollout_max_abs_err": runtime["stream_pte_rollout_max_abs_err"],
        "stream_pte_rollout_max_abs_err_note": (
            f"the same clips with the bench's sampler (rollout, time grid shifted by {dcfg.shift}): the chunk "
            "programs behind the Streamer interface vs the eager Streamer"),
        "distill": {"config": asdict(dcfg), "seconds": round(d_sec, 1), "metrics": manifest["metrics"]},
    }
    # the searched layout vs all-SA and a uniform interleave at the same FPS: bench/video_search.py adds it here
    result["seconds"] = round(time.time() - started, 1)

    rows = [
        ("model", "frame acc | temporal cons. | FD frames"),
        ("real val clips", f"{result['real_val_clips']['frame_label_accuracy']:.3f} | 1.000"),
    ]
    for step, v in result["teacher_steps_sweep"].items():
        rows.append((f"teacher @ {step} steps", f"{v['frame_label_accuracy']:.3f} | {v['temporal_consistency']:.3f} | "
                                                f"{v['fd_frames']}  ({v['train_seconds']} s)"))
    rows.append(("teacher (bidir, 28 st, cfg)", f"{result['teacher']['frame_label_accuracy']:.3f} | "
                                                f"{result['teacher']['temporal_consistency']:.3f} | {result['teacher']['fd_frames']}"))
    for key, label in (("28_step_cfg_whole_clip", "student before (28 st, cfg)"), ("4_step_stream", "student before (4 st, stream)")):
        s = result["student_before"][key]
        rows.append((label, f"{s['frame_label_accuracy']:.3f} | {s['temporal_consistency']:.3f} | {s['fd_frames']}"))
    s = result["student"]
    rows += [(f"student after 2-in-1 ({args.method})", f"{s['frame_label_accuracy']:.3f} | {s['temporal_consistency']:.3f} | {s['fd_frames']}"),
             ("teacher gap (MSE to ODE)", f"{manifest['metrics']['before']} -> {manifest['metrics']['after']}"),
             ("cache max abs err", f"{err:.2e} (forward), {gen_err:.2e} (generation)"),
             ("stream FPS eager (1 thr)", f"{result['stream_fps_eager']} gen, {result['stream_forward_fps_eager']} fwd; "
                                          f"teacher {result['teacher']['gen_fps_eager']}"),
             ("stream FPS .pte (1 thr)", f"{result['stream_fps_host']} ({rt['total_ms']:.1f} ms / clip, "
                                         f"export {rt['export_s']:.0f} s)"),
             (".pte vs eager stream", f"{result['stream_pte_max_abs_err']:.2e} (loop), "
                                      f"{result['stream_pte_rollout_max_abs_err']:.2e} (bench sampler)"),
             ("seconds", result["seconds"])]
    report(rows, result, args.out)


if __name__ == "__main__":
    main()
