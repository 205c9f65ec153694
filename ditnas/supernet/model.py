"""`ElasticDiT`: one supernet that runs, and extracts, every `Arch` of its search space.

Contract (after OFA): `run(arch, x, t, y)` evaluates a sub-DiT with shared weights; `extract(arch)`
returns a plain standalone `SubDiT` with copied weights that computes exactly the same function.

Elasticity:
- per slot, the token mixer is any op of the space (each slot holds one module per op) or `skip`;
- width slices whole heads (head_dim fixed) and MLP hidden units. The residual stream is as wide as the
  widest block of the arch; a narrower block reads and updates the leading features of the stream;
- LayerNorms carry no affine parameters; the adaLN modulation that replaces them is private per width
  (SnapGen++ §2.4: "parameters strictly tied to the hidden-state length ... are isolated");
- two resolution stages: a 2x2 patch-merge Linear takes the stream to half resolution and a Linear +
  pixel-shuffle brings it back, added to the stream saved before the matching down-sampling (a U-Net
  long skip, as SnapGen++'s three-stage DiT).

Causal mode (video): `set_causal(True)` makes every token mixer frame-causal (ops.py), and with it the
whole model -- patchify, 2x2 merges, adaLN, cross-attention and FFN all act within a frame -- so the
output of frames <= t never depends on later frames. `extract` and `sliced` carry the flag;
`SubDiT.forward_chunk` runs one chunk of frames against the per-block caches of the frames before it
(supernet/streaming.py).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ditnas.arch import Arch, SearchSpace, Slot
from ditnas.config import ModelConfig
from ditnas.errors import DitnasError
from ditnas.supernet.ops import ASSA, LCHA, SSA, Attention, CrossAttention, FeedForward, layer_norm, with_io_dim
from ditnas.supernet.token_drop import dense_only_plan, gather_tokens, half, keep_index, scatter_tokens, sparse_plan_ok

Grid = tuple[int, int, int]


# ----------------------------------------------------------------------------------------------
# small shared pieces
# ----------------------------------------------------------------------------------------------
def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000, as DiT's integer timesteps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000.0).reshape(-1, 1) * freqs.reshape(1, -1)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def make_token_mixer(op: str, cfg: ModelConfig) -> nn.Module:
    if op == "sa":
        return Attention(cfg.max_heads, cfg.head_dim)
    if op == "gqa":
        return Attention(cfg.max_heads, cfg.head_dim, kv_group=cfg.gqa_group)
    if op == "assa":
        return ASSA(cfg.max_heads, cfg.head_dim, bna_blocks=cfg.assa_blocks, bna_radius=cfg.assa_radius)
    if op == "lcha":
        return LCHA(cfg.max_heads, cfg.head_dim, conv_kernel=tuple(cfg.lcha_kernel))
    if op == "ssa":
        return SSA(cfg.max_heads, cfg.head_dim, stride=cfg.ssa_stride)
    raise DitnasError(f"unknown op {op!r}")


def _linear_copy(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _group_index(groups: int, full: int, keep: int) -> Tensor:
    """Indices of the first `keep` features of each of `groups` consecutive blocks of size `full`."""
    return (torch.arange(groups).reshape(-1, 1) * full + torch.arange(keep).reshape(1, -1)).reshape(-1)


def patchify(x: Tensor, p: int) -> tuple[Tensor, Grid]:
    """(B, C, T, H, W) -> tokens (B, T*H/p*W/p, p*p*C), row-major over (t, h, w).

    Frames are folded into the rows (t*H/p + h) so no tensor has more than 6 dims: XNNPACK lowers
    7-D permutes but fails to load them (xnn_status_unsupported_parameter).
    """
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t * (h // p), p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, t * (h // p) * (w // p), p * p * c), (t, h // p, w // p)


def unpatchify(tokens: Tensor, grid: Grid, p: int, channels: int) -> Tensor:
    """Inverse of patchify: (B, N, p*p*C) on grid (T, H, W) -> (B, C, T, H*p, W*p), in 6 dims."""
    b = tokens.shape[0]
    t, gh, gw = grid
    x = tokens.reshape(b, t * gh, gw, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, t, gh * p, gw * p)


def merge_2x2(x: Tensor, grid: Grid) -> tuple[Tensor, Grid]:
    """(B, N, d) on grid (T, H, W) -> (B, N/4, 4d): each 2x2 window's tokens side by side."""
    b, _, d = x.shape
    t, h, w = grid
    x = x.reshape(b * t, h // 2, 2, w // 2, 2, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, t * (h // 2) * (w // 2), 4 * d), (t, h // 2, w // 2)


def split_2x2(x: Tensor, grid: Grid) -> tuple[Tensor, Grid]:
    """Inverse of merge_2x2: (B, N, 4d) on grid (T, H, W) -> (B, 4N, d) on (T, 2H, 2W)."""
    b, _, d4 = x.shape
    d = d4 // 4
    t, h, w = grid
    x = x.reshape(b * t, h, w, 2, 2, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, t * h * 2 * w * 2, d), (t, 2 * h, 2 * w)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


# ----------------------------------------------------------------------------------------------
# one block position
# ----------------------------------------------------------------------------------------------
class Block(nn.Module):
    """adaLN-Zero DiT block: token mixer, cross-attention to the class tokens, FFN.

    In the supernet a Block holds every op (`mixers`) and one modulation Linear per width (`mod`,
    keyed by head count); an extracted Block holds exactly one of each at its own size.
    """

    def __init__(self, mixers: dict[str, nn.Module], cross: CrossAttention, ffn: FeedForward, mod: dict[str, nn.Linear]):
        super().__init__()
        self.mixers = nn.ModuleDict(mixers)
        self.cross = cross
        self.ffn = ffn
        self.mod = nn.ModuleDict(mod)

    def forward(
        self, x: Tensor, c: Tensor, ctx: Tensor, grid: Grid, op: str, heads: int | None, hidden: int | None, mod_key: str
    ) -> Tensor:
        d = x.shape[-1]
        m = self.mod[mod_key](F.silu(c)).reshape(c.shape[0], 1, 6 * d)
        shift1, scale1, gate1 = m[..., :d], m[..., d : 2 * d], m[..., 2 * d : 3 * d]
        shift2, scale2, gate2 = m[..., 3 * d : 4 * d], m[..., 4 * d : 5 * d], m[..., 5 * d :]
        x = x + gate1 * self.mixers[op](modulate(layer_norm(x), shift1, scale1), grid, heads)
        x = x + self.cross(layer_norm(x), ctx, heads)
        x = x + gate2 * self.ffn(modulate(layer_norm(x), shift2, scale2), hidden)
        return x

    def step(
        self, x: Tensor, c: Tensor, ctx: Tensor, grid: Grid, op: str, heads: int | None, hidden: int | None,
        mod_key: str, past: dict[str, Tensor], t0: int,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """`forward` on a chunk of frames t0..; the causal mixer reads `past` and returns its extended cache."""
        d = x.shape[-1]
        m = self.mod[mod_key](F.silu(c)).reshape(c.shape[0], 1, 6 * d)
        shift1, scale1, gate1 = m[..., :d], m[..., d : 2 * d], m[..., 2 * d : 3 * d]
        shift2, scale2, gate2 = m[..., 3 * d : 4 * d], m[..., 4 * d : 5 * d], m[..., 5 * d :]
        mixed, cache = self.mixers[op].step(modulate(layer_norm(x), shift1, scale1), grid, past, t0, heads)
        x = x + gate1 * mixed
        x = x + self.cross(layer_norm(x), ctx, heads)
        x = x + gate2 * self.ffn(modulate(layer_norm(x), shift2, scale2), hidden)
        return x, cache


@dataclass
class ChunkStep:
    """One streamed chunk's pass through the blocks: the absolute index of its first frame, each slot's
    mixer cache of the frames before it (`past`, {} on the first chunk, None for skips), and -- filled by
    the pass -- each slot's cache extended by the chunk (`new`)."""

    t0: int
    past: list[dict[str, Tensor] | None]
    new: list[dict[str, Tensor] | None] = field(default_factory=list)


def _new_mod(cond_dim: int, width: int, chunks: int) -> nn.Linear:
    layer = nn.Linear(cond_dim, chunks * width)
    nn.init.zeros_(layer.weight)  # adaLN-Zero: every block starts as the identity
    nn.init.zeros_(layer.bias)
    return layer


class _Trunk(nn.Module):
    """What ElasticDiT and SubDiT share: embeddings, transitions, final layer and the forward walk."""

    patch_size: int
    channels: int
    head_dim: int

    def _condition(self, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        temb = self.t_mlp(timestep_embedding(t, self.t_mlp[0].in_features))
        c = temb + self.y_embed(y)
        ctx = self.ctx_embed(y).reshape(y.shape[0], -1, self.y_embed.embedding_dim)
        return c, ctx

    def _walk(
        self, x: Tensor, t: Tensor, y: Tensor, plan: list, stream: int, patch, down, up, final_mod, final,
        features: bool = False, chunk: ChunkStep | None = None, keep: Tensor | None = None, dense: int = 1,
        path_drop: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Run the blocks of `plan` = [(stage, block | None, op, heads, hidden, mod_key[, width])] on the stream.

        An entry may carry a 7th field, the block's residual width in features (a pruned block whose
        mixer keeps fewer heads than its width; heads=None then runs every module at its own size).
        `features=True` also returns the stream right before the final adaLN (B, tokens, stream).
        With `chunk`, x holds frames chunk.t0.. of a clip and every block runs its causal `step` on
        chunk.past[i]; the extended caches land in chunk.new.

        Token dropping (token_drop.py): `keep` (B, T, H/2, W/2) offsets run the middle slots (all but `dense`
        at each end) on one token of every 2x2 group of the grid before the first middle slot, scattered
        back after the last (dropped tokens pass through); if the middle cannot run on that sub-grid (odd
        sides, an odd merge, a skip tensor saved before the middle, an op's grid rule) the forward runs
        dense instead. `path_drop=True` skips every middle slot (the dense-only net of Path-Drop Guidance)."""
        tokens, grid = patchify(x, self.patch_size)
        h = patch(tokens)
        c, ctx = self._condition(t, y)
        stage, saved = 0, []
        if chunk is not None:
            chunk.new = [None] * len(plan)
            if keep is not None or path_drop:
                raise ValueError("token dropping and path drop are training/sampling options of whole clips, not of "
                                 "streamed chunks")
        if path_drop:
            plan = dense_only_plan(plan, dense)
        # assumption: RoPE and every grid-aware op take the kept tokens' positions on the sub-grid's own
        # integer coordinates (ops compute positions from the grid they are given)
        sparse = keep is not None and not path_drop and sparse_plan_ok(plan, dense, grid)
        lo, hi = dense, len(plan) - dense
        for i, entry in enumerate(plan):
            slot_stage, block, op, heads, hidden, mod_key = entry[:6]
            if sparse and i == lo:  # SPRINT: the middle sees one token of every 2x2 group
                before, before_grid = h, grid
                index = keep_index(keep, grid)
                h, grid = gather_tokens(h, index), half(grid)
            if slot_stage != stage:
                h, grid, stage = self._transition(h, grid, slot_stage, saved, down, up)
            if sparse and i == hi:  # back at the drop point's stage: reinsert, dropped tokens pass through
                h, grid = scatter_tokens(before, h, index), before_grid
            if block is None:
                continue
            d = entry[6] if len(entry) > 6 else heads * self.head_dim
            if d == stream:
                full = heads is None or heads == self._all_heads(block, op)
                h = self._block(block, h, c, ctx, grid, op, None if full else heads, hidden, mod_key, chunk, i)
            else:
                inner = self._block(block, h[..., :d], c, ctx, grid, op, heads, hidden, mod_key, chunk, i)
                h = torch.cat([inner, h[..., d:]], dim=-1)
        if stage != 0:
            h, grid, stage = self._transition(h, grid, 0, saved, down, up)
        feats = h
        m = final_mod(F.silu(c)).reshape(c.shape[0], 1, 2 * stream)
        h = modulate(layer_norm(h), m[..., :stream], m[..., stream:])
        out = unpatchify(final(h), grid, self.patch_size, self.channels)
        return (out, feats) if features else out

    @staticmethod
    def _block(block: Block, h: Tensor, c: Tensor, ctx: Tensor, grid: Grid, op: str, heads: int | None,
               hidden: int | None, mod_key: str, chunk: ChunkStep | None, index: int) -> Tensor:
        if chunk is None:
            return block(h, c, ctx, grid, op, heads, hidden, mod_key)
        h, chunk.new[index] = block.step(h, c, ctx, grid, op, heads, hidden, mod_key, chunk.past[index], chunk.t0)
        return h

    @staticmethod
    def _all_heads(block: Block, op: str) -> int:
        return block.mixers[op].max_heads

    def token_mixers(self) -> list[nn.Module]:
        """Every token-mixer module of the model (all ops of every slot in a supernet)."""
        return [m for block in self.blocks if isinstance(block, Block) for m in block.mixers.values()]

    def set_causal(self, causal: bool = True) -> "_Trunk":
        """Switch every token mixer to frame-causal (True) or bidirectional (False) attention; returns self.

        Changes the function the model computes on video (not on images, T = 1): train and sample a
        model in the mode it will stream in."""
        for mixer in self.token_mixers():
            mixer.causal = bool(causal)
        return self

    @property
    def causal(self) -> bool:
        """Whether every token mixer is frame-causal (a model with none is trivially so)."""
        return all(m.causal for m in self.token_mixers())

    @staticmethod
    def _transition(h: Tensor, grid: Grid, to: int, saved: list, down, up) -> tuple[Tensor, Grid, int]:
        if to == 1:
            saved.append(h)
            merged, grid = merge_2x2(h, grid)
            return down(merged), grid, 1
        out, grid = split_2x2(up(h), grid)
        return out + saved.pop(), grid, 0


class ElasticDiT(_Trunk):
    """The supernet over a SearchSpace."""

    def __init__(self, space: SearchSpace, cfg: ModelConfig):
        super().__init__()
        self.space, self.cfg = space, cfg
        self.channels = space.latent[0]
        self.patch_size = space.patch_size
        self.head_dim = cfg.head_dim
        dim = cfg.max_heads * cfg.head_dim
        self.dim = dim
        self.head_counts = {w: self.heads_for(w) for w in space.widths}
        _, t, hh, ww = space.latent
        if hh % space.patch_size or ww % space.patch_size:
            raise DitnasError(f"latent {space.latent} is not divisible by patch size {space.patch_size}")
        patch_in = space.patch_size**2 * self.channels
        self.patch = nn.Linear(patch_in, dim)
        self.t_mlp = nn.Sequential(nn.Linear(256, cfg.cond_dim), nn.SiLU(), nn.Linear(cfg.cond_dim, cfg.cond_dim))
        n_labels = space.num_classes + 1  # the last label is the null class for classifier-free guidance
        self.y_embed = nn.Embedding(n_labels, cfg.cond_dim)
        self.ctx_embed = nn.Embedding(n_labels, cfg.cond_tokens * cfg.cond_dim)
        max_ratio = space.mlp_ratios[-1]
        blocks = []
        for _ in range(space.depth):
            mixers = {op: make_token_mixer(op, cfg) for op in space.ops}
            mods = {self.mod_key(op, h): _new_mod(cfg.cond_dim, h * cfg.head_dim, 6)
                    for op in (space.ops if cfg.private_mod else space.ops[:1]) for h in self.head_counts.values()}
            blocks.append(
                Block(mixers, CrossAttention(cfg.max_heads, cfg.head_dim, cfg.cond_dim), FeedForward(dim, int(max_ratio * dim)), mods)
            )
        self.blocks = nn.ModuleList(blocks)
        self.down = nn.Linear(4 * dim, dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.final_mod = nn.ModuleDict({f"h{h}": _new_mod(cfg.cond_dim, h * cfg.head_dim, 2) for h in self.head_counts.values()})
        self.final = nn.Linear(dim, patch_in)
        nn.init.zeros_(self.final.weight)  # DiT: zero-init output layer
        nn.init.zeros_(self.final.bias)
        if cfg.causal:  # model.causal: train, extract (the flag is copied) and rebuild from checkpoints causal
            self.set_causal(True)

    # ----- sizes -----------------------------------------------------------------------------
    def heads_for(self, width: float) -> int:
        heads = width * self.cfg.max_heads
        if abs(heads - round(heads)) > 1e-9 or round(heads) < 1:
            raise DitnasError(
                f"width {width} x max_heads {self.cfg.max_heads} is not a whole number of heads; "
                "choose widths that are multiples of 1/max_heads"
            )
        return int(round(heads))

    def hidden_for(self, slot: Slot) -> int:
        return int(round(slot.mlp_ratio * self.heads_for(slot.width) * self.head_dim))

    def stream_heads(self, arch: Arch) -> int:
        return self.heads_for(arch.stream_width)

    def mod_key(self, op: str, heads: int) -> str:
        """The block modulation an op runs with at `heads`: its own under model.private_mod, else the width's."""
        return f"{op}_h{heads}" if self.cfg.private_mod else f"h{heads}"

    def _plan(self, arch: Arch, blocks) -> list:
        plan = []
        for slot, block in zip(arch.slots, blocks):
            if slot.is_skip:
                plan.append((slot.stage, None, None, 0, 0, ""))
            else:
                heads = self.heads_for(slot.width)
                plan.append((slot.stage, block, slot.op, heads, self.hidden_for(slot), self.mod_key(slot.op, heads)))
        return plan

    # ----- OFA contract ----------------------------------------------------------------------
    def run(self, arch: Arch, x: Tensor, t: Tensor, y: Tensor, keep: Tensor | None = None, *, dense: int = 1,
            path_drop: bool = False) -> Tensor:
        """Velocity of sub-DiT `arch` at (x_t, t, label y) with the supernet's shared weights.

        `keep` / `dense` / `path_drop`: token dropping and the dense-only path (_Trunk._walk, token_drop.py)."""
        self.space.validate(arch)
        stream_heads = self.stream_heads(arch)
        stream = stream_heads * self.head_dim
        groups = _group_index(4, self.dim, stream)
        down = lambda z: F.linear(z, self.down.weight[:stream][:, groups], self.down.bias[:stream])  # noqa: E731
        up = lambda z: F.linear(z, self.up.weight[groups][:, :stream], self.up.bias[groups])  # noqa: E731
        patch = lambda z: F.linear(z, self.patch.weight[:stream], self.patch.bias[:stream])  # noqa: E731
        final = lambda z: F.linear(z, self.final.weight[:, :stream], self.final.bias)  # noqa: E731
        plan = self._plan(arch, self.blocks)
        return self._walk(x, t, y, plan, stream, patch, down, up, self.final_mod[f"h{stream_heads}"], final,
                          keep=keep, dense=dense, path_drop=path_drop)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, arch: Arch | None = None) -> Tensor:
        return self.run(arch or self.space.max_arch(), x, t, y)

    @torch.no_grad()
    def extract(self, arch: Arch) -> SubDiT:
        """A standalone model holding only `arch`'s weights; equals `run(arch, ...)` numerically."""
        self.space.validate(arch)
        return SubDiT(self, arch)

    def config_dict(self) -> dict:
        return {"space": self.space.to_dict(), "model": asdict(self.cfg)}


class SubDiT(_Trunk):
    """A plain sub-DiT: one token mixer and one width per block, every weight its own copy."""

    def __init__(self, supernet: ElasticDiT, arch: Arch):
        super().__init__()
        self.arch = arch
        self.channels, self.patch_size, self.head_dim = supernet.channels, supernet.patch_size, supernet.head_dim
        stream_heads = supernet.stream_heads(arch)
        stream = stream_heads * self.head_dim
        self.stream = stream
        keep = _group_index(4, supernet.dim, stream)
        self.patch = _linear_copy(supernet.patch.weight[:stream], supernet.patch.bias[:stream])
        self.t_mlp = copy.deepcopy(supernet.t_mlp)
        self.y_embed = copy.deepcopy(supernet.y_embed)
        self.ctx_embed = copy.deepcopy(supernet.ctx_embed)
        blocks: list[nn.Module] = []
        self.ops: list[str] = []
        self.stages: list[int] = []
        for slot, sblock in zip(arch.slots, supernet.blocks):
            self.stages.append(slot.stage)
            self.ops.append(slot.op)
            if slot.is_skip:
                blocks.append(nn.Identity())  # placeholder keeps slot indices aligned with the supernet
                continue
            heads = supernet.heads_for(slot.width)
            d = heads * self.head_dim
            mod = sblock.mod[supernet.mod_key(slot.op, heads)]
            blocks.append(
                Block(
                    {slot.op: sblock.mixers[slot.op].sliced(heads)},
                    sblock.cross.sliced(heads),
                    sblock.ffn.sliced(d, supernet.hidden_for(slot)),
                    {"own": _linear_copy(mod.weight, mod.bias)},
                )
            )
        self.blocks = nn.ModuleList(blocks)
        uses_half = any(s == 1 for s in self.stages)
        self.down = _linear_copy(supernet.down.weight[:stream][:, keep], supernet.down.bias[:stream]) if uses_half else None
        self.up = _linear_copy(supernet.up.weight[keep][:, :stream], supernet.up.bias[keep]) if uses_half else None
        fm = supernet.final_mod[f"h{stream_heads}"]
        self.final_mod = _linear_copy(fm.weight, fm.bias)
        self.final = _linear_copy(supernet.final.weight[:, :stream], supernet.final.bias)

    def _sub_plan(self) -> list:
        # every module of a SubDiT is built at its own size: run each at full size (heads/hidden None);
        # the block's residual width is its modulation's (a pruned mixer may keep fewer heads)
        plan = []
        for stage, op, block in zip(self.stages, self.ops, self.blocks):
            if isinstance(block, Block):
                plan.append((stage, block, op, None, None, "own", block.mod["own"].out_features // 6))
            else:
                plan.append((stage, None, None, 0, 0, ""))
        return plan

    def forward(self, x: Tensor, t: Tensor, y: Tensor, keep: Tensor | None = None, *, dense: int = 1,
                path_drop: bool = False) -> Tensor:
        """Velocity at (x_t, t, y); `keep` / `dense` / `path_drop` as ElasticDiT.run (token_drop.py)."""
        return self._walk(x, t, y, self._sub_plan(), self.stream, self.patch, self.down, self.up, self.final_mod, self.final,
                          keep=keep, dense=dense, path_drop=path_drop)

    def forward_chunk(self, x: Tensor, t: Tensor, y: Tensor, chunk: ChunkStep) -> Tensor:
        """Velocity of frames chunk.t0 .. of a clip, x = those frames (B, C, T_chunk, H, W), given each
        block's cache of the earlier frames; fills chunk.new. Needs causal mode (`set_causal`)."""
        if len(chunk.past) != len(self.blocks):
            raise ValueError(f"chunk has caches for {len(chunk.past)} slots, the model has {len(self.blocks)}")
        return self._walk(x, t, y, self._sub_plan(), self.stream, self.patch, self.down, self.up, self.final_mod,
                          self.final, chunk=chunk)

    def forward_with_features(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(velocity, final-block features): the same computation as forward, plus the stream right
        before the final adaLN / Linear, shaped (B, tokens, stream width) -- what feature KD matches."""
        return self._walk(x, t, y, self._sub_plan(), self.stream, self.patch, self.down, self.up, self.final_mod,
                          self.final, features=True)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ----------------------------------------------------------------------------------------------
# pruned sub-DiTs (compress/prune.py writes them; extract.load_subnet rebuilds them)
# ----------------------------------------------------------------------------------------------
def apply_prune_record(sub: SubDiT, record: dict, arch: Arch) -> SubDiT:
    """Re-shape `sub` (extracted at `record["base_arch"]`) in place to a pruned model of `arch`.

    `record["blocks"]` maps a slot index (str) to {"heads": kept token-mixer heads, "hidden": kept FFN
    units} for every block that still runs; a slot that is `skip` in `arch` but not in the base arch
    is a removed block (identity). The residual stream, cross-attention and adaLN keep their widths:
    a pruned block reads and writes the same features as before, with fewer heads / FFN units inside.
    The new tensors are uninitialised shapes; load the weights after this."""
    if len(arch.slots) != len(sub.blocks):
        raise DitnasError(f"pruned arch has {len(arch.slots)} slots but the base model {len(sub.blocks)}")
    blocks = record.get("blocks", {})
    for i, slot in enumerate(arch.slots):
        block = sub.blocks[i]
        if slot.is_skip:
            if isinstance(block, Block):
                sub.blocks[i] = nn.Identity()
                sub.ops[i] = slot.op
            continue
        if not isinstance(block, Block) or sub.ops[i] != slot.op:
            raise DitnasError(f"pruned arch slot {i} ({slot.token()}) does not match the base arch's slot {i}")
        shape = blocks.get(str(i))
        if shape is None:
            continue
        width = block.mod["own"].out_features // 6
        mixer = block.mixers[slot.op]
        heads, hidden = int(shape["heads"]), int(shape["hidden"])
        if heads != mixer.max_heads:
            block.mixers[slot.op] = with_io_dim(mixer.sliced(heads), width)
        if hidden != block.ffn.max_hidden:
            block.ffn = block.ffn.sliced(width, hidden)
    sub.arch = arch
    sub.base_arch = Arch.parse(record["base_arch"])
    return sub
