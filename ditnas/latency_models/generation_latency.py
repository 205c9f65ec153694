"""End-to-end generation latency: what a user's sampler costs, not one interleaved call.

**The priced quantity.** `generation_ms(arch, steps, guidance)` is the p50 wall time of ONE whole
generation on the table's device: `steps` denoiser calls back to back in the sampler's host loop
(Euler updates between calls, the new x fed back each step), the denoiser lowered with the project's
recipe (latency_models/lowering.py), at the table's thread count, batch 1 per image, with

- `none`: one batch-1 call per step (a distilled few-step student);
- `cfg`: classifier-free guidance as ONE batch-2 call per step ([cond, null] stacked) with the
  combination v_u + s·(v_c − v_u) on the host — what `ditnas sample` and the exported sampler do;
- `pdg`: Path-Drop Guidance (SPRINT) as TWO batch-1 calls per step: the full net on the label and its
  dense-only net (the first and last `pdg_dense` slots, every middle slot skipped) on the null label,
  combined the same way (generation.DenoiserProgram(guidance="pdg")).

**The model.** The per-cell table prices one batch-1 call measured interleaved with every other
program (cold caches); a denoising loop runs warm and a batch-2 call is not 2× a batch-1 one, so the
per-step prediction P_g(arch) (`LatencyPredictor.predict_step`: P(arch) for none and cfg, P(arch) +
P(dense-only arch) for pdg) is mapped per guidance mode g by a fit on measured generations of whole models:

    generation_ms ≈ α_g · steps · P_g(arch) + β_g · steps + γ_g        (least squares, relative error)

A table without measured pdg generations prices pdg from the none fit: each PDG step is two batch-1 calls
of the kind the none generations time, so α_pdg = α_none, β_pdg = 2·β_none, γ_pdg = γ_none, labelled
"derived from none". # assumption: the host-side combination (3 element-wise ops on a latent) is negligible
next to a call; the measured pdg fit replaces the derived one as soon as pdg generations are profiled.

α_g > 0 keeps it monotone in P, so a generation budget B is a per-step budget for the DP:
P ≤ (B − γ_g − β_g·steps) / (α_g·steps) (`per_step_budget`). A table without generation rows for a
mode cannot price it: for `none` it falls back to steps × P, labelled "uncalibrated"; `cfg` is refused.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ditnas.errors import DitnasError

GUIDANCE = ("none", "cfg", "pdg")
GENERATIONS = "generations.parquet"  # raw timed generations inside a profiling session
SAMPLE_COLUMNS = ("key", "arch", "steps", "guidance", "threads", "run", "ms")


def generation_key(arch: str, steps: int, guidance: str, pdg_dense: int = 1) -> str:
    """A timed generation's key; a pdg key names its dense-only net (`pdg-dense<d>`): another d is another program."""
    mode = f"pdg-dense{int(pdg_dense)}" if guidance == "pdg" else guidance
    return f"generation:{mode}:steps{int(steps)}:{arch}"


def pdg_dense_of(rows: pd.DataFrame | None, default: int = 1) -> int:
    """The dense count of the pdg generations in `rows` (summary or raw rows with `key`, `guidance`); one count
    per table (the profile times one), else a DitnasError."""
    if rows is None or not len(rows) or "key" not in rows.columns:
        return default
    keys = rows.loc[rows["guidance"] == "pdg", "key"]
    found = sorted({int(k.split(":")[1][len("pdg-dense"):]) for k in keys})
    if len(found) > 1:
        raise DitnasError(f"the generations hold pdg timings of dense-only nets with {found} dense slots; one table prices "
                          "one -- profile each latency.pdg_dense into its own session")
    return found[0] if found else default


def definition(guidance: str, steps: int | None, threads: Any, recipe: str | None, pdg_dense: int | None = None) -> str:
    """The one-line meaning of a generation latency figure (printed by search and reports)."""
    calls = {"cfg": "1 batch-2 call per step (CFG: [cond, null])",
             "pdg": f"2 batch-1 calls per step (PDG: the full net on the label, its dense-only net -- the first and "
                    f"last {pdg_dense} slots -- on the null label)"}.get(guidance, "1 batch-1 call per step (no guidance)")
    n = f"{steps} steps" if steps is not None else "N steps"
    return (f"one whole generation: {n} back to back in the host loop, {calls}, lowered with "
            f"{recipe or 'the profiling recipe'}, {threads} thread(s), p50")


def relative_least_squares(x: np.ndarray, measured: np.ndarray) -> tuple[np.ndarray, float]:
    """Least squares of `measured` on the columns of `x`, each row weighted by 1/measured (relative error, the unit
    a latency prediction is judged in): the coefficients and the in-sample median |error| in %."""
    w = 1.0 / measured
    coef, *_ = np.linalg.lstsq(x * w[:, None], measured * w, rcond=None)
    return coef, float(np.median(np.abs(x @ coef - measured) / measured) * 100)


@dataclass(frozen=True)
class GenerationFit:
    """generation_ms ≈ alpha·steps·P + beta·steps + gamma for one guidance mode."""

    guidance: str
    method: str = "uncalibrated"  # linear | ratio_median | uncalibrated
    alpha: float = 1.0
    beta: float = 0.0
    gamma: float = 0.0
    n: int = 0
    in_sample_median_abs_err_pct: float | None = None
    note: str = "no measured generations: steps x per-step prediction"

    def apply(self, per_step_ms: float, steps: int) -> float:
        return self.alpha * steps * per_step_ms + self.beta * steps + self.gamma

    def per_step_budget(self, budget_ms: float, steps: int) -> float:
        return (budget_ms - self.gamma - self.beta * steps) / (self.alpha * steps)

    @classmethod
    def fit(cls, guidance: str, per_step: np.ndarray, steps: np.ndarray, measured: np.ndarray, min_rows_linear: int = 4) -> GenerationFit:
        per_step, steps, measured = (np.asarray(v, dtype=float) for v in (per_step, steps, measured))
        n = len(measured)
        if n == 0:
            return cls(guidance)
        x = np.stack([steps * per_step, steps, np.ones(n)], axis=1)
        why = ""
        if n < min_rows_linear:
            why = f"only {n} measured generations (< {min_rows_linear})"
        elif np.linalg.matrix_rank(x) < 3:
            why = f"the {n} measured generations do not vary enough in steps and per-step latency (rank-deficient)"
        else:
            (a, b, c), err = relative_least_squares(x, measured)
            if a > 0:
                return cls(guidance, "linear", float(a), float(b), float(c), n, err,
                           f"least squares (relative error) on {n} measured generations")
            why = f"least squares gave a non-positive slope alpha={a:.3g}"
        ratio = float(np.median(measured / (steps * per_step)))
        err = float(np.median(np.abs(ratio * steps * per_step - measured) / measured) * 100)
        return cls(guidance, "ratio_median", ratio, 0.0, 0.0, n, err, f"{why}; the median measured/(steps x per-step) ratio")


@dataclass
class GenerationPricing:
    """The per-guidance fits of one table (stored in predictor.json under `generation`)."""

    fits: dict[str, GenerationFit] = field(default_factory=dict)
    threads: Any = None
    recipe: str | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)  # the summary rows the fits were made on
    pdg_dense: int = 1  # the dense slots at each end of the PDG dense-only net its pdg rows and prices mean

    def fit_for(self, guidance: str, where: str = "the latency table") -> GenerationFit:
        if guidance not in GUIDANCE:
            raise DitnasError(f"guidance {guidance!r} is not one of {', '.join(GUIDANCE)}")
        fit = self.fits.get(guidance)
        if fit is not None and fit.method != "uncalibrated":
            return fit
        if guidance == "none":
            return GenerationFit("none")
        if guidance == "pdg":
            return self.derived_pdg_fit()
        have = sorted(g for g, f in self.fits.items() if f.method != "uncalibrated") or ["none measured"]
        raise DitnasError(f"{where} holds no measured {guidance} generations (it has: {', '.join(have)}), so it cannot price "
                          f"guidance {guidance!r}; re-profile it (`ditnas profile` measures generations with "
                          f"latency.guidance) or search with --guidance none")

    def derived_pdg_fit(self) -> GenerationFit:
        """PDG priced as two none-guidance calls per step (module docstring: the assumption)."""
        base = self.fit_for("none")
        if base.method == "uncalibrated":
            return GenerationFit("pdg", note="no measured generations: steps x (full + dense-only per-call prediction)")
        return GenerationFit("pdg", "derived_from_none", base.alpha, 2 * base.beta, base.gamma, 0, None,
                             f"derived from the none fit on {base.n} measured generations (2 batch-1 calls per step); "
                             "no pdg generation was measured")

    def generation_ms(self, per_step_ms: float, steps: int, guidance: str) -> float:
        return self.fit_for(guidance).apply(per_step_ms, int(steps))

    def per_step_budget(self, budget_ms: float, steps: int, guidance: str) -> float:
        return self.fit_for(guidance).per_step_budget(float(budget_ms), int(steps))

    def definition(self, guidance: str, steps: int | None = None) -> str:
        text = definition(guidance, steps, self.threads, self.recipe, self.pdg_dense)
        fit = self.fits.get(guidance)
        if guidance == "pdg" and (fit is None or fit.method == "uncalibrated"):
            derived = self.derived_pdg_fit()
            if derived.method != "uncalibrated":
                return text + f" -- {derived.note}"
        if fit is None or fit.method == "uncalibrated":
            return text + " -- uncalibrated: steps x per-step, no measured generations"
        return text + f" -- fitted on {fit.n} measured generations (median in-sample error {fit.in_sample_median_abs_err_pct:.1f}%)"

    @classmethod
    def fit(cls, predict_step, rows: pd.DataFrame, *, threads: Any = None, recipe: str | None = None,
            parse=None, pdg_dense: int = 1) -> GenerationPricing:
        """Fit every guidance mode present in `rows` (summary rows: arch, steps, guidance, p50);
        `predict_step(arch, guidance) -> ms` is the calibrated per-step feature P_g, `parse(text) -> Arch`."""
        fits: dict[str, GenerationFit] = {}
        if rows is not None and len(rows):
            for guidance, group in rows.groupby("guidance", sort=True):
                per_step = [predict_step(parse(a), str(guidance)) for a in group["arch"]]
                fits[str(guidance)] = GenerationFit.fit(str(guidance), np.array(per_step), group["steps"].to_numpy(),
                                                         group["p50"].to_numpy())
        plain = [] if rows is None else rows[["arch", "steps", "guidance", "p50", "p10", "p90", "n"]].to_dict(orient="records")
        return cls(fits, threads, recipe, plain, int(pdg_dense))

    def to_dict(self) -> dict[str, Any]:
        return {"fits": {g: asdict(f) for g, f in self.fits.items()}, "threads": self.threads, "recipe": self.recipe,
                "rows": self.rows, "pdg_dense": self.pdg_dense}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> GenerationPricing:
        if not d:
            return cls()
        return cls({g: GenerationFit(**f) for g, f in d.get("fits", {}).items()}, d.get("threads"), d.get("recipe"),
                   list(d.get("rows", [])), int(d.get("pdg_dense", 1)))


def summarize_generations(samples: pd.DataFrame) -> pd.DataFrame:
    """Raw timed generations -> one row per (arch, steps, guidance): p50/p10/p90 and n."""
    if samples is None or samples.empty:
        return pd.DataFrame(columns=["key", "arch", "steps", "guidance", "threads", "p50", "p10", "p90", "n"])
    g = samples.groupby(["key", "arch", "steps", "guidance", "threads"], sort=True)["ms"]
    out = g.agg(p50="median", p10=lambda s: s.quantile(0.1), p90=lambda s: s.quantile(0.9), n="size").reset_index()
    return out


def check_generation_rows(rows: pd.DataFrame, where: str) -> None:
    bad = rows[~rows["guidance"].isin(GUIDANCE)] if len(rows) else rows
    if len(bad):
        raise DitnasError(f"{where}: unknown guidance {sorted(set(bad['guidance']))}; expected {', '.join(GUIDANCE)}")
    if len(rows) and not np.isfinite(rows["p50"].to_numpy(dtype=float)).all():
        raise DitnasError(f"{where}: a generation time is not finite; re-measure the session")
    if len(rows) and (rows["p50"].to_numpy(dtype=float) <= 0).any():
        raise DitnasError(f"{where}: a generation time is <= 0 ms; re-measure the session")

