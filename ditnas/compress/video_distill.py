"""2-in-1 video distillation (S2DiT §1.5 [I]): a bidirectional teacher -> a 4-step frame-causal streaming student.

S2DiT's "2-in-1 distillation" is only named in public sources (method.md §1.5, [NF] for its losses); we read
it as two stages, after S2DiT-KD / S2DiT-AR and the recipes they cite (CausVid, Self-Forcing):

(a) **KD into a causal student** (`kd_steps`): the teacher sees the whole clip bidirectionally, the student the
    same x_t frame-causally; L = L_flow + lambda_out ||v_T - v_S||^2 (+ lambda_feat feature KD) -- compress/kd.py's
    `KDTrainer` as it is (it works on clips unchanged).
(b) **step + streaming distillation** (`steps`): the student is run as a 4-step generator that produces the clip
    *chunk by chunk* with the `Streamer` (supernet/streaming.py): each chunk starts from noise, takes 4 Euler
    steps conditioned on the cache of the student's OWN earlier clean chunks, and is then committed (the cache of
    the clean chunk at t = 0). This autoregressive rollout during training is Self-Forcing's (Huang et al. 2025):
    the student is trained on exactly the contexts it will see when streaming, not on real frames.
    # assumption: gradients flow through the last denoising step of each chunk only (Self-Forcing's trick; the
    # earlier steps and the committed caches are detached), so memory does not grow with steps x chunks.
    The loss on the rolled-out clip x̂ (method):
    - "dmd": DMD2's distribution-matching gradient (compress/dmd.py `dmd_grad`): real score = the bidirectional
      teacher with CFG on the whole clip, fake score = a critic trained by flow matching on the student's
      rollouts (TTUR: `critic_updates` critic updates per generator update, DMD2's convention);
    - "regression": MSE to the teacher's ODE solution (CFG, `teacher_substeps` Euler steps per student interval)
      of the same noise (CausVid's ODE-initialisation loss, here on the student's own rollout).
    # assumption: "regression" by default -- with a pool of pre-solved pairs it is the cheaper, lower-variance loss
    # for a minutes-long run on 2 cores (no critic, no TTUR); "dmd" is the paper-family (Self-Forcing) loss and is
    # selectable; bench/video.py has measured only "regression" so far.

`rollout` is the one generation routine: training (with grad on each chunk's last step), evaluation and the
bench all stream through it. `generate_recomputed` is its brute-force twin without a kept cache: for every chunk
it recomputes the causal context from the whole clean prefix (method.md §7.7 item 26: "cached incremental
generation equals full causal recomputation").

Entry: `distill_video(cfg, teacher, student, split, out, progress)`; resumable from `<out>/video_checkpoint.pt`
(resumed == uninterrupted), writes `student.pt`, `metrics.jsonl` and `manifest.json` (kind "ditnas.video_distill");
a student given as a subnet folder is also written as `<out>/subnet.pt` in the extract format (`load_subnet(out)`),
which is how `ditnas run`'s distill stage (compress.distill.method: video_2in1, `video_config`) hands it to export.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ditnas.config import DistillConfig, KDConfig, TrainConfig
from ditnas.data import DatasetSplit
from ditnas.errors import ConfigFieldError, DitnasError
from ditnas.io import atomic_torch_save, atomic_write_text, torch_load
from ditnas.supernet.flow import time_grid
from ditnas.supernet.model import ChunkStep, SubDiT
from ditnas.supernet.streaming import StreamCache, Streamer, check_streamable
from ditnas.video_data import check_chunking

CHECKPOINT = "video_checkpoint.pt"
STUDENT_NAME = "student.pt"
SUBNET_NAME = "subnet.pt"  # = supernet/extract.py's: the student in the extract format (load_subnet)
METRICS = "metrics.jsonl"
KIND = "ditnas.video_distill"
METHODS = ("regression", "dmd")


@dataclass(frozen=True)
class VideoDistillConfig:
    """Both stages of the 2-in-1 distillation. Kept here, not in config.py: no CLI verb reads it yet."""

    kd_steps: int = 200  # stage (a) steps; 0 = the student is already a KD-trained causal model
    kd_lr: float = 5e-4  # as compress.kd.lr (assumption: half the supernet's rate)
    lambda_out: float = 1.0  # SnapGen++ Eq. 8 weights are [NF]; 1 assumed
    lambda_feat: float = 0.0  # assumption: output KD only (the brief's (a)); >0 adds kd.py's final-feature term
    steps: int = 200  # stage (b) generator updates
    method: str = "regression"  # regression | dmd (module doc)
    student_steps: int = 4  # S2DiT-AR: 4 steps [S2]
    chunk: int = 1  # latent frames per streamed chunk (assumption: 1 = frame-by-frame streaming)
    batch_size: int = 16
    lr: float = 1e-4  # SnapGen++ supp. H: Adam lr 1e-4, betas (0, 0.99) for the step-distilled student
    critic_lr: float = 2e-4  # as compress.distill.critic_lr
    critic_updates: int = 5  # DMD2: 5 critic updates per generator update
    cfg_scale: float = 2.0  # teacher guidance (real score / ODE solution), as compress.distill.cfg_scale
    shift: float = 3.0  # SnapGen++ supp. H: time shift 3 (student grid and re-noising tau)
    teacher_substeps: int = 7  # assumption: 7 teacher Euler steps per student interval (28 in all)
    # regression: 0 = solve the teacher's ODE for every batch's fresh noise; N = a fixed pool of N (noise, solution)
    # pairs solved once and drawn from (DMD's regression set; assumption: the same loss at a fraction of the cost)
    regression_pairs: int = 0
    class_dropout: float = 0.1  # stage (a): CFG label dropout, as train.class_dropout
    grad_clip: float = 10.0  # DMD2 SDXL: grad-norm clip 10
    eval_clips: int = 32  # fixed-noise clips the teacher gap is measured on (before / after)
    checkpoint_every: int = 50  # in steps of either stage
    seed: int = 0

    def check(self) -> VideoDistillConfig:
        if self.method not in METHODS:
            raise ConfigFieldError("video_distill.method", f"unknown {self.method!r}; choose one of {', '.join(METHODS)}")
        for name in ("kd_steps", "steps", "regression_pairs"):
            if getattr(self, name) < 0:
                raise ConfigFieldError(f"video_distill.{name}", f"{getattr(self, name)} must be >= 0")
        for name in ("student_steps", "chunk", "batch_size", "critic_updates", "teacher_substeps", "eval_clips",
                     "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigFieldError(f"video_distill.{name}", f"{getattr(self, name)} must be >= 1")
        for name in ("kd_lr", "lr", "critic_lr", "shift"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ConfigFieldError(f"video_distill.{name}", f"{getattr(self, name):g} must be > 0")
        for name in ("lambda_out", "lambda_feat", "cfg_scale", "grad_clip", "class_dropout"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ConfigFieldError(f"video_distill.{name}", f"{getattr(self, name):g} must be a finite number >= 0")
        return self


def video_config(cfg: DistillConfig) -> VideoDistillConfig:
    """compress.distill (method video_2in1) as the VideoDistillConfig `distill_video` runs: the shared fields
    as they are, the video ones under their compress.distill names (kd_lambda_out -> lambda_out, stream_loss ->
    method, gap_clips -> eval_clips). compress.distill.lambda_out / lambda_feat are K-DMD's few-step-teacher
    weights (SnapGen++ Eq. 10), another loss: they do not map."""
    return VideoDistillConfig(
        kd_steps=cfg.kd_steps, kd_lr=cfg.kd_lr, lambda_out=cfg.kd_lambda_out, lambda_feat=cfg.kd_lambda_feat,
        steps=cfg.steps, method=cfg.stream_loss, student_steps=cfg.student_steps, chunk=cfg.chunk,
        batch_size=cfg.batch_size, lr=cfg.lr, critic_lr=cfg.critic_lr, critic_updates=cfg.critic_updates,
        cfg_scale=cfg.cfg_scale, shift=cfg.shift, teacher_substeps=cfg.teacher_substeps,
        regression_pairs=cfg.regression_pairs, class_dropout=cfg.class_dropout, grad_clip=cfg.grad_clip,
        eval_clips=cfg.gap_clips, checkpoint_every=cfg.checkpoint_every, seed=cfg.seed)


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------
def check_models(teacher: SubDiT, student: SubDiT, split: DatasetSplit | None, chunk: int) -> None:
    """The pair must denoise the same clips; the student must be causal; the chunk must divide the clip."""
    check_streamable(student, "student")
    if tuple(teacher.arch.latent) != tuple(student.arch.latent):
        raise DitnasError(f"the teacher's latent shape {tuple(teacher.arch.latent)} differs from the student's "
                          f"{tuple(student.arch.latent)} (C, T, H, W); distil between models of the same clips")
    for name in ("num_classes", "patch_size"):
        if getattr(teacher.arch, name) != getattr(student.arch, name):
            raise DitnasError(f"teacher and student differ in {name} ({getattr(teacher.arch, name)} vs "
                              f"{getattr(student.arch, name)}); distil between models of the same data")
    if split is not None and (tuple(split.latent_shape) != tuple(student.arch.latent)
                              or split.num_classes != student.arch.num_classes):
        raise DitnasError(f"data {split.name} has clips {split.latent_shape} and {split.num_classes} classes but the "
                          f"student was built for {tuple(student.arch.latent)} and {student.arch.num_classes}; "
                          "pass the data the models were trained on")
    check_chunking(student.arch.latent[1], chunk)


# ----------------------------------------------------------------------------------------------
# the autoregressive rollout
# ----------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """A streamed generation: the clip (B, C, T, H, W; with grad through each chunk's last step when asked)
    and the cache each chunk was generated against (caches[k] holds chunks < k)."""

    clip: Tensor
    caches: list[StreamCache]


def _full(t: float, like: Tensor) -> Tensor:
    return torch.full((like.shape[0],), float(t), device=like.device)


def rollout(streamer: Streamer, noise: Tensor, y: Tensor, times: Tensor, *, grad: bool = False,
            edit: Callable[[int, Tensor], Tensor] | None = None) -> Rollout:
    """Generate a clip chunk by chunk from `noise` (B, C, T, H, W): per chunk, Euler steps on `times` (1 -> 0)
    against the committed cache of the earlier chunks, then commit the chunk's clean output (t = 0).

    `grad`: keep the graph of each chunk's LAST step only (Self-Forcing). `edit(k, chunk)` may replace chunk
    k's clean output before it is emitted and committed (tests: the rollout conditions on its own outputs)."""
    chunk, frames = streamer.chunk, noise.shape[2]
    check_chunking(frames, chunk)
    cache = streamer.new_cache(noise.shape[0])
    outs, caches = [], []
    last = len(times) - 2
    for start in range(0, frames, chunk):
        caches.append(cache)
        x = noise[:, :, start:start + chunk]
        for i in range(last + 1):
            t, t_next = float(times[i]), float(times[i + 1])
            with torch.set_grad_enabled(grad and i == last):
                v, _ = streamer.step(x, _full(t, x), y, cache)
                x = x + (t_next - t) * v  # the last step lands on t = 0: x = x_t - t v, the x0-prediction
        if edit is not None:
            x = edit(len(outs), x)
        outs.append(x)
        with torch.no_grad():
            cache = streamer.commit(x.detach(), y, cache)
    return Rollout(torch.cat(outs, dim=2), caches)


@torch.no_grad()
def generate_recomputed(student: SubDiT, noise: Tensor, y: Tensor, times: Tensor, chunk: int) -> Tensor:
    """`rollout` without a kept cache: for every chunk, the causal context is recomputed from the whole clean
    prefix in one pass (forward_chunk from frame 0, t = 0). The brute-force reference of the streamed cache."""
    frames = noise.shape[2]
    check_chunking(frames, chunk)
    empty = [None if isinstance(b, torch.nn.Identity) else {} for b in student.blocks]  # skips hold no cache
    outs: list[Tensor] = []
    for start in range(0, frames, chunk):
        past = empty
        if outs:  # the whole clean prefix in one causal pass from frame 0
            prefix = ChunkStep(t0=0, past=list(empty))
            student.forward_chunk(torch.cat(outs, dim=2), _full(0.0, noise), y, prefix)
            past = prefix.new
        x = noise[:, :, start:start + chunk]
        for i in range(len(times) - 1):
            t, t_next = float(times[i]), float(times[i + 1])
            x = x + (t_next - t) * student.forward_chunk(x, _full(t, x), y, ChunkStep(t0=start, past=list(past)))
        outs.append(x)
    return torch.cat(outs, dim=2)


@torch.no_grad()
def teacher_solution(teacher: SubDiT, noise: Tensor, y: Tensor, times: Tensor, substeps: int, cfg_scale: float,
                     null_label: int) -> Tensor:
    """The teacher's whole-clip (bidirectional) Euler ODE solution from `noise`, with CFG (compress/dmd.py)."""
    from ditnas.compress.dmd import ode_trajectory

    return ode_trajectory(teacher, noise, y, times, substeps=substeps, cfg_scale=cfg_scale, null_label=null_label)[1]


# ----------------------------------------------------------------------------------------------
# stage (b): step + streaming distillation
# ----------------------------------------------------------------------------------------------
def _adam(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, betas=(0.0, 0.99))  # SnapGen++ supp. H (K-DMD)


class StreamingDistiller:
    """The 4-step causal student trained on its own autoregressive rollouts (module doc, stage (b)).

    `step()` = one generator update (and, for dmd, the TTUR iterations around it); `state_dict()` resumes it
    exactly. The teacher is frozen; the critic (dmd) starts as a copy of the teacher.
    # assumption: critic from the teacher (DMD2 / Self-Forcing initialise the fake score from the real one); it
    # scores whole clips bidirectionally, like the real score it is compared with."""

    def __init__(self, student: SubDiT, teacher: SubDiT, cfg: VideoDistillConfig, num_classes: int) -> None:
        from ditnas.compress.dmd import TTUR

        self.cfg, self.student, self.teacher = cfg, student, teacher.eval().requires_grad_(False)
        self.device = next(student.parameters()).device
        self.streamer = Streamer(student, cfg.chunk)
        self.times = time_grid(cfg.student_steps, cfg.shift)
        self.null, self.num_classes = student.arch.num_classes, num_classes
        self.shape = tuple(student.arch.latent)
        self.rng = torch.Generator().manual_seed(cfg.seed + 11)
        self.opt_g = _adam(student.parameters(), cfg.lr)
        self.critic = None
        if cfg.method == "dmd":
            self.critic = copy.deepcopy(teacher).requires_grad_(True).train()
            self.opt_c = _adam(self.critic.parameters(), cfg.critic_lr)
        self.ttur = TTUR(cfg.critic_updates if cfg.method == "dmd" else 1, "dmd2")
        self.pool: tuple[Tensor, Tensor, Tensor] | None = None
        if cfg.method == "regression" and cfg.regression_pairs:
            self.pool = self._solve_pool(cfg.regression_pairs)
        self.iterations = 0
        self.updates = 0

    def _solve_pool(self, pairs: int, chunk: int = 64) -> tuple[Tensor, Tensor, Tensor]:
        """(noise, labels, teacher solutions) of `pairs` fixed noises, from their own seed (the same on resume)."""
        g = torch.Generator().manual_seed(self.cfg.seed + 21)
        noise = torch.randn((pairs, *self.shape), generator=g).to(self.device)
        y = torch.randint(0, max(self.num_classes, 1), (pairs,), generator=g).to(self.device)
        if not self.num_classes:
            y = torch.full_like(y, self.null)
        sols = [teacher_solution(self.teacher, noise[i:i + chunk], y[i:i + chunk], self.times, self.cfg.teacher_substeps,
                                 self.cfg.cfg_scale, self.null) for i in range(0, pairs, chunk)]
        return noise, y, torch.cat(sols)

    def _batch(self) -> tuple[Tensor, Tensor]:
        n = self.cfg.batch_size
        if self.pool is not None:
            self._index = torch.randint(0, self.pool[0].shape[0], (n,), generator=self.rng).to(self.device)
            return self.pool[0][self._index], self.pool[1][self._index]
        y = torch.randint(0, max(self.num_classes, 1), (n,), generator=self.rng) if self.num_classes else \
            torch.full((n,), self.null, dtype=torch.long)
        return torch.randn((n, *self.shape), generator=self.rng).to(self.device), y.to(self.device)

    def _iteration(self) -> dict[str, float]:
        from ditnas.compress.dmd import critic_loss, dmd_grad, dmd_loss, sample_tau

        cfg, i = self.cfg, self.iterations
        gen = self.ttur.generator_step(i)
        noise, y = self._batch()
        self.student.train(gen)
        out = rollout(self.streamer, noise, y, self.times, grad=gen).clip
        record: dict[str, float] = {}
        if gen:
            if cfg.method == "regression":
                target = self.pool[2][self._index] if self.pool is not None else teacher_solution(
                    self.teacher, noise, y, self.times, cfg.teacher_substeps, cfg.cfg_scale, self.null)
                loss = (out - target).pow(2).mean()
                record["loss_regression"] = float(loss.detach())
            else:
                tau = sample_tau(noise.shape[0], self.rng, cfg.shift, self.device)
                eps = torch.randn(noise.shape, generator=self.rng).to(self.device)
                grad, info = dmd_grad(out, tau, eps, y, self.teacher, self.critic, cfg_scale=cfg.cfg_scale,
                                      null_label=self.null)
                loss = dmd_loss(out, grad)
                record.update(loss_dmd=float(loss.detach()), dmd_grad_abs=float(grad.abs().mean()), **info)
            self.opt_g.zero_grad(set_to_none=True)
            loss.backward()
            record["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.grad_clip))
            self.opt_g.step()
            self.opt_g.zero_grad(set_to_none=True)
            self.updates += 1
        if self.critic is not None and self.ttur.critic_step(i):
            loss_c = critic_loss(self.critic, out.detach(), y, self.rng, cfg.shift)
            self.opt_c.zero_grad(set_to_none=True)
            loss_c.backward()
            torch.nn.utils.clip_grad_norm_(self.critic.parameters(), cfg.grad_clip)
            self.opt_c.step()
            self.opt_c.zero_grad(set_to_none=True)
            record["loss_critic"] = float(loss_c.detach())
        self.iterations += 1
        return record

    def step(self) -> dict[str, float]:
        """Iterations up to and including the next generator update (TTUR); the merged record."""
        record: dict[str, float] = {}
        target = self.updates + 1
        while self.updates < target:
            record.update(self._iteration())
        self.student.eval()
        return record

    def state_dict(self) -> dict[str, Any]:
        return {"student": self.student.state_dict(), "opt_g": self.opt_g.state_dict(), "rng": self.rng.get_state(),
                "iterations": self.iterations, "updates": self.updates,
                "critic": self.critic.state_dict() if self.critic is not None else {},
                "opt_c": self.opt_c.state_dict() if self.critic is not None else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.rng.set_state(state["rng"])
        self.iterations, self.updates = int(state["iterations"]), int(state["updates"])
        if self.critic is not None:
            self.critic.load_state_dict(state["critic"])
            self.opt_c.load_state_dict(state["opt_c"])


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalSet:
    noise: Tensor
    y: Tensor
    target: Tensor  # the teacher's ODE solution of the same noise


def eval_set(teacher: SubDiT, cfg: VideoDistillConfig, num_classes: int, times: Tensor) -> EvalSet:
    """Fixed noise and labels (seeded apart from training) and the teacher's solutions of them."""
    g = torch.Generator().manual_seed(cfg.seed + 1234)
    device = next(teacher.parameters()).device
    shape = tuple(teacher.arch.latent)
    y = (torch.arange(cfg.eval_clips) % max(num_classes, 1)) if num_classes else \
        torch.full((cfg.eval_clips,), teacher.arch.num_classes, dtype=torch.long)
    noise = torch.randn((cfg.eval_clips, *shape), generator=g).to(device)
    y = y.to(device)
    target = teacher_solution(teacher, noise, y, times, cfg.teacher_substeps, cfg.cfg_scale, teacher.arch.num_classes)
    return EvalSet(noise, y, target)


@torch.no_grad()
def teacher_gap(student: SubDiT, evals: EvalSet, chunk: int, times: Tensor) -> float:
    """MSE between the student's streamed few-step generation and the teacher's ODE solution of the same noise."""
    was = student.training
    student.eval()
    out = rollout(Streamer(student, chunk), evals.noise, evals.y, times).clip
    student.train(was)
    return float((out - evals.target).pow(2).mean())


def evaluate_clips(student: SubDiT, split: DatasetSplit, judge_cache: Path, *, n: int, chunk: int, steps: int,
                   shift: float, batch: int = 64) -> dict[str, Any]:
    """The student's frame label accuracy / FD with the digits judge (the quality stage's, `judge_cache`), as
    compress.distill's `evaluate_student` scores a kdmd student: `n` clips of labels 0, 1, .. from the same
    noise (EVAL_SEED), every frame judged with its clip's label against the validation clips' frames.

    "eval": the streamed `steps`-step sampler the student was trained for (`rollout`, `chunk` frames at a
    time); "eval_whole_clip": the whole-clip `steps`-step Euler sampler (what the exported host-loop .pte
    runs, and what kdmd's figure measures) -- a different sampler for a causal model (docs/video.md §2)."""
    from ditnas.compress.distill import EVAL_SEED, sample_student
    from ditnas.judge import evaluate_samples, load_or_train_judge
    from ditnas.video_quality import frames_of, judge_split

    frames_split = judge_split(split)
    judge = load_or_train_judge(frames_split, judge_cache, progress=False)  # trains (with grad) if not cached
    labels = torch.arange(n) % split.num_classes
    shape, frames = tuple(split.latent_shape), int(split.latent_shape[1])
    device = next(student.parameters()).device
    # the noise sample_student draws (the same seed and shape): both samplers start from the same clips' noise
    noise = torch.randn((n, *shape), generator=torch.Generator().manual_seed(EVAL_SEED)).to(device)
    times, streamer = time_grid(steps, shift), Streamer(student.eval(), chunk)
    with torch.no_grad():
        streamed = torch.cat([rollout(streamer, noise[i:i + batch], labels[i:i + batch].to(device), times).clip.cpu()
                              for i in range(0, n, batch)])
    whole = sample_student(student, steps, shift, labels, shape, EVAL_SEED).cpu()  # no_grad inside

    def judged(clips: Tensor, sampler: str) -> dict[str, Any]:
        scores = evaluate_samples(judge, frames_of(clips)[:, :, None], labels.repeat_interleave(frames),
                                  frames_split.val_x)
        return {"steps": steps, "n": n, "fd": scores["fd"], "label_accuracy": scores["label_accuracy"],
                "sampler": sampler}

    return {"eval": judged(streamed, f"streamed, chunk {chunk}"), "eval_whole_clip": judged(whole, "whole clip")}


# ----------------------------------------------------------------------------------------------
# entry
# ----------------------------------------------------------------------------------------------
def _digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, value in model.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _load(model: SubDiT | Path | str, what: str) -> tuple[SubDiT, Path | None, dict | None]:
    """The model, its path and its subnet file's record (arch, config, space[, prune]; None for a module)."""
    if isinstance(model, SubDiT):
        return model, None, None
    if isinstance(model, (str, Path)):
        from ditnas.compress.kd import read_subnet_record
        from ditnas.supernet.extract import load_subnet

        record = {k: v for k, v in read_subnet_record(Path(model)).items() if k != "weights"}
        return load_subnet(Path(model)), Path(model), record
    raise DitnasError(f"the {what} must be an extracted sub-DiT or the folder `ditnas extract` wrote, "
                      f"got {type(model).__name__}")


def distill_video(
    cfg: VideoDistillConfig,
    teacher: SubDiT | Path | str,
    student: SubDiT | Path | str,
    split: DatasetSplit,
    out: Path,
    progress: Callable[[int, int, dict], None] | None = None,
    *,
    stop_after: int | None = None,
    make_causal: bool = False,
    eval_samples: int = 0,
    judge_cache: Path | None = None,
) -> dict:
    """Run stages (a) and (b) into folder `out`; returns the manifest (or {"complete": False} when stopped).

    The student (a module is trained in place; a path is loaded) must be frame-causal -- or, with `make_causal`,
    is switched to frame-causal first (a bidirectional student, S2DiT's starting point; stage (a) then teaches
    it to predict without the future frames). The teacher (usually bidirectional) is frozen.
    `progress(step, total, record)` is called after every step of either stage
    (`record["phase"]` = "kd" | "stream"). A checkpoint every `cfg.checkpoint_every` steps makes a rerun into the
    same `out` continue where it stopped; `stop_after` ends this call after that many steps (tests).

    A student given as a path (a subnet folder or file) is also written as `<out>/subnet.pt` in the extract
    format with its record (pruned or not) and `model.causal: true`, so `load_subnet(out)` rebuilds the causal
    student. `eval_samples > 0` (labelled data): the manifest's metrics get `evaluate_clips` (the judge cached
    in `judge_cache`, default `<out>/judge`)."""
    from ditnas.compress.kd import KDTrainer
    from ditnas.manifest import write_manifest

    cfg = cfg.check()
    out = Path(out)
    t_model, t_path, _ = _load(teacher, "teacher")
    s_model, s_path, s_record = _load(student, "student")
    if make_causal:
        s_model.set_causal(True)
    check_models(t_model, s_model, split, cfg.chunk)
    t_model.eval().requires_grad_(False)
    device = next(s_model.parameters()).device
    t_model.to(device)
    num_classes = split.num_classes
    times = time_grid(cfg.student_steps, cfg.shift)
    evals = eval_set(t_model, cfg, num_classes, times)
    identity = {"teacher": _digest(t_model), "student": _digest(s_model), "config": dataclasses.asdict(cfg),
                "data": split.fingerprint()}
    total = cfg.kd_steps + cfg.steps
    kd_cfg = KDConfig(steps=max(cfg.kd_steps, 1), batch_size=cfg.batch_size, lr=cfg.kd_lr, lambda_out=cfg.lambda_out,
                      lambda_feat=cfg.lambda_feat, checkpoint_every=cfg.checkpoint_every, seed=cfg.seed)
    kd = KDTrainer(s_model, t_model, kd_cfg, split,
                   train=TrainConfig(class_dropout=cfg.class_dropout, grad_clip=1.0))
    stream: StreamingDistiller | None = None
    rows: list[dict] = []
    before = {"teacher_gap_initial": teacher_gap(s_model, evals, cfg.chunk, times)}

    ckpt = out / CHECKPOINT
    if ckpt.exists():
        state = torch_load(ckpt, what="video distillation checkpoint")
        if not isinstance(state, dict) or state.get("identity") != identity:
            raise DitnasError(f"{ckpt} was written for other models, data or settings; delete it or choose a new out")
        kd.load_state_dict(state["kd"], ckpt)
        if state.get("stream"):
            stream = StreamingDistiller(s_model, t_model, cfg, num_classes)
            stream.load_state_dict(state["stream"])
        rows, before = list(state["rows"]), dict(state["before"])

    def done() -> int:
        return min(kd.step_count, cfg.kd_steps) + (stream.updates if stream is not None else 0)

    def save() -> None:
        atomic_torch_save(ckpt, {"identity": identity, "kd": kd.state_dict(), "rows": rows, "before": before,
                                 "stream": stream.state_dict() if stream is not None else {}})
        atomic_write_text(out / METRICS, "".join(json.dumps(r) + "\n" for r in rows))

    target = total if stop_after is None else min(total, done() + stop_after)
    while done() < target:
        if kd.step_count < cfg.kd_steps:
            record = {"phase": "kd", **kd.step()}
        else:
            if stream is None:
                before["teacher_gap_after_kd"] = teacher_gap(s_model, evals, cfg.chunk, times)
                stream = StreamingDistiller(s_model, t_model, cfg, num_classes)
            record = {"phase": "stream", **stream.step()}
        record["step"] = done()
        rows.append(record)
        if progress is not None:
            progress(done(), total, record)
        if done() % cfg.checkpoint_every == 0 or done() == target:
            save()
    if done() < total:
        return {"kind": KIND, "complete": False, "step": done()}
    if stream is None and "teacher_gap_after_kd" not in before:
        before["teacher_gap_after_kd"] = teacher_gap(s_model, evals, cfg.chunk, times)
    s_model.eval()
    after = {"teacher_gap": teacher_gap(s_model, evals, cfg.chunk, times)}
    atomic_torch_save(out / STUDENT_NAME, {"arch": str(s_model.arch), "causal": True, "chunk": cfg.chunk,
                                           "student_steps": cfg.student_steps, "shift": cfg.shift,
                                           "weights": {k: v.detach().cpu().clone() for k, v in s_model.state_dict().items()}})
    atomic_write_text(out / METRICS, "".join(json.dumps(r) + "\n" for r in rows))
    files = [STUDENT_NAME, METRICS]
    if s_record is not None:  # the extract format: what load_subnet, export and the report read
        from ditnas.compress.kd import save_subnet

        record = copy.deepcopy(s_record)  # no weights: _load dropped them
        # the student streams: rebuilt from this file it must be causal whatever the run that trained it was
        record.setdefault("config", {}).setdefault("model", {})["causal"] = True
        save_subnet(out, s_model, record)
        files.append(SUBNET_NAME)
    inputs = {name: p for name, p in (("teacher", t_path), ("student", s_path)) if p is not None}
    metrics = {"before": before, "after": after, "kd_steps": cfg.kd_steps, "steps": cfg.steps,
               "generator_updates": stream.updates if stream is not None else 0,
               "iterations": stream.iterations if stream is not None else 0,
               "params": s_model.num_params(), "teacher_params": t_model.num_params()}
    if eval_samples > 0 and split.num_classes >= 2:
        metrics.update(evaluate_clips(s_model, split, Path(judge_cache) if judge_cache else out / "judge",
                                      n=eval_samples, chunk=cfg.chunk, steps=cfg.student_steps, shift=cfg.shift))
        # flat copies of the headline numbers, as compress.distill's manifest has them
        metrics.update(fd=metrics["eval"]["fd"], label_accuracy=metrics["eval"]["label_accuracy"])
    return write_manifest(out, KIND, inputs=inputs, config=cfg, metrics=metrics, files=files,
                          extra={"arch": str(s_model.arch), "teacher_arch": str(t_model.arch),
                                 "teacher_causal": bool(t_model.causal), "method": cfg.method,
                                 "gradient": "last denoising step of each chunk (Self-Forcing)",
                                 # what a sampler of this student must run (it was trained on exactly this)
                                 "sampler": {"steps": cfg.student_steps, "shift": cfg.shift, "cfg_scale": 1.0,
                                             "chunk": cfg.chunk, "streamed": True,
                                             "times": time_grid(cfg.student_steps, cfg.shift).tolist()}})
