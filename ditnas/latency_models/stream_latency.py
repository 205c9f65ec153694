"""Streaming latency: what one clip costs when a frame-causal model streams it chunk by chunk on the device.

**The priced quantity.** `stream_ms(arch)` is the p50 wall time of ONE streamed clip: the clip's T latent
frames in T/k chunks of k frames (`chunk`); each chunk `steps` denoiser calls from noise plus one commit call
at t = 0 that extends the caches (none after the last chunk: it would feed no one), batch 1, no guidance,
the chunk programs of stream_programs.py lowered with the project's recipe, at the table's thread count,
timed as whole streams in rounds of fresh processes (stream_timing.py). Streaming FPS = T / stream_ms. (stream_programs._stream_generate
is the loop; `stream_fps_host` measures the same quantity for one model.)

**Per cell.** A chunk call at frames t0.. costs the sum of `cells_for_arch(space, arch, chunk=k, t0=t0)`:
every block as a `stream_block` cell (its causal step over a cache of t0 earlier frames, timed as its own
program with the cache an explicit input and output), the patch embedding, transitions and final layer at
the chunk's tokens. The clip weights each position by its calls:

    W(arch) = Σ_t0 calls(t0) · S(arch, t0),     calls(t0) = steps + 1 (steps for the last chunk)

**Calibration** on measured streams of whole models (the profile's calibration archs, `latency.stream_steps`
step counts each; two counts separate per-call from per-clip costs):

    stream_ms ≈ α·W + δ·N + β·calls + γ          (StreamFit, least squares on relative error)

N = Σ_t0 calls(t0)·(cells of a chunk call at t0) counts the cell programs W charged. Each cell is timed as its own
program, interleaved, so each p50 carries one program call's overhead that a fused chunk call pays once (the
image calibration's per-block term b, predictor.Calibration, for the same reason). At ~0.1 ms per chunk block that
overhead is a large share for narrow archs: on 11 held-out streams (bench/results/video_search.json, 2026-12-08
02:36) fits on 4-8 calibration archs were within ±10% for 0.909-1.0 of them with δ and 0.727 without, the
all-`ssa:0.5` arch over-priced by 11-12% with δ and 17-18% without. With fewer than `MIN_ROWS_PROGRAM_TERM`
streams, or streams that do not separate N from calls, δ = 0 (GenerationFit's law, the method says which).

W and N are sums over cells, so the DP prices a layout exactly as the predictor does: a block's term is
Σ_t0 calls(t0)·(α·p50(its stream_block cell at t0) + δ), the fixed cost β·calls + γ plus the embedding and final
layer (`StreamingPredictor.cell_cost` / `fixed_cost`). Without measured streams the prediction is W itself,
labelled "uncalibrated".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ditnas.arch import Arch
from ditnas.errors import ConfigFieldError, DitnasError
from ditnas.io import read_json, write_json
from ditnas.latency_models.generation_latency import GenerationFit, relative_least_squares
from ditnas.latency_models.programs import Cell, cells_for_arch, stream_positions

STREAMS = "streams.json"  # timed streams of whole models, in a profiling session and beside its table
Progress = Callable[[int, int, str], None]
# assumption: the per-program term needs 2 rows per coefficient (4 coefficients); a profile's default 3 archs x 2
# step counts fall back to the 3-term law
MIN_ROWS_PROGRAM_TERM = 8


def position_calls(positions: tuple[int, ...], steps: int) -> dict[int, int]:
    """Chunk calls per chunk position of one streamed clip: `steps` denoising calls, + 1 commit but the last."""
    last = positions[-1]
    return {t0: int(steps) + (0 if t0 == last else 1) for t0 in positions}


def definition(chunk: int, frames: int, steps: int, threads: Any, calibrated: str) -> str:
    """The one-line meaning of a streaming latency figure (printed by search and reports)."""
    return (f"one streamed clip: {frames} latent frames in chunks of {chunk}, {steps} denoiser calls per chunk + 1 commit "
            f"call (none after the last chunk), batch 1, no guidance, the chunk programs (cache as explicit inputs/outputs) "
            f"lowered with the project's recipe, {threads} thread(s), p50; FPS = {frames} / that -- {calibrated}")


# ----------------------------------------------------------------------------------------------
# measured streams (the profile stage)
# ----------------------------------------------------------------------------------------------
def read_streams(root: Path, stat: str = "total_ms") -> list[dict[str, Any]]:
    """The timed streams in `root` (a session: raw `total_ms` samples; a table folder: summary rows, `p50`)."""
    path = Path(root) / STREAMS
    if not path.exists():
        return []
    rows = read_json(path, missing="", damaged="delete it to re-time the session's streams (`ditnas profile` on the same --out)")
    need = {"arch", "chunk", "steps", stat}
    if not isinstance(rows, list) or any(not isinstance(r, dict) or not need <= set(r) for r in rows):
        raise DitnasError(f"{path} is not a list of timed streams ({', '.join(sorted(need))} per row); delete it and "
                          "re-run `ditnas profile` on the session to re-time them")
    return rows


def measure_streams(supernet: Any, archs: list[Arch], chunk: int, steps_list: tuple[int, ...], threads: int, rounds: int,
                    root: Path, *, progress: Progress | None = None, seed: int = 0, repeats: int = 1) -> list[dict[str, Any]]:
    """Export each arch's chunk programs into `<root>/streams/<arch key>_chunk<k>/`, then time whole streamed clips
    at every steps value in `rounds` rounds of fresh processes, each timing one clip of every (arch, steps) in a new
    seeded order (stream_timing.py: why) into `<root>/streams.json`, one sample per round (the median of its
    `repeats` streams, timed back to back after one warm-up).
    Resumable: a folder already exported is not lowered again, an (arch, chunk, steps, threads) already timed is
    not re-timed; the timing itself is all rounds or none (a partial set of rounds would not be interleaved alike)."""
    from ditnas.latency_models.stream_programs import export_stream_programs
    from ditnas.latency_models.stream_timing import time_streams_in_rounds
    from ditnas.manifest import MANIFEST

    root = Path(root)
    rows = read_streams(root)
    done = {(r["arch"], int(r["chunk"]), int(r["steps"]), int(r.get("threads", 0))) for r in rows}
    frames = int(supernet.space.latent[1])
    todo = [(a, int(s)) for a in archs for s in sorted(set(steps_list)) if (str(a), chunk, int(s), threads) not in done]
    if not todo:
        return rows
    folders: dict[str, Path] = {}
    untimed = list(dict.fromkeys(a for a, _ in todo))
    for i, arch in enumerate(untimed):
        if progress:
            progress(i, len(untimed), f"stream programs: {arch}")
        folder = root / "streams" / f"{arch.key()}_chunk{chunk}"  # programs of another chunk size are other programs
        if not (folder / MANIFEST).exists():
            sub = supernet.extract(arch).eval().set_causal(True)
            export_stream_programs(sub, chunk, frames, folder)
        folders[str(arch)] = folder
    jobs = [(f"{a}@{s}", folders[str(a)], s) for a, s in todo]
    timed = time_streams_in_rounds(jobs, threads, rounds, warmup=1, iters=repeats, seed=seed, progress=progress)
    for (arch, steps), (key, _, _) in zip(todo, jobs):  # one sample per round: the median of its `repeats` streams
        rows.append({"arch": str(arch), "chunk": chunk, "steps": steps, "threads": threads, "frames": frames,
                     "rounds": rounds, "repeats": repeats,
                     "total_ms": [float(np.median(rnd)) for rnd in timed["streams"][key]["total_ms"]]})
    write_json(root / STREAMS, rows)
    return rows


def summarize_streams(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per timed (arch, chunk, steps, threads): p50/p10/p90 of the whole-clip times."""
    out = []
    for r in rows:
        ms = np.asarray(r["total_ms"], dtype=float)
        if not len(ms) or not np.isfinite(ms).all() or (ms <= 0).any():
            raise DitnasError(f"stream row of {r['arch']} at {r['steps']} steps has no usable times; re-time the session")
        out.append({"arch": r["arch"], "chunk": r["chunk"], "steps": r["steps"], "threads": r.get("threads"),
                    "p50": float(np.median(ms)), "p10": float(np.quantile(ms, 0.1)), "p90": float(np.quantile(ms, 0.9)),
                    "n": int(len(ms))})
    return out


# ----------------------------------------------------------------------------------------------
# pricing
# ----------------------------------------------------------------------------------------------
@dataclass
class StreamFit:
    """stream_ms ≈ alpha·W + delta·N + beta·calls + gamma (module doc): W the call-weighted cell sum, N the cell
    programs it charged, calls the chunk calls of the clip."""

    guidance: str = "none"
    method: str = "uncalibrated"  # linear | linear_no_program_term | ratio_median | uncalibrated
    alpha: float = 1.0
    delta: float = 0.0  # ms per cell program charged (negative: the call overhead a fused call does not repeat)
    beta: float = 0.0
    gamma: float = 0.0
    n: int = 0
    in_sample_median_abs_err_pct: float | None = None
    note: str = "no measured streams: the call-weighted sum of the cells"

    def apply(self, w: float, programs: float, calls: float) -> float:
        return self.alpha * w + self.delta * programs + self.beta * calls + self.gamma

    @classmethod
    def fit(cls, w: np.ndarray, programs: np.ndarray, calls: np.ndarray, measured: np.ndarray,
            program_term: bool = True) -> StreamFit:
        """Least squares on relative error; `program_term=False` fits the 3-term law (bench/video_search's ablation)."""
        w, programs, calls, measured = (np.asarray(v, dtype=float) for v in (w, programs, calls, measured))
        n = len(measured)
        x = np.stack([w, programs, calls, np.ones(n)], axis=1)
        if program_term and n >= MIN_ROWS_PROGRAM_TERM and np.linalg.matrix_rank(x) == 4:
            coef, err = relative_least_squares(x, measured)
            if coef[0] > 0:
                a, d, b, c = (float(v) for v in coef)
                return cls("none", "linear", a, d, b, c, n, err,
                           f"least squares (relative error) on {n} measured streams, with a per-program term")
        why = ("no per-program term asked for" if not program_term
               else f"{n} measured streams (< {MIN_ROWS_PROGRAM_TERM} for the per-program term)" if n < MIN_ROWS_PROGRAM_TERM
               else "the streams do not separate the per-program term (rank-deficient or a non-positive slope)")
        three = GenerationFit.fit("none", w / np.maximum(calls, 1), calls, measured)
        method = "linear_no_program_term" if three.method == "linear" else three.method
        return cls("none", method, three.alpha, 0.0, three.beta, three.gamma, three.n, three.in_sample_median_abs_err_pct,
                   f"{three.note}; {why}" if three.n else three.note)


@dataclass
class StreamGeneration:
    """What the search asks of `predictor.generation`, for a streamed clip: the priced quantity is already
    one whole generation at the predictor's `steps`, so budgets pass through unchanged."""

    steps: int
    text: str
    fit: StreamFit
    threads: Any = None

    @property
    def fits(self) -> dict[str, StreamFit]:
        return {"stream": self.fit}

    def check(self, steps: int, guidance: str) -> None:
        """DitnasError unless (steps, guidance) is what the streams were priced at."""
        if int(steps) != self.steps or guidance != "none":
            raise DitnasError(f"the streaming latency is priced at {self.steps} steps per chunk without guidance; "
                              f"asked for {steps} steps with guidance {guidance!r}")

    def fit_for(self, guidance: str, where: str = "the latency table") -> StreamFit:
        self.check(self.steps, guidance)
        return self.fit

    def per_step_budget(self, budget_ms: float, steps: int, guidance: str = "none") -> float:
        self.check(steps, guidance)
        return float(budget_ms)

    def generation_ms(self, stream_ms: float, steps: int, guidance: str = "none") -> float:
        self.check(steps, guidance)
        return float(stream_ms)

    def definition(self, guidance: str = "none", steps: int | None = None) -> str:
        return self.text


@dataclass
class StreamingPredictor:
    """Prices archs as ONE streamed clip (module doc) on a table with stream_block cells; the search's predictor
    interface (`predict`, `cell_cost`, `fixed_cost`, `generation`), so the DP and Optuna optimise streaming FPS."""

    base: Any  # LatencyPredictor of the table (its cells, ladder and space)
    chunk: int
    steps: int
    fit: StreamFit = field(default_factory=StreamFit)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.space = self.base.space
        self.table = self.base.table
        self.frames = int(self.space.latent[1])
        self.positions = stream_positions(self.space, self.chunk)
        self.calls = position_calls(self.positions, self.steps)
        self.total_calls = sum(self.calls.values())
        self.calibration = self.base.calibration  # the whole-clip calibration (reported beside the stream fit)
        self._check_cells()

    @classmethod
    def fit_rows(cls, base: Any, chunk: int, steps: int, rows: list[dict[str, Any]],
                 program_term: bool = True) -> StreamingPredictor:
        """Fitted on summary rows of measured streams (summarize_streams) at this chunk size."""
        pred = cls(base, chunk, steps)
        mine = [r for r in rows if int(r["chunk"]) == chunk]
        if mine:
            feats = []
            for r in mine:
                arch = base.space.parse(r["arch"], source="stream row")
                c = position_calls(pred.positions, int(r["steps"]))
                feats.append((pred.weighted_sum(arch, c), pred.programs(arch, c), sum(c.values())))
            w, programs, calls = np.array(feats, dtype=float).T
            pred.fit = StreamFit.fit(w, programs, calls, np.array([r["p50"] for r in mine]), program_term)
        pred.rows = mine
        return pred

    @classmethod
    def load(cls, base: Any, table_root: Path | None, chunk: int, steps: int) -> StreamingPredictor:
        rows = read_streams(table_root, "p50") if table_root is not None else []
        return cls.fit_rows(base, chunk, steps, rows)

    def _check_cells(self) -> None:
        have = any(k == "stream_block" for k in self.table.cell_rows()["kind"])
        if not have:
            raise ConfigFieldError("search.stream_chunk", f"{self.table.describe()} has no streaming cells; profile it with "
                                   f"latency.stream_chunk={self.chunk} (the same chunk size) to price streaming")

    # ----- sums over cells ---------------------------------------------------------------------------
    def chunk_sum(self, arch: Arch, t0: int) -> float:
        """Σ p50 of the cells of one chunk call at frames t0.. (uncalibrated)."""
        self.base.check_frames(arch)
        return float(sum(self.base.price(c).p50 for c in cells_for_arch(self.space, arch, chunk=self.chunk, t0=t0)))

    def weighted_sum(self, arch: Arch, calls: dict[int, int] | None = None) -> float:
        calls = self.calls if calls is None else calls
        return float(sum(n * self.chunk_sum(arch, t0) for t0, n in calls.items()))

    def programs(self, arch: Arch, calls: dict[int, int] | None = None) -> int:
        """N: the cell programs `weighted_sum` charged (each chunk call's cells, times its calls)."""
        calls = self.calls if calls is None else calls
        return sum(n * len(cells_for_arch(self.space, arch, chunk=self.chunk, t0=t0)) for t0, n in calls.items())

    # ----- the search's predictor interface ----------------------------------------------------------
    def predict(self, arch: Arch, calibrated: bool = True) -> float:
        """One streamed clip in ms (p50)."""
        w = self.weighted_sum(arch)
        return self.fit.apply(w, self.programs(arch), self.total_calls) if calibrated else w

    def predict_generation(self, arch: Arch, steps: int | None = None, guidance: str = "none") -> float:
        self.generation.check(self.steps if steps is None else steps, guidance)
        return self.predict(arch)

    def fps(self, arch: Arch) -> float:
        return self.frames / self.predict(arch) * 1e3

    def _stream_cells(self, cell: Cell) -> list[tuple[Cell, int]]:
        """The chunk-level cells a clip-level cell (as the DP builds them) stands for, with their call counts."""
        per_frame = cell.tokens // self.frames
        tokens = per_frame * self.chunk
        if cell.kind == "block":
            return [(Cell("stream_block", cell.op, cell.width, cell.mlp_ratio, tokens, cell.stage, context=t0), n)
                    for t0, n in self.calls.items()]
        return [(Cell(cell.kind, cell.op, cell.width, cell.mlp_ratio, tokens, cell.stage), self.total_calls)]

    def cell_cost(self, cell: Cell, calibrated: bool = True) -> float:
        if not calibrated:
            return sum(n * self.base.price(c).p50 for c, n in self._stream_cells(cell))
        return sum(n * (self.fit.alpha * self.base.price(c).p50 + self.fit.delta) for c, n in self._stream_cells(cell))

    def fixed_cost(self, calibrated: bool = True) -> float:
        return self.fit.beta * self.total_calls + self.fit.gamma if calibrated else 0.0

    @property
    def generation(self) -> StreamGeneration:
        return StreamGeneration(self.steps, self.definition(), self.fit, self.table.identity.get("threads"))

    def definition(self) -> str:
        if self.fit.method == "uncalibrated":
            how = "uncalibrated: the call-weighted sum of the cells, no measured streams"
        else:
            term = "with" if self.fit.method == "linear" else "without"
            how = (f"fitted on {self.fit.n} measured streams {term} a per-program term (median in-sample error "
                   f"{self.fit.in_sample_median_abs_err_pct:.1f}%)")
        return definition(self.chunk, self.frames, self.steps, self.table.identity.get("threads"), how)

    def describe(self) -> dict[str, Any]:
        return {"chunk": self.chunk, "frames": self.frames, "steps": self.steps, "positions": list(self.positions),
                "calls_per_clip": self.total_calls, "fit": asdict(self.fit), "definition": self.definition(),
                "measured_streams": self.rows}


def search_predictor(base: Any, table_root: Path | None, stream_chunk: int, steps: int, guidance: str = "none",
                     pdg_dense: int | None = None) -> Any:
    """The predictor a search prices with: `base` (whole-clip calls), with `stream_chunk` a StreamingPredictor, with
    guidance pdg a PathDropPricing (full + dense-only call per step; `pdg_dense` default: the table's pdg rows')."""
    if stream_chunk:
        return StreamingPredictor.load(base, table_root, stream_chunk, steps)
    if guidance == "pdg":
        from ditnas.latency_models.pdg_latency import PathDropPricing

        return PathDropPricing(base, base.generation.pdg_dense if pdg_dense is None else int(pdg_dense))
    return base


def measured_stream_ms(predictor: Any, arch: Arch) -> float | None:
    """The measured p50 of streaming `arch` at the predictor's chunk and steps, if the profile timed it."""
    hits = [r["p50"] for r in getattr(predictor, "rows", []) if r["arch"] == str(arch) and int(r["steps"]) == predictor.steps]
    return float(hits[0]) if hits else None
