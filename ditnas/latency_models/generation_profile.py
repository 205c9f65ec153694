"""Time whole generations of a session's whole-model archs: the rows the generation pricing is fitted on.

For each whole-model arch of the session, each guidance mode of `latency.guidance` and each step count
of `latency.generation_steps`, `latency.generation_iters` generations are timed (generation.py: the
sampler's host loop, the x of one step fed to the next); on executorch-xnnpack in that many rounds, each
a fresh process timing one generation of every key in a new order (`_time_in_rounds`: why):

- executorch-xnnpack: `none` reuses the session's lowered batch-1 model program (its .pte went through
  the recipe); `cfg` and `pdg` lower the exported sampler's denoiser (`generation.DenoiserProgram`: cfg's
  batch-2 [cond, null] call, or pdg's full + dense-only calls with `latency.pdg_dense` dense slots, and the
  combination inside) into `<session>/generations/` (all missing ones first, in
  `latency.workers` spawned processes: not the per-user cache, which holds table programs). Timed in a
  fresh process.
- host-torch: the same loop over the eager module, in this process, at the session's threads.
- phone backends: not timed here (their tables price generations uncalibrated, and refuse `cfg`; `pdg` is
  priced as steps x (full + dense-only per-call prediction), uncalibrated).

Raw samples go to `<session>/generations.parquet` atomically (host-torch: after each arch; xnnpack: once
all rounds are done), so an interrupted run resumes and a finished key is never timed twice.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ditnas.arch import Arch
from ditnas.config import LatencyConfig
from ditnas.errors import DitnasError
from ditnas.io import atomic_write_bytes
from ditnas.latency_models.generation_latency import GENERATIONS, SAMPLE_COLUMNS, generation_key
from ditnas.latency_models.session import ProfilingSession
from ditnas.supernet.model import ElasticDiT

TIMED_BACKENDS = ("executorch-xnnpack", "host-torch")
Progress = Callable[[int, int, str], None]


def read_generation_samples(session_root: Path) -> pd.DataFrame:
    path = Path(session_root) / GENERATIONS
    if not path.exists():
        return pd.DataFrame(columns=list(SAMPLE_COLUMNS))
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 -- pyarrow raises ArrowInvalid / OSError for truncated files
        raise DitnasError(f"{path} is unreadable or truncated ({type(exc).__name__}); delete it and rerun "
                          "`ditnas profile` on the session to time the generations again") from None


def _write(session_root: Path, samples: pd.DataFrame) -> None:
    buf = BytesIO()
    samples.to_parquet(buf, index=False)
    atomic_write_bytes(Path(session_root) / GENERATIONS, buf.getvalue())


def _model_inputs(supernet: ElasticDiT, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, *supernet.space.latent, generator=g)
    return x, torch.full((1,), 0.5), torch.zeros(1, dtype=torch.long)


def _time_eager(module: torch.nn.Module, supernet: ElasticDiT, steps: int, cfg_scale: float, threads: int,
                warmup: int, iters: int) -> list[float]:
    from ditnas.latency_models.backends.base import time_calls
    from ditnas.latency_models.backends.host_torch import fixed_torch_threads
    from ditnas.latency_models.generation import run_generation

    x, _, y = _model_inputs(supernet, 0)
    with fixed_torch_threads(threads), torch.no_grad():
        return time_calls(lambda: run_generation(module, x, y, steps, cfg_scale), warmup, iters)


def _guided_pte_path(session: ProfilingSession, arch: Arch, guidance: str, cfg_scale: float, dense: int) -> Path:
    from ditnas.latency_models.backends.executorch_xnnpack import file_stem

    stem = file_stem(generation_key(str(arch), 0, guidance, dense))
    return session.root / "generations" / f"{stem}_{guidance}{cfg_scale:g}.pte"


def _usable(pte: Path) -> bool:
    from ditnas.latency_models.lowering import check_recipe

    if not pte.is_file():
        return False
    try:
        check_recipe(pte)
        return True
    except DitnasError:
        return False  # another recipe or tool version, or an interrupted write: lower again


def _lower_guided_denoiser(sub: torch.nn.Module, guidance: str, cfg_scale: float, dense: int,
                           inputs: tuple[torch.Tensor, ...], pte: Path) -> Path:
    """Lower the exported sampler's guided denoiser (cfg: batch-2 call; pdg: full + dense-only calls) of one
    subnet to `pte` (in a worker or here)."""
    from ditnas.latency_models.generation import DenoiserProgram
    from ditnas.latency_models.lowering import lower, write_pte

    program = DenoiserProgram(sub, cfg_scale, guidance=guidance, pdg_dense=dense)
    lowered = lower(program, inputs, etrecord=False, what=f"{guidance} denoiser of {sub.arch}")  # timed, never inspected
    pte.parent.mkdir(parents=True, exist_ok=True)
    return write_pte(lowered, pte, extra={"generation": program.describe()})


def lower_guided_denoisers(session: ProfilingSession, supernet: ElasticDiT, archs: list[Arch], guidance: str,
                           cfg_scale: float, *, dense: int = 1, workers: int = 1, progress: Progress | None = None) -> None:
    """Lower every missing `guidance` denoiser .pte of `archs`, in `workers` spawned processes when there are enough
    of them (each is a whole model at batch 2 or two calls: ~30-50 s here, so serial lowering was most of a
    cfg profile)."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    from ditnas.latency_models.prepare_pool import MIN_PROGRAMS_FOR_POOL, WORKER_LOG, init_worker

    path = lambda a: _guided_pte_path(session, a, guidance, cfg_scale, dense)  # noqa: E731
    todo = [a for a in archs if not _usable(path(a))]
    inputs = _model_inputs(supernet, 0)
    if workers <= 1 or len(todo) < MIN_PROGRAMS_FOR_POOL:
        for i, arch in enumerate(todo):
            if progress:
                progress(i, len(todo), f"lowering {guidance} denoiser: {arch}")
            _lower_guided_denoiser(supernet.extract(arch).eval(), guidance, cfg_scale, dense, inputs, path(arch))
        return
    log = session.root / "generations" / WORKER_LOG
    log.parent.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=get_context("spawn"),
                             initializer=init_worker, initargs=(str(log),)) as pool:
        futures = [pool.submit(_lower_guided_denoiser, supernet.extract(a).eval(), guidance, cfg_scale, dense, inputs,
                               path(a)) for a in todo]
        for i, future in enumerate(as_completed(futures)):
            future.result()  # a worker's DitnasError re-raises here; finished files stay for the rerun
            if progress:
                progress(i + 1, len(todo), f"lowering {guidance} denoisers")


def _pte_for(session: ProfilingSession, supernet: ElasticDiT, arch: Arch, guidance: str, cfg_scale: float,
             dense: int = 1) -> Path:
    """The .pte one generation of `arch` with `guidance` runs (lowered with the recipe, reused if present)."""
    from ditnas.latency_models.backends.executorch_xnnpack import file_stem
    from ditnas.latency_models.lowering import check_recipe
    from ditnas.latency_models.programs import model_cell

    if guidance == "none":
        pte = session.artifacts_dir / f"{file_stem(model_cell(supernet, arch).key())}.pte"
        if not pte.is_file():
            raise DitnasError(f"session {session.root}: the model program of {arch} has no .pte ({pte}); rerun "
                              "`ditnas profile` on the session so it lowers it")
        check_recipe(pte)
        return pte
    pte = _guided_pte_path(session, arch, guidance, cfg_scale, dense)
    if not _usable(pte):
        _lower_guided_denoiser(supernet.extract(arch).eval(), guidance, cfg_scale, dense, _model_inputs(supernet, 0), pte)
    return pte


def time_generations_in_fresh_process(jobs: list[tuple[str, Path, int, float]], threads: int, warmup: int,
                                      iters: int) -> dict[str, list[float]]:
    """`generation.time_generation` for many (key, pte, steps, cfg_scale) at once: one fresh interpreter
    (why fresh: pte_timer.py) instead of one per job, which cost ~3 s of start-up each."""
    from ditnas.latency_models.backends.fresh_process import run_fresh
    from ditnas.latency_models.generation import generation_spec

    specs = [(key, str(pte), generation_spec(Path(pte), steps, scale)) for key, pte, steps, scale in jobs]
    return run_fresh(__name__, {"jobs": specs, "threads": threads, "warmup": warmup, "iters": iters},
                     what=f"the generation timing process for {len(jobs)} programs", debug="time them one by one with "
                     "generation.time_generation(fresh_process=False) to debug")


def _job(spec: dict) -> dict[str, list[float]]:
    from ditnas.latency_models.generation import time_generation_here

    return {key: time_generation_here(Path(pte), job, spec["threads"], spec["warmup"], spec["iters"])
            for key, pte, job in spec["jobs"]}


def guidance_scale(guidance: str, cfg_scale: float) -> float:
    """The scale a guided denoiser program is built with: none runs unguided, cfg and pdg at the sampler's scale."""
    return 0.0 if guidance == "none" else cfg_scale


def _time_in_rounds(supernet: ElasticDiT, todo: list[tuple[Arch, str, int]], cfg: LatencyConfig,
                    session: ProfilingSession, samples: pd.DataFrame, threads: int, cfg_scale: float,
                    progress: Progress | None) -> pd.DataFrame:
    """`cfg.generation_iters` rounds, each a fresh process timing every (arch, guidance, steps) in a new seeded order
    (`cfg.generation_repeats` generations back to back, their median); the samples of a key are its rounds.

    Why rounds: measured on a 2-core VM (2026-12-07), the same .pte's 28-step generation timed 3 times,
    each time 5 back to back in its own fresh process, spread 1.4-8.5% (median 6.5%) between processes,
    and the machine drifted over minutes. With one process per arch, that offset lands on one arch and
    moves its every figure alike; in rounds, drift and each process's offset are spread over all archs
    and the median over rounds averages them out (the per-cell table's interleaved pass, for generations)."""
    import random

    jobs = []
    for arch, guidance, steps in todo:
        scale = guidance_scale(guidance, cfg_scale)
        jobs.append((generation_key(str(arch), steps, guidance, cfg.pdg_dense),
                     _pte_for(session, supernet, arch, guidance, scale, cfg.pdg_dense), steps, scale, arch, guidance))
    rng = random.Random(cfg.seed)
    rounds = int(cfg.generation_iters)
    for r in range(rounds):
        if progress:
            progress(r, rounds, f"generations: round {r + 1} of {rounds} ({len(jobs)} timed in a new order)")
        order = jobs[:]
        rng.shuffle(order)
        # warm-up 1: the first call of a program in a process pays its allocations; then `generation_repeats` back to
        # back, the round's sample being their median
        times = time_generations_in_fresh_process([j[:4] for j in order], threads, 1, int(cfg.generation_repeats))
        frames = [samples] if len(samples) else []
        for key, _, steps, _, arch, guidance in jobs:
            frames.append(pd.DataFrame({"key": key, "arch": str(arch), "steps": int(steps), "guidance": guidance,
                                        "threads": threads, "run": [r], "ms": [float(np.median(times[key]))]}))
        samples = pd.concat(frames, ignore_index=True)
    _write(session.root, samples)  # all rounds or none: a partial set of rounds would not be interleaved alike
    if progress:
        progress(rounds, rounds, "generations timed")
    return samples


def measure_generations(
    supernet: ElasticDiT,
    archs: list[Arch],
    cfg: LatencyConfig,
    session: ProfilingSession,
    *,
    cfg_scale: float = 2.0,
    progress: Progress | None = None,
    workers: int = 1,
) -> pd.DataFrame:
    """Time whole generations of `archs` into `<session>/generations.parquet`; returns every sample."""
    backend = session.device.get("backend")
    samples = read_generation_samples(session.root)
    if backend not in TIMED_BACKENDS or not cfg.guidance or not archs:
        return samples
    threads = int(session.device.get("threads") or cfg.threads)
    done = set(samples["key"])
    dense = cfg.pdg_dense
    jobs = [(arch, g, s) for arch in archs for g in cfg.guidance for s in sorted(set(cfg.generation_steps))]
    todo = [(a, g, s) for a, g, s in jobs if generation_key(str(a), s, g, dense) not in done]
    if not todo:
        return samples
    if backend == "executorch-xnnpack":
        for guidance in ("cfg", "pdg"):
            need = list(dict.fromkeys(a for a, g, _ in todo if g == guidance))
            if need:
                lower_guided_denoisers(session, supernet, need, guidance, cfg_scale, dense=dense, workers=workers,
                                       progress=progress)
        return _time_in_rounds(supernet, todo, cfg, session, samples, threads, cfg_scale, progress)
    # host-torch: the same loop over the eager module, in this process, one arch after another
    from ditnas.latency_models.generation import DenoiserProgram

    by_arch: dict[str, list[tuple[Arch, str, int]]] = {}
    for job in todo:
        by_arch.setdefault(str(job[0]), []).append(job)
    for i, (arch_text, arch_jobs) in enumerate(by_arch.items()):
        arch = arch_jobs[0][0]
        if progress:
            progress(i, len(by_arch), f"generations: {arch}")
        frames = [samples] if len(samples) else []
        for _, guidance, steps in arch_jobs:
            scale = guidance_scale(guidance, cfg_scale)
            module = DenoiserProgram(supernet.extract(arch).eval(), scale, guidance=guidance, pdg_dense=dense)
            key = generation_key(arch_text, steps, guidance, dense)
            ms = _time_eager(module, supernet, steps, scale, threads, 1, cfg.generation_iters)
            frames.append(pd.DataFrame({"key": key, "arch": arch_text, "steps": int(steps), "guidance": guidance,
                                        "threads": threads, "run": range(len(ms)), "ms": ms}))
        samples = pd.concat(frames, ignore_index=True)
        _write(session.root, samples)  # after each arch: an interrupted run keeps every finished arch
    if progress and todo:
        progress(len(by_arch), len(by_arch), "generations timed")
    return samples


if __name__ == "__main__":
    from ditnas.latency_models.backends.fresh_process import serve

    sys.exit(serve(_job, sys.argv[1:3]))
