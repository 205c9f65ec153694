"""Latency predictor: price an `Arch` from a `LatencyTable` of one device.

The ladder, per cell of `cells_for_arch(space, arch)` (each priced cell is labelled with its `source`):

1. **measured** — the table has the cell: its p50 (p10/p90 beside it).
2. **interpolated** — the cell lies between two measured cells of the same kind and op that differ from
   it in exactly one axis (width, then MLP ratio, then tokens; a token change carries its stage).
   Latency is taken linear in the axis coordinate between the two: `width ** width_exponent`
   (default 2: linear layers cost ~ tokens·d², so latency is ~linear in tokens·width²), `mlp_ratio`
   and `tokens` as they are. A quantity linear in tokens·width^e (and tokens·width^e·mlp_ratio) is
   therefore interpolated exactly. No extrapolation: a cell outside the measured range goes to 3.
3. **regressed** — a per-(kind, op) least-squares model fitted on the measured cells of that kind/op:
   p50 ≈ β·[1, t, t·w^e, t·w^e·r, t²·w] for blocks (t tokens, w width, r MLP ratio; the t²·w term is
   attention's N²·d), β·[1, t, t·w, t·w^e] for patch_embed/final/down/up. Columns are scaled to unit
   max before `numpy.linalg.lstsq` (minimum-norm when rank-deficient); p10/p90 are the p50 times the
   group's median p10/p50 and p90/p50 ratios.

The **table sum** S(arch) is the sum of the cells' p50. Block sums miss whole-model latency (by up to
22% on XNNPACK, xnnpack-notes.md), so a **calibration** is fitted on the table's measured whole-model
rows (kind == "model", from `model_program(supernet, arch)`):

    measured ≈ a·S + b·(blocks that run) + c        (least squares, "linear")

with a guard: fewer than `min_rows_linear` model rows, a rank-deficient design or a ≤ 0 slope fall back
to `measured ≈ median(measured / S)·S` ("ratio_median"); no model rows at all leave S as is ("none").
The fit report says which was used and why.

`predict(arch)` is per denoising step: one batch-1 call without guidance. What a user's sampler costs
(steps back to back, guidance, the host loop) is `predict_generation(arch, steps, guidance)`, fitted on
measured generations of whole models (generation_latency.py); the search prices that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ditnas.arch import Arch, SearchSpace
from ditnas.errors import DitnasError
from ditnas.io import read_json, write_json
from ditnas.latency_models.backends.base import Backend, package_version
from ditnas.latency_models.generation_latency import GenerationPricing, relative_least_squares
from ditnas.latency_models.programs import (
    Cell,
    build_program,
    cells_for_arch,
    model_program,
)
from ditnas.latency_models.session import ProfilingSession
from ditnas.latency_models.table import LatencyTable

PREDICTOR = "predictor.json"
FORMAT_VERSION = 1
SOURCES = ("measured", "interpolated", "regressed")
# interpolation order: width first (the densest axis in spaces); context last: a stream_block's cost is linear in
# the frames it attends to, so a table may time only the first and last chunk positions (latency.stream_positions)
AXES = ("width", "mlp_ratio", "tokens", "context")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ----- per-(kind, op) regressor ------------------------------------------------------------------
BLOCK_FEATURES = ("1", "t", "t*w^e", "t*w^e*r", "t^2*w")
# a streamed chunk's block also attends over the cache of `c` earlier frames (t*c*w ~ its N_q x N_cached x d)
STREAM_BLOCK_FEATURES = (*BLOCK_FEATURES, "t*c*w")
OTHER_FEATURES = ("1", "t", "t*w", "t*w^e")
GROUP_FEATURES = {"block": BLOCK_FEATURES, "stream_block": STREAM_BLOCK_FEATURES}


def _features(names: Sequence[str], tokens: np.ndarray, width: np.ndarray, ratio: np.ndarray, e: float,
              context: np.ndarray | None = None) -> np.ndarray:
    t, w, r = (np.asarray(v, dtype=float) for v in (tokens, width, ratio))
    c = np.zeros_like(t) if context is None else np.asarray(context, dtype=float)
    table = {
        "t*c*w": t * c * w,
        "1": np.ones_like(t),
        "t": t,
        "t*w": t * w,
        "t*w^e": t * w**e,
        "t*w^e*r": t * w**e * r,
        "t^2*w": t * t * w,
    }
    return np.stack([table[n] for n in names], axis=1)


@dataclass
class OpRegressor:
    """Least squares on FLOPs-like features of one (kind, op) group's measured cells."""

    kind: str
    op: str
    features: list[str]
    scale: list[float]  # column maxima used to condition the solve
    coef: list[float]
    width_exponent: float
    n: int
    p10_ratio: float
    p90_ratio: float
    rmse_pct: float  # in-sample root-mean-square relative error, %

    @classmethod
    def fit(cls, kind: str, op: str, rows: pd.DataFrame, width_exponent: float) -> OpRegressor | None:
        if len(rows) < 2:  # one point fits nothing but a constant: not a regressor worth the label
            return None
        names = list(GROUP_FEATURES.get(kind, OTHER_FEATURES))
        x = _features(names, rows["tokens"], rows["width"], rows["mlp_ratio"], width_exponent, rows["context"])
        scale = np.abs(x).max(axis=0)
        scale[scale == 0] = 1.0
        y = rows["p50"].to_numpy(float)
        coef, *_ = np.linalg.lstsq(x / scale, y, rcond=None)
        fitted = (x / scale) @ coef
        rmse = float(np.sqrt(np.mean(((fitted - y) / y) ** 2)) * 100)
        return cls(
            kind, op, names, scale.tolist(), coef.tolist(), width_exponent, len(rows),
            float(np.median(rows["p10"] / rows["p50"])), float(np.median(rows["p90"] / rows["p50"])), rmse,
        )

    def predict(self, cell: Cell) -> float:
        x = _features(self.features, [cell.tokens], [cell.width], [cell.mlp_ratio], self.width_exponent, [cell.context])
        value = float(((x / np.asarray(self.scale)) @ np.asarray(self.coef))[0])
        # assumption: a negative extrapolation means "negligible", not a time; floor at 0
        return max(value, 0.0)


# ----- whole-model calibration -------------------------------------------------------------------
@dataclass
class Calibration:
    """measured ≈ a·(table sum) + b·(blocks that run) + c.

    With cells timed interleaved (one run per round, backends/base.py) the table sum carries every
    program's call overhead and cold-cache start, ~30% over the whole model here: `a` and `b`
    absorb that bias, which is the same for every arch with the same number of blocks."""

    method: str = "none"  # linear | ratio_median | none
    a: float = 1.0
    b: float = 0.0
    c: float = 0.0
    n: int = 0
    note: str = "no whole-model rows in the table: predictions are uncalibrated table sums"

    def apply(self, table_sum: float, blocks: int) -> float:
        return self.a * table_sum + self.b * blocks + self.c

    @classmethod
    def fit(cls, sums: np.ndarray, blocks: np.ndarray, measured: np.ndarray, min_rows_linear: int) -> Calibration:
        sums, blocks, measured = (np.asarray(v, dtype=float) for v in (sums, blocks, measured))
        n = len(measured)
        if n == 0:
            return cls()
        x = np.stack([sums, blocks, np.ones(n)], axis=1)
        why = ""
        if n < min_rows_linear:
            why = f"only {n} whole-model rows (< {min_rows_linear})"
        elif np.linalg.matrix_rank(x) < 3:
            why = f"the {n} whole-model rows do not vary enough in table sum and block count (rank-deficient)"
        else:
            # weighted by 1/measured: minimises relative error, the unit the predictor is judged in,
            # so small archs are not sacrificed to large ones
            (a, b, c), _ = relative_least_squares(x, measured)
            if a > 0:
                return cls("linear", float(a), float(b), float(c), n, f"least squares (relative error) on {n} whole-model rows")
            why = f"least squares gave a non-positive slope a={a:.3g}"
        ratio = float(np.median(measured / sums))
        return cls("ratio_median", ratio, 0.0, 0.0, n, f"{why}; fell back to the median measured/sum ratio of {n} rows")


# ----- the predictor -----------------------------------------------------------------------------
@dataclass(frozen=True)
class CellCost:
    """One cell's share of a calibrated prediction: a·p50, plus b if it is a block."""

    cell: Cell
    ms: float
    source: str  # measured | interpolated | regressed


@dataclass(frozen=True)
class AdditiveCost:
    """A prediction as a sum: `fixed_ms + Σ cells[i].ms == predict(arch)`. The DP prices layouts
    with exactly these terms (search/problem.py), so it never re-derives the calibration."""

    fixed_ms: float  # the calibration intercept c (0 uncalibrated)
    cells: tuple[CellCost, ...]

    @property
    def total_ms(self) -> float:
        return self.fixed_ms + sum(c.ms for c in self.cells)


@dataclass
class Priced:
    cell: Cell
    p50: float
    p10: float
    p90: float
    source: str
    detail: str


@dataclass
class LatencyPredictor:
    """Fitted on one `LatencyTable`; prices archs of `space` per denoising step, in ms."""

    table: LatencyTable
    space: SearchSpace
    width_exponent: float = 2.0
    min_rows_linear: int = 5
    regressors: dict[str, OpRegressor] = field(default_factory=dict)
    calibration: Calibration = field(default_factory=Calibration)
    report: dict[str, Any] = field(default_factory=dict)
    generation: GenerationPricing = field(default_factory=GenerationPricing)
    _cache: dict[Cell, Priced] = field(default_factory=dict, repr=False)
    _groups: dict[tuple[str, str], pd.DataFrame] = field(default_factory=dict, repr=False)
    _profiled_latent: tuple[int, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        # the latent the table's cells were timed at (its manifest's space, else the space priced)
        self._profiled_latent = tuple((self.table.space or self.space).latent)
        cells = self.table.cell_rows()
        self._groups = {(k, o): g.reset_index(drop=True) for (k, o), g in cells.groupby(["kind", "op"], sort=True)}

    # ----- fitting -------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        table: LatencyTable,
        space: SearchSpace | None = None,
        *,
        width_exponent: float = 2.0,
        min_rows_linear: int = 5,
        generations: pd.DataFrame | None = None,
    ) -> LatencyPredictor:
        """Fit the per-op regressors on the measured cells, the calibration on the model rows and the
        generation pricing on `generations` (summary rows of measured whole generations: arch, steps,
        guidance, p50, p10, p90, n). `space` defaults to the one recorded in the table manifest."""
        space = space or table.space
        if space is None:
            raise DitnasError(
                f"latency table {table.root or '(in memory)'} records no search space; pass the space the table "
                "was profiled for (the config given to `ditnas profile`)"
            )
        pred = cls(table, space, float(width_exponent), int(min_rows_linear))
        for (kind, op), rows in pred._groups.items():
            reg = OpRegressor.fit(kind, op, rows, pred.width_exponent)
            if reg is not None:
                pred.regressors[_group_name(kind, op)] = reg
        models = table.model_rows()
        sums, blocks, measured = [], [], []
        for row in models.itertuples(index=False):
            arch = space.parse(row.arch, source=f"latency table model row {row.key}")
            sums.append(pred.table_sum(arch))
            blocks.append(arch.depth)
            measured.append(row.p50)
        pred.calibration = Calibration.fit(np.array(sums), np.array(blocks), np.array(measured), pred.min_rows_linear)
        fitted = np.array([pred.calibration.apply(s, b) for s, b in zip(sums, blocks, strict=True)])
        err = np.abs(fitted - np.array(measured)) / np.array(measured) * 100 if measured else np.array([])
        pred.report = {
            "table_id": table.table_id,
            "identity": table.identity,
            "calibration": asdict(pred.calibration),
            "in_sample_median_abs_err_pct": float(np.median(err)) if len(err) else None,
            "in_sample_within_10pct": float(np.mean(err <= 10)) if len(err) else None,
            "regressors": {k: {"n": r.n, "rmse_pct": r.rmse_pct} for k, r in pred.regressors.items()},
            "coverage": table.coverage_summary(space),
            "fitted_at": _now(),
        }
        pred.fit_generation(generations)
        return pred

    def fit_generation(self, generations: pd.DataFrame | None) -> GenerationPricing:
        """(Re)fit the end-to-end generation pricing on measured generations of this table's device."""
        from ditnas.latency_models.generation_latency import check_generation_rows, pdg_dense_of

        if generations is not None and len(generations):
            check_generation_rows(generations, f"generations of {self.table.root or 'the table'}")
        recipe = None
        if self.table.identity.get("backend") == "executorch-xnnpack":
            from ditnas.latency_models.lowering import RECIPE

            recipe = RECIPE.name  # profiled programs and generation .pte files alike go through it
        dense = pdg_dense_of(generations)
        self.generation = GenerationPricing.fit(lambda a, g: self.predict_step(a, g, dense), generations,
                                                threads=self.table.identity.get("threads"), recipe=recipe,
                                                parse=lambda a: self.space.parse(a, source="generation row"), pdg_dense=dense)
        self.report["generation"] = {g: asdict(f) for g, f in self.generation.fits.items()}
        return self.generation

    def predict_generation(self, arch: Arch, steps: int | None = None, guidance: str = "none",
                           pdg_dense: int | None = None) -> float:
        """One whole generation in ms (p50): `steps` (default the arch's) steps back to back with
        `guidance` none | cfg | pdg, at the table's threads (generation_latency.py defines it exactly)."""
        steps = int(arch.steps if steps is None else steps)
        return self.generation.generation_ms(self.predict_step(arch, guidance, pdg_dense), steps, guidance)

    def refit(self, table: LatencyTable) -> LatencyPredictor:
        """A new predictor, same settings, fitted on `table` (e.g. with newly measured model rows); the
        generation pricing is refitted on the same measured generations."""
        self.table.check_compatible(table.identity)
        rows = pd.DataFrame(self.generation.rows) if self.generation.rows else None
        return LatencyPredictor.fit(table, self.space, width_exponent=self.width_exponent, min_rows_linear=self.min_rows_linear,
                                    generations=rows)

    # ----- pricing -------------------------------------------------------------------------------
    def price(self, cell: Cell) -> Priced:
        """One cell: measured, else interpolated, else regressed (cached)."""
        if cell in self._cache:
            return self._cache[cell]
        row = self.table.get(cell)
        if row is not None:
            priced = Priced(cell, float(row.p50), float(row.p10), float(row.p90), "measured", row.key)
        else:
            priced = self._interpolate(cell) or self._regress(cell)
        self._cache[cell] = priced
        return priced

    def _coord(self, axis: str, value: float) -> float:
        return float(value) ** self.width_exponent if axis == "width" else float(value)

    def _interpolate(self, cell: Cell) -> Priced | None:
        group = self._groups.get((cell.kind, cell.op))
        if group is None or group.empty:
            return None
        for axis in AXES:
            fixed = [f for f in ("width", "mlp_ratio", "tokens", "stage", "context")
                     if f != axis and not (axis == "tokens" and f == "stage")]
            mask = np.ones(len(group), dtype=bool)
            for f in fixed:
                mask &= group[f].to_numpy() == getattr(cell, f)
            same = group[mask]
            v = float(getattr(cell, axis))
            lo, hi = same[same[axis] < v], same[same[axis] > v]
            if lo.empty or hi.empty:
                continue
            lo = lo.loc[lo[axis].idxmax()]
            hi = hi.loc[hi[axis].idxmin()]
            x0, x1, x = self._coord(axis, lo[axis]), self._coord(axis, hi[axis]), self._coord(axis, v)
            f = (x - x0) / (x1 - x0)
            mix = {s: float(lo[s] + f * (hi[s] - lo[s])) for s in ("p10", "p50", "p90")}
            return Priced(cell, mix["p50"], mix["p10"], mix["p90"], "interpolated", f"{axis}: {lo['key']} .. {hi['key']}")
        return None

    def _regress(self, cell: Cell) -> Priced:
        reg = self.regressors.get(_group_name(cell.kind, cell.op))
        if reg is None:
            n = 0 if (cell.kind, cell.op) not in self._groups else len(self._groups[(cell.kind, cell.op)])
            raise DitnasError(
                f"cell {cell.key()} is not in latency table {self.table.root or '(in memory)'}, has no measured "
                f"neighbours to interpolate from and no regressor ({n} measured {_group_name(cell.kind, cell.op)} cells, "
                "need >= 2); profile the missing cells (see the table's coverage report)"
            )
        p50 = reg.predict(cell)
        return Priced(cell, p50, p50 * reg.p10_ratio, p50 * reg.p90_ratio, "regressed", f"{_group_name(cell.kind, cell.op)} regressor (n={reg.n})")

    def _cells(self, arch: Arch) -> list[Cell]:
        self.check_frames(arch)
        return cells_for_arch(self.space, arch)

    def check_frames(self, arch: Arch) -> None:
        """Refuse a video arch (T > 1 latent frames) on a table profiled on images (T = 1).

        Its cells were timed at one frame's tokens, so they would price a clip as one frame."""
        profiled = self._profiled_latent
        if arch.latent[1] > 1 and profiled[1] == 1:
            shape = "x".join(str(v) for v in arch.latent)
            table = "x".join(str(v) for v in profiled)
            raise DitnasError(
                f"arch {arch.key()} is a video arch (latent {shape}, T={arch.latent[1]} frames) but latency table "
                f"{self.table.root or '(in memory)'} was profiled on images (latent {table}, T=1); profile a table "
                f"with the video latent {shape} (or price streaming with latency_models.stream_timing.stream_fps_host)"
            )

    def predict_detail(self, arch: Arch) -> pd.DataFrame:
        """Per-cell breakdown: cell fields, p10/p50/p90 and `source` (measured | interpolated | regressed)."""
        rows = []
        for cell in self._cells(arch):
            p = self.price(cell)
            f = cell.fields()
            del f["arch"]
            rows.append({**f, "p10": p.p10, "p50": p.p50, "p90": p.p90, "source": p.source, "detail": p.detail})
        return pd.DataFrame(rows)

    def table_sum(self, arch: Arch) -> float:
        """Σ p50 over the arch's cells (the uncalibrated prediction)."""
        return float(sum(self.price(c).p50 for c in self._cells(arch)))

    # ----- the additive decomposition (what the DP prices) -----------------------------------------
    def cell_cost(self, cell: Cell, calibrated: bool = True) -> float:
        """This cell's term of the per-step prediction: a·p50 (+ b for a block, which runs once)."""
        p50 = self.price(cell).p50
        if not calibrated:
            return p50
        cal = self.calibration
        return cal.a * p50 + (cal.b if cell.kind == "block" else 0.0)

    def fixed_cost(self, calibrated: bool = True) -> float:
        """The term every arch pays regardless of its cells (the calibration intercept c)."""
        return self.calibration.c if calibrated else 0.0

    def decompose(self, arch: Arch, calibrated: bool = True) -> AdditiveCost:
        """`predict(arch)` as fixed cost + one term per cell (AdditiveCost)."""
        cells = tuple(CellCost(c, self.cell_cost(c, calibrated), self.price(c).source) for c in self._cells(arch))
        return AdditiveCost(self.fixed_cost(calibrated), cells)

    def predict(self, arch: Arch, calibrated: bool = True) -> float:
        """Latency per denoising step in ms (p50): a·(table sum) + b·(blocks that run) + c."""
        s = self.table_sum(arch)
        return self.calibration.apply(s, arch.depth) if calibrated else s

    def predict_dense_only(self, arch: Arch, pdg_dense: int, calibrated: bool = True) -> float:
        """One call of `arch`'s dense-only net (Path-Drop Guidance's unconditional branch: the first and last
        `pdg_dense` slots, every middle slot skipped, the stream at the arch's width), priced like `predict`."""
        from ditnas.supernet.token_drop import check_pdg_dense

        n = len(arch.slots)
        check_pdg_dense(int(pdg_dense), n, "pdg_dense")
        middle = frozenset(range(int(pdg_dense), n - int(pdg_dense)))
        self.check_frames(arch)
        s = float(sum(self.price(c).p50 for c in cells_for_arch(self.space, arch, drop_slots=middle)))
        blocks = sum(not slot.is_skip for i, slot in enumerate(arch.slots) if i not in middle)
        return self.calibration.apply(s, blocks) if calibrated else s

    def predict_step(self, arch: Arch, guidance: str = "none", pdg_dense: int | None = None,
                     calibrated: bool = True) -> float:
        """The per-step feature P_g of the generation pricing (generation_latency.py): the batch-1 call for
        none and cfg, the full + dense-only calls for pdg (`pdg_dense` default: the table's pdg rows')."""
        full = self.predict(arch, calibrated)
        if guidance != "pdg":
            return full
        dense = self.generation.pdg_dense if pdg_dense is None else int(pdg_dense)
        return full + self.predict_dense_only(arch, dense, calibrated)

    def predict_range(self, arch: Arch, calibrated: bool = True) -> dict[str, float]:
        """p10/p50/p90 sums (calibrated with the same a, b, c). A band, not a true quantile of the sum."""
        cells = [self.price(c) for c in self._cells(arch)]
        sums = {q: float(sum(getattr(p, q) for p in cells)) for q in ("p10", "p50", "p90")}
        if calibrated:
            sums = {q: self.calibration.apply(v, arch.depth) for q, v in sums.items()}
        return sums

    # ----- validation ----------------------------------------------------------------------------
    def validate(self, held_out: pd.DataFrame | LatencyTable) -> dict[str, Any]:
        """Compare predictions with measured whole-model rows (`arch` + `p50` columns; rows of another
        kind are ignored). Error = (predicted − measured) / measured."""
        if isinstance(held_out, LatencyTable):
            self.table.check_compatible(held_out.identity)
            held_out = held_out.model_rows()
        df = held_out if "kind" not in held_out.columns else held_out[held_out["kind"] == "model"]
        missing = [c for c in ("arch", "p50") if c not in df.columns]
        if missing:
            raise DitnasError(f"validate: held-out rows lack columns {missing}; pass whole-model rows of a latency table")
        if df.empty:
            raise DitnasError("validate: no whole-model rows to validate on; measure held-out archs (remeasure) first")
        trained = set(self.table.model_rows()["arch"])
        rows = []
        for r in df.itertuples(index=False):
            arch = self.space.parse(r.arch, source=f"validate row {getattr(r, 'key', r.arch)}")
            detail = self.predict_detail(arch)
            s = float(detail["p50"].sum())
            cal = self.calibration.apply(s, arch.depth)
            meas = float(r.p50)
            err, err_u = (cal - meas) / meas * 100, (s - meas) / meas * 100
            rows.append(
                {
                    "key": getattr(r, "key", ""),
                    "arch": r.arch,
                    "measured_ms": meas,
                    "predicted_ms": cal,
                    "predicted_uncalibrated_ms": s,
                    "err_pct": err,
                    "err_pct_uncalibrated": err_u,
                    "within_10pct": abs(err) <= 10,
                    "within_10pct_uncalibrated": abs(err_u) <= 10,
                    "n_interpolated": int((detail["source"] == "interpolated").sum()),
                    "n_regressed": int((detail["source"] == "regressed").sum()),
                    "in_training": r.arch in trained,
                }
            )
        out = pd.DataFrame(rows)
        return {
            "n": len(out),
            "within_10pct": float(out["within_10pct"].mean()),
            "within_10pct_uncalibrated": float(out["within_10pct_uncalibrated"].mean()),
            "median_abs_err_pct": float(out["err_pct"].abs().median()),
            "median_abs_err_pct_uncalibrated": float(out["err_pct_uncalibrated"].abs().median()),
            "n_in_training": int(out["in_training"].sum()),  # > 0 means the rows were not truly held out
            "calibration": self.calibration.method,
            "rows": out.to_dict(orient="records"),
        }

    # ----- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "table_id": self.table.table_id,
            "identity": self.table.identity,
            "space": self.space.to_dict(),
            "space_key": self.space.key(),
            "width_exponent": self.width_exponent,
            "min_rows_linear": self.min_rows_linear,
            "calibration": asdict(self.calibration),
            "regressors": {k: asdict(r) for k, r in self.regressors.items()},
            "report": self.report,
            "generation": self.generation.to_dict(),
            "versions": {"ditnas": package_version("ditnas"), "numpy": np.__version__},
        }

    def save(self, root: Path) -> Path:
        """Write `<root>/predictor.json` (next to the table it was fitted on)."""
        path = Path(root) / PREDICTOR
        write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, root: Path, table: LatencyTable | None = None) -> LatencyPredictor:
        """Read predictor.json; the table defaults to the one in the same folder and must be the one
        the predictor was fitted on (same table_id)."""
        path = Path(root) / PREDICTOR
        d = read_json(path, missing="fit a predictor on the table first (ditnas latency validate/predict fits one)",
                      damaged="delete it and refit the predictor")
        table = table if table is not None else LatencyTable.load(root)
        for f in ("table_id", "space", "calibration", "regressors", "width_exponent"):
            if f not in d:
                raise DitnasError(f"{path}: field {f!r} missing; delete it and refit the predictor")
        if d["table_id"] != table.table_id:
            raise DitnasError(
                f"{path} was fitted on table {d['table_id']}, but the table given is {table.table_id} "
                f"({table.root or '(in memory)'}); refit the predictor on this table"
            )
        pred = cls(
            table,
            SearchSpace.from_dict(d["space"], source=f"{path}: field 'space'"),
            float(d["width_exponent"]),
            int(d.get("min_rows_linear", 5)),
            {k: OpRegressor(**v) for k, v in d["regressors"].items()},
            Calibration(**d["calibration"]),
            d.get("report", {}),
            GenerationPricing.from_dict(d.get("generation")),
        )
        return pred


def _group_name(kind: str, op: str) -> str:
    return f"{kind}:{op}" if op else kind


# ----- closed loop -------------------------------------------------------------------------------
def remeasure(
    archs: Sequence[Arch],
    supernet: Any,
    session: ProfilingSession,
    backend: Backend,
    *,
    table: LatencyTable | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> LatencyTable:
    """Measure whole-model programs of `archs` into `session` (resumable: already measured archs are
    skipped by `ProfilingSession.run`; on local backends the session's other programs are re-timed
    in the same pass, so old and new rows share one machine state) and return the updated table: `table` with the session's rows
    merged in (re-measured cells replace old ones), or the session's own table when `table` is None."""
    programs = []
    seen: set[str] = set()
    for arch in archs:
        program = model_program(supernet, arch)
        if program.key() not in seen:  # the same arch twice would be refused by run(); measure it once
            seen.add(program.key())
            programs.append(program)
    session.run(programs, backend, rebuild=lambda cell: build_program(supernet, cell), progress=progress)
    fresh = LatencyTable.from_sessions([session], space=supernet.space)
    if table is None:
        return fresh
    table.check_compatible(fresh.identity)
    return table.merged(fresh)

