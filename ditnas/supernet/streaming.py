"""Streaming inference: a frame-causal sub-DiT run on a clip chunk by chunk, with per-block caches.

A causal model's output for frames <= t does not depend on later frames (model.py, ops.py), so a clip
can be produced `chunk` latent frames at a time. Each block's token mixer keeps what the later frames
need of the earlier ones -- the streaming cache:

- SA / GQA / ASSA / SSA: key/value caches (normalised, rotated k and v; ASSA also their 2x2 compressions;
  SSA the pooled ones). They grow linearly with the frames streamed.
- LCHA: the linear-attention state (prefix means of k_rot v^T and of k_feat, (B*heads, d, d) and
  (B*heads, d, 1)) and the causal conv's last kt-1 input frames. Both have a constant size.

The cache is a frozen `StreamCache` of plain tensors, so it can later become the explicit inputs and
outputs of an exported chunk program (`StreamCache.tensors()` names them). `Streamer.step` is pure: it
returns the chunk's velocity and the cache extended by the chunk, and leaves the cache it was given
untouched. That is what generation needs -- each chunk is denoised over several steps conditioned on the
clean past frames, then committed once from its clean (final) latents:

    streamer = Streamer(sub.set_causal(True), chunk=2)      # sub trained in causal mode
    cache = streamer.new_cache(batch)
    for each chunk:
        x = noise
        for t_i, dt in schedule:
            v, _ = streamer.step(x, t_i, y, cache)           # the cache is not committed
            x = x - dt * v
        cache = streamer.commit(x, y, cache)                  # the cache of the clean chunk (t = 0)

`Streamer.run` streams a whole clip at one noise level (the forward pass, equal to the whole-clip
causal forward) and reports wall time and frames per second per chunk (`StreamStats`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ditnas.errors import DitnasError
from ditnas.supernet.model import Block, ChunkStep, SubDiT

# cache entry prefix (ops.py) -> the kind its memory is reported under
CACHE_KINDS = {"kv": "kv_cache", "linear": "linear_state", "conv": "conv_buffer"}


@dataclass(frozen=True)
class StreamCache:
    """What the frames streamed so far leave for the next chunk: per slot, its mixer's cache tensors.

    `fingerprint` names the model and chunk size it belongs to (a cache from another model or another
    chunk size is refused); `frames` is how many latent frames it holds (the next chunk's first frame).
    """

    fingerprint: str
    arch_key: str
    chunk: int
    batch: int
    frames: int
    blocks: tuple[dict[str, Tensor] | None, ...]

    def tensors(self) -> dict[str, Tensor]:
        """Every cache tensor under a flat name, `block<i>.<entry>` (e.g. `block2.kv.k`): the explicit
        inputs/outputs an exported chunk program would take."""
        return {f"block{i}.{name}": t for i, entries in enumerate(self.blocks) if entries
                for name, t in entries.items()}

    def nbytes(self) -> dict[str, int]:
        """Memory of the cache in bytes per kind: kv_cache, linear_state, conv_buffer (0 when absent)."""
        out = dict.fromkeys(CACHE_KINDS.values(), 0)
        for name, t in self.tensors().items():
            out[CACHE_KINDS[name.split(".")[1]]] += t.numel() * t.element_size()
        return out


@dataclass
class StreamStats:
    """Per streamed chunk: its latent frames and wall time; fps = frames / seconds (latent frames)."""

    chunk_frames: list[int] = field(default_factory=list)
    chunk_seconds: list[float] = field(default_factory=list)

    @property
    def fps(self) -> list[float]:
        return [f / s for f, s in zip(self.chunk_frames, self.chunk_seconds)]

    def to_dict(self) -> dict[str, list[float] | list[int]]:
        return {"chunk_frames": self.chunk_frames, "chunk_seconds": self.chunk_seconds, "fps": self.fps}


@dataclass(frozen=True)
class StreamRun:
    """`Streamer.run`'s result: the clip's velocity (B, C, T, H, W), the timings and the final cache."""

    output: Tensor
    stats: StreamStats
    cache: StreamCache


def model_fingerprint(model: SubDiT, chunk: int) -> str:
    """sha256 prefix of the model's structure (arch, per-block op, heads, widths), a cheap digest of its
    weights (per-parameter sums) and the chunk size: what a cache is only valid for."""
    blocks = []
    for op, block in zip(model.ops, model.blocks):
        if isinstance(block, Block):
            blocks.append([op, block.mixers[op].max_heads, block.mod["own"].out_features // 6])
        else:
            blocks.append(None)
    with torch.no_grad():
        sums = [[float(p.double().sum()), float(p.double().abs().sum())] for p in model.parameters()]
    payload = {"arch": str(model.arch), "blocks": blocks, "stream": model.stream, "chunk": chunk, "weights": sums}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # wall times of asynchronous kernels need the queue drained
        torch.cuda.synchronize(device)


def check_streamable(model: object, role: str = "model") -> None:
    """Streaming (and training to stream) needs an extracted, frame-causal sub-DiT."""
    if not isinstance(model, SubDiT):
        raise DitnasError(f"streaming runs an extracted model (ElasticDiT.extract or load_subnet), got "
                          f"{type(model).__name__} as the {role}; extract the arch first")
    if not model.causal:
        raise DitnasError(f"{role} {model.arch.key()} is not frame-causal: its attention sees future frames, so it "
                          "cannot stream; train it with model.causal=true or call set_causal(True) first")


class Streamer:
    """Runs a frame-causal, extracted `SubDiT` on chunks of `chunk` latent frames with caches."""

    def __init__(self, model: SubDiT, chunk: int) -> None:
        check_streamable(model)
        if int(chunk) != chunk or chunk < 1:
            raise DitnasError(f"chunk size must be a whole number of latent frames >= 1, got {chunk!r}")
        self.model = model
        self.chunk = int(chunk)
        self.arch_key = model.arch.key()
        self.fingerprint = model_fingerprint(model, self.chunk)

    def new_cache(self, batch: int) -> StreamCache:
        """The empty cache of a clip's start (no frames yet) for `batch` clips."""
        entries = tuple({} if isinstance(b, Block) else None for b in self.model.blocks)
        return StreamCache(self.fingerprint, self.arch_key, self.chunk, int(batch), 0, entries)

    def _check(self, x: Tensor, cache: StreamCache) -> None:
        if cache.chunk != self.chunk:
            raise DitnasError(f"the cache was built with chunk size {cache.chunk}, this streamer uses chunk size "
                              f"{self.chunk}; start a new cache with new_cache() or stream with chunk={cache.chunk}")
        if cache.fingerprint != self.fingerprint:
            raise DitnasError(f"the cache belongs to another model (arch {cache.arch_key}, fingerprint "
                              f"{cache.fingerprint}), not to this one (arch {self.arch_key}, fingerprint "
                              f"{self.fingerprint}); start a new cache with new_cache()")
        c, _, h, w = self.model.arch.latent
        if x.dim() != 5 or x.shape[1] != c or x.shape[2] != self.chunk or tuple(x.shape[3:]) != (h, w):
            raise DitnasError(f"a chunk must be latents (B, {c}, {self.chunk}, {h}, {w}) -- {self.chunk} frames of the "
                              f"model's latent -- got {tuple(x.shape)}")
        if x.shape[0] != cache.batch:
            raise DitnasError(f"the chunk has batch {x.shape[0]} but the cache was started for batch {cache.batch}; "
                              "start a new cache with new_cache(batch)")

    def step(self, x: Tensor, t: Tensor, y: Tensor, cache: StreamCache) -> tuple[Tensor, StreamCache]:
        """Velocity of the chunk x (B, C, chunk, H, W) at time t given the cache of the frames before it,
        and the cache extended by this chunk. Pure: `cache` is left as it was (discard the returned one
        to run a denoising step without committing)."""
        self._check(x, cache)
        pass_ = ChunkStep(t0=cache.frames, past=list(cache.blocks))
        out = self.model.forward_chunk(x, t, y, pass_)
        new = StreamCache(self.fingerprint, self.arch_key, self.chunk, cache.batch, cache.frames + self.chunk,
                          tuple(pass_.new))
        return out, new

    def commit(self, clean: Tensor, y: Tensor, cache: StreamCache, t: float = 0.0) -> StreamCache:
        """The cache after the chunk's clean (denoised) latents, seen at time t (0 = clean in rectified flow)."""
        tt = torch.full((clean.shape[0],), float(t), device=clean.device)
        return self.step(clean, tt, y, cache)[1]

    @torch.no_grad()
    def run(
        self, clip: Tensor, t: Tensor, y: Tensor, cache: StreamCache | None = None,
        log: Callable[[str], None] | None = None,
    ) -> StreamRun:
        """Stream a whole clip (B, C, T, H, W) at time t chunk by chunk; T must be a multiple of the chunk.

        Every chunk's cache is committed from its own input, so the output equals the model's
        whole-clip causal forward. `log` (optional) gets one line per chunk with its wall time and FPS."""
        frames = clip.shape[2] if clip.dim() == 5 else None
        if frames is None or frames % self.chunk:
            raise DitnasError(f"the clip has {frames} latent frames, which chunk size {self.chunk} does not divide; "
                              f"pick a chunk size that divides {frames} or trim the clip")
        cache = self.new_cache(clip.shape[0]) if cache is None else cache
        stats, outs = StreamStats(), []
        for start in range(0, frames, self.chunk):
            _sync(clip.device)
            began = time.perf_counter()
            out, cache = self.step(clip[:, :, start : start + self.chunk], t, y, cache)
            _sync(clip.device)
            stats.chunk_seconds.append(time.perf_counter() - began)
            stats.chunk_frames.append(self.chunk)
            outs.append(out)
            if log is not None:
                log(f"chunk {len(outs)}: frames {start}..{start + self.chunk - 1} in "
                    f"{stats.chunk_seconds[-1] * 1e3:.1f} ms ({stats.fps[-1]:.1f} latent FPS)")
        return StreamRun(torch.cat(outs, dim=2), stats, cache)


def stream(
    model: SubDiT, clip: Tensor, t: Tensor, y: Tensor, chunk: int, log: Callable[[str], None] | None = None
) -> tuple[Tensor, StreamStats]:
    """`Streamer(model, chunk).run(clip, t, y)`: the clip's velocity and per-chunk timings."""
    result = Streamer(model, chunk).run(clip, t, y, log=log)
    return result.output, result.stats
