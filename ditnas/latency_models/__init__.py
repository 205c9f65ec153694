"""The latency stage: standalone programs per search-space cell, device backends that time them,
and profiling sessions that keep every raw sample (docs/latency.md)."""

from ditnas.latency_models.backends import Backend, Prepared, backend_names, get_backend
from ditnas.latency_models.programs import (
    Cell,
    Program,
    block_programs,
    build_program,
    cells_for_arch,
    cells_for_space,
    model_program,
    programs_for_cells,
)
from ditnas.latency_models.session import ProfilingSession, merge, summarize

__all__ = [
    "Backend",
    "Cell",
    "Prepared",
    "ProfilingSession",
    "Program",
    "backend_names",
    "block_programs",
    "build_program",
    "cells_for_arch",
    "cells_for_space",
    "get_backend",
    "merge",
    "model_program",
    "programs_for_cells",
    "summarize",
]
