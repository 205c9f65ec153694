"""Pinned intra-op threads for evaluations (the search's, the sensitivity's, the quality signals')."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with `n` intra-op threads (None/0: leave torch's setting), restored afterwards.

    Measured here (2 shared cores, another benchmark running): one eval of the tiny test supernet on 48
    items took ~0.013 s with 1 thread and ~1.2 s with 2 (spin-waiting threads fight for the busy cores),
    so the search evaluates with 1 thread by default; a Ray task also holds 1 CPU.
    """
    if not n:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
