"""Lowering the profile's programs in a background process (what `ditnas run` does while the supernet
trains): afterwards the profile stage lowers nothing and times every program once; a child stopped
part-way leaves only whole programs behind, and the profile builds exactly the rest."""

from __future__ import annotations

import time

import pytest

from ditnas.config import load_config
from ditnas.latency_models.background_lowering import BackgroundLowering
from ditnas.latency_models.profile import profile_space, supernet_for_profiling

pytest.importorskip("executorch")

TINY = ["model.max_heads=2", "model.head_dim=8", "model.cond_dim=16", "model.cond_tokens=1", "space.depth=2",
        "space.stage_pattern=[0,0]", "space.skippable=[]", "space.widths=[1.0]", "space.mlp_ratios=[2]",
        "space.ops=[sa,ssa]", "latency.models=0", "latency.iters=3", "latency.warmup=1", "latency.guidance=[none]",
        "latency.generation_steps=[2]", "latency.generation_iters=1"]


def _pte_stamps(folder):
    return {p.name: p.stat().st_mtime_ns for p in (folder / "artifacts").glob("*.pte")}


@pytest.mark.slow  # ~50 s; the default run's `ditnas run` tests lower in the background too (tests/test_pipeline.py)
def test_background_lowering_leaves_the_profile_only_timing(tmp_path):
    cfg = load_config(None, TINY)
    folder = tmp_path / "profile"
    background = BackgroundLowering(cfg, folder)
    background.process.join(timeout=300)
    assert "finished" in background.finish(), background.log_path.read_text()[-2000:]
    built = _pte_stamps(folder)
    supernet = supernet_for_profiling(cfg)  # another initialisation than the child's: latency ignores weights
    steps: list[str] = []
    session = profile_space(supernet, cfg.latency, folder, progress=lambda i, n, key: steps.append(key))
    assert len(built) == len(session.summary()) == 2 + 2  # sa, ssa blocks; patch embed, final
    assert _pte_stamps(folder) == built  # nothing lowered again
    assert f"{len(built)} built earlier, reused" in steps
    assert set(session.summary()["n"]) == {cfg.latency.iters}  # every program timed once


@pytest.mark.slow  # ~1 min more; reuse after a cut-short build is also covered by test_fault_profile (SIGKILL)
def test_a_stopped_child_leaves_whole_programs_and_the_profile_builds_the_rest(tmp_path):
    cfg = load_config(None, TINY)
    folder = tmp_path / "profile"
    background = BackgroundLowering(cfg, folder)
    deadline = time.time() + 300
    while not list((folder / "artifacts").glob("*.delegation.json")) and time.time() < deadline:
        time.sleep(0.2)  # the first program is finished: stop the child in the middle of the next
    line = background.finish()
    assert "stopped" in line or "finished" in line, line
    stamps = _pte_stamps(folder)
    # finished = the delegation report is written (last); a .pte without one was cut short
    finished = {p.name.replace(".delegation.json", ".pte") for p in (folder / "artifacts").glob("*.delegation.json")}
    assert finished and finished <= set(stamps)
    session = profile_space(supernet_for_profiling(cfg), cfg.latency, folder)
    assert len(session.summary()) == 4 and set(session.summary()["n"]) == {cfg.latency.iters}
    after = _pte_stamps(folder)
    assert len(after) == 4
    assert all(after[name] == stamps[name] for name in finished)  # reused as the child left them
