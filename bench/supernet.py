"""Benchmark: does one supernet serve its subnets as well as training each alone?

Trains the supernet with the default config (train.sampler: max + 2 random subnets per step since
2026-12-07, the sandwich rule before; in-place distillation), then trains the
max, mid and min archs standalone for the same number of steps each sees in the supernet, and compares
validation flow-matching loss (fixed noise), cost and sample label accuracy.

    python bench/supernet.py --out bench/results/supernet.json [--steps 2000] [--set train.lr=1e-3]

Prints a table and writes JSON with sandwich_step_ratio (the supernet's step ÷ a plain max step; named
for the sampler it was first measured with), subnet_gap_pct, cost_ratio, label_accuracy.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from common import machine

from ditnas.config import load_config
from ditnas.data import load_split
from ditnas.io import write_json
from ditnas.judge import load_or_train_judge
from ditnas.supernet.flow import EVAL_SEED, VAL_BATCH, eval_flow_loss, fixed_eval_batch
from ditnas.supernet.quality import evaluate_quality, velocity_fn
from ditnas.supernet.train import build_space, train_standalone, train_supernet


def interleaved_step_seconds(cfg, split, archs: dict, rounds: int = 5, burst: int = 10) -> dict[str, float]:
    """Median seconds per step of the supernet trainer and of each arch trained alone, measured in
    alternating bursts so that load from other processes hits every contender alike."""
    from ditnas.supernet.train import StandaloneTrainer, Trainer

    contenders = {"supernet": Trainer(cfg, Path("/nonexistent"), split)}
    contenders.update({name: StandaloneTrainer(arch, cfg, split) for name, arch in archs.items()})
    for trainer in contenders.values():  # warm-up: first steps allocate
        trainer.train_step()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, trainer in contenders.items():
            start = time.perf_counter()
            for _ in range(burst):
                trainer.train_step()
            times[name].append((time.perf_counter() - start) / burst)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--set", action="append", default=[], help="config override section.field=value")
    parser.add_argument("--work", type=Path, default=Path("runs/bench_supernet"), help="scratch folder")
    parser.add_argument("--n-label", type=int, default=500, help="samples for label accuracy")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for everything (1: on a shared 2-core machine 2 threads can be many times slower)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    overrides = list(args.set) + ([f"train.steps={args.steps}"] if args.steps else [])
    overrides += ["train.checkpoint_every=0"]
    cfg = load_config(args.config, overrides)
    split = load_split(cfg.data)
    space = build_space(cfg, split)
    steps = cfg.train.steps
    archs = {"max": space.max_arch(), "mid": space.mid_arch(), "min": space.min_arch()}
    batch = fixed_eval_batch(split.val_x, split.val_y, VAL_BATCH, seed=EVAL_SEED, null_label=space.num_classes)

    work = args.work
    if (work / "supernet" / "checkpoint.pt").exists():
        (work / "supernet" / "checkpoint.pt").unlink()  # a benchmark times a fresh run
    print(f"training the supernet for {steps} steps ({cfg.train.sampler}, k={cfg.train.num_random}) ...", flush=True)
    start = time.perf_counter()
    trainer = train_supernet(cfg, work / "supernet", split=split)
    supernet_seconds = time.perf_counter() - start
    ema_super = copy.deepcopy(trainer.model)
    ema_super.load_state_dict(trainer.ema.state_dict())
    ema_super.eval()

    standalone: dict[str, dict] = {}
    for name, arch in archs.items():
        print(f"training {name} standalone for {steps} steps ...", flush=True)
        start = time.perf_counter()
        model, ema = train_standalone(arch, cfg, split, steps)
        seconds = time.perf_counter() - start
        model.load_state_dict(ema.state_dict())
        model.eval()
        standalone[name] = {"seconds": seconds, "model": model}

    rows = {}
    for name, arch in archs.items():
        super_loss = eval_flow_loss(velocity_fn(ema_super, arch), batch)
        alone_loss = eval_flow_loss(velocity_fn(standalone[name]["model"]), batch)
        rows[name] = {"arch": arch.layout(), "supernet_val_loss": super_loss, "standalone_val_loss": alone_loss,
                      "gap_pct": 100.0 * (super_loss - alone_loss) / alone_loss,
                      "standalone_seconds": standalone[name]["seconds"]}

    judge = load_or_train_judge(split, work / "judge", seed=0)
    label_accuracy, fd = {}, {}
    for name in ("max", "min"):
        q = evaluate_quality(velocity_fn(ema_super, archs[name]), judge, split, steps=cfg.sample.steps,
                             cfg_scale=cfg.sample.cfg_scale, n_label=args.n_label, n_fd=1000)
        label_accuracy[name] = q["label_accuracy"]
        fd[name] = {"fd": q["fd"], "floor": q["fd_floor"]}

    print("timing steps in interleaved bursts ...", flush=True)
    step_seconds = interleaved_step_seconds(cfg, split, archs)
    result = {
        "benchmark": "supernet",
        "steps": steps,
        "sampler": cfg.train.sampler,
        "num_random": cfg.train.num_random,
        "sandwich_step_ratio": step_seconds["supernet"] / step_seconds["max"],
        "subnet_gap_pct": {k: v["gap_pct"] for k, v in rows.items()},
        "cost_ratio": step_seconds["supernet"] / sum(step_seconds[name] for name in archs),
        "step_seconds": step_seconds,
        "label_accuracy": label_accuracy,
        "fd": fd,
        "judge_val_accuracy": judge.val_accuracy,
        "supernet_seconds": supernet_seconds,
        "subnets": rows,
        "config": cfg.to_dict(),
        "machine": machine("torch", torch_threads=torch.get_num_threads()),
    }
    print()
    print(f"{'subnet':<6} {'supernet loss':>14} {'standalone loss':>16} {'gap %':>8}  arch")
    for name, row in rows.items():
        print(f"{name:<6} {row['supernet_val_loss']:>14.4f} {row['standalone_val_loss']:>16.4f} {row['gap_pct']:>8.2f}  {row['arch']}")
    print(f"sandwich step / plain step: {result['sandwich_step_ratio']:.2f}   cost ratio: {result['cost_ratio']:.2f}")
    print(f"label accuracy (CFG {cfg.sample.cfg_scale}, {cfg.sample.steps} steps): max {label_accuracy['max']:.3f}  "
          f"min {label_accuracy['min']:.3f}   judge {judge.val_accuracy:.3f}")
    print(f"FD (no CFG): max {fd['max']['fd']:.2f}  min {fd['min']['fd']:.2f}  floor {fd['max']['floor']:.2f}")
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
