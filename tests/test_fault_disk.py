"""A full disk and a read-only output folder, for real: small tmpfs mounts (needs root, as CI runs;
skipped otherwise). Promise: one clear error naming the file, exit 2, no temporary file left, and what
was written before stays intact and loadable."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from cli_helpers import run
from test_fault_training import TINY

from ditnas.io import torch_load

TRAIN = ["train", "--no-eval", "--no-progress", *[a for item in TINY for a in ("--set", item)]]


def _mount(size: str, *, read_only: bool = False):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    where = Path("/tmp") / f"ditnas-tmpfs-{uuid.uuid4().hex[:8]}"
    where.mkdir()
    opts = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    return where


def _umount(where: Path) -> None:
    subprocess.run(["umount", str(where)], check=False)
    where.rmdir()


def _fill(where: Path) -> None:
    with open(where / "filler", "wb", buffering=0) as handle:  # unbuffered: close() has nothing left to flush
        try:
            while True:
                handle.write(b"\0" * 65536)
        except OSError:
            pass


@pytest.fixture
def full_disk(tmp_path):
    where = _mount("4m")
    yield where
    _umount(where)


def test_disk_full_mid_training_is_one_error_and_the_last_checkpoint_survives(tmp_path, full_disk, capsys):
    out = full_disk / "run"
    code, _, err = run([*TRAIN, "--out", str(out), "--set", "train.steps=6"], capsys)  # fits: one checkpoint
    assert code == 0, err
    before = (out / "checkpoint.pt").read_bytes()
    _fill(full_disk)  # then ask for more steps: the next checkpoint cannot be written
    code, _, err = run([*TRAIN, "--out", str(out), "--set", "train.steps=48"], capsys)
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert "cannot write" in err and str(out) in err and "No space left on device" in err
    assert (out / "checkpoint.pt").read_bytes() == before  # the last good checkpoint is untouched
    assert int(torch_load(out / "checkpoint.pt")["step"]) == 6
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_read_only_output_folder_is_one_error(tmp_path, capsys):
    where = _mount("1m", read_only=True)
    try:
        code, _, err = run([*TRAIN, "--out", str(where / "run")], capsys)
        assert code == 2 and "Traceback" not in err and "Read-only file system" in err, err
    finally:
        _umount(where)


def test_a_refused_torch_save_is_reported_as_a_write_error(tmp_path):
    from ditnas.errors import DitnasError
    from ditnas.io import atomic_torch_save

    where = _mount("64k")
    try:
        with pytest.raises(DitnasError, match=r"cannot write .*big\.pt \(.*\); free space"):
            atomic_torch_save(where / "big.pt", {"w": torch.zeros(1 << 16)})
        assert list(where.iterdir()) == []  # the temporary file is gone too
    finally:
        _umount(where)


def test_disk_full_mid_distillation_is_one_error_and_the_last_state_survives(tmp_path, full_disk, capsys):
    from test_fault_distill import SETTINGS

    from ditnas.compress.distill import STATE_NAME
    from ditnas.search.threads import torch_threads
    from test_compress_dmd import build_pair

    with torch_threads(1):
        pair = build_pair(tmp_path / "pair")
    out = full_disk / "distill"
    base = ["distill", "--teacher", str(pair["teacher"]), "--student", str(pair["student"]), "--out", str(out),
            "--method", "kdmd", "--no-progress", *[a for item in SETTINGS for a in ("--set", item)]]
    code, _, err = run([*base, "--steps", "3"], capsys)  # fits: a state at 3 generator updates
    assert code == 0, err
    before = (out / STATE_NAME).read_bytes()
    _fill(full_disk)
    code, _, err = run([*base, "--steps", "12"], capsys)  # the next state cannot be written
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert "cannot write" in err and str(out) in err and "No space left on device" in err
    assert (out / STATE_NAME).read_bytes() == before  # the last good state is untouched and still loads
    assert int(torch_load(out / STATE_NAME)["iteration"]) == 6
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
