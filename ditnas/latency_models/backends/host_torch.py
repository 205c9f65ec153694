"""`host-torch`: eager PyTorch on this host, timed in process.

Each timed sample is one forward call under `torch.no_grad()`, bracketed by
`time.perf_counter_ns()`; programs are timed interleaved (base.interleaved_rounds). The thread
count is set for the measurement and restored afterwards.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch

from ditnas.latency_models.backends.base import (
    Backend,
    Prepared,
    interleaved_rounds,
    register_backend,
)
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


@register_backend
class HostTorchBackend(Backend):
    name = "host-torch"
    requires = ("torch",)
    install = "torch"
    retimes_session = True

    def prepare(self, programs: list[Program], workdir: Path) -> list[Prepared]:
        # nothing to build: the eager module is the program
        return [Prepared(p, handle=p.module.eval().requires_grad_(False)) for p in programs]

    def measure(self, prepared: list[Prepared], warmup: int, iters: int) -> list[dict[str, Any]]:
        with fixed_torch_threads(self.threads), torch.no_grad():
            calls = [(item.key(), partial(item.handle, *item.program.inputs)) for item in prepared]
            return interleaved_rounds(calls, warmup, iters)
