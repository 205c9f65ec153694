"""Search objectives, sensitivity cache and DP problem construction on a tiny trained supernet and a tiny
host-torch latency table."""

import copy
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ditnas.arch import SearchSpace
from ditnas.config import load_config
from ditnas.data import load_dataset
from ditnas.errors import DitnasError
from ditnas.latency_models.predictor import Calibration
from ditnas.config import LatencyConfig
from ditnas.latency_models.profile import profile_space
from ditnas.latency_models.stage import build_table
from ditnas.search.dp import to_arch
from ditnas.search.objectives import EvalContext, Objectives, torch_threads
from ditnas.search.problem import (
    build_problem,
    calibration_offset,
    check_coverage,
    dp_results,
    min_reachable_ms,
)
from ditnas.search.study import check_budget, dp_seeds
from ditnas.search.sensitivity import score_array, slot_sensitivity
from ditnas.search.space import SearchChoices, SlotChoice
from ditnas.search.stage import check_space_match
from ditnas.supernet.flow import eval_flow_loss
from ditnas.supernet.quality import velocity_fn
from ditnas.supernet.train import CHECKPOINT_NAME, load_supernet, train_supernet

TINY = [
    "model.max_heads=2", "model.head_dim=8", "model.cond_dim=16", "model.cond_tokens=1",
    "space.depth=3", "space.stage_pattern=[0,1,0]", "space.skippable=[1]", "space.widths=[0.5,1.0]",
    "space.mlp_ratios=[2,4]", "space.ops=[sa,lcha,ssa]",
    "train.batch_size=8", "train.steps=6", "train.checkpoint_every=0", "train.warmup_steps=2",
]
N_EVAL, EVAL_SEED = 48, 3


def build_env(root: Path) -> dict:
    """A supernet trained for 6 steps and a host-torch table of its space (module fixtures use this)."""
    cfg = load_config(None, TINY)
    train_supernet(cfg, root / "run", split=load_dataset("digits"))
    ckpt = root / "run" / CHECKPOINT_NAME
    model, _, _ = load_supernet(ckpt)
    session = profile_space(model, LatencyConfig(backend="host-torch", warmup=1, iters=3, models=0), root / "profile")
    build_table(session, model)
    ctx = EvalContext.from_paths(ckpt, root / "profile", N_EVAL, EVAL_SEED, steps=(4, 8))
    return {"ckpt": ckpt, "table_dir": root / "profile", "ctx": ctx}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on 2 shared cores run ~100x faster with 1 intra-op thread (objectives.torch_threads)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def env(tmp_path_factory, one_thread):
    return build_env(tmp_path_factory.mktemp("search_objectives"))


@pytest.fixture(scope="module")
def sens(env, tmp_path_factory):
    ctx = env["ctx"]
    return slot_sensitivity(ctx.supernet, ctx.objectives.batch, checkpoint_sha256=ctx.checkpoint_sha256, n=ctx.n,
                            seed=ctx.seed, cache_dir=tmp_path_factory.mktemp("cache"))


def _random_archs(space, n, seed=0):
    rng = random.Random(seed)
    return [space.max_arch(), space.min_arch(), space.mid_arch()] + [space.sample(rng) for _ in range(n)]


def test_quality_is_deterministic_and_equals_eval_flow_loss(env):
    ctx = env["ctx"]
    for arch in _random_archs(ctx.space, 3):
        fresh = Objectives(ctx.supernet, ctx.objectives.batch, None)  # no memo shared with ctx
        expected = eval_flow_loss(velocity_fn(ctx.supernet, arch), ctx.objectives.batch)
        assert fresh.quality(arch) == expected
        assert Objectives(ctx.supernet, ctx.objectives.batch, None).quality(arch) == expected
        assert ctx.evaluate(str(arch), 4)["quality"] == expected


def test_latency_is_steps_times_per_step_and_evaluate_is_pure(env):
    ctx = env["ctx"]
    predictor = ctx.objectives.predictor
    for arch in _random_archs(ctx.space, 3, seed=1):
        per_step = predictor.predict(arch)
        for steps in (1, 4, 8, 28):
            got = ctx.evaluate(str(arch), steps)
            assert got["latency_ms"] == pytest.approx(steps * per_step, rel=1e-12)
            assert got["latency_ms_step"] == pytest.approx(per_step, rel=1e-12)
            assert got["steps"] == steps and f"steps={steps}]" in got["arch"]
        assert ctx.objectives.latency_ms(arch, 8) == pytest.approx(8 * per_step)
        assert ctx.objectives.memory_bytes(arch) > 0 and ctx.objectives.params(arch) > 0
    # a second context loaded from the same paths gives identical results (what a Ray worker does)
    other = EvalContext.from_paths(env["ckpt"], env["table_dir"], N_EVAL, EVAL_SEED)
    text = str(ctx.space.mid_arch())
    assert other.evaluate(text, 8) == ctx.evaluate(text, 8)
    with pytest.raises(DitnasError):
        ctx.evaluate("sa:1:4 sa:1:4", 4)  # two slots in a three-slot space


def test_sensitivity_rows_and_cache_hit_without_recomputation(env, tmp_path):
    ctx = env["ctx"]
    net = ctx.supernet
    calls = []
    original = net.run

    def spy(arch, x, t, y):
        calls.append(arch)
        return original(arch, x, t, y)

    net.run = spy
    try:
        kw = {"checkpoint_sha256": ctx.checkpoint_sha256, "n": ctx.n, "seed": ctx.seed, "cache_dir": tmp_path}
        seen = []
        first = slot_sensitivity(net, ctx.objectives.batch, progress=lambda d, t, w: seen.append((d, t)), **kw)
        n_first = len(calls)
        assert n_first > 0 and seen[-1][0] == seen[-1][1] == len(first)
        assert len(list(tmp_path.glob("sensitivity-*.parquet"))) == 1
        second = slot_sensitivity(net, ctx.objectives.batch, **kw)
        assert len(calls) == n_first  # read from the cache: the supernet never ran
        assert second.equals(first)
        third = slot_sensitivity(net, ctx.objectives.batch, **{**kw, "seed": ctx.seed + 1, "cache_dir": tmp_path / "x"})
        assert len(calls) > n_first and third.equals(first)  # another key recomputes (same batch here: same values)
    finally:
        del net.run
    choices = SearchChoices.from_space(ctx.space)
    assert list(first.columns[:7]) == ["slot", "choice", "choice_index", "stage", "loss", "delta", "score"]
    mask = choices.mask()
    assert len(first) == int(mask.sum())  # fixed layout: every allowed cell, nothing else
    assert all(mask[r.slot, r.choice_index, r.stage] for r in first.itertuples())
    base = ctx.space.max_arch()
    base_loss = eval_flow_loss(velocity_fn(net, base), ctx.objectives.batch)
    np.testing.assert_allclose(first["delta"], first["loss"] - base_loss)
    np.testing.assert_allclose(first["score"], -first["delta"])
    own = first[[c == base.slots[s].token() for s, c in zip(first["slot"], first["choice"])]]
    assert len(own) == ctx.space.depth and (own["delta"] == 0).all()  # the max arch's own choice: no change
    row = first.iloc[5]
    slots = list(base.slots)
    slots[row.slot] = choices.all_choices[row.choice_index].slot(row.stage)
    assert row.loss == eval_flow_loss(velocity_fn(net, base.with_slots(slots)), ctx.objectives.batch)


def test_dp_costs_equal_the_predictor_table_sum(env, sens):
    ctx = env["ctx"]
    predictor = ctx.objectives.predictor
    choices = SearchChoices.from_space(ctx.space)
    problems = {w: build_problem(choices, predictor, sens, 100.0, stream_width=w, calibrated=False) for w in ctx.space.widths}
    checked = 0
    for arch in _random_archs(ctx.space, 40, seed=2):
        w = arch.stream_width
        choice = tuple(choices.index(SlotChoice.of(s)) for s in arch.slots)
        stage = tuple(s.stage for s in arch.slots)
        assert problems[w].layout_cost(choice, stage) == pytest.approx(predictor.table_sum(arch), rel=1e-12)
        checked += 1
    assert checked >= 40
    # calibration folds in exactly: a*cell + b per block, a*(fixed, transitions), c moved into the budget
    pred = copy.copy(predictor)
    pred.calibration = Calibration("linear", 1.3, 0.05, 0.2, 9)
    cal = build_problem(choices, pred, sens, 100.0, calibrated=True)
    assert cal.budget_ms == pytest.approx(100.0 - 0.2) and calibration_offset(pred) == 0.2
    for arch in _random_archs(ctx.space, 20, seed=3):
        if arch.stream_width != 1.0:
            continue
        choice = tuple(choices.index(SlotChoice.of(s)) for s in arch.slots)
        stage = tuple(s.stage for s in arch.slots)
        assert cal.layout_cost(choice, stage) + 0.2 == pytest.approx(pred.predict(arch), rel=1e-12)


def test_dp_layout_cost_equals_the_predictors_price(env, sens):
    """The DP prices a layout with the predictor's own additive decomposition: layout cost + fixed cost
    is the predictor's calibrated price of the same arch (each arch in the problem of its stream width)."""
    ctx = env["ctx"]
    # the test table has no whole-model rows (calibration "none"): give a copy a real linear one, so a
    # DP that dropped the per-block term or the factor would be caught
    predictor = copy.copy(ctx.objectives.predictor)
    predictor.calibration = Calibration("linear", 1.3, 0.05, 0.2, 9)
    choices = SearchChoices.from_space(ctx.space)
    problems = {w: build_problem(choices, predictor, sens, 100.0, stream_width=w) for w in ctx.space.widths}
    for arch in _random_archs(ctx.space, 40, seed=4):
        parts = predictor.decompose(arch)
        assert parts.total_ms == pytest.approx(predictor.predict(arch), rel=1e-12)
        assert parts.fixed_ms == predictor.calibration.c
        assert all(c.ms >= 0 for c in parts.cells)  # no clipping in play: the equality below is exact
        choice = tuple(choices.index(SlotChoice.of(s)) for s in arch.slots)
        stage = tuple(s.stage for s in arch.slots)
        dp_cost = problems[arch.stream_width].layout_cost(choice, stage) + calibration_offset(predictor)
        assert dp_cost == pytest.approx(predictor.predict(arch), rel=1e-9)


def test_dp_seeds_fit_the_budget_and_are_valid(env, sens):
    """`study.dp_seeds`, the seeder `ditnas search` and `ditnas sweep` use."""
    ctx = env["ctx"]
    predictor = ctx.objectives.predictor
    choices = SearchChoices.from_space(ctx.space)
    low = min_reachable_ms(choices, predictor, sens)
    high = predictor.predict(ctx.space.max_arch())
    assert low < high
    assert low <= min(predictor.predict(a) for a in _random_archs(ctx.space, 30)) + 1e-9
    per_step = low + 0.4 * (high - low)
    steps = [4, 8]
    seeds = dp_seeds(choices, predictor, sens, 8 * per_step, steps, 6, buckets=500)
    assert 2 <= len(seeds) <= 6 and len(set(seeds)) == len(seeds)
    for arch, s in seeds:
        ctx.space.validate(arch)
        assert arch.steps == s and s in steps
        assert s * predictor.predict(arch) <= 8 * per_step * (1 + 1e-9)  # every seed fits, whatever its stream width
    # round robin over steps values: 4 and 8 alternate while both have layouts
    assert [s for _, s in seeds[:2]] == [4, 8]
    # within one steps value, best summed sensitivity score first; the first is the exact DP optimum
    problem = build_problem(choices, predictor, sens, per_step, buckets=500)
    eight = [a for a, s in seeds if s == 8]
    scores = [sum(sens_score(sens, choices, a)) for a in eight]
    assert scores == sorted(scores, reverse=True)
    best = max((r for w in ctx.space.widths for r in _results_at(choices, predictor, sens, per_step, w)), key=lambda r: r.score)
    assert scores[0] == pytest.approx(best.score)
    assert dp_results(problem, 1)[0].score <= best.score + 1e-12
    # a budget no arch reaches gives no seeds (the search refuses it before asking: check_budget)
    assert dp_seeds(choices, predictor, sens, 0.5 * low * 4, [4], 3, buckets=500) == []
    with pytest.raises(DitnasError, match="search.budget_ms: .* below the cheapest"):
        check_budget(choices, predictor, sens, 0.5 * low * 4, [4], "the test table")


def _results_at(choices, predictor, sens, budget, width):
    try:
        return dp_results(build_problem(choices, predictor, sens, budget, buckets=500, stream_width=width), 1)
    except DitnasError:
        return []


def sens_score(sens, choices, arch):
    """Per-slot sensitivity scores of an arch, as the DP sums them."""
    score = score_array(sens, choices)
    return [score[i, choices.index(SlotChoice.of(s)), s.stage] for i, s in enumerate(arch.slots)]


def test_table_lacking_cells_is_one_error_listing_them(env):
    ctx = env["ctx"]
    table = ctx.table
    victims = [k for k in table.rows["key"] if k.startswith("block:lcha")][:2]
    with pytest.raises(DitnasError) as err:
        check_coverage(table.without_keys(victims), ctx.space)
    assert "lacks 2 cells" in str(err.value) and all(v in str(err.value) for v in victims)
    check_coverage(table, ctx.space)  # complete: no error


def test_checkpoint_space_must_match_the_table(env):
    ctx = env["ctx"]
    check_space_match(replace(ctx.space, steps=50), ctx.table)  # steps do not change per-step latency
    other = SearchSpace(**{**ctx.space.__dict__, "depth": 4, "stage_pattern": (0, 1, 1, 0)})
    with pytest.raises(DitnasError, match="does not match latency table") as err:
        check_space_match(other, ctx.table)
    assert "depth" in str(err.value)
