"""Damaged files, for real: bytes flipped on disk in an extracted subnet and in a latency table.
Promise: a clear error naming the file and what to do, never a silently different model or table."""

from __future__ import annotations

import random
import shutil

import pytest
from test_cli import trained  # noqa: F401  (module-scoped tiny trained run)

from cli_helpers import run

from ditnas.errors import DitnasError
from ditnas.supernet.extract import load_subnet


def _flip(path, rng: random.Random) -> int:
    data = bytearray(path.read_bytes())
    at = rng.randrange(len(data))
    data[at] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return at


def test_bit_flipped_subnet_is_refused_naming_the_file(trained, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "sub"
    code, _, err = run(["extract", "--checkpoint", str(trained / "checkpoint.pt"), "--arch", "max", "--out", str(out)], capsys)
    assert code == 0, err
    good = (out / "subnet.pt").read_bytes()
    load_subnet(out)  # intact: loads
    rng = random.Random(0)
    for _ in range(20):  # 20 random single-bit flips anywhere in the file
        (out / "subnet.pt").write_bytes(good)
        at = _flip(out / "subnet.pt", rng)
        with pytest.raises(DitnasError) as exc:
            load_subnet(out)
        assert str(out / "subnet.pt") in str(exc.value) and "ditnas extract" in str(exc.value), at
    code, _, err = run(["sample", "--checkpoint", str(out), "--out", str(tmp_path / "s.png")], capsys)
    assert code == 2 and "does not match the sha256" in err and not (tmp_path / "s.png").exists()


def test_truncated_subnet_is_refused(trained, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "sub"
    run(["extract", "--checkpoint", str(trained / "checkpoint.pt"), "--arch", "min", "--out", str(out)], capsys)
    data = (out / "subnet.pt").read_bytes()
    (out / "subnet.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(DitnasError, match="subnet file .* does not match the sha256"):
        load_subnet(out)
    shutil.copy(out / "subnet.pt", tmp_path / "alone.pt")  # without its manifest: torch's own check
    with pytest.raises(DitnasError, match="unreadable or truncated"):
        load_subnet(tmp_path / "alone.pt")
