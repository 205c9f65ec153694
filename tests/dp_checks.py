"""A check several pricing tests share: the DP's layout cost + the predictor's fixed cost equals the predictor's
price of that layout, for layouts as wide as the stream the problem was built for."""

from __future__ import annotations

import numpy as np
import pytest

from ditnas.search.dp import to_arch
from ditnas.search.problem import build_problem, calibration_offset, dp_results, min_reachable_ms
from ditnas.search.space import SearchChoices


def check_dp_prices_exactly(space, predictor, archs) -> int:
    """Solve at three budgets between the cheapest layout and the dearest of `archs`; assert every DP layout
    whose stream is 1.0 wide costs what `predictor.predict` says and fits its budget. Returns how many were checked."""
    choices = SearchChoices.from_space(space)
    scores = np.random.default_rng(0).uniform(0, 1, (space.depth, len(choices.all_choices), 2))
    low, top = min_reachable_ms(choices, predictor), max(predictor.predict(a) for a in archs)
    checked = 0
    for f in (0.3, 0.6, 1.0):
        budget = low + f * (top - low)
        problem = build_problem(choices, predictor, scores, budget, stream_width=1.0, buckets=4000)
        for result in dp_results(problem, 6):
            arch = to_arch(result, choices)
            if arch.stream_width != 1.0:
                continue  # priced with the stream at 1.0: exact only for layouts that are that wide
            assert result.cost_ms + calibration_offset(predictor) == pytest.approx(predictor.predict(arch), rel=1e-9)
            assert predictor.predict(arch) <= budget * (1 + 1e-6)
            checked += 1
    return checked
