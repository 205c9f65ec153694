"""The one interface every device backend implements (design.md §2, after nn-Meter's
Backend / Profiler / Parser split), and the one registry of backends:

    prepare(programs, workdir) -> list[Prepared]   build what the device runs (.pte, a module, ...)
    measure(prepared, warmup, iters) -> rows       one row per timed sample: key, iteration, latency_ms
    reuse(program, workdir) -> Prepared | None     what an earlier (interrupted) run already built
    parse(artifact) -> rows                        rows of a file the device produced (ETDump, JSON, log)
    info() -> dict                                 who measured: device, OS, backend, precision, threads, versions

and, for `ditnas profile ingest`, per artifact format the backend's device writes (`formats`):

    sniff(probe) -> format name | None             is this file one of my formats? (content, not extension)
    read_artifact(path, fmt, **opts) -> ParsedArtifact   per-program latency samples + device fields

Adding a phone type means adding one file under `backends/` whose `Backend` subclass is decorated
with `@register_backend`: the package's modules are imported on the first registry query, so no
list elsewhere names it. A backend defined outside this package calls `register_backend(cls)`.
Backend modules import their runtimes (executorch, coremltools) only inside methods, so asking the
registry never imports them.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
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
from ditnas.latency_models.artifacts import ArtifactProbe, ParsedArtifact
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


@dataclass(frozen=True)
class ArtifactFormat:
    """A file format a device writes, read by the backend that lists it in `formats`."""

    name: str  # e.g. "minibench-json": logged in the session manifest, named in errors
    description: str  # one line: what the file is and how it is recognised
    # session backends whose sessions may take its samples; the first is the one a new session is
    # made for when the artifact alone must say (`ingest.session_for_artifacts`)
    feeds: tuple[str, ...]


def check_counts(warmup: int, iters: int) -> None:
    if warmup < 0 or iters < 1:
        raise DitnasError(f"measure: warmup={warmup} must be >= 0 and iters={iters} >= 1")


def time_calls(call: Callable[[], Any], warmup: int, iters: int) -> list[float]:
    """ms of `iters` back-to-back calls of `call` after `warmup` untimed ones (one program alone)."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter_ns()
        call()
        times.append((time.perf_counter_ns() - t0) / 1e6)
    return times


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
    install: ClassVar[str] = ""  # the pip line a missing `requires` error names
    formats: ClassVar[tuple[ArtifactFormat, ...]] = ()  # artifact formats `read_artifact` reads
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

    @classmethod
    def sniff(cls, probe: ArtifactProbe) -> str | None:
        """The name of the format in `formats` that `probe`'s file is in, else None. Decide from the
        content (the probe reads and parses the file once for every backend asked)."""
        return None

    @classmethod
    def read_artifact(cls, path: Path, fmt: str, **opts: Any) -> ParsedArtifact:
        """Parse one file of format `fmt` (one of `formats`) into per-program samples. Options a
        reader does not know (e.g. etdump_warmup for a JSON reader) are ignored."""
        raise DitnasError(f"backend {cls.name} reads no artifact files ({path}); ingest it with the backend that made it")

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


# ----------------------------------------------------------------------------------------------
# The registry: backend name -> class. Filled by `@register_backend` in each backend's own file;
# the modules of this package are imported on the first query (`_discover`).
# ----------------------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Backend]] = {}
_LAZY: dict[str, tuple[str, str, str]] = {}  # name -> (module, class, pip line): imported on use
_BROKEN: dict[str, str] = {}  # backend module -> why it did not import
_discovered = False


def _check_formats(cls: type[Backend]) -> None:
    for fmt in cls.formats:
        for other in _REGISTRY.values():
            if other is not cls and other.name != cls.name and fmt.name in {f.name for f in other.formats}:
                raise DitnasError(
                    f"backend {cls.name!r} ({cls.__module__}) declares artifact format {fmt.name!r}, which backend "
                    f"{other.name!r} ({other.__module__}) already reads; give the new format another name"
                )


def register_backend(
    backend: type[Backend] | str, module: str | None = None, cls: str | None = None, install: str = ""
) -> Any:
    """Make `get_backend` and `ingest` find a backend.

    `@register_backend` on a `Backend` subclass (in its own file) registers it at import. The
    string form `register_backend(name, module, cls, install)` registers a class that is imported
    only when first asked for (for a backend whose module imports a heavy SDK at top level).
    """
    if isinstance(backend, str):
        if module is None or cls is None:
            raise DitnasError(f"register_backend({backend!r}, ...): give the module and class name of the backend")
        _LAZY[backend] = (module, cls, install)
        return None
    if not (isinstance(backend, type) and issubclass(backend, Backend)) or not backend.name:
        raise DitnasError(f"register_backend: {backend!r} is not a Backend subclass with a `name`; subclass Backend and set name")
    known = _REGISTRY.get(backend.name)
    if known is not None and known is not backend and known.__qualname__ != backend.__qualname__:
        raise DitnasError(
            f"backend name {backend.name!r} is taken by {known.__module__}.{known.__qualname__}; "
            f"give {backend.__module__}.{backend.__qualname__} another name"
        )
    _check_formats(backend)
    _REGISTRY[backend.name] = backend
    _LAZY.pop(backend.name, None)
    return backend


def unregister_backend(name: str) -> None:
    """Forget a registered backend (tests register throw-away backends)."""
    _REGISTRY.pop(name, None)
    _LAZY.pop(name, None)


def _discover() -> None:
    """Import every module of this package once, so each registers the backends it defines."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = __name__.rpartition(".")[0]
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if info.name in ("base", "pte_timer") or info.name.startswith("_"):  # the registry; a timing subprocess
            continue
        try:
            importlib.import_module(f"{package}.{info.name}")
        except ImportError as exc:  # one broken plug-in must not hide the others
            _BROKEN[f"{package}.{info.name}"] = f"{type(exc).__name__}: {exc}"


def _resolve_lazy() -> None:
    for name, (module, cls_name, install) in list(_LAZY.items()):
        try:
            cls = getattr(importlib.import_module(module), cls_name)
        except (ImportError, AttributeError) as exc:
            _BROKEN[module] = f"{type(exc).__name__}: {exc}"
            continue
        if install and not cls.install:
            cls.install = install
        register_backend(cls)


def backend_names() -> list[str]:
    _discover()
    return sorted({*_REGISTRY, *_LAZY})


def _broken_note() -> str:
    return "; modules that did not import: " + ", ".join(f"{m} ({why})" for m, why in _BROKEN.items()) if _BROKEN else ""


def backend_class(name: str) -> type[Backend]:
    _discover()
    if name in _LAZY:
        _resolve_lazy()
    if name not in _REGISTRY:
        raise DitnasError(f"unknown backend {name!r}; available: {', '.join(backend_names())}{_broken_note()}")
    cls = _REGISTRY[name]
    missing = cls.missing_requirements()
    if missing:
        raise DitnasError(
            f"backend {name!r} needs the Python package(s) {', '.join(missing)} which are not installed; "
            f"pip install {cls.install or ' '.join(missing)}"
        )
    return cls


def get_backend(name: str, **kwargs: Any) -> Backend:
    """A backend by registry name, e.g. get_backend('executorch-xnnpack', threads=1)."""
    return backend_class(name)(**kwargs)


def artifact_backends() -> list[type[Backend]]:
    """Every registered backend that reads artifact formats, by name (the order `ingest` asks them).
    Reading needs no runtime package: a Core ML JSON is read without coremltools."""
    _discover()
    _resolve_lazy()
    return [_REGISTRY[n] for n in sorted(_REGISTRY) if _REGISTRY[n].formats]


def artifact_formats() -> dict[str, tuple[ArtifactFormat, type[Backend]]]:
    """Format name -> (format, the backend that reads it), sorted by name."""
    found = {f.name: (f, cls) for cls in artifact_backends() for f in cls.formats}
    return dict(sorted(found.items()))
