"""Real fault injection on `ditnas profile` (ExecuTorch XNNPACK): the process group is SIGKILLed while
programs are being lowered, and again while they are being timed (in the timing subprocess), then the
same command is rerun. Promise: no sample lost or duplicated, every program timed exactly `iters`
times in one pass, and a program lowered before the kill is reused, not lowered again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ditnas.latency_models.session import HISTORY, ProfilingSession

pytest.importorskip("executorch")

CONFIG = """\
model: {max_heads: 2, head_dim: 8, cond_dim: 16, cond_tokens: 1}
space: {depth: 2, ops: [sa, ssa], widths: [1.0], mlp_ratios: [4.0], skippable: [], stage_pattern: [0, 0]}
"""
ITERS = 6


def _command(config: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "ditnas.cli", "profile", "--backend", "executorch-xnnpack", "--config", str(config),
            "--out", str(out), "--models", "1", "--warmup", "1", "--iters", str(ITERS), "--no-progress"]


def _start(config: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(_command(config, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)  # its own process group: the timing child dies with it


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 600.0) -> None:
    deadline = time.time() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"profile exited ({proc.returncode}) before the kill: {proc.stderr.read().decode()[-1500:]}")
            if time.time() > deadline:
                pytest.fail("the kill point was not reached in time")
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _lowered(out: Path) -> list[Path]:
    return sorted((out / "artifacts").glob("*.delegation.json")) if (out / "artifacts").is_dir() else []


def _timing_child_running(proc: subprocess.Popen) -> bool:
    found = subprocess.run(["pgrep", "-g", str(proc.pid), "-f", "pte_timer"], capture_output=True, text=True)
    return bool(found.stdout.strip())


def _finish_and_check(config: Path, out: Path) -> ProfilingSession:
    done = subprocess.run(_command(config, out), capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-2000:]
    session = ProfilingSession.load(out)
    samples = session.samples()
    counts = samples.groupby("key")["iteration"].agg(["count", "nunique"])
    assert (counts["count"] == ITERS).all() and (counts["nunique"] == ITERS).all()  # none lost, none twice
    assert samples["session_id"].nunique() == 1
    assert not (out / HISTORY).exists()  # one timing pass: nothing was timed twice
    return session


@pytest.mark.slow  # ~3 min here; the default run keeps the reuse contract (test_latency_backends, background lowering)
@pytest.mark.timeout(1200)
def test_sigkill_while_lowering_then_rerun_reuses_and_loses_nothing(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(CONFIG)
    out = tmp_path / "lowering"
    proc = _start(config, out)
    _kill_when(proc, lambda: len(_lowered(out)) >= 2)
    kept = {p.with_suffix("").with_suffix(".pte"): p.with_suffix("").with_suffix(".pte").stat().st_mtime_ns
            for p in _lowered(out)}
    assert len(kept) >= 2 and not (out / "samples.parquet").exists()
    session = _finish_and_check(config, out)
    # programs lowered before the kill were reused, not lowered again (same file, same mtime)
    assert all(pte.stat().st_mtime_ns == mtime for pte, mtime in kept.items())
    assert len(_lowered(out)) == session.samples()["key"].nunique()


@pytest.mark.slow  # ~2 min: lowering is the long phase a user is most likely to kill (the default run tests that)
@pytest.mark.timeout(1200)
def test_sigkill_while_timing_then_rerun_times_once(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(CONFIG)
    out = tmp_path / "timing"
    proc = _start(config, out)
    _kill_when(proc, lambda: _timing_child_running(proc))
    assert not (out / "samples.parquet").exists()  # the pass died before it was stored: nothing half-written
    _finish_and_check(config, out)
