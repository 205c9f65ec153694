"""The search space as per-slot choices, and its fixed-length categorical encoding for Optuna.

`SearchChoices.from_space(space)` lists, for every slot, the (op, width, MLP ratio) triples and `skip`
the slot may take, and the resolution stages it may sit at. The DP (`search/dp.py`) indexes choices
by their position in `all_choices` (one global list, so "choice o" means the same block in every
slot and counts of a choice are meaningful); `mask()` says which (slot, choice, stage) cells exist.

Optuna's multivariate TPE needs the same parameters with the same categorical values in every trial
(optuna#3363), so the encoding is one categorical `slot{i}` per slot (value: the slot token, e.g.
`lcha:1:4` or `skip`) plus one `stage{i}` in {"0", "1"} per slot when the stage layout is free.
A stage-dependent op subset (`stage_ops`) cannot be expressed as a fixed value list, so `decode`
rejects such combinations with a DitnasError (the search marks those trials infeasible).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ditnas.arch import SKIP, STAGES, Arch, SearchSpace, Slot
from ditnas.errors import DitnasError


@dataclass(frozen=True)
class SlotChoice:
    """What one slot runs, independent of its stage: a block (op, width, MLP ratio) or `skip`."""

    op: str
    width: float = 0.0
    mlp_ratio: float = 0.0

    def __post_init__(self) -> None:
        # Slot owns the normalisation (skip has no width; floats), so both compare alike
        slot = self.slot(0)
        object.__setattr__(self, "width", slot.width)
        object.__setattr__(self, "mlp_ratio", slot.mlp_ratio)

    @property
    def is_skip(self) -> bool:
        return self.op == SKIP

    def slot(self, stage: int) -> Slot:
        return Slot(self.op, self.width, self.mlp_ratio, stage)

    @classmethod
    def of(cls, slot: Slot) -> SlotChoice:
        return cls(slot.op, slot.width, slot.mlp_ratio)

    def token(self) -> str:
        # the same text as Slot.token(), so the Optuna value reads like the arch string
        return self.slot(0).token()

    def __str__(self) -> str:
        return self.token()


def slot_param(i: int) -> str:
    return f"slot{i}"


def stage_param(i: int) -> str:
    return f"stage{i}"


@dataclass(frozen=True)
class SearchChoices:
    """Per-slot choices and stages of a `SearchSpace`, with the Optuna encoding."""

    space: SearchSpace
    all_choices: tuple[SlotChoice, ...]  # the DP's choice axis, shared by all slots
    per_slot: tuple[tuple[SlotChoice, ...], ...]  # choices slot i may take at some allowed stage
    stages: tuple[tuple[int, ...], ...]  # stages slot i may sit at: (pattern[i],) or (0, 1)

    @classmethod
    def from_space(cls, space: SearchSpace) -> SearchChoices:
        blocks = [
            SlotChoice(op, w, r) for op in space.ops for w in space.widths for r in space.mlp_ratios
        ]
        all_choices = tuple(blocks) + ((SlotChoice(SKIP),) if space.skippable else ())
        _, _, h, w = space.latent
        even = (h // space.patch_size) % 2 == 0 and (w // space.patch_size) % 2 == 0
        if space.free_stages:
            # assumption: an odd token grid cannot be halved, so a free layout stays at full resolution
            stages = tuple((STAGES if even else (0,)) for _ in range(space.depth))
        else:
            stages = tuple((s,) for s in space.stage_pattern)
        per_slot = []
        for i in range(space.depth):
            ops = {op for s in stages[i] for op in space.ops_for(s)}
            allowed = [c for c in blocks if c.op in ops]
            if i in space.skippable:
                allowed.append(SlotChoice(SKIP))
            per_slot.append(tuple(allowed))
        return cls(space, all_choices, tuple(per_slot), stages)

    # ----- queries ---------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return self.space.depth

    def index(self, choice: SlotChoice) -> int:
        """Position of `choice` on the DP's choice axis."""
        try:
            return self.all_choices.index(choice)
        except ValueError:
            raise DitnasError(
                f"choice {choice.token()!r} is not in the search space; known: {[c.token() for c in self.all_choices]}"
            ) from None

    def allowed(self, i: int, choice: SlotChoice, stage: int) -> bool:
        """Whether slot i may run `choice` at `stage` (stage layout, skippable slots, stage_ops)."""
        if stage not in self.stages[i]:
            return False
        if choice.is_skip:
            return i in self.space.skippable
        return (
            choice.op in self.space.ops_for(stage)
            and choice.width in self.space.widths
            and choice.mlp_ratio in self.space.mlp_ratios
        )

    def mask(self) -> np.ndarray:
        """Bool array (slots, len(all_choices), 2): which (slot, choice, stage) cells a layout may use.

        The caller of the DP sets the latency of the False cells to inf.
        """
        out = np.zeros((self.depth, len(self.all_choices), len(STAGES)), dtype=bool)
        for i in range(self.depth):
            for o, choice in enumerate(self.all_choices):
                for r in STAGES:
                    out[i, o, r] = self.allowed(i, choice, r)
        return out

    # ----- Optuna encoding -------------------------------------------------------------------
    def distributions(self) -> dict[str, list[str]]:
        """Parameter name -> categorical values (plain strings; the caller wraps them for Optuna).

        The same names and value lists for every trial: `slot{i}` always, `stage{i}` when free.
        """
        out: dict[str, list[str]] = {slot_param(i): [c.token() for c in cs] for i, cs in enumerate(self.per_slot)}
        if self.space.free_stages:
            for i, stages in enumerate(self.stages):
                out[stage_param(i)] = [str(s) for s in stages]
        return out

    def encode(self, arch: Arch) -> dict[str, str]:
        """Arch -> Optuna parameters (the arch is validated first)."""
        self.space.validate(arch)
        params = {slot_param(i): SlotChoice.of(s).token() for i, s in enumerate(arch.slots)}
        if self.space.free_stages:
            params.update({stage_param(i): str(s.stage) for i, s in enumerate(arch.slots)})
        return params

    def decode(self, params: Mapping[str, str], *, base: Arch | None = None, source: str = "trial") -> Arch:
        """Optuna parameters -> Arch, validated by the space (invalid combinations raise DitnasError).

        `base` supplies the header (steps may differ from the space's); the space's globals otherwise.
        """
        slots = []
        for i in range(self.depth):
            token = _get(params, slot_param(i), source)
            choice = next((c for c in self.per_slot[i] if c.token() == token), None)
            if choice is None:
                raise DitnasError(
                    f"{source}: {slot_param(i)}={token!r} is not a choice of slot {i}; "
                    f"allowed: {[c.token() for c in self.per_slot[i]]}"
                )
            if self.space.free_stages:
                text = _get(params, stage_param(i), source)
                if text not in [str(s) for s in self.stages[i]]:
                    raise DitnasError(f"{source}: {stage_param(i)}={text!r}; use one of {[str(s) for s in self.stages[i]]}")
                stage = int(text)
            else:
                stage = self.stages[i][0]
            slots.append(choice.slot(stage))
        arch = (base or self.space.max_arch()).with_slots(slots)
        return self.space.validate(arch, source=source)


def _get(params: Mapping[str, str], name: str, source: str) -> str:
    if name not in params:
        raise DitnasError(f"{source}: parameter {name!r} is missing; every slot needs slot<i> (and stage<i> when free)")
    return str(params[name])
