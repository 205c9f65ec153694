"""`ditnas train` as a stage: train (or resume) the supernet with a progress bar, then write the
checkpoint, the config, a sample grid, per-step metrics and a manifest (`run.json`) into one folder."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

import ditnas
from ditnas.config import RunConfig, dump_config
from ditnas.console import progress_bar
from ditnas.errors import ConfigFieldError
from ditnas.io import atomic_write_text, write_error, write_json
from ditnas.supernet.distributed import env_ranks
from ditnas.supernet.flow import EVAL_SEED, VAL_BATCH, eval_flow_loss, fixed_eval_batch
from ditnas.supernet.quality import generate, save_grid, velocity_fn
from ditnas.supernet.train import CHECKPOINT_NAME, Trainer, train_supernet

def _ema_model(trainer: Trainer) -> torch.nn.Module:
    import copy

    model = copy.deepcopy(trainer.model)
    model.load_state_dict(trainer.ema.state_dict())
    return model.eval()


def val_losses(trainer: Trainer, model: torch.nn.Module) -> dict[str, float]:
    split = trainer.split
    batch = fixed_eval_batch(split.val_x, split.val_y, VAL_BATCH, seed=EVAL_SEED, null_label=trainer.null_label)
    space = trainer.space
    return {name: eval_flow_loss(velocity_fn(model, arch), batch) for name, arch in reference_archs(space).items()}


REFERENCE_NAMES = ("max", "narrowest", "min")


def reference_archs(space) -> dict:
    """The subnets every run reports on: the largest, the max layout at the smallest width, the smallest."""
    return {"max": space.max_arch(), "narrowest": space.narrowest_arch(), "min": space.min_arch()}


class MetricsLog:
    """`metrics.jsonl`, one line per step. A resumed run restarts at its checkpoint's step, so the first
    line it appends cuts the log back to the steps before it: lines a killed run wrote after its last
    checkpoint (and a torn last line) would otherwise be there twice and bend every curve drawn from it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._checked = False

    def append(self, record: dict) -> None:
        if not self._checked:
            self._cut_before(int(record["step"]))
            self._checked = True
        try:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise write_error(self.path, exc) from None

    def _cut_before(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if int(json.loads(line)["step"]) < step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by a kill mid-write
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))


def check_quality_settings(cfg: RunConfig) -> None:
    """The post-training quality check's settings, refused before training rather than after it."""
    if cfg.train.eval_samples < 2:
        raise ConfigFieldError("train.eval_samples", f"{cfg.train.eval_samples} must be >= 2 (FD needs samples)")
    unknown = sorted(set(cfg.train.quality_archs) - set(REFERENCE_NAMES))
    if unknown or not cfg.train.quality_archs:
        raise ConfigFieldError("train.quality_archs", f"{list(cfg.train.quality_archs)} must name one or more of "
                               f"{', '.join(REFERENCE_NAMES)}" + (f" ({', '.join(unknown)} is not one)" if unknown else ""))


def reference_quality(ema: torch.nn.Module, cfg: RunConfig, split, judge_dir: Path, *, progress: bool = True) -> dict:
    """Label accuracy and Fréchet distance (digits judge, trained once and cached in `judge_dir`) of the
    samples of each `train.quality_archs` subnet of the (EMA) supernet, at the sampler's steps and CFG."""
    from ditnas.judge import load_or_train_judge
    from ditnas.supernet.quality import evaluate_quality

    from ditnas.video_quality import judge_split

    # clips (moving digits): the still-image judge is trained on, and scores, single frames
    judge = load_or_train_judge(judge_split(split), judge_dir, seed=0, progress=progress)
    quality = {name: evaluate_quality(velocity_fn(ema, arch), judge, split, steps=cfg.sample.steps,
                                      cfg_scale=cfg.sample.cfg_scale, shift=cfg.sample.time_shift,
                                      n_fd=cfg.train.eval_samples, n_label=max(1, cfg.train.eval_samples // 2))
               for name, arch in reference_archs(ema.space).items() if name in cfg.train.quality_archs}
    return {"judge_val_accuracy": judge.val_accuracy, "quality": quality}


SAMPLES = "samples_max.png"


def max_net_grid(ema: torch.nn.Module, cfg: RunConfig, split, path: Path) -> Path:
    """8 samples per class of the (EMA) max net at the sampler's steps and CFG, as a PNG grid."""
    per_class = 8
    labels = torch.arange(max(split.num_classes, 1)).repeat_interleave(per_class)
    samples = generate(velocity_fn(ema), labels, tuple(split.train_x.shape[1:]), steps=cfg.sample.steps,
                       cfg_scale=cfg.sample.cfg_scale if split.num_classes else 1.0, null_label=ema.space.num_classes,
                       seed=0, shift=cfg.sample.time_shift)
    return save_grid(samples, path, nrow=per_class)


def train_run(cfg: RunConfig, out: Path, *, resume: bool = True, progress: bool = True, evaluate: bool = False,
              stop_after: int | None = None, samples: bool = True) -> dict:
    """`samples`: draw the max net's sample grid (`ditnas run` draws it in its background quality stage)."""
    if evaluate:
        check_quality_settings(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    main = env_ranks()[0] == 0  # under torchrun only rank 0 writes logs, samples and the manifest
    if main:
        dump_config(cfg, out / "config.yaml")
    metrics = MetricsLog(out / "metrics.jsonl")
    started = time.time()
    bar = progress_bar(progress and main)
    task = None
    window: list[float] = []

    def on_step(stats, trainer: Trainer) -> None:
        nonlocal task
        window.append(stats.seconds)
        del window[:-20]
        rate = len(window) / sum(window)
        bar.update(task, completed=trainer.step,
                   info=f"loss max {stats.loss_max:.4f} sub {stats.loss_subnets:.4f}  {rate:.1f} steps/s")
        if main:
            metrics.append({"step": stats.step, "loss_max": stats.loss_max, "loss_subnets": stats.loss_subnets,
                            "distill": stats.distill, "seconds": stats.seconds})

    with bar:
        task = bar.add_task("train", total=cfg.train.steps, phase="train", info="starting")
        trainer = train_supernet(cfg, out, resume=resume, stop_after=stop_after, on_step=on_step)
    trainer.group.close()
    if not main:
        return {"kind": "ditnas.supernet.rank", "rank": trainer.group.rank, "step": trainer.step}
    ema = _ema_model(trainer)
    split = trainer.split
    grid = max_net_grid(ema, cfg, split, out / SAMPLES) if samples else None
    manifest = {
        "kind": "ditnas.supernet",
        "checkpoint": CHECKPOINT_NAME,
        "step": trainer.step,
        "finished": trainer.step >= cfg.train.steps,
        "data": {"source": cfg.data.source, "fingerprint": split.fingerprint(), "train": int(split.train_x.shape[0]),
                 "val": int(split.val_x.shape[0])},
        "max_arch": str(trainer.space.max_arch()),
        "min_arch": str(trainer.space.min_arch()),
        "supernet_params": sum(p.numel() for p in trainer.model.parameters()),
        "val_flow_loss_ema": val_losses(trainer, ema),
        "samples": grid.name if grid is not None else None,
        "seconds_this_call": round(time.time() - started, 1),
        "device": {"type": trainer.device.type, "precision": cfg.train.precision, "ranks": trainer.group.world},
        "versions": {"ditnas": ditnas.__version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    if evaluate and split.num_classes:
        manifest.update(reference_quality(ema, cfg, split, out / "judge", progress=progress))
    write_json(out / "run.json", manifest)
    return manifest
