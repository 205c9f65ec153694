"""Build (lower) a session's programs, in parallel worker processes when there are enough of them.

Lowering is the slow half of profiling on ExecuTorch (to_edge_transform_and_lower runs dozens of
FX passes: ~15-20 s per block program, ~100 s per 6-block model at 1 thread on the 2-core AMD EPYC host) and each program is
independent, so `prepare_all` hands them to `workers` spawned processes, each pinned to one torch
thread. Timing never happens here: it stays one interleaved pass in one fresh process (session.py).

A worker gets the pickled backend and program and returns the `Prepared` record; the files it
wrote are the same as an in-process `backend.prepare` would write (each is written atomically and
its delegation report last, so an interrupted pool leaves nothing `backend.reuse` would accept
half-built).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from pathlib import Path

from ditnas.console import redirect_output
from ditnas.errors import DitnasError
from ditnas.latency_models.backends.base import Backend, Prepared
from ditnas.latency_models.lowered_cache import LoweredCache
from ditnas.latency_models.programs import Program

Progress = Callable[[int, int, str], None]
# below this many programs to build, programs are built in this process: a spawned worker imports
# torch + executorch (~5 s), a block program takes 5-12 s to lower and a whole model 30-40 s here, so
# two programs on two cores already finish sooner in a pool
MIN_PROGRAMS_FOR_POOL = 2


def default_workers() -> int:
    """Worker processes for lowering: one per core this process may use, at most 4 (memory)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


WORKER_LOG = "lowering_workers.log"


def init_worker(log_path: str) -> None:
    # what the toolchain prints on import and per program (torchao, cpuinfo, pytree warnings) goes to
    # a log beside the artifacts, not the user's terminal; errors come back as the task's exception
    redirect_output(log_path)
    import torch

    from ditnas.console import quiet_third_party

    quiet_third_party()
    torch.set_num_threads(1)  # n workers x 1 thread: no oversubscription of the cores


def _prepare_one(backend: Backend, program: Program, workdir: Path) -> Prepared:
    return backend.prepare([program], workdir)[0]


def prepare_all(backend: Backend, programs: Sequence[Program], workdir: Path, *, workers: int = 1,
                progress: Progress | None = None, cache: LoweredCache | None = None) -> list[Prepared]:
    """`Prepared` for every program, in the order given: reused from `workdir` when built before,
    else copied from `cache` when it holds the same program, else built (`workers` > 1: in that many
    spawned processes) and stored in `cache`. `progress(done, total, key)`."""
    total = len(programs)
    out: dict[int, Prepared] = {}
    todo: list[int] = []
    cached = 0
    for i, program in enumerate(programs):
        reused = backend.reuse(program, workdir)
        if reused is None and cache is not None and cache.fetch(backend, program, workdir):
            reused = backend.reuse(program, workdir)
            cached += reused is not None
        if reused is not None:
            out[i] = reused
        else:
            todo.append(i)
    done = len(out)
    if progress and done:
        progress(done, total, f"{done - cached} built earlier, reused" + (f"; {cached} from the cache {cache.root}"
                                                                          if cached else ""))

    def built(i: int, item: Prepared) -> None:
        out[i] = item
        if cache is not None:
            cache.store(backend, programs[i], workdir)

    if workers <= 1 or len(todo) < MIN_PROGRAMS_FOR_POOL:
        for i in todo:
            if progress:
                progress(done, total, programs[i].key())
            built(i, backend.prepare([programs[i]], workdir)[0])
            done += 1
    else:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        context = multiprocessing.get_context("spawn")  # fork after torch/OpenMP init can deadlock
        log = Path(workdir) / WORKER_LOG
        with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=context,
                                 initializer=init_worker, initargs=(str(log),)) as pool:
            futures = {pool.submit(_prepare_one, backend, programs[i], Path(workdir)): i for i in todo}
            pending = set(futures)
            try:
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        i = futures[future]
                        # a worker's DitnasError re-raises here, as in-process; keep the caller's program
                        built(i, replace(future.result(), program=programs[i]))
                        done += 1
                        if progress:
                            progress(done, total, programs[i].key())
            except BrokenProcessPool:
                raise DitnasError(f"a lowering worker died (killed, or out of memory); see {log}, then rerun: "
                                  "finished programs are reused") from None
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
    return [out[i] for i in range(len(programs))]
