"""Streaming chunk programs: a frame-causal sub-DiT exported as .pte programs that stream a clip chunk by chunk.

    export_stream_programs(sub, chunk, frames, out)  -> out/chunk_t<t0>.pte per chunk position
                                                        + out/manifest.json (kind "ditnas.stream_export")
    StreamPrograms(out)                              -> the programs loaded on the ExecuTorch runtime,
                                                        step / commit / new_cache like supernet.Streamer
    run_stream_pte(out, noise, labels, steps)        -> a whole streamed generation on the runtime

Each program is `forward(x_chunk, t, y, *cache_in) -> (velocity_chunk, *cache_out)`: the cache is an
explicit input and output, named as `StreamCache.tensors()` names it (`block<i>.<entry>`), so a runtime
wires the outputs of one call into the inputs of the program of the next chunk position. The manifest
lists every program's inputs and outputs (name, shape, dtype), the chunk size, the clip length, the
arch key and the cache fingerprint (`streaming.model_fingerprint`: model structure, weights digest and
chunk size), which a cache must carry to be accepted.

Why one static program per chunk position t0 = 0, k, 2k, ..: a causal mixer's step bakes t0 into the
graph -- the RoPE rows of frames t0.., the block-causal masks and LCHA's prefix-mean weights are
constants built from it, and the key/value caches have t0 * tokens-per-frame rows. All of them lower
into one XNNPACK delegate (the tests assert it). The alternative -- ONE program with a KV cache padded
to T frames, a frame-index input, and RoPE tables / masks built from it in the graph -- needs the
mixers' `step` to take those as tensors (supernet/ops.py), and was not built here.
# assumption: programs per t0 cost T/k .pte files of about the weight size each; for the short clips
# we stream (T <= 16 latent frames) that is preferred over a padded cache that attends to T frames
# on every chunk.

Generation (`run_stream_pte`) follows `supernet.streaming.Streamer`'s contract: each chunk starts from
its noise, takes `steps` Euler steps from t = 1 to 0 (supernet.flow.time_grid) conditioned on the
committed cache of the clean earlier frames, none of them committed; then its clean latents are run
once more at t = 0 and that call's cache is committed. `stream_generate_eager` is the same loop on the
eager Streamer -- the reference the tests and the benchmark compare with.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ditnas.manifest import MANIFEST, check_files, read_manifest, write_manifest
from ditnas.errors import DitnasError
from ditnas.latency_models.lowering import Lowered, check_recipe, lower, write_pte
from ditnas.supernet.flow import time_grid
from ditnas.supernet.model import Block, ChunkStep, SubDiT
from ditnas.supernet.streaming import CACHE_KINDS, StreamCache, Streamer
from ditnas.video_data import check_chunking

KIND = "ditnas.stream_export"
DESIGN = "program per chunk position"


# ----------------------------------------------------------------------------------------------
# the program of one chunk position
# ----------------------------------------------------------------------------------------------
def _slot_blocks(sub: SubDiT) -> list[bool]:
    """Per slot, whether it holds a block (a cache) or is a skip (no cache)."""
    return [isinstance(b, Block) for b in sub.blocks]


def cache_from_flat(tensors: dict[str, Tensor], slots: list[bool], *, fingerprint: str, arch_key: str, chunk: int,
                    batch: int, frames: int) -> StreamCache:
    """A StreamCache rebuilt from flat `block<i>.<entry>` tensors (the inverse of StreamCache.tensors)."""
    blocks: list[dict[str, Tensor] | None] = [{} if has else None for has in slots]
    for name, tensor in tensors.items():
        head, entry = name.split(".", 1)
        blocks[int(head.removeprefix("block"))][entry] = tensor
    return StreamCache(fingerprint, arch_key, chunk, batch, frames, tuple(blocks))


class ChunkProgram(nn.Module):
    """`forward(x, t, y, *cache_in) -> (v, *cache_out)` of the chunk at frames t0 .. t0+chunk-1.

    Tensors only, so torch.export takes it; `in_names` / `out_names` order the flat cache tensors."""

    def __init__(self, sub: SubDiT, t0: int, in_names: list[str], out_names: list[str]) -> None:
        super().__init__()
        self.sub = sub
        self.t0 = int(t0)
        self.in_names = list(in_names)
        self.out_names = list(out_names)
        self.slots = _slot_blocks(sub)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, *cache: Tensor) -> tuple[Tensor, ...]:
        past: list[dict[str, Tensor] | None] = [{} if has else None for has in self.slots]
        for name, tensor in zip(self.in_names, cache):
            head, entry = name.split(".", 1)
            past[int(head.removeprefix("block"))][entry] = tensor
        step = ChunkStep(t0=self.t0, past=past)
        v = self.sub.forward_chunk(x, t, y, step)
        flat = {f"block{i}.{k}": tensor for i, entries in enumerate(step.new) if entries for k, tensor in entries.items()}
        return (v, *[flat[name] for name in self.out_names])


def drop_noop_aliases(ep: Any) -> Any:
    """Remove `aten.alias` nodes (identity views) that torch.export leaves for a full-range slice.

    Why: LCHA's causal state keeps the last frame of its prefix means with `[:, frames - 1:]`
    (supernet/ops.py); at chunk = 1 that slice is the whole tensor and exports as aten.alias, which
    XNNPACK does not take -- measured: it split the chunk program into 2 delegates with alias_copy
    nodes between them. An alias computes nothing, so dropping it changes no value."""
    graph = ep.graph_module.graph
    outputs = {n for n in graph.nodes if n.op == "output"}
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.alias.default and not (set(node.users) & outputs):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    ep.graph_module.recompile()
    return ep


def _specs(names: list[str], tensors: list[Tensor]) -> list[dict[str, Any]]:
    return [{"name": n, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for n, t in zip(names, tensors)]


def _check_model(sub: Any, chunk: int, frames: int) -> Streamer:
    check_chunking(frames, chunk)
    return Streamer(sub, chunk)  # refuses a non-causal or non-extracted model, a bad chunk size


def example_chunks(sub: SubDiT, frames: int, batch: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """A clip of unit Gaussian latents (B, C, frames, H, W), a mid time and labels: shape examples for export."""
    c, _, h, w = sub.arch.latent
    device = next(sub.parameters()).device
    g = torch.Generator().manual_seed(seed)
    clip = torch.randn(batch, c, frames, h, w, generator=g).to(device)
    return clip, torch.full((batch,), 0.5, device=device), torch.zeros(batch, dtype=torch.long, device=device)


@torch.no_grad()
def export_stream_programs(
    sub: SubDiT, chunk: int, frames: int, out: Path, *, batch: int = 1, backend: str = "xnnpack"
) -> dict[str, Any]:
    """Lower one chunk program per chunk position of a `frames`-frame clip into `out`; write the manifest.

    Every program goes through lowering.lower (the recipe the latency tables price) and must be fully
    delegated: a compute op left on portable kernels raises DitnasError naming it."""
    streamer = _check_model(sub, chunk, frames)
    if batch < 1:
        raise DitnasError(f"export_stream_programs: batch={batch} must be >= 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clip, t, y = example_chunks(sub, frames, batch)
    cache = streamer.new_cache(batch)
    programs, files, nbytes = [], [], {}
    for t0 in range(0, frames, chunk):
        # contiguous examples: the runtime is fed contiguous tensors, and a strided example (a k/v cache
        # sliced from a GQA-folded layout) made the t0 > 0 programs fail at run time (XNNPACK reshape)
        in_flat = {name: tensor.contiguous() for name, tensor in cache.tensors().items()}
        x = clip[:, :, t0 : t0 + chunk].contiguous()
        _, after = streamer.step(x, t, y, cache)
        out_flat = after.tensors()
        program = ChunkProgram(sub, t0, list(in_flat), list(out_flat))
        inputs = (x, t, y, *in_flat.values())
        lowered = lower(program, inputs, backend=backend, etrecord=False, what=f"chunk program t0={t0}",
                        graph_edits=(drop_noop_aliases,))
        _require_all_delegated(lowered, t0)
        name = f"chunk_t{t0}.pte"
        write_pte(lowered, out / name, extra={"stream": {"t0": t0, "chunk": chunk, "fingerprint": streamer.fingerprint}})
        files.append(name)
        programs.append({
            "t0": t0, "file": name,
            "inputs": _specs(["x", "t", "y", *in_flat], list(inputs)),
            "outputs": _specs(["v", *out_flat], [x, *out_flat.values()]),
            "delegation": {k: lowered.report[k] for k in ("delegated_subgraphs", "delegated_nodes",
                                                           "non_delegated_nodes", "non_delegated_ops", "delegated_share")},
        })
        nbytes = after.nbytes()
        # assumption: the cache is committed from a clean chunk at t = 0 at run time; here any chunk
        # gives the shapes, which is all export needs
        cache = after
    c, _, h, w = sub.arch.latent
    stream = {
        "design": DESIGN, "arch": str(sub.arch), "arch_key": sub.arch.key(), "fingerprint": streamer.fingerprint,
        "chunk": chunk, "frames": frames, "batch": batch, "latent": [c, frames, h, w],
        "chunk_shape": [batch, c, chunk, h, w], "slots": _slot_blocks(sub), "cache_kinds": CACHE_KINDS,
        "cache_nbytes_at_end": nbytes, "programs": programs,
    }
    metrics = {"programs": len(programs), "delegated_subgraphs": [p["delegation"]["delegated_subgraphs"] for p in programs],
               "cache_nbytes_at_end": nbytes}
    return write_manifest(out, KIND, inputs={}, config={"chunk": chunk, "frames": frames, "batch": batch,
                                                        "backend": backend}, metrics=metrics, files=files,
                          extra={"stream": stream})


# What may stay outside the delegate: the label-embedding row gather (XNNPACK has no fp32 embedding;
# it runs once, before the delegate, as in the image export), dim-order copies of scalar constants and
# the getitem of the delegate's outputs. Anything else -- any compute op -- is refused.
OUTSIDE_OK = frozenset({"aten_embedding_default", "dim_order_ops__to_dim_order_copy_default", "getitem"})


def _require_all_delegated(lowered: Lowered, t0: int) -> None:
    """Refuse a chunk program with an op outside the delegate other than OUTSIDE_OK's."""
    left = sorted(set(lowered.report["non_delegated_ops"]) - OUTSIDE_OK)
    if left:
        raise DitnasError(f"chunk program t0={t0}: ops {left} are not delegated to backend {lowered.backend} and would "
                          "run on portable kernels between delegate calls; rewrite them as in xnnpack-notes.md")


# ----------------------------------------------------------------------------------------------
# the runtime side
# ----------------------------------------------------------------------------------------------
class StreamPrograms:
    """The chunk programs of an export folder loaded on the ExecuTorch runtime; `step` picks the program
    of the cache's frame count. Caches are `StreamCache`s, interchangeable with the eager Streamer's of
    the same model and chunk size (same fingerprint)."""

    def __init__(self, folder: Path, threads: int | None = None) -> None:
        from ditnas.latency_models.backends.executorch_xnnpack import (
            ExecuTorchXnnpackBackend,
            load_method,
            set_et_threads,
        )

        self.folder = Path(folder)
        manifest = read_manifest(self.folder, KIND)
        check_files(self.folder, manifest)
        s = manifest["stream"]
        self.stream = s
        self.fingerprint, self.arch_key = s["fingerprint"], s["arch_key"]
        self.chunk, self.frames, self.batch = int(s["chunk"]), int(s["frames"]), int(s["batch"])
        self.slots = list(s["slots"])
        if threads is not None:
            set_et_threads(threads)
        self.programs, self.methods = {}, {}
        for entry in s["programs"]:
            pte = self.folder / entry["file"]
            check_recipe(pte)
            program = ExecuTorchXnnpackBackend.load(pte)
            self.programs[entry["t0"]] = (entry, program)
            self.methods[entry["t0"]] = load_method(program, f"chunk t0={entry['t0']}", pte)

    def new_cache(self) -> StreamCache:
        return cache_from_flat({}, self.slots, fingerprint=self.fingerprint, arch_key=self.arch_key, chunk=self.chunk,
                               batch=self.batch, frames=0)

    def _check(self, x: Tensor, cache: StreamCache) -> dict[str, Any]:
        if cache.fingerprint != self.fingerprint:
            raise DitnasError(f"the cache belongs to another program (arch {cache.arch_key}, fingerprint {cache.fingerprint}), "
                              f"not to {self.folder / MANIFEST} (arch {self.arch_key}, fingerprint {self.fingerprint}); "
                              "start a new cache with new_cache()")
        if cache.frames not in self.programs:
            raise DitnasError(f"the cache holds {cache.frames} frames but {self.folder / MANIFEST} has chunk programs for "
                              f"t0 in {sorted(self.programs)}; stream at most {self.frames} frames per clip")
        shape = self.stream["chunk_shape"]
        if list(x.shape) != shape:
            raise DitnasError(f"a chunk must be latents of shape {tuple(shape)} ({self.folder / MANIFEST}: chunk_shape), "
                              f"got {tuple(x.shape)}")
        return self.programs[cache.frames][0]

    def step(self, x: Tensor, t: Tensor, y: Tensor, cache: StreamCache) -> tuple[Tensor, StreamCache]:
        """Velocity of the chunk and the cache extended by it (the Streamer.step of the runtime)."""
        entry = self._check(x, cache)
        flat = cache.tensors()
        names = [s["name"] for s in entry["inputs"][3:]]
        outs = self.methods[cache.frames].execute([x.contiguous(), t, y, *[flat[n].contiguous() for n in names]])
        out_names = [s["name"] for s in entry["outputs"][1:]]
        new = cache_from_flat(dict(zip(out_names, outs[1:])), self.slots, fingerprint=self.fingerprint,
                              arch_key=self.arch_key, chunk=self.chunk, batch=self.batch, frames=cache.frames + self.chunk)
        return outs[0], new

    def commit(self, clean: Tensor, y: Tensor, cache: StreamCache) -> StreamCache:
        tt = torch.zeros(clean.shape[0], dtype=torch.float32)
        return self.step(clean, tt, y, cache)[1]


StepFn = Callable[[Tensor, Tensor, Tensor, StreamCache], tuple[Tensor, StreamCache]]


@torch.no_grad()
def _stream_generate(step: StepFn, cache: StreamCache, noise: Tensor, labels: Tensor, steps: int, chunk: int,
                     sync: Callable[[], None] = lambda: None) -> tuple[Tensor, list[float]]:
    """Streamed Euler generation (module doc); returns the clip and per-chunk wall seconds."""
    if steps < 1:
        raise DitnasError(f"streamed generation: steps={steps} must be >= 1")
    frames = noise.shape[2]
    times = time_grid(steps)
    n = noise.shape[0]
    clips, seconds = [], []
    for start in range(0, frames, chunk):
        began = time.perf_counter()
        x = noise[:, :, start : start + chunk].contiguous()
        for i in range(steps):
            tt = torch.full((n,), float(times[i]), device=noise.device)
            v, _ = step(x, tt, labels, cache)  # not committed: the chunk is still noisy
            x = x + (times[i + 1] - times[i]) * v
        if start + chunk < frames:  # the last chunk's cache would feed no one
            cache = step(x, torch.zeros(n, device=noise.device), labels, cache)[1]
        sync()
        seconds.append(time.perf_counter() - began)
        clips.append(x)
    return torch.cat(clips, dim=2), seconds


def stream_generate_eager(streamer: Streamer, noise: Tensor, labels: Tensor, steps: int) -> tuple[Tensor, list[float]]:
    """The reference: `run_stream_pte`'s loop on the eager Streamer."""
    frames = noise.shape[2] if noise.dim() == 5 else -1
    check_chunking(frames, streamer.chunk)
    return _stream_generate(streamer.step, streamer.new_cache(noise.shape[0]), noise, labels, steps, streamer.chunk)


def run_stream_pte(manifest: Path | StreamPrograms, noise: Tensor, labels: Tensor, steps: int) -> tuple[Tensor, list[float]]:
    """A whole streamed generation on the ExecuTorch runtime: noise (B, C, T, H, W) -> (clip, per-chunk seconds).

    `manifest` is an export folder (or its manifest.json) or already loaded StreamPrograms."""
    programs = manifest if isinstance(manifest, StreamPrograms) else StreamPrograms(_folder(manifest))
    want = [programs.batch, programs.stream["chunk_shape"][1], programs.frames, *programs.stream["chunk_shape"][3:]]
    if list(noise.shape) != want:
        raise DitnasError(f"noise must have shape {tuple(want)} (batch, C, frames, H, W of {programs.folder / MANIFEST}), "
                          f"got {tuple(noise.shape)}")
    return _stream_generate(programs.step, programs.new_cache(), noise, labels, steps, programs.chunk)


def _folder(manifest: Path) -> Path:
    manifest = Path(manifest)
    return manifest.parent if manifest.name == MANIFEST else manifest
