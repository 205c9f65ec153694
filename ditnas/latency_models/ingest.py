"""Ingest files a device produced into a profiling session (`ditnas profile ingest <artifacts> --session <dir>`).

Formats are plug-ins: each backend lists the artifact formats its device writes (`Backend.formats`)
and reads them itself (`sniff`, `read_artifact`, in the backend's own file). This module only loops
over the registry (`backends.base.artifact_backends`): every registered backend's `sniff` is asked
about each file, from its content (not its extension). A file no backend claims is a DitnasError
naming the file and every format tried; a file two backends claim is one too, naming both.

| format                  | backend (file)                             | samples taken                                    |
|-------------------------|--------------------------------------------|--------------------------------------------------|
| `etdump`                | executorch-xnnpack (executorch_xnnpack.py) | `Method::execute` per run, minus warm-up runs    |
| `minibench-json`        | android-adb (android_adb.py)               | `avg_inference_latency(ms)`: ONE row per model   |
| `coreml-benchmark-json` | coreml (coreml.py)                         | `predict.samples` (ms)                           |
| `xcodebuild-log`        | ios (ios_xcodebuild.py)                    | forward tests' `Clock Monotonic Time` values     |

Adding a phone type: one file under `backends/` with a registered `Backend` subclass that sets
`formats` and implements `sniff` and `read_artifact` (docs/latency.md, "Phone artifacts").

Everything is parsed before anything is written, so a bad file leaves the session untouched. A key
already in the session is skipped (or replaced with `replace=True`): a program is never stored
twice. Every ingest is logged in the manifest under `ingested` (file, format, keys, rows, whether the
rows are per-run samples or per-file averages).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from ditnas.errors import DitnasError
from ditnas.latency_models.artifacts import ArtifactProbe, ParsedArtifact
from ditnas.latency_models.backends.base import (
    ArtifactFormat,
    Backend,
    artifact_backends,
    artifact_formats,
    get_backend,
)
from ditnas.latency_models.session import (
    SAMPLES,
    ProfilingSession,
    _typed,
    write_samples,
)

__all__ = ["IngestReport", "ParsedArtifact", "detect_format", "ingest", "known_formats", "read_artifact", "session_for_artifacts"]


@dataclass
class IngestReport:
    files: list[dict[str, Any]]
    added: dict[str, int]  # key -> rows appended
    skipped: list[str]  # keys already in the session (not replaced)
    replaced: list[str]

    @property
    def rows(self) -> int:
        return sum(self.added.values())


def known_formats() -> dict[str, ArtifactFormat]:
    """Every artifact format a registered backend reads, by name."""
    return {name: fmt for name, (fmt, _) in artifact_formats().items()}


def _feeds(fmt: str) -> tuple[str, ...]:
    return artifact_formats()[fmt][0].feeds


def _claim(path: Path) -> tuple[str, type[Backend]]:
    """(format, backend class) of the one registered backend whose `sniff` recognises the file."""
    probe = ArtifactProbe(path)  # a missing file is refused here, naming it
    claims: list[tuple[str, type[Backend]]] = []
    for cls in artifact_backends():
        fmt = cls.sniff(probe)
        if fmt is None:
            continue
        if fmt not in {f.name for f in cls.formats}:
            raise DitnasError(f"backend {cls.name!r} sniffed {path} as {fmt!r}, a format it does not list in `formats`; fix its sniff")
        claims.append((fmt, cls))
    if not claims:
        tried = "; ".join(f"{name}: {f.description}" for name, f in known_formats().items())
        raise DitnasError(f"artifact {path} is in no format ditnas reads; known formats: {tried}")
    if len(claims) > 1:
        who = ", ".join(f"{fmt} ({cls.name}, {cls.__module__})" for fmt, cls in claims)
        raise DitnasError(f"artifact {path} is claimed by several formats: {who}; make those backends' sniff stricter")
    return claims[0]


def detect_format(path: Path | str) -> str:
    """The format of a device file, from its content. Unknown or unreadable: DitnasError."""
    return _claim(Path(path))[0]


def read_artifact(path: Path | str, *, etdump_warmup: int | None = None) -> ParsedArtifact:
    """Detect and parse one device file into rows and per-key samples (by the backend that reads it).

    etdump_warmup: leading runs of an ETDump to drop when no `.run.json` sidecar says (readers of
    other formats ignore it)."""
    path = Path(path)
    fmt, cls = _claim(path)
    parsed = cls.read_artifact(path, fmt, etdump_warmup=etdump_warmup)
    if not isinstance(parsed, ParsedArtifact) or parsed.format != fmt:
        raise DitnasError(f"backend {cls.name!r} read {path} but returned no ParsedArtifact of format {fmt!r}; fix its read_artifact")
    return parsed


def _check_session(parsed: ParsedArtifact, session: ProfilingSession) -> None:
    backend = session.device.get("backend")
    feeds = _feeds(parsed.format)
    if backend not in feeds:
        raise DitnasError(
            f"artifact {parsed.path} ({parsed.format}) comes from {'/'.join(feeds)}, "
            f"but session {session.root} is a {backend} session; ingest it into a session of that backend"
        )
    have, got = session.device.get("device_model"), parsed.device.get("device_model")
    if have and got and str(have) != str(got):
        raise DitnasError(
            f"artifact {parsed.path} was measured on {got!r}, session {session.root} on {have!r}; keep one device per session"
        )


def ingest(
    artifact_paths: Iterable[Path | str],
    session: ProfilingSession,
    *,
    etdump_warmup: int | None = None,
    replace: bool = False,
) -> IngestReport:
    """Parse every artifact, then append its samples to `session` under the program keys it names.

    etdump_warmup: leading runs of an ETDump to drop when no `.run.json` sidecar says (default 0).
    replace: re-ingesting a key replaces its rows instead of skipping it.
    """
    paths = [Path(p) for p in artifact_paths]
    if not paths:
        raise DitnasError("ingest: no artifact files given")
    parsed = [read_artifact(p, etdump_warmup=etdump_warmup) for p in paths]
    seen: dict[str, Path] = {}
    for art in parsed:
        _check_session(art, session)
        for key in art.samples:
            if key in seen:
                raise DitnasError(f"ingest: {key} is in both {seen[key]} and {art.path}; ingest one measurement of a program at a time")
            seen[key] = art.path
    old = session.samples()
    existing = set(old["key"].unique())
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    frames, added, skipped, replaced, log = [], {}, [], [], []
    for art in parsed:
        keys = []
        for key, values in art.samples.items():
            if key in existing and not replace:
                skipped.append(key)
                continue
            if key in existing:
                replaced.append(key)
            keys.append(key)
            added[key] = len(values)
            frames.append(
                pd.DataFrame(
                    [
                        {
                            **art.cells[key],
                            "session_id": session.session_id,
                            "iteration": i,
                            "latency_ms": float(v),
                            "backend": session.device["backend"],
                            "device": session.device.get("device_id") or "",
                            "threads": int(session.device["threads"]),
                            "measured_at": stamp,
                        }
                        for i, v in enumerate(values)
                    ]
                )
            )
        log.append(
            {
                "file": str(art.path),
                "format": art.format,
                "keys": keys,
                "rows": sum(added[k] for k in keys),
                "aggregate": art.aggregate,
                "ignored": art.ignored,
                "ingested_at": stamp,
            }
        )
    if frames:
        kept = old[~old["key"].isin(replaced)] if replaced else old
        new = _typed(pd.concat(frames, ignore_index=True))
        table = new if kept.empty else pd.concat([kept, new], ignore_index=True)
        write_samples(session.root / SAMPLES, table)  # parquet first: it is the truth
    session.manifest.setdefault("ingested", []).extend(log)
    session._write_manifest()
    return IngestReport(files=[{"file": str(a.path), "format": a.format} for a in parsed], added=added, skipped=skipped, replaced=replaced)


def session_for_artifacts(
    root: Path | str,
    artifact_paths: Sequence[Path | str],
    *,
    threads: int = 1,
    warmup: int = 0,
    iters: int = 0,
    etdump_warmup: int | None = None,
) -> ProfilingSession:
    """The session at `root`, or a new one whose device comes from the artifacts themselves.

    The backend is the first of the first artifact's `ArtifactFormat.feeds` that every artifact may
    feed; it is built with `get_backend(name, threads=..., device_info=...)`.

    # assumption: an artifact-made session's device_id is the device model the files name (minibench
    # and the iOS log carry no serial/UDID), and `threads` is what the caller says the app used.
    """
    root = Path(root)
    if (root / "manifest.json").exists():
        return ProfilingSession.load(root)
    parsed = [read_artifact(Path(p), etdump_warmup=etdump_warmup) for p in artifact_paths]
    backends = set(_feeds(parsed[0].format)) if parsed else set()
    for a in parsed:
        backends &= set(_feeds(a.format))
    device = next((a.device for a in parsed if a.device.get("device_model")), None)
    if not backends or device is None:
        raise DitnasError(
            f"ingest: cannot tell one device from {[str(a.path) for a in parsed]} (formats "
            f"{sorted({a.format for a in parsed})}); create the session with `ditnas profile --backend ...` first, or pass --session of one"
        )
    # the first artifact's preferred backend that every artifact may feed (ArtifactFormat.feeds order)
    backend_name = next(b for b in _feeds(parsed[0].format) if b in backends)
    info = {"device_id": device.get("device_id") or device["device_model"], **device}
    backend = get_backend(backend_name, threads=threads, device_info=info)
    if iters == 0:  # the files' own count when every program has the same number of samples
        counts = {len(v) for a in parsed for v in a.samples.values()}
        iters = counts.pop() if len(counts) == 1 else 0
    return ProfilingSession.open(root, backend, warmup=warmup, iters=iters, notes={"created_by": "ingest"})
