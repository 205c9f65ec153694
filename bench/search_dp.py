"""Benchmark: is the budget-aware DP exact, and is it fast enough to sit inside a search loop?

    python bench/search_dp.py --out bench/results/search_dp.json [--instances 100] [--seed 0]

Prints a table and writes JSON with:
- dp_matches_bruteforce: share of random instances (N <= 12; fixed/free stages, skip choices,
  transition costs) where the DP's best score and whole best-score-by-budget table equal a brute-force
  enumeration of the same bucketed problem;
- dp_matches_real_optimum_integer: the same against the real-cost optimum on whole-ms instances with
  1 ms buckets (bucketing exact there);
- dp_real_gap_mean: mean (real optimum − DP score) on the float instances, i.e. what conservative
  rounding gives up;
- dp_seconds_n28: median of 5 solves, N = 28 slots, 4 choices, free stages, 2000 buckets;
- two_phase_seconds_n28, two_phase_score_gap_n28, k_best_seconds_small; machine info.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import numpy as np
from common import machine, report

from ditnas.search.dp import brute_force, k_best, random_problem, solve, solve_two_phase


def instances(rng: np.random.Generator, count: int, *, integer: bool = False):
    for t in range(count):
        free, skip, trans = bool(t & 1), bool(t & 2), bool(t & 4) or t % 3 == 0
        n_choices = int(rng.integers(1, 4)) + int(skip)
        per_slot = n_choices * (2 if free else 1)
        max_n = max(1, min(12, int(math.log(300_000) / math.log(max(per_slot, 2)))))
        yield random_problem(rng, int(rng.integers(1, max_n + 1)), n_choices, free_stages=free, skip=skip,
                             transitions=trans, integer=integer)


def timed(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)

    matches, gaps, within, sizes = 0, [], 0, []
    for problem in instances(rng, args.instances):
        dp, ref, real = solve(problem), brute_force(problem, bucketed=True), brute_force(problem)
        same = math.isclose(dp.score, ref.score, abs_tol=1e-12) and np.allclose(
            dp.best_score_by_budget, ref.best_score_by_budget, atol=1e-12)
        matches += same
        within += dp.cost_ms <= problem.budget_ms + 1e-9 * max(1.0, problem.budget_ms)
        gaps.append(real.score - dp.score)
        sizes.append(problem.n_slots)
    int_matches = 0
    for problem in instances(rng, args.instances, integer=True):
        int_matches += math.isclose(solve(problem).score, brute_force(problem).score, abs_tol=1e-12)

    n28 = random_problem(np.random.default_rng(args.seed + 1), 28, 4, free_stages=True, transitions=True, buckets=2000)
    dp_seconds = timed(lambda: solve(n28))
    two_seconds = timed(lambda: solve_two_phase(n28), repeats=3)
    two = solve_two_phase(n28)
    small = random_problem(np.random.default_rng(args.seed + 2), 6, 3, buckets=100)
    kb_seconds = timed(lambda: k_best(small, 10), repeats=3)

    result = {
        "dp_matches_bruteforce": matches / args.instances,
        "instances": args.instances,
        "max_slots": max(sizes),
        "dp_within_budget": within / args.instances,
        "dp_matches_real_optimum_integer": int_matches / args.instances,
        "dp_real_gap_mean": float(np.mean(gaps)),
        "dp_seconds_n28": dp_seconds,
        "n28": {"slots": 28, "choices": 4, "free_stages": True, "buckets": 2000, "runs": 5},
        "two_phase_seconds_n28": two_seconds,
        "two_phase_score_gap_n28": two.exact.score - two.result.score,
        "two_phase_fallback_n28": two.fallback,
        "k_best_seconds_small": kb_seconds,
        "k_best_small": {"slots": 6, "choices": 3, "buckets": 100, "k": 10},
        "machine": machine("numpy", "networkx"),
    }
    rows = [
        ("dp == brute force (bucketed)", f"{result['dp_matches_bruteforce']:.0%} of {args.instances}, N <= {max(sizes)}"),
        ("dp within real budget", f"{result['dp_within_budget']:.0%}"),
        ("dp == real optimum (whole ms)", f"{result['dp_matches_real_optimum_integer']:.0%}"),
        ("mean score lost to rounding", f"{result['dp_real_gap_mean']:.4g}"),
        ("dp seconds, N=28 O=4 B=2000", f"{dp_seconds:.4f}"),
        ("two-phase seconds, N=28", f"{two_seconds:.4f} (score gap {result['two_phase_score_gap_n28']:.3g})"),
        ("k_best(10) seconds, N=6", f"{kb_seconds:.4f}"),
    ]
    report(rows, result, args.out)


if __name__ == "__main__":
    main()
