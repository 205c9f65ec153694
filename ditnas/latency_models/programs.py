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

import pandas as pd
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

# stream_block: one block's causal `step` on a chunk of frames with a cache of `context` earlier frames
KINDS = ("block", "patch_embed", "final", "down", "up", "model", "stream_block")

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
    "context": "int64",
}
Grid = tuple[int, int, int]


def with_context(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of a table or samples file written before stream_block cells existed: context 0 (none)."""
    return df if "context" in df.columns else df.assign(context=0)


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
    context: int = 0  # only for kind == "stream_block": frames already in the cache before the chunk

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
        if self.kind == "stream_block":
            return (f"stream_block:{self.op}:w{_fmt(self.width)}:r{_fmt(self.mlp_ratio)}:n{self.tokens}:s{self.stage}"
                    f":c{self.context}")
        return f"{self.kind}:w{_fmt(self.width)}:n{self.tokens}:s{self.stage}"

    @classmethod
    def from_fields(cls, row: dict) -> Cell:
        """The cell of one samples/table row (the inverse of `fields`; missing strings read as empty)."""
        text = {name: row.get(name) if isinstance(row.get(name), str) else "" for name in ("op", "arch")}
        context = row.get("context", 0)
        return cls(row["kind"], text["op"], float(row["width"]), float(row["mlp_ratio"]), int(row["tokens"]),
                   int(row["stage"]), text["arch"], 0 if pd.isna(context) else int(context))

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
            "context": self.context,
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
def _grid(space: SearchSpace, stage: int, frames: int | None = None) -> Grid:
    """The token grid (T, H, W) at `stage`; `frames` (a streamed chunk's) replaces the clip's T."""
    _, t, h, w = space.latent
    return (t if frames is None else frames, (h // space.patch_size) >> stage, (w // space.patch_size) >> stage)


def _tokens(space: SearchSpace, stage: int, frames: int | None = None) -> int:
    t, h, w = _grid(space, stage, frames)
    return t * h * w


def _cell_grid(space: SearchSpace, cell: Cell) -> Grid:
    """The grid of a cell's tokens: whole clip, or the chunk of frames a stream cell runs on."""
    _, h, w = _grid(space, cell.stage)
    return (cell.tokens // (h * w), h, w)


def stream_positions(space: SearchSpace, chunk: int) -> tuple[int, ...]:
    """The first frame t0 of every chunk of a clip streamed `chunk` latent frames at a time."""
    from ditnas.video_data import check_chunking

    frames = space.latent[1]
    check_chunking(frames, chunk)
    return tuple(range(0, frames, chunk))


def space_stages(space: SearchSpace) -> tuple[int, ...]:
    """Stages some arch of the space can run a block at."""
    if space.free_stages:
        _, _, h, w = space.latent
        even = (h // space.patch_size) % 2 == 0 and (w // space.patch_size) % 2 == 0
        return (0, 1) if even else (0,)
    return tuple(sorted(set(space.stage_pattern)))


def cells_for_space(space: SearchSpace, kinds: Sequence[str] = ("block", "patch_embed", "final", "down", "up"), *,
                    chunk: int | None = None, positions: str = "all") -> list[Cell]:
    """Every cell an arch of `space` can produce: op x width x MLP ratio x stage blocks, plus the
    patch embedding, final layer and 2x2 transitions at every stream width. Deterministic order.

    With `chunk` (streaming a clip `chunk` latent frames at a time): the cells of one chunk call instead,
    at the chunk's tokens, a `stream_block` per block and chunk position (`context` = frames cached before it);
    `positions="ends"`: only the first and last positions (the predictor interpolates between them, linear in context)."""
    unknown = [k for k in kinds if k not in KINDS or k in ("model", "stream_block")]
    if unknown:
        raise DitnasError(f"cells_for_space: kinds {unknown} unknown; choose from "
                          f"{[k for k in KINDS if k not in ('model', 'stream_block')]}")
    stages = space_stages(space)
    if positions not in ("all", "ends"):
        raise DitnasError(f"cells_for_space: positions={positions!r}; choose all or ends")
    contexts = (0,) if chunk is None else stream_positions(space, chunk)
    contexts = tuple(sorted({contexts[0], contexts[-1]})) if positions == "ends" else contexts
    cells: list[Cell] = []
    if "block" in kinds:
        for stage in stages:
            for op in space.ops_for(stage):
                for width in space.widths:
                    for ratio in space.mlp_ratios:
                        for t0 in contexts:
                            cells.append(_block_cell(op, width, ratio, _tokens(space, stage, chunk), stage, chunk, t0))
    # assumption: the stream can be as wide as any width of the space (it is the arch's widest block)
    for width in space.widths:
        if "patch_embed" in kinds:
            cells.append(Cell("patch_embed", width=width, tokens=_tokens(space, 0, chunk), stage=0))
        if "final" in kinds:
            cells.append(Cell("final", width=width, tokens=_tokens(space, 0, chunk), stage=0))
        if 1 in stages:
            if "down" in kinds:
                cells.append(Cell("down", width=width, tokens=_tokens(space, 0, chunk), stage=0))
            if "up" in kinds:
                cells.append(Cell("up", width=width, tokens=_tokens(space, 1, chunk), stage=1))
    return cells


def _block_cell(op: str, width: float, ratio: float, tokens: int, stage: int, chunk: int | None, t0: int) -> Cell:
    if chunk is None:
        return Cell("block", op, width, ratio, tokens, stage)
    return Cell("stream_block", op, width, ratio, tokens, stage, context=t0)


def cells_for_arch(space: SearchSpace, arch: Arch, *, chunk: int | None = None, t0: int = 0,
                   drop_slots: frozenset[int] = frozenset()) -> list[Cell]:
    """The cells whose sum prices `arch` (one per block, transition, plus embed and final); with `chunk`,
    the cells of its streamed chunk call at frames t0 .. t0 + chunk - 1. `drop_slots`: slot indices whose
    block does not run while the stream keeps the arch's width and transitions (PDG's dense-only net,
    token_drop.dense_only_plan)."""
    space.validate(arch)
    stream = arch.stream_width
    cells = [Cell("patch_embed", width=stream, tokens=_tokens(space, 0, chunk), stage=0)]
    stage = 0
    for i, slot in enumerate(arch.slots):
        if slot.stage != stage:
            cells.append(_transition_cell(space, stream, slot.stage, chunk))
            stage = slot.stage
        if not slot.is_skip and i not in drop_slots:
            cells.append(_block_cell(slot.op, slot.width, slot.mlp_ratio, _tokens(space, slot.stage, chunk), slot.stage,
                                     chunk, t0))
    if stage != 0:
        cells.append(_transition_cell(space, stream, 0, chunk))
    cells.append(Cell("final", width=stream, tokens=_tokens(space, 0, chunk), stage=0))
    return cells


def _transition_cell(space: SearchSpace, stream: float, to: int, chunk: int | None = None) -> Cell:
    if to == 1:
        return Cell("down", width=stream, tokens=_tokens(space, 0, chunk), stage=0)
    return Cell("up", width=stream, tokens=_tokens(space, 1, chunk), stage=1)


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


class StreamBlockProgram(nn.Module):
    """One block's causal `step` on a chunk at frames t0.. (what a streaming chunk program runs per slot):
    forward(x, c, ctx, *cache_in) -> (x, *cache_out), the cache of the `t0` earlier frames explicit in and out
    as in the exported chunk programs (stream_programs.py)."""

    def __init__(self, block: Block, op: str, grid: Grid, t0: int, in_names: Sequence[str]) -> None:
        super().__init__()
        self.block, self.op, self.grid, self.t0, self.in_names = block, op, tuple(grid), int(t0), list(in_names)

    def forward(self, x: Tensor, c: Tensor, ctx: Tensor, *cache: Tensor) -> tuple[Tensor, ...]:
        out, new = self.block.step(x, c, ctx, self.grid, self.op, None, None, "own", dict(zip(self.in_names, cache)), self.t0)
        return (out, *[new[name] for name in sorted(new)])


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


def _model_inputs(space: SearchSpace, seed: int = 0, batch: int = 1, frames: int | None = None
                  ) -> tuple[Tensor, Tensor, Tensor]:
    g = _gen(seed)
    c, t, h, w = space.latent
    x = torch.randn((batch, c, t if frames is None else frames, h, w), generator=g)
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
            {"own": copy.deepcopy(sblock.mod[supernet.mod_key(cell.op, heads)])},
        )


def _stream_block(supernet: ElasticDiT, cell: Cell, g: torch.Generator, cond: Tensor, ctx: Tensor, batch: int
                  ) -> tuple[nn.Module, tuple[Tensor, ...]]:
    """A stream_block cell's program and inputs: the cache is the block's own, built by stepping it over
    `cell.context` random earlier frames (so its shapes are the ones a real stream carries at that t0)."""
    block = _block_module(supernet, Cell("block", cell.op, cell.width, cell.mlp_ratio, cell.tokens, cell.stage))
    block.mixers[cell.op].causal = True  # a streamed block is frame-causal whatever the profiled supernet is
    grid = _cell_grid(supernet.space, cell)
    d = _stream_dim(supernet, cell.width)
    cache: dict[str, Tensor] = {}
    if cell.context:
        prefix = torch.randn(batch, cell.context * grid[1] * grid[2], d, generator=g)
        with torch.no_grad():
            _, cache = block.step(prefix, cond, ctx, (cell.context, grid[1], grid[2]), cell.op, None, None, "own", {}, 0)
    # contiguous: the runtime is fed contiguous caches (stream_programs.py measured a strided example fail)
    names = sorted(cache)
    x = torch.randn(batch, cell.tokens, d, generator=g)
    return StreamBlockProgram(block, cell.op, grid, cell.context, names), (x, cond, ctx, *[cache[n].contiguous() for n in names])


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
    elif cell.kind == "stream_block":
        module, inputs = _stream_block(supernet, cell, g, cond, ctx, batch)
    elif cell.kind == "patch_embed":
        module = PatchEmbedProgram(_reference_sub(supernet, cell.width))
        inputs = _model_inputs(space, seed, batch, frames=_cell_grid(space, cell)[0])
    elif cell.kind == "final":
        module = FinalProgram(_reference_sub(supernet, cell.width), _cell_grid(space, cell))
        inputs = (torch.randn(batch, cell.tokens, _stream_dim(supernet, cell.width), generator=g), cond)
    elif cell.kind == "down":
        sub = _reference_sub(supernet, cell.width, need_half=True)
        module = DownProgram(sub.down, _cell_grid(space, cell))
        inputs = (torch.randn(batch, cell.tokens, _stream_dim(supernet, cell.width), generator=g),)
    else:  # up
        sub = _reference_sub(supernet, cell.width, need_half=True)
        d = _stream_dim(supernet, cell.width)
        module = UpProgram(sub.up, _cell_grid(space, cell))
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
