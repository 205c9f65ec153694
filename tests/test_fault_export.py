"""Real fault injection on `ditnas export`: the process is SIGKILLed at seeded random points while it
lowers, writes, checks and times the programs, then the same command is rerun. Promise: a partial `.pte`
is never left under a final name (each program is written under a staging name, then its sidecar and
the program are renamed into place), and the rerun ships exactly what an uninterrupted export ships."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ditnas.manifest import read_manifest

pytest.importorskip("executorch")

from test_compress_export import make_subnet  # noqa: E402  (tests/ is on sys.path under pytest)

PROGRAMS = ("tiny_xnnpack_fp32.pte", "tiny-unrolled2_xnnpack_fp32.pte")
KILLS = 1  # ~30 s per export here; 2 seeded kills were tried once: killed at 26.3 s (host loop published) and 29.4 s (both)


def _command(subnet: Path, out: Path) -> list[str]:
    # --sampler unrolled: both programs are lowered, checked, published and timed
    return [sys.executable, "-m", "ditnas.cli", "export", "--subnet", str(subnet), "--out", str(out), "--name", "tiny",
            "--steps", "2", "--sampler", "unrolled", "--no-measure", "--set", "compress.export.timing_iters=3"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _final_programs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.glob("*.pte") if not p.name.startswith(".")} if out.exists() else {}


@pytest.mark.timeout(900)
def test_sigkill_mid_export_never_leaves_a_partial_pte_and_the_rerun_ships_the_same(tmp_path):
    subnet = make_subnet(tmp_path / "subnet", "lcha:1:2")
    clean = tmp_path / "clean"
    started = time.time()
    subprocess.run(_command(subnet, clean), env=_env(), check=True, capture_output=True)
    wall = time.time() - started
    want = _final_programs(clean)
    assert set(want) == set(PROGRAMS)

    killed = tmp_path / "killed"
    rng = random.Random(11)
    seen = []
    for at in sorted(rng.uniform(0.3, 0.95) * wall for _ in range(KILLS)):
        proc = subprocess.Popen(_command(subnet, killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(at)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        present = _final_programs(killed)
        seen.append((round(at, 1), sorted(present)))
        # whatever stands under a final name is a whole program, byte for byte what the clean export wrote
        assert all(data == want[name] for name, data in present.items()), seen
    print("kills (s after start, final programs present):", seen)

    subprocess.run(_command(subnet, killed), env=_env(), check=True, capture_output=True)
    assert _final_programs(killed) == want
    manifest = read_manifest(killed, "ditnas.export")
    assert manifest["artifact"] == read_manifest(clean, "ditnas.export")["artifact"] == PROGRAMS[1]
    assert not [p.name for p in killed.iterdir() if p.name.startswith(".")]  # the rerun left no staging file
