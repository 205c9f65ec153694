"""Standalone programs to profile: one nn.Module + example inputs per latency-table cell.

A cell is what a latency table is keyed by: `kind` (block, patch_embed, final, down, up, model),
the block's token mixer `op`, `width` multiplier, `mlp_ratio`, token count and resolution `stage`.
Every program is a plain module whose forward takes tensors only (so `torch.export` and every
backend can run it) and computes exactly the piece of `SubDiT.forward` it stands for: chaining
patch_embed -> blocks (+ down/up) -> final reproduces a SubDiT (tested), which is what makes
block sums a meaningful first-order predictor.

Pieces are cut from an `ElasticDiT` with the same slicing rules `SubDiT` uses (`sliced()` for the
mixer, cross-attention and FFN; a copy of the per-width modulation Linear), so a trained or a
fresh supernet both work; latency does not depend on the weight values.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ditnas.arch import Arch, SearchSpace, Slot
from ditnas.errors import DitnasError
from ditnas.supernet.model import (
    Block,
    ElasticDiT,
    SubDiT,
    merge_2x2,
    modulate,
    patchify,
    split_2x2,
    timestep_embedding,
    unpatchify,
)
from ditnas.supernet.ops import layer_norm

KINDS = ("block", "patch_embed", "final", "down", "up", "model")

# a cell's columns in samples and tables: column -> pandas dtype, in order
CELL_SCHEMA: dict[str, str] = {
    "key": "string",
    "kind": "string",
    "op": "string",
    "width": "float64",
    "mlp_ratio": "float64",
    "tokens": "int64",
    "stage": "int64",
    "arch": "string",
}
Grid = tuple[int, int, int]


def _fmt(x: float) -> str:
    text = repr(float(x))
    return text.removesuffix(".0")


@dataclass(frozen=True)
class Cell:
    """One latency-table key. Non-block kinds leave `op` empty and `mlp_ratio` 0; `width` is then the
    residual-stream width (the widest block of the arch). `model` cells carry the arch string."""

    kind: str
    op: str = ""
    width: float = 1.0
    mlp_ratio: float = 0.0
    tokens: int = 0
    stage: int = 0
    arch: str = ""  # only for kind == "model": str(Arch)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DitnasError(f"program cell: unknown kind {self.kind!r}; known: {', '.join(KINDS)}")
        object.__setattr__(self, "width", float(self.width))
        object.__setattr__(self, "mlp_ratio", float(self.mlp_ratio))

    def key(self) -> str:
        """Stable, human-readable key, e.g. `block:sa:w0.5:r4:n64:s0` or `model:<arch sha>:n64`."""
        if self.kind == "model":
            return f"model:{Arch.parse(self.arch).key()}:n{self.tokens}"
        if self.kind == "block":
            return f"block:{self.op}:w{_fmt(self.width)}:r{_fmt(self.mlp_ratio)}:n{self.tokens}:s{self.stage}"
        return f"{self.kind}:w{_fmt(self.width)}:n{self.tokens}:s{self.stage}"

    @classmethod
    def from_fields(cls, row: dict) -> Cell:
        """The cell of one samples/table row (the inverse of `fields`; missing strings read as empty)."""
        text = {name: row.get(name) if isinstance(row.get(name), str) else "" for name in ("op", "arch")}
        return cls(row["kind"], text["op"], float(row["width"]), float(row["mlp_ratio"]), int(row["tokens"]),
                   int(row["stage"]), text["arch"])

    def fields(self) -> dict:
        """The cell as flat columns for a samples table."""
        return {
            "key": self.key(),
            "kind": self.kind,
            "op": self.op,
            "width": self.width,
            "mlp_ratio": self.mlp_ratio,
            "tokens": self.tokens,
            "stage": self.stage,
            "arch": self.arch,
        }


@dataclass
class Program:
    """A module to profile and the inputs to run it on (batch 1, fp32, fixed shapes)."""

    cell: Cell
    module: nn.Module
    inputs: tuple[Tensor, ...]
    name: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.name = self.name or self.cell.key()

    # the cell fields, for convenience
    kind = property(lambda self: self.cell.kind)
    op = property(lambda self: self.cell.op)
    width = property(lambda self: self.cell.width)
    mlp_ratio = property(lambda self: self.cell.mlp_ratio)
    tokens = property(lambda self: self.cell.tokens)
    stage = property(lambda self: self.cell.stage)

    def key(self) -> str:
        return self.cell.key()

    @torch.no_grad()
    def eager(self) -> Tensor | tuple[Tensor, ...]:
        return self.module(*self.inputs)


# ----------------------------------------------------------------------------------------------
# cells of a space
# ----------------------------------------------------------------------------------------------
def _grid(space: SearchSpace, stage: int) -> Grid:
    _, t, h, w = space.latent
    return (t, (h // space.patch_size) >> stage, (w // space.patch_size) >> stage)


def _tokens(space: SearchSpace, stage: int) -> int:
    t, h, w = _grid(space, stage)
    return t * h * w


def space_stages(space: SearchSpace) -> tuple[int, ...]:
    """Stages some arch of the space can run a block at."""
    if space.free_stages:
        _, _, h, w = space.latent
        even = (h // space.patch_size) % 2 == 0 and (w // space.patch_size) % 2 == 0
        return (0, 1) if even else (0,)
    return tuple(sorted(set(space.stage_pattern)))


def cells_for_space(space: SearchSpace, kinds: Sequence[str] = ("block", "patch_embed", "final", "down", "up")) -> list[Cell]:
    """Every cell an arch of `space` can produce: op x width x MLP ratio x stage blocks, plus the
    patch embedding, final layer and 2x2 transitions at every stream width. Deterministic order."""
    unknown = [k for k in kinds if k not in KINDS or k == "model"]
    if unknown:
        raise DitnasError(f"cells_for_space: kinds {unknown} unknown; choose from {[k for k in KINDS if k != 'model']}")
    stages = space_stages(space)
    cells: list[Cell] = []
    if "block" in kinds:
        for stage in stages:
            for op in space.ops_for(stage):
                for width in space.widths:
                    for ratio in space.mlp_ratios:
                        cells.append(Cell("block", op, width, ratio, _tokens(space, stage), stage))
    # assumption: the stream can be as wide as any width of the space (it is the arch's widest block)
    for width in space.widths:
        if "patch_embed" in kinds:
            cells.append(Cell("patch_embed", width=width, tokens=_tokens(space, 0), stage=0))
        if "final" in kinds:
            cells.append(Cell("final", width=width, tokens=_tokens(space, 0), stage=0))
        if 1 in stages:
            if "down" in kinds:
                cells.append(Cell("down", width=width, tokens=_tokens(space, 0), stage=0))
            if "up" in kinds:
                cells.append(Cell("up", width=width, tokens=_tokens(space, 1), stage=1))
    return cells


def cells_for_arch(space: SearchSpace, arch: Arch) -> list[Cell]:
    """The cells whose sum prices `arch` (one per block, transition, plus embed and final)."""
    space.validate(arch)
    stream = arch.stream_width
    cells = [Cell("patch_embed", width=stream, tokens=_tokens(space, 0), stage=0)]
    stage = 0
    for slot in arch.slots:
        if slot.stage != stage:
            cells.append(_transition_cell(space, stream, slot.stage))
            stage = slot.stage
        if not slot.is_skip:
            cells.append(Cell("block", slot.op, slot.width, slot.mlp_ratio, _tokens(space, slot.stage), slot.stage))
    if stage != 0:
        cells.append(_transition_cell(space, stream, 0))
    cells.append(Cell("final", width=stream, tokens=_tokens(space, 0), stage=0))
    return cells


def _transition_cell(space: SearchSpace, stream: float, to: int) -> Cell:
    if to == 1:
        return Cell("down", width=stream, tokens=_tokens(space, 0), stage=0)
    return Cell("up", width=stream, tokens=_tokens(space, 1), stage=1)


# ----------------------------------------------------------------------------------------------
# wrappers: forward takes tensors only
# ----------------------------------------------------------------------------------------------
class BlockProgram(nn.Module):
    """One standalone DiT block at one op/width/MLP ratio on a fixed grid: forward(x, c, ctx)."""

    def __init__(self, block: Block, op: str, grid: Grid) -> None:
        super().__init__()
        self.block, self.op, self.grid = block, op, tuple(grid)

    def forward(self, x: Tensor, c: Tensor, ctx: Tensor) -> Tensor:
        return self.block(x, c, ctx, self.grid, self.op, None, None, "own")


class PatchEmbedProgram(nn.Module):
    """patchify + patch Linear + conditioning (timestep MLP, class embeddings): forward(x, t, y) ->
    (tokens, c, ctx). # assumption: conditioning is priced with the embedding (it runs once per step)."""

    def __init__(self, sub: SubDiT) -> None:
        super().__init__()
        self.patch_size = sub.patch_size
        self.patch, self.t_mlp, self.y_embed, self.ctx_embed = sub.patch, sub.t_mlp, sub.y_embed, sub.ctx_embed

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        tokens, _ = patchify(x, self.patch_size)
        # as SubDiT._condition (the composition test keeps the two equal)
        c = self.t_mlp(timestep_embedding(t, self.t_mlp[0].in_features)) + self.y_embed(y)
        ctx = self.ctx_embed(y).reshape(y.shape[0], -1, self.y_embed.embedding_dim)
        return self.patch(tokens), c, ctx


class FinalProgram(nn.Module):
    """adaLN final layer + output Linear + unpatchify: forward(h, c) -> velocity (B, C, T, H, W)."""

    def __init__(self, sub: SubDiT, grid: Grid) -> None:
        super().__init__()
        self.final_mod, self.final = sub.final_mod, sub.final
        self.stream, self.grid, self.patch_size, self.channels = sub.stream, tuple(grid), sub.patch_size, sub.channels

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        m = self.final_mod(F.silu(c)).reshape(c.shape[0], 1, 2 * self.stream)
        h = modulate(layer_norm(h), m[..., : self.stream], m[..., self.stream :])
        return unpatchify(self.final(h), self.grid, self.patch_size, self.channels)


class DownProgram(nn.Module):
    """2x2 patch-merge + Linear to half resolution: forward(h) on the full-resolution grid."""

    def __init__(self, down: nn.Linear, grid: Grid) -> None:
        super().__init__()
        self.down, self.grid = down, tuple(grid)

    def forward(self, h: Tensor) -> Tensor:
        merged, _ = merge_2x2(h, self.grid)
        return self.down(merged)


class UpProgram(nn.Module):
    """Linear + pixel-shuffle back to full resolution + the U-Net long skip: forward(h, saved)."""

    def __init__(self, up: nn.Linear, grid: Grid) -> None:
        super().__init__()
        self.up, self.grid = up, tuple(grid)

    def forward(self, h: Tensor, saved: Tensor) -> Tensor:
        out, _ = split_2x2(self.up(h), self.grid)
        return out + saved


class ModelProgram(nn.Module):
    """A whole SubDiT velocity call: forward(x, t, y) (the additivity check of block sums).

    Runs SubDiT.forward as is (every tensor has at most 6 dims, so XNNPACK loads it).
    """

    def __init__(self, sub: SubDiT) -> None:
        super().__init__()
        self.sub = sub

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.sub(x, t, y)


# ----------------------------------------------------------------------------------------------
# builders
# ----------------------------------------------------------------------------------------------
def _frozen(module: nn.Module) -> nn.Module:
    # no autograd state: export then sees constants, which constant_prop_pass can fold
    return module.eval().requires_grad_(False)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _model_inputs(space: SearchSpace, seed: int = 0, batch: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    g = _gen(seed)
    x = torch.randn((batch, *space.latent), generator=g)
    t = torch.rand((batch,), generator=g)
    y = torch.randint(0, max(space.num_classes, 1), (batch,), generator=g)
    return x, t, y


def _reference_sub(supernet: ElasticDiT, width: float, need_half: bool = False) -> SubDiT:
    """A SubDiT whose stream is `width` wide: the source of embed/final/transition weights."""
    space = supernet.space
    stages = list(space.stage_pattern)
    if need_half and 1 not in stages:
        if not space.free_stages:
            raise DitnasError(f"the space's stage layout {stages} never goes to half resolution; no down/up cells")
        stages[-1] = 1  # any layout is valid in a free-stage space
    slots = [Slot(space.ops_for(s)[0], width, space.mlp_ratios[-1], s) for s in stages]
    return supernet.extract(space.max_arch().with_slots(slots))


def _block_module(supernet: ElasticDiT, cell: Cell) -> Block:
    space = supernet.space
    # assumption: latency does not depend on which slot's weights are used; take the first slot of
    # the cell's stage (slot 0 when the layout is free or has none) so the weights are real ones
    index = next((i for i, s in enumerate(space.stage_pattern) if s == cell.stage), 0)
    sblock = supernet.blocks[index]
    if cell.op not in sblock.mixers:
        raise DitnasError(f"block cell {cell.key()}: op {cell.op!r} not in the supernet's ops {list(sblock.mixers)}")
    heads = supernet.heads_for(cell.width)
    d = heads * supernet.head_dim
    hidden = round(cell.mlp_ratio * d)
    with torch.no_grad():
        return Block(
            {cell.op: sblock.mixers[cell.op].sliced(heads)},
            sblock.cross.sliced(heads),
            sblock.ffn.sliced(d, hidden),
            {"own": copy.deepcopy(sblock.mod[f"h{heads}"])},
        )


def _stream_dim(supernet: ElasticDiT, width: float) -> int:
    return supernet.heads_for(width) * supernet.head_dim


def build_program(supernet: ElasticDiT, cell: Cell, *, seed: int = 0, batch: int = 1) -> Program:
    """The standalone program of one cell, with deterministic random example inputs."""
    space, cfg = supernet.space, supernet.cfg
    g = _gen(seed)
    cond = torch.randn(batch, cfg.cond_dim, generator=g)
    ctx = torch.randn(batch, cfg.cond_tokens, cfg.cond_dim, generator=g)
    if cell.kind == "model":
        arch = space.parse(cell.arch, source=f"model cell {cell.key()}")
        module: nn.Module = ModelProgram(supernet.extract(arch))
        inputs: tuple[Tensor, ...] = _model_inputs(space, seed, batch)
    elif cell.kind == "block":
        grid = _grid(space, cell.stage)
        d = _stream_dim(supernet, cell.width)
        module = BlockProgram(_block_module(supernet, cell), cell.op, grid)
        inputs = (torch.randn(batch, cell.tokens, d, generator=g), cond, ctx)
    elif cell.kind == "patch_embed":
        module = PatchEmbedProgram(_reference_sub(supernet, cell.width))
        inputs = _model_inputs(space, seed, batch)
    elif cell.kind == "final":
        module = FinalProgram(_reference_sub(supernet, cell.width), _grid(space, 0))
        inputs = (torch.randn(batch, cell.tokens, _stream_dim(supernet, cell.width), generator=g), cond)
    elif cell.kind == "down":
        sub = _reference_sub(supernet, cell.width, need_half=True)
        module = DownProgram(sub.down, _grid(space, 0))
        inputs = (torch.randn(batch, cell.tokens, _stream_dim(supernet, cell.width), generator=g),)
    else:  # up
        sub = _reference_sub(supernet, cell.width, need_half=True)
        d = _stream_dim(supernet, cell.width)
        module = UpProgram(sub.up, _grid(space, 1))
        inputs = (
            torch.randn(batch, cell.tokens, d, generator=g),
            torch.randn(batch, 4 * cell.tokens, d, generator=g),
        )
    module = _frozen(module)
    with torch.no_grad():
        # run once eagerly: RoPE / BNA constant tables are then cached as real tensors, so export
        # lifts them as constants instead of tracing their float64 construction into the graph
        # (measured: otherwise ~45 arange/pow/cos/sin nodes stay outside the XNNPACK delegate)
        module(*inputs)
    return Program(cell, module, inputs, meta={"batch": batch, "seed": seed})


def programs_for_cells(supernet: ElasticDiT, cells: Iterable[Cell], *, seed: int = 0, batch: int = 1) -> list[Program]:
    return [build_program(supernet, cell, seed=seed, batch=batch) for cell in cells]


def block_programs(supernet: ElasticDiT, cells: Iterable[Cell] | None = None, *, seed: int = 0) -> list[Program]:
    """One standalone block program per block cell (all block cells of the space when None)."""
    cells = cells_for_space(supernet.space, kinds=("block",)) if cells is None else list(cells)
    bad = [c.key() for c in cells if c.kind != "block"]
    if bad:
        raise DitnasError(f"block_programs: cells {bad} are not blocks; use programs_for_cells for other kinds")
    return programs_for_cells(supernet, cells, seed=seed)


def model_cell(supernet: ElasticDiT, arch: Arch) -> Cell:
    supernet.space.validate(arch)
    return Cell("model", width=arch.stream_width, tokens=_tokens(supernet.space, 0), stage=0, arch=str(arch))


def model_program(supernet: ElasticDiT, arch: Arch, *, seed: int = 0) -> Program:
    """A whole SubDiT forward(x, t, y) of `arch` for whole-model (additivity) measurement."""
    return build_program(supernet, model_cell(supernet, arch), seed=seed)


def with_inputs(program: Program, inputs: tuple[Tensor, ...]) -> Program:
    """The same program on other inputs (e.g. real latents for a parity check)."""
    return replace(program, inputs=tuple(inputs))
