"""Time .pte programs interleaved in a fresh interpreter: `python -m ditnas.latency_models.backends.pte_timer`.

Why a fresh process: measured here, a .pte lowered in the timing process ran ~8% slower relative to
the other programs than the same file timed in a process that never lowered anything (its buffers
land among the exporter's freed memory). A plain subprocess (not multiprocessing) so that callers'
scripts need no `if __name__ == "__main__"` guard.

Protocol: the parent torch.saves {"jobs": [(key, pte path, inputs)], "threads", "warmup", "iters"}
to a file and passes its path and an output path; the child writes the rows there with torch.save.
A DitnasError in the child is printed as one `error: ...` line and exit code 2.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ditnas.errors import DitnasError
from ditnas.latency_models.backends.base import interleaved_rounds
from ditnas.latency_models.backends.fresh_process import run_fresh, serve

Job = tuple[str, Path, list[torch.Tensor]]


def time_here(jobs: list[Job], threads: int, warmup: int, iters: int) -> list[dict[str, Any]]:
    """Load every .pte in this process and time them interleaved (base.interleaved_rounds)."""
    from ditnas.latency_models.backends.executorch_xnnpack import (
        ExecuTorchXnnpackBackend,
        load_method,
        set_et_threads,
    )

    set_et_threads(threads)
    methods = []
    for key, pte, _ in jobs:
        try:
            program = ExecuTorchXnnpackBackend.load(pte)
        except RuntimeError as exc:
            raise DitnasError(f"program {key}: {pte} is not a loadable .pte ({exc}); delete it and its "
                              ".delegation.json so the next run lowers it again") from None
        methods.append(load_method(program, key, pte))
    calls = [(key, partial(method.execute, inputs)) for (key, _, inputs), method in zip(jobs, methods)]
    rows = interleaved_rounds(calls, warmup, iters)
    del calls, methods  # release the XNNPACK runtimes before anything else touches the pool
    return rows


def time_in_fresh_process(jobs: list[Job], threads: int, warmup: int, iters: int) -> list[dict[str, Any]]:
    request = {"jobs": [(k, str(p), i) for k, p, i in jobs], "threads": threads, "warmup": warmup, "iters": iters}
    return run_fresh(__name__, request, what=f"the timing process for {len(jobs)} .pte programs",
                     debug="re-run with isolate=False to debug")  # plain rows: no pickle needed, none accepted


def _job(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return time_here([(k, Path(p), i) for k, p, i in spec["jobs"]], spec["threads"], spec["warmup"], spec["iters"])


if __name__ == "__main__":
    sys.exit(serve(_job, sys.argv[1:3]))
