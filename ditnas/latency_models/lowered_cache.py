"""A per-user cache of lowered profiling programs, shared by every session and run on this machine.

Lowering dominates profiling (~15 s per block program, ~100 s per whole model here) and a program's
files depend only on what is lowered, not on the session: a second `ditnas run` or `ditnas profile`
of the same space and model dimensions in a new folder would lower exactly the same programs again.
`prepare_pool.prepare_all` looks each program up here before building it and stores what it built.

Key: the program's cell key, its input shapes, the name and shape of every parameter and buffer (the
model's dimensions), the backend and its preparation options, the lowering recipe with the tool
versions (`lowering.recipe_fingerprint`) and the machine architecture. Weight *values* are not in the
key, on purpose: latency depends on shapes (the same reason `ditnas run` lowers from a fresh supernet
while the real one trains); each entry passed the backend's parity check when it was built.

Location: `$DITNAS_CACHE_DIR`, else `$XDG_CACHE_HOME/ditnas`, else `~/.cache/ditnas`, under
`lowered/<key[:2]>/<key>/` (`DITNAS_CACHE_DIR=off`: no cache). An entry is published by renaming a finished folder into place, and
copied out file by file with the delegation report last, so neither a killed store nor a killed fetch
leaves anything `backend.reuse` would accept half-built. `latency.lowering_cache: false` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import uuid
from pathlib import Path

from ditnas.latency_models.backends.base import Backend
from ditnas.latency_models.programs import Program

REPORT_SUFFIX = ".delegation.json"  # written last by the backend: copied last here too


def default_root() -> Path | None:
    """The cache folder, or None when `DITNAS_CACHE_DIR=off` (the test suite sets it: hermetic timings)."""
    if os.environ.get("DITNAS_CACHE_DIR") == "off":
        return None
    if os.environ.get("DITNAS_CACHE_DIR"):
        return Path(os.environ["DITNAS_CACHE_DIR"])
    base = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "ditnas"


class LoweredCache:
    """Lowered program files by content key; only backends with `cache_files` take part."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @classmethod
    def default(cls) -> LoweredCache | None:
        root = default_root()
        return None if root is None else cls(root)

    @staticmethod
    def supports(backend: Backend) -> bool:
        return callable(getattr(backend, "cache_files", None))

    def key(self, backend: Backend, program: Program) -> str:
        shapes = {name: list(t.shape) for name, t in program.module.state_dict().items()}
        payload = {
            "cell": program.key(),
            "inputs": [list(t.shape) for t in program.inputs],
            "module": type(program.module).__qualname__,
            "state_shapes": shapes,
            "backend": backend.name,
            "options": getattr(backend, "cache_options", dict)(),
            "tools": backend.tool_versions(),
            "machine": platform.machine(),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def _entry(self, key: str) -> Path:
        return self.root / "lowered" / key[:2] / key

    def fetch(self, backend: Backend, program: Program, workdir: Path) -> bool:
        """Copy a cached build of `program` into `workdir`; whether there was one."""
        if not self.supports(backend):
            return False
        entry = self._entry(self.key(backend, program))
        try:
            files = sorted(entry.iterdir(), key=lambda p: p.name.endswith(REPORT_SUFFIX)) if entry.is_dir() else []
            if not any(p.name.endswith(REPORT_SUFFIX) for p in files):
                return False
            workdir = Path(workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            for src in files:  # the report last: until it lands, reuse() sees nothing
                tmp = workdir / f".{src.name}.{uuid.uuid4().hex[:8]}.tmp"
                shutil.copyfile(src, tmp)
                os.replace(tmp, workdir / src.name)
        except OSError:
            return False  # an unreadable cache is a miss, never an error
        return True

    def store(self, backend: Backend, program: Program, workdir: Path) -> None:
        """Publish the files `backend` built for `program` in `workdir` (no-op if already cached)."""
        if not self.supports(backend):
            return
        entry = self._entry(self.key(backend, program))
        files = backend.cache_files(program, Path(workdir))
        if entry.is_dir() or not files:
            return
        staging = entry.parent / f".{entry.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            staging.mkdir(parents=True)
            for src in files:
                shutil.copyfile(src, staging / src.name)
            os.replace(staging, entry)  # atomic publish; loses harmlessly to a concurrent store
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)  # a full or read-only cache never fails a profile
