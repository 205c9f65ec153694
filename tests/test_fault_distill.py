"""Real fault injection on `ditnas distill` (K-DMD): the process is SIGKILLed at seeded random iterations,
then the same command is rerun. Promise: at most one checkpoint interval lost per kill, no half-written
state ever loaded (atomic write + rename), every iteration logged exactly once, and the resumed student is
bit-for-bit the uninterrupted one (the state holds the generator, critic, optimisers and every RNG)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ditnas.compress.distill import STATE_NAME, read_metrics
from ditnas.io import torch_load
from ditnas.search.threads import torch_threads

from kill_helpers import logged_steps, quiet_env, run_and_kill_at  # noqa: E402  (tests/ is on sys.path)
from test_compress_dmd import build_pair  # noqa: E402

STEPS, CRITIC, EVERY = 24, 2, 3  # 48 iterations, a state every 3 generator updates = 6 iterations
KILLS = 3
SETTINGS = [
    f"compress.distill.steps={STEPS}", "compress.distill.batch_size=4", f"compress.distill.critic_updates={CRITIC}",
    f"compress.distill.checkpoint_every={EVERY}", "compress.distill.eval_samples=0", "compress.distill.lr=0.001",
    "compress.distill.critic_lr=0.001", "compress.distill.few_step_teacher=trajectory",
    "compress.distill.teacher_pairs=16", "compress.distill.teacher_kd_steps=3", "compress.distill.teacher_substeps=2",
]


def _command(pair: dict, out: Path) -> list[str]:
    sets = [arg for item in SETTINGS for arg in ("--set", item)]
    return [sys.executable, "-m", "ditnas.cli", "distill", "--teacher", str(pair["teacher"]), "--student",
            str(pair["student"]), "--out", str(out), "--method", "kdmd", "--no-progress", *sets]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    with torch_threads(1):
        return build_pair(tmp_path_factory.mktemp("distill_fault"))


@pytest.mark.timeout(900)
def test_sigkill_mid_distillation_then_rerun_equals_uninterrupted(pair, tmp_path):
    clean = tmp_path / "clean"
    subprocess.run(_command(pair, clean), env=quiet_env(), check=True, capture_output=True)
    total, interval = STEPS * CRITIC, EVERY * CRITIC
    assert logged_steps(clean) == list(range(total))

    killed = tmp_path / "killed"
    rng = random.Random(5)
    record = []
    for at in sorted(rng.sample(range(1, total - 8), KILLS)):
        last = run_and_kill_at(_command(pair, killed), killed, at)
        state = killed / STATE_NAME
        # weights_only; a torn state would raise here. Before the first interval there is none: a rerun starts over
        saved = int(torch_load(state)["iteration"]) if state.exists() else 0
        assert saved % interval == 0 and saved <= last + 1
        assert last + 1 - saved <= interval + 2, (last, saved)  # at most one interval (+ what landed during the kill)
        record.append({"killed_after_iteration": last, "state_iteration": saved, "lost_iterations": last + 1 - saved})
    done = subprocess.run(_command(pair, killed), env=quiet_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

    assert logged_steps(killed) == list(range(total))  # every iteration once, in order
    assert read_metrics(killed / "metrics.jsonl") == read_metrics(clean / "metrics.jsonl")
    a, b = (torch_load(d / "subnet.pt")["weights"] for d in (clean, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (torch_load(d / STATE_NAME)["trainer"]["critic"] for d in (clean, killed))
    assert all(torch.equal(ca[k], cb[k]) for k in ca)
    assert not [p.name for p in killed.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")]
    print(json.dumps({"kills": record}))  # the figures for docs/reliability.md (pytest -s)
