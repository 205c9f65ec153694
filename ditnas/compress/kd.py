"""Knowledge distillation of a sub-DiT from a larger one (SnapGen++ §2.5, Eqs. 6-8).

    L_KD = L_diff + lambda_out * L_out + lambda_feat * L_feat
    L_diff = ||(eps - x0) - v_s(x_t, t)||^2                      (flow matching, SnapGen++ Eq. 4)
    L_out  = ||v_T(x_t, t) - v_s(x_t, t)||^2                      (Eq. 6)
    L_feat = ||f_T(x_t, t) - P(f_s(x_t, t))||^2                   (Eq. 7, final transformer features)

f = the residual stream right before the final adaLN / Linear (`forward_with_features`); P is a
trainable Linear from the student's stream width to the teacher's (`Projector`). The teacher is frozen
and runs under no_grad. SnapGen++ combines the terms with SnapGen's "timestep-aware scaling" S (Eq. 8,
defined in arXiv 2412.09619, not in the SnapGen++ text [NF]);
# assumption: S = constant unit weights times lambda_out / lambda_feat (method.md §7.7 allows constant).

`KDTrainer` is the in-memory loop (prune.py runs short recovery rounds with it); `distill_kd` is the
entry: two extracted subnet folders in, a KD-trained student out in the extract format (so
`load_subnet(out)` works), with `metrics.jsonl`, resumable checkpoints and a manifest.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ditnas.config import DataConfig, KDConfig, TrainConfig, config_from_dict
from ditnas.data import BatchSampler, DatasetSplit, load_split
from ditnas.errors import DitnasError
from ditnas.io import atomic_torch_save, atomic_write_text, file_sha256, torch_load
from ditnas.supernet.extract import SUBNET_NAME, load_subnet
from ditnas.supernet.flow import EVAL_SEED, VAL_BATCH, EvalBatch, eval_flow_loss, fixed_eval_batch, mse
from ditnas.supernet.model import SubDiT
from ditnas.supernet.train import flow_batch, load_weights

KD_CHECKPOINT = "kd_checkpoint.pt"
PROJECTOR_NAME = "projector.pt"
METRICS = "metrics.jsonl"
KIND = "ditnas.kd"


# ----------------------------------------------------------------------------------------------
# the loss
# ----------------------------------------------------------------------------------------------
def forward_with_features(model: SubDiT, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(velocity, final-block features (B, tokens, stream width)); the velocity equals `model(x, t, y)` exactly."""
    return model.forward_with_features(x, t, y)


class Projector(nn.Linear):
    """phi of SnapGen++ Eq. 7: a trainable Linear from the student's stream width to the teacher's.

    Initialised as the (rectangular) identity: the student's features land on the teacher's leading
    features, the same leading-slice convention the elastic supernet uses for narrow blocks.
    # assumption: identity (not random) init, so L_feat starts at the plain feature distance.
    """

    def __init__(self, student_width: int, teacher_width: int) -> None:
        super().__init__(student_width, teacher_width)
        with torch.no_grad():
            self.weight.copy_(torch.eye(teacher_width, student_width))
            self.bias.zero_()


def projector_for(student: SubDiT, teacher: SubDiT) -> Projector:
    p = next(student.parameters())
    return Projector(student.stream, teacher.stream).to(device=p.device, dtype=p.dtype)


def kd_terms(student: SubDiT, teacher: SubDiT, projector: nn.Module, x_t: Tensor, t: Tensor, y: Tensor) -> dict[str, Tensor]:
    """{"out": MSE(v_s, v_T), "feat": MSE(P(f_s), f_T), "v": v_s}; the teacher runs frozen under no_grad.

    "v" (the student's velocity, with its graph) lets the caller add L_diff without a second forward."""
    with torch.no_grad():
        v_t, f_t = forward_with_features(teacher, x_t, t, y)
    v_s, f_s = forward_with_features(student, x_t, t, y)
    return {"out": mse(v_s, v_t), "feat": mse(projector(f_s), f_t), "v": v_s}


def kd_loss(terms: dict[str, Tensor], target: Tensor, cfg: KDConfig) -> dict[str, Tensor]:
    """L_KD = L_diff + lambda_out L_out + lambda_feat L_feat (SnapGen++ Eq. 8 with unit scaling S)."""
    diff = mse(terms["v"], target)
    total = diff + cfg.lambda_out * terms["out"] + cfg.lambda_feat * terms["feat"]
    return {"loss": total, "diff": diff, "out": terms["out"], "feat": terms["feat"]}


@torch.no_grad()
def kd_eval(student: SubDiT, teacher: SubDiT, projector: nn.Module, batch: EvalBatch, cfg: KDConfig,
            chunk: int = 128) -> dict[str, float]:
    """Mean L_diff / L_out / L_feat / L_KD of the student on a fixed batch (same noise for every call)."""
    device = next(student.parameters()).device
    sums = {"diff": 0.0, "out": 0.0, "feat": 0.0}
    n = batch.x0.shape[0]
    x_t, target = batch.x_t.to(device), batch.target.to(device)
    tt, yy = batch.t.to(device), batch.y.to(device)
    for i in range(0, n, chunk):
        sl = slice(i, i + chunk)
        w = (min(n, i + chunk) - i) / n
        parts = kd_loss(kd_terms(student, teacher, projector, x_t[sl], tt[sl], yy[sl]), target[sl], cfg)
        for k in sums:
            sums[k] += parts[k].item() * w
    sums["loss"] = sums["diff"] + cfg.lambda_out * sums["out"] + cfg.lambda_feat * sums["feat"]
    return sums


# ----------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _FlowRecipe:
    """The two TrainConfig fields `flow_batch` reads, taken from the supernet run's train section."""

    class_dropout: float
    time_shift: float


def check_pair(teacher: SubDiT, student: SubDiT, where: str = "") -> None:
    """A teacher and a student must denoise the same latents with the same labels and patches."""
    ta, sa = teacher.arch, student.arch
    for name in ("latent", "num_classes", "patch_size"):
        if getattr(ta, name) != getattr(sa, name):
            raise DitnasError(
                f"{where}teacher and student differ in {name} ({getattr(ta, name)} vs {getattr(sa, name)}): "
                f"teacher {ta}, student {sa}; distil between subnets of the same data and patch size"
            )


class KDTrainer:
    """In-memory KD loop: `step()` draws a batch, trains student + projector on L_KD, returns the terms.

    The student is trained in place (pass a copy to keep the original); the teacher is frozen. Data order
    and noise come from private generators seeded by `cfg.seed`, so two trainers with the same inputs take
    identical steps, and `state_dict()` / `load_state_dict()` resume exactly."""

    def __init__(self, student: SubDiT, teacher: SubDiT, cfg: KDConfig, split: DatasetSplit, *,
                 projector: nn.Module | None = None, train: TrainConfig | None = None) -> None:
        check_pair(teacher, student)
        self.cfg = cfg
        self.student = student.train()
        self.device = next(student.parameters()).device
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.projector = projector if projector is not None else projector_for(student, teacher)
        tc = train or TrainConfig()
        # assumption: CFG label dropout, time shift and grad clipping as the supernet run's train section;
        # AdamW without weight decay, constant lr, no EMA (the student starts trained; KD runs are short)
        self.recipe = _FlowRecipe(tc.class_dropout, tc.time_shift)
        self.grad_clip = tc.grad_clip
        self.optimizer = torch.optim.AdamW(list(self.student.parameters()) + list(self.projector.parameters()),
                                           lr=cfg.lr, weight_decay=0.0)
        self.noise = torch.Generator().manual_seed(cfg.seed + 1)
        self.batches = BatchSampler(split, cfg.batch_size, seed=cfg.seed + 3)
        self.null = student.arch.num_classes
        self.step_count = 0

    def step(self) -> dict[str, float]:
        x_t, t, y, target = (a.to(self.device) for a in flow_batch(self.batches, self.noise, self.recipe, self.null))
        self.optimizer.zero_grad(set_to_none=True)
        parts = kd_loss(kd_terms(self.student, self.teacher, self.projector, x_t, t, y), target, self.cfg)
        parts["loss"].backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(self.student.parameters()) + list(self.projector.parameters()), self.grad_clip)
        self.optimizer.step()
        self.step_count += 1
        return {k: v.item() for k, v in parts.items()}

    def run(self, steps: int) -> list[dict[str, float]]:
        return [self.step() for _ in range(steps)]

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step_count,
            "student": self.student.state_dict(),
            "projector": self.projector.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "noise": self.noise.get_state(),
            "batches": self.batches.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], path: Path | str = "KD checkpoint") -> None:
        load_weights(self.student, state["student"], Path(path))
        load_weights(self.projector, state["projector"], Path(path))
        self.optimizer.load_state_dict(state["optimizer"])
        self.noise.set_state(state["noise"])
        self.batches.load_state_dict(state["batches"])
        self.step_count = int(state["step"])


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------
def subnet_file(path: Path) -> Path:
    path = Path(path)
    return path / SUBNET_NAME if path.is_dir() else path


def read_subnet_record(path: Path) -> dict[str, Any]:
    """The raw record of an extract-format subnet file (arch, config, space, weights[, prune])."""
    state = torch_load(subnet_file(path), what="subnet file")
    if not isinstance(state, dict) or not {"arch", "config", "space", "weights"} <= set(state):
        raise DitnasError(f"subnet file {subnet_file(path)} is not a ditnas subnet; pass a folder written by `ditnas extract`")
    return state


def save_subnet(out: Path, model: SubDiT, record: dict[str, Any]) -> Path:
    """Write `<out>/subnet.pt` in the extract format: `record` (arch, config, space[, prune]) + the weights."""
    path = Path(out) / SUBNET_NAME
    payload = {k: v for k, v in record.items() if k != "weights"}
    payload["arch"] = str(model.arch)
    payload["weights"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    atomic_torch_save(path, payload)
    return path


def eval_batch_for(split: DatasetSplit, null_label: int, n: int = VAL_BATCH, seed: int = EVAL_SEED,
                   part: str = "val") -> EvalBatch:
    """`n` fixed (x0, eps, t, y) items of the validation (or train) part; the same for every call."""
    x, y = (split.val_x, split.val_y) if part == "val" else (split.train_x, split.train_y)
    return fixed_eval_batch(x, y, n, seed, null_label)


def velocity_loss(model: SubDiT, batch: EvalBatch) -> float:
    device = next(model.parameters()).device
    return eval_flow_loss(lambda x, t, y: model(x.to(device), t.to(device), y.to(device)).cpu(), batch)


def _write_metrics(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _read_metrics(path: Path, upto: int) -> list[dict]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("step", 0) <= upto]


def data_split(record: dict[str, Any], data_cfg: DataConfig | None, where: str) -> tuple[DatasetSplit, Any]:
    """The data the student was trained on (its recorded run config), unless `data_cfg` says otherwise."""
    run_cfg = config_from_dict(record["config"], where=f"{where}:config")
    return load_split(data_cfg or run_cfg.data), run_cfg


def check_split(split: DatasetSplit, model: SubDiT, where: str) -> None:
    if tuple(split.latent_shape) != tuple(model.arch.latent) or split.num_classes != model.arch.num_classes:
        raise DitnasError(
            f"data {split.name} has latent {split.latent_shape} and {split.num_classes} classes but {where} "
            f"({model.arch}) was built for {model.arch.latent} and {model.arch.num_classes}; pass the data config it was trained on"
        )


# ----------------------------------------------------------------------------------------------
# entry
# ----------------------------------------------------------------------------------------------
def distill_kd(
    cfg: KDConfig,
    teacher: Path,
    student: Path,
    out: Path,
    *,
    data_cfg: DataConfig | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
    stop_after: int | None = None,
) -> dict:
    """KD-train the subnet at `student` from the subnet at `teacher` into folder `out`; returns the manifest.

    Writes `<out>/subnet.pt` (extract format, `load_subnet(out)` works), `projector.pt`, `metrics.jsonl`
    (one line per step) and `manifest.json` (kind "ditnas.kd"). A checkpoint every `cfg.checkpoint_every`
    steps makes a rerun into the same `out` continue where it stopped (resumed == uninterrupted).
    `stop_after`: stop after this many steps of this call (tests interruption), without the final artifact."""
    from ditnas.manifest import write_manifest

    cfg = cfg.check()
    out = Path(out)
    t_model, s_model = load_subnet(teacher), load_subnet(student)
    check_pair(t_model, s_model, where=f"teacher {teacher} / student {student}: ")
    record = read_subnet_record(student)
    split, run_cfg = data_split(record, data_cfg, str(subnet_file(student)))
    check_split(split, s_model, f"student {student}")
    null = s_model.arch.num_classes
    val = eval_batch_for(split, null, n=cfg.eval_items)
    kd_batch = eval_batch_for(split, null, n=cfg.eval_items, seed=EVAL_SEED + 1)
    initial = copy.deepcopy(s_model)
    trainer = KDTrainer(s_model, t_model, cfg, split, train=run_cfg.train)
    before = {**{f"kd_{k}": v for k, v in kd_eval(initial, t_model, trainer.projector, kd_batch, cfg).items()},
              "val_flow_loss": velocity_loss(initial, val), "teacher_val_flow_loss": velocity_loss(t_model, val)}
    del initial

    ckpt = out / KD_CHECKPOINT
    identity = {"teacher": file_sha256(subnet_file(teacher)), "student": file_sha256(subnet_file(student)),
                "config": dataclasses.asdict(cfg)}
    if ckpt.exists():
        state = torch_load(ckpt, what="KD checkpoint")
        if not isinstance(state, dict) or state.get("identity") != identity:
            raise DitnasError(f"{ckpt} was written for other inputs or settings; delete it or choose a new --out")
        trainer.load_state_dict(state["trainer"], ckpt)
        before = state["before"]
    metrics_path = out / METRICS
    rows = _read_metrics(metrics_path, trainer.step_count)
    target = cfg.steps if stop_after is None else min(cfg.steps, trainer.step_count + stop_after)
    while trainer.step_count < target:
        parts = trainer.step()
        rows.append({"step": trainer.step_count, **parts})
        if progress:
            progress(trainer.step_count, cfg.steps, parts)
        if trainer.step_count % cfg.checkpoint_every == 0 or trainer.step_count == target:
            _write_metrics(metrics_path, rows)
            atomic_torch_save(ckpt, {"identity": identity, "trainer": trainer.state_dict(), "before": before})
    if trainer.step_count < cfg.steps:
        return {"kind": KIND, "complete": False, "step": trainer.step_count}

    student_model = trainer.student.eval()
    after = {**{f"kd_{k}": v for k, v in kd_eval(student_model, t_model, trainer.projector, kd_batch, cfg).items()},
             "val_flow_loss": velocity_loss(student_model, val)}
    _write_metrics(metrics_path, rows)
    save_subnet(out, student_model, record)
    atomic_torch_save(out / PROJECTOR_NAME, {k: v.detach().cpu() for k, v in trainer.projector.state_dict().items()})
    metrics = {"steps": cfg.steps, "before": before, "after": after,
               "params": student_model.num_params(), "teacher_params": t_model.num_params()}
    return write_manifest(out, KIND, inputs={"teacher": Path(teacher), "student": Path(student)}, config=cfg,
                          metrics=metrics, files=[SUBNET_NAME, PROJECTOR_NAME, METRICS],
                          extra={"arch": str(student_model.arch), "teacher_arch": str(t_model.arch)})
