"""Time whole generations of a session's whole-model archs: the rows the generation pricing is fitted on.

For each whole-model arch of the session, each guidance mode of `latency.guidance` and each step count
of `latency.generation_steps`, `latency.generation_iters` generations are timed back to back
(generation.py: the sampler's host loop, the x of one step fed to the next):

- executorch-xnnpack: `none` reuses the session's lowered batch-1 model program (its .pte went through
  the recipe); `cfg` lowers the exported sampler's denoiser (`generation.DenoiserProgram`, the batch-2
  [cond, null] call and the combination inside) into `<session>/generations/`. Timed in a fresh process.
- host-torch: the same loop over the eager module, in this process, at the session's threads.
- phone backends: not timed here (their tables price generations uncalibrated, and refuse `cfg`).

Raw samples go to `<session>/generations.parquet` (atomically, after each (arch, guidance)), so an
interrupted run resumes and a finished key is never timed twice.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

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


def _pte_for(session: ProfilingSession, supernet: ElasticDiT, arch: Arch, guidance: str, cfg_scale: float) -> Path:
    """The .pte one generation of `arch` with `guidance` runs (lowered with the recipe, reused if present)."""
    from ditnas.latency_models.backends.executorch_xnnpack import file_stem
    from ditnas.latency_models.generation import DenoiserProgram
    from ditnas.latency_models.lowering import check_recipe, lower, write_pte
    from ditnas.latency_models.programs import model_cell

    if guidance == "none":
        pte = session.artifacts_dir / f"{file_stem(model_cell(supernet, arch).key())}.pte"
        if not pte.is_file():
            raise DitnasError(f"session {session.root}: the model program of {arch} has no .pte ({pte}); rerun "
                              "`ditnas profile` on the session so it lowers it")
        check_recipe(pte)
        return pte
    pte = session.root / "generations" / f"{file_stem(generation_key(str(arch), 0, guidance))}_cfg{cfg_scale:g}.pte"
    if pte.is_file():
        try:
            check_recipe(pte)
            return pte
        except DitnasError:
            pass  # another recipe or tool version: lower again
    sub = supernet.extract(arch).eval()
    x, t, y = _model_inputs(supernet, 0)
    lowered = lower(DenoiserProgram(sub, cfg_scale), (x, t, y), what=f"cfg denoiser of {arch}")
    pte.parent.mkdir(parents=True, exist_ok=True)
    return write_pte(lowered, pte, extra={"generation": {"kind": "denoiser", **DenoiserProgram(sub, cfg_scale).describe()}})


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


def measure_generations(
    supernet: ElasticDiT,
    archs: list[Arch],
    cfg: LatencyConfig,
    session: ProfilingSession,
    *,
    cfg_scale: float = 2.0,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """Time whole generations of `archs` into `<session>/generations.parquet`; returns every sample."""
    backend = session.device.get("backend")
    samples = read_generation_samples(session.root)
    if backend not in TIMED_BACKENDS or not cfg.guidance or not archs:
        return samples
    threads = int(session.device.get("threads") or cfg.threads)
    done = set(samples["key"])
    jobs = [(arch, g, s) for arch in archs for g in cfg.guidance for s in sorted(set(cfg.generation_steps))]
    todo = [(a, g, s) for a, g, s in jobs if generation_key(str(a), s, g) not in done]
    by_arch: dict[str, list[tuple[Arch, str, int]]] = {}
    for job in todo:
        by_arch.setdefault(str(job[0]), []).append(job)
    for i, (arch_text, arch_jobs) in enumerate(by_arch.items()):
        arch = arch_jobs[0][0]
        if progress:
            progress(i, len(by_arch), f"generations: {arch}")
        if backend == "host-torch":
            from ditnas.latency_models.generation import DenoiserProgram

            times = {}
            for _, guidance, steps in arch_jobs:
                scale = cfg_scale if guidance == "cfg" else 0.0
                module = DenoiserProgram(supernet.extract(arch).eval(), scale)
                times[generation_key(arch_text, steps, guidance)] = _time_eager(module, supernet, steps, scale, threads, 1,
                                                                                cfg.generation_iters)
        else:
            jobs = []
            for _, guidance, steps in arch_jobs:
                scale = cfg_scale if guidance == "cfg" else 0.0
                jobs.append((generation_key(arch_text, steps, guidance), _pte_for(session, supernet, arch, guidance, scale),
                             steps, scale))
            times = time_generations_in_fresh_process(jobs, threads, 1, cfg.generation_iters)
        frames = [samples] if len(samples) else []
        for _, guidance, steps in arch_jobs:
            key = generation_key(arch_text, steps, guidance)
            frames.append(pd.DataFrame({"key": key, "arch": arch_text, "steps": int(steps), "guidance": guidance,
                                        "threads": threads, "run": range(len(times[key])), "ms": times[key]}))
        samples = pd.concat(frames, ignore_index=True)
        _write(session.root, samples)  # after each arch: an interrupted run keeps every finished arch
    if progress and todo:
        progress(len(by_arch), len(by_arch), "generations timed")
    return samples


if __name__ == "__main__":
    from ditnas.latency_models.backends.fresh_process import serve

    sys.exit(serve(_job, sys.argv[1:3]))
