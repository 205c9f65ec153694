"""SPRINT on ditnas: does token-dropped training reach the dense run's quality sooner, and is Path-Drop Guidance a
cheaper guidance than CFG at the same quality?

On the default config (`load_config(None, [])`: digits, the default space), pinned to ONE torch thread:

1. trains the space's max arch standalone (StandaloneTrainer) twice, same seed, data order and steps: dense, and
   with train.token_drop=0.75 (+ the full-token fine-tune share `--finetune`, + train.path_drop `--path-drop` so
   the model has a dense-only branch for PDG); every `--eval-every` steps the EMA weights' validation flow loss
   (fixed_eval_batch: 512 items, seed 1234, the search's protocol) against the training wall seconds so far
   (evaluation time excluded);
2. target = the dense run's final validation loss x 1.02 (assumption: "comparable quality" within 2%); the
   seconds each run needs to first reach it, and their ratio (`speedup`);
3. on the token-drop-trained EMA model, CFG vs PDG at the same steps and scale: label accuracy and FD (judge
   features, vs real training images) of the same `--samples` guided samples (same noise);
4. the eager per-step latency at 1 thread of one guided step: CFG = one batch-2 call (cond + null), PDG = the
   conditional batch-1 call + the dense-only batch-1 call (middle slots skipped); p50 with p10/p90.

    python -m bench.sprint --out bench/results/sprint.json [--steps 1000] [--eval-every 100]

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

import ditnas
from bench.common import machine, report
from ditnas.config import load_config
from ditnas.data import load_split
from ditnas.judge import evaluate_samples, load_or_train_judge, real_fd_floor
from ditnas.supernet.flow import EVAL_SEED, VAL_BATCH, eval_flow_loss, fixed_eval_batch
from ditnas.supernet.quality import generate
from ditnas.supernet.token_drop import dense_only_fn
from ditnas.supernet.train import StandaloneTrainer, build_space

TARGET_FACTOR = 1.02  # assumption: "comparable quality" = within 2% of the dense run's final validation loss


def train_curve(arch, overrides: list[str], split, eval_every: int) -> dict:
    """Train `arch` standalone under `overrides`; the EMA validation curve against training wall seconds and
    CPU seconds of this thread (1 torch thread: the CPU time is the compute, much less sensitive than wall time to
    other processes on a shared machine)."""
    cfg = load_config(None, overrides)
    trainer = StandaloneTrainer(arch, cfg, split)
    batch = fixed_eval_batch(split.val_x, split.val_y, VAL_BATCH, seed=EVAL_SEED, null_label=arch.num_classes)
    curve, step_seconds, wall, cpu = [], [], 0.0, 0.0

    def ema_model():
        model = copy.deepcopy(trainer.model)
        model.load_state_dict(trainer.ema.state_dict())
        return model.eval()

    for step in range(1, cfg.train.steps + 1):
        began, began_cpu = time.perf_counter(), time.thread_time()
        trainer.train_step()
        took = time.perf_counter() - began
        cpu += time.thread_time() - began_cpu
        step_seconds.append(round(took, 5))
        wall += took
        if step % eval_every == 0 or step == cfg.train.steps:
            curve.append({"step": step, "seconds": round(wall, 3), "cpu_seconds": round(cpu, 3),
                          "val_loss": round(eval_flow_loss(ema_model(), batch), 6)})
            print(f"  {' '.join(overrides[1:]) or 'dense'}: step {step} {wall:.1f}s val {curve[-1]['val_loss']:.5f}", flush=True)
    return {"curve": curve, "step_seconds": step_seconds, "model": ema_model(), "cfg": cfg}


def seconds_to(curve: list[dict], target: float, clock: str = "seconds") -> float | None:
    return next((p[clock] for p in curve if p["val_loss"] <= target), None)


def percentiles(ms: list[float]) -> dict[str, float]:
    q = statistics.quantiles(ms, n=10)
    return {"p50": round(statistics.median(ms), 4), "p10": round(q[0], 4), "p90": round(q[-1], 4), "n": len(ms)}


@torch.no_grad()
def guided_step_ms(model, dense: int, shape, null: int, iters: int) -> dict[str, dict[str, float]]:
    """Eager per-step latency (ms) of one guided step, batch 1: none, cfg (one batch-2 call), pdg (two calls)."""
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(1, *shape, generator=g), torch.full((1,), 0.5), torch.tensor([3])
    yn = torch.full_like(y, null)
    uncond = dense_only_fn(model, dense)
    calls = {
        "none": lambda: model(x, t, y),
        "cfg": lambda: model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, yn])),
        "pdg": lambda: (model(x, t, y), uncond(x, t, yn)),
    }
    times = {k: [] for k in calls}
    for _ in range(5):  # warm-up
        for call in calls.values():
            call()
    for _ in range(iters):  # interleaved, so drift in the machine's load hits every mode alike
        for name, call in calls.items():
            began = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - began) * 1e3)
    return {k: percentiles(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results/sprint.json"))
    ap.add_argument("--work", type=Path, default=Path("runs/bench_sprint"), help="judge cache")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--finetune", type=float, default=0.1, help="train.token_drop_finetune of the drop run")
    ap.add_argument("--path-drop", type=float, default=0.1, help="train.path_drop of the drop run (SPRINT: 0.1)")
    ap.add_argument("--scale", type=float, default=None, help="guidance scale w of CFG and PDG (default sample.cfg_scale)")
    ap.add_argument("--sample-steps", type=int, default=28)
    ap.add_argument("--samples", type=int, default=500, help="guided samples per guidance mode (label accuracy, FD)")
    ap.add_argument("--timing-iters", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)
    started = time.time()

    cfg = load_config(None, [])
    split = load_split(cfg.data)
    arch = build_space(cfg, split).max_arch()
    scale = cfg.sample.cfg_scale if args.scale is None else args.scale
    base = [f"train.steps={args.steps}"]
    drop_sets = base + ["train.token_drop=0.75", f"train.token_drop_finetune={args.finetune}",
                        f"train.path_drop={args.path_drop}"]
    dense = train_curve(arch, base, split, args.eval_every)
    drop = train_curve(arch, drop_sets, split, args.eval_every)
    target = dense["curve"][-1]["val_loss"] * TARGET_FACTOR
    t_dense, t_drop = seconds_to(dense["curve"], target), seconds_to(drop["curve"], target)
    speedup = round(t_dense / t_drop, 3) if t_dense and t_drop else None
    c_dense, c_drop = seconds_to(dense["curve"], target, "cpu_seconds"), seconds_to(drop["curve"], target, "cpu_seconds")
    speedup_cpu = round(c_dense / c_drop, 3) if c_dense and c_drop else None

    # ----- CFG vs PDG on the token-drop-trained model ---------------------------------------------------------
    model, dense_slots = drop["model"], drop["cfg"].train.token_drop_dense
    judge = load_or_train_judge(split, args.work / "judge")
    null = arch.num_classes
    labels = torch.arange(args.samples) % split.num_classes
    shape = tuple(split.train_x.shape[1:])
    reference = split.train_x[: max(args.samples, 2)]
    guidance = {}
    for mode in ("cfg", "pdg"):
        began = time.perf_counter()
        # the same seed: both modes start from the same noise
        samples = generate(model, labels, shape, steps=args.sample_steps, cfg_scale=scale, null_label=null, seed=0,
                           guidance=mode, uncond_fn=dense_only_fn(model, dense_slots))
        scores = evaluate_samples(judge, samples, labels, reference)
        guidance[mode] = {"label_accuracy": round(scores["label_accuracy"], 4), "fd": round(scores["fd"], 3),
                          "n": scores["n"], "seconds": round(time.perf_counter() - began, 1)}
    fd_floor = real_fd_floor(judge, split, args.samples)
    latency = guided_step_ms(model, dense_slots, shape, null, args.timing_iters)

    def median(xs):
        return round(statistics.median(xs), 5) if xs else None

    drop_until = round((1 - args.finetune) * args.steps)
    result = {
        "machine": machine("torch", threads=torch.get_num_threads(), ditnas=ditnas.__version__),
        "arch": str(arch), "steps": args.steps, "eval_every": args.eval_every,
        "overrides_dense": base, "overrides_drop": drop_sets,
        "target_val_loss": round(target, 6), "target_factor": TARGET_FACTOR,
        "seconds_to_target_dense": t_dense, "seconds_to_target_drop": t_drop, "speedup": speedup,
        "cpu_seconds_to_target_dense": c_dense, "cpu_seconds_to_target_drop": c_drop, "speedup_cpu": speedup_cpu,
        "final_val_loss_dense": dense["curve"][-1]["val_loss"], "final_val_loss_drop": drop["curve"][-1]["val_loss"],
        "curves": {"dense": dense["curve"], "drop": drop["curve"]},
        "step_seconds": {"dense": dense["step_seconds"], "drop": drop["step_seconds"]},
        "median_step_seconds": {"dense": median(dense["step_seconds"]),
                                "drop_phase": median(drop["step_seconds"][:drop_until]),
                                "drop_finetune_phase": median(drop["step_seconds"][drop_until:])},
        "guidance_scale": scale, "sample_steps": args.sample_steps, "guidance": guidance, "fd_floor": round(fd_floor, 3),
        "latency_ms_per_step_1thread_eager": latency,
        "pdg_over_cfg_latency": round(latency["pdg"]["p50"] / latency["cfg"]["p50"], 3),
        "seconds": round(time.time() - started, 1),
    }
    rows = [
        ("target val loss (dense final x 1.02)", f"{target:.5f}"),
        ("seconds to target: dense / drop", f"{t_dense} / {t_drop}"),
        ("speedup (wall)", speedup),
        ("CPU seconds to target: dense / drop", f"{c_dense} / {c_drop}"),
        ("speedup (CPU time)", speedup_cpu),
        ("final val loss: dense / drop", f"{result['final_val_loss_dense']:.5f} / {result['final_val_loss_drop']:.5f}"),
        ("median step s: dense / drop / drop fine-tune", " / ".join(str(v) for v in result["median_step_seconds"].values())),
        (f"CFG w={scale:g}: label acc / FD", f"{guidance['cfg']['label_accuracy']:.3f} / {guidance['cfg']['fd']:.2f}"),
        (f"PDG w={scale:g}: label acc / FD", f"{guidance['pdg']['label_accuracy']:.3f} / {guidance['pdg']['fd']:.2f}"),
        ("FD floor (real vs real)", f"{fd_floor:.2f}"),
        ("ms/step p50 (1 thread): none / cfg / pdg",
         " / ".join(f"{latency[k]['p50']:.3f}" for k in ("none", "cfg", "pdg"))),
    ]
    report(rows, result, args.out)


if __name__ == "__main__":
    main()
