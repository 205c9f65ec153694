"""The hand-made baselines the report sets beside the searched arch: the widest uniform layout that fits,
equal to brute force over every (width, ratio); the operator pair; a space without the op says so."""

from __future__ import annotations

import itertools

import pytest

from ditnas.arch import SearchSpace
from ditnas.search.baselines import baseline_layouts, interleave_pair, widest_fitting

SPACE = SearchSpace(depth=4, stage_pattern=(0, 1, 1, 0), widths=(0.5, 0.75, 1.0), mlp_ratios=(2, 3, 4), skippable=(1,))
COST = {"sa": 1.0, "lcha": 0.6, "ssa": 0.5, "assa": 0.8}


def latency(arch) -> float:
    """A made-up price, growing with width and ratio, different per op (a generation of arch.steps steps)."""
    return arch.steps * sum(COST[s.op] * s.width**2 * (1 + s.mlp_ratio / 4) for s in arch.slots if not s.is_skip)


@pytest.mark.parametrize("budget", [5.0, 20.0, 40.0, 60.0, 200.0])
def test_widest_fitting_equals_brute_force(budget):
    fit = widest_fitting(SPACE, latency, ("lcha", "ssa"), budget, steps=28)
    cands = []
    for w, r in itertools.product(SPACE.widths, SPACE.mlp_ratios):
        cost = 28 * sum(COST[("lcha", "ssa")[i % 2]] * w**2 * (1 + r / 4) for i in range(SPACE.depth))
        if cost <= budget:
            cands.append((w, r, cost))
    if not cands:
        assert not fit["fits"] and "cannot fit" in fit["note"] and fit["cheapest"]["width"] == 0.5
        return
    w, r, cost = max(cands)  # widest, then largest ratio
    assert fit["fits"] and fit["latency_ms"] == pytest.approx(cost)
    arch = fit["arch"]
    assert [s.op for s in arch.slots] == ["lcha", "ssa", "lcha", "ssa"] and arch.steps == 28
    assert {(s.width, s.mlp_ratio) for s in arch.slots} == {(w, r)}
    assert [s.stage for s in arch.slots] == list(SPACE.stage_pattern) and not any(s.is_skip for s in arch.slots)


def test_pair_and_a_space_without_sa():
    assert interleave_pair(SPACE) == ("lcha", "ssa")
    assert interleave_pair(SearchSpace(depth=2, ops=("sa", "ssa"))) == ("sa", "ssa")
    space = SearchSpace(depth=2, ops=("lcha", "ssa"))
    out = baseline_layouts(space, latency, 1e9, steps=4)
    assert out["all_sa"] == {"arch": None, "fits": False, "note": "the space has no sa op"}
    assert out["uniform_interleave_lcha_ssa"]["fits"]
