"""Step distillation on digits: the 4-step student (K-DMD / adversarial) vs the 28-step teacher.

teacher = the max subnet extracted from a trained supernet; student = `--student` (default: the teacher
itself, the SnapGen++ setting of distilling a model into its own few-step version). Reports FD (judge features)
and label accuracy of: the teacher at 28 Euler steps with CFG, the undistilled student at 4 steps, and the
distilled student at 4 steps — all on the same labels and noise seed. Prints a table, writes
bench/results/distill.json.

    python -m bench.distill --checkpoint runs/bench_fidelity/supernet/checkpoint.pt --steps 100

Measured 2026-12-02 on this 2-core machine under load (supernet: default config, 1000 steps; 500 samples,
FD on judge features vs the validation split; real training images score 7.66):
- teacher 28 steps cfg 2: FD 32.90, label acc 1.000
- student = teacher arch, 4 steps: before 34.04 / 0.986; K-DMD (xi' = teacher) 24.98 / 1.000 (distill.json);
  K-DMD (trajectory xi') 35.72 / 0.994 (distill_trajectory.json); adversarial (trajectory xi') 26.03 / 0.988
  (distill_adversarial.json); 100 generator / 500 critic updates each
- student = mid arch (assa:0.75:3), 4 steps: before 135.99 / 0.620; K-DMD 60 updates 48.88 / 0.970 (distill_mid.json)
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from bench.common import machine, report
from ditnas.compress.distill import EVAL_SEED, distill_steps, sample_student
from ditnas.config import DataConfig, DistillConfig
from ditnas.data import load_split
from ditnas.judge import evaluate_samples, load_or_train_judge
from ditnas.search.threads import torch_threads
from ditnas.supernet.extract import extract_subnet, load_subnet
from ditnas.supernet.flow import euler_sample


def score(judge, split, x, labels) -> dict:
    s = evaluate_samples(judge, x, labels, split.val_x)
    return {"fd": round(s["fd"], 3), "label_accuracy": round(s["label_accuracy"], 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=Path("runs/bench_fidelity/supernet/checkpoint.pt"))
    p.add_argument("--student", default="max", help="arch of the student (default: the teacher's)")
    p.add_argument("--method", default="kdmd", choices=["kdmd", "adversarial"])
    p.add_argument("--steps", type=int, default=100, help="generator updates")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--critic-updates", type=int, default=5)
    p.add_argument("--cfg", type=float, default=2.0, help="teacher guidance (DMD real score and the 28-step reference)")
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--few-step-teacher", default="teacher", choices=["trajectory", "teacher"])
    p.add_argument("--work", type=Path, default=Path("runs/bench_distill"))
    p.add_argument("--out", type=Path, default=Path("bench/results/distill.json"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    started = time.time()
    with torch_threads(args.threads):
        extract_subnet(args.checkpoint, "max", args.work / "teacher")
        extract_subnet(args.checkpoint, args.student, args.work / "student")
        split = load_split(DataConfig())
        judge = load_or_train_judge(split, args.work / "judge", progress=False)
        teacher, student0 = load_subnet(args.work / "teacher"), load_subnet(args.work / "student")
        labels = torch.arange(args.samples) % split.num_classes
        shape = tuple(split.latent_shape)
        cfg = DistillConfig(method=args.method, steps=args.steps, batch_size=args.batch, critic_updates=args.critic_updates,
                            cfg_scale=args.cfg, checkpoint_every=max(1, args.steps // 4), eval_samples=0,
                            few_step_teacher=args.few_step_teacher)
        rows, result = [], {"machine": machine("torch"), "checkpoint": str(args.checkpoint), "teacher_arch": str(teacher.arch),
                            "student_arch": str(student0.arch), "config": asdict(cfg), "samples": args.samples}
        g = torch.Generator().manual_seed(EVAL_SEED)
        noise = torch.randn((args.samples, *shape), generator=g)
        t0 = time.time()
        x = euler_sample(teacher, labels, shape, steps=28, cfg_scale=args.cfg, null_label=split.num_classes,
                         generator=g, noise=noise)
        # the floor: real training images scored exactly as the samples are (same n, same val reference)
        idx = torch.randperm(split.train_x.shape[0], generator=torch.Generator().manual_seed(0))[: args.samples]
        result["real_fd_floor"] = score(judge, split, split.train_x[idx], split.train_y[idx])["fd"]
        result["teacher_28"] = {**score(judge, split, x, labels), "seconds": round(time.time() - t0, 2)}
        for name, model in (("student_4_before", student0),):
            x = sample_student(model, 4, cfg.shift, labels, shape, EVAL_SEED)
            result[name] = score(judge, split, x, labels)
        t0 = time.time()
        run_dir = args.work / f"out_{args.method}_{args.few_step_teacher}"
        manifest = distill_steps(cfg, args.work / "teacher", args.work / "student", run_dir)
        result["distill_seconds"] = round(time.time() - t0, 1)
        result["counts"] = {k: manifest["metrics"][k] for k in ("generator_updates", "critic_updates", "iterations")}
        result["final_losses"] = manifest["metrics"]["final"]
        result["few_step_teacher"] = manifest["metrics"]["few_step_teacher"]
        distilled = load_subnet(run_dir)
        x = sample_student(distilled, 4, cfg.shift, labels, shape, EVAL_SEED)
        result["student_4_after"] = score(judge, split, x, labels)
    result["seconds"] = round(time.time() - started, 1)
    for key, label in (("teacher_28", "teacher, 28 steps, cfg"), ("student_4_before", "student, 4 steps, before"),
                       ("student_4_after", f"student, 4 steps, after {args.method}")):
        rows.append((label, f"FD {result[key]['fd']:.2f}  label acc {result[key]['label_accuracy']:.3f}"))
    rows.append(("real train images (FD floor)", result["real_fd_floor"]))
    xi = result["few_step_teacher"]
    if xi["kind"] == "trajectory":
        rows.append(("xi' 4-step MSE to ODE", f"teacher {xi['teacher_k_step_mse']:.4f} -> xi' {xi['few_step_teacher_k_step_mse']:.4f}"))
    rows.append(("updates (gen / critic)", f"{result['counts']['generator_updates']} / {result['counts']['critic_updates']}"))
    rows.append(("distill seconds", result["distill_seconds"]))
    report(rows, result, args.out)


if __name__ == "__main__":
    main()
