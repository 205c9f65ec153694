"""`distill_steps`: the step-distillation stage (K-DMD or adversarial) — inputs, resume, logs, artifact.

Reads a teacher and a student sub-DiT (folders written by `ditnas extract`, or `subnet.pt` files), trains the
student as a `student_steps`-step generator and writes into `out`:

- `subnet.pt`      the distilled student in exactly the extract format (`load_subnet(out)` works, same arch);
- `critic.pt`      the resumable state (student, critic / discriminator heads, projector, optimizers, RNG,
                   iteration, update counts); a rerun with the same inputs continues from it;
- `few_step_teacher.pt` ξ' of Eq. 10 (trajectory KD of the teacher, see dmd.py), built once, reused on resume;
- `metrics.jsonl`  one line per iteration (critic loss, generator loss, grad norm, ...);
- `losses.png`     those curves;
- `manifest.json`  kind "ditnas.distill" (ditnas/manifest.py): inputs' hashes, config, final losses, update
                   counts, the sampler the student was trained for, FD / label accuracy of its samples.

The loop runs `steps * critic_updates` TTUR iterations (`steps` generator updates); `checkpoint_every` counts
generator updates.
"""

from __future__ import annotations

import dataclasses
from dataclasses import replace
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ditnas.arch import SearchSpace
from ditnas.compress.adversarial import Adversarial, AdversarialSettings, Discriminator, SubDiTTrunk
from ditnas.compress.dmd import (
    KDMD,
    FewStepGenerator,
    KDMDSettings,
    TrajectorySettings,
    few_step_error,
    train_trajectory_teacher,
    trajectory_pairs,
)
from ditnas.manifest import write_manifest
from ditnas.config import DataConfig, DistillConfig
from ditnas.data import DatasetSplit, load_split
from ditnas.errors import DitnasError
from ditnas.io import atomic_torch_save, atomic_write_bytes, file_sha256, torch_load
from ditnas.supernet.extract import SUBNET_NAME, load_subnet
from ditnas.supernet.run import MetricsLog

STATE_NAME = "critic.pt"
TEACHER_NAME = "few_step_teacher.pt"
STATE_FORMAT = "ditnas-distill-state"
STATE_VERSION = 1
KIND = "ditnas.distill"
# config fields a resumed run may change (the rest must match what critic.pt was trained with)
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "eval_samples")

Progress = Callable[[int, int, dict], None]  # (iterations done, total, last record)


@dataclasses.dataclass
class Net:
    """A loaded sub-DiT with what distillation needs to know about its file."""

    model: torch.nn.Module
    path: Path
    arch: str
    space: SearchSpace
    state: dict


def load_net(path: Path, role: str) -> Net:
    path = Path(path)
    file = path / SUBNET_NAME if path.is_dir() else path
    model = load_subnet(path)  # DitnasError naming the file when missing / damaged / not a subnet
    state = torch_load(file, what=f"{role} subnet file")
    space = SearchSpace.from_dict(state["space"], source=f"{file}: field 'space'")
    return Net(model, file, state["arch"], space, {"config": state["config"], "space": state["space"]})


def check_pair(teacher: Net, student: Net) -> None:
    """Teacher and student must denoise the same latents with the same labels."""
    for what, a, b in (("latent shape", teacher.space.latent, student.space.latent),
                       ("number of classes", teacher.space.num_classes, student.space.num_classes)):
        norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
        if norm(a) != norm(b):
            raise DitnasError(f"teacher {teacher.path} (arch {teacher.arch}) and student {student.path} (arch "
                              f"{student.arch}) differ in {what} ({a} vs {b}); distil between subnets of the same data")


def _state_config(cfg: DistillConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_CHANGES}


def _labels(num_classes: int) -> Callable[[int, torch.Generator], torch.Tensor]:
    # assumption: generator labels uniform over the real classes (never the null label)
    return lambda n, g: torch.randint(0, num_classes, (n,), generator=g)


def _real_sampler(split: DatasetSplit) -> Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
    def sample(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, split.train_x.shape[0], (n,), generator=g)
        y = split.train_y[idx] if split.train_y is not None else torch.zeros(n, dtype=torch.long)
        return split.train_x[idx], y
    return sample


def build_trainer(cfg: DistillConfig, teacher: Net, student: Net, rng: torch.Generator,
                  split: DatasetSplit | None, few_step_teacher: torch.nn.Module | None = None) -> KDMD | Adversarial:
    shape = tuple(student.space.latent)
    common = dict(student_steps=cfg.student_steps, lambda_out=cfg.lambda_out, lambda_feat=cfg.lambda_feat, lr=cfg.lr,
                  critic_lr=cfg.critic_lr, critic_updates=cfg.critic_updates, ttur_mode=cfg.ttur_mode, shift=cfg.shift,
                  batch_size=cfg.batch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # projector / head initialisation
        if cfg.method == "kdmd":
            settings = KDMDSettings(**common, cfg_scale=cfg.cfg_scale, critic_init=cfg.critic_init,
                                    null_label=student.space.num_classes)
            return KDMD(student.model, teacher.model, settings, shape=shape,
                        labels=_labels(max(student.space.num_classes, 1)), generator=rng,
                        few_step_teacher=few_step_teacher)
        if cfg.method == "adversarial":
            if split is None:
                raise DitnasError("compress.distill.method: adversarial needs real data; pass data_cfg")
            trunk = SubDiTTrunk(teacher.model, cfg.disc_blocks)
            disc = Discriminator(trunk, trunk.feature_dims, trunk.cond_dim).to(next(student.model.parameters()).device)
            return Adversarial(student.model, teacher.model, disc, AdversarialSettings(**common), shape=shape,
                               real=_real_sampler(split), generator=rng, few_step_teacher=few_step_teacher)
    raise DitnasError(f"compress.distill.method: {cfg.method!r} is not a step-distillation method here; "
                      "'kd' is compress.kd.distill_kd, choose kdmd or adversarial")


def _teacher_record(cfg: DistillConfig, teacher: Net) -> dict:
    return {"teacher_arch": teacher.arch, "teacher_sha256": file_sha256(teacher.path), "seed": cfg.seed, "student_steps": cfg.student_steps, "shift": cfg.shift,
            "cfg_scale": cfg.cfg_scale, "steps": cfg.teacher_kd_steps, "pairs": cfg.teacher_pairs,
            "substeps": cfg.teacher_substeps}


def few_step_teacher(cfg: DistillConfig, teacher: Net, out: Path) -> tuple[torch.nn.Module | None, dict]:
    """ξ' of Eq. 10: None (= the teacher) or the trajectory-KD copy, built once into `<out>/few_step_teacher.pt`
    and reused by a resumed run. Returns it with its report: the K-step error to the teacher's ODE end points
    on held-out noise, of the teacher's own K-step Euler sampler and of ξ'."""
    if cfg.few_step_teacher == "teacher" or not (cfg.lambda_out > 0 or cfg.lambda_feat > 0):
        return None, {"kind": "teacher"}
    import copy

    path, record = out / TEACHER_NAME, _teacher_record(cfg, teacher)
    if path.exists():
        saved = torch_load(path, what="few-step teacher file")
        if not isinstance(saved, dict) or saved.get("record") != record or "weights" not in saved:
            raise DitnasError(f"few-step teacher file {path} was built with other settings or is not one; delete it "
                              "or use another output folder")
        model = copy.deepcopy(teacher.model)
        model.load_state_dict(saved["weights"])
        return model.requires_grad_(False).eval(), saved["report"]
    times = FewStepGenerator(teacher.model, cfg.student_steps, cfg.shift).times
    s = TrajectorySettings(steps=cfg.teacher_kd_steps, pairs=cfg.teacher_pairs, substeps=cfg.teacher_substeps,
                           batch_size=cfg.batch_size, lr=cfg.lr, cfg_scale=cfg.cfg_scale,
                           null_label=teacher.space.num_classes)
    g = torch.Generator().manual_seed(cfg.seed + 1)  # assumption: its own stream, so ξ' does not shift the run's
    labels = _labels(max(teacher.space.num_classes, 1))
    shape = tuple(teacher.space.latent)
    pairs = trajectory_pairs(teacher.model, times, s, shape=shape, labels=labels, generator=g)
    held = trajectory_pairs(teacher.model, times, replace(s, pairs=max(16, s.pairs // 8)), shape=shape, labels=labels,
                            generator=g)
    before = few_step_error(teacher.model, times, held)
    model = train_trajectory_teacher(teacher.model, times, pairs, s, g)
    report = {"kind": "trajectory", "heldout_pairs": int(held["x0"].shape[0]),
              "teacher_k_step_mse": before, "few_step_teacher_k_step_mse": few_step_error(model, times, held)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(path, {"record": record, "report": report, "weights": model.state_dict()})
    return model, report


def _load_state(path: Path, cfg: DistillConfig, teacher: Net, student: Net) -> dict | None:
    if not path.exists():
        return None
    state = torch_load(path, what="distillation state")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        raise DitnasError(f"distillation state {path} is not a {STATE_FORMAT} v{STATE_VERSION} file; delete it or "
                          "choose another output folder")
    ours = {"config": _state_config(cfg), "teacher_arch": teacher.arch, "student_arch": student.arch,
            "teacher_sha256": file_sha256(teacher.path), "student_sha256": file_sha256(student.path)}
    for key, value in ours.items():
        if state.get(key) != value:
            raise DitnasError(f"distillation state {path} was written for a different {key.replace('_', ' ')} "
                              f"({state.get(key)} vs {value}); use its settings or another output folder")
    return state


def distill_steps(cfg: DistillConfig, teacher: Path, student: Path, out: Path, *, data_cfg: DataConfig | None = None,
                  progress: Progress | None = None, judge_cache: Path | None = None) -> dict:
    """Step-distil `student` against `teacher` into `out` (K-DMD or adversarial, by `cfg.method`); resumable.

    Returns the manifest. `judge_cache`: where the digits judge is cached (default `<out>/judge`).
    """
    cfg = cfg.check()
    out = Path(out)
    t_net, s_net = load_net(teacher, "teacher"), load_net(student, "student")
    check_pair(t_net, s_net)
    for role, net in (("teacher", t_net), ("student", s_net)):
        if out.resolve() == net.path.parent.resolve():
            raise DitnasError(f"output folder {out} is the {role}'s folder; choose a new folder (nothing was written)")
    split = None
    if cfg.method == "adversarial" or cfg.eval_samples > 0:
        split = load_split(data_cfg or DataConfig())
        if tuple(split.latent_shape) != tuple(s_net.space.latent):
            raise DitnasError(f"data {split.name} has sample shape {split.latent_shape} but student {s_net.path} "
                              f"denoises {tuple(s_net.space.latent)}; pass the data the subnets were trained on")
    state_path = out / STATE_NAME
    saved = _load_state(state_path, cfg, t_net, s_net)  # refuses a corrupt / foreign state before any write

    xi, xi_report = few_step_teacher(cfg, t_net, out)
    rng = torch.Generator().manual_seed(cfg.seed)
    trainer = build_trainer(cfg, t_net, s_net, rng, split, xi)
    start = 0
    if saved is not None:
        trainer.load_state_dict(saved["trainer"])
        rng.set_state(saved["rng"])
        start = int(saved["iteration"])
    total = trainer.ttur.iterations(cfg.steps)
    every = cfg.checkpoint_every * cfg.critic_updates

    out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(out / "metrics.jsonl")

    teacher_sha, student_sha = file_sha256(t_net.path), file_sha256(s_net.path)

    def save(iteration: int) -> None:
        atomic_torch_save(state_path, {
            "format": STATE_FORMAT, "version": STATE_VERSION, "method": cfg.method, "iteration": iteration,
            "config": _state_config(cfg), "teacher_arch": t_net.arch, "student_arch": s_net.arch,
            "teacher_sha256": teacher_sha, "student_sha256": student_sha,
            "trainer": trainer.state_dict(), "rng": rng.get_state(),
        })

    for i in range(start, total):
        record = trainer.iteration(i)
        record = {"step": i, **record, **{f"n_{k}": v for k, v in trainer.counts.items()}}
        metrics.append(record)
        if (i + 1) % every == 0 or i + 1 == total:
            save(i + 1)
        if progress is not None:
            progress(i + 1, total, record)
    if start >= total and not state_path.exists():
        save(total)

    student_model = trainer.student.eval()
    atomic_torch_save(out / SUBNET_NAME, {"arch": s_net.arch, **s_net.state, "weights": student_model.state_dict()})
    history = read_metrics(out / "metrics.jsonl")
    plot_losses(history, out / "losses.png", title=f"{cfg.method}: {s_net.arch}")
    result = {
        "method": cfg.method,
        "iterations": total,
        **trainer.counts,
        "critic_updates_per_generator_update": cfg.critic_updates,
        "ttur_mode": cfg.ttur_mode,
        "final": final_losses(history),
        "few_step_teacher": xi_report,
    }
    # flat copies of the headline numbers (what `ditnas distill` prints)
    result.update({k: v for k, v in result["final"].items() if k in ("loss_critic", "loss_generator")})
    if cfg.eval_samples > 0 and split is not None and split.num_classes >= 2:
        result["eval"] = evaluate_student(student_model, cfg, split, judge_cache or out / "judge")
        result.update(fd=result["eval"]["fd"], label_accuracy=result["eval"]["label_accuracy"])
    return write_manifest(
        out, KIND, inputs={"teacher": t_net.path, "student": s_net.path}, config=cfg, metrics=result,
        files=[SUBNET_NAME, STATE_NAME, "metrics.jsonl", "losses.png"] + ([TEACHER_NAME] if xi is not None else []),
        extra={"arch": s_net.arch, "teacher_arch": t_net.arch,
               # what a sampler of this student must run (it was trained on exactly these timesteps)
               "sampler": {"steps": cfg.student_steps, "shift": cfg.shift, "cfg_scale": 1.0,
                           "times": FewStepGenerator(student_model, cfg.student_steps, cfg.shift).times.tolist()}},
    )


# ----------------------------------------------------------------------------------------------
# logs, plot, evaluation
# ----------------------------------------------------------------------------------------------
def read_metrics(path: Path) -> list[dict]:
    rows = []
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def final_losses(history: list[dict], window: int = 20) -> dict[str, float]:
    """Mean of the last `window` logged values of each loss (the critic oscillates; one value says little)."""
    out = {}
    for key in ("loss_critic", "loss_generator", "loss_dmd", "loss_adv", "loss_out", "loss_feat", "grad_norm"):
        values = [r[key] for r in history if key in r][-window:]
        if values:
            out[key] = sum(values) / len(values)
    return out


def plot_losses(history: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("loss_critic", "critic loss"), ("loss_generator", "generator loss"), ("grad_norm", "generator grad norm")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, (key, label) in zip(axes, keys):
        pts = [(r["step"], r[key]) for r in history if key in r]
        if pts:
            ax.plot(*zip(*pts), lw=0.8)
        ax.set_title(label)
        ax.set_xlabel("iteration")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


@torch.no_grad()
def sample_student(model: torch.nn.Module, steps: int, shift: float, labels: torch.Tensor, shape: tuple, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    noise = torch.randn((labels.shape[0], *shape), generator=g).to(device)
    return FewStepGenerator(model, steps, shift).sample(noise, labels.to(device))


EVAL_SEED = 4321  # assumption: one fixed noise seed for every distilled student's samples


def evaluate_student(model: torch.nn.Module, cfg: DistillConfig, split: DatasetSplit, judge_cache: Path) -> dict:
    from ditnas.judge import evaluate_samples, load_or_train_judge

    from ditnas.video_quality import frames_of, judge_split

    frames_split = judge_split(split)  # clips (T > 1): the judge scores every frame, as the quality stage does
    judge = load_or_train_judge(frames_split, judge_cache, progress=False)
    labels = torch.arange(cfg.eval_samples) % split.num_classes
    x = sample_student(model, cfg.student_steps, cfg.shift, labels, tuple(split.latent_shape), EVAL_SEED).cpu()
    frames = int(split.latent_shape[1])
    if frames > 1:  # each frame carries its clip's label (video_quality.judge_split)
        x, labels = frames_of(x)[:, :, None], labels.repeat_interleave(frames)
    scores = evaluate_samples(judge, x, labels, frames_split.val_x)
    return {"steps": cfg.student_steps, "n": cfg.eval_samples, "fd": scores["fd"], "label_accuracy": scores["label_accuracy"]}
