"""The one interface every device backend implements (design.md §2, after nn-Meter's
Backend / Profiler / Parser split):

    prepare(programs, workdir) -> list[Prepared]   build what the device runs (.pte, a module, ...)
    measure(prepared, warmup, iters) -> rows       one row per timed sample: key, iteration, latency_ms
    reuse(program, workdir) -> Prepared | None     what an earlier (interrupted) run already built
    parse(artifact) -> rows                        ingest a file the device produced (ETDump, JSON, log)
    info() -> dict                                 who measured: device, OS, backend, precision, threads, versions

Adding a phone type means adding one file that subclasses `Backend` and one line in `_REGISTRY`.
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
import random
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, ClassVar

from ditnas.errors import DitnasError
from ditnas.latency_models.programs import Program

# Columns every measured sample row carries (the session adds cell fields and device columns).
SAMPLE_COLUMNS = ("key", "iteration", "latency_ms")


@dataclass
class Prepared:
    """A program made ready for one backend: files on disk and/or an in-memory handle."""

    program: Program
    artifacts: dict[str, Path] = field(default_factory=dict)  # e.g. {"pte": ..., "etrecord": ...}
    report: dict[str, Any] = field(default_factory=dict)  # e.g. delegation counts, parity error
    handle: Any = None  # backend-specific (a module, a loaded program, ...)

    def key(self) -> str:
        return self.program.key()


def check_counts(warmup: int, iters: int) -> None:
    if warmup < 0 or iters < 1:
        raise DitnasError(f"measure: warmup={warmup} must be >= 0 and iters={iters} >= 1")


def interleaved_rounds(
    calls: Sequence[tuple[str, Callable[[], object]]], warmup: int, iters: int, *, per_round: int = 1, seed: int = 0
) -> list[dict[str, Any]]:
    """Time every call `iters` times, interleaved: after `warmup` untimed calls each, rounds visit the
    calls in a fresh seeded order and time `per_round` consecutive runs of each, until all have `iters`.

    Why interleaved: timed one after another, the 144 programs of the default space spanned ~35 min
    of a shared VM whose speed drifted; whole models timed last came out 1.5-2.1x the sum of their
    blocks timed first. In one interleaved pass a drift hits every program alike.
    Why one run per round (the default): each call then finds the caches as other programs left
    them, as a block does inside a whole model. Measured on the default space (42 whole models,
    12 calibrate / 30 held out, 200 random splits): calibrated within +-10% 0.995 and median |err|
    1.6% with one run per round, 0.93-0.98 and 2.5% with three; the raw sum then overestimates by
    ~30% (per-call overhead, cold caches), a bias the whole-model calibration removes.
    """
    check_counts(warmup, iters)
    if per_round < 1:
        raise DitnasError(f"measure: per_round={per_round} must be >= 1")
    for _, call in calls:
        for _ in range(warmup):
            call()
    rng = random.Random(seed)
    times: dict[str, list[float]] = {key: [] for key, _ in calls}
    order = list(range(len(calls)))
    while any(len(t) < iters for t in times.values()):
        rng.shuffle(order)
        for index in order:
            key, call = calls[index]
            for _ in range(min(per_round, iters - len(times[key]))):
                t0 = time.perf_counter_ns()
                call()
                times[key].append((time.perf_counter_ns() - t0) / 1e6)
    return [{"key": key, "iteration": i, "latency_ms": ms} for key, t in times.items() for i, ms in enumerate(t)]


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The host CPU's model name (Linux /proc/cpuinfo; platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_info() -> dict[str, Any]:
    return {
        "device_id": socket.gethostname(),
        "device_model": cpu_model(),
        "os": platform.platform(),
        "arch": platform.machine(),
        "python": platform.python_version(),
    }


class Backend(ABC):
    """A place programs are timed. Subclasses set `name`, `requires` and the three verbs."""

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()  # Python packages the runtime needs (import names)
    precision: ClassVar[str] = "fp32"
    compute_unit: ClassVar[str] = "cpu"
    # True when timing is local and cheap next to building: then every timing pass of a session
    # re-times all its programs together, so one machine state prices a whole table
    retimes_session: ClassVar[bool] = False

    def __init__(self, threads: int = 1) -> None:
        if int(threads) < 1:
            raise DitnasError(f"backend {self.name}: threads={threads} must be >= 1")
        # 1 thread is the stable choice on a shared machine (xnnpack-notes.md: eager torch at 2
        # threads on a busy 2-core host was 3-200x slower); tables are built at one fixed count
        self.threads = int(threads)

    @abstractmethod
    def prepare(self, programs: list[Program], workdir: Path) -> list[Prepared]:
        """Build what the device runs; write any files under `workdir` atomically."""

    @abstractmethod
    def measure(self, prepared: list[Prepared], warmup: int, iters: int) -> list[dict[str, Any]]:
        """Run each prepared program `warmup` untimed then `iters` timed times; one row per timed run."""

    def reuse(self, program: Program, workdir: Path) -> Prepared | None:
        """`program` as an earlier run left it built under `workdir`, or None to prepare it anew."""
        return None

    def parse(self, artifact: Path) -> list[dict[str, Any]]:
        """Rows from a file the device produced. Backends without an artifact format refuse."""
        raise DitnasError(f"backend {self.name} reads no artifact files ({artifact}); ingest it with the backend that made it")

    def tool_versions(self) -> dict[str, str | None]:
        return {"torch": package_version("torch")}

    def device(self) -> dict[str, Any]:
        """Which device runs the programs: device_id, device_model, os, ... (this host by default)."""
        return host_info()

    def info(self) -> dict[str, Any]:
        """Everything a table needs to say where it was measured (goes into the session manifest)."""
        return {
            **self.device(),
            "backend": self.name,
            "precision": self.precision,
            "compute_unit": self.compute_unit,
            "threads": self.threads,
            "tool_versions": self.tool_versions(),
        }

    @classmethod
    def missing_requirements(cls) -> list[str]:
        return [pkg for pkg in cls.requires if importlib.util.find_spec(pkg) is None]


# name -> (module, class, pip requirement to name in the error)
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "host-torch": ("ditnas.latency_models.backends.host_torch", "HostTorchBackend", "torch"),
    "executorch-xnnpack": (
        "ditnas.latency_models.backends.executorch_xnnpack",
        "ExecuTorchXnnpackBackend",
        "executorch==1.5.1 (with torch==2.13.0)",
    ),
}


def backend_names() -> list[str]:
    return sorted(_REGISTRY)


def register_backend(name: str, module: str, cls: str, install: str) -> None:
    """Make `get_backend(name)` find a backend class defined outside this package."""
    _REGISTRY[name] = (module, cls, install)


def backend_class(name: str) -> type[Backend]:
    if name not in _REGISTRY:
        raise DitnasError(f"unknown backend {name!r}; available: {', '.join(backend_names())}")
    module, cls_name, install = _REGISTRY[name]
    cls = getattr(importlib.import_module(module), cls_name)
    missing = cls.missing_requirements()
    if missing:
        raise DitnasError(
            f"backend {name!r} needs the Python package(s) {', '.join(missing)} which are not installed; "
            f"pip install {install}"
        )
    return cls


def get_backend(name: str, **kwargs: Any) -> Backend:
    """A backend by registry name, e.g. get_backend('executorch-xnnpack', threads=1)."""
    return backend_class(name)(**kwargs)
