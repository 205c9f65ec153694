"""A latency table: one row per measured cell of one device, built from profiling sessions.

    <dir>/table.parquet   long format, one row per cell key (TABLE_SCHEMA): the cell fields (kind, op,
                          width, mlp_ratio, tokens, stage, arch for `model` rows), n, p10, p50, p90,
                          mean, std, cv, the session that supplied it, and the device identity columns
    <dir>/table.json      manifest: device identity (+ the full backend info), backend, precision,
                          threads, the search space it covers, the model config when known, source
                          sessions, created time, ditnas/torch versions and `table_id` (a hash of the
                          rows, so a predictor.json can tell which table it was fitted on)

A table never mixes devices: building one from sessions of two devices, or merging two tables of
different devices, is refused naming both. Latency is the p50 of the raw samples with p10/p90 beside it.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import pandas as pd

from ditnas.arch import SearchSpace
from ditnas.errors import DitnasError
from ditnas.io import atomic_write_bytes, read_json, write_json
from ditnas.latency_models.backends.base import package_version
from ditnas.latency_models.programs import CELL_SCHEMA, Cell, cells_for_space, with_context
from ditnas.latency_models.session import IDENTITY_FIELDS, ProfilingSession, summarize

TABLE = "table.parquet"
TABLE_MANIFEST = "table.json"
FORMAT_VERSION = 1

CELL_COLUMNS = tuple(CELL_SCHEMA)
STAT_COLUMNS = ("n", "p10", "p50", "p90", "mean", "std", "cv")

# column -> pandas dtype, in order
TABLE_SCHEMA: dict[str, str] = {
    **CELL_SCHEMA,
    "n": "int64",
    "p10": "float64",
    "p50": "float64",
    "p90": "float64",
    "mean": "float64",
    "std": "float64",
    "cv": "float64",
    "session_id": "string",
    "device_id": "string",
    "device_model": "string",
    "backend": "string",
    "precision": "string",
    "compute_unit": "string",
    "threads": "int64",
}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def identity_of(device: dict[str, Any]) -> dict[str, Any]:
    """The fields that make two measurements comparable (same as a session's)."""
    return {f: device.get(f) for f in IDENTITY_FIELDS}


def describe_identity(identity: dict[str, Any]) -> str:
    return (
        f"{identity.get('backend')} on {identity.get('device_id')} ({identity.get('device_model')}), "
        f"{identity.get('precision')}/{identity.get('compute_unit')}, threads={identity.get('threads')}"
    )


def _plain_model(model: Any) -> dict[str, Any] | None:
    if model is None:
        return None
    if is_dataclass(model):
        model = asdict(model)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(model).items()}


# ----- rows --------------------------------------------------------------------------------------
def _typed(df: pd.DataFrame, source: str = "table") -> pd.DataFrame:
    df = with_context(df)
    missing = [c for c in TABLE_SCHEMA if c not in df.columns]
    if missing:
        raise DitnasError(f"{source} lacks columns {missing}; it was not written by this version of ditnas, rebuild it")
    out = df[list(TABLE_SCHEMA)].astype(TABLE_SCHEMA)
    return out.sort_values("key", kind="stable").reset_index(drop=True)


def rows_digest(rows: pd.DataFrame) -> str:
    """sha256 of every column of every row: table_id covers the stats the predictor reads, this the whole file
    (a flipped bit in `mean` or `cv` read back as a different table without it)."""
    text = rows.sort_values("key", kind="stable").to_csv(index=False, float_format="%.17g")
    return hashlib.sha256(text.encode()).hexdigest()


def table_id(rows: pd.DataFrame) -> str:
    """Content hash of the rows (key + stats): which table a predictor was fitted on."""
    cols = ["key", "n", "p10", "p50", "p90"]
    text = rows[cols].sort_values("key").to_csv(index=False, float_format="%.9g")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cell_of(row: Any) -> Cell:
    return Cell(row.kind, row.op, row.width, row.mlp_ratio, int(row.tokens), int(row.stage), row.arch,
                int(getattr(row, "context", 0)))


@dataclass
class LatencyTable:
    """Measured p50/p10/p90 per cell of one device + backend + thread count."""

    rows: pd.DataFrame
    manifest: dict[str, Any]
    root: Path | None = None  # where it was loaded from / saved to
    _by_key: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.rows = _typed(self.rows)
        idents = self.rows[list(IDENTITY_FIELDS)].drop_duplicates()
        if len(idents) > 1:
            a, b = (dict(r) for _, r in idents.head(2).iterrows())
            raise DitnasError(
                f"latency table rows come from two devices: {describe_identity(a)} and {describe_identity(b)}; "
                "keep one device per table"
            )
        dupes = sorted(self.rows["key"][self.rows["key"].duplicated()].unique())
        if dupes:
            raise DitnasError(f"latency table holds cells {dupes[:5]} twice; each cell has one row")
        self.manifest["table_id"] = table_id(self.rows)
        self.manifest["rows_sha256"] = rows_digest(self.rows)
        self.manifest["n_cells"] = int((self.rows["kind"] != "model").sum())
        self.manifest["n_models"] = int((self.rows["kind"] == "model").sum())
        self._by_key = {r.key: r for r in self.rows.itertuples(index=False)}

    # ----- building ------------------------------------------------------------------------------
    @classmethod
    def from_sessions(
        cls,
        sessions: Sequence[ProfilingSession] | ProfilingSession,
        *,
        space: SearchSpace | None = None,
        model: Any = None,
    ) -> LatencyTable:
        """One table from sessions of one device and settings. A cell measured in several sessions
        keeps the latest session's samples (by manifest `updated_at`; on a tie the later one in the
        list), as `session.merge` does."""
        sessions = [sessions] if isinstance(sessions, ProfilingSession) else list(sessions)
        if not sessions:
            raise DitnasError("latency table: no profiling sessions given; run `ditnas profile` first")
        first = sessions[0]
        for other in sessions[1:]:
            if identity_of(other.device) != identity_of(first.device):
                raise DitnasError(
                    f"latency table: session {first.root} ({describe_identity(first.device)}) and session "
                    f"{other.root} ({describe_identity(other.device)}) come from different devices or settings; "
                    "build one table per device"
                )
        # assumption: updated_at has 1 s resolution; ties keep the order given (later in the list wins)
        ordered = sorted(sessions, key=lambda s: s.manifest.get("updated_at", ""))
        frames: list[pd.DataFrame] = []
        for s in ordered:
            summ = summarize(s.samples())
            if summ.empty:
                continue
            summ["session_id"] = s.session_id
            frames = [f[~f["key"].isin(summ["key"])] for f in frames] + [summ]
        ident = identity_of(first.device)
        rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(TABLE_SCHEMA))
        for f, v in ident.items():
            rows[f] = v
        if model is None:  # the CLI may record the model config in the session notes
            model = next((s.manifest.get("notes", {}).get("model") for s in reversed(ordered) if s.manifest.get("notes", {}).get("model")), None)
        manifest = cls._manifest(
            device=ordered[-1].device,
            space=space,
            model=model,
            sources=[
                {
                    "session_id": s.session_id,
                    "root": str(s.root),
                    "warmup": s.manifest.get("warmup"),
                    "iters": s.manifest.get("iters"),
                    "updated_at": s.manifest.get("updated_at"),
                }
                for s in ordered
            ],
        )
        return cls(rows, manifest)

    @classmethod
    def from_frame(
        cls, rows: pd.DataFrame, identity: dict[str, Any], *, space: SearchSpace | None = None, model: Any = None
    ) -> LatencyTable:
        """A table from a DataFrame of cell rows (CELL_COLUMNS + p50 at least; other stats default from
        p50). For tests, ingested tables and hand-made fixtures; identity columns come from `identity`."""
        rows = rows.copy()
        defaults = {"op": "", "arch": "", "mlp_ratio": 0.0, "stage": 0, "context": 0, "n": 1, "std": 0.0, "cv": 0.0, "session_id": ""}
        for col, val in defaults.items():
            if col not in rows.columns:
                rows[col] = val
        if "key" not in rows.columns:
            rows["key"] = [_cell_of(r).key() for r in rows.itertuples(index=False)]
        for col in ("p10", "p90", "mean"):
            if col not in rows.columns:
                rows[col] = rows["p50"]
        for f in IDENTITY_FIELDS:
            rows[f] = identity.get(f)
        return cls(rows, cls._manifest(device=dict(identity), space=space, model=model, sources=[]))

    @staticmethod
    def _manifest(*, device: dict[str, Any], space: SearchSpace | None, model: Any, sources: list[dict[str, Any]]) -> dict[str, Any]:
        ident = identity_of(device)
        return {
            "format": FORMAT_VERSION,
            "identity": ident,
            "device": device,  # full backend info (OS, tool versions, ...)
            "backend": ident["backend"],
            "precision": ident["precision"],
            "threads": ident["threads"],
            "space": space.to_dict() if space is not None else None,
            "space_key": space.key() if space is not None else None,
            "model": _plain_model(model),
            "sessions": sources,
            "created_at": _now(),
            "versions": {"ditnas": package_version("ditnas"), "torch": package_version("torch")},
        }

    # ----- persistence ---------------------------------------------------------------------------
    def save(self, root: Path) -> Path:
        """Write table.parquet then table.json, each atomically; returns the folder."""
        root = Path(root)
        buf = BytesIO()
        self.rows.to_parquet(buf, index=False)
        atomic_write_bytes(root / TABLE, buf.getvalue())
        write_json(root / TABLE_MANIFEST, self.manifest)
        self.root = root
        return root

    @classmethod
    def load(cls, root: Path) -> LatencyTable:
        root = Path(root)
        mpath, tpath = root / TABLE_MANIFEST, root / TABLE
        if not mpath.exists() and not tpath.exists():
            raise DitnasError(f"{root} holds no latency table ({TABLE_MANIFEST}, {TABLE}); build one from a profiling session")
        manifest = read_json(mpath, missing=f"it belongs next to {tpath}: rebuild the table from its profiling sessions",
                             damaged=f"delete {root} and rebuild the table from its sessions")
        for f in ("identity", "table_id"):
            if f not in manifest:
                raise DitnasError(f"{mpath}: field {f!r} missing; the manifest is damaged, rebuild the table from its sessions")
        try:
            rows = pd.read_parquet(tpath)
        except FileNotFoundError:
            raise DitnasError(f"{tpath} does not exist next to {mpath}; rebuild the table from its profiling sessions") from None
        except Exception as exc:  # noqa: BLE001 -- pyarrow raises ArrowInvalid / OSError for truncated files
            raise DitnasError(
                f"{tpath} is unreadable or truncated ({type(exc).__name__}); delete {root} and rebuild the table from its sessions"
            ) from None
        stored, digest = manifest["table_id"], manifest.get("rows_sha256")  # tables before the digest have none
        table = cls(_typed(rows, str(tpath)), manifest, root)
        if table.manifest["table_id"] != stored or (digest is not None and table.manifest["rows_sha256"] != digest):
            raise DitnasError(
                f"{tpath} does not match {mpath} (table_id {table.manifest['table_id']} vs {stored}); "
                "one of the two was replaced, rebuild the table from its sessions"
            )
        return table

    # ----- identity / compatibility ----------------------------------------------------------------
    @property
    def identity(self) -> dict[str, Any]:
        return dict(self.manifest["identity"])

    @property
    def table_id(self) -> str:
        return self.manifest["table_id"]

    @property
    def space(self) -> SearchSpace | None:
        d = self.manifest.get("space")
        return SearchSpace.from_dict(d, source=f"{(self.root or Path('.')) / TABLE_MANIFEST}: field 'space'") if d else None

    def describe(self) -> str:
        return describe_identity(self.identity)

    def _where(self) -> str:
        return str(self.root) if self.root else "(in memory)"

    def check_compatible(self, other_identity: dict[str, Any], *, model: Any = None) -> None:
        """Refuse to price for another device/backend/precision/threads (or model config), naming both.

        Only the identity fields `other_identity` sets (not None) are compared, so a caller may ask for
        e.g. just {"backend": ..., "threads": ...}."""
        mine = self.identity
        diffs = [
            f"{f}: table has {mine.get(f)!r}, asked {other_identity[f]!r}"
            for f in IDENTITY_FIELDS
            if other_identity.get(f) is not None and str(other_identity[f]) != str(mine.get(f))
        ]
        want, have = _plain_model(model), self.manifest.get("model")
        if want is not None and have is not None and want != have:
            diffs.append(f"model config: table has {have}, asked {want}")
        if diffs:
            raise DitnasError(
                f"latency table {self._where()} was measured on {self.describe()}, but the prediction is for "
                f"{describe_identity({**mine, **{k: v for k, v in other_identity.items() if v is not None}})} "
                f"({'; '.join(diffs)}); use a table measured there (ditnas profile)"
            )

    # ----- access --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, key: str | Cell) -> bool:
        return (key.key() if isinstance(key, Cell) else key) in self._by_key

    def get(self, key: str | Cell) -> Any | None:
        """The row (a namedtuple) of a cell, or None when it was not measured."""
        return self._by_key.get(key.key() if isinstance(key, Cell) else key)

    def cell_rows(self) -> pd.DataFrame:
        return self.rows[self.rows["kind"] != "model"].reset_index(drop=True)

    def model_rows(self) -> pd.DataFrame:
        """Measured whole-model rows (kind == 'model', `arch` holds the arch string)."""
        return self.rows[self.rows["kind"] == "model"].reset_index(drop=True)

    def coverage(self, space: SearchSpace) -> pd.DataFrame:
        """The cells of `cells_for_space(space)` this table lacks; `.attrs['summary']` is one line."""
        cells = cells_for_space(space)
        missing = [c for c in cells if c.key() not in self._by_key]
        cols = ["key", "kind", "op", "width", "mlp_ratio", "tokens", "stage"]
        out = pd.DataFrame([{k: v for k, v in c.fields().items() if k in cols} for c in missing], columns=cols)
        by_kind = out["kind"].value_counts().sort_index() if len(out) else pd.Series(dtype=int)
        detail = ", ".join(f"{k}: {v}" for k, v in by_kind.items())
        out.attrs["summary"] = (
            f"table covers {len(cells) - len(missing)}/{len(cells)} cells of the space; {len(missing)} missing"
            + (f" ({detail})" if detail else "")
            + f"; {self.manifest['n_models']} whole-model rows"
        )
        return out

    def coverage_summary(self, space: SearchSpace) -> str:
        return self.coverage(space).attrs["summary"]

    # ----- combining -----------------------------------------------------------------------------
    def merged(self, other: LatencyTable) -> LatencyTable:
        """This table with `other`'s rows added; a cell in both keeps `other`'s row (a re-measurement)."""
        if other.identity != self.identity:
            raise DitnasError(
                f"cannot merge latency table {other._where()} ({other.describe()}) into {self._where()} "
                f"({self.describe()}): different devices or settings; keep one device per table"
            )
        rows = pd.concat([self.rows[~self.rows["key"].isin(other.rows["key"])], other.rows], ignore_index=True)
        manifest = {
            **self.manifest,
            "sessions": list(self.manifest.get("sessions", []))
            + [s for s in other.manifest.get("sessions", []) if s not in self.manifest.get("sessions", [])],
            "created_at": _now(),
        }
        if manifest.get("space") is None:
            manifest["space"], manifest["space_key"] = other.manifest.get("space"), other.manifest.get("space_key")
        if manifest.get("model") is None:
            manifest["model"] = other.manifest.get("model")
        return LatencyTable(rows, manifest)

    def without_keys(self, keys: Iterable[str]) -> LatencyTable:
        keys = set(keys)
        return LatencyTable(self.rows[~self.rows["key"].isin(keys)], {**self.manifest}, None)

    def split_models(self, n_held_out: int, *, seed: int = 0) -> tuple[LatencyTable, pd.DataFrame]:
        """(table without n random model rows, those rows): a held-out set for `validate`."""
        models = self.model_rows()
        if n_held_out < 1 or n_held_out > len(models):
            raise DitnasError(
                f"latency table {self._where()}: cannot hold out {n_held_out} of {len(models)} whole-model rows; "
                "measure more archs (LatencyPredictor remeasure / ditnas profile with models)"
            )
        keys = sorted(models["key"])
        held = set(random.Random(seed).sample(keys, n_held_out))
        return self.without_keys(held), models[models["key"].isin(held)].reset_index(drop=True)
