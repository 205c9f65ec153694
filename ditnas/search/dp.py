"""Exact budget-aware dynamic program over slot choices with a resolution state.

This is the reconstruction of S2DiT's "budget-aware DP" in method.md §1.4 (the paper publishes no
formula). A layout assigns every slot ℓ a choice o_ℓ and a stage r_ℓ ∈ {0 (full), 1 (half)}:

    score(layout) = Σ_ℓ s[ℓ, o_ℓ, r_ℓ]                                   (higher is better)
    cost(layout)  = fixed + Σ_ℓ c[ℓ, o_ℓ, r_ℓ] + down·#(0→1) + up·#(1→0)  (ms)

The model starts at stage 0 (so a first slot at stage 1 pays a down-sampling) and ends at stage 0
(a last slot at stage 1 pays an up-sampling before the final layer). `c = inf` forbids a cell.

The slot budget `budget − fixed` is split into `buckets` equal buckets and every cost is rounded
**up** to whole buckets, so any layout the DP accepts fits the real float budget (checked on every
result). The DP is exact for the bucketed problem:

    D[ℓ][b][r] = max_{o, r'} D[ℓ−1][b − ⌈c(ℓ,o,r)⌉ − ⌈t(r'→r)⌉][r'] + s(ℓ,o,r),   D[0][0][0] = 0

vectorised with numpy over the budget axis b: O(N·B·|O|·|R|²) time, O(N·B·|R|) backtracking memory.

Also here: `solve_two_phase` (counts by knapsack, then placement, as a third-party summary of S2DiT
describes), `k_best` (Yen's k shortest simple paths on the state-expanded DAG with networkx, for
small problems), `brute_force` (reference) and `to_arch`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from ditnas.arch import Arch
from ditnas.config import SearchConfig
from ditnas.errors import DitnasError
from ditnas.search.space import SearchChoices

NEG = -np.inf
_TOL = 1e-9  # relative slack for float sums when checking the real budget


# ----- inputs and outputs ----------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class DPProblem:
    """Per-slot latency and score tables plus the budget.

    `cost` and `score` have shape (slots, choices, 2) — the last axis is the stage — or (slots, choices)
    when they do not depend on the stage. `stages[ℓ]` lists the stages slot ℓ may take (None = any);
    cells outside it count as inf cost. `bucket_ms`, when set, fixes the bucket width instead of
    deriving it from `buckets` (use one width for a budget sweep so the fronts are comparable).
    """

    cost: np.ndarray
    score: np.ndarray
    budget_ms: float
    down_cost: float = 0.0
    up_cost: float = 0.0
    fixed_cost: float = 0.0
    buckets: int = SearchConfig.dp_buckets  # the one default (config.py)
    stages: tuple[tuple[int, ...], ...] | None = None
    bucket_ms: float | None = None
    labels: tuple[str, ...] | None = None  # names of the choices, for printing

    def __post_init__(self) -> None:
        cost = np.asarray(self.cost, dtype=float)
        score = np.asarray(self.score, dtype=float)
        if cost.ndim == 2:
            cost = np.repeat(cost[:, :, None], 2, axis=2)
        if score.ndim == 2:
            score = np.repeat(score[:, :, None], 2, axis=2)
        if cost.ndim != 3 or cost.shape[2] != 2 or cost.shape[0] < 1 or cost.shape[1] < 1:
            raise DitnasError(f"DPProblem.cost: shape {cost.shape}; need (slots, choices, 2) or (slots, choices)")
        if score.shape != cost.shape:
            raise DitnasError(f"DPProblem.score: shape {score.shape} differs from cost {cost.shape}")
        if np.isnan(cost).any() or (cost < 0).any():
            raise DitnasError("DPProblem.cost: latencies must be >= 0 ms (inf = not allowed), got NaN or negative")
        if self.stages is not None:
            stages = tuple(tuple(int(s) for s in st) for st in self.stages)
            if len(stages) != cost.shape[0] or any(not st or set(st) - {0, 1} for st in stages):
                raise DitnasError(f"DPProblem.stages: need {cost.shape[0]} non-empty subsets of (0, 1), got {self.stages}")
            object.__setattr__(self, "stages", stages)
            cost = cost.copy()
            for i, st in enumerate(stages):
                for r in (0, 1):
                    if r not in st:
                        cost[i, :, r] = np.inf
        if not np.isfinite(score[np.isfinite(cost)]).all():
            raise DitnasError("DPProblem.score: every allowed (finite-cost) cell needs a finite score")
        for name in ("budget_ms", "down_cost", "up_cost", "fixed_cost"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or (name != "budget_ms" and value < 0):
                raise DitnasError(f"DPProblem.{name}: {value} must be a finite number of ms (>= 0 for costs)")
            object.__setattr__(self, name, value)
        if int(self.buckets) < 1:
            raise DitnasError(f"DPProblem.buckets: {self.buckets} must be >= 1")
        if self.bucket_ms is not None and not (math.isfinite(self.bucket_ms) and self.bucket_ms > 0):
            raise DitnasError(f"DPProblem.bucket_ms: {self.bucket_ms} must be a positive number of ms")
        if self.labels is not None and len(self.labels) != cost.shape[1]:
            raise DitnasError(f"DPProblem.labels: {len(self.labels)} names for {cost.shape[1]} choices")
        object.__setattr__(self, "cost", cost)
        object.__setattr__(self, "score", score)

    @property
    def n_slots(self) -> int:
        return self.cost.shape[0]

    @property
    def n_choices(self) -> int:
        return self.cost.shape[1]

    def layout_cost(self, choice: tuple[int, ...], stage: tuple[int, ...]) -> float:
        """Real (float) latency of a layout, ms."""
        total, prev = self.fixed_cost, 0
        for i, (o, r) in enumerate(zip(choice, stage)):
            total += self.cost[i, o, r] + _trans(prev, r, self.down_cost, self.up_cost)
            prev = r
        return float(total + (self.up_cost if prev == 1 else 0.0))

    def layout_score(self, choice: tuple[int, ...], stage: tuple[int, ...]) -> float:
        total = 0.0
        for i, (o, r) in enumerate(zip(choice, stage)):
            total += self.score[i, o, r]
        return float(total)

    def min_cost_ms(self) -> float:
        """Cheapest reachable real latency (min-plus DP over stages), ms; inf if no layout exists."""
        best = np.array([0.0, np.inf])
        for i in range(self.n_slots):
            cell = self.cost[i].min(axis=0)  # cheapest choice per stage
            new = np.full(2, np.inf)
            for r in (0, 1):
                for rp in (0, 1):
                    new[r] = min(new[r], best[rp] + cell[r] + _trans(rp, r, self.down_cost, self.up_cost))
            best = new
        return self.fixed_cost + min(best[0], best[1] + self.up_cost)


@dataclass(frozen=True, eq=False)
class DPResult:
    """One layout: per-slot choice index and stage, its real cost and score.

    `best_score_by_budget[b]` (from `solve`/`brute_force(bucketed=True)`) is the best score of any
    layout whose bucketed cost is <= b buckets, i.e. whose budget is `budget_axis_ms()[b]`.
    """

    choice: tuple[int, ...]
    stage: tuple[int, ...]
    cost_ms: float
    score: float
    bucket_ms: float
    buckets_used: int  # bucketed slot cost (the real cost is <= fixed + buckets_used * bucket_ms)
    fixed_cost_ms: float = 0.0
    best_score_by_budget: np.ndarray | None = field(default=None, repr=False)
    method: str = "dp"

    def budget_axis_ms(self) -> np.ndarray:
        n = 0 if self.best_score_by_budget is None else len(self.best_score_by_budget)
        return self.fixed_cost_ms + self.bucket_ms * np.arange(n)

    def layout(self, labels: tuple[str, ...] | None = None) -> str:
        names = labels or tuple(str(o) for o in range(max(self.choice, default=0) + 1))
        return " ".join(f"{names[o]}@{r}" for o, r in zip(self.choice, self.stage))


@dataclass(frozen=True, eq=False)
class TwoPhaseResult:
    """Phase 1 picks how many slots take each choice; phase 2 places them (exact under those counts)."""

    counts: tuple[int, ...]  # per choice index
    phase1_score: float  # the knapsack's placement-free estimate
    phase1_cost_ms: float  # its estimated latency (mean per-choice costs, no transitions)
    result: DPResult  # the placed layout (feasible)
    exact: DPResult  # the one-phase DP on the same problem, for comparison
    tries: int  # phase-1 budgets tried until a placement fitted
    fallback: bool  # True when no phase-1 count vector could be placed and the cheapest layout's counts were used


# ----- discretisation --------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class _Bucketed:
    unit: float  # ms per bucket
    nb: int  # slot budget in buckets
    cb: np.ndarray  # (N, O, 2) int64; nb + 1 for inf / too big
    tb: np.ndarray  # (2, 2) transition buckets [from, to]
    ub: int  # final up-sampling buckets


def _trans(prev: int, r: int, down: float, up: float) -> float:
    return 0.0 if prev == r else (down if r == 1 else up)


def _ceil_buckets(x: np.ndarray, unit: float, cap: int) -> np.ndarray:
    """Round up to whole buckets, guarding against float error so q * unit >= x always."""
    x = np.asarray(x, dtype=float)
    with np.errstate(invalid="ignore", over="ignore"):
        q = np.ceil(np.where(np.isfinite(x), x, 0.0) / unit)
        q = np.where(q * unit < x, q + 1, q)
    q = np.where(np.isfinite(x), np.minimum(q, cap + 1), cap + 1)
    return q.astype(np.int64)


def _bucketize(p: DPProblem) -> _Bucketed:
    slot_budget = p.budget_ms - p.fixed_cost
    if p.bucket_ms is not None:
        unit = float(p.bucket_ms)
        nb = math.floor(slot_budget / unit) if slot_budget >= 0 else -1
        if nb >= 0 and nb * unit > slot_budget:  # float guard
            nb -= 1
    elif slot_budget > 0:
        unit, nb = slot_budget / int(p.buckets), int(p.buckets)
    else:
        # assumption: a zero slot budget still admits zero-cost layouts; any positive cost is 1+ bucket
        unit, nb = 1.0, 0 if slot_budget == 0 else -1
    cap = max(nb, 0)
    cb = _ceil_buckets(p.cost, unit, cap)
    down, up = (int(v) for v in _ceil_buckets(np.array([p.down_cost, p.up_cost]), unit, cap))
    tb = np.array([[0, down], [up, 0]], dtype=np.int64)
    return _Bucketed(unit, nb, cb, tb, up)


def _ms(x: float) -> str:
    """Short text for ms that never rounds a minimum down (the user copies it as a budget)."""
    text = f"{x:.6g}"
    return text if float(text) >= x else repr(float(x))


def _check_reachable(p: DPProblem) -> None:
    minimum = p.min_cost_ms()
    if not math.isfinite(minimum):
        bad = [i for i in range(p.n_slots) if not np.isfinite(p.cost[i]).any()]
        raise DitnasError(f"DPProblem.cost: slots {bad} have no allowed (finite-cost) choice at any stage; fill the table")
    if p.budget_ms < minimum:
        raise DitnasError(
            f"budget_ms: {p.budget_ms!r} ms is below the cheapest reachable layout, {_ms(minimum)} ms "
            f"(fixed {p.fixed_cost:.6g} ms included); raise the budget to at least {_ms(minimum)} ms"
        )


def _rounding_error(p: DPProblem, bk: _Bucketed) -> DitnasError:
    return DitnasError(
        f"budget_ms: {p.budget_ms:.6g} ms is within bucket rounding ({bk.unit:.3g} ms/bucket) of the cheapest "
        f"reachable layout, {_ms(p.min_cost_ms())} ms; raise the budget or the number of buckets"
    )


def _check_budget(p: DPProblem, res: DPResult) -> None:
    # the conservative rounding guarantees this; a failure is a bug, not a user error
    if res.cost_ms > p.budget_ms + _TOL * max(1.0, abs(p.budget_ms)):
        raise AssertionError(f"layout costs {res.cost_ms} ms > budget {p.budget_ms} ms (bucketing bug)")


def _relax(dst: np.ndarray, src: np.ndarray, w: int, add: float, bt: list[tuple[np.ndarray, int]]) -> None:
    """dst[w:] = max(dst[w:], src[:len-w] + add); where it improves, write each (array, value) in bt."""
    n = dst.shape[0] - w
    cand = src[:n] + add
    tgt = dst[w:]
    better = cand > tgt  # strict: the first choice found wins ties (deterministic)
    if better.any():
        np.copyto(tgt, cand, where=better)
        for arr, value in bt:
            arr[w:][better] = value


def _result(p: DPProblem, bk: _Bucketed, choice, stage, used: int, table, method: str) -> DPResult:
    choice, stage = tuple(int(o) for o in choice), tuple(int(r) for r in stage)
    res = DPResult(
        choice, stage, p.layout_cost(choice, stage), p.layout_score(choice, stage), bk.unit, int(used),
        p.fixed_cost, table, method,
    )
    _check_budget(p, res)
    return res


# ----- the exact DP ----------------------------------------------------------------------------
def solve(problem: DPProblem) -> DPResult:
    """The best-scoring layout whose bucketed cost fits the budget, plus the best score per budget."""
    p = problem
    _check_reachable(p)
    bk = _bucketize(p)
    if bk.nb < 0:
        raise _rounding_error(p, bk)
    N, O, nb = p.n_slots, p.n_choices, bk.nb
    D = np.full((2, nb + 1), NEG)
    D[0, 0] = 0.0
    choice_bt = np.full((N, 2, nb + 1), -1, dtype=np.int16)
    prev_bt = np.zeros((N, 2, nb + 1), dtype=np.int8)
    for i in range(N):
        new = np.full((2, nb + 1), NEG)
        live = [rp for rp in (0, 1) if np.isfinite(D[rp]).any()]
        for r in (0, 1):
            for rp in live:
                for o in range(O):
                    w = int(bk.cb[i, o, r] + bk.tb[rp, r])
                    if w > nb:
                        continue
                    _relax(new[r], D[rp], w, p.score[i, o, r], [(choice_bt[i, r], o), (prev_bt[i, r], rp)])
        D = new
    # the final up-sampling when the last slot is at half resolution
    final = D[0].copy()
    end_stage = np.zeros(nb + 1, dtype=np.int8)
    if bk.ub <= nb:
        _relax(final, D[1], bk.ub, 0.0, [(end_stage, 1)])
    if not np.isfinite(final).any():
        raise _rounding_error(p, bk)
    table = np.maximum.accumulate(final)
    b = int(np.argmax(final))  # first index of the max = the cheapest of the best layouts
    used = b
    r = int(end_stage[b])
    if r == 1:
        b -= bk.ub
    choice, stage = [0] * N, [0] * N
    for i in range(N - 1, -1, -1):
        o, rp = int(choice_bt[i, r, b]), int(prev_bt[i, r, b])
        choice[i], stage[i] = o, r
        b -= int(bk.cb[i, o, r] + bk.tb[rp, r])
        r = rp
    if b != 0 or r != 0:
        raise AssertionError("DP backtracking did not return to the start state")
    return _result(p, bk, choice, stage, used, table, "dp")


# ----- brute force (reference) -----------------------------------------------------------------
def brute_force(problem: DPProblem, *, bucketed: bool = False, max_layouts: int = 4_000_000) -> DPResult:
    """Enumerate every layout (vectorised). `bucketed=True` uses the DP's rounded costs (then it must
    match `solve` exactly, table included); False uses the real float budget (the true optimum, which
    can beat the DP by what bucket rounding excludes)."""
    p = problem
    _check_reachable(p)
    bk = _bucketize(p)
    options = [[(o, r) for o in range(p.n_choices) for r in (0, 1) if np.isfinite(p.cost[i, o, r])] for i in range(p.n_slots)]
    total = math.prod(len(opt) for opt in options)
    if total > max_layouts:
        raise DitnasError(f"brute_force: {total} layouts exceed max_layouts={max_layouts}; use solve() or a smaller problem")
    if bucketed:
        cost = np.zeros(1, dtype=np.int64)
        trans = bk.tb
    else:
        cost = np.zeros(1)
        trans = np.array([[0.0, p.down_cost], [p.up_cost, 0.0]])
    score = np.zeros(1)
    last = np.zeros(1, dtype=np.int64)
    for i, opt in enumerate(options):
        o_arr = np.array([o for o, _ in opt])
        r_arr = np.array([r for _, r in opt])
        cell = bk.cb[i, o_arr, r_arr] if bucketed else p.cost[i, o_arr, r_arr]
        cost = (cost[:, None] + cell[None, :] + trans[last[:, None], r_arr[None, :]]).ravel()
        score = (score[:, None] + p.score[i, o_arr, r_arr][None, :]).ravel()
        last = np.broadcast_to(r_arr[None, :], (len(last), len(r_arr))).ravel()
    cost = cost + np.where(last == 1, trans[1, 0], 0)
    if bucketed:
        ok = cost <= bk.nb
    else:
        ok = p.fixed_cost + cost <= p.budget_ms
    if not ok.any():
        raise _rounding_error(p, bk)
    masked = np.where(ok, score, NEG)
    best = masked.max()
    ties = np.flatnonzero(masked == best)
    flat = int(ties[np.argmin(cost[ties])])  # cheapest of the best, as solve() does
    idx = np.unravel_index(flat, tuple(len(opt) for opt in options))
    layout = [options[i][k] for i, k in enumerate(idx)]
    table = None
    if bucketed:
        table = np.full(bk.nb + 1, NEG)
        np.maximum.at(table, cost[ok], score[ok])
        table = np.maximum.accumulate(table)
    used = int(cost[flat]) if bucketed else int(_ceil_buckets(np.array([cost[flat]]), bk.unit, 10**12)[0])
    return _result(p, bk, [o for o, _ in layout], [r for _, r in layout], used, table, "brute_force")


# ----- two phases: counts, then placement ------------------------------------------------------
def _phase1(p: DPProblem, bk: _Bucketed, nb: int) -> tuple[tuple[int, ...], float, float] | None:
    """Bounded knapsack with exactly N items: how many slots take each choice, placement ignored.

    assumption: a choice's placement-free cost and score are its means over the (slot, stage) cells
    where it is allowed; transitions are ignored (they depend on placement).
    """
    N, O = p.n_slots, p.n_choices
    allowed = np.isfinite(p.cost)
    caps = allowed.any(axis=2).sum(axis=0)  # slots that may host each choice
    mean_c = np.array([p.cost[:, o][allowed[:, o]].mean() if caps[o] else np.inf for o in range(O)])
    mean_s = np.array([p.score[:, o][allowed[:, o]].mean() if caps[o] else 0.0 for o in range(O)])
    w = _ceil_buckets(mean_c, bk.unit, max(nb, 0))
    K = np.full((N + 1, nb + 1), NEG)  # K[n][b]: best estimate with n slots filled at exactly b buckets
    K[0, 0] = 0.0
    count_bt = np.zeros((O, N + 1, nb + 1), dtype=np.int16)
    for o in range(O):
        if caps[o] == 0 or w[o] > nb:
            continue
        new = K.copy()
        for k in range(1, int(caps[o]) + 1):
            shift = int(k * w[o])
            if shift > nb:
                break
            for n in range(N - k, -1, -1):
                if np.isfinite(K[n]).any():
                    _relax(new[n + k], K[n], shift, k * mean_s[o], [(count_bt[o, n + k], k)])
        K = new
    if not np.isfinite(K[N]).any():
        return None
    b = int(np.argmax(K[N]))
    score = float(K[N, b])
    counts, n = [0] * O, N
    for o in range(O - 1, -1, -1):
        k = int(count_bt[o, n, b])
        counts[o] = k
        n, b = n - k, b - int(k * w[o])
    est_cost = p.fixed_cost + float(sum(k * mean_c[o] for o, k in enumerate(counts) if k))
    return tuple(counts), score, est_cost


def _phase2(p: DPProblem, bk: _Bucketed, counts: tuple[int, ...], max_states: int) -> DPResult | None:
    """Exact DP over placements with the counts fixed: state (slot, counts used so far, stage, bucket)."""
    N, nb = p.n_slots, bk.nb
    active = [o for o, k in enumerate(counts) if k]
    radix, step = [], 1
    for o in active:
        radix.append(step)
        step *= counts[o] + 1
    if step > max_states:
        raise DitnasError(
            f"solve_two_phase: counts {counts} give {step} placement states > max_states={max_states}; "
            "use solve() or fewer choices"
        )
    full = sum(counts[o] * radix[a] for a, o in enumerate(active))
    layer: dict[tuple[int, int], np.ndarray] = {(0, 0): np.full(nb + 1, NEG)}
    layer[(0, 0)][0] = 0.0
    bts: list[dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]] = []
    for i in range(N):
        new: dict[tuple[int, int], np.ndarray] = {}
        bt: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        for (u, rp), arr in layer.items():
            for a, o in enumerate(active):
                if (u // radix[a]) % (counts[o] + 1) == counts[o]:
                    continue  # this choice's count is used up
                for r in (0, 1):
                    w = int(bk.cb[i, o, r] + bk.tb[rp, r])
                    if w > nb:
                        continue
                    key = (u + radix[a], r)
                    if key not in new:
                        new[key] = np.full(nb + 1, NEG)
                        bt[key] = (np.full(nb + 1, -1, dtype=np.int16), np.zeros(nb + 1, dtype=np.int8))
                    _relax(new[key], arr, w, p.score[i, o, r], [(bt[key][0], a), (bt[key][1], rp)])
        layer = {k: v for k, v in new.items() if np.isfinite(v).any()}
        bts.append(bt)
        if not layer:
            return None
    final = layer.get((full, 0), np.full(nb + 1, NEG)).copy()
    end_stage = np.zeros(nb + 1, dtype=np.int8)
    if (full, 1) in layer and bk.ub <= nb:
        _relax(final, layer[(full, 1)], bk.ub, 0.0, [(end_stage, 1)])
    if not np.isfinite(final).any():
        return None
    b = int(np.argmax(final))
    used, r, u = b, int(end_stage[b]), full
    if r == 1:
        b -= bk.ub
    choice, stage = [0] * N, [0] * N
    for i in range(N - 1, -1, -1):
        a_arr, p_arr = bts[i][(u, r)]
        a, rp = int(a_arr[b]), int(p_arr[b])
        o = active[a]
        choice[i], stage[i] = o, r
        b -= int(bk.cb[i, o, r] + bk.tb[rp, r])
        u -= radix[a]
        r = rp
    return _result(p, bk, choice, stage, used, None, "two_phase")


def solve_two_phase(problem: DPProblem, *, max_states: int = 50_000, max_tries: int = 20) -> TwoPhaseResult:
    """S2DiT-style two phases: the budget first fixes the block counts, then the layout.

    Phase 1 is a knapsack over counts (placement-free mean costs); phase 2 the exact placement under
    those counts. If the counts cannot be placed within the budget (the estimate ignored transitions
    and slot differences), phase 1 reruns with a 5% tighter budget, up to `max_tries` times.
    assumption: after that, the counts of the cheapest layout are placed (always feasible), flagged
    `fallback=True`. The result is feasible and never beats `exact` (it is one layout of the same problem).
    """
    p = problem
    exact = solve(p)
    bk = _bucketize(p)
    tried: set[tuple[int, ...]] = set()
    for t in range(max_tries):
        phase1 = _phase1(p, bk, int(bk.nb * (1.0 - 0.05 * t)))
        if phase1 is None:
            break
        counts, est_score, est_cost = phase1
        if counts in tried:
            continue
        tried.add(counts)
        placed = _phase2(p, bk, counts, max_states)
        if placed is not None:
            return TwoPhaseResult(counts, est_score, est_cost, placed, exact, t + 1, False)
    cheapest = _cheapest(p, bk)
    counts = tuple(int(np.sum(np.array(cheapest.choice) == o)) for o in range(p.n_choices))
    placed = _phase2(p, bk, counts, max_states)
    if placed is None:  # the cheapest layout itself is a placement of its counts
        raise AssertionError("two-phase fallback found no placement of the cheapest layout's counts")
    return TwoPhaseResult(counts, float("nan"), float("nan"), placed, exact, len(tried) + 1, True)


def _min_buckets(p: DPProblem, bk: _Bucketed) -> int:
    """Fewest buckets of any layout (min-plus DP on the rounded costs)."""
    best = np.array([0, np.iinfo(np.int64).max // 4], dtype=np.int64)
    for i in range(p.n_slots):
        cell = bk.cb[i].min(axis=0)
        best = np.array([min(best[rp] + cell[r] + bk.tb[rp, r] for rp in (0, 1)) for r in (0, 1)])
    return int(min(best[0], best[1] + bk.ub))


def _cheapest(p: DPProblem, bk: _Bucketed) -> DPResult:
    """The layout with the fewest buckets (score 0 for all cells, so the DP returns the cheapest)."""
    zero = DPProblem(p.cost, np.zeros_like(p.score), p.budget_ms, p.down_cost, p.up_cost, p.fixed_cost,
                     p.buckets, None, p.bucket_ms)
    return solve(zero)


# ----- k best via networkx ---------------------------------------------------------------------
def k_best(problem: DPProblem, k: int, *, max_nodes: int = 200_000) -> list[DPResult]:
    """The k best distinct layouts (by score; bucketed budget), best first.

    Builds the state-expanded DAG (toolchain.md §6): node (slot, bucket, stage) after the slots before
    `slot` are decided, a choice node per (state, choice, stage) so parallel choices stay distinct
    paths, and a sink fed by every end state within the budget. Edge weights are `M − score` with M
    the largest score, so all weights are >= 0 (every path has exactly N choice edges, so the order
    is unchanged) and `nx.shortest_simple_paths` (Yen's algorithm, Dijkstra inside) applies.
    Cost: the graph has O(N·B·|O|·|R|²) edges; Yen's runs up to N Dijkstra searches per returned path,
    so roughly O(k·N·E·log V) — fine for N·B up to ~1e4, use `solve` for anything larger.
    """
    import networkx as nx  # only this mode needs it

    p = problem
    if k < 1:
        raise DitnasError(f"k_best: k={k} must be >= 1")
    _check_reachable(p)
    bk = _bucketize(p)
    if bk.nb < 0:
        raise _rounding_error(p, bk)
    finite = np.isfinite(p.cost)
    top = float(p.score[finite].max()) if finite.any() else 0.0
    G = nx.DiGraph()
    frontier = {(0, 0)}
    for i in range(p.n_slots):
        nxt = set()
        for b, rp in frontier:
            for o in range(p.n_choices):
                for r in (0, 1):
                    nb2 = b + int(bk.cb[i, o, r] + bk.tb[rp, r])
                    if not finite[i, o, r] or nb2 > bk.nb:
                        continue
                    mid = ("c", i, b, rp, o, r)
                    G.add_edge((i, b, rp), mid, weight=top - float(p.score[i, o, r]), choice=o, stage=r)
                    G.add_edge(mid, (i + 1, nb2, r), weight=0.0)
                    nxt.add((nb2, r))
        frontier = nxt
        if G.number_of_nodes() > max_nodes:
            raise DitnasError(f"k_best: the expanded graph exceeds max_nodes={max_nodes}; use fewer buckets or solve()")
    for b, r in frontier:
        if r == 0 or b + bk.ub <= bk.nb:
            G.add_edge((p.n_slots, b, r), "sink", weight=0.0)
    if "sink" not in G:
        raise _rounding_error(p, bk)
    # drop dead ends (states that cannot finish within the budget) before Yen's
    G = G.subgraph(nx.ancestors(G, "sink") | {"sink"}).copy()
    out = []
    for path in itertools.islice(nx.shortest_simple_paths(G, (0, 0, 0), "sink", weight="weight"), k):
        mids = [n for n in path if n[0] == "c"]
        choice, stage = [m[4] for m in mids], [m[5] for m in mids]
        last = path[-2]
        used = last[1] + (bk.ub if last[2] == 1 else 0)
        out.append(_result(p, bk, choice, stage, used, None, "k_best"))
    return out


# ----- random instances (tests and benchmarks) -------------------------------------------------
def random_problem(
    rng: np.random.Generator,
    n_slots: int,
    n_choices: int,
    *,
    free_stages: bool = True,
    skip: bool = False,
    transitions: bool = True,
    integer: bool = False,
    buckets: int | None = None,
) -> DPProblem:
    """A random instance: half-resolution cells ~3x cheaper, ~10% forbidden cells, optionally a last
    `skip` choice (zero cost, poor score, allowed in some slots) and a budget between the cheapest and
    the dearest layout. `integer=True` makes every cost whole ms and one bucket = 1 ms, so bucketing is
    exact and the DP must equal the real-cost brute force."""
    N, O = n_slots, n_choices
    if integer:
        cost = rng.integers(1, 7, size=(N, O, 2)).astype(float)
        cost[:, :, 1] = np.ceil(cost[:, :, 1] / 3)
    else:
        cost = rng.uniform(0.5, 5.0, size=(N, O, 2))
        cost[:, :, 1] *= rng.uniform(0.2, 0.5)
    # dearer cells tend to score better, so the budget binds
    score = -rng.uniform(0.0, 1.0, size=(N, O, 2)) + 0.2 * cost
    cost[rng.random((N, O, 2)) < 0.1] = np.inf
    if skip:
        cost[:, -1, :] = 0.0
        score[:, -1, :] = -rng.uniform(0.5, 2.0, size=(N, 1))
        cost[rng.random(N) < 0.5, -1, :] = np.inf  # not every slot is skippable
    for i in range(N):  # every slot keeps at least one allowed cell
        if not np.isfinite(cost[i]).any():
            cost[i, 0, 0] = 2.0
    stages = None
    if not free_stages:
        pattern, stage = [], 0
        for _ in range(N):
            stage = 1 - stage if rng.random() < 0.3 else stage
            pattern.append(stage)
        stages = tuple((s,) for s in pattern)
        for i, s in enumerate(pattern):  # keep an allowed cell at the fixed stage
            if not np.isfinite(cost[i, :, s]).any():
                cost[i, 0, s] = 2.0
    if transitions:
        down, up = (float(v) for v in (rng.integers(0, 3, 2) if integer else rng.uniform(0.1, 1.0, 2)))
    else:
        down = up = 0.0
    fixed = float(rng.integers(0, 3)) if integer else float(rng.uniform(0.0, 2.0))
    probe = DPProblem(cost, score, 1e12, down, up, fixed, stages=stages)
    low = probe.min_cost_ms()
    span = float(np.nanmax(np.where(np.isfinite(probe.cost), probe.cost, np.nan), axis=(1, 2)).sum()) + N * (down + up)
    budget = low + rng.uniform(0.05, 0.6) * (span + fixed - low)
    n_buckets = buckets or int(rng.integers(50, 400))
    for _ in range(20):  # a coarse grid may never fit (each positive cost is >= 1 bucket): give up then
        if integer:
            problem = DPProblem(cost, score, float(math.ceil(budget)), down, up, fixed, stages=stages, bucket_ms=1.0)
        else:
            problem = DPProblem(cost, score, budget, down, up, fixed, stages=stages, buckets=n_buckets)
        bk = _bucketize(problem)
        if _min_buckets(problem, bk) <= bk.nb:
            return problem
        # rounding up excluded every layout: loosen by what rounding can add (<= 1 bucket per cost)
        budget += 0.05 * (span + fixed - low) + (2 * N + 2) * bk.unit
    return problem


# ----- back to an Arch -------------------------------------------------------------------------
def to_arch(result: DPResult, choices: SearchChoices, base_arch_globals: Arch | None = None) -> Arch:
    """The layout as an Arch: choice indices refer to `choices.all_choices`; the header (patch,
    latent, classes, steps) comes from `base_arch_globals` or the space. Validated by the space."""
    if len(result.choice) != choices.depth:
        raise DitnasError(f"to_arch: the layout has {len(result.choice)} slots but the space has {choices.depth}")
    if max(result.choice) >= len(choices.all_choices):
        raise DitnasError(
            f"to_arch: choice index {max(result.choice)} outside the space's {len(choices.all_choices)} choices; "
            "build the DP tables on SearchChoices.all_choices"
        )
    slots = [choices.all_choices[o].slot(r) for o, r in zip(result.choice, result.stage)]
    base = base_arch_globals or choices.space.max_arch()
    return choices.space.validate(base.with_slots(slots), source="dp layout")
