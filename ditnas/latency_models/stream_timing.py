"""Timing whole streamed clips of exported chunk programs on this host, in rounds of fresh processes.

    time_streams_in_rounds(jobs, threads, rounds)  -> {key: [[ms of the round's streams], ...one list per round]}
    stream_p50(rounds_ms)                          -> the figure: median over rounds of each round's median
    stream_fps_host(sub, chunk, frames, steps)     -> export one subnet's chunk programs, then time its streamed clip

Why rounds: measured on a 2-core VM (2026-12-07), the same streamed clip timed in one fresh process per arch varied
30-45% between processes, more than the differences between the layouts a video search compares, so a stream
timed in one process is not a ground truth a price can be fitted to or checked against. As for whole generations
(generation_profile._time_in_rounds), every round is a NEW process that times every job once (after one warm-up
stream each) in a new seeded order: a process's offset and the machine's drift land on every job alike, and the
median over rounds averages them out.
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ditnas.errors import DitnasError
from ditnas.latency_models.stream_programs import StreamPrograms, _check_model, export_stream_programs, run_stream_pte
from ditnas.supernet.model import SubDiT

# (key, export folder, steps per chunk); the key names the job in the result
StreamJob = tuple[str, Path, int]
Progress = Callable[[int, int, str], None]


def _timing_job(spec: dict[str, Any]) -> dict[str, Any]:
    """The fresh process: for every job in the given order, load its programs at `threads`, run `warmup` + `iters`
    whole streamed generations, keep the timed ones (total and per-chunk seconds)."""
    out: dict[str, Any] = {"pid": os.getpid(), "order": [key for key, _, _ in spec["jobs"]], "streams": {}}
    for key, folder, steps in spec["jobs"]:
        programs = StreamPrograms(Path(folder), threads=spec["threads"])
        g = torch.Generator().manual_seed(0)
        shape = [programs.batch, programs.stream["chunk_shape"][1], programs.frames, *programs.stream["chunk_shape"][3:]]
        noise = torch.randn(shape, generator=g)
        labels = torch.zeros(programs.batch, dtype=torch.long)
        totals, per_chunk = [], []
        for i in range(spec["warmup"] + spec["iters"]):
            began = time.perf_counter()
            clip, seconds = run_stream_pte(programs, noise, labels, int(steps))
            total = time.perf_counter() - began
            if i >= spec["warmup"]:
                totals.append(total)
                per_chunk.append(seconds)
        if not bool(torch.isfinite(clip).all()):
            raise DitnasError(f"{programs.folder}: a timed streamed generation produced non-finite latents; export it again")
        out["streams"][key] = {"total_s": totals, "chunk_s": per_chunk}
    return out


def time_streams_in_fresh_process(jobs: Sequence[StreamJob], threads: int, warmup: int, iters: int) -> dict[str, Any]:
    """One fresh process timing `jobs` in the given order: {"pid", "order", "streams": {key: {total_s, chunk_s}}}."""
    from ditnas.latency_models.backends.fresh_process import run_fresh

    request = {"jobs": [(key, str(folder), int(steps)) for key, folder, steps in jobs], "threads": int(threads),
               "warmup": int(warmup), "iters": int(iters)}
    return run_fresh(__name__, request, what=f"the streaming timing process for {len(jobs)} streams",
                     debug="call stream_timing._timing_job in-process to debug")


def time_streams_in_rounds(jobs: Sequence[StreamJob], threads: int, rounds: int, *, warmup: int = 1, iters: int = 1,
                           seed: int = 0, progress: Progress | None = None,
                           timer: Callable[..., dict[str, Any]] = time_streams_in_fresh_process) -> dict[str, Any]:
    """`rounds` fresh processes, each timing every job (`warmup` + `iters` streams) in a new seeded order.

    Returns {"streams": {key: {"total_ms": [[per round]...], "chunk_ms": [[[per chunk] per stream] per round]}},
    "pids": [one per round], "orders": [the keys in each round's order]}."""
    keys = [key for key, _, _ in jobs]
    if len(set(keys)) != len(keys):
        raise DitnasError(f"time_streams_in_rounds: job keys must be distinct, got {keys}")
    if rounds < 1 or iters < 1 or warmup < 0 or threads < 1:
        raise DitnasError(f"time_streams_in_rounds: rounds={rounds}, iters={iters}, threads={threads} must be >= 1 "
                          f"and warmup={warmup} >= 0")
    rng = random.Random(seed)
    streams: dict[str, dict[str, list]] = {key: {"total_ms": [], "chunk_ms": []} for key in keys}
    pids, orders = [], []
    for r in range(rounds):
        if progress:
            progress(r, rounds, f"streams: round {r + 1} of {rounds} ({len(jobs)} timed in a new order)")
        order = list(jobs)
        rng.shuffle(order)
        got = timer(order, threads, warmup, iters)
        pids.append(got["pid"])
        orders.append(list(got["order"]))
        for key in keys:
            s = got["streams"][key]
            streams[key]["total_ms"].append([t * 1e3 for t in s["total_s"]])
            streams[key]["chunk_ms"].append([[c * 1e3 for c in chunks] for chunks in s["chunk_s"]])
    if progress:
        progress(rounds, rounds, "streams timed")
    return {"streams": streams, "pids": pids, "orders": orders}


def stream_p50(rounds_ms: Sequence[Sequence[float]]) -> float:
    """The median over rounds of each round's median stream time (ms): robust to one slow process."""
    meds = [statistics.median(r) for r in rounds_ms if len(r)]
    if not meds:
        raise DitnasError("stream_p50: no timed streams")
    return float(statistics.median(meds))


def stream_fps_host(
    subnet: SubDiT, chunk: int, frames: int, steps: int = 4, threads: int = 1, *,
    warmup: int = 1, iters: int = 5, rounds: int = 1, workdir: Path | None = None,
) -> dict[str, Any]:
    """Export the chunk programs of `subnet`, then time whole streamed generations of a `frames`-frame clip
    (batch 1, `steps` Euler steps per chunk + one commit call) on this host: `rounds` fresh processes, each
    `warmup` + `iters` streams (stream_timing.py: why rounds).

    Returns fps (latent frames / stream_timing.stream_p50 of the rounds), per-chunk median ms, the cache
    bytes per kind at the clip's end, and the raw samples."""
    _check_model(subnet, chunk, frames)
    if steps < 1 or threads < 1 or iters < 1 or warmup < 0 or rounds < 1:
        raise DitnasError(f"stream_fps_host: steps={steps}, threads={threads}, iters={iters}, rounds={rounds} must be "
                          f">= 1 and warmup >= 0")
    with tempfile.TemporaryDirectory(prefix="ditnas-stream-") as tmp:
        folder = Path(workdir) if workdir is not None else Path(tmp)
        began = time.perf_counter()
        manifest = export_stream_programs(subnet, chunk, frames, folder)
        export_s = time.perf_counter() - began
        raw = time_streams_in_rounds([("stream", folder, steps)], threads, rounds, warmup=warmup, iters=iters)
    timed = raw["streams"]["stream"]
    total_ms = stream_p50(timed["total_ms"])
    chunks = [statistics.median(col) for col in zip(*(c for rnd in timed["chunk_ms"] for c in rnd))]
    nbytes = manifest["stream"]["cache_nbytes_at_end"]
    return {
        "chunk": chunk, "frames": frames, "steps": steps, "threads": threads, "programs": len(chunks),
        "fps": frames / total_ms * 1e3, "total_ms": total_ms, "chunk_ms": chunks, "rounds": rounds,
        "cache_bytes": {**nbytes, "total": sum(nbytes.values())},
        "delegated_subgraphs": manifest["metrics"]["delegated_subgraphs"], "export_s": export_s,
        # every chunk: `steps` calls; every chunk but the last: one commit call
        "program_calls": len(chunks) * (steps + 1) - 1,
        "samples_total_ms": [t for rnd in timed["total_ms"] for t in rnd], "rounds_total_ms": timed["total_ms"],
    }


if __name__ == "__main__":
    from ditnas.latency_models.backends.fresh_process import serve

    sys.exit(serve(_timing_job, sys.argv[1:3]))
