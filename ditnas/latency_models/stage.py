"""The latency stage's entry points for the CLI: build a table from a session, load a table and its
fitted predictor, validate on held-out whole models, and the closed loop (re-measure archs, refit)."""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from io import BytesIO
from pathlib import Path

import pandas as pd

from ditnas.arch import Arch, SearchSpace
from ditnas.errors import DitnasError
from ditnas.io import atomic_write_bytes, write_json
from ditnas.latency_models.backends import get_backend
from ditnas.latency_models.generation_latency import GENERATIONS, summarize_generations
from ditnas.latency_models.generation_profile import read_generation_samples
from ditnas.latency_models.predictor import PREDICTOR, LatencyPredictor, remeasure
from ditnas.latency_models.programs import model_cell
from ditnas.latency_models.session import MANIFEST as SESSION_MANIFEST
from ditnas.latency_models.session import ProfilingSession
from ditnas.latency_models.stream_latency import STREAMS, read_streams, summarize_streams
from ditnas.latency_models.table import LatencyTable
from ditnas.supernet.model import ElasticDiT

TABLE_DIR = "table"


def table_dir(path: Path) -> Path:
    """`--table` may name the table folder or the session folder that holds it in `table/`."""
    path = Path(path)
    if (path / "table.json").exists() or not (path / TABLE_DIR).is_dir():
        return path
    return path / TABLE_DIR


def build_table(session: ProfilingSession, supernet: ElasticDiT) -> tuple[LatencyTable, LatencyPredictor]:
    """Table of the session's measurements (in `<session>/table`, its timed generations summarised in
    `<session>/table/generations.parquet`) and the predictor fitted on both."""
    table = LatencyTable.from_sessions([session], space=supernet.space, model=asdict(supernet.cfg))
    out = session.root / TABLE_DIR
    table.save(out)
    generations = summarize_generations(read_generation_samples(session.root))
    buf = BytesIO()
    generations.to_parquet(buf, index=False)
    atomic_write_bytes(out / GENERATIONS, buf.getvalue())
    streams = read_streams(session.root)
    if streams:  # the measured streams travel with the table (stream_latency.StreamingPredictor.load reads them)
        write_json(out / STREAMS, summarize_streams(streams))
    predictor = LatencyPredictor.fit(table, generations=generations)
    predictor.save(out)
    return table, predictor


def table_generations(root: Path) -> pd.DataFrame | None:
    """The summarised generations stored beside a table (None: the table has none)."""
    path = Path(root) / GENERATIONS
    if not path.exists():
        return None
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 -- pyarrow raises ArrowInvalid / OSError for truncated files
        raise DitnasError(f"{path} is unreadable or truncated ({type(exc).__name__}); rebuild the table from its "
                          "session (`ditnas profile` on the same --out)") from None


def load_predictor(path: Path) -> tuple[LatencyTable, LatencyPredictor]:
    """The table at `path` and its predictor (refitted and saved when missing or stale)."""
    root = table_dir(path)
    table = LatencyTable.load(root)
    if (root / PREDICTOR).exists():
        try:
            return table, LatencyPredictor.load(root, table)
        except DitnasError:
            pass  # fitted on an older version of the table: refit below
    predictor = LatencyPredictor.fit(table, generations=table_generations(root))
    predictor.save(root)
    return table, predictor


def table_space(table: LatencyTable) -> SearchSpace:
    """The search space a table was profiled for (archs are resolved against it)."""
    if table.space is None:
        raise DitnasError(f"{table.describe()} records no search space; rebuild it with `ditnas profile`")
    return table.space


def validate_table(path: Path, n: int, seed: int = 0) -> dict:
    """Fit on all but `n` whole-model rows, validate on those `n` (held out from the calibration)."""
    table = LatencyTable.load(table_dir(path))
    have = len(table.model_rows())
    if have < n + 1:
        raise DitnasError(
            f"{table.describe()} has {have} whole-model rows; validating on {n} held-out archs needs at least {n + 1}: "
            f"run `ditnas profile ... --models {n + 6}` on the same session folder, or lower --n"
        )
    train, held = table.split_models(n, seed=seed)
    return LatencyPredictor.fit(train).validate(held)


@dataclass(frozen=True)
class Remeasured:
    """What `ditnas latency remeasure` did: per arch the old table's prediction and the new measurement."""

    table: LatencyTable
    predictor: LatencyPredictor
    rows: list[dict]  # arch, predicted_ms (old table, None if there was none), measured_ms, err_pct
    kept: Path | None  # the previous table version, kept under this name (None: replaced or none)


def keep_previous_table(root: Path) -> Path | None:
    """Copy `<session>/table` to the next free `<session>/table.v<N>` before it is rebuilt."""
    current = root / TABLE_DIR
    if not (current / "table.json").exists():
        return None
    n = 1
    while (root / f"{TABLE_DIR}.v{n}").exists():
        n += 1
    kept = root / f"{TABLE_DIR}.v{n}"
    shutil.copytree(current, kept)
    return kept


def remeasure_archs(session_dir: Path, archs: list[Arch], supernet: ElasticDiT, progress=None, *,
                    replace: bool = False) -> Remeasured:
    """Closed loop: measure `archs` as whole models in the session's device settings, rebuild the
    table and refit the predictor (e.g. on a search's winners). The table the session had is kept as
    `table.v<N>` unless `replace`; each arch's prediction by that table is reported beside its measurement."""
    session_dir = Path(session_dir)
    if not (session_dir / SESSION_MANIFEST).exists():
        raise DitnasError(f"{session_dir} is not a profiling session (no {SESSION_MANIFEST}); pass the folder `ditnas profile --out` wrote")
    session = ProfilingSession.load(session_dir)
    device = session.device
    options = {k: device[k] for k in ("threads",) if k in device}
    backend = get_backend(device["backend"], **options)
    before = None
    if (session_dir / TABLE_DIR / "table.json").exists():
        _, before = load_predictor(session_dir / TABLE_DIR)
    predicted = {str(a): (before.predict(a) if before is not None else None) for a in archs}
    remeasure(archs, supernet, session, backend, progress=progress)
    kept = None if replace else keep_previous_table(session_dir)
    table, predictor = build_table(session, supernet)
    rows = []
    for arch in archs:
        row = table.get(model_cell(supernet, arch))
        measured = float(row.p50) if row is not None else None
        pred = predicted[str(arch)]
        err = 100.0 * (pred - measured) / measured if pred is not None and measured else None
        rows.append({"arch": str(arch), "predicted_ms": pred, "measured_ms": measured, "err_pct": err})
    return Remeasured(table, predictor, rows, kept)
