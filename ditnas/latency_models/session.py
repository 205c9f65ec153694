"""A profiling session: a folder that says what was measured, where and how, with every raw sample.

    <session>/manifest.json     session id, backend info (device id/model, OS, backend, precision,
                                compute unit, threads, tool versions), warm-up and iteration counts,
                                ditnas/torch/executorch versions, created/updated timestamps
    <session>/samples.parquet   long format, one row per timed sample (SAMPLE_SCHEMA)
    <session>/samples_history.parquet   samples a later timing pass replaced (drift between passes)
    <session>/artifacts/        what the backend built or pulled (.pte, .etrecord, .etdp, reports)

`run(programs)` works in two phases. It builds every program whose key is not in samples.parquet
yet (on XNNPACK the slow part: ~5 s per block, ~35 s per whole model; files already built by an
interrupted run are reused), then times them in one pass and rewrites the parquet atomically. On
local backends (`retimes_session`) that pass also re-times every program the session already holds,
interleaved with the new ones, so all rows of a table share one machine state (measured: timed
~30 min apart, whole models came out 1.5-2.1x the sum of their blocks; timed together, 0.96-1.24x).
An interrupted run therefore loses no sample and never holds a program twice. Resuming with
another backend, device, thread count or warm-up/iteration count is refused.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import pandas as pd

from ditnas.errors import DitnasError
from ditnas.io import atomic_write_bytes, read_json, write_json
from ditnas.latency_models.backends.base import Backend, Prepared, package_version
from ditnas.latency_models.programs import CELL_SCHEMA, Cell, Program, with_context

MANIFEST = "manifest.json"
SAMPLES = "samples.parquet"
HISTORY = "samples_history.parquet"
FORMAT_VERSION = 1

# column -> pandas dtype, in order
SAMPLE_SCHEMA: dict[str, str] = {
    "session_id": "string",
    **CELL_SCHEMA,
    "iteration": "int64",
    "latency_ms": "float64",
    "backend": "string",
    "device": "string",
    "threads": "int64",
    "measured_at": "string",
}

# what makes two sessions comparable: same device, backend, precision, compute unit, threads
IDENTITY_FIELDS = ("device_id", "device_model", "backend", "precision", "compute_unit", "threads")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def empty_samples() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in SAMPLE_SCHEMA.items()})


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    df = with_context(df)
    missing = [c for c in SAMPLE_SCHEMA if c not in df.columns]
    if missing:
        raise DitnasError(f"samples table lacks columns {missing}; it was not written by this version of ditnas")
    return df[list(SAMPLE_SCHEMA)].astype(SAMPLE_SCHEMA).reset_index(drop=True)


def read_samples(path: Path) -> pd.DataFrame:
    """Read a samples.parquet; a truncated or foreign file is one clear error."""
    path = Path(path)
    if not path.exists():
        return empty_samples()
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 -- pyarrow raises ArrowInvalid / OSError for truncated files
        raise DitnasError(
            f"{path} is unreadable or truncated ({type(exc).__name__}); delete it to re-measure the session, "
            "or re-run the profiling step that wrote it"
        ) from None
    return _typed(df)


def write_samples(path: Path, df: pd.DataFrame) -> None:
    buf = BytesIO()
    _typed(df).to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())


def read_manifest(path: Path) -> dict[str, Any]:
    manifest = read_json(path, missing="this folder is not a profiling session (create one with run)",
                         damaged="delete the session folder and re-run profiling")
    for field in ("session_id", "device", "warmup", "iters"):
        if field not in manifest:
            raise DitnasError(f"{path}: field {field!r} missing; the manifest is damaged, delete the session and re-run")
    return manifest


def _identity(device: dict[str, Any]) -> dict[str, Any]:
    return {f: device.get(f) for f in IDENTITY_FIELDS}


def _describe(device: dict[str, Any]) -> str:
    return f"{device.get('backend')} on {device.get('device_id')} ({device.get('device_model')}), threads={device.get('threads')}"


@dataclass
class ProfilingSession:
    """One folder of measurements from one device + backend at fixed settings."""

    root: Path
    manifest: dict[str, Any]

    # ----- open / create -------------------------------------------------------------------------
    @classmethod
    def load(cls, root: Path) -> ProfilingSession:
        root = Path(root)
        session = cls(root, read_manifest(root / MANIFEST))
        session.samples()  # fail now, not mid-run, on a damaged parquet
        return session

    @classmethod
    def open(
        cls, root: Path, backend: Backend, *, warmup: int = 10, iters: int = 50, notes: dict[str, Any] | None = None
    ) -> ProfilingSession:
        """Create the session folder, or reopen it to resume when its settings match."""
        root = Path(root)
        device = backend.info()
        if (root / MANIFEST).exists():
            session = cls.load(root)
            problems = [
                f"{f}: session has {session.device.get(f)!r}, now {device.get(f)!r}"
                for f in IDENTITY_FIELDS
                if session.device.get(f) != device.get(f)
            ]
            problems += [
                f"{name}: session has {session.manifest[name]}, now {value}"
                for name, value in (("warmup", warmup), ("iters", iters))
                if session.manifest[name] != value
            ]
            if problems:
                raise DitnasError(
                    f"session {root} was measured differently ({'; '.join(problems)}); "
                    "resume with the same settings or choose a new --out folder"
                )
            return session
        if (root / SAMPLES).exists():
            raise DitnasError(f"{root} holds {SAMPLES} but no {MANIFEST}; the session is damaged, delete it and re-run")
        manifest = {
            "format": FORMAT_VERSION,
            "session_id": uuid.uuid4().hex[:12],
            "device": device,
            "warmup": int(warmup),
            "iters": int(iters),
            "created_at": _now(),
            "updated_at": _now(),
            "versions": {
                "ditnas": package_version("ditnas"),
                "torch": package_version("torch"),
                "executorch": package_version("executorch"),
            },
            "notes": notes or {},
        }
        session = cls(root, manifest)
        session._write_manifest()
        return session

    # ----- accessors -----------------------------------------------------------------------------
    @property
    def session_id(self) -> str:
        return self.manifest["session_id"]

    @property
    def device(self) -> dict[str, Any]:
        return self.manifest["device"]

    @property
    def artifacts_dir(self) -> Path:
        return self.root / "artifacts"

    def samples(self) -> pd.DataFrame:
        return read_samples(self.root / SAMPLES)

    def measured_keys(self) -> set[str]:
        return set(self.samples()["key"].unique())

    def _write_manifest(self) -> None:
        self.manifest["updated_at"] = _now()
        write_json(self.root / MANIFEST, self.manifest)

    def cells(self) -> list[Cell]:
        """The cells this session holds samples of, in key order."""
        rows = self.samples().drop_duplicates("key").sort_values("key")
        return [Cell.from_fields(row) for row in rows.to_dict("records")]

    # ----- measuring -----------------------------------------------------------------------------
    def _check_backend(self, backend: Backend) -> None:
        if _identity(backend.info()) != _identity(self.device):
            raise DitnasError(
                f"session {self.root} belongs to {_describe(self.device)}; backend given is {_describe(backend.info())}"
            )

    def run(
        self,
        programs: Sequence[Program],
        backend: Backend,
        *,
        rebuild: Callable[[Cell], Program] | None = None,
        progress: Callable[[int, int, str], None] | None = None,
        workers: int = 1,
        cache: Any = None,
    ) -> list[str]:
        """Measure every program not yet in the session; returns the keys measured for the first time.

        When something is new and the backend `retimes_session`, the timing pass also re-times the
        session's other programs: those given, plus (with `rebuild`, cell -> program) every other
        cell the session holds. Their replaced samples move to samples_history.parquet.
        Programs are built in `workers` processes (prepare_pool.py); timing is one pass regardless.
        """
        self._check_backend(backend)
        keys = [p.key() for p in programs]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise DitnasError(f"programs {dupes} appear twice in one run; each cell is measured once per session")
        done = self.measured_keys()
        todo = [p for p in programs if p.key() not in done]
        if not todo:
            return []
        retime: list[Program] = []
        if backend.retimes_session:
            retime = [p for p in programs if p.key() in done]
            if rebuild is not None:
                given = set(keys)
                retime += [rebuild(cell) for cell in self.cells() if cell.key() not in given]
        prepared = self.prepare(todo + retime, backend, workers=workers, progress=progress, cache=cache)
        if progress:
            progress(len(prepared), len(prepared), "timing")
        rows = backend.measure(prepared, self.manifest["warmup"], self.manifest["iters"])
        self._store([p.program for p in prepared], rows)
        return [p.key() for p in todo]

    def prepare(self, programs: Sequence[Program], backend: Backend, *, workers: int = 1,
                progress: Callable[[int, int, str], None] | None = None, cache: Any = None) -> list[Prepared]:
        """Build (or reuse from artifacts/, or copy from the lowered-program `cache`) every program
        without timing any: a pipeline lowers while something else runs, then `run` finds them built."""
        from ditnas.latency_models.prepare_pool import prepare_all

        self._check_backend(backend)
        return prepare_all(backend, programs, self.artifacts_dir, workers=workers, progress=progress, cache=cache)

    def _store(self, programs: Sequence[Program], rows: list[dict[str, Any]]) -> None:
        """Write one timing pass: its samples replace any older ones of the same programs."""
        expected = self.manifest["iters"]
        by_key: dict[str, list[dict[str, Any]]] = {p.key(): [] for p in programs}
        for r in rows:
            by_key.setdefault(r["key"], []).append(r)
        wrong = {k: len(v) for k, v in by_key.items() if len(v) != expected}
        if wrong:
            raise DitnasError(f"backend returned {wrong} samples per program, expected {expected} each")
        stamp = _now()
        new = pd.DataFrame(
            [
                {
                    **program.cell.fields(),
                    "session_id": self.session_id,
                    "iteration": int(r["iteration"]),
                    "latency_ms": float(r["latency_ms"]),
                    "backend": self.device["backend"],
                    "device": self.device["device_id"],
                    "threads": int(self.device["threads"]),
                    "measured_at": stamp,
                }
                for program in programs
                for r in by_key[program.key()]
            ]
        )
        old = self.samples()
        replaced = old["key"].isin(by_key)
        if replaced.any():
            drift = summarize(new).set_index("key")["p50"] / summarize(old[replaced]).set_index("key")["p50"]
            self.manifest.setdefault("passes", []).append(
                {"at": stamp, "retimed": int(drift.notna().sum()), "median_p50_ratio_vs_previous": float(drift.median())}
            )
            history = pd.concat([read_samples(self.root / HISTORY), old[replaced]], ignore_index=True)
            write_samples(self.root / HISTORY, history)
        kept = old[~replaced]
        table = _typed(new) if kept.empty else pd.concat([kept, _typed(new)], ignore_index=True)
        write_samples(self.root / SAMPLES, table)  # parquet first: it is the truth
        self._write_manifest()

    def drift_since_last_pass(self) -> float | None:
        """Median p50 ratio (this pass / the one before) of the programs the last pass re-timed."""
        passes = self.manifest.get("passes") or []
        return passes[-1]["median_p50_ratio_vs_previous"] if passes else None

    # ----- analysis ------------------------------------------------------------------------------
    def summary(self) -> pd.DataFrame:
        return summarize(self.samples())

    def flag_high_variance(self, threshold_cv: float = 0.1) -> pd.DataFrame:
        """Programs whose coefficient of variation (std / mean) exceeds the threshold: re-measure them."""
        s = self.summary()
        return s[s["cv"] > threshold_cv].reset_index(drop=True)

    def drift(self, other: ProfilingSession) -> pd.DataFrame:
        """Per-program p50 ratio other / self for programs both sessions measured (same device only)."""
        check_same_device([self, other])
        a, b = self.summary().set_index("key"), other.summary().set_index("key")
        common = a.index.intersection(b.index)
        out = pd.DataFrame(
            {"p50": a.loc[common, "p50"], "p50_other": b.loc[common, "p50"]},
            index=common,
        )
        out["ratio"] = out["p50_other"] / out["p50"]
        return out.reset_index().rename(columns={"index": "key"}).sort_values("key", ignore_index=True)


def summarize(samples: pd.DataFrame) -> pd.DataFrame:
    """n, p10, p50, p90, mean, std, cv, p50_rel_se per program key (cell fields kept)."""
    cols = ["key", "kind", "op", "width", "mlp_ratio", "tokens", "stage", "arch"]
    if samples.empty:
        return pd.DataFrame(columns=cols + ["n", "p10", "p50", "p90", "mean", "std", "cv", "p50_rel_se"])
    g = samples.groupby(cols, sort=True, dropna=False)["latency_ms"]
    out = g.agg(
        n="count",
        p10=lambda s: s.quantile(0.10),
        p50="median",
        p90=lambda s: s.quantile(0.90),
        mean="mean",
        std=lambda s: s.std(ddof=1) if len(s) > 1 else 0.0,
        mad=lambda s: (s - s.median()).abs().median(),
    ).reset_index()
    out["cv"] = out["std"] / out["mean"]
    # standard error of the median relative to it: sqrt(pi/2)·sigma/sqrt(n) with sigma from the MAD
    # (1.4826·MAD), robust to the rare slow run that inflates std and cv of tiny programs. It says how
    # well the p50 a table uses is pinned down
    out["p50_rel_se"] = 1.2533 * 1.4826 * out.pop("mad") / out["n"].pow(0.5) / out["p50"]
    return out


def check_same_device(sessions: Iterable[ProfilingSession]) -> None:
    sessions = list(sessions)
    first = sessions[0]
    for other in sessions[1:]:
        if _identity(other.device) != _identity(first.device):
            raise DitnasError(
                f"sessions {first.root} ({_describe(first.device)}) and {other.root} ({_describe(other.device)}) "
                "come from different devices or settings; keep one device per table"
            )


def merge(sessions: Sequence[ProfilingSession], out: Path) -> ProfilingSession:
    """One session holding the samples of several sessions of the same device and settings.

    A program measured by more than one session keeps the samples of the latest session (by
    manifest `updated_at`): re-measurement replaces, never duplicates.
    """
    if not sessions:
        raise DitnasError("merge: no sessions given")
    check_same_device(sessions)
    out = Path(out)
    if (out / MANIFEST).exists() or (out / SAMPLES).exists():
        raise DitnasError(f"merge: {out} already holds a session; choose an empty folder")
    ordered = sorted(sessions, key=lambda s: s.manifest["updated_at"])
    table = empty_samples()
    for s in ordered:
        df = s.samples()
        table = pd.concat([table[~table["key"].isin(df["key"])], df], ignore_index=True) if not table.empty else df
    warmups = sorted({s.manifest["warmup"] for s in sessions})
    iters = sorted({s.manifest["iters"] for s in sessions})
    base = ordered[-1].manifest
    manifest = {
        **base,
        "session_id": uuid.uuid4().hex[:12],
        "warmup": warmups[0] if len(warmups) == 1 else warmups[-1],
        "iters": iters[0] if len(iters) == 1 else iters[-1],
        "created_at": _now(),
        "updated_at": _now(),
        "merged_from": [{"session_id": s.session_id, "root": str(s.root), "warmup": s.manifest["warmup"], "iters": s.manifest["iters"]} for s in ordered],
    }
    write_samples(out / SAMPLES, table)
    write_json(out / MANIFEST, manifest)
    return ProfilingSession(out, manifest)

