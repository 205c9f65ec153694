"""Moved to ditnas/latency_models/stream_programs.py (the latency tables price the chunk programs the export ships)."""

from ditnas.latency_models.stream_programs import *  # noqa: F401,F403
from ditnas.latency_models.stream_programs import (  # noqa: F401
    _stream_generate,
    _timing_job,
    cache_from_flat,
    example_chunks,
    export_stream_programs,
    run_stream_pte,
    stream_fps_host,
    stream_generate_eager,
    time_stream_in_fresh_process,
)
