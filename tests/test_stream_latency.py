"""Streaming latency (latency_models/stream_latency.py): stream_block cells, the call-weighted sum over chunk
positions, its calibration on measured streams, the DP pricing a streamed clip exactly as the predictor does,
and the config / table errors."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from dp_checks import check_dp_prices_exactly

from ditnas.arch import SearchSpace
from ditnas.config import LatencyConfig, ModelConfig, SearchConfig
from ditnas.errors import ConfigFieldError, DitnasError
from ditnas.latency_models.predictor import LatencyPredictor
from ditnas.latency_models.programs import Cell, build_program, cells_for_arch, cells_for_space
from ditnas.latency_models.stream_latency import StreamingPredictor, position_calls
from ditnas.latency_models.table import LatencyTable
from ditnas.search.problem import min_reachable_ms
from ditnas.search.space import SearchChoices
from ditnas.supernet.model import ElasticDiT
from ditnas.supernet.streaming import Streamer

VIDEO = SearchSpace(depth=4, ops=("sa", "lcha", "ssa"), widths=(0.5, 1.0), mlp_ratios=(2.0, 4.0), skippable=(1, 2),
                    stage_pattern=(0, 1, 1, 0), latent=(1, 4, 16, 16))
HOST = {"device_id": "test-host", "device_model": "cpu", "backend": "executorch-xnnpack", "precision": "fp32",
        "compute_unit": "cpu", "threads": 1}


def _table(space: SearchSpace, seed: int = 0, stream: bool = True) -> LatencyTable:
    """Every cell of the space (clip and, with `stream`, chunk-1 streaming) at a seeded random p50: the sums
    below must hold for any cell values, not only for a smooth cost model."""
    rng = np.random.default_rng(seed)
    cells = cells_for_space(space) + (cells_for_space(space, chunk=1) if stream else [])
    rows = pd.DataFrame([{**c.fields(), "p50": float(rng.uniform(0.1, 2.0))} for c in cells])
    return LatencyTable.from_frame(rows, HOST, space=space)


def _random_archs(space: SearchSpace, n: int, seed: int = 0):
    rng = random.Random(seed)
    return [space.max_arch(), space.min_arch()] + [space.sample(rng) for _ in range(n)]


def test_stream_cells_are_every_block_at_every_chunk_position_with_distinct_keys():
    clip, chunked = cells_for_space(VIDEO), cells_for_space(VIDEO, chunk=1)
    blocks = [c for c in chunked if c.kind == "stream_block"]
    # 2 stages x 3 ops x 2 widths x 2 ratios, at 4 positions; tokens of one frame (64 at stage 0, 16 at stage 1)
    assert len(blocks) == 24 * 4 and {c.context for c in blocks} == {0, 1, 2, 3}
    assert {c.tokens for c in blocks} == {64, 16}
    assert len({c.key() for c in clip + chunked}) == len(clip) + len(chunked)
    assert cells_for_space(VIDEO, chunk=2)[0].tokens == 128
    with pytest.raises(DitnasError, match="chunk"):
        cells_for_space(VIDEO, chunk=3)  # 3 does not divide 4 frames


@pytest.mark.parametrize("op", ["sa", "gqa", "assa", "lcha", "ssa"])
def test_a_stream_block_program_carries_the_cache_a_real_stream_has_at_that_position(op):
    """Shapes of the profiled cache == those of the Streamer's cache after t0 chunks (what latency depends on),
    and the program's block output equals the eager block step on the same inputs."""
    space = replace(VIDEO, ops=(op,), widths=(1.0,), mlp_ratios=(2.0,), skippable=(), stage_pattern=(0, 0), depth=2)
    torch.manual_seed(0)
    supernet = ElasticDiT(space, ModelConfig(causal=True)).eval()
    arch = space.max_arch()
    streamer = Streamer(supernet.extract(arch).eval(), 1)
    cache = streamer.new_cache(1)
    clip, y, t = torch.randn(1, *space.latent), torch.zeros(1, dtype=torch.long), torch.full((1,), 0.5)
    for t0 in range(3):
        cell = next(c for c in cells_for_arch(space, arch, chunk=1, t0=t0) if c.kind == "stream_block")
        program = build_program(supernet, cell)
        profiled = {name: tuple(x.shape) for name, x in zip(program.module.in_names, program.inputs[3:])}
        real = {k.split(".", 1)[1]: tuple(v.shape) for k, v in cache.tensors().items() if k.startswith("block0.")}
        assert profiled == real, (t0, profiled, real)
        out = program.eager()
        with torch.no_grad():
            ref, new = program.module.block.step(*program.inputs[:3], program.module.grid, op, None, None, "own",
                                                 dict(zip(program.module.in_names, program.inputs[3:])), t0)
        assert torch.equal(out[0], ref) and len(out) == 1 + len(new)
        _, cache = streamer.step(clip[:, :, t0 : t0 + 1], t, y, cache)


def test_streaming_prediction_is_the_call_weighted_sum_of_its_cells():
    base = LatencyPredictor.fit(_table(VIDEO))
    pred = StreamingPredictor(base, chunk=1, steps=4)
    assert pred.fit.method == "uncalibrated"
    assert position_calls((0, 1, 2, 3), 4) == {0: 5, 1: 5, 2: 5, 3: 4}  # the last chunk is not committed
    table = base.table
    for arch in _random_archs(VIDEO, 8):
        brute = 0.0
        for t0, calls in ((0, 5), (1, 5), (2, 5), (3, 4)):
            brute += calls * sum(float(table.get(c).p50) for c in cells_for_arch(VIDEO, arch, chunk=1, t0=t0))
        assert pred.predict(arch) == pytest.approx(brute, rel=1e-12)
        assert pred.fps(arch) == pytest.approx(4 / brute * 1e3)
        # a clip's whole-clip call prices other cells entirely
        assert base.predict(arch, calibrated=False) != pytest.approx(pred.predict(arch) / 19)


def _stream_rows(probe, archs, law):
    """Measured streams made of a known law (alpha, delta, beta, gamma) over each arch's W, N and calls."""
    alpha, delta, beta, gamma = law
    rows = []
    for arch in archs:
        for steps in (1, 4):
            calls = position_calls(probe.positions, steps)
            p50 = (alpha * probe.weighted_sum(arch, calls) + delta * probe.programs(arch, calls)
                   + beta * sum(calls.values()) + gamma)
            rows.append({"arch": str(arch), "chunk": 1, "steps": steps, "p50": p50})
    return rows


def test_calibration_on_measured_streams_recovers_the_costs_the_streams_were_made_of():
    base = LatencyPredictor.fit(_table(VIDEO))
    probe = StreamingPredictor(base, 1, 4)
    # a warm loop, the overhead each separately timed cell program carries, a per-call overhead, a per-clip start
    law = (0.7, -0.04, 0.3, 2.5)
    archs = _random_archs(VIDEO, 4, seed=1)
    assert len({probe.programs(a) for a in archs}) > 1  # skips and width changes vary the program count
    pred = StreamingPredictor.fit_rows(base, 1, 4, _stream_rows(probe, archs, law))
    assert pred.fit.method == "linear" and pred.fit.n == 12
    assert (pred.fit.alpha, pred.fit.delta, pred.fit.beta, pred.fit.gamma) == pytest.approx(law, rel=1e-6)
    held_out = _random_archs(VIDEO, 6, seed=9)[2:]
    for arch in held_out:
        brute = sum(calls * sum(0.7 * float(base.table.get(c).p50) - 0.04 for c in cells_for_arch(VIDEO, arch, chunk=1, t0=t0))
                    for t0, calls in ((0, 5), (1, 5), (2, 5), (3, 4)))
        assert pred.predict(arch) == pytest.approx(brute + 0.3 * 19 + 2.5, rel=1e-9)
    # rows of another chunk size are not this predictor's
    rows = _stream_rows(probe, archs, law)
    assert StreamingPredictor.fit_rows(base, 1, 4, [{**r, "chunk": 2} for r in rows]).fit.method == "uncalibrated"


def test_few_streams_fit_the_three_term_law_without_the_per_program_term():
    base = LatencyPredictor.fit(_table(VIDEO))
    probe = StreamingPredictor(base, 1, 4)
    law = (0.7, 0.0, 0.3, 2.5)
    pred = StreamingPredictor.fit_rows(base, 1, 4, _stream_rows(probe, _random_archs(VIDEO, 1, seed=1), law))  # 6 rows
    assert pred.fit.method == "linear_no_program_term" and pred.fit.delta == 0.0
    assert (pred.fit.alpha, pred.fit.beta, pred.fit.gamma) == pytest.approx((0.7, 0.3, 2.5), rel=1e-6)
    assert "< 8 for the per-program term" in pred.fit.note and "without a per-program term" in pred.definition()
    # enough streams, but the 3-term law asked for (bench/video_search.py's ablation): no delta, said so
    rows = _stream_rows(probe, _random_archs(VIDEO, 4, seed=1), (0.7, -0.04, 0.3, 2.5))
    three = StreamingPredictor.fit_rows(base, 1, 4, rows, program_term=False)
    assert three.fit.method == "linear_no_program_term" and three.fit.delta == 0.0
    assert "no per-program term asked for" in three.fit.note


def test_the_dp_prices_a_streamed_layout_exactly_as_the_streaming_predictor():
    base = LatencyPredictor.fit(_table(VIDEO, seed=3))
    probe = StreamingPredictor(base, 1, 4)
    pred = StreamingPredictor.fit_rows(base, 1, 4, _stream_rows(probe, _random_archs(VIDEO, 3), (0.8, -0.05, 0.2, 1.0)))
    assert pred.fit.method == "linear" and pred.fit.delta == pytest.approx(-0.05)
    assert check_dp_prices_exactly(VIDEO, pred, _random_archs(VIDEO, 20)) >= 6


def test_streaming_needs_a_table_with_stream_cells_and_a_consistent_config():
    with pytest.raises(ConfigFieldError, match=r"search.stream_chunk.*no streaming cells.*latency.stream_chunk=1"):
        StreamingPredictor(LatencyPredictor.fit(_table(VIDEO, stream=False)), 1, 4)
    with pytest.raises(ConfigFieldError, match="search.target_fps.*search.stream_chunk"):
        SearchConfig(target_fps=10.0).check()
    with pytest.raises(ConfigFieldError, match="search.target_fps.*search.budget_ms=50 both"):
        SearchConfig(target_fps=10.0, stream_chunk=1, budget_ms=50.0).check()
    with pytest.raises(ConfigFieldError, match=r"search.steps.*one value"):
        SearchConfig(target_fps=10.0, stream_chunk=1, steps=(4, 8)).check()
    with pytest.raises(ConfigFieldError, match="search.guidance"):
        SearchConfig(stream_chunk=1, steps=(4,), guidance="cfg", budget_ms=9.0).check()
    with pytest.raises(ConfigFieldError, match="latency.stream_steps"):
        LatencyConfig(stream_chunk=1, stream_steps=()).check()
    # the budget of a target FPS is the clip's frames / FPS
    assert SearchConfig(target_fps=20.0, stream_chunk=1, steps=(4,)).check().needs_budget(frames=4) == pytest.approx(200.0)
    base = LatencyPredictor.fit(_table(VIDEO))
    with pytest.raises(DitnasError, match="priced at 4 steps per chunk without guidance; asked for 8"):
        StreamingPredictor(base, 1, 4).generation.per_step_budget(100.0, 8, "none")


def test_a_table_of_the_end_positions_interpolates_the_middle_ones_linearly_in_the_cache():
    ends = cells_for_space(VIDEO, chunk=1, positions="ends")
    assert {c.context for c in ends if c.kind == "stream_block"} == {0, 3}
    # cost linear in the cached frames (attention over the cache): the middle positions are recovered exactly
    cost = {c.key(): 0.3 + 0.1 * c.context * c.width + 0.01 * c.tokens for c in cells_for_space(VIDEO, chunk=1)}
    cells = cells_for_space(VIDEO) + ends
    rows = pd.DataFrame([{**c.fields(), "p50": cost.get(c.key(), 1.0)} for c in cells])
    base = LatencyPredictor.fit(LatencyTable.from_frame(rows, HOST, space=VIDEO))
    for cell in cells_for_space(VIDEO, chunk=1):
        if cell.kind != "stream_block" or cell.context in (0, 3):
            continue
        priced = base.price(cell)
        assert priced.source == "interpolated" and "context" in priced.detail
        assert priced.p50 == pytest.approx(cost[cell.key()], rel=1e-12)
    with pytest.raises(ConfigFieldError, match="latency.stream_positions"):
        LatencyConfig(stream_positions="middle").check()


VIDEO_TINY = [
    "data.source=moving_digits", "data.frames=2", "data.image_size=16", "data.clips=80", "model.causal=true",
    "model.max_heads=2", "model.head_dim=8", "model.cond_dim=16", "model.cond_tokens=1",
    "space.depth=3", "space.stage_pattern=[0,1,0]", "space.skippable=[1]", "space.widths=[0.5,1.0]",
    "space.mlp_ratios=[2]", "space.ops=[sa,lcha,ssa]",
    "train.batch_size=4", "train.steps=3", "train.checkpoint_every=0", "train.warmup_steps=1",
]


@pytest.mark.slow  # ~50 s idle, 146 s measured on the loaded 2-core host: a supernet, a profile and a search
def test_a_streaming_search_prices_every_trial_as_one_streamed_clip_under_the_target_fps(tmp_path):
    """ditnas search --stream-chunk 1 --target-fps F on a causal clip supernet and a table with streaming cells:
    the budget is frames / F, every trial's latency is the StreamingPredictor's, the pick streams at >= F."""
    from ditnas.config import load_config
    from ditnas.data import load_split
    from ditnas.latency_models.profile import profile_space
    from ditnas.latency_models.stage import build_table
    from ditnas.search.objectives import torch_threads
    from ditnas.search.stage import run_search
    from ditnas.supernet.train import CHECKPOINT_NAME, load_supernet, train_supernet

    cfg = load_config(None, VIDEO_TINY)
    with torch_threads(1):
        train_supernet(cfg, tmp_path / "run", split=load_split(cfg.data))
        model, _, _ = load_supernet(tmp_path / "run" / CHECKPOINT_NAME)
        latency = LatencyConfig(backend="host-torch", warmup=1, iters=3, models=0, stream_chunk=1)
        table, base = build_table(profile_space(model, latency, tmp_path / "profile"), model)
        pred = StreamingPredictor.load(base, table.root, 1, 4)
        assert pred.fit.method == "uncalibrated"  # host-torch: streams are timed on the ExecuTorch runtime only
        low = min_reachable_ms(SearchChoices.from_space(table.space), pred)
        fps = 2 / (low + 0.5 * (pred.predict(table.space.max_arch()) - low)) * 1e3
        m = run_search(SearchConfig(stream_chunk=1, steps=(4,), target_fps=fps, trials=6, dp_seeds=3),
                       tmp_path / "run" / CHECKPOINT_NAME, tmp_path / "profile", tmp_path / "search")
    assert m["budget_ms_total"] == pytest.approx(2 / fps * 1e3)
    assert m["latency_definition"].startswith("one streamed clip: 2 latent frames in chunks of 1, 4 denoiser calls")
    assert m["streaming"]["calls_per_clip"] == 9 and m["study_name"].endswith("-stream1")
    trials = pd.read_csv(tmp_path / "search" / "trials.csv")
    done = trials[trials["state"] == "COMPLETE"]
    assert len(done) >= 4
    for row in done.itertuples():
        assert row.latency_ms == pytest.approx(pred.predict(table.space.parse(row.arch)), rel=1e-9)
    assert m["best"]["latency_ms"] <= m["budget_ms_total"] and pred.fps(table.space.parse(m["best"]["arch"])) >= fps
