"""`host-torch`: eager PyTorch on this host, timed in process.

Each timed sample is one forward call under `torch.no_grad()`, bracketed by
`time.perf_counter_ns()`. The thread count is set for the measurement and restored afterwards.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ditnas.errors import DitnasError
from ditnas.latency_models.backends.base import Backend, Prepared
from ditnas.latency_models.programs import Program


class fixed_torch_threads:
    """Context manager: torch.set_num_threads(n) inside, the previous count restored after."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.previous = 0

    def __enter__(self) -> int:
        self.previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        return torch.get_num_threads()

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.previous)


def check_counts(warmup: int, iters: int) -> None:
    if warmup < 0 or iters < 1:
        raise DitnasError(f"measure: warmup={warmup} must be >= 0 and iters={iters} >= 1")


class HostTorchBackend(Backend):
    name = "host-torch"
    requires = ("torch",)

    def prepare(self, programs: list[Program], workdir: Path) -> list[Prepared]:
        # nothing to build: the eager module is the program
        return [Prepared(p, handle=p.module.eval().requires_grad_(False)) for p in programs]

    def measure(self, prepared: list[Prepared], warmup: int, iters: int) -> list[dict[str, Any]]:
        check_counts(warmup, iters)
        rows: list[dict[str, Any]] = []
        with fixed_torch_threads(self.threads), torch.no_grad():
            for item in prepared:
                module, inputs = item.handle, item.program.inputs
                for _ in range(warmup):
                    module(*inputs)
                for i in range(iters):
                    t0 = time.perf_counter_ns()
                    module(*inputs)
                    t1 = time.perf_counter_ns()
                    rows.append({"key": item.key(), "iteration": i, "latency_ms": (t1 - t0) / 1e6})
        return rows
