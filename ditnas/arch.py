"""`Arch`: the one value that flows through every stage, and the search space it is drawn from.

An `Arch` is an immutable description of one sub-DiT: a fixed-length tuple of slots (one per block
position of the supernet; removed blocks are `skip` slots) plus the global shape of the model.

String form (round-trips exactly, `Arch.parse(str(a)) == a`):

    [patch=2 latent=1x1x16x16 classes=10 steps=28] sa:1:4*2 | ssa:0.5:3*2 | lcha:0.75:4 skip

- a slot is `op:width:mlp_ratio` (`width` multiplies the supernet's heads; `op` alone means width 1,
  MLP ratio 4), or `skip`; `*n` repeats a slot n times;
- `|` is a resolution change (2x2 down- or up-sampling): segments alternate full resolution (stage 0)
  and half resolution (stage 1), starting and ending at full resolution. An empty first segment means
  the first block already runs at half resolution; an empty last one that the last block does;
- the bracketed header is optional when parsing (defaults fill it in); `str()` always writes it.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ditnas.errors import DitnasError

TOKEN_MIXERS = ("sa", "gqa", "assa", "lcha", "ssa")
SKIP = "skip"
STAGES = (0, 1)  # full resolution, half resolution (one 2x2 down/up-sampling level)

DEFAULT_WIDTH = 1.0
DEFAULT_MLP_RATIO = 4.0  # DiT's standard FFN expansion


def _fmt(x: float) -> str:
    """Shortest exact text for a float ("1", "0.5", "0.375")."""
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


@dataclass(frozen=True)
class Slot:
    """One block position: its token mixer, width multiplier, MLP ratio and resolution stage."""

    op: str
    width: float = DEFAULT_WIDTH
    mlp_ratio: float = DEFAULT_MLP_RATIO
    stage: int = 0

    def __post_init__(self) -> None:
        if self.op == SKIP:
            # a skipped slot has no width; normalise so equal layouts compare equal
            object.__setattr__(self, "width", 0.0)
            object.__setattr__(self, "mlp_ratio", 0.0)
        object.__setattr__(self, "width", float(self.width))
        object.__setattr__(self, "mlp_ratio", float(self.mlp_ratio))

    @property
    def is_skip(self) -> bool:
        return self.op == SKIP

    def token(self) -> str:
        return SKIP if self.is_skip else f"{self.op}:{_fmt(self.width)}:{_fmt(self.mlp_ratio)}"


@dataclass(frozen=True)
class Arch:
    """One sub-DiT. Hashable; `key()` is a stable short hash for caches, tables and file names."""

    slots: tuple[Slot, ...]
    patch_size: int = 2
    latent: tuple[int, int, int, int] = (1, 1, 16, 16)  # (C, T, H, W)
    num_classes: int = 10  # class conditioning; 0 = unconditional
    steps: int = 28  # denoising steps at inference

    def __post_init__(self) -> None:
        object.__setattr__(self, "slots", tuple(self.slots))
        object.__setattr__(self, "latent", tuple(int(v) for v in self.latent))

    # ----- derived shape -------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Number of blocks that actually run (non-skip slots)."""
        return sum(not s.is_skip for s in self.slots)

    @property
    def stream_width(self) -> float:
        """Width of the residual stream: the widest block (narrower blocks use its leading features)."""
        widths = [s.width for s in self.slots if not s.is_skip]
        return max(widths) if widths else 1.0

    def grid(self, stage: int) -> tuple[int, int, int]:
        """Token grid (T, H, W) at a stage."""
        _, t, h, w = self.latent
        h, w = h // self.patch_size, w // self.patch_size
        return (t, h >> stage, w >> stage)

    def tokens(self, stage: int) -> int:
        t, h, w = self.grid(stage)
        return t * h * w

    # ----- text form -----------------------------------------------------------------------
    def header(self) -> str:
        c, t, h, w = self.latent
        return f"[patch={self.patch_size} latent={c}x{t}x{h}x{w} classes={self.num_classes} steps={self.steps}]"

    def layout(self) -> str:
        """The slot part of the string form, e.g. `sa:1:4*2 | ssa:0.5:3*2 | sa:1:4*2`."""
        segments: list[list[Slot]] = [[]]
        stage = 0
        for slot in self.slots:
            if slot.stage != stage:
                segments.append([])
                stage = slot.stage
            segments[-1].append(slot)
        if stage != 0:
            segments.append([])
        return " | ".join(_format_segment(seg) for seg in segments).strip()

    def __str__(self) -> str:
        return f"{self.header()} {self.layout()}"

    def key(self) -> str:
        """Stable across processes and machines (sha256 of the canonical string form)."""
        return hashlib.sha256(str(self).encode()).hexdigest()[:16]

    @classmethod
    def parse(cls, text: str, *, defaults: Arch | None = None, source: str = "arch") -> Arch:
        """Parse the string form; `defaults` supplies header fields that the text leaves out."""
        return _parse(text, defaults, source)

    def with_slots(self, slots: Sequence[Slot]) -> Arch:
        return replace(self, slots=tuple(slots))


def _format_segment(seg: list[Slot]) -> str:
    parts: list[str] = []
    i = 0
    while i < len(seg):
        j = i
        while j + 1 < len(seg) and seg[j + 1] == seg[i]:
            j += 1
        count = j - i + 1
        parts.append(seg[i].token() + (f"*{count}" if count > 1 else ""))
        i = j + 1
    return " ".join(parts)


_HEADER = re.compile(r"^\s*\[(?P<body>[^\]]*)\]\s*(?P<rest>.*)$", re.S)
_TOKEN = re.compile(r"^(?P<op>[a-z_]+)(?::(?P<width>[0-9.eE+-]+))?(?::(?P<mlp>[0-9.eE+-]+))?(?:\*(?P<n>\d+))?$")


def _parse(text: str, defaults: Arch | None, source: str) -> Arch:
    base = defaults or Arch(slots=())
    fields: dict = {}
    m = _HEADER.match(text)
    rest = text
    if m:
        rest = m.group("rest")
        for item in m.group("body").split():
            key, _, value = item.partition("=")
            try:
                if key == "patch":
                    fields["patch_size"] = int(value)
                elif key == "latent":
                    fields["latent"] = tuple(int(v) for v in value.split("x"))
                    if len(fields["latent"]) != 4:
                        raise ValueError
                elif key == "classes":
                    fields["num_classes"] = int(value)
                elif key == "steps":
                    fields["steps"] = int(value)
                else:
                    raise DitnasError(
                        f"{source}: unknown header field {key!r}; allowed: patch, latent (CxTxHxW), classes, steps"
                    )
            except ValueError:
                raise DitnasError(f"{source}: header field {item!r} is malformed; e.g. patch=2 latent=1x1x16x16") from None
    elif "[" in text or "]" in text:
        raise DitnasError(f"{source}: unbalanced '[' ... ']' header in {text!r}")

    segments = rest.split("|")
    if len(segments) % 2 == 0:
        raise DitnasError(
            f"{source}: layout {rest.strip()!r} ends at half resolution ({len(segments) - 1} '|'); "
            "add a final '|' so the model returns to full resolution"
        )
    slots: list[Slot] = []
    for index, segment in enumerate(segments):
        stage = index % 2
        tokens = segment.split()
        if not tokens and 0 < index < len(segments) - 1:
            raise DitnasError(f"{source}: empty segment between two '|' (segment {index}) in {rest.strip()!r}")
        for token in tokens:
            tm = _TOKEN.match(token)
            if not tm:
                raise DitnasError(
                    f"{source}: cannot read slot {token!r}; write op:width:mlp_ratio[*count], e.g. lcha:0.5:4*2, or skip"
                )
            op = tm.group("op")
            if op != SKIP and op not in TOKEN_MIXERS:
                raise DitnasError(f"{source}: unknown op {op!r} in {token!r}; known: {', '.join(TOKEN_MIXERS + (SKIP,))}")
            try:
                width = float(tm.group("width")) if tm.group("width") else DEFAULT_WIDTH
                mlp = float(tm.group("mlp")) if tm.group("mlp") else DEFAULT_MLP_RATIO
            except ValueError:
                raise DitnasError(f"{source}: slot {token!r} has a malformed number") from None
            if op != SKIP and not (math.isfinite(width) and width > 0 and math.isfinite(mlp) and mlp > 0):
                raise DitnasError(f"{source}: slot {token!r} needs a positive width and MLP ratio")
            count = int(tm.group("n") or 1)
            if count < 1:
                raise DitnasError(f"{source}: slot {token!r} repeats {count} times; use *1 or more")
            slots.extend([Slot(op, width, mlp, stage)] * count)
    if not slots:
        raise DitnasError(f"{source}: layout {text!r} has no slots; e.g. 'sa:1:4*4'")
    return replace(base, slots=tuple(slots), **fields)


@dataclass(frozen=True)
class SearchSpace:
    """What can be chosen: per slot the op, width, MLP ratio, skip, and the resolution stage layout.

    The supernet is built from a space (it holds every op of `ops` in every slot) and runs every Arch
    that `validate` accepts.
    """

    depth: int = 6
    ops: tuple[str, ...] = TOKEN_MIXERS  # the first one is the reference op of the max arch
    widths: tuple[float, ...] = (0.5, 0.75, 1.0)
    mlp_ratios: tuple[float, ...] = (2.0, 3.0, 4.0)
    skippable: tuple[int, ...] = ()  # slots that may be skipped (elastic depth)
    stage_pattern: tuple[int, ...] = ()  # stage of each slot in the max arch; () = all full resolution
    free_stages: bool = False  # if True, any stage layout is allowed and sampled
    patch_size: int = 2
    latent: tuple[int, int, int, int] = (1, 1, 16, 16)
    num_classes: int = 10
    steps: int = 28
    stage_ops: dict[int, tuple[str, ...]] = field(default_factory=dict)  # optional per-stage op subsets

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", tuple(self.ops))
        object.__setattr__(self, "widths", tuple(sorted(float(w) for w in self.widths)))
        object.__setattr__(self, "mlp_ratios", tuple(sorted(float(r) for r in self.mlp_ratios)))
        object.__setattr__(self, "skippable", tuple(sorted(int(i) for i in self.skippable)))
        pattern = tuple(int(s) for s in self.stage_pattern) or (0,) * self.depth
        object.__setattr__(self, "stage_pattern", pattern)
        object.__setattr__(self, "latent", tuple(int(v) for v in self.latent))
        object.__setattr__(self, "stage_ops", {int(k): tuple(v) for k, v in dict(self.stage_ops).items()})
        problems = []
        if self.depth < 1:
            problems.append(f"depth {self.depth} must be >= 1")
        if len(pattern) != self.depth:
            problems.append(f"stage_pattern has {len(pattern)} entries for depth {self.depth}")
        if any(s not in STAGES for s in pattern):
            problems.append(f"stage_pattern entries must be 0 or 1, got {list(pattern)}")
        unknown = [op for op in self.ops if op not in TOKEN_MIXERS]
        if unknown or not self.ops:
            problems.append(f"ops {unknown or '[]'} unknown; choose from {list(TOKEN_MIXERS)}")
        if not self.widths or any(not 0 < w <= 1 for w in self.widths) or self.widths[-1] != 1.0:
            problems.append(f"widths {list(self.widths)} must lie in (0, 1] and include 1.0")
        if not self.mlp_ratios or any(r <= 0 for r in self.mlp_ratios):
            problems.append(f"mlp_ratios {list(self.mlp_ratios)} must be positive")
        if any(not 0 <= i < self.depth for i in self.skippable):
            problems.append(f"skippable slots {list(self.skippable)} outside 0..{self.depth - 1}")
        for stage, subset in self.stage_ops.items():
            if any(op not in self.ops for op in subset) or not subset:
                problems.append(f"stage_ops[{stage}] = {list(subset)} must be a non-empty subset of ops")
        if problems:
            raise DitnasError("search space: " + "; ".join(problems))

    # ----- the reference points ----------------------------------------------------------------
    def _base(self, slots: Sequence[Slot]) -> Arch:
        return Arch(tuple(slots), self.patch_size, self.latent, self.num_classes, self.steps)

    def ops_for(self, stage: int) -> tuple[str, ...]:
        return self.stage_ops.get(stage, self.ops)

    def max_arch(self) -> Arch:
        """Every slot at its stage's reference op, full width and the largest MLP ratio."""
        return self._base(
            Slot(self.ops_for(s)[0], 1.0, self.mlp_ratios[-1], s) for s in self.stage_pattern
        )

    def min_arch(self) -> Arch:
        """Skippable slots skipped; the rest at the stage's last-listed op, least width and MLP ratio."""
        return self._base(
            Slot(SKIP, stage=s) if i in self.skippable else Slot(self.ops_for(s)[-1], self.widths[0], self.mlp_ratios[0], s)
            for i, s in enumerate(self.stage_pattern)
        )

    def narrowest_arch(self) -> Arch:
        """The max arch with every slot at the smallest width (SnapGen++'s "tiny" point of the supernet)."""
        return self._base(Slot(s.op, self.widths[0], s.mlp_ratio, s.stage) for s in self.max_arch().slots)

    def mid_arch(self) -> Arch:
        """No skips; every slot at the middle op of its stage, the middle width and MLP ratio."""
        mid = lambda values: values[len(values) // 2]  # noqa: E731
        return self._base(Slot(mid(self.ops_for(s)), mid(self.widths), mid(self.mlp_ratios), s) for s in self.stage_pattern)

    def sample(self, rng: random.Random) -> Arch:
        """A uniformly random arch (each choice independent; stage layout sampled when free)."""
        stages = self._sample_stages(rng) if self.free_stages else self.stage_pattern
        slots = []
        for i, stage in enumerate(stages):
            if i in self.skippable and rng.random() < 1.0 / (len(self.ops_for(stage)) + 1):
                slots.append(Slot(SKIP, stage=stage))
                continue
            slots.append(
                Slot(rng.choice(self.ops_for(stage)), rng.choice(self.widths), rng.choice(self.mlp_ratios), stage)
            )
        return self._base(slots)

    def _sample_stages(self, rng: random.Random) -> tuple[int, ...]:
        # assumption: layouts with few transitions are the useful ones; a Markov chain that switches
        # resolution with probability 0.25 between slots covers one- to three-stage sandwiches.
        stages, stage = [], 0
        for _ in range(self.depth):
            if rng.random() < 0.25:
                stage = 1 - stage
            stages.append(stage)
        return tuple(stages)

    # ----- validation ------------------------------------------------------------------------
    def validate(self, arch: Arch, *, source: str = "arch") -> Arch:
        """Raise DitnasError naming the first field of `arch` the space cannot run; return arch."""
        if len(arch.slots) != self.depth:
            raise DitnasError(
                f"{source}: {len(arch.slots)} slots but the supernet has {self.depth}; pad with 'skip' or drop slots"
            )
        for name in ("patch_size", "latent", "num_classes"):
            if getattr(arch, name) != getattr(self, name):
                raise DitnasError(
                    f"{source}: {name}={getattr(arch, name)} but the supernet was built for {getattr(self, name)}"
                )
        if arch.steps < 1:
            raise DitnasError(f"{source}: steps={arch.steps} must be >= 1")
        if not self.free_stages and tuple(s.stage for s in arch.slots) != self.stage_pattern:
            raise DitnasError(
                f"{source}: stage layout {[s.stage for s in arch.slots]} differs from the space's fixed "
                f"{list(self.stage_pattern)}; keep the '|' positions of the max arch: {self.max_arch().layout()}"
            )
        _, _, h, w = self.latent
        if (h // self.patch_size) % 2 or (w // self.patch_size) % 2:
            if any(s.stage == 1 for s in arch.slots):
                raise DitnasError(f"{source}: half-resolution slots need an even token grid; latent {self.latent}")
        for i, slot in enumerate(arch.slots):
            where = f"{source}: slot {i} ({slot.token()})"
            if slot.is_skip:
                if i not in self.skippable:
                    raise DitnasError(f"{where}: slot {i} cannot be skipped; skippable slots: {list(self.skippable)}")
                continue
            if slot.op not in self.ops_for(slot.stage):
                raise DitnasError(f"{where}: op {slot.op!r} not allowed at stage {slot.stage}; allowed: {list(self.ops_for(slot.stage))}")
            if slot.width not in self.widths:
                raise DitnasError(f"{where}: width {_fmt(slot.width)} not in the space; use one of {[_fmt(w) for w in self.widths]}")
            if slot.mlp_ratio not in self.mlp_ratios:
                raise DitnasError(
                    f"{where}: MLP ratio {_fmt(slot.mlp_ratio)} not in the space; use one of {[_fmt(r) for r in self.mlp_ratios]}"
                )
        if arch.depth == 0:
            raise DitnasError(f"{source}: every slot is skipped; keep at least one block")
        return arch

    def parse(self, text: str, *, source: str = "arch") -> Arch:
        """Parse an arch string with this space's globals as defaults, then validate it."""
        return self.validate(Arch.parse(text, defaults=self._base(()), source=source), source=source)

    # ----- (de)serialisation: the one JSON form of a space (checkpoints, tables, predictors, caches) ----
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (lists, string keys for `stage_ops`); `from_dict(to_dict())` is the same space."""
        d = asdict(self)
        d["stage_ops"] = {str(k): list(v) for k, v in self.stage_ops.items()}  # JSON keys are strings
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "search space") -> SearchSpace:
        """Inverse of `to_dict`; also reads the `dataclasses.asdict` form older checkpoints recorded."""
        if not isinstance(d, dict):
            raise DitnasError(f"{source}: the search space must be a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DitnasError(f"{source}: unknown search-space field(s) {unknown}; known: {sorted(known)}")
        raw = dict(d)
        try:
            raw["stage_ops"] = {int(k): tuple(v) for k, v in dict(raw.get("stage_ops") or {}).items()}
            for name in ("ops", "widths", "mlp_ratios", "skippable", "stage_pattern", "latent"):
                if name in raw:
                    raw[name] = tuple(raw[name])
            return cls(**raw)
        except (TypeError, ValueError) as exc:
            raise DitnasError(f"{source}: not a valid search space ({exc}); rebuild the file that holds it") from None

    def key(self) -> str:
        """Stable short hash of `to_dict()` (sensitivity caches, table/predictor manifests)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def named_archs(self) -> dict[str, Arch]:
        """The reference points a user can name instead of writing a layout."""
        return {"max": self.max_arch(), "mid": self.mid_arch(), "min": self.min_arch(),
                "narrowest": self.narrowest_arch(), "min-width": self.narrowest_arch()}


ARCH_NAMES = ("max", "mid", "min", "narrowest", "min-width")


def _strip_comment(line: str) -> str:
    return line.split("#", 1)[0].strip()


def resolve_archs(space: SearchSpace, text: str, *, source: str = "--arch") -> list[Arch]:
    """Every arch `text` names, validated against `space`: a name (max, mid, min, narrowest/min-width),
    a layout string, or a file holding one name or layout per line (`#` starts a comment)."""
    text = str(text)
    path = Path(text)
    if len(text) < 255 and "\n" not in text and path.is_file():
        lines = [_strip_comment(ln) for ln in path.read_text().splitlines()]
        lines = [ln for ln in lines if ln]
        if not lines:
            raise DitnasError(f"arch file {path} holds no layout (only comments or blank lines); "
                              f"write one layout string per line, e.g. 'sa:1:4*6', or a name: {', '.join(ARCH_NAMES)}")
        return [_resolve_one(space, line, f"{path}:{i + 1}") for i, line in enumerate(lines)]
    line = _strip_comment(text)
    if not line:
        raise DitnasError(f"{source}: empty arch; give a layout such as 'sa:1:4*6', a name ({', '.join(ARCH_NAMES)}) "
                          "or a file holding one")
    return [_resolve_one(space, line, source)]


def resolve_arch(space: SearchSpace, text: str, *, source: str = "--arch") -> Arch:
    """The one arch `text` names (see `resolve_archs`); a file with several layouts is an error."""
    archs = resolve_archs(space, text, source=source)
    if len(archs) > 1:
        raise DitnasError(f"arch file {text} holds {len(archs)} layouts where one is expected; "
                          "keep one line or comment the others out with '#'")
    return archs[0]


def _resolve_one(space: SearchSpace, text: str, source: str) -> Arch:
    named = space.named_archs()
    if text in named:
        return named[text]
    if re.fullmatch(r"[a-z-]+", text) and text not in TOKEN_MIXERS and text != SKIP:
        raise DitnasError(f"{source}: {text!r} is not an arch name of the space; names: {', '.join(ARCH_NAMES)}, "
                          "or write a layout such as 'sa:1:4*6'")
    return space.parse(text, source=source)
