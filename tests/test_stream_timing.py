"""Streamed clips timed in rounds of fresh processes (latency_models/stream_timing.py): every round times every
job once in a new seeded order, samples land under their job in round order, the figure is the median over rounds
of each round's median; on the runtime every round is a new process; the profile's calibration streams
(stream_latency.measure_streams) are timed that way and are not re-timed when resumed."""

from __future__ import annotations

import statistics

import pytest
import torch

from ditnas.arch import SearchSpace
from ditnas.config import ModelConfig
from ditnas.errors import DitnasError
from ditnas.latency_models import stream_timing
from ditnas.latency_models.stream_timing import stream_p50, time_streams_in_rounds

torch.set_num_threads(1)

JOBS = [("a", "folder_a", 1), ("b", "folder_b", 4), ("c", "folder_c", 2)]


class FakeTimer:
    """Stands for the fresh process: records each round's order, returns times that encode (round, key, stream)."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, order, threads, warmup, iters):
        r = len(self.calls)
        self.calls.append([key for key, _, _ in order])
        streams = {key: {"total_s": [(100 * r + 10 * "abc".index(key) + i) / 1e3 for i in range(iters)],
                         "chunk_s": [[0.001 * (i + 1), 0.002] for i in range(iters)]} for key, _, _ in order}
        return {"pid": 1000 + r, "order": self.calls[-1], "streams": streams}


def test_every_round_times_every_job_once_in_a_new_seeded_order_and_samples_keep_their_round():
    timer = FakeTimer()
    out = time_streams_in_rounds(JOBS, 1, 6, iters=2, seed=3, timer=timer)
    assert len(timer.calls) == 6 and all(sorted(c) == ["a", "b", "c"] for c in timer.calls)
    assert len({tuple(c) for c in timer.calls}) > 1  # the order changes between rounds
    assert out["orders"] == timer.calls and out["pids"] == [1000 + r for r in range(6)]
    again = FakeTimer()
    time_streams_in_rounds(JOBS, 1, 6, iters=2, seed=3, timer=again)
    assert again.calls == timer.calls  # deterministic under the seed
    other = FakeTimer()
    time_streams_in_rounds(JOBS, 1, 6, iters=2, seed=4, timer=other)
    assert other.calls != timer.calls
    for k, key in enumerate("abc"):
        got = out["streams"][key]["total_ms"]
        assert got == [[pytest.approx(100 * r + 10 * k + i) for i in range(2)] for r in range(6)]
        assert out["streams"][key]["chunk_ms"][0] == [[pytest.approx(1.0), pytest.approx(2.0)],
                                                       [pytest.approx(2.0), pytest.approx(2.0)]]


def test_the_figure_is_the_median_over_rounds_of_each_rounds_median():
    rounds = [[10.0, 11.0, 30.0], [50.0, 52.0, 51.0], [12.0, 13.0, 12.5], [9.0], [14.0, 90.0]]
    brute = statistics.median([statistics.median(r) for r in rounds])  # 11, 51, 12.5, 9, 52 -> 12.5
    assert stream_p50(rounds) == pytest.approx(brute) == pytest.approx(12.5)
    # one process 4x slow moves the median over rounds by at most one rank, the pooled mean by far more
    assert stream_p50([[10.0], [10.5], [40.0]]) == pytest.approx(10.5)
    with pytest.raises(DitnasError, match="no timed streams"):
        stream_p50([[], []])


def test_bad_arguments_are_one_clear_error():
    with pytest.raises(DitnasError, match="keys must be distinct"):
        time_streams_in_rounds([("a", "x", 1), ("a", "y", 2)], 1, 2, timer=FakeTimer())
    with pytest.raises(DitnasError, match="rounds=0"):
        time_streams_in_rounds(JOBS, 1, 0, timer=FakeTimer())
    with pytest.raises(DitnasError, match="threads=0"):
        time_streams_in_rounds(JOBS, 0, 2, timer=FakeTimer())


FRAMES = 2
SPACE = SearchSpace(depth=2, stage_pattern=(0, 0), skippable=(), free_stages=True, latent=(1, FRAMES, 8, 8),
                    widths=(0.5, 1.0), mlp_ratios=(2,), ops=("sa", "lcha"))
CFG = ModelConfig(max_heads=2, head_dim=8, cond_dim=16, cond_tokens=2)


@pytest.mark.slow  # lowers 4 chunk programs (~1-2 min)
def test_profile_streams_are_timed_in_rounds_of_new_processes_and_resume_without_retiming(tmp_path, monkeypatch):
    from ditnas.latency_models.stream_latency import measure_streams, read_streams, summarize_streams
    from ditnas.supernet.model import ElasticDiT

    torch.manual_seed(0)
    supernet = ElasticDiT(SPACE, CFG).eval()
    archs = [SPACE.parse("sa:1:2 lcha:1:2"), SPACE.parse("lcha:0.5:2 lcha:0.5:2")]
    seen = {}
    real = stream_timing.time_streams_in_rounds

    def spy(jobs, threads, rounds, **kw):
        seen["out"] = real(jobs, threads, rounds, **kw)
        return seen["out"]

    monkeypatch.setattr(stream_timing, "time_streams_in_rounds", spy)
    rows = measure_streams(supernet, archs, 1, (1, 2), 1, 3, tmp_path, seed=0)
    assert len(set(seen["out"]["pids"])) == 3  # every round its own fresh process
    assert len(rows) == 4 and {(r["arch"], r["steps"]) for r in rows} == {(str(a), s) for a in archs for s in (1, 2)}
    for r in rows:
        assert r["rounds"] == 3 and len(r["total_ms"]) == 3 and all(t > 0 for t in r["total_ms"])
        assert r["total_ms"] == pytest.approx([rnd[0] for rnd in seen["out"]["streams"][f"{r['arch']}@{r['steps']}"]["total_ms"]])
    assert read_streams(tmp_path) == rows
    p50 = {(s["arch"], s["steps"]): s["p50"] for s in summarize_streams(rows)}
    assert p50[(str(archs[0]), 1)] == pytest.approx(statistics.median(rows[0]["total_ms"]))

    def refuse(*a, **kw):
        raise AssertionError("re-timed a stream that was already timed")

    monkeypatch.setattr(stream_timing, "time_streams_in_rounds", refuse)
    assert measure_streams(supernet, archs, 1, (1, 2), 1, 3, tmp_path, seed=0) == rows
