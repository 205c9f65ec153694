"""Programs per search-space cell, the host-torch backend and profiling sessions (real timings on
tiny programs; no test asserts on absolute times: the machine is shared)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from ditnas.arch import Arch, SearchSpace, Slot
from ditnas.config import ModelConfig
from ditnas.errors import DitnasError
from ditnas.latency_models import (
    ProfilingSession,
    build_program,
    cells_for_arch,
    cells_for_space,
    get_backend,
    merge,
    model_program,
    programs_for_cells,
    summarize,
)
from ditnas.latency_models.backends.base import interleaved_rounds
from ditnas.latency_models.backends.host_torch import HostTorchBackend
from ditnas.config import LatencyConfig
from ditnas.latency_models.profile import profile_space
from ditnas.latency_models.programs import Cell
from ditnas.latency_models.session import HISTORY, SAMPLES, read_samples, write_samples
from ditnas.supernet.model import ElasticDiT

WARMUP, ITERS = 2, 5
CFG = ModelConfig(max_heads=2, head_dim=8, cond_dim=16, cond_tokens=1)


TINY_PROFILE = LatencyConfig(backend="host-torch", warmup=0, iters=2, models=0)


def _space(**kw) -> SearchSpace:
    base = {
        "depth": 2,
        "ops": ("sa", "gqa", "assa", "lcha", "ssa"),
        "widths": (0.5, 1.0),
        "mlp_ratios": (2.0, 4.0),
        "stage_pattern": (0, 1),
    }
    base.update(kw)
    return SearchSpace(**base)


def _supernet(space: SearchSpace) -> ElasticDiT:
    torch.manual_seed(0)
    net = ElasticDiT(space, CFG).eval()
    with torch.no_grad():  # leave adaLN-Zero: a zero gate would hide the mixer from every parity check
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return _space()


@pytest.fixture(scope="module")
def supernet(space: SearchSpace) -> ElasticDiT:
    return _supernet(space)


class OtherHost(HostTorchBackend):
    """The host backend reporting another device: what a session of a second machine looks like."""

    def info(self) -> dict:
        return {**super().info(), "device_id": "other-phone", "device_model": "Pixel 9"}


class Interrupting(HostTorchBackend):
    """Raises KeyboardInterrupt (as Ctrl-C would) while building the n-th program, or while timing
    when `stop_at` is None."""

    def __init__(self, stop_at: int | None) -> None:
        super().__init__(threads=1)
        self.calls, self.stop_at = 0, stop_at

    def prepare(self, programs, workdir):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return super().prepare(programs, workdir)

    def measure(self, prepared, warmup, iters):
        if self.stop_at is None:
            raise KeyboardInterrupt
        return super().measure(prepared, warmup, iters)


# ----- programs ---------------------------------------------------------------------------------
def test_cells_cover_every_op_width_ratio_stage(space: SearchSpace) -> None:
    cells = cells_for_space(space)
    blocks = [c for c in cells if c.kind == "block"]
    assert len(blocks) == 2 * 5 * 2 * 2  # stages x ops x widths x MLP ratios
    assert {(c.op, c.width, c.mlp_ratio, c.stage) for c in blocks} == {
        (op, w, r, s) for op in space.ops for w in space.widths for r in space.mlp_ratios for s in (0, 1)
    }
    assert {c.tokens for c in blocks if c.stage == 0} == {64} and {c.tokens for c in blocks if c.stage == 1} == {16}
    others = sorted((c.kind, c.width) for c in cells if c.kind != "block")
    assert others == sorted((k, w) for k in ("patch_embed", "final", "down", "up") for w in (0.5, 1.0))
    assert len({c.key() for c in cells}) == len(cells)  # keys are unique
    # no half-resolution slot in a fixed layout -> no block at stage 1 and no transitions
    flat = cells_for_space(_space(stage_pattern=(0, 0)))
    assert {c.stage for c in flat} == {0} and not [c for c in flat if c.kind in ("down", "up")]


def test_every_cell_program_builds_and_runs(space: SearchSpace, supernet: ElasticDiT) -> None:
    programs = programs_for_cells(supernet, cells_for_space(space))
    backend = get_backend("host-torch")
    prepared = backend.prepare(programs, workdir=None)
    rows = backend.measure(prepared, warmup=0, iters=1)
    assert [r["key"] for r in rows] == [p.key() for p in programs]
    assert all(r["latency_ms"] > 0 for r in rows)
    for p in programs:
        out = p.eager()
        if p.kind == "block":
            assert out.shape == p.inputs[0].shape  # a block keeps the stream's shape
        elif p.kind == "final":
            assert out.shape == (1, *space.latent)


def test_pieces_compose_to_the_extracted_model(space: SearchSpace, supernet: ElasticDiT) -> None:
    """patch_embed -> blocks (+ down/up) -> final, run as separate programs, equals SubDiT.forward."""
    arch = Arch(
        (Slot("lcha", 1.0, 4.0, 0), Slot("ssa", 0.5, 2.0, 1)), space.patch_size, space.latent, space.num_classes, space.steps
    )
    whole = model_program(supernet, arch)
    x, t, y = whole.inputs
    cells = cells_for_arch(space, arch)
    assert [c.kind for c in cells] == ["patch_embed", "block", "down", "block", "up", "final"]
    progs = {c.key(): build_program(supernet, c) for c in cells}
    h, c, ctx = progs[cells[0].key()].module(x, t, y)
    saved = []
    with torch.no_grad():
        for cell in cells[1:-1]:
            module = progs[cell.key()].module
            if cell.kind == "down":
                saved.append(h)
                h = module(h)
            elif cell.kind == "up":
                h = module(h, saved.pop())
            else:  # a narrower block updates the leading features of the stream
                d = supernet.heads_for(cell.width) * supernet.head_dim
                h = torch.cat([module(h[..., :d], c, ctx), h[..., d:]], dim=-1)
        out = progs[cells[-1].key()].module(h, c)
    assert torch.allclose(out, whole.eager(), atol=1e-5)
    assert torch.allclose(whole.eager(), supernet.run(arch, x, t, y), atol=1e-5)


def test_block_program_matches_supernet_block(supernet: ElasticDiT) -> None:
    """A standalone block equals the supernet's block run at that op/width with shared weights."""
    space = supernet.space
    for cell in [c for c in cells_for_space(space, kinds=("block",)) if c.stage == 0 and c.mlp_ratio == 2.0]:
        prog = build_program(supernet, cell)
        x, c, ctx = prog.inputs
        heads = supernet.heads_for(cell.width)
        with torch.no_grad():
            ref = supernet.blocks[0](x, c, ctx, (1, 8, 8), cell.op, heads, int(cell.mlp_ratio * heads * 8), f"h{heads}")
        assert torch.allclose(prog.eager(), ref, atol=1e-5), cell.key()


# ----- backends registry ------------------------------------------------------------------------
def test_backend_registry_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DitnasError, match="unknown backend 'tpu'.*host-torch"):
        get_backend("tpu")
    from ditnas.latency_models.backends.executorch_xnnpack import (
        ExecuTorchXnnpackBackend,
    )

    monkeypatch.setattr(ExecuTorchXnnpackBackend, "requires", ("executorch_not_here",))
    with pytest.raises(DitnasError, match="executorch_not_here.*pip install executorch"):
        get_backend("executorch-xnnpack")
    with pytest.raises(DitnasError, match="threads=0"):
        get_backend("host-torch", threads=0)


def test_host_torch_fixes_and_restores_threads(supernet: ElasticDiT) -> None:
    before = torch.get_num_threads()
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return x + 1

    from ditnas.latency_models.programs import Cell, Program

    prog = Program(Cell("final", width=1.0, tokens=1), Spy(), (torch.zeros(1),))
    backend = get_backend("host-torch", threads=1)
    rows = backend.measure(backend.prepare([prog], None), warmup=1, iters=3)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert seen == [1] * 4 and torch.get_num_threads() == before
    info = backend.info()
    assert info["threads"] == 1 and info["backend"] == "host-torch" and info["tool_versions"]["torch"]


# ----- sessions ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def four(supernet: ElasticDiT):
    cells = [c for c in cells_for_space(supernet.space) if c.kind == "block" and c.op == "sa" and c.stage == 1]
    assert len(cells) == 4
    return programs_for_cells(supernet, cells)


def test_session_resumes_without_loss_or_duplicates(tmp_path, four) -> None:
    backend = get_backend("host-torch")
    session = ProfilingSession.open(tmp_path / "s", backend, warmup=WARMUP, iters=ITERS)
    assert session.run(four[:2], backend) == [p.key() for p in four[:2]]
    first = session.samples()
    # "interrupt": a new process reopens the folder and asks for all four
    again = ProfilingSession.open(tmp_path / "s", get_backend("host-torch"), warmup=WARMUP, iters=ITERS)
    assert again.session_id == session.session_id
    assert again.run(four, backend) == [p.key() for p in four[2:]]
    samples = again.samples()
    assert len(samples) == 4 * ITERS
    assert samples.groupby("key").size().to_dict() == {p.key(): ITERS for p in four}
    assert samples["measured_at"].nunique() == 1  # one timing pass holds every program
    # the first two were re-timed with the new ones; their old samples moved to the history
    pd.testing.assert_frame_equal(read_samples(tmp_path / "s" / HISTORY), first)
    assert again.manifest["passes"][-1]["retimed"] == 2
    assert again.run(four, backend) == []  # nothing left: nothing re-measured
    assert len(again.samples()) == 4 * ITERS
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["warmup"] == WARMUP and manifest["iters"] == ITERS and manifest["device"]["threads"] == 1
    assert manifest["versions"]["torch"] and manifest["created_at"] <= manifest["updated_at"]
    summary = again.summary()
    assert list(summary["n"]) == [ITERS] * 4
    assert (summary["p10"] <= summary["p50"]).all() and (summary["p50"] <= summary["p90"]).all()


def test_session_interrupted_loses_nothing_and_resumes(tmp_path, four) -> None:
    root = tmp_path / "s"
    backend = get_backend("host-torch")
    ProfilingSession.open(root, backend, warmup=0, iters=ITERS).run(four[:1], backend)
    before = ProfilingSession.load(root).samples()
    for stop in (Interrupting(stop_at=3), Interrupting(stop_at=None)):  # while building, while timing
        with pytest.raises(KeyboardInterrupt):
            ProfilingSession.open(root, stop, warmup=0, iters=ITERS).run(four, stop)
        pd.testing.assert_frame_equal(ProfilingSession.load(root).samples(), before)  # nothing half-written
        assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]
    s = ProfilingSession.open(root, backend, warmup=0, iters=ITERS)
    assert s.run(four, backend) == [p.key() for p in four[1:]]
    assert s.samples().groupby("key").size().to_dict() == {p.key(): ITERS for p in four}


class Drifting(HostTorchBackend):
    """Synthetic timings: each program's own cost times a machine speed the test changes."""

    def __init__(self) -> None:
        super().__init__(threads=1)
        self.speed = 1.0

    def measure(self, prepared, warmup, iters):
        return [{"key": p.key(), "iteration": i, "latency_ms": self.speed * (1 + len(p.key()) % 7)}
                for p in prepared for i in range(iters)]


def test_a_later_pass_retimes_the_whole_session_so_rows_share_one_machine_state(tmp_path, four, supernet) -> None:
    backend = Drifting()
    session = ProfilingSession.open(tmp_path / "s", backend, warmup=0, iters=3)
    session.run(four[:3], backend)
    backend.speed = 2.0  # the machine got twice as slow before the closed loop measures one more program
    by_key = {p.key(): p for p in four}
    assert session.run([four[3]], backend, rebuild=lambda cell: by_key[cell.key()]) == [four[3].key()]
    p50 = session.summary().set_index("key")["p50"]
    assert all(p50[p.key()] == 2.0 * (1 + len(p.key()) % 7) for p in four)  # every row at the new speed
    assert session.drift_since_last_pass() == 2.0 and session.manifest["passes"][-1]["retimed"] == 3
    assert len(read_samples(tmp_path / "s" / HISTORY)) == 3 * 3
    # without `rebuild` a pass times only what it is given
    backend.speed = 3.0
    other = build_program(supernet, next(c for c in cells_for_space(supernet.space) if c.kind == "final"))
    session.run([other], backend)
    p50 = session.summary().set_index("key")["p50"]
    assert p50[other.key()] == 3.0 * (1 + len(other.key()) % 7) and p50[four[0].key()] == 2.0 * (1 + len(four[0].key()) % 7)


def test_profiling_another_model_into_a_session_is_refused(tmp_path, space) -> None:
    root = tmp_path / "s"
    profile_space(_supernet(space), TINY_PROFILE, root, kinds=("final",))
    before = (root / SAMPLES).read_bytes()
    wider = ElasticDiT(space, replace(CFG, head_dim=16)).eval()
    with pytest.raises(DitnasError, match=r"profiled another model \(head_dim 8 -> 16\).*new --out"):
        profile_space(wider, TINY_PROFILE, root, kinds=("final",))
    assert (root / SAMPLES).read_bytes() == before  # nothing overwritten
    again = profile_space(_supernet(space), TINY_PROFILE, root, kinds=("final",))
    assert again.samples().equals(ProfilingSession.load(root).samples())  # same model: resumes


def test_cells_round_trip_through_sample_rows(supernet) -> None:
    space = supernet.space
    cells = cells_for_space(space) + [model_program(supernet, space.min_arch()).cell]
    assert [Cell.from_fields(c.fields()) for c in cells] == cells


def test_interleaved_rounds_time_every_call_in_seeded_shuffled_rounds() -> None:
    log: list[str] = []
    calls = [(k, lambda k=k: log.append(k)) for k in "abc"]
    rows = interleaved_rounds(calls, warmup=2, iters=7, per_round=3, seed=1)
    assert log[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up first, untimed
    timed = log[6:]
    assert len(timed) == len(rows) == 21 and {r["key"]: r["iteration"] for r in rows} == {"a": 6, "b": 6, "c": 6}
    # rounds of 3 (the last of 1): every program appears in every round, not all of one then the next
    assert [sorted(set(timed[i:i + 9])) for i in (0, 9)] == [["a", "b", "c"]] * 2 and sorted(timed[18:]) == ["a", "b", "c"]
    again: list[str] = []
    interleaved_rounds([(k, lambda k=k: again.append(k)) for k in "abc"], warmup=2, iters=7, per_round=3, seed=1)
    assert again == log  # seeded
    with pytest.raises(DitnasError, match="per_round=0"):
        interleaved_rounds(calls, warmup=0, iters=1, per_round=0)


def test_session_refuses_other_settings_and_duplicate_programs(tmp_path, four) -> None:
    backend = get_backend("host-torch")
    ProfilingSession.open(tmp_path / "s", backend, warmup=WARMUP, iters=ITERS)
    with pytest.raises(DitnasError, match="iters: session has 5, now 7"):
        ProfilingSession.open(tmp_path / "s", backend, warmup=WARMUP, iters=7)
    with pytest.raises(DitnasError, match="device_id"):
        ProfilingSession.open(tmp_path / "s", OtherHost(), warmup=WARMUP, iters=ITERS)
    s = ProfilingSession.load(tmp_path / "s")
    with pytest.raises(DitnasError, match="appear twice"):
        s.run([four[0], four[0]], backend)
    with pytest.raises(DitnasError, match="belongs to host-torch on"):
        s.run(four[:1], OtherHost())


def test_truncated_parquet_and_manifest_are_clear_errors(tmp_path, four) -> None:
    backend = get_backend("host-torch")
    s = ProfilingSession.open(tmp_path / "s", backend, warmup=0, iters=2)
    s.run(four[:1], backend)
    parquet = tmp_path / "s" / SAMPLES
    data = parquet.read_bytes()
    parquet.write_bytes(data[: len(data) // 2])
    with pytest.raises(DitnasError, match=r"samples.parquet is unreadable or truncated.*delete it"):
        ProfilingSession.load(tmp_path / "s")
    with pytest.raises(DitnasError, match="truncated"):
        ProfilingSession.open(tmp_path / "s", backend, warmup=0, iters=2).run(four, backend)
    assert parquet.read_bytes() == data[: len(data) // 2]  # nothing overwritten
    manifest = tmp_path / "s" / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(DitnasError, match=r"manifest.json is unreadable or truncated"):
        ProfilingSession.load(tmp_path / "s")
    with pytest.raises(DitnasError, match="not a profiling session"):
        ProfilingSession.load(tmp_path / "nowhere")


def test_merge_drift_and_refusal_of_other_device(tmp_path, four) -> None:
    backend = get_backend("host-torch")
    a = ProfilingSession.open(tmp_path / "a", backend, warmup=0, iters=3)
    a.run(four[:3], backend)
    b = ProfilingSession.open(tmp_path / "b", backend, warmup=0, iters=3)
    b.run(four[2:], backend)
    merged = merge([a, b], tmp_path / "m")
    samples = merged.samples()
    assert samples.groupby("key").size().to_dict() == {p.key(): 3 for p in four}  # the shared program once
    shared = four[2].key()
    assert set(samples[samples["key"] == shared]["session_id"]) == {b.session_id}  # the later session wins
    assert [m["session_id"] for m in merged.manifest["merged_from"]] == [a.session_id, b.session_id]
    assert ProfilingSession.load(tmp_path / "m").session_id == merged.session_id

    drift = a.drift(b)
    assert list(drift["key"]) == [shared]
    assert np.isclose(drift["ratio"].iloc[0], drift["p50_other"].iloc[0] / drift["p50"].iloc[0])

    other = ProfilingSession.open(tmp_path / "o", OtherHost(), warmup=0, iters=3)
    with pytest.raises(DitnasError, match=r"sessions .*/a .*host-torch on .* and .*/o .*other-phone"):
        merge([a, other], tmp_path / "m2")
    with pytest.raises(DitnasError, match="different devices"):
        a.drift(other)
    assert not (tmp_path / "m2").exists()
    with pytest.raises(DitnasError, match="already holds a session"):
        merge([a, b], tmp_path / "m")


def test_summary_statistics_and_high_variance_flags(tmp_path, four) -> None:
    backend = get_backend("host-torch")
    s = ProfilingSession.open(tmp_path / "s", backend, warmup=0, iters=4)
    s.run(four[:2], backend)
    # replace the measured values by known ones to check the arithmetic exactly
    df = s.samples()
    steady, noisy = four[0].key(), four[1].key()
    df.loc[df["key"] == steady, "latency_ms"] = [1.0, 1.0, 1.0, 1.1]
    df.loc[df["key"] == noisy, "latency_ms"] = [1.0, 3.0, 1.0, 3.0]
    write_samples(tmp_path / "s" / SAMPLES, df)
    summary = summarize(df).set_index("key")
    for key, values in ((steady, [1.0, 1.0, 1.0, 1.1]), (noisy, [1.0, 3.0, 1.0, 3.0])):
        v = np.array(values)
        row = summary.loc[key]
        assert np.isclose(row["p50"], np.median(v)) and np.isclose(row["p10"], np.quantile(v, 0.1))
        assert np.isclose(row["p90"], np.quantile(v, 0.9)) and np.isclose(row["mean"], v.mean())
        assert np.isclose(row["std"], v.std(ddof=1)) and row["n"] == 4
        mad = np.median(np.abs(v - np.median(v)))
        assert np.isclose(row["p50_rel_se"], 1.2533 * 1.4826 * mad / 2 / np.median(v))
    flagged = s.flag_high_variance(threshold_cv=0.2)
    assert list(flagged["key"]) == [noisy]


def test_lower_space_builds_the_slowest_programs_first(tmp_path, supernet) -> None:
    """Whole models, then blocks widest first, then transitions: when `ditnas run` stops its background
    lowering (training finished first) what is left is cheap and spreads over the worker processes."""
    from ditnas.latency_models.profile import lower_space

    keys: list[str] = []
    cfg = replace(TINY_PROFILE, models=2, workers=1)
    n = lower_space(supernet, cfg, tmp_path, progress=lambda done, total, key: keys.append(key))
    assert n == len(keys) > 4
    kinds = [k.split(":")[0] for k in keys]
    first_block, last_block = kinds.index("block"), len(kinds) - 1 - kinds[::-1].index("block")
    assert kinds[:2] == ["model", "model"] and set(kinds[2:first_block]) == set()
    assert set(kinds[first_block:last_block + 1]) == {"block"} and "model" not in kinds[last_block:]
    assert kinds[-1] not in ("model", "block")
    sizes = [float(k.split(":w")[1].split(":")[0]) * (1 + float(k.split(":r")[1].split(":")[0]))
             for k in keys if k.startswith("block:")]
    assert sizes == sorted(sizes, reverse=True)
