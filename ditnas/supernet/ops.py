"""Elastic token mixers and feed-forward layers of the DiT supernet.

Every mixer is built at its maximum width `dim = max_heads * head_dim` and runs on any prefix of
whole heads: `forward(x, grid, heads=h)` takes x with `h * head_dim` features (the leading prefix of
the max features) and uses the leading slice of every weight (first input columns / output rows,
first `h` entries of per-head parameters). `sliced(h)` returns a standalone copy built at
`max_heads=h` that computes exactly the same thing. Parameters tied to `head_dim` only (QK-norm
affine, LCHA feature map) are shared by every width, since head_dim never changes.

Token layout: x is (B, N, C) with N = T*H*W, row-major over `grid = (T, H, W)` (T = 1 for images).

Frame-causal mode (`causal=True`, off by default; `model.set_causal`): a token of frame t sees every
token of frames <= t and nothing later (bidirectional inside its frame). Every mixer then also offers
`step(x, grid, cache, t0)`: the same function on a chunk of frames t0 .. t0+T-1, given the cache of
frames < t0 (key/value tensors, linear-attention state, causal-conv frames) and returning the cache
extended by the chunk -- what supernet/streaming.py runs chunk by chunk. The causal `forward` is
`step` with an empty cache, so chunked and whole-clip outputs are one computation.

Forward passes are written so ExecuTorch's XNNPACK partitioner takes a block whole
(/work/shared/reference/xnnpack-notes.md): hand-written norms over 4-D tensors (dims (2,3),
keepdim), slicing instead of chunk/select, reshape instead of unsqueeze except on the last dim,
3-D `torch.bmm` attention on (B*heads, N, head_dim) with an explicit softmax, no SDPA.

Sources: SnapGen++ (arXiv 2601.08303) for ASSA and the elastic-width rules; S2DiT (arXiv 2601.12719,
only via secondary summaries) for LCHA and SSA. See method.md §1.2, §1.3, §2.3, §2.4, §7.1.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import unset_fake_temporarily

Grid = tuple[int, int, int]

__all__ = [
    "ASSA",
    "LCHA",
    "SSA",
    "Attention",
    "CrossAttention",
    "FeedForward",
    "Rope3D",
    "TOKEN_MIXERS",
    "attend",
    "bna_causal_mask",
    "bna_mask",
    "causal_linear_attention",
    "frame_causal_mask",
    "layer_norm",
    "linear_attention",
    "linear_attention_quadratic",
    "rms_norm",
    "softplus",
    "with_io_dim",
]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _as_4d(x: Tensor) -> Tensor:
    # XNNPACK only takes mean over dims (2,3) of a 4-D tensor with keepdim: put features last,
    # a singleton before them, and fold every other leading dim into the first two.
    d = x.shape[-1]
    if x.dim() >= 2:
        return x.reshape(-1, x.shape[-2], 1, d)
    return x.reshape(1, 1, 1, d)


def layer_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Layer norm over the last dim, no affine (hand-written: nn.LayerNorm is not delegated)."""
    x4 = _as_4d(x)
    mu = x4.mean(dim=(2, 3), keepdim=True)
    xc = x4 - mu
    var = (xc * xc).mean(dim=(2, 3), keepdim=True)
    return (xc * torch.rsqrt(var + eps)).reshape(x.shape)


def rms_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """RMS norm over the last dim, no affine."""
    x4 = _as_4d(x)
    ms = (x4 * x4).mean(dim=(2, 3), keepdim=True)
    return (x4 * torch.rsqrt(ms + eps)).reshape(x.shape)


def _constant(build: Callable[[], object]) -> object:
    """Build a cached constant table (RoPE cos/sin, BNA mask) as a real tensor.

    torch.export traces with fake tensors; a table first built during tracing would otherwise be
    cached as a fake tensor and break every later eager call. Built for real, it is captured as a
    graph constant.
    """
    with unset_fake_temporarily(), torch.no_grad():
        return build()


def _check_grid(x: Tensor, grid: Grid) -> None:
    if len(grid) != 3:
        raise ValueError(f"grid must be (T, H, W), got {grid!r}")
    n = grid[0] * grid[1] * grid[2]
    if x.shape[1] != n:
        raise ValueError(f"x has {x.shape[1]} tokens but grid {tuple(grid)} has T*H*W = {n}")


def _split_heads(t: Tensor, heads: int) -> Tensor:
    """(B, N, heads*hd) -> (B*heads, N, hd)."""
    b, n, c = t.shape
    hd = c // heads
    return t.reshape(b, n, heads, hd).permute(0, 2, 1, 3).reshape(b * heads, n, hd)


def _merge_heads(t: Tensor, batch: int, heads: int) -> Tensor:
    """(B*heads, N, hd) -- or the GQA-folded (B*kv_heads, g*N, hd), same memory order -- -> (B, N, heads*hd)."""
    hd = t.shape[-1]
    n = t.shape[0] * t.shape[1] // (batch * heads)
    return t.reshape(batch, heads, n, hd).permute(0, 2, 1, 3).reshape(batch, n, heads * hd)


def _prefix(t: Tensor, *sizes: int) -> Tensor:
    """Leading block t[:s0, :s1, ...]; the tensor itself when nothing is cut.

    Returning the parameter untouched at full width keeps it a parameter in torch.export, so
    XNNPACK sees a static weight; a no-op slice node would hide it (linear then lowers to a
    non-delegated addmm). Real slices need `constant_prop_pass` (or `sliced()`) before lowering.
    """
    if all(n == d for n, d in zip(sizes, t.shape)):
        return t
    return t[tuple(slice(0, n) for n in sizes)]


def _linear(x: Tensor, layer: nn.Linear, out_features: int, in_features: int | None = None) -> Tensor:
    """Leading-slice of a Linear: first `out_features` rows, first `in_features` columns."""
    i = x.shape[-1] if in_features is None else in_features
    bias = None if layer.bias is None else _prefix(layer.bias, out_features)
    return F.linear(x, _prefix(layer.weight, out_features, i), bias)


def softplus(x: Tensor, floor: float = 1e-6) -> Tensor:
    """softplus(x) = relu(x) + log(1 + exp(-|x|)), floored at `floor` so it is > 0 in fp32.

    # assumption: this form instead of F.softplus, which exports as where/log1p (not delegated to
    # XNNPACK); equal to it to ~1e-7 wherever softplus(x) >= floor. The floor keeps phi strictly
    # positive where softplus underflows (x < ~-14); its gradient there (~e^x) is negligible anyway.
    """
    return torch.clamp(torch.relu(x) + torch.log(1.0 + torch.exp(-torch.abs(x))), min=floor)


def _copy_prefix_params(dst: nn.Module, src: nn.Module) -> None:
    """Copy into every parameter of `dst` the leading block of the same-named parameter of `src`.

    Every elastic parameter is sliced as a leading prefix along each of its dims, so this one rule
    implements `sliced()` for all ops (width-independent parameters are copied whole).
    """
    src_params = dict(src.named_parameters())
    with torch.no_grad():
        for name, p in dst.named_parameters():
            s = src_params[name]
            p.copy_(s[tuple(slice(0, n) for n in p.shape)])


def _like(dst: nn.Module, src: nn.Module) -> nn.Module:
    p = next(src.parameters())
    return dst.to(device=p.device, dtype=p.dtype)


def _downsample_avg(x: Tensor, grid: Grid, s: int) -> tuple[Tensor, Grid]:
    """Average-pool (B, N, C) tokens by (1, s, s) over the grid; returns tokens and the pooled grid."""
    t, h, w = grid
    b, _, c = x.shape
    x4 = x.reshape(b, t, h, w, c).permute(0, 1, 4, 2, 3).reshape(b * t, c, h, w)
    y = F.avg_pool2d(x4, kernel_size=s, stride=s)
    hs, ws = h // s, w // s
    return y.reshape(b, t, c, hs, ws).permute(0, 1, 3, 4, 2).reshape(b, t * hs * ws, c), (t, hs, ws)


def _upsample_nearest(y: Tensor, grid_small: Grid, s: int) -> Tensor:
    """Nearest (1, s, s) upsampling of (B, T*h*w, C) tokens, as concat-on-last-dim + reshape.

    (repeat_interleave / interpolate would leave the XNNPACK partition; cat on the last dim does not.)
    """
    t, h, w = grid_small
    b, _, c = y.shape

    def copies(z: Tensor) -> list[Tensor]:
        # XNNPACK refuses a cat whose inputs are the same node; `* 1.0` makes distinct nodes
        return [z] + [z * 1.0 for _ in range(s - 1)]

    y = torch.cat(copies(y.reshape(b * t * h, w, c)), dim=-1).reshape(b * t, h, w * s * c)  # repeat along W
    return torch.cat(copies(y), dim=-1).reshape(b, t * h * s * w * s, c)  # repeat rows along H


# ----------------------------------------------------------------------------------------------
# 3-D axial rotary position embedding
# ----------------------------------------------------------------------------------------------


class Rope3D:
    """3-D axial RoPE over (t, h, w) grid positions, "rotate-half" pairing (i, i + head_dim/2).

    The head_dim/2 frequency pairs are split between the axes: t gets `head_dim // 8` pairs, h and w
    share the rest equally (w gets the odd one out).
    # assumption: split t : h : w = 1/4 : 3/8 : 3/8 of the pairs (Wan/HunyuanVideo-like; S2DiT
    # only says "3D RoPE" [method.md §1.2]). Each axis uses theta^(-j/n_axis), theta = 1e4.
    # assumption: positions of a strided/pooled grid are that grid's own integer coordinates.

    `apply(x, grid, t0)` takes x of shape (..., N, head_dim) -- the ops use (B*heads, N, head_dim);
    axis 0 of the grid is time, and `t0` is the absolute index of its first frame, so a streamed chunk of
    frames t0 .. t0+T-1 gets exactly the rows of the whole clip's table.
    cos/sin tables are cached per (head_dim, theta, grid, device, dtype) in a module-level cache
    (not on the nn.Module, which torch.export would flag) and are always real tensors, so they
    become graph constants under export.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        pairs = head_dim // 2
        self.t_pairs = head_dim // 8
        rest = pairs - self.t_pairs
        self.h_pairs = rest // 2
        self.w_pairs = rest - self.h_pairs

    def angles(self, grid: Grid, t0: int = 0) -> Tensor:
        """(N, head_dim/2) rotation angles, float64, for every token of the grid (row-major t, h, w);
        frames are numbered from `t0`."""
        t, h, w = grid
        pos = torch.stack(
            torch.meshgrid(
                torch.arange(t0, t0 + t, dtype=torch.float64),
                torch.arange(h, dtype=torch.float64),
                torch.arange(w, dtype=torch.float64),
                indexing="ij",
            ),
            dim=-1,
        ).reshape(-1, 3)
        parts = []
        for axis, n in enumerate((self.t_pairs, self.h_pairs, self.w_pairs)):
            if n == 0:
                continue
            freqs = self.theta ** (-torch.arange(n, dtype=torch.float64) / n)
            parts.append(pos[:, axis : axis + 1] * freqs.reshape(1, n))
        return torch.cat(parts, dim=1)

    def tables(
        self, grid: Grid, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, t0: int = 0
    ) -> tuple[Tensor, Tensor]:
        """cos, sin of shape (N, head_dim), duplicated over the two halves."""
        grid = tuple(int(g) for g in grid)
        return _rope_tables(self.head_dim, self.theta, grid, torch.device(device), dtype, int(t0))

    def apply(self, x: Tensor, grid: Grid, t0: int = 0) -> Tensor:
        cos, sin = self.tables(grid, x.device, x.dtype, t0)
        half = self.head_dim // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # slicing, not chunk
        return x * cos + rot * sin


@functools.lru_cache(maxsize=128)
def _rope_tables(
    head_dim: int, theta: float, grid: Grid, device: torch.device, dtype: torch.dtype, t0: int = 0
) -> tuple[Tensor, Tensor]:
    # shared across modules: never modify the returned tables in place
    def build() -> tuple[Tensor, Tensor]:
        a = Rope3D(head_dim, theta).angles(grid, t0).repeat(1, 2)
        return a.cos().to(device=device, dtype=dtype), a.sin().to(device=device, dtype=dtype)

    return _constant(build)


# ----------------------------------------------------------------------------------------------
# softmax attention core
# ----------------------------------------------------------------------------------------------


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
    """Softmax attention on 3-D tensors: q (G, Lq, d), k (G, Lk, d), v (G, Lk, dv) -> (G, Lq, dv).

    `bias` is added to the logits (broadcast to (G, Lq, Lk); -inf masks). Scale 1/sqrt(d).
    For GQA the ops fold the query heads of one KV group into Lq, so k/v are never repeated.
    """
    scores = torch.bmm(q * (1.0 / math.sqrt(q.shape[-1])), k.transpose(1, 2))
    if bias is not None:
        scores = scores + bias
    return torch.bmm(torch.softmax(scores, dim=-1), v)


# ----------------------------------------------------------------------------------------------
# frame-causal masks and caches (video)
# ----------------------------------------------------------------------------------------------


def frame_causal_mask(
    q_frames: int, q_frame_tokens: int, k_frames: int, k_frame_tokens: int, q_offset: int = 0
) -> Tensor:
    """(q_frames*q_frame_tokens, k_frames*k_frame_tokens) bool, True where the key's frame <= the query's.

    Queries are frames q_offset .. q_offset+q_frames-1 and keys frames 0 .. k_frames-1, each frame a
    contiguous run of tokens (row-major (T, H, W)); query and key frames may hold different token
    counts (ASSA's compressed keys: a quarter per frame). Within a frame attention stays bidirectional.
    """
    fq = torch.arange(q_frames * q_frame_tokens) // q_frame_tokens + q_offset
    fk = torch.arange(k_frames * k_frame_tokens) // k_frame_tokens
    return fk.reshape(1, -1) <= fq.reshape(-1, 1)


def _mask_to_bias(keep: Tensor, tile: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Additive 0 / -inf bias from a bool mask, tiled `tile` times along queries (folded GQA layout)."""
    bias = torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, float("-inf"))
    return bias.repeat(tile, 1).to(device)


@functools.lru_cache(maxsize=64)
def _causal_bias(
    q_frames: int, q_frame_tokens: int, k_frames: int, k_frame_tokens: int, q_offset: int, tile: int,
    device: torch.device, dtype: torch.dtype,
) -> Tensor:
    def build() -> Tensor:
        keep = frame_causal_mask(q_frames, q_frame_tokens, k_frames, k_frame_tokens, q_offset)
        return _mask_to_bias(keep, tile, device, dtype)

    return _constant(build)


def _extend(cache: dict[str, Tensor], key: str, new: Tensor, past_tokens: int) -> Tensor:
    """cat(cache[key], new) along tokens (dim 1); the cache must hold exactly `past_tokens` tokens."""
    old = cache.get(key)
    if old is None:
        if past_tokens:
            raise ValueError(f"cache has no {key!r} but the chunk starts after {past_tokens} past tokens")
        return new
    if old.shape[0] != new.shape[0] or old.shape[2:] != new.shape[2:] or old.shape[1] != past_tokens:
        raise ValueError(f"cache {key!r} of shape {tuple(old.shape)} does not fit a chunk of shape "
                         f"{tuple(new.shape)} after {past_tokens} past tokens")
    return torch.cat([old, new], dim=1)


class HeadNorm(nn.Module):
    """LayerNorm over head_dim with a learnable affine shared by all heads (width-independent)."""

    def __init__(self, head_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(head_dim))
        self.bias = nn.Parameter(torch.zeros(head_dim))

    def forward(self, x: Tensor) -> Tensor:
        return layer_norm(x, self.eps) * self.weight + self.bias


class _Mixer(nn.Module):
    """Common width bookkeeping of the elastic attention-like ops (whole heads, fixed head_dim)."""

    max_heads: int
    head_dim: int
    io_dim: int | None = None  # a pruned mixer reads/writes io_dim features but keeps fewer heads (with_io_dim)
    causal: bool = False  # frame-causal mode (module doc); per instance, carried by sliced()

    @property
    def dim(self) -> int:
        return self.max_heads * self.head_dim

    def _require_causal(self, cache: dict[str, Tensor], t0: int) -> None:
        if not self.causal:
            raise ValueError(f"{type(self).__name__}.step needs causal mode (set causal=True): a bidirectional "
                             "mixer cannot run chunk by chunk")
        if t0 < 0 or (t0 and not cache) or (cache and not t0):
            raise ValueError(f"{type(self).__name__}.step: t0={t0} does not match a cache with {len(cache)} entries "
                             "(the first chunk has t0 = 0 and an empty cache)")

    def _heads(self, x: Tensor, heads: int | None) -> int:
        if self.io_dim is not None and self.io_dim != self.dim:
            if heads not in (None, self.max_heads) or x.shape[-1] != self.io_dim:
                raise ValueError(f"{type(self).__name__}: pruned to {self.max_heads} heads on {self.io_dim} features; "
                                 f"got heads={heads}, x with {x.shape[-1]} features")
            return self.max_heads
        h = self.max_heads if heads is None else int(heads)
        if not 1 <= h <= self.max_heads:
            raise ValueError(f"{type(self).__name__}: heads={h} outside 1..{self.max_heads}")
        if x.shape[-1] != h * self.head_dim:
            raise ValueError(
                f"{type(self).__name__}: x has {x.shape[-1]} features but heads={h} x head_dim={self.head_dim} "
                f"needs {h * self.head_dim}"
            )
        return h


# ----------------------------------------------------------------------------------------------
# SA / GQA
# ----------------------------------------------------------------------------------------------


class Attention(_Mixer):
    """Self-attention (kv_group=1) or grouped-query attention (kv_heads = heads // kv_group).

    QK-norm (LayerNorm over head_dim, shared affine) and 3-D RoPE on q and k; the reference every
    other mixer is tested against. Query head i uses KV head i // kv_group, so a prefix of query
    heads uses a prefix of KV heads.
    """

    def __init__(
        self, max_heads: int, head_dim: int, kv_group: int = 1, qk_norm: bool = True, rope: bool = True,
        causal: bool = False,
    ) -> None:
        super().__init__()
        if max_heads < 1 or head_dim < 1:
            raise ValueError(f"max_heads and head_dim must be positive, got {max_heads}, {head_dim}")
        if kv_group < 1:
            raise ValueError(f"kv_group must be >= 1, got {kv_group}")
        self.max_heads = max_heads
        self.head_dim = head_dim
        self.kv_group = kv_group
        self.qk_norm = qk_norm
        self.use_rope = rope
        dim = max_heads * head_dim
        kv_dim = -(-max_heads // kv_group) * head_dim  # ceil: an odd head count keeps a last, partial group
        # separate q/k/v Linears: each slices as a plain prefix (a fused qkv would need strided slices)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, kv_dim)
        self.v = nn.Linear(dim, kv_dim)
        self.o = nn.Linear(dim, dim)
        if qk_norm:
            self.q_norm = HeadNorm(head_dim)
            self.k_norm = HeadNorm(head_dim)
        self.rope = Rope3D(head_dim) if rope else None
        self.causal = causal

    def _init_args(self) -> dict:
        return dict(kv_group=self.kv_group, qk_norm=self.qk_norm, rope=self.use_rope, causal=self.causal)

    def _kv_heads(self, heads: int) -> int:
        # assumption: with a head count that kv_group does not divide (e.g. 3 heads at width 0.75), the
        # last KV head serves a partial group; query head i still uses KV head i // kv_group, so every
        # width slices a prefix of the same KV heads.
        return -(-heads // self.kv_group)

    def _repeat_kv(self, t: Tensor, heads: int) -> Tensor:
        """(B*kv_heads, N, hd) -> (B*heads, N, hd) with query head i reading KV head i // kv_group."""
        kvh, g = self._kv_heads(heads), self.kv_group
        b = t.shape[0] // kvh
        t = t.reshape(b, kvh, 1, t.shape[1], t.shape[2]).expand(b, kvh, g, t.shape[1], t.shape[2])
        return t.reshape(b, kvh * g, t.shape[3], t.shape[4])[:, :heads].reshape(b * heads, t.shape[3], t.shape[4])

    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
        """The softmax core (a method so tests and profilers can hook it per instance)."""
        return attend(q, k, v, bias)

    def project(self, x: Tensor, grid: Grid, heads: int, t0: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """q (B*heads, N, hd), k and v (B*kv_heads, N, hd); q and k normalised and rotated (frames from t0)."""
        kvh = self._kv_heads(heads)
        c = heads * self.head_dim
        ckv = kvh * self.head_dim
        q = _split_heads(_linear(x, self.q, c), heads)
        k = _split_heads(_linear(x, self.k, ckv), kvh)
        v = _split_heads(_linear(x, self.v, ckv), kvh)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rope.apply(q, grid, t0), self.rope.apply(k, grid, t0)
        return q, k, v

    def _fold(self, q: Tensor) -> Tensor:
        """(B*heads, N, hd) -> (B*kv_heads, g*N, hd): the g query heads of a KV group share one bmm."""
        g = self.kv_group
        return q.reshape(q.shape[0] // g, g * q.shape[1], q.shape[2])

    def forward(self, x: Tensor, grid: Grid, heads: int | None = None) -> Tensor:
        if self.causal:
            return self._causal_attention(x, grid, {}, 0, heads)[0]
        _check_grid(x, grid)
        h = self._heads(x, heads)
        q, k, v = self.project(x, grid, h)
        if h % self.kv_group:
            out = self.attend(q, self._repeat_kv(k, h), self._repeat_kv(v, h))
        else:  # the folded layout shares one bmm per KV group and lowers whole to XNNPACK
            out = self.attend(self._fold(q), k, v)
        out = _merge_heads(out, x.shape[0], h)
        return _linear(out, self.o, x.shape[-1])  # = h * head_dim unless pruned (io_dim)

    def step(
        self, x: Tensor, grid: Grid, cache: dict[str, Tensor], t0: int = 0, heads: int | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Causal output of a chunk of frames t0.. and the cache extended by it (module doc)."""
        self._require_causal(cache, t0)
        return self._causal_attention(x, grid, cache, t0, heads)

    def _causal_attention(
        self, x: Tensor, grid: Grid, cache: dict[str, Tensor], t0: int, heads: int | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Block-causal attention of frames t0 .. t0+T-1 over the cached k/v of frames < t0 and their own.

        The cache holds the normalised, rotated k and v (B*kv_heads, t0*H*W, hd): "kv.k", "kv.v".
        """
        _check_grid(x, grid)
        h = self._heads(x, heads)
        frames, per_frame = grid[0], grid[1] * grid[2]
        q, k, v = self.project(x, grid, h, t0)
        k = _extend(cache, "kv.k", k, t0 * per_frame)
        v = _extend(cache, "kv.v", v, t0 * per_frame)
        folded = h % self.kv_group == 0
        bias = _causal_bias(frames, per_frame, t0 + frames, per_frame, t0, self.kv_group if folded else 1,
                            x.device, x.dtype)
        if folded:
            out = self.attend(self._fold(q), k, v, bias)
        else:
            out = self.attend(q, self._repeat_kv(k, h), self._repeat_kv(v, h), bias)
        out = _linear(_merge_heads(out, x.shape[0], h), self.o, x.shape[-1])
        return out, {"kv.k": k, "kv.v": v}

    def sliced(self, heads: int) -> "Attention":
        new = type(self)(heads, self.head_dim, **self._init_args())
        _copy_prefix_params(new, self)
        return _like(new, self)


# ----------------------------------------------------------------------------------------------
# ASSA (SnapGen++ §3, Eqs. 1-3)
# ----------------------------------------------------------------------------------------------


def bna_mask(n_tokens: int, blocks: int, radius: int) -> Tensor:
    """(N, N) bool, True where query i may attend key j under blockwise neighbourhood attention.

    The sequence is cut into `blocks` equal contiguous blocks; query block b sees key blocks
    b-radius .. b+radius (SnapGen++ Eq. 3), clipped at both ends.
    # assumption: clip at the ends, no wrap-around (the paper does not say) [method.md §2.3].
    """
    if blocks < 1 or radius < 0:
        raise ValueError(f"bna_mask: need blocks >= 1 and radius >= 0, got {blocks}, {radius}")
    if n_tokens % blocks:
        raise ValueError(f"bna_mask: {n_tokens} tokens do not split into {blocks} equal blocks")
    block = torch.arange(n_tokens) // (n_tokens // blocks)
    return (block.reshape(-1, 1) - block.reshape(1, -1)).abs() <= radius


@functools.lru_cache(maxsize=64)
def _bna_bias(n: int, blocks: int, radius: int, tile: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    def build() -> Tensor:
        bias = torch.zeros(n, n, dtype=dtype).masked_fill(~bna_mask(n, blocks, radius), float("-inf"))
        return bias.repeat(tile, 1).to(device)

    return _constant(build)


def bna_causal_mask(
    q_frames: int, k_frames: int, frame_tokens: int, blocks: int, radius: int, q_offset: int = 0
) -> Tensor:
    """BNA in frame-causal mode: (q_frames*F, k_frames*F) bool for queries of frames q_offset.. and keys of frames 0...

    Each frame's F tokens are cut into `blocks` equal blocks, numbered along the whole flattened
    sequence; query block b sees key blocks b-radius .. b+radius that are not in a later frame.
    # assumption: causal mode cuts blocks per frame (an image's blocks, whatever the clip length), so
    # block boundaries do not move with the number of frames and a stream can be cut anywhere; for one
    # frame it is exactly `bna_mask(F, blocks, radius)`. The non-causal op keeps cutting the whole clip.
    """
    size = frame_tokens // blocks
    bq = (torch.arange(q_frames * frame_tokens) + q_offset * frame_tokens) // size
    bk = torch.arange(k_frames * frame_tokens) // size
    near = (bq.reshape(-1, 1) - bk.reshape(1, -1)).abs() <= radius
    return near & frame_causal_mask(q_frames, frame_tokens, k_frames, frame_tokens, q_offset)


@functools.lru_cache(maxsize=64)
def _bna_causal_bias(
    q_frames: int, k_frames: int, frame_tokens: int, blocks: int, radius: int, q_offset: int, tile: int,
    device: torch.device, dtype: torch.dtype,
) -> Tensor:
    def build() -> Tensor:
        keep = bna_causal_mask(q_frames, k_frames, frame_tokens, blocks, radius, q_offset)
        return _mask_to_bias(keep, tile, device, dtype)

    return _constant(build)


class ASSA(Attention):
    """Adaptive sparse self-attention: KV-compressed global branch + blockwise neighbourhood branch.

    - global (Eq. 1): k and v compressed per kv-channel by a depthwise 2x2 stride-2 conv over each
      frame's (H, W) map, so KV length is N/4; every query attends to all compressed tokens.
    - local (Eq. 3): BNA as an additive constant band-block mask (-inf outside), so it stays
      bmm + add + softmax; one batched call instead of the paper's per-block loop.
    - fusion: per-token, per-head gate w = sigmoid(Linear(x)) sliced to `heads`;
      h = w * h_local + (1 - w) * h_global, then the output projection.
    # assumption: w weights the local branch (the paper does not say which) [method.md §2.3].
    # assumption: the branches share the normalised + rotated q, k, v; the global branch compresses
    # the rotated k (the paper gives Conv(k) with no RoPE detail).
    # assumption: for video, BNA blocks cut the flattened T*H*W sequence and the global branch
    # attends over the compressed tokens of all frames (SnapGen++ is image-only).
    In causal mode both branches are frame-causal: the global branch's compressed keys are per frame
    (the 2x2 conv is spatial), masked by frame; the local branch uses `bna_causal_mask`.

    `gate_override` (None or a float in [0, 1]) replaces w by a constant; for tests and ablations.
    """

    def __init__(
        self,
        max_heads: int,
        head_dim: int,
        kv_group: int = 1,
        bna_blocks: int = 4,
        bna_radius: int = 1,
        qk_norm: bool = True,
        rope: bool = True,
        causal: bool = False,
    ) -> None:
        # assumption: defaults blocks=4, r=1 suit the toy 16x16-token grids; the paper uses b=16,
        # r=1 at 1024^2 (SnapGen++ §3.1) -- pass bna_blocks=16 to match it.
        super().__init__(max_heads, head_dim, kv_group=kv_group, qk_norm=qk_norm, rope=rope, causal=causal)
        if bna_blocks < 1 or bna_radius < 0:
            raise ValueError(f"ASSA: need bna_blocks >= 1 and bna_radius >= 0, got {bna_blocks}, {bna_radius}")
        if max_heads % kv_group:
            raise ValueError(f"ASSA: max_heads={max_heads} is not divisible by kv_group={kv_group}")
        self.bna_blocks = bna_blocks
        self.bna_radius = bna_radius
        kv_dim = (max_heads // kv_group) * head_dim
        # SnapGen++ Eq. 1: Conv_{2x2, s=2} on k and v; depthwise = one 2x2 filter per kv-channel
        # (assumption: depthwise, the paper just says "Conv").
        self.k_compress = nn.Conv2d(kv_dim, kv_dim, kernel_size=2, stride=2, groups=kv_dim)
        self.v_compress = nn.Conv2d(kv_dim, kv_dim, kernel_size=2, stride=2, groups=kv_dim)
        self.gate = nn.Linear(max_heads * head_dim, max_heads)  # SnapGen++ Fig. 3: Linear -> Sigmoid, per head
        self.gate_override: float | None = None

    def _init_args(self) -> dict:
        return dict(super()._init_args(), bna_blocks=self.bna_blocks, bna_radius=self.bna_radius)

    def _check_assa_grid(self, grid: Grid) -> None:
        t, h, w = grid
        if h % 2 or w % 2:
            raise ValueError(f"ASSA: the 2x2 stride-2 KV compression needs even H and W, got grid {tuple(grid)}")
        if self.causal and (h * w) % self.bna_blocks:
            raise ValueError(f"ASSA (causal): a frame's {h * w} tokens do not split into bna_blocks={self.bna_blocks} "
                             "equal blocks")
        if (t * h * w) % self.bna_blocks:
            raise ValueError(f"ASSA: {t * h * w} tokens do not split into bna_blocks={self.bna_blocks} equal blocks")

    def local_bias(self, n_tokens: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Additive BNA mask (0 / -inf), tiled kv_group times along queries for the folded GQA layout."""
        return _bna_bias(n_tokens, self.bna_blocks, self.bna_radius, self.kv_group, torch.device(device), dtype)

    def compress(self, t: Tensor, conv: nn.Conv2d, batch: int, grid: Grid) -> Tensor:
        """(B*kv_heads, T*H*W, hd) -> (B*kv_heads, T*(H/2)*(W/2), hd) by a per-frame depthwise 2x2/2 conv."""
        tt, h, w = grid
        hd = self.head_dim
        kvh = t.shape[0] // batch
        c = kvh * hd  # channel index = kv_head * hd + d, the Linear's own feature order
        x = t.reshape(batch, kvh, tt, h, w, hd).permute(0, 2, 1, 5, 3, 4).reshape(batch * tt, c, h, w)
        y = F.conv2d(x, _prefix(conv.weight, c), _prefix(conv.bias, c), stride=2, groups=c)
        h2, w2 = h // 2, w // 2
        return y.reshape(batch, tt, kvh, hd, h2, w2).permute(0, 2, 1, 4, 5, 3).reshape(batch * kvh, tt * h2 * w2, hd)

    def branches(self, x: Tensor, grid: Grid, heads: int) -> tuple[Tensor, Tensor]:
        """(h_local, h_global), each (B*kv_heads, g*N, hd) in the folded layout."""
        b, n, _ = x.shape
        q, k, v = self.project(x, grid, heads)
        qf = self._fold(q)
        local = self.attend(qf, k, v, self.local_bias(n, x.device, x.dtype))
        glob = self.attend(qf, self.compress(k, self.k_compress, b, grid), self.compress(v, self.v_compress, b, grid))
        return local, glob

    def forward(self, x: Tensor, grid: Grid, heads: int | None = None) -> Tensor:
        if self.causal:
            return self.step(x, grid, {}, 0, heads)[0]
        _check_grid(x, grid)
        self._check_assa_grid(grid)
        h = self._heads(x, heads)
        local, glob = self.branches(x, grid, h)
        return self._fuse(x, local, glob, h)

    def step(
        self, x: Tensor, grid: Grid, cache: dict[str, Tensor], t0: int = 0, heads: int | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Causal output of a chunk of frames t0.. and the cache extended by it (module doc).

        The cache holds the rotated k, v ("kv.k", "kv.v") and their per-frame compressions ("kv.k_small",
        "kv.v_small") of frames < t0.
        # assumption: the local branch keeps every past frame's k/v, though only `bna_radius` blocks
        # back are visible; a windowed cache is an optimisation left for the exported chunk program.
        """
        self._require_causal(cache, t0)
        _check_grid(x, grid)
        self._check_assa_grid(grid)
        h = self._heads(x, heads)
        b = x.shape[0]
        frames, per_frame = grid[0], grid[1] * grid[2]
        small = per_frame // 4
        q, k, v = self.project(x, grid, h, t0)
        k_small = self.compress(k, self.k_compress, b, grid)
        v_small = self.compress(v, self.v_compress, b, grid)
        k = _extend(cache, "kv.k", k, t0 * per_frame)
        v = _extend(cache, "kv.v", v, t0 * per_frame)
        k_small = _extend(cache, "kv.k_small", k_small, t0 * small)
        v_small = _extend(cache, "kv.v_small", v_small, t0 * small)
        qf = self._fold(q)
        dev, dt, g = x.device, x.dtype, self.kv_group
        local_bias = _bna_causal_bias(frames, t0 + frames, per_frame, self.bna_blocks, self.bna_radius, t0, g, dev, dt)
        global_bias = _causal_bias(frames, per_frame, t0 + frames, small, t0, g, dev, dt)
        local = self.attend(qf, k, v, local_bias)
        glob = self.attend(qf, k_small, v_small, global_bias)
        new = {"kv.k": k, "kv.v": v, "kv.k_small": k_small, "kv.v_small": v_small}
        return self._fuse(x, local, glob, h), new

    def _fuse(self, x: Tensor, local: Tensor, glob: Tensor, h: int) -> Tensor:
        """Gate the two branches per token and head, then the output projection."""
        b, n, c = x.shape
        if self.gate_override is not None:
            w = self.gate_override
            mixed = local * w + glob * (1.0 - w)
        else:
            w = torch.sigmoid(_linear(x, self.gate, h))  # (B, N, heads)
            # per-head, per-token weight in the folded layout; permute + reshape (not unsqueeze)
            w = w.permute(0, 2, 1).reshape(local.shape[0], local.shape[1], 1)
            mixed = w * local + (1.0 - w) * glob
        return _linear(_merge_heads(mixed, b, h), self.o, c)

    def sliced(self, heads: int) -> "ASSA":
        new = super().sliced(heads)
        new.gate_override = self.gate_override
        return new


# ----------------------------------------------------------------------------------------------
# LCHA (S2DiT LinConv Hybrid Attention, method.md §1.2)
# ----------------------------------------------------------------------------------------------


def linear_attention(
    q_feat: Tensor,
    k_feat: Tensor,
    v: Tensor,
    q_rot: Tensor | None = None,
    k_rot: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """Normalised kernel linear attention, O(L d^2), on (G, L, d) features and (G, L, dv) values.

        y_i = q_rot_i^T (sum_j k_rot_j v_j^T) / q_feat_i^T (sum_j k_feat_j)

    computed right-to-left. The RoPE-rotated features (if given) enter the numerator only; the
    denominator uses the positive un-rotated features so it stays > 0 [method.md §1.2].
    Both sums are taken as means (the 1/L cancels) so fp16 on device does not overflow at large L.
    # assumption: eps = 1e-6 added to the (mean) denominator, for safety only.
    """
    g, length, d = k_feat.shape
    qn = q_feat if q_rot is None else q_rot
    kn = k_feat if k_rot is None else k_rot
    kv = torch.bmm(kn.transpose(1, 2), v) * (1.0 / length)  # (G, d, dv)
    num = torch.bmm(qn, kv)  # (G, L, dv)
    # mean over L as a 4-D mean over dims (2,3), the only form XNNPACK takes
    k_mean = k_feat.transpose(1, 2).reshape(g, d, length, 1).mean(dim=(2, 3), keepdim=True).reshape(g, d, 1)
    den = torch.bmm(q_feat, k_mean)  # (G, L, 1)
    return num / (den + eps)


def linear_attention_quadratic(
    q_feat: Tensor, k_feat: Tensor, v: Tensor, q_rot: Tensor | None = None, k_rot: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Reference O(L^2) form: y_i = sum_j (q_rot_i . k_rot_j) v_j / sum_j (q_feat_i . k_feat_j).

    `mask` (L, L) bool, if given, restricts both sums to the j with mask[i, j] (e.g. `frame_causal_mask`).
    """
    qn = q_feat if q_rot is None else q_rot
    kn = k_feat if k_rot is None else k_rot
    a = torch.bmm(qn, kn.transpose(1, 2))
    if mask is None:
        z = torch.bmm(q_feat, k_feat.transpose(1, 2)).sum(dim=-1, keepdim=True)
    else:
        keep = mask.to(a.dtype)
        a = a * keep
        z = (torch.bmm(q_feat, k_feat.transpose(1, 2)) * keep).sum(dim=-1, keepdim=True)
    return torch.bmm(a, v) / z


def causal_linear_attention(
    q_feat: Tensor,
    k_feat: Tensor,
    v: Tensor,
    frames: int,
    q_rot: Tensor | None = None,
    k_rot: Tensor | None = None,
    state: tuple[Tensor, Tensor] | None = None,
    past_frames: int = 0,
    eps: float = 1e-6,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Chunk-causal `linear_attention`: token i of frame t sums over the tokens of frames <= t only.

        y_i = q_rot_i^T S_t / (q_feat_i^T z_t),  S_t = mean_{j in frames <= t} k_rot_j v_j^T,
                                                  z_t = mean_{j in frames <= t} k_feat_j

    on (G, L, d) features with L = frames * F tokens (F per frame). The means are those of
    `linear_attention` (which this equals for one frame, up to rounding) taken over the prefix, so the
    1/L trick against fp16 overflow still holds. `state` = (S, z) of the `past_frames` frames before
    this chunk, (G, d, dv) and (G, d, 1); returns y and the state after the chunk's last frame -- a
    recurrent state of constant size, S2DiT's streaming form [method.md §1.2 [I]].
    Prefix means come from per-frame means mixed by one constant (frames, [1 +] frames) weight matrix
    applied as a Linear over the frame axis (cumsum, or an mm with a constant left side, would leave
    the XNNPACK delegate).
    """
    g, length, d = k_feat.shape
    dv = v.shape[-1]
    if frames < 1 or length % frames:
        raise ValueError(f"causal_linear_attention: {length} tokens do not split into {frames} frames")
    per_frame = length // frames
    rows = g * frames
    qn = q_feat if q_rot is None else q_rot
    kn = k_feat if k_rot is None else k_rot
    kv = torch.bmm(kn.reshape(rows, per_frame, d).transpose(1, 2), v.reshape(rows, per_frame, dv)) * (1.0 / per_frame)
    k_mean = (k_feat.reshape(rows, per_frame, d).transpose(1, 2).reshape(rows, d, per_frame, 1)
              .mean(dim=(2, 3), keepdim=True).reshape(rows, d, 1))
    weights = _prefix_weights(frames, past_frames, state is not None, kv.device, kv.dtype)

    def prefix(per_frame_mean: Tensor, past: Tensor | None) -> Tensor:
        # (G*T, a, b) per-frame means -> (G*T, a, b) means over frames <= t (and the past frames)
        a, b = per_frame_mean.shape[1], per_frame_mean.shape[2]
        stacked = per_frame_mean.reshape(g, frames, a * b)
        if past is not None:
            stacked = torch.cat([past.reshape(g, 1, a * b), stacked], dim=1)
        # frames last, then a Linear whose (constant) weight is the prefix matrix: XNNPACK delegates a
        # linear with a static weight, not an mm with a constant left operand
        mixed = F.linear(stacked.permute(0, 2, 1), weights)  # (G, a*b, T)
        return mixed.permute(0, 2, 1).reshape(rows, a, b)

    s_t = prefix(kv, None if state is None else state[0])
    z_t = prefix(k_mean, None if state is None else state[1])
    num = torch.bmm(qn.reshape(rows, per_frame, d), s_t)  # (G*T, F, dv)
    den = torch.bmm(q_feat.reshape(rows, per_frame, d), z_t)  # (G*T, F, 1)
    y = (num / (den + eps)).reshape(g, length, dv)
    last_s = s_t.reshape(g, frames, d * dv)[:, frames - 1 :].reshape(g, d, dv)
    last_z = z_t.reshape(g, frames, d)[:, frames - 1 :].reshape(g, d, 1)
    return y, (last_s, last_z)


@functools.lru_cache(maxsize=64)
def _prefix_weights(frames: int, past_frames: int, with_past: bool, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(frames, [1 +] frames): row a averages the past mean (weight t0 / (t0+a+1)) and frames 0..a (1 / (t0+a+1))."""

    def build() -> Tensor:
        count = torch.arange(frames, dtype=torch.float64) + past_frames + 1  # frames seen at chunk frame a
        lower = torch.tril(torch.ones(frames, frames, dtype=torch.float64)) / count.reshape(-1, 1)
        if with_past:
            lower = torch.cat([(past_frames / count).reshape(-1, 1), lower], dim=1)
        return lower.to(device=device, dtype=dtype)

    return _constant(build)


class LCHA(_Mixer):
    """LinConv Hybrid Attention: linear-attention branch || causal depthwise 3-D conv branch.

    - linear branch: q, k, v Linears; q, k RMS-normalised per head, phi(x) = softplus(W x + b)
      [S2DiT via method.md §1.2]; 3-D RoPE on phi(q), phi(k) in the numerator only.
      # assumption: W (head_dim x head_dim) is shared by all heads and by q and k, so it is
      # width-independent; the RMS norm has no affine (W absorbs it).
    - conv branch: depthwise 3-D conv, kernel (kt, kh, kw), causal in time (pads past frames only),
      'same' in space, then a pointwise Linear channel mix [S2DiT, method.md §1.2].
      # assumption: the conv reads the block input x (the paper does not say x, v or the output).
      # assumption: kernel (3, 3, 3) by default (kernel size not public).
      Written as a sum over temporal taps of depthwise F.conv2d on shifted frames (XNNPACK delegates
      conv2d, not conv3d); the weight is stored as a (C, 1, kt, kh, kw) Conv3d weight.
    - FusionGate: per-channel logits alpha (init 0 -> 0.5), out = s*lin + (1-s)*conv, s = sigmoid(alpha),
      then the output projection.
      # assumption: per-channel, static, convex gate (method.md §1.2 [I] default).

    The linear branch is bidirectional unless `causal`: then it is chunk-causal (`causal_linear_attention`,
    a recurrent state per frame), which with the causal conv makes the op frame-causal; `step` carries the
    state ("linear.kv", "linear.k") and the conv's last kt-1 input frames ("conv.x", (B, kt-1, C, H, W)).
    `gate_override` (None or a float in [0, 1]) replaces sigmoid(alpha) by a constant.
    """

    def __init__(
        self, max_heads: int, head_dim: int, conv_kernel: tuple[int, int, int] = (3, 3, 3), rope: bool = True,
        causal: bool = False,
    ) -> None:
        super().__init__()
        kt, kh, kw = conv_kernel
        if kt < 1 or kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"LCHA: conv_kernel needs kt >= 1 and odd kh, kw ('same' padding), got {conv_kernel}")
        self.max_heads = max_heads
        self.head_dim = head_dim
        self.conv_kernel = (kt, kh, kw)
        self.use_rope = rope
        dim = max_heads * head_dim
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.phi = nn.Linear(head_dim, head_dim)
        self.conv = nn.Conv3d(dim, dim, kernel_size=(kt, kh, kw), groups=dim)  # storage only; see conv_branch
        self.mix = nn.Linear(dim, dim)
        self.alpha = nn.Parameter(torch.zeros(dim))  # sigmoid(0) = 0.5: both branches equal at init
        self.o = nn.Linear(dim, dim)
        self.rope = Rope3D(head_dim) if rope else None
        self.gate_override: float | None = None
        self.causal = causal

    def features(self, t: Tensor) -> Tensor:
        """phi(RMSNorm(t)) = softplus(W RMSNorm(t) + b) > 0, on (..., head_dim)."""
        return softplus(self.phi(rms_norm(t)))

    def _linear_inputs(self, x: Tensor, grid: Grid, heads: int, t0: int = 0) -> tuple[Tensor, ...]:
        """phi(q), phi(k), v per head and the RoPE-rotated phi(q), phi(k) (None without RoPE), frames from t0."""
        c = heads * self.head_dim
        q = _split_heads(_linear(x, self.q, c), heads)
        k = _split_heads(_linear(x, self.k, c), heads)
        v = _split_heads(_linear(x, self.v, c), heads)
        qf, kf = self.features(q), self.features(k)
        qr = kr = None
        if self.rope is not None:
            qr, kr = self.rope.apply(qf, grid, t0), self.rope.apply(kf, grid, t0)
        return qf, kf, v, qr, kr

    def linear_branch(self, x: Tensor, grid: Grid, heads: int) -> Tensor:
        if self.causal:
            return self.causal_linear_branch(x, grid, heads, {}, 0)[0]
        return _merge_heads(linear_attention(*self._linear_inputs(x, grid, heads)), x.shape[0], heads)

    def causal_linear_branch(
        self, x: Tensor, grid: Grid, heads: int, cache: dict[str, Tensor], t0: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The chunk-causal linear branch of frames t0.. after the cached state of frames < t0."""
        qf, kf, v, qr, kr = self._linear_inputs(x, grid, heads, t0)
        state = None
        if cache:
            state = (cache["linear.kv"], cache["linear.k"])
            if state[0].shape != (kf.shape[0], self.head_dim, self.head_dim):
                raise ValueError(f"LCHA: cached linear state {tuple(state[0].shape)} does not fit {kf.shape[0]} "
                                 f"batch x heads of head_dim {self.head_dim}")
        y, (s, z) = causal_linear_attention(qf, kf, v, grid[0], qr, kr, state, t0)
        return _merge_heads(y, x.shape[0], heads), {"linear.kv": s, "linear.k": z}

    def conv_branch(self, x: Tensor, grid: Grid, heads: int, past: Tensor | None = None) -> Tensor:
        """Causal depthwise conv + channel mix; `past` = the kt-1 input frames before x (zeros if None)."""
        return self._conv(self._conv_input(x, grid, past), x, grid, heads)

    def _conv_input(self, x: Tensor, grid: Grid, past: Tensor | None) -> Tensor:
        """(B, kt-1+T, C, H, W): the kt-1 frames before the chunk (zeros at the clip start), then x's frames."""
        b, n, c = x.shape
        t, h, w = grid
        kt = self.conv_kernel[0]
        x5 = x.reshape(b, t, h, w, c).permute(0, 1, 4, 2, 3)  # (B, T, C, H, W)
        if past is None:
            return F.pad(x5, (0, 0, 0, 0, 0, 0, kt - 1, 0))  # causal: kt-1 zero frames in the past only
        if past.shape != (b, kt - 1, c, h, w):
            raise ValueError(f"LCHA: cached conv frames {tuple(past.shape)} do not fit {(b, kt - 1, c, h, w)}")
        return torch.cat([past, x5], dim=1)

    def _conv(self, xp: Tensor, x: Tensor, grid: Grid, heads: int) -> Tensor:
        b, n, c = x.shape
        t, h, w = grid
        kt, kh, kw = self.conv_kernel
        weight = _prefix(self.conv.weight, c)
        bias = _prefix(self.conv.bias, c)
        acc = None
        for tau in range(kt):  # tap tau reads frame t - (kt-1) + tau, as Conv3d on the padded input
            frames = xp[:, tau : tau + t].reshape(b * t, c, h, w)
            y = F.conv2d(frames, weight[:, :, tau], bias if tau == 0 else None, padding=(kh // 2, kw // 2), groups=c)
            acc = y if acc is None else acc + y
        out = acc.reshape(b, t, c, h, w).permute(0, 1, 3, 4, 2).reshape(b, n, c)
        return _linear(out, self.mix, heads * self.head_dim)  # = c unless pruned (io_dim)

    def forward(self, x: Tensor, grid: Grid, heads: int | None = None) -> Tensor:
        if self.causal:
            return self.step(x, grid, {}, 0, heads)[0]
        _check_grid(x, grid)
        h = self._heads(x, heads)
        lin = self.linear_branch(x, grid, h)
        conv = self.conv_branch(x, grid, h)
        return self._fuse(x, lin, conv, h)

    def step(
        self, x: Tensor, grid: Grid, cache: dict[str, Tensor], t0: int = 0, heads: int | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Causal output of a chunk of frames t0.. and the cache after it (module and class doc)."""
        self._require_causal(cache, t0)
        _check_grid(x, grid)
        h = self._heads(x, heads)
        lin, new = self.causal_linear_branch(x, grid, h, cache, t0)
        kt = self.conv_kernel[0]
        if cache and kt > 1 and "conv.x" not in cache:
            raise ValueError("LCHA: the cache has no 'conv.x' frames for the causal conv")
        xp = self._conv_input(x, grid, cache.get("conv.x") if kt > 1 else None)
        conv = self._conv(xp, x, grid, h)
        if kt > 1:
            new["conv.x"] = xp[:, grid[0] :].clone()  # the last kt-1 input frames: the next chunk's past
        return self._fuse(x, lin, conv, h), new

    def _fuse(self, x: Tensor, lin: Tensor, conv: Tensor, h: int) -> Tensor:
        """FusionGate mix of the branches, then the output projection."""
        c = h * self.head_dim
        if self.gate_override is not None:
            s = self.gate_override
            mixed = lin * s + conv * (1.0 - s)
        else:
            s = torch.sigmoid(_prefix(self.alpha, c))
            mixed = s * lin + (1.0 - s) * conv
        return _linear(mixed, self.o, x.shape[-1])

    def sliced(self, heads: int) -> "LCHA":
        new = LCHA(heads, self.head_dim, conv_kernel=self.conv_kernel, rope=self.use_rope, causal=self.causal)
        _copy_prefix_params(new, self)
        new.gate_override = self.gate_override
        return _like(new, self)


# ----------------------------------------------------------------------------------------------
# SSA (S2DiT stride self-attention, method.md §1.3)
# ----------------------------------------------------------------------------------------------


class SSA(Attention):
    """Stride self-attention: softmax attention over a (1, s, s) average-pooled token grid.

    Equivalent to: project q, k, v; average-pool them by (1, s, s); QK-norm; RoPE on the pooled
    grid's integer coordinates; attention over N/s^2 tokens; nearest-upsample back to N tokens;
    output projection. Pooling commutes with the affine q/k/v projections and nearest upsampling
    with the per-token output projection, so x is pooled once before the projections and the
    output upsampled after `o` -- the same function at 1/s^2 of the projection cost.
    # assumption: spatial stride only, average pooling down, nearest repetition up (S2DiT does not
    # publish the operators) [method.md §1.3]; QK-norm acts on the pooled q, k.
    stride=1 is exactly Attention. Pooling is spatial only, so frames survive it: in causal mode the
    block-causal mask applies over the pooled grid and `step` caches the pooled k, v [method.md §1.3 [I]].
    """

    def __init__(
        self, max_heads: int, head_dim: int, stride: int = 2, kv_group: int = 1, qk_norm: bool = True,
        rope: bool = True, causal: bool = False,
    ) -> None:
        super().__init__(max_heads, head_dim, kv_group=kv_group, qk_norm=qk_norm, rope=rope, causal=causal)
        if stride < 1:
            raise ValueError(f"SSA: stride must be >= 1, got {stride}")
        self.stride = stride  # assumption: s = 2 (4x fewer tokens) by default [method.md §1.3 [I]]

    def _init_args(self) -> dict:
        return dict(super()._init_args(), stride=self.stride)

    def forward(self, x: Tensor, grid: Grid, heads: int | None = None) -> Tensor:
        s = self.stride
        if s == 1:
            return super().forward(x, grid, heads)
        _check_grid(x, grid)
        t, h, w = grid
        if h % s or w % s:
            raise ValueError(f"SSA: grid {tuple(grid)} has H or W not divisible by stride {s}")
        xs, small = _downsample_avg(x, grid, s)
        y = super().forward(xs, small, heads)
        return _upsample_nearest(y, small, s)

    def step(
        self, x: Tensor, grid: Grid, cache: dict[str, Tensor], t0: int = 0, heads: int | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Causal output of a chunk of frames t0.. and the pooled-k/v cache extended by it."""
        s = self.stride
        if s == 1:
            return super().step(x, grid, cache, t0, heads)
        self._require_causal(cache, t0)
        _check_grid(x, grid)
        if grid[1] % s or grid[2] % s:
            raise ValueError(f"SSA: grid {tuple(grid)} has H or W not divisible by stride {s}")
        xs, small = _downsample_avg(x, grid, s)
        y, new = self._causal_attention(xs, small, cache, t0, heads)
        return _upsample_nearest(y, small, s), new


# ----------------------------------------------------------------------------------------------
# cross-attention and FFN
# ----------------------------------------------------------------------------------------------


class CrossAttention(_Mixer):
    """Queries from x (sliced by heads), keys/values from conditioning tokens cond (B, M, cond_dim).

    The K/V projections keep their full input side (cond_dim is fixed; SnapGen++ §2.4: "cross-
    attention K/V projections are not sliced"); only their output rows follow `heads`. QK-norm,
    no RoPE (conditioning tokens have no grid position).
    """

    def __init__(self, max_heads: int, head_dim: int, cond_dim: int, qk_norm: bool = True) -> None:
        super().__init__()
        self.max_heads = max_heads
        self.head_dim = head_dim
        self.cond_dim = cond_dim
        self.qk_norm = qk_norm
        dim = max_heads * head_dim
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(cond_dim, dim)
        self.v = nn.Linear(cond_dim, dim)
        self.o = nn.Linear(dim, dim)
        if qk_norm:
            self.q_norm = HeadNorm(head_dim)
            self.k_norm = HeadNorm(head_dim)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
        return attend(q, k, v, bias)

    def forward(self, x: Tensor, cond: Tensor, heads: int | None = None) -> Tensor:
        h = self._heads(x, heads)
        if cond.shape[-1] != self.cond_dim:
            raise ValueError(f"CrossAttention: cond has {cond.shape[-1]} features, expected cond_dim={self.cond_dim}")
        c = h * self.head_dim
        q = _split_heads(_linear(x, self.q, c), h)
        k = _split_heads(_linear(cond, self.k, c, self.cond_dim), h)
        v = _split_heads(_linear(cond, self.v, c, self.cond_dim), h)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return _linear(_merge_heads(self.attend(q, k, v), x.shape[0], h), self.o, x.shape[-1])

    def sliced(self, heads: int) -> "CrossAttention":
        new = CrossAttention(heads, self.head_dim, self.cond_dim, qk_norm=self.qk_norm)
        _copy_prefix_params(new, self)
        return _like(new, self)


class FeedForward(nn.Module):
    """Linear -> GELU(tanh) -> Linear; input width = x.shape[-1] (a prefix of max_dim), `hidden` slices units."""

    def __init__(self, max_dim: int, max_hidden: int) -> None:
        super().__init__()
        self.max_dim = max_dim
        self.max_hidden = max_hidden
        self.fc1 = nn.Linear(max_dim, max_hidden)
        self.fc2 = nn.Linear(max_hidden, max_dim)

    def forward(self, x: Tensor, hidden: int | None = None) -> Tensor:
        d = x.shape[-1]
        hid = self.max_hidden if hidden is None else int(hidden)
        if not 1 <= d <= self.max_dim or not 1 <= hid <= self.max_hidden:
            raise ValueError(
                f"FeedForward: width {d} / hidden {hid} outside 1..{self.max_dim} / 1..{self.max_hidden}"
            )
        y = F.gelu(_linear(x, self.fc1, hid), approximate="tanh")  # DiT's MLP uses tanh-GELU
        return _linear(y, self.fc2, d)

    def sliced(self, dim: int, hidden: int) -> "FeedForward":
        new = FeedForward(dim, hidden)
        _copy_prefix_params(new, self)
        return _like(new, self)


# ----------------------------------------------------------------------------------------------
# pruned mixers: fewer heads than the block is wide
# ----------------------------------------------------------------------------------------------


def with_io_dim(mixer: nn.Module, io_dim: int) -> nn.Module:
    """`mixer` (built at its kept head count) re-shaped to read and write `io_dim` features.

    Head pruning (compress/prune.py) removes whole heads from a token mixer but keeps the block's
    residual width: q/k/v (and ASSA's gate, LCHA's depthwise conv and channel mix) take `io_dim`
    inputs, the output projection returns `io_dim` features; everything per head keeps its size.
    The io-side parameters are new (zero) tensors of the right shapes, to be loaded or filled by the
    caller. A mixer whose heads fill io_dim is returned unchanged.
    """
    inner = mixer.max_heads * mixer.head_dim
    if io_dim == inner:
        return mixer
    p = next(mixer.parameters())
    like = dict(device=p.device, dtype=p.dtype)

    def lin(i: int, o: int) -> nn.Linear:
        return nn.Linear(i, o, **like)

    for name in ("q", "k", "v"):
        old = getattr(mixer, name)
        setattr(mixer, name, lin(io_dim, old.out_features))
    mixer.o = lin(inner, io_dim)
    if isinstance(mixer, ASSA):
        mixer.gate = lin(io_dim, mixer.max_heads)
    if isinstance(mixer, LCHA):
        mixer.conv = nn.Conv3d(io_dim, io_dim, kernel_size=mixer.conv_kernel, groups=io_dim, **like)
        mixer.mix = lin(io_dim, inner)
    mixer.io_dim = io_dim
    return mixer


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------


def _gqa(max_heads: int, head_dim: int, **kw) -> Attention:
    kw.setdefault("kv_group", 2)  # assumption: "gqa" = 2 query heads per KV head
    return Attention(max_heads, head_dim, **kw)


# Factories f(max_heads, head_dim, **op_kwargs) -> module with forward(x, grid, heads=None) and sliced(heads).
TOKEN_MIXERS: dict[str, Callable[..., nn.Module]] = {
    "sa": Attention,
    "gqa": _gqa,
    "assa": ASSA,
    "lcha": LCHA,
    "ssa": SSA,
}
