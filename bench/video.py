"""Video: a bidirectional teacher and a frame-causal student on moving digits, 2-in-1 distilled into a 4-step streamer.

Trains (budgeted, pinned to ONE torch thread: `torch.set_num_threads(1)`) a bidirectional teacher and a causal
student standalone on moving digits (T = 4, 16x16), runs compress/video_distill.py's two stages (KD, then
step + streaming distillation on the student's own autoregressive rollouts), and scores with the frame judge
(ditnas/video_quality.py): per-frame label accuracy, temporal consistency (generated / real consecutive-frame
cosine), FD on frames. Also: the streamed-vs-whole-clip causal error of the student, the Streamer's eager-torch
FPS, the teacher's figures beside the student's. Prints a table, writes JSON (default bench/results/video.json)
plus a frame strip and a GIF of each model's clips beside it.

    python -m bench.video --out bench/results/video.json
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import torch

from bench.common import machine, report
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
from ditnas.supernet.streaming import Streamer
from ditnas.supernet.train import StandaloneTrainer, build_space
from ditnas.video_quality import frame_label_accuracy, frames_of, judge_split, save_frame_strip, save_gif, temporal_consistency

TEACHER = "sa:1:2 | sa:1:2 sa:1:2 | sa:1:2"  # a plain bidirectional DiT, 64 wide
STUDENT = "lcha:0.75:2 | ssa:0.75:2 lcha:0.75:2 | lcha:0.75:2"  # S2DiT-style sandwich, 48 wide, causal


def config(frames: int, causal: bool, steps: int):
    return load_config(None, [
        "data.source=moving_digits", f"data.frames={frames}", "data.image_size=16",
        "space.depth=4", "space.stage_pattern=[0,1,1,0]", "space.skippable=[]", "space.ops=[sa,lcha,ssa]",
        "space.widths=[0.5,0.75,1.0]", "space.mlp_ratios=[2.0]", f"model.causal={str(causal).lower()}",
        f"train.steps={steps}", "train.batch_size=16", "train.lr=2e-3", "train.warmup_steps=30",
    ])


def train(arch: str, cfg, split, steps: int) -> tuple[torch.nn.Module, list[float], float]:
    """Standalone flow matching; returns the EMA weights' model, the losses and the seconds."""
    trainer = StandaloneTrainer(build_space(cfg, split).parse(arch), cfg, split)
    began = time.perf_counter()
    losses = [trainer.train_step() for _ in range(steps)]
    model = copy.deepcopy(trainer.model)
    model.load_state_dict(trainer.ema.state_dict())
    return model.eval(), losses, time.perf_counter() - began


def scores(judge, split, clips: torch.Tensor, labels: torch.Tensor) -> dict:
    free = evaluate_samples(judge, frames_of(clips)[:, :, None], None, judge_split(split).val_x)
    return {"frame_label_accuracy": round(frame_label_accuracy(judge, clips, labels), 4),
            "temporal_consistency": round(temporal_consistency(judge, clips, split.val_x), 4),
            "fd_frames": round(free["fd"], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/video.json"))
    p.add_argument("--work", type=Path, default=Path("runs/bench_video"))
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--teacher-steps", type=int, default=300)
    p.add_argument("--student-steps", type=int, default=300)
    p.add_argument("--kd-steps", type=int, default=100)
    p.add_argument("--distill-steps", type=int, default=150)
    p.add_argument("--method", default="regression", choices=["regression", "dmd"])
    p.add_argument("--chunk", type=int, default=1)
    p.add_argument("--clips", type=int, default=100, help="generated clips scored per model")
    args = p.parse_args()
    torch.set_num_threads(1)  # the whole bench runs on ONE thread (budget and comparability on a shared machine)
    started = time.time()
    args.work.mkdir(parents=True, exist_ok=True)

    t_cfg, s_cfg = config(args.frames, False, args.teacher_steps), config(args.frames, True, args.student_steps)
    split = load_split(t_cfg.data)
    judge = load_or_train_judge(judge_split(split), args.work / "judge", progress=False)
    teacher, t_losses, t_sec = train(TEACHER, t_cfg, split, args.teacher_steps)
    student0, s_losses, s_sec = train(STUDENT, s_cfg, split, args.student_steps)
    assert student0.causal and not teacher.causal

    dcfg = VideoDistillConfig(kd_steps=args.kd_steps, steps=args.distill_steps, method=args.method, chunk=args.chunk,
                              batch_size=16, lr=3e-4, regression_pairs=256 if args.method == "regression" else 0,
                              checkpoint_every=50, eval_clips=32)
    student = copy.deepcopy(student0)
    began = time.perf_counter()
    manifest = distill_video(dcfg, teacher, student, split, args.work / f"distill_{args.method}")
    d_sec = time.perf_counter() - began
    student.eval()

    # the same labels and noise for every model
    labels = torch.arange(args.clips) % split.num_classes
    shape = tuple(split.latent_shape)
    noise = torch.randn((args.clips, *shape), generator=torch.Generator().manual_seed(1234))
    null = split.num_classes
    times = time_grid(dcfg.student_steps, dcfg.shift)
    with torch.no_grad():
        began = time.perf_counter()
        x_teacher = euler_sample(teacher, labels, shape, steps=28, cfg_scale=2.0, null_label=null,
                                 generator=torch.Generator(), noise=noise).clamp(-1, 1)
        teacher_gen_sec = time.perf_counter() - began
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

    results_dir = args.out.parent
    for name, clips in (("teacher", x_teacher), ("student_4step_stream", x_after)):
        save_frame_strip(clips[:10], results_dir / f"video_{name}.png")
        save_gif(clips[:10], results_dir / f"video_{name}.gif")

    def median(v: list[float]) -> float:
        return round(v[len(v) // 2], 2)

    result = {
        "machine": machine("torch", threads=1),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "data": {"source": "moving_digits", "frames": args.frames, "image_size": 16, "train_clips": int(split.train_x.shape[0]),
                 "val_clips": int(split.val_x.shape[0])},
        "judge_val_accuracy_frames": round(judge.val_accuracy, 4),
        "judge_train_seconds": round(judge.train_seconds, 1),  # 0 extra when load_or_train_judge found it cached
        "real_val_clips": {"frame_label_accuracy": round(frame_label_accuracy(judge, split.val_x, split.val_y), 4),
                           "temporal_consistency": 1.0},
        "teacher": {"arch": TEACHER, "causal": False, "params": teacher.num_params(), "train_steps": args.teacher_steps,
                    "train_seconds": round(t_sec, 1), "final_loss": round(sum(t_losses[-20:]) / 20, 4),
                    "sampler": "28 Euler steps, CFG 2, whole clip", **scores(judge, split, x_teacher, labels),
                    "gen_fps_eager": median(teacher_fps), "gen_seconds_all_clips": round(teacher_gen_sec, 1)},
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
        "stream_fps_host": None,
        "stream_fps_host_note": ("the .pte chunk program is measured by the exported streaming chunk program's bench "
                                 "(being built separately); this bench runs eager torch only"),
        "distill": {"config": asdict(dcfg), "seconds": round(d_sec, 1), "metrics": manifest["metrics"]},
        "seconds": round(time.time() - started, 1),
    }
    rows = [
        ("model", "frame acc | temporal cons. | FD frames"),
        ("real val clips", f"{result['real_val_clips']['frame_label_accuracy']:.3f} | 1.000"),
        ("teacher (bidir, 28 st, cfg)", f"{result['teacher']['frame_label_accuracy']:.3f} | "
                                         f"{result['teacher']['temporal_consistency']:.3f} | {result['teacher']['fd_frames']}"),
    ]
    for key, label in (("28_step_cfg_whole_clip", "student before (28 st, cfg)"), ("4_step_stream", "student before (4 st, stream)")):
        s = result["student_before"][key]
        rows.append((label, f"{s['frame_label_accuracy']:.3f} | {s['temporal_consistency']:.3f} | {s['fd_frames']}"))
    s = result["student"]
    rows += [(f"student after 2-in-1 ({args.method})", f"{s['frame_label_accuracy']:.3f} | {s['temporal_consistency']:.3f} | {s['fd_frames']}"),
             ("teacher gap (MSE to ODE)", f"{manifest['metrics']['before']} -> {manifest['metrics']['after']}"),
             ("cache max abs err", f"{err:.2e} (forward), {gen_err:.2e} (generation)"),
             ("stream FPS eager (1 thr)", f"{result['stream_fps_eager']} gen, {result['stream_forward_fps_eager']} fwd; "
                                          f"teacher {result['teacher']['gen_fps_eager']}"),
             ("seconds", result["seconds"])]
    report(rows, result, args.out)


if __name__ == "__main__":
    main()
