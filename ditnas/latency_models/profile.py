"""`ditnas profile` as a stage: measure every cell of a search space (+ whole models) on one backend.

What is measured, each as a standalone program (programs.py): every op x width x MLP ratio x stage
block the space can produce, the patch embedding, the final layer and both resolution transitions at
every stream width, plus whole-model programs for a seeded sample of archs (max, mid, min and random
ones) — the rows the predictor's whole-model calibration is fitted on. The session is resumable:
rerunning the same command builds only what is missing, then times the session in one pass.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any
from dataclasses import asdict
from pathlib import Path

from ditnas.arch import Arch, SearchSpace
from ditnas.config import LatencyConfig, RunConfig, SampleConfig
from ditnas.errors import ConfigFieldError, DitnasError
from ditnas.latency_models.backends import get_backend
from ditnas.latency_models.generation_profile import measure_generations
from ditnas.latency_models.programs import (
    KINDS,
    Cell,
    build_program,
    cells_for_space,
    model_cell,
)
from ditnas.latency_models.session import ProfilingSession
from ditnas.supernet.model import ElasticDiT

Progress = Callable[[int, int, str], None]
DEFAULT_KINDS = ("block", "patch_embed", "final", "down", "up")


def supernet_for_profiling(cfg: RunConfig, checkpoint: Path | None = None) -> ElasticDiT:
    """A trained supernet (checkpoint) or a freshly initialised one built from the run config.

    Latency does not depend on weight values, so a fresh supernet prices the same cells; the data
    section of the config only fixes the latent shape and the number of classes.
    """
    if checkpoint is not None:
        from ditnas.supernet.train import load_supernet

        model, _, _ = load_supernet(checkpoint)
        return model
    from ditnas.data import load_split
    from ditnas.supernet.train import build_space

    split = load_split(cfg.data)
    return ElasticDiT(build_space(cfg, split), cfg.model).eval()


def sample_archs(space: SearchSpace, n: int, seed: int = 0) -> list[Arch]:
    """`n` distinct archs: max, mid and min first (the corners), then seeded random ones."""
    rng = random.Random(seed)
    archs: list[Arch] = []
    for arch in (space.max_arch(), space.mid_arch(), space.min_arch()):
        if arch not in archs and len(archs) < n:
            archs.append(arch)
    attempts = 0
    while len(archs) < n and attempts < 100 * n:
        arch = space.sample(rng)
        attempts += 1
        if arch not in archs:
            archs.append(arch)
    return archs


def profile_space(
    supernet: ElasticDiT,
    cfg: LatencyConfig,
    out: Path,
    *,
    kinds: tuple[str, ...] = DEFAULT_KINDS,
    progress: Progress | None = None,
    backend_options: dict | None = None,
    cfg_scale: float = SampleConfig.cfg_scale,
) -> ProfilingSession:
    """Measure the space's cells and `cfg.models` whole models into the session folder `out`, then
    time whole generations of those models (`cfg.guidance` x `cfg.generation_steps`; guidance `cfg`
    at `cfg_scale`, the sampler's) for the generation pricing (generation_profile.py)."""
    session, backend, cells, archs = _open_session(supernet, cfg, out, kinds, backend_options)
    seed = cfg.seed
    if not {c.key() for c in cells} <= session.measured_keys():  # else nothing new: no timing pass
        # every program of the session (old ones too) is timed in one interleaved pass (session.py)
        session.run([build_program(supernet, cell, seed=seed) for cell in cells], backend,
                    rebuild=lambda cell: build_program(supernet, cell, seed=seed), progress=progress,
                    workers=lowering_workers(cfg), cache=lowering_cache(cfg))
    measure_generations(supernet, archs, cfg, session, cfg_scale=cfg_scale, progress=progress,
                        workers=lowering_workers(cfg))
    if cfg.stream_chunk and session.device.get("backend") == "executorch-xnnpack":  # streams run on its runtime
        from ditnas.latency_models.stream_latency import measure_streams

        threads = int(session.device.get("threads") or cfg.threads)
        # the same seeded sequence as the whole-model rows (max, mid, min, random), as long as stream_models asks
        stream_archs = sample_archs(supernet.space, cfg.stream_models, cfg.seed)
        measure_streams(supernet, stream_archs, cfg.stream_chunk, cfg.stream_steps, threads,
                        cfg.generation_iters, session.root, progress=progress, seed=cfg.seed,
                        repeats=cfg.generation_repeats)
    return session


def lower_space(supernet: ElasticDiT, cfg: LatencyConfig, out: Path, *, kinds: tuple[str, ...] = DEFAULT_KINDS,
                progress: Progress | None = None, backend_options: dict | None = None) -> int:
    """Build every program `profile_space` will time into its session folder `out`, timing none;
    returns how many. Latency does not depend on weights, so a pipeline runs this on a fresh supernet
    while the real one trains, and `profile_space` then only times."""
    session, backend, cells, _ = _open_session(supernet, cfg, out, kinds, backend_options)
    missing = sorted((c for c in cells if c.key() not in session.measured_keys()), key=lowering_cost, reverse=True)
    todo = [build_program(supernet, cell, seed=cfg.seed) for cell in missing]
    return len(session.prepare(todo, backend, workers=lowering_workers(cfg), progress=progress,
                               cache=lowering_cache(cfg)))


def lowering_cost(cell: Cell) -> tuple[int, float]:
    """Sort key, larger = slower to lower: whole models (30-40 s each here), then blocks by size (5-12 s),
    then the transitions (~1 s). Lowering the slowest first leaves the cheap programs for last, so when a
    background lowering is stopped (training finished first) little work is lost and what remains
    spreads evenly over the profile stage's worker processes."""
    rank = {"model": 2, "block": 1}.get(cell.kind, 0)
    return rank, cell.width * (1.0 + cell.mlp_ratio)


def lowering_workers(cfg: LatencyConfig) -> int:
    from ditnas.latency_models.prepare_pool import default_workers

    return cfg.workers or default_workers()


def lowering_cache(cfg: LatencyConfig) -> Any:
    """The per-user cache of lowered programs (lowered_cache.py), or None when turned off."""
    from ditnas.latency_models.lowered_cache import LoweredCache

    return LoweredCache.default() if cfg.lowering_cache else None


def _open_session(supernet: ElasticDiT, cfg: LatencyConfig, out: Path, kinds: tuple[str, ...],
                  backend_options: dict | None) -> tuple[ProfilingSession, Any, list[Cell], list[Arch]]:
    """The session folder (created or reopened), its backend, and the cells and whole-model archs to measure."""
    cfg.check()
    options = dict(backend_options or {})
    if cfg.backend == "executorch-xnnpack":
        options.setdefault("etdump", cfg.op_events)  # the ETRecord follows it (executorch_xnnpack.py)
    backend = get_backend(cfg.backend, threads=cfg.threads, **options)
    model = json.loads(json.dumps(asdict(supernet.cfg)))  # as the manifest stores it (tuples -> lists)
    session = ProfilingSession.open(out, backend, warmup=cfg.warmup, iters=cfg.iters,
                                    notes={"space": str(supernet.space.max_arch()), "model": model,
                                           "n_models": cfg.models, "seed": cfg.seed})
    # cell keys name op/width/ratio/tokens/stage, not the model's dimensions: a session of another
    # model would pass its cells (and reuse its .pte files) off as this one's
    was = session.manifest.get("notes", {}).get("model")
    if was is not None and was != model:
        changed = ", ".join(f"{k} {was.get(k)!r} -> {v!r}" for k, v in model.items() if was.get(k) != v)
        raise DitnasError(f"session {out} profiled another model ({changed}); its cells do not price this one -- "
                          "choose a new --out folder")
    cell_kinds = tuple(k for k in kinds if k in KINDS and k not in ("model", "stream_block"))
    cells = cells_for_space(supernet.space, kinds=cell_kinds)
    if cfg.stream_chunk:  # clips: every cell of a streamed chunk call too (stream_latency.py)
        if supernet.space.latent[1] < 2:
            raise ConfigFieldError("latency.stream_chunk", f"{cfg.stream_chunk}: the space's latent has one frame (images); "
                                   "streaming prices clips (data.frames > 1)")
        cells += cells_for_space(supernet.space, kinds=cell_kinds, chunk=cfg.stream_chunk, positions=cfg.stream_positions)
    archs = sample_archs(supernet.space, cfg.models, cfg.seed)
    cells += [model_cell(supernet, arch) for arch in archs]
    return session, backend, cells, archs
