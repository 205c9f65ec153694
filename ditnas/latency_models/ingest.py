"""Ingest files a device produced into a profiling session (`ditnas profile ingest <artifacts> --session <dir>`).

Each file's format is detected from its content (not trusted from its extension):

| format                  | detected by                                          | samples taken                                    |
|-------------------------|------------------------------------------------------|--------------------------------------------------|
| `etdump`                | flatbuffer identifier `ED00` at bytes 8..12           | `Method::execute` per run, minus warm-up runs    |
| `minibench-json`        | JSON list of records with `benchmarkModel`, `metric`  | `avg_inference_latency(ms)`: ONE row per model   |
| `coreml-benchmark-json` | JSON object with `format` = ditnas.coreml-benchmark/1 | `predict.samples` (ms)                           |
| `xcodebuild-log`        | text with XCTest `measured [` lines                   | forward tests' `Clock Monotonic Time` values     |

The program key comes from the names the device formats carry (`artifacts.key_from_name`), or for
an ETDump from its `<name>.run.json` sidecar (written by `android-adb` measure and
`run_on_device.sh`) when present. Everything is parsed before anything is written, so a bad file
leaves the session untouched. A key already in the session is skipped (or replaced with
`replace=True`): a program is never stored twice. Every ingest is logged in the manifest under
`ingested` (file, format, keys, rows, whether the rows are per-run samples or per-file averages).

# assumption: minibench reports averages only; its `avg_inference_latency(ms)` is stored as one row
# (iteration 0) per model and flagged `aggregate` in the manifest log, because it is the metric the
# iOS log maps to as well (ExecuTorch's extract_benchmark_results.py), keeping both phones comparable.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from ditnas.errors import DitnasError
from ditnas.latency_models.artifacts import (
    COREML_BENCHMARK_FORMAT,
    MINIBENCH_LATENCY_METRIC,
    cell_from_name,
)
from ditnas.latency_models.backends.base import get_backend
from ditnas.latency_models.backends.executorch_xnnpack import ETDUMP_MAGIC
from ditnas.latency_models.session import (
    SAMPLES,
    ProfilingSession,
    _typed,
    write_samples,
)

FORMATS: dict[str, str] = {
    "etdump": "ExecuTorch ETDump (.etdp, flatbuffer identifier ED00)",
    "minibench-json": "Android minibench benchmark_results.json (list of {benchmarkModel, metric, actualValue, targetValue, deviceInfo})",
    "coreml-benchmark-json": f"Core ML benchmark JSON (object with format={COREML_BENCHMARK_FORMAT!r})",
    "xcodebuild-log": "xcodebuild test stdout with XCTest `measured [...] average: ..., values: [...]` lines",
}
# which session backends a format may feed (an ETDump is ExecuTorch's, whichever device ran it)
FORMAT_BACKENDS: dict[str, tuple[str, ...]] = {
    "etdump": ("android-adb", "executorch-xnnpack", "ios"),
    "minibench-json": ("android-adb",),
    "coreml-benchmark-json": ("coreml",),
    "xcodebuild-log": ("ios",),
}


@dataclass
class ParsedArtifact:
    """One device file, parsed: every row it holds, and the latency samples per program key."""

    path: Path
    format: str
    rows: list[dict[str, Any]]
    samples: dict[str, list[float]]
    cells: dict[str, dict[str, Any]]
    device: dict[str, Any] = field(default_factory=dict)  # device fields the file names
    aggregate: bool = False  # True when a "sample" is a per-run average (minibench)
    ignored: list[str] = field(default_factory=list)  # names in the file that are no ditnas program


@dataclass
class IngestReport:
    files: list[dict[str, Any]]
    added: dict[str, int]  # key -> rows appended
    skipped: list[str]  # keys already in the session (not replaced)
    replaced: list[str]

    @property
    def rows(self) -> int:
        return sum(self.added.values())


def _known() -> str:
    return "; ".join(f"{name}: {text}" for name, text in FORMATS.items())


def detect_format(path: Path) -> str:
    """The format of a device file, from its content. Unknown or unreadable: DitnasError."""
    path = Path(path)
    if not path.is_file():
        raise DitnasError(f"artifact {path} does not exist (or is a folder); pass the files the device produced")
    head = path.read_bytes()[:4096]
    if head[8:12] == ETDUMP_MAGIC:
        return "etdump"
    text = head.decode("utf-8", errors="replace").lstrip()
    if text.startswith(("[", "{")):
        from ditnas.latency_models.artifacts import load_json

        data = load_json(path, "artifact")  # a truncated JSON is refused here, naming the file
        if isinstance(data, list) and data and isinstance(data[0], dict) and "benchmarkModel" in data[0]:
            return "minibench-json"
        if isinstance(data, dict) and data.get("format") == COREML_BENCHMARK_FORMAT:
            return "coreml-benchmark-json"
    elif "measured [" in path.read_text(errors="replace"):
        return "xcodebuild-log"
    raise DitnasError(f"artifact {path} is in no format ditnas reads; known formats: {_known()}")


def _sidecar(path: Path) -> dict[str, Any]:
    side = path.with_name(path.stem + ".run.json")
    if not side.is_file():
        return {}
    try:
        return json.loads(side.read_text())
    except ValueError:
        raise DitnasError(f"{side} is truncated or not JSON; delete it and pass etdump_warmup= yourself") from None


def _plan_cells(path: Path) -> dict[str, dict[str, Any]]:
    """Cell fields from an android_plan.json beside the file or one folder up (fills model archs)."""
    for folder in (path.parent, path.parent.parent):
        plan = folder / "android_plan.json"
        if plan.is_file():
            try:
                return {p["key"]: {k: p[k] for k in ("key", "kind", "op", "width", "mlp_ratio", "tokens", "stage", "arch")} for p in json.loads(plan.read_text())["programs"]}
            except (ValueError, KeyError, TypeError):
                return {}
    return {}


def _cell(key: str, plan: dict[str, dict[str, Any]], path: Path) -> dict[str, Any]:
    if key in plan:
        return plan[key]
    cell = cell_from_name(key)
    if cell is None:
        raise DitnasError(f"artifact {path}: program {key!r} is not a ditnas key; rename the file as `prepare` named it")
    return cell


def read_artifact(path: Path, *, etdump_warmup: int | None = None) -> ParsedArtifact:
    """Detect and parse one device file into rows and per-key samples."""
    path = Path(path)
    fmt = detect_format(path)
    plan = _plan_cells(path)
    samples: dict[str, list[float]] = {}
    device: dict[str, Any] = {}
    ignored: list[str] = []
    aggregate = False
    if fmt == "etdump":
        from ditnas.latency_models.backends.android_adb import execute_times
        from ditnas.latency_models.backends.executorch_xnnpack import parse_etdump

        side = _sidecar(path)
        key = side.get("key") or (cell_from_name(path.name) or {}).get("key")
        if not key:
            raise DitnasError(f"ETDump {path}: its name names no ditnas program and no {path.stem}.run.json says which; rename it <device stem>.etdp")
        rows = parse_etdump(path)
        times = execute_times(rows, path)
        warmup = int(side.get("warmup", 0) if etdump_warmup is None else etdump_warmup)
        if warmup >= len(times):
            raise DitnasError(f"ETDump {path} holds {len(times)} runs, not more than the {warmup} warm-up runs to drop; pass a smaller etdump_warmup")
        samples[key] = times[warmup:]
        device = dict(side.get("device") or {})
    elif fmt == "minibench-json":
        from ditnas.latency_models.backends.android_adb import parse_minibench_json

        rows = parse_minibench_json(path)
        aggregate = True
        for r in rows:
            if r["key"] is None:
                if r["name"] not in ignored:
                    ignored.append(r["name"])
            elif r["metric"] == MINIBENCH_LATENCY_METRIC:
                if r["key"] in samples:
                    raise DitnasError(f"minibench results {path}: model {r['name']!r} has two {MINIBENCH_LATENCY_METRIC} records; keep one run per file")
                samples[r["key"]] = [r["value"]]
            elif r["metric"] == "load_status" and r["value"] != 0:
                ignored.append(f"{r['name']} (load_status {r['value']:g})")
        if rows:
            device = {"device_model": rows[0]["arch"], "device_brand": rows[0]["device"], "os": rows[0]["os"]}
    elif fmt == "coreml-benchmark-json":
        from ditnas.latency_models.backends.coreml import parse_coreml_benchmark_json

        rows = parse_coreml_benchmark_json(path)
        for r in rows:
            if r["phase"] == "predict":
                samples.setdefault(r["key"], []).append(r["latency_ms"])
        dev = json.loads(path.read_text()).get("device") or {}
        device = {k: v for k, v in dev.items() if k in ("device_id", "device_model", "os")}
    else:  # xcodebuild-log
        from ditnas.latency_models.backends.ios_xcodebuild import (
            is_forward_time,
            parse_xcodebuild_log,
        )

        rows = parse_xcodebuild_log(path)
        lines: dict[str, int] = {}
        for r in rows:
            if r["key"] is None:
                if r["test_name"] not in ignored:
                    ignored.append(r["test_name"])
                continue
            if not is_forward_time(r):
                continue
            if lines.setdefault(r["key"], r["line"]) != r["line"]:
                raise DitnasError(
                    f"xcodebuild log {path}: {r['key']} is measured on lines {lines[r['key']]} and {r['line']}; "
                    "ingest one run per log (split the log)"
                )
            samples.setdefault(r["key"], []).append(r["latency_ms"])
        timed = [r for r in rows if r["key"] is not None and r["device_model"]]
        if timed:
            device = {"device_model": timed[0]["device_model"], "os": timed[0]["os"]}
    if not samples:
        raise DitnasError(
            f"artifact {path} ({fmt}) holds no latency samples of a ditnas program"
            + (f" (names seen: {', '.join(ignored[:5])})" if ignored else "")
            + "; check that the device ran the files `prepare` wrote"
        )
    cells = {key: _cell(key, plan, path) for key in samples}
    return ParsedArtifact(path, fmt, rows, samples, cells, device, aggregate, ignored)


def _check_session(parsed: ParsedArtifact, session: ProfilingSession) -> None:
    backend = session.device.get("backend")
    if backend not in FORMAT_BACKENDS[parsed.format]:
        raise DitnasError(
            f"artifact {parsed.path} ({parsed.format}) comes from {'/'.join(FORMAT_BACKENDS[parsed.format])}, "
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

    # assumption: an artifact-made session's device_id is the device model the files name (minibench
    # and the iOS log carry no serial/UDID), and `threads` is what the caller says the app used.
    """
    root = Path(root)
    if (root / "manifest.json").exists():
        return ProfilingSession.load(root)
    parsed = [read_artifact(Path(p), etdump_warmup=etdump_warmup) for p in artifact_paths]
    backends = {b for a in parsed for b in FORMAT_BACKENDS[a.format]}
    for a in parsed:
        backends &= set(FORMAT_BACKENDS[a.format])
    device = next((a.device for a in parsed if a.device.get("device_model")), None)
    if not backends or device is None:
        raise DitnasError(
            f"ingest: cannot tell one device from {[str(a.path) for a in parsed]} (formats "
            f"{sorted({a.format for a in parsed})}); create the session with `ditnas profile --backend ...` first, or pass --session of one"
        )
    backend_name = next(b for b in ("android-adb", "ios", "coreml", "executorch-xnnpack") if b in backends)
    info = {"device_id": device.get("device_id") or device["device_model"], **device}
    backend = get_backend(backend_name, threads=threads, device_info=info)
    if iters == 0:  # the files' own count when every program has the same number of samples
        counts = {len(v) for a in parsed for v in a.samples.values()}
        iters = counts.pop() if len(counts) == 1 else 0
    return ProfilingSession.open(root, backend, warmup=warmup, iters=iters, notes={"created_by": "ingest"})
