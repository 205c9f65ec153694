"""Tri-level structured pruning of a sub-DiT, KD-guided and latency-priced (Taming, method.md §3.3, §7.6).

Units (`Unit(kind, block, index)`):
- `blocks`: a whole block; removed, the block is the identity on the residual stream (slot -> skip);
- `heads`: one KV group of the block's token mixer = KV head j with its `kv_group` query heads
  (`gqa`; GQA stays consistent), or one head (every other op, kv_group 1). The block keeps its residual
  width: q/k/v lose the head's rows, the output projection its columns (`ops.with_io_dim`).
  # assumption: cross-attention heads are not units (4 conditioning tokens: little latency to win).
- `channels`: `PruneConfig.channel_group` consecutive FFN hidden units (fc1 rows, fc2 columns).
A block always keeps >= 1 head group and >= 1 channel group; removing more is the block unit.

**Masks first.** `PruneMask` is a set of units; `apply_mask(model, mask)` zeroes, without changing any
shape, the output weights through which a unit reaches the stream (a head's / group's columns of the
mixer's `o`; a channel group's columns of `fc2`; for a block the `o` of mixer and cross-attention and
`fc2`, weights and biases, so the block returns its input). `export_pruned(model, mask)` removes the
parameters and re-indexes: an ordinary `SubDiT` whose `Arch` has `skip` for removed blocks and
MLP ratio = kept hidden / width, plus a per-block `{"heads", "hidden"}` record (the arch has no head
count); saved in the extract format with that record under "prune" and a search space extended to
admit the new skips and ratios, so `load_subnet` alone rebuilds it.
# assumption: an explicit per-block heads/hidden record (not a narrower block width): a removed head
# must not change which stream features the block reads, or masked and pruned would differ.

**Sensitivity** S(u) = L(mask + u) - L(mask), L = MSE(v, v_T) + MSE(f, f_T) against the unpruned input
model on a fixed calibration set (`calib_items` training items, fixed noise and t; validation stays
for the reported losses). `taylor`: one
backward; S(u) = |sum over the unit's zeroed weights of g*w| -- the first-order change of the loss when
the unit's gate goes 1 -> 0, since every masked weight enters as w*gate. The gradient is of
L_diff + L (the KD training objective): at the unpruned model L is at its minimum 0 (the teacher is
the model itself) and has zero gradient, so a KD-only Taylor score there is noise.
# assumption: Taylor on L_diff + L with unit weights (Spearman 0.78 vs masked on the test model).

**Latency** of a state = the predictor's decomposition (calibrated cell costs, `cell_cost`), with each
block priced at its op, width and kept MLP ratio (interpolated / regressed by the predictor when the
ratio was not measured) and its kept-head share:
    block ms = a * p50(op, width, hidden/width) * (1 - mixer_share * (1 - kept_heads/heads)) + b
# assumption: latency splits inside a block as its MACs do (`flops.block_macs_analytic`): the mixer's
# share of the block MACs scales with its kept heads. Only this head correction is MACs-based; FFN width
# and blocks are priced by the table itself. How good: on the tiny test model timed on host-torch (load
# ~7 on 2 cores, noisy), pruned blocks measured 0.85-1.0x the full block where this pricing said
# 0.67-0.87x -- tiny blocks are overhead-bound, so MACs overstate head/channel savings; and the
# predictor's regressor below the smallest measured MLP ratio can price a narrower FFN *above* the full
# one (such units have Δlatency <= 0 and are never picked). Confirm with `measure=True`.

**Greedy loop**: remove argmin S(u)/Δ(u) (Δ = Δlatency while over `budget_ms`, else Δparams while over
`memory_mb`; units with Δ <= 0 are never picked), re-score every `rescore_every` removals, physically
prune and run `recover_steps` of KD (teacher = the input model) between rounds, stop at the first state
within the budgets, then `final_steps` of KD.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ditnas.arch import Arch, SearchSpace, Slot
from ditnas.compress.kd import (
    KDTrainer,
    check_split,
    data_split,
    eval_batch_for,
    read_subnet_record,
    save_subnet,
    subnet_file,
    velocity_loss,
)
from ditnas.config import DataConfig, KDConfig, ModelConfig, PruneConfig, config_from_dict
from ditnas.errors import DitnasError
from ditnas.supernet.extract import SUBNET_NAME, load_subnet
from ditnas.supernet.flow import EvalBatch, mse
from ditnas.supernet.model import Block, SubDiT
from ditnas.supernet.ops import with_io_dim

KIND = "ditnas.prune"
MB = 2**20


# ----------------------------------------------------------------------------------------------
# units and masks
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class Unit:
    kind: str  # blocks | heads | channels
    block: int  # slot index
    index: int = 0  # head group / channel group within the block (0 for a block)

    def __str__(self) -> str:
        return f"block{self.block}" if self.kind == "blocks" else f"block{self.block}.{self.kind}[{self.index}]"


@dataclass
class PruneMask:
    """Units removed from a model (shapes unchanged until `export_pruned`)."""

    units: set[Unit] = field(default_factory=set)

    def with_unit(self, unit: Unit) -> PruneMask:
        return PruneMask(self.units | {unit})

    def blocks(self) -> set[int]:
        return {u.block for u in self.units if u.kind == "blocks"}

    def of(self, kind: str, block: int) -> set[int]:
        return {u.index for u in self.units if u.kind == kind and u.block == block}


def _blocks(model: SubDiT) -> list[tuple[int, Block, str]]:
    return [(i, b, op) for i, (b, op) in enumerate(zip(model.blocks, model.ops)) if isinstance(b, Block)]


def _mixer(block: Block, op: str) -> nn.Module:
    return block.mixers[op]


def head_groups(block: Block, op: str) -> list[tuple[list[int], list[int]]]:
    """Per unit: (query heads, KV heads). GQA: KV head j with query heads j*g .. j*g+g-1 (last may be partial)."""
    mixer = _mixer(block, op)
    g = getattr(mixer, "kv_group", 1)
    h = mixer.max_heads
    return [(list(range(j * g, min(h, (j + 1) * g))), [j]) for j in range(-(-h // g))]


def channel_groups(block: Block, group: int) -> int:
    return -(-block.ffn.max_hidden // group)


def _channel_index(block: Block, group: int, groups: Iterable[int]) -> list[int]:
    n = block.ffn.max_hidden
    return [c for j in sorted(groups) for c in range(j * group, min(n, (j + 1) * group))]


def _head_channels(block: Block, op: str, heads: Iterable[int]) -> list[int]:
    hd = _mixer(block, op).head_dim
    return [h * hd + d for h in sorted(heads) for d in range(hd)]


def all_units(model: SubDiT, kinds: Iterable[str], group: int) -> list[Unit]:
    kinds = set(kinds)
    units = []
    for i, block, op in _blocks(model):
        if "blocks" in kinds:
            units.append(Unit("blocks", i))
        if "heads" in kinds:
            units += [Unit("heads", i, j) for j in range(len(head_groups(block, op)))]
        if "channels" in kinds:
            units += [Unit("channels", i, j) for j in range(channel_groups(block, group))]
    return units


def candidates(model: SubDiT, mask: PruneMask, kinds: Iterable[str], group: int) -> list[Unit]:
    """Units that may be removed next: not removed, in a block still there, leaving >= 1 block /
    >= 1 head group / >= 1 channel group."""
    gone = mask.blocks()
    alive = [i for i, _, _ in _blocks(model) if i not in gone]
    out = []
    for u in all_units(model, kinds, group):
        if u in mask.units or u.block in gone:
            continue
        i, block, op = next(e for e in _blocks(model) if e[0] == u.block)
        if u.kind == "blocks" and len(alive) <= 1:
            continue
        if u.kind == "heads" and len(mask.of("heads", i)) + 1 >= len(head_groups(block, op)):
            continue
        if u.kind == "channels" and len(mask.of("channels", i)) + 1 >= channel_groups(block, group):
            continue
        out.append(u)
    return out


def _unit_weights(model: SubDiT, unit: Unit, group: int) -> list[tuple[Tensor, tuple]]:
    """(parameter, index) pairs whose zeroing masks `unit` (its path into the residual stream)."""
    block, op = model.blocks[unit.block], model.ops[unit.block]
    if unit.kind == "blocks":
        mixer = _mixer(block, op)
        return [(p, (slice(None),)) for p in (mixer.o.weight, mixer.o.bias, block.cross.o.weight, block.cross.o.bias,
                                              block.ffn.fc2.weight, block.ffn.fc2.bias)]
    if unit.kind == "heads":
        qh, _ = head_groups(block, op)[unit.index]
        return [(_mixer(block, op).o.weight, (slice(None), _head_channels(block, op, qh)))]
    return [(block.ffn.fc2.weight, (slice(None), _channel_index(block, group, [unit.index])))]


@torch.no_grad()
def apply_mask(model: SubDiT, mask: PruneMask, group: int, *, inplace: bool = False) -> SubDiT:
    """A copy of `model` (or `model` itself) with every unit of `mask` contributing zero; shapes unchanged."""
    out = model if inplace else copy.deepcopy(model)
    for unit in mask.units:
        for p, idx in _unit_weights(out, unit, group):
            p[idx] = 0.0
    return out


# ----------------------------------------------------------------------------------------------
# export: physically remove the units
# ----------------------------------------------------------------------------------------------
def _select(src: dict[str, Tensor], rules: dict[str, tuple[int, list[int]]]) -> dict[str, Tensor]:
    out = {}
    for name, t in src.items():
        if name in rules:
            dim, idx = rules[name]
            t = t.index_select(dim, torch.tensor(idx, dtype=torch.long, device=t.device))
        out[name] = t.clone()
    return out


def _mixer_rules(mixer: nn.Module, qc: list[int], kvc: list[int], heads: list[int]) -> dict:
    rules = {"q.weight": (0, qc), "q.bias": (0, qc), "o.weight": (1, qc)}
    if hasattr(mixer, "kv_group"):  # Attention family: SA, GQA, SSA, ASSA
        rules.update({"k.weight": (0, kvc), "k.bias": (0, kvc), "v.weight": (0, kvc), "v.bias": (0, kvc)})
        if hasattr(mixer, "k_compress"):
            for n in ("k_compress", "v_compress"):
                rules.update({f"{n}.weight": (0, kvc), f"{n}.bias": (0, kvc)})
            rules.update({"gate.weight": (0, heads), "gate.bias": (0, heads)})
    else:  # LCHA: per-channel k, v, channel mix and gate follow the heads; the depthwise conv reads x
        rules.update({"k.weight": (0, qc), "k.bias": (0, qc), "v.weight": (0, qc), "v.bias": (0, qc),
                      "mix.weight": (0, qc), "mix.bias": (0, qc), "alpha": (0, qc)})
    return rules


@torch.no_grad()
def export_pruned(model: SubDiT, mask: PruneMask, group: int) -> SubDiT:
    """A standalone `SubDiT` without the units of `mask`: removed blocks are `skip`, heads and FFN
    channels are gone; computes what `apply_mask(model, mask)` computes (to float rounding)."""
    out = copy.deepcopy(model)
    base = getattr(model, "base_arch", model.arch)
    slots = list(model.arch.slots)
    gone = mask.blocks()
    for i, block, op in _blocks(model):
        if i in gone:
            out.blocks[i] = nn.Identity()
            out.ops[i] = "skip"
            slots[i] = Slot("skip", stage=slots[i].stage)
            continue
        new_block = out.blocks[i]
        width = block.mod["own"].out_features // 6
        removed_h = mask.of("heads", i)
        if len(removed_h) >= len(head_groups(block, op)) or len(mask.of("channels", i)) >= channel_groups(block, group):
            raise DitnasError(f"prune mask removes every head or every FFN channel group of block {i}; remove the block instead")
        if removed_h:
            mixer = _mixer(block, op)
            groups = head_groups(block, op)
            keep = [g for j, g in enumerate(groups) if j not in removed_h]
            heads = [h for qh, _ in keep for h in qh]
            kv = [k for _, kh in keep for k in kh]
            qc = _head_channels(block, op, heads)
            kvc = [k * mixer.head_dim + d for k in kv for d in range(mixer.head_dim)]
            state = _select(mixer.state_dict(), _mixer_rules(mixer, qc, kvc, heads))
            fresh = with_io_dim(mixer.sliced(len(heads)), width)
            fresh.load_state_dict(state)
            new_block.mixers[op] = fresh
        removed_c = mask.of("channels", i)
        if removed_c:
            keep_c = [c for c in range(block.ffn.max_hidden) if c not in set(_channel_index(block, group, removed_c))]
            state = _select(block.ffn.state_dict(), {"fc1.weight": (0, keep_c), "fc1.bias": (0, keep_c), "fc2.weight": (1, keep_c)})
            ffn = block.ffn.sliced(width, len(keep_c))
            ffn.load_state_dict(state)
            new_block.ffn = ffn
        s = slots[i]
        slots[i] = Slot(s.op, s.width, new_block.ffn.max_hidden / width, s.stage)
    out.arch = model.arch.with_slots(slots)
    out.base_arch = base
    return out.eval()


def prune_record(model: SubDiT) -> dict[str, Any]:
    """The "prune" entry of the saved subnet: base arch + kept heads / hidden per running block."""
    blocks = {str(i): {"heads": int(_mixer(b, op).max_heads), "hidden": int(b.ffn.max_hidden)} for i, b, op in _blocks(model)}
    return {"base_arch": str(getattr(model, "base_arch", model.arch)), "blocks": blocks}


def admitting_space(space: dict[str, Any], arch: Arch) -> dict[str, Any]:
    """The saved space record extended so `arch` validates: its skips and MLP ratios added."""
    sp = SearchSpace.from_dict(space)
    skips = set(sp.skippable) | {i for i, s in enumerate(arch.slots) if s.is_skip}
    ratios = set(sp.mlp_ratios) | {s.mlp_ratio for s in arch.slots if not s.is_skip}
    return replace(sp, skippable=tuple(sorted(skips)), mlp_ratios=tuple(sorted(ratios))).to_dict()


def save_pruned(out: Path, model: SubDiT, record: dict[str, Any]) -> Path:
    """`<out>/subnet.pt` in the extract format (+ "prune"); `record` is the input subnet's raw record."""
    rec = dict(record)
    rec["space"] = admitting_space(record["space"], model.arch)
    rec["prune"] = prune_record(model)
    return save_subnet(out, model, rec)


# ----------------------------------------------------------------------------------------------
# sensitivity
# ----------------------------------------------------------------------------------------------
class KDProbe:
    """L(model) = MSE(v, v_T) + MSE(f, f_T) on a fixed calibration batch; teacher outputs cached."""

    def __init__(self, teacher: SubDiT, batch: EvalBatch, chunk: int = 128):
        self.device = next(teacher.parameters()).device
        self.x, self.t, self.y = batch.x_t.to(self.device), batch.t.to(self.device), batch.y.to(self.device)
        self.chunk = chunk
        with torch.no_grad():
            outs = [teacher.forward_with_features(*self._part(i)) for i in self._starts()]
        self.v_t = torch.cat([o[0] for o in outs])
        self.f_t = torch.cat([o[1] for o in outs])
        self.target = batch.target.to(self.device)

    def _starts(self) -> range:
        return range(0, self.x.shape[0], self.chunk)

    def _part(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        s = slice(i, i + self.chunk)
        return self.x[s], self.t[s], self.y[s]

    def loss(self, model: SubDiT, grad: bool = False, diff: float = 0.0) -> Tensor:
        """KD loss (+ `diff` x the flow-matching loss against eps - x0, for Taylor scores)."""
        total = torch.zeros((), device=self.device)
        n = self.x.shape[0]
        with torch.set_grad_enabled(grad):
            for i in self._starts():
                v, f = model.forward_with_features(*self._part(i))
                w = v.shape[0] / n
                s = slice(i, i + self.chunk)
                part = mse(v, self.v_t[s]) + mse(f, self.f_t[s])
                if diff:
                    part = part + diff * mse(v, self.target[s])
                total = total + w * part
        return total


@torch.no_grad()
def masked_sensitivity(model: SubDiT, mask: PruneMask, units: list[Unit], probe: KDProbe, group: int) -> dict[Unit, float]:
    """S(u) = L(mask + u) - L(mask), each unit masked on its own on top of `mask`."""
    work = apply_mask(model, mask, group)
    base = probe.loss(work).item()
    out = {}
    for u in units:
        saved = [(p, idx, p[idx].clone()) for p, idx in _unit_weights(work, u, group)]
        for p, idx, _ in saved:
            p[idx] = 0.0
        out[u] = probe.loss(work).item() - base
        for p, idx, value in saved:
            p[idx] = value
    return out


def taylor_sensitivity(model: SubDiT, mask: PruneMask, units: list[Unit], probe: KDProbe, group: int,
                       diff: float = 1.0) -> dict[Unit, float]:
    """S(u) = |sum over the unit's masked weights of dL/dw * w| from one backward pass (first order)."""
    work = apply_mask(model, mask, group)
    for p in work.parameters():
        p.grad = None
    probe.loss(work, grad=True, diff=diff).backward()
    out = {}
    with torch.no_grad():
        for u in units:
            total = sum(float((p.grad[idx] * p[idx]).sum()) for p, idx in _unit_weights(work, u, group) if p.grad is not None)
            out[u] = abs(total)
    return out


def sensitivity(kind: str, model: SubDiT, mask: PruneMask, units: list[Unit], probe: KDProbe, group: int) -> dict[Unit, float]:
    if kind == "taylor":
        return taylor_sensitivity(model, mask, units, probe, group)
    return masked_sensitivity(model, mask, units, probe, group)


# ----------------------------------------------------------------------------------------------
# latency and memory of a state
# ----------------------------------------------------------------------------------------------
class StatePricer:
    """Predicted per-step latency (ms) of a model with a mask, from a `LatencyPredictor`."""

    def __init__(self, predictor: Any, model_cfg: ModelConfig):
        from ditnas.latency_models.flops import block_macs_analytic
        from ditnas.latency_models.programs import Cell

        self.predictor, self.mc, self._macs, self._Cell = predictor, model_cfg, block_macs_analytic, Cell
        self.sources: dict[str, int] = {}

    def mixer_share(self, op: str, arch: Arch, stage: int, width_features: int, heads: int, hidden: int) -> float:
        mc = self.mc
        terms = self._macs(op, tokens=arch.tokens(stage), dim=width_features, heads=heads, hidden=hidden,
                           cond_dim=mc.cond_dim, cond_tokens=mc.cond_tokens, grid=arch.grid(stage), kv_group=mc.gqa_group,
                           ssa_stride=mc.ssa_stride, lcha_kernel=tuple(mc.lcha_kernel), assa_blocks=mc.assa_blocks,
                           assa_radius=mc.assa_radius)
        return sum(v for k, v in terms.items() if k.startswith("mixer")) / terms["total"]

    def _p50(self, cell) -> float:
        priced = self.predictor.price(cell)
        self.sources[priced.source] = self.sources.get(priced.source, 0) + 1
        return priced.p50

    def latency(self, model: SubDiT, mask: PruneMask, group: int) -> float:
        cal, Cell = self.predictor.calibration, self._Cell
        arch = model.arch
        stream = model.stream / (self.mc.max_heads * self.mc.head_dim)
        gone = mask.blocks()
        total, blocks, stage = 0.0, 0, 0
        total += self._p50(Cell("patch_embed", width=stream, tokens=arch.tokens(0), stage=0))
        for i, slot in enumerate(arch.slots):
            if slot.stage != stage:
                total += self._transition(stream, slot.stage, arch)
                stage = slot.stage
            block = model.blocks[i]
            if not isinstance(block, Block) or i in gone:
                continue
            op = model.ops[i]
            width = block.mod["own"].out_features // 6
            hidden = block.ffn.max_hidden - len(_channel_index(block, group, mask.of("channels", i)))
            full_heads = width // self.mc.head_dim
            kept = sum(len(qh) for j, (qh, _) in enumerate(head_groups(block, op)) if j not in mask.of("heads", i))
            p50 = self._p50(Cell("block", op, slot.width, hidden / width, arch.tokens(slot.stage), slot.stage))
            share = self.mixer_share(op, arch, slot.stage, width, full_heads, hidden)
            total += p50 * (1.0 - share * (1.0 - kept / full_heads))
            blocks += 1
        if stage != 0:
            total += self._transition(stream, 0, arch)
        total += self._p50(Cell("final", width=stream, tokens=arch.tokens(0), stage=0))
        return cal.apply(total, blocks)

    def _transition(self, stream: float, to: int, arch: Arch) -> float:
        Cell = self._Cell
        if to == 1:
            return self._p50(Cell("down", width=stream, tokens=arch.tokens(0), stage=0))
        return self._p50(Cell("up", width=stream, tokens=arch.tokens(1), stage=1))


def _removed_by_rules(module: nn.Module, rules: dict[str, tuple[int, list[int]]]) -> int:
    """Entries a `_select` with these keep-rules drops (the rules name what is kept)."""
    params = dict(module.named_parameters())
    return sum(p.numel() - p.numel() // p.shape[dim] * len(idx) for name, (dim, idx) in rules.items() for p in [params[name]])


def state_params(model: SubDiT, mask: PruneMask, group: int) -> int:
    """Parameters `export_pruned(model, mask)` would have, counted without building it."""
    total = model.num_params()
    gone = mask.blocks()
    for i, block, op in _blocks(model):
        if i in gone:
            total -= sum(p.numel() for p in block.parameters())
            continue
        removed_h = mask.of("heads", i)
        if removed_h:
            mixer = _mixer(block, op)
            keep = [g for j, g in enumerate(head_groups(block, op)) if j not in removed_h]
            heads = [h for qh, _ in keep for h in qh]
            kvc = [k * mixer.head_dim + d for _, kh in keep for k in kh for d in range(mixer.head_dim)]
            total -= _removed_by_rules(mixer, _mixer_rules(mixer, _head_channels(block, op, heads), kvc, heads))
        removed_c = mask.of("channels", i)
        if removed_c:
            drop = set(_channel_index(block, group, removed_c))
            keep_c = [c for c in range(block.ffn.max_hidden) if c not in drop]
            total -= _removed_by_rules(block.ffn, {"fc1.weight": (0, keep_c), "fc1.bias": (0, keep_c), "fc2.weight": (1, keep_c)})
    return total


# ----------------------------------------------------------------------------------------------
# the greedy loop
# ----------------------------------------------------------------------------------------------
@dataclass
class Removal:
    unit: str  # named by its index in the input model (e.g. block2.heads[1])
    kind: str
    sensitivity: float
    delta: float  # saving used for the ratio (ms or params)
    delta_ms: float | None
    latency_ms: float | None  # predicted per step after this removal
    params: int  # after this removal
    round: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _min_state(model: SubDiT, kinds: Iterable[str], group: int, price: Callable[[PruneMask], float]) -> tuple[float, PruneMask]:
    """The cheapest reachable state under the legality rules (to name the best reachable budget)."""
    best, best_mask = math.inf, PruneMask()
    entries = _blocks(model)
    keep_options = [i for i, _, _ in entries] if "blocks" in kinds else [None]
    for keep in keep_options:
        mask = PruneMask({Unit("blocks", i) for i, _, _ in entries if keep is not None and i != keep})
        for i, block, op in entries:
            if keep is not None and i != keep:
                continue
            if "heads" in kinds:
                mask.units |= {Unit("heads", i, j) for j in range(1, len(head_groups(block, op)))}
            if "channels" in kinds:
                mask.units |= {Unit("channels", i, j) for j in range(1, channel_groups(block, group))}
        value = price(mask)
        if value < best:
            best, best_mask = value, mask
    return best, best_mask


class Pruner:
    """Greedy KD-guided pruning of `model` (in memory); `teacher` = the unpruned model."""

    def __init__(self, cfg: PruneConfig, kd_cfg: KDConfig, model: SubDiT, split, *, pricer: StatePricer | None,
                 train_cfg=None, progress: Callable[[str], None] | None = None):
        self.cfg, self.kd_cfg, self.split, self.pricer, self.train_cfg = cfg, kd_cfg, split, pricer, train_cfg
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        self.model = copy.deepcopy(model).eval()
        self._probe: KDProbe | None = None
        self.progress = progress or (lambda msg: None)
        self.removals: list[Removal] = []
        self.kd_losses: list[dict] = []
        self.group = cfg.channel_group
        # original (input-model) index of every head group / channel group still present, per block:
        # units are re-indexed when a round is physically pruned; the manifest names the original ones
        self.orig = {(kind, i): list(range(n)) for i, b, op in _blocks(model)
                     for kind, n in (("heads", len(head_groups(b, op))), ("channels", channel_groups(b, cfg.channel_group)))}

    @property
    def probe(self) -> KDProbe:
        """The calibration set with the teacher's outputs (built on first use)."""
        if self._probe is None:
            batch = eval_batch_for(self.split, self.teacher.arch.num_classes, n=self.cfg.calib_items, seed=self.cfg.seed, part="train")
            self._probe = KDProbe(self.teacher, batch)
        return self._probe

    # --- prices of a state of the current model ---
    def latency(self, mask: PruneMask) -> float | None:
        return None if self.pricer is None else self.pricer.latency(self.model, mask, self.group)

    def params(self, mask: PruneMask) -> int:
        return state_params(self.model, mask, self.group)

    def within(self, lat: float | None, params: int) -> bool:
        ok = True
        if self.cfg.budget_ms is not None:
            ok &= lat is not None and lat <= self.cfg.budget_ms
        if self.cfg.memory_mb is not None:
            ok &= params * 4 / MB <= self.cfg.memory_mb
        return ok

    def check_reachable(self) -> None:
        cfg = self.cfg
        if cfg.budget_ms is not None:
            if self.pricer is None:
                raise DitnasError("compress.prune.budget_ms is set but no latency table was given; pass --table "
                                  "(a `ditnas profile` output) or use compress.prune.memory_mb only")
            best, _ = _min_state(self.model, cfg.units, self.group, self.latency)
            if best > cfg.budget_ms:
                raise DitnasError(f"compress.prune.budget_ms={cfg.budget_ms:g} ms is not reachable by removing "
                                  f"{'/'.join(cfg.units)}: the best reachable is {best:.4g} ms per step; raise the budget or allow more unit kinds")
        if cfg.memory_mb is not None:
            best, _ = _min_state(self.model, cfg.units, self.group, lambda m: self.params(m) * 4 / MB)
            if best > cfg.memory_mb:
                raise DitnasError(f"compress.prune.memory_mb={cfg.memory_mb:g} MB is not reachable by removing "
                                  f"{'/'.join(cfg.units)}: the best reachable is {best:.4g} MB of fp32 parameters")

    def recover(self, steps: int) -> None:
        # assumption: each round a fresh KDTrainer (new AdamW state, data seed offset by the removals so far)
        if steps <= 0:
            return
        cfg = replace(self.kd_cfg, seed=self.kd_cfg.seed + len(self.removals))
        trainer = KDTrainer(self.model, self.teacher, cfg, self.split, train=self.train_cfg)
        rows = trainer.run(steps)
        self.model = trainer.student.eval()
        self.kd_losses.append({"after_removals": len(self.removals), "steps": steps, "first": rows[0], "last": rows[-1]})

    def run(self, *, pick: str = "greedy", rng: random.Random | None = None) -> SubDiT:
        """Prune until within budget. pick="random": uniformly random legal units (the ablation baseline)."""
        cfg = self.cfg
        self.check_reachable()
        mask = PruneMask()
        lat, params = self.latency(mask), self.params(mask)
        self.start = {"latency_ms": lat, "params": params}
        rnd = 0
        while not self.within(lat, params):
            units = candidates(self.model, mask, cfg.units, self.group)
            scores = sensitivity(cfg.sensitivity, self.model, mask, units, self.probe, self.group) if pick == "greedy" else {}
            picked = 0
            while picked < cfg.rescore_every and not self.within(lat, params):
                units = candidates(self.model, mask, cfg.units, self.group)
                by_latency = cfg.budget_ms is not None and (lat is None or lat > cfg.budget_ms)
                options = []
                for u in units:
                    trial = mask.with_unit(u)
                    t_lat = self.latency(trial)
                    t_par = self.params(trial) if not by_latency else params
                    d_ms = None if t_lat is None or lat is None else lat - t_lat
                    delta = d_ms if by_latency else float(params - t_par)
                    if delta is not None and delta > 0:
                        options.append((u, delta, d_ms, t_lat, t_par))
                if not options:
                    raise DitnasError(f"pruning stalled at {lat if lat is not None else float('nan'):.4g} ms / "
                                      f"{params * 4 / MB:.4g} MB: no unit left that lowers the budgeted cost; raise the budget")
                if pick == "random":
                    u, delta, d_ms, t_lat, t_par = (rng or random.Random(cfg.seed)).choice(options)
                else:
                    # argmin S/Δ; negative S (masking helped) first. assumption: S clipped at 0 (ties by Δ)
                    u, delta, d_ms, t_lat, t_par = min(options, key=lambda o: (max(scores[o[0]], 0.0) / o[1], -o[1]))
                mask = mask.with_unit(u)
                lat = t_lat
                params = self.params(mask) if by_latency else t_par
                original = u if u.kind == "blocks" else Unit(u.kind, u.block, self.orig[(u.kind, u.block)][u.index])
                self.removals.append(Removal(str(original), u.kind, float(scores.get(u, float("nan"))), float(delta),
                                             d_ms, lat, int(params), rnd))
                self.progress(f"removed {u}: {lat if lat is not None else float('nan'):.4g} ms, {params} params")
                picked += 1
            # physically prune, then recover (the next round scores the pruned model)
            self.model = export_pruned(self.model, mask, self.group)
            for (kind, i), ids in self.orig.items():
                gone = mask.of(kind, i)
                self.orig[(kind, i)] = [x for j, x in enumerate(ids) if j not in gone]
            mask = PruneMask()
            rnd += 1
            if not self.within(lat, params):
                self.recover(cfg.recover_steps)
        self.recover(cfg.final_steps)
        self.end = {"latency_ms": self.latency(PruneMask()), "params": self.model.num_params()}
        return self.model


# ----------------------------------------------------------------------------------------------
# entry
# ----------------------------------------------------------------------------------------------
def measure_latency(model: SubDiT, workdir: Path, *, warmup: int = 3, iters: int = 20) -> dict[str, float]:
    """p10/p50/p90 ms of one forward of `model` (batch 1) lowered to ExecuTorch XNNPACK (~30-60 s)."""
    from ditnas.latency_models.backends.executorch_xnnpack import ExecuTorchXnnpackBackend
    from ditnas.latency_models.programs import Cell, ModelProgram, Program

    a = model.arch
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn((1, *a.latent), generator=g), torch.rand((1,), generator=g),
              torch.randint(0, max(a.num_classes, 1), (1,), generator=g))
    sub = copy.deepcopy(model).cpu().eval().requires_grad_(False)
    program = Program(Cell("model", tokens=a.tokens(0), arch=str(a)), ModelProgram(sub), inputs)
    backend = ExecuTorchXnnpackBackend()
    rows = backend.measure(backend.prepare([program], Path(workdir)), warmup, iters)
    values = np.asarray([r["latency_ms"] for r in rows], dtype=float)
    return {q: float(np.percentile(values, p)) for q, p in (("p10", 10), ("p50", 50), ("p90", 90))}


def prune_subnet(
    cfg: PruneConfig,
    kd_cfg: KDConfig,
    subnet: Path,
    table: Path | None,
    out: Path,
    *,
    data_cfg: DataConfig | None = None,
    progress: Callable[[str], None] | None = None,
    measure: bool = False,
) -> dict:
    """Prune the extracted subnet at `subnet` to `cfg.budget_ms` (on `table`'s predictor) and/or
    `cfg.memory_mb`; write `<out>/subnet.pt` (extract format + prune record) and a manifest."""
    from ditnas.manifest import write_manifest

    cfg, kd_cfg = cfg.check(), kd_cfg.check()
    if cfg.budget_ms is None and cfg.memory_mb is None:
        raise DitnasError("compress.prune: set budget_ms and/or memory_mb (what to prune down to)")
    out = Path(out)
    model = load_subnet(subnet)
    record = read_subnet_record(subnet)
    split, run_cfg = data_split(record, data_cfg, str(subnet_file(subnet)))
    check_split(split, model, f"subnet {subnet}")
    pricer = None
    if table is not None:
        from ditnas.latency_models.stage import load_predictor

        _, predictor = load_predictor(Path(table))
        if predictor.space.latent != model.arch.latent or predictor.space.patch_size != model.arch.patch_size:
            raise DitnasError(f"latency table {table} was profiled for latent {predictor.space.latent} / patch "
                              f"{predictor.space.patch_size}, the subnet {subnet} is {model.arch.latent} / {model.arch.patch_size}; "
                              "pass the table of this subnet's search space")
        pricer = StatePricer(predictor, run_cfg.model)
    pruner = Pruner(cfg, kd_cfg, model, split, pricer=pricer, train_cfg=run_cfg.train, progress=progress)
    pruner.check_reachable()  # before any scoring: an impossible budget fails fast
    val = eval_batch_for(split, model.arch.num_classes, n=kd_cfg.eval_items)
    before_kd = pruner.probe.loss(model).item()
    before_val = velocity_loss(model, val)
    pruned = pruner.run()
    metrics = {
        "removed": [r.as_dict() for r in pruner.removals],
        "predicted_ms_before": pruner.start["latency_ms"], "predicted_ms_after": pruner.end["latency_ms"],
        "params_before": pruner.start["params"], "params_after": pruner.end["params"],
        "kd_loss_before": before_kd,
        "kd_loss_after": pruner.probe.loss(pruned).item(),
        "val_flow_loss_before": before_val, "val_flow_loss_after": velocity_loss(pruned, val),
        "kd_rounds": pruner.kd_losses,
        "price_sources": dict(pricer.sources) if pricer else {},
    }
    if measure:
        metrics["measured_ms_before"] = measure_latency(model, out / "measure" / "before")
        metrics["measured_ms_after"] = measure_latency(pruned, out / "measure" / "after")
    save_pruned(out, pruned, record)
    inputs = {"subnet": Path(subnet)}
    if table is not None:
        inputs["table"] = Path(table)
    return write_manifest(out, KIND, inputs=inputs, config={"prune": asdict(cfg), "kd": asdict(kd_cfg)}, metrics=metrics,
                          files=[SUBNET_NAME], extra={"arch": str(pruned.arch), "base_arch": str(getattr(pruned, "base_arch", pruned.arch))})
