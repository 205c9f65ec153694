"""Shared by the SIGKILL fault tests: start a CLI command, kill it once its metrics log reaches a step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest


def quiet_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def logged_steps(out: Path) -> list[int]:
    """The `step` of every line of `<out>/metrics.jsonl` (a torn last line, where a kill landed, skipped)."""
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError):
            pass  # a torn last line: the kill landed mid-write
    return steps


def run_and_kill_at(command: list[str], out: Path, step: int, timeout: float = 300.0) -> int:
    """Start `command`, SIGKILL it once `<out>/metrics.jsonl` reaches `step`; returns the last step logged."""
    proc = subprocess.Popen(command, env=quiet_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            logged = logged_steps(out)
            if logged and logged[-1] >= step:
                break
            if proc.poll() is not None:
                pytest.fail(f"{command[3]} exited with {proc.returncode} before step {step}: "
                            f"{proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.005)
        else:
            pytest.fail(f"{command[3]} did not reach step {step} within {timeout} s")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return logged_steps(out)[-1]
