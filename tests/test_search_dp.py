import itertools
import math
import time

import numpy as np
import pytest

from ditnas.errors import DitnasError
from ditnas.search.dp import (
    DPProblem,
    brute_force,
    k_best,
    random_problem,
    solve,
    solve_two_phase,
)


def _instances(seed: int, count: int, *, integer: bool = False):
    """Random instances, N <= 12, covering fixed/free stages, skip choices and transition costs."""
    rng = np.random.default_rng(seed)
    for t in range(count):
        free, skip, trans = bool(t & 1), bool(t & 2), bool(t & 4) or t % 3 == 0
        # keep brute force small: (choices x stages) ** N layouts
        n_choices = int(rng.integers(1, 4)) + int(skip)
        per_slot = n_choices * (2 if free else 1)
        max_n = max(1, min(12, int(math.log(150_000) / math.log(max(per_slot, 2)))))
        n_slots = int(rng.integers(1, max_n + 1))
        yield random_problem(rng, n_slots, n_choices, free_stages=free, skip=skip, transitions=trans, integer=integer)


def _fits(problem: DPProblem, result) -> bool:
    return result.cost_ms <= problem.budget_ms + 1e-9 * max(1.0, problem.budget_ms)


def test_dp_equals_bucketed_brute_force_on_random_instances():
    n = 0
    for problem in _instances(0, 64):
        dp = solve(problem)
        ref = brute_force(problem, bucketed=True)
        real = brute_force(problem)
        assert dp.score == pytest.approx(ref.score, abs=1e-12)
        np.testing.assert_allclose(dp.best_score_by_budget, ref.best_score_by_budget, atol=1e-12)
        assert dp.buckets_used == ref.buckets_used  # same tie-break: the cheapest of the best
        assert _fits(problem, dp) and dp.buckets_used <= round((problem.budget_ms - problem.fixed_cost) / dp.bucket_ms)
        assert dp.score <= real.score + 1e-12  # rounding up can only exclude layouts
        n += 1
    assert n >= 50


def test_dp_equals_real_brute_force_when_bucketing_is_exact():
    # whole-ms costs and 1 ms buckets: the DP is then exactly optimal for the real budget
    for problem in _instances(1, 30, integer=True):
        dp, real = solve(problem), brute_force(problem)
        assert dp.score == pytest.approx(real.score, abs=1e-12)
        assert dp.cost_ms <= problem.budget_ms


def test_never_exceeds_the_real_budget():
    rng = np.random.default_rng(2)
    for _ in range(150):
        problem = random_problem(rng, int(rng.integers(1, 29)), int(rng.integers(1, 6)), skip=bool(rng.random() < 0.5),
                                 free_stages=bool(rng.random() < 0.5), buckets=int(rng.integers(3, 300)))
        try:
            result = solve(problem)
        except DitnasError as err:  # a coarse grid may round the cheapest layout over the budget
            assert "rounding" in str(err)
            continue
        assert result.cost_ms == pytest.approx(problem.layout_cost(result.choice, result.stage))
        assert _fits(problem, result)


def test_costs_just_above_bucket_edges_are_rounded_up():
    # 10 blocks of 0.0999 ms fit 1 ms for real, but with 19 buckets (0.0526 ms) each rounds up to 2 buckets
    cost = np.full((10, 1, 2), 0.0999)
    problem = DPProblem(cost, np.ones((10, 1, 2)), budget_ms=1.0, buckets=19, stages=((0,),) * 10)
    assert brute_force(problem).score == 10.0
    with pytest.raises(DitnasError, match="rounding"):
        solve(problem)
    skip = np.concatenate([cost, np.zeros((10, 1, 2))], axis=1)
    score = np.stack([np.ones((10, 2)), np.zeros((10, 2))], axis=1)
    result = solve(DPProblem(skip, score, budget_ms=1.0, buckets=19, stages=((0,),) * 10))
    assert result.score == 9.0 and result.buckets_used == 18  # conservative: one block fewer than the real optimum


def test_best_score_is_monotone_in_the_budget():
    rng = np.random.default_rng(3)
    for _ in range(10):
        problem = random_problem(rng, 10, 3, skip=True)
        table = solve(problem).best_score_by_budget
        finite = table[np.isfinite(table)]
        assert np.all(np.diff(finite) >= 0)
        # a sweep with one bucket width is monotone too, and equals the table of the largest budget
        unit = 0.05
        sweep_problem = DPProblem(problem.cost, problem.score, problem.budget_ms, problem.down_cost, problem.up_cost,
                                  problem.fixed_cost, bucket_ms=unit)
        big = solve(sweep_problem)
        lo = problem.min_cost_ms()
        scores = []
        for budget in np.linspace(lo + 0.5, problem.budget_ms, 8):
            small = DPProblem(problem.cost, problem.score, budget, problem.down_cost, problem.up_cost,
                              problem.fixed_cost, bucket_ms=unit)
            try:
                res = solve(small)
            except DitnasError:
                continue
            assert res.cost_ms <= budget + 1e-9
            scores.append(res.score)
            b = math.floor((budget - problem.fixed_cost) / unit + 1e-9)
            assert res.score == pytest.approx(big.best_score_by_budget[min(b, len(big.best_score_by_budget) - 1)])
        assert scores == sorted(scores)


def test_transition_costs_are_charged():
    # three slots, stage 1 is cheaper but each down/up costs 2 ms
    cost = np.array([[[3.0, 1.0]]] * 3)
    score = np.zeros((3, 1, 2))
    p = DPProblem(cost, score, budget_ms=100, down_cost=2.0, up_cost=2.0, fixed_cost=0.5)
    assert p.layout_cost((0, 0, 0), (0, 0, 0)) == 9.5
    assert p.layout_cost((0, 0, 0), (1, 1, 1)) == 0.5 + 2 + 3 + 2  # down at the start, up before the final layer
    assert p.layout_cost((0, 0, 0), (0, 1, 0)) == 0.5 + 3 + 2 + 1 + 2 + 3
    assert p.min_cost_ms() == 7.5
    # prefer stage 1 by score: the DP pays both transitions
    score[:, 0, 1] = 1.0
    result = solve(DPProblem(cost, score, budget_ms=7.5, down_cost=2.0, up_cost=2.0, fixed_cost=0.5, bucket_ms=0.5))
    assert result.stage == (1, 1, 1) and result.cost_ms == 7.5


def test_two_phase_is_feasible_and_never_beats_the_exact_dp():
    n_fallback = 0
    for problem in itertools.islice(_instances(4, 40), 40):
        two = solve_two_phase(problem)
        assert _fits(problem, two.result)
        assert two.result.score <= two.exact.score + 1e-12
        assert sum(two.counts) == problem.n_slots
        assert tuple(int(np.sum(np.array(two.result.choice) == o)) for o in range(problem.n_choices)) == two.counts
        n_fallback += two.fallback
    assert n_fallback < 20  # the knapsack's counts usually place


def test_two_phase_n28_runs_quickly():
    problem = random_problem(np.random.default_rng(5), 28, 4, buckets=500)
    start = time.perf_counter()
    two = solve_two_phase(problem)
    assert time.perf_counter() - start < 10
    assert _fits(problem, two.result) and two.result.score <= two.exact.score + 1e-12


def test_k_best_first_equals_solve_and_scores_descend():
    rng = np.random.default_rng(6)
    for t in range(12):
        problem = random_problem(rng, int(rng.integers(2, 6)), 2 + t % 2, free_stages=bool(t & 1), skip=bool(t & 2),
                                 buckets=60)
        best = solve(problem)
        paths = k_best(problem, 8)
        assert paths[0].score == pytest.approx(best.score, abs=1e-12)
        if len(paths) == 1 or paths[1].score < paths[0].score - 1e-12:  # a unique best layout
            assert paths[0].choice == best.choice and paths[0].stage == best.stage
        scores = [p.score for p in paths]
        assert all(a >= b - 1e-12 for a, b in itertools.pairwise(scores))
        assert len({(p.choice, p.stage) for p in paths}) == len(paths)
        assert all(_fits(problem, p) and p.buckets_used <= 60 for p in paths)


def test_k_best_enumerates_every_feasible_layout_when_k_is_large():
    rng = np.random.default_rng(7)
    problem = random_problem(rng, 4, 2, buckets=40)
    paths = k_best(problem, 10_000)
    ref = brute_force(problem, bucketed=True)
    table = ref.best_score_by_budget
    # count bucketed-feasible layouts by enumeration
    cells = [[(o, r) for o in range(2) for r in (0, 1) if np.isfinite(problem.cost[i, o, r])] for i in range(4)]
    from ditnas.search.dp import _bucketize

    bk = _bucketize(problem)
    feasible = 0
    for layout in itertools.product(*cells):
        b, prev = 0, 0
        for i, (o, r) in enumerate(layout):
            b += bk.cb[i, o, r] + bk.tb[prev, r]
            prev = r
        b += bk.ub if prev == 1 else 0
        feasible += b <= bk.nb
    assert len(paths) == feasible
    assert paths[0].score == pytest.approx(table[-1])


def test_budget_below_the_minimum_names_it():
    cost = np.array([[[2.0, 1.0], [4.0, np.inf]]] * 3)
    problem = DPProblem(cost, np.zeros((3, 2, 2)), budget_ms=5.0, down_cost=0.25, up_cost=0.25, fixed_cost=1.0)
    assert problem.min_cost_ms() == 4.5  # 1 fixed + 0.25 down + 3 x 1 + 0.25 up
    tight = DPProblem(cost, np.zeros((3, 2, 2)), budget_ms=4.0, down_cost=0.25, up_cost=0.25, fixed_cost=1.0)
    for fn in (solve, solve_two_phase, brute_force, lambda p: k_best(p, 2)):
        with pytest.raises(DitnasError, match=r"cheapest reachable layout, 4\.5 ms"):
            fn(tight)
    assert solve(problem).cost_ms <= 5.0


def test_bad_problems_raise_clear_errors():
    with pytest.raises(DitnasError, match="score"):
        DPProblem(np.ones((3, 2, 2)), np.ones((3, 3, 2)), budget_ms=10)
    with pytest.raises(DitnasError, match=">= 0"):
        DPProblem(-np.ones((3, 2)), np.ones((3, 2)), budget_ms=10)
    with pytest.raises(DitnasError, match="stages"):
        DPProblem(np.ones((3, 2)), np.ones((3, 2)), budget_ms=10, stages=((0,), (2,), (0,)))
    blocked = np.ones((3, 2, 2))
    blocked[1] = np.inf
    with pytest.raises(DitnasError, match=r"slots \[1\]"):
        solve(DPProblem(blocked, np.ones((3, 2, 2)), budget_ms=10))


def test_dp_n28_four_choices_2000_buckets_under_a_second():
    problem = random_problem(np.random.default_rng(8), 28, 4, buckets=2000)
    start = time.perf_counter()
    result = solve(problem)
    assert time.perf_counter() - start < 1.0
    assert _fits(problem, result) and len(result.best_score_by_budget) == 2001
