"""Benchmark: measured streaming FPS of a frame-causal sub-DiT on this host's ExecuTorch (XNNPACK) runtime.

    python bench/video_stream.py --out bench/results/video_stream.json [--frames 8] [--steps 4] [--threads 1]

Builds a small causal model (random weights: the numbers are TIMING ONLY, nothing about quality), then for
chunk sizes 1, 2 and 4 latent frames over a T = 8 clip of 16x16 latents calls
`latency_models.stream_timing.stream_fps_host`: one chunk program per chunk position is lowered with the shipped
recipe and a whole streamed generation (`--steps` Euler steps per chunk, then one commit call of the
clean chunk for every chunk but the last) is timed in a fresh process. For reference it also times the
whole-clip program (the same causal model on all T frames at once: `--steps` calls) and the eager
streamed generation. FPS = latent frames / wall time of a whole generation (median of `--iters`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import machine, report

from ditnas.arch import SearchSpace
from ditnas.latency_models.stream_programs import stream_generate_eager
from ditnas.latency_models.stream_timing import stream_fps_host
from ditnas.config import ModelConfig
from ditnas.console import quiet_third_party
from ditnas.latency_models.generation import time_generation
from ditnas.latency_models.lowering import lower, write_pte
from ditnas.supernet.model import ElasticDiT, SubDiT
from ditnas.supernet.streaming import Streamer

# assumption: a small DiT with every cache kind -- LCHA (linear state + conv frames), ASSA and SA (k/v);
# 64 wide (4 heads x 16), patch 2, so a 16x16 latent frame is 64 tokens
ARCH = "lcha:1:2 assa:1:2 sa:1:2 lcha:1:2"
CHUNKS = (1, 2, 4)


def build_model(frames: int, seed: int = 0) -> SubDiT:
    """A causal extracted sub-DiT with random weights (adaLN perturbed off zero so every block computes)."""
    space = SearchSpace(depth=4, stage_pattern=(0, 0, 0, 0), skippable=(), free_stages=True,
                        latent=(1, frames, 16, 16), widths=(0.5, 1.0))
    torch.manual_seed(seed)
    supernet = ElasticDiT(space, ModelConfig(max_heads=4, head_dim=16, cond_dim=64, cond_tokens=2))
    with torch.no_grad():
        for p in supernet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return supernet.eval().set_causal(True).extract(space.parse(ARCH)).eval()


def whole_clip_ms(sub: SubDiT, frames: int, steps: int, threads: int, iters: int) -> dict:
    """The whole clip at once: the causal model's (x, t, y) program on all frames, `steps` calls, fresh process."""
    inputs = (torch.randn(1, 1, frames, 16, 16), torch.tensor([0.5]), torch.zeros(1, dtype=torch.long))
    with tempfile.TemporaryDirectory(prefix="ditnas-clip-") as tmp:
        lowered = lower(sub, inputs, etrecord=False, what="whole-clip program")
        pte = write_pte(lowered, Path(tmp) / "clip.pte")
        times = time_generation(pte, steps=steps, cfg_scale=None, threads=threads, warmup=1, iters=iters)
    ms = statistics.median(times)
    return {"total_ms": ms, "fps": frames / (ms / 1e3), "samples_ms": times,
            "delegated_subgraphs": lowered.report["delegated_subgraphs"],
            "non_delegated_ops": lowered.report["non_delegated_ops"]}


def eager_stream_ms(sub: SubDiT, chunk: int, frames: int, steps: int, iters: int) -> float:
    noise, y = torch.randn(1, 1, frames, 16, 16), torch.zeros(1, dtype=torch.long)
    streamer = Streamer(sub, chunk)
    stream_generate_eager(streamer, noise, y, steps)  # warm-up
    times = []
    for _ in range(iters):
        began = time.perf_counter()
        stream_generate_eager(streamer, noise, y, steps)
        times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args(argv)
    quiet_third_party()
    torch.set_num_threads(args.threads)  # pinned: eager torch at 2 threads on 2 busy cores is erratic
    result = {"machine": machine("torch", "executorch", threads=args.threads),
              "note": "random weights: timing only, says nothing about sample quality",
              "device": "this host, ExecuTorch XNNPACK runtime (CPU)",
              "arch": ARCH, "latent": [1, args.frames, 16, 16], "steps": args.steps, "batch": 1,
              "fps_unit": "latent frames per second of wall time of a whole generation (median)"}
    sub = build_model(args.frames)
    result["params"] = sub.num_params()
    rows: list[tuple[str, object]] = [("arch", ARCH), ("latent", f"1x{args.frames}x16x16"), ("steps", args.steps),
                                      ("threads", args.threads)]
    streams = []
    for chunk in CHUNKS:
        began = time.perf_counter()
        r = stream_fps_host(sub, chunk, args.frames, steps=args.steps, threads=args.threads, iters=args.iters)
        r["eager_total_ms"] = eager_stream_ms(sub, chunk, args.frames, args.steps, args.iters)
        r["wall_s"] = time.perf_counter() - began
        streams.append(r)
        rows.append((f"chunk {chunk}: fps (.pte)", f"{r['fps']:.2f}  ({r['total_ms']:.1f} ms / clip, eager "
                                                  f"{r['eager_total_ms']:.1f} ms)"))
        rows.append((f"chunk {chunk}: per-chunk ms", " ".join(f"{v:.1f}" for v in r["chunk_ms"])))
        rows.append((f"chunk {chunk}: cache bytes at end", r["cache_bytes"]))
        rows.append((f"chunk {chunk}: delegates per program", r["delegated_subgraphs"]))
        print(f"chunk {chunk}: {r['fps']:.2f} latent FPS", file=sys.stderr)
    result["stream"] = streams
    clip = whole_clip_ms(sub, args.frames, args.steps, args.threads, args.iters)
    result["whole_clip"] = clip
    rows.append(("whole clip at once: fps", f"{clip['fps']:.2f}  ({clip['total_ms']:.1f} ms / clip)"))
    report(rows, result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
