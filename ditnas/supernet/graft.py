"""Grafting: every op of every slot starts from a trained teacher instead of a random init.

Grafting (Chandrasegaran, Poli et al., NeurIPS 2025; shared/reference/grafting-sprint.md), applied to
the weight-sharing supernet before it is trained:

1. **Teacher.** `graft.teacher: max` trains the supernet's max arch alone for `teacher_steps` (a plain
   DiT: its weights are the supernet's shared weights plus each slot's reference op); or the (EMA) max
   net of a ditnas supernet checkpoint is copied in (same model dims and depth, else a clear error).
2. **Activation distillation, per slot** (Grafting's stage 1): the teacher runs on training batches;
   at every slot its token mixer's input (after norm and adaLN modulation) and the FFN's input are
   cached. Each other op o of the slot is then trained alone to regress the teacher op at the same
   width w: ``L1(o_w(z), f_w(z))`` averaged over the space's widths (L1: Grafting's best for attention
   replacements); the narrower MLP ratios are distilled to the teacher's full FFN with L2 (Grafting's
   choice for MLP changes), the full ratio kept as an anchor term so the teacher's own FFN stays close.
3. The supernet is then trained as usual from these weights (`train.init: <out>/grafted.pt`).

Per slot and op the L1 on a held-out cached batch is reported before (random init) and after
grafting, so a user sees what grafting bought.
# assumption: ops are grafted at the slot's stage in the max arch (its grid); with free stages an op's
# other stage shares the weights and is left to supernet training.
# assumption: timesteps are drawn as in training (train.time_shift), Grafting draws them uniformly.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from ditnas.arch import Arch
from ditnas.config import RunConfig, dump_config
from ditnas.data import BatchSampler, DatasetSplit, load_split
from ditnas.errors import DitnasError
from ditnas.io import atomic_torch_save, file_sha256, write_json
from ditnas.supernet.flow import mse
from ditnas.supernet.model import ElasticDiT
from ditnas.supernet.train import (
    CHECKPOINT_FORMAT,
    GRAFTED_KIND,
    GRAFTED_NAME,
    Trainer,
    build_space,
    build_supernet,
    flow_batch,
)

GRAFT_FORMAT = 1
Progress = Callable[[int, int, str], None]  # (done, total, what)


@dataclass
class SlotCache:
    """One slot's teacher activations: mixer inputs/outputs on the slot's grid and FFN inputs/outputs."""

    grid: tuple[int, int, int]
    mixer_in: list[Tensor]
    ffn_in: list[Tensor]


def capture(model: ElasticDiT, arch: Arch, batches: list[tuple[Tensor, Tensor, Tensor]]) -> list[SlotCache | None]:
    """Run `arch` on `batches` (x_t, t, y) and keep, per slot, what its mixer and FFN were given."""
    caches: list[SlotCache | None] = [None] * len(arch.slots)
    hooks = []
    for i, slot in enumerate(arch.slots):
        if slot.is_skip:
            continue
        block = model.blocks[i]
        caches[i] = cache = SlotCache((0, 0, 0), [], [])

        def on_mixer(module, args, _out, cache=cache):
            cache.grid = tuple(args[1])
            cache.mixer_in.append(args[0].detach())

        def on_ffn(module, args, _out, cache=cache):
            cache.ffn_in.append(args[0].detach())

        hooks.append(block.mixers[slot.op].register_forward_hook(on_mixer))
        hooks.append(block.ffn.register_forward_hook(on_ffn))
    try:
        with torch.no_grad():
            for x_t, t, y in batches:
                model.run(arch, x_t, t, y)
    finally:
        for h in hooks:
            h.remove()
    return caches


def _heads_arg(heads: int, max_heads: int) -> int | None:
    return None if heads == max_heads else heads  # full width runs unsliced, as the supernet's walk does


def _mixer_l1(student, teacher, z: Tensor, grid, heads: list[int], head_dim: int) -> Tensor:
    losses = []
    for h in heads:
        zi = z[..., : h * head_dim]
        with torch.no_grad():
            target = teacher(zi, grid, _heads_arg(h, teacher.max_heads))
        losses.append((student(zi, grid, _heads_arg(h, student.max_heads)) - target).abs().mean())
    return torch.stack(losses).mean()


def graft_mixer(student, teacher, cache: SlotCache, heads: list[int], head_dim: int, steps: int, lr: float) -> tuple[float, float]:
    """Train `student` (one op of one slot) to regress `teacher` at every width; held-out L1 before/after."""
    train, held = cache.mixer_in[:-1], cache.mixer_in[-1]
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    with torch.no_grad():
        before = _mixer_l1(student, teacher, held, cache.grid, heads, head_dim).item()
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        _mixer_l1(student, teacher, train[step % len(train)], cache.grid, heads, head_dim).backward()
        opt.step()
    with torch.no_grad():
        after = _mixer_l1(student, teacher, held, cache.grid, heads, head_dim).item()
    return before, after


def graft_ffn(ffn, cache: SlotCache, hiddens: list[int], steps: int, lr: float) -> tuple[float, float]:
    """Distil the narrower hidden widths of the shared FFN to its full output (L2); held-out before/after."""
    original = copy.deepcopy(ffn).requires_grad_(False)
    full = max(hiddens)
    train, held = cache.ffn_in[:-1], cache.ffn_in[-1]

    def loss(z: Tensor) -> Tensor:
        with torch.no_grad():
            target = original(z, full)
        return torch.stack([mse(ffn(z, h), target) for h in hiddens]).mean()

    opt = torch.optim.AdamW(ffn.parameters(), lr=lr, weight_decay=0.0)
    with torch.no_grad():
        before = loss(held).item()
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss(train[step % len(train)]).backward()
        opt.step()
    with torch.no_grad():
        after = loss(held).item()
    return before, after


def copy_teacher(model: ElasticDiT, path: Path) -> Arch:
    """Copy the (EMA) max net of the supernet checkpoint at `path` into `model`; returns the teacher's arch."""
    from ditnas.supernet.train import load_supernet

    teacher, tcfg, _ = load_supernet(path)
    mine, theirs = model.cfg, tcfg.model
    dims = ("max_heads", "head_dim", "cond_dim", "cond_tokens")
    if any(getattr(mine, d) != getattr(theirs, d) for d in dims) or teacher.space.depth != model.space.depth:
        def show(m, depth):
            return ", ".join(f"{d}={getattr(m, d)}" for d in dims) + f", depth={depth}"
        raise DitnasError(f"graft.teacher {path} has {show(theirs, teacher.space.depth)} but this space needs "
                          f"{show(mine, model.space.depth)}; graft from a teacher of the same dims or change model/space")
    if tuple(teacher.space.latent) != tuple(model.space.latent):
        raise DitnasError(f"graft.teacher {path} was trained on latents {teacher.space.latent}, this data gives "
                          f"{model.space.latent}; graft from a teacher trained on data of this shape")
    arch = teacher.space.max_arch()
    missing = sorted({s.op for s in arch.slots if not s.is_skip} - set(model.space.ops))
    if missing:
        raise DitnasError(f"graft.teacher {path}'s max net uses op(s) {missing} that space.ops {list(model.space.ops)} "
                          "does not have; add them to space.ops")
    own = model.state_dict()
    source = teacher.state_dict()
    keep = {}
    for key, value in source.items():
        if ".mixers." in key:  # blocks.<i>.mixers.<op>.<param>: only the teacher's own op at that slot
            i, op = int(key.split(".")[1]), key.split(".")[3]
            if op != arch.slots[i].op:
                continue
        if key in own and own[key].shape == value.shape:
            keep[key] = value
    model.load_state_dict(keep, strict=False)
    # this space's max arch with the teacher's op at every slot (the teacher's widths/ratios may differ)
    ours = model.space.max_arch()
    return model.space.validate(replace(ours, slots=tuple(replace(s, op=t.op) for s, t in zip(ours.slots, arch.slots))))


def train_teacher(cfg: RunConfig, split: DatasetSplit, out: Path, steps: int, progress: Progress | None) -> ElasticDiT:
    """The max arch trained alone (a plain DiT inside the supernet's weights) with the supernet trainer."""
    tcfg = replace(cfg, train=replace(cfg.train, sampler="uniform", num_random=0, steps=steps, init=""))
    trainer = Trainer(tcfg, out, split)
    while trainer.step < steps:
        trainer.train_step()
        if progress:
            progress(trainer.step, steps, "teacher")
    return trainer.model


def graft_supernet(cfg: RunConfig, out: Path, *, split: DatasetSplit | None = None,
                   progress: Progress | None = None) -> dict:
    """`ditnas graft`: teacher, then per-slot activation distillation; writes grafted.pt + graft.json."""
    gc = cfg.graft.check()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    split = split or load_split(cfg.data)
    space = build_space(cfg, split)
    unknown = sorted(set(gc.ops) - set(space.ops))
    if unknown:
        raise DitnasError(f"graft.ops {unknown} are not in space.ops {list(space.ops)}; graft ops of the space only")
    started = time.perf_counter()
    if gc.teacher == "max":
        model = train_teacher(cfg, split, out, gc.teacher_steps, progress)
        teacher_arch = space.max_arch()
    else:
        torch.manual_seed(cfg.train.seed)
        model = build_supernet(cfg, space)
        teacher_arch = copy_teacher(model, Path(gc.teacher))
    teacher_seconds = time.perf_counter() - started
    device = next(model.parameters()).device
    sampler = BatchSampler(split, cfg.train.batch_size, seed=cfg.train.seed + 5)
    noise = torch.Generator().manual_seed(cfg.train.seed + 6)
    batches = []
    for _ in range(gc.batches):
        x_t, t, y, _ = flow_batch(sampler, noise, cfg.train, space.num_classes)
        batches.append((x_t.to(device), t.to(device), y.to(device)))
    caches = capture(model, teacher_arch, batches)
    heads = sorted(model.head_counts.values())
    rows = []
    work = [(i, op) for i, slot in enumerate(teacher_arch.slots) if not slot.is_skip
            for op in (gc.ops or space.ops) if op != slot.op and op in model.blocks[i].mixers]
    total = len(work) + (sum(not s.is_skip for s in teacher_arch.slots) if gc.ffn else 0)
    done = 0
    for i, op in work:
        block, cache = model.blocks[i], caches[i]
        with torch.enable_grad():
            before, after = graft_mixer(block.mixers[op], block.mixers[teacher_arch.slots[i].op], cache, heads,
                                        model.head_dim, gc.steps, gc.lr)
        rows.append({"slot": i, "op": op, "teacher_op": teacher_arch.slots[i].op, "loss": "l1", "before": before,
                     "after": after})
        done += 1
        if progress:
            progress(done, total, f"slot {i} {op}")
    if gc.ffn:
        ratios = space.mlp_ratios
        for i, slot in enumerate(teacher_arch.slots):
            if slot.is_skip:
                continue
            hiddens = sorted({int(round(r * model.dim)) for r in ratios})
            with torch.enable_grad():
                before, after = graft_ffn(model.blocks[i].ffn, caches[i], hiddens, gc.steps, gc.lr)
            rows.append({"slot": i, "op": "ffn", "teacher_op": "ffn", "loss": "l2", "before": before, "after": after})
            done += 1
            if progress:
                progress(done, total, f"slot {i} ffn")
    path = out / GRAFTED_NAME
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # a supernet checkpoint at step 0 (load_supernet reads it: `ditnas search --checkpoint grafted.pt` scores
    # layouts on the grafted ops alone, Grafting's graft-and-score); no optimiser state: train.init starts fresh
    atomic_torch_save(path, {
        "format": CHECKPOINT_FORMAT, "kind": GRAFTED_KIND, "graft_format": GRAFT_FORMAT, "config": cfg.to_dict(),
        "space": space.to_dict(), "data_fingerprint": split.fingerprint(), "step": 0, "model": weights, "ema": weights,
    })
    dump_config(cfg, out / "config.yaml")
    manifest = {
        "kind": "ditnas.graft", "grafted": GRAFTED_NAME, "sha256": file_sha256(path),
        "teacher": gc.teacher, "teacher_arch": str(teacher_arch), "teacher_steps": gc.teacher_steps if gc.teacher == "max" else 0,
        "teacher_seconds": round(teacher_seconds, 1), "graft_seconds": round(time.perf_counter() - started - teacher_seconds, 1),
        "steps_per_op": gc.steps, "slots": rows,
        "mean_reduction": (sum(r["after"] / r["before"] for r in rows if r["before"] > 0) / max(len(rows), 1)),
    }
    write_json(out / "graft.json", manifest)
    return manifest
