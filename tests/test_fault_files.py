"""Damaged files, for real: bytes flipped on disk in an extracted subnet and in a training checkpoint
(tables: tests/test_latency_table.py; .pte files: tests/test_compress_export.py).
Promise: a clear error naming the file and what to do, never a silently different model."""

from __future__ import annotations

import hashlib
import json
import random
import shutil

import pytest
from test_cli import TINY, trained  # noqa: F401  (module-scoped tiny trained run)

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


def test_bit_flipped_training_checkpoint_is_refused_by_every_reader(trained, tmp_path, capsys):  # noqa: F811
    """Every torch file ditnas writes carries a `.sha256` digest beside it; without it a flip in tensor data
    loads silently (torch's reader checks no content)."""
    from ditnas.io import digest_path
    from ditnas.supernet.train import load_supernet

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    ckpt = run_dir / "checkpoint.pt"
    assert digest_path(ckpt).is_file()
    good = ckpt.read_bytes()
    load_supernet(ckpt)  # intact: loads
    rng = random.Random(1)
    for _ in range(20):
        ckpt.write_bytes(good)
        at = _flip(ckpt, rng)
        with pytest.raises(DitnasError) as exc:
            load_supernet(ckpt)
        assert str(ckpt) in str(exc.value) and "\n" not in str(exc.value), at
    # the CLI readers: extract, and train resuming into the folder; nothing is written, the file is kept
    code, _, err = run(["extract", "--checkpoint", str(ckpt), "--arch", "max", "--out", str(tmp_path / "sub")], capsys)
    assert code == 2 and "does not match the sha256" in err and not (tmp_path / "sub" / "subnet.pt").exists(), err
    damaged = ckpt.read_bytes()
    code, _, err = run(["train", "--out", str(run_dir), "--no-eval", "--no-progress", *TINY], capsys)
    assert code == 2 and str(ckpt) in err and err.count("\n") == 1, err
    assert ckpt.read_bytes() == damaged  # never overwritten
    # a checkpoint saved again after a kill between its digest and its rename: the old file still loads
    ckpt.write_bytes(good)
    digest_path(ckpt).write_text(json.dumps({"sha256": "0" * 64, "previous": hashlib.sha256(good).hexdigest()}))
    load_supernet(ckpt)


def test_damaged_study_journal_is_refused_naming_the_file(tmp_path):
    """A journal file (Optuna's JSON-lines log) with bytes flipped: opening it is refused with one error naming
    the file, or it replays. Only a flip that keeps every line valid JSON can replay (a changed digit):
    an append-only log carries no checksum, so that case is not detected (docs/reliability.md says so)."""
    import optuna

    from ditnas.search.optuna_search import open_storage

    journal = tmp_path / "study.log"
    storage, _ = open_storage(str(journal), tmp_path)
    study = optuna.create_study(storage=storage, study_name="s", directions=["minimize", "minimize"])
    for i in range(8):
        study.enqueue_trial({"x": i})
        study.optimize(lambda t: (t.suggest_int("x", 0, 10), 10 - t.params["x"]), n_trials=1)
    good = journal.read_bytes()
    rng, refused, replayed = random.Random(2), 0, 0
    for _ in range(60):
        data = bytearray(good)
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        journal.write_bytes(bytes(data))
        try:
            storage, _ = open_storage(str(journal), tmp_path)
        except DitnasError as exc:
            assert str(journal) in str(exc) and "\n" not in str(exc) and "restore it from a copy" in str(exc)
            assert journal.read_bytes() == bytes(data)  # left as it is
            refused += 1
            continue
        replayed += 1
    assert refused >= 30, (refused, replayed)
    print(json.dumps({"journal_flips": 60, "refused": refused, "replayed": replayed}))
