"""Loading files someone sent you must not run their code, and a storage password must never be
echoed. A real pickle payload (its `__reduce__` writes a marker file when unpickled) is put in every
kind of torch file ditnas loads."""

from __future__ import annotations

import ast
import pathlib
from pathlib import Path

import pytest
import torch

from cli_helpers import run

from ditnas.errors import DitnasError

ROOT = Path(__file__).resolve().parent.parent


class Payload:
    """Unpickling this calls Path.write_text(marker, 'pwned'): code execution if it ever runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (self.marker, "pwned"))


def _evil(tmp_path: Path, name: str, wrapper) -> tuple[Path, Path]:
    marker = tmp_path / f"{name}.pwned"
    path = tmp_path / name
    torch.save(wrapper(Payload(marker)), path)
    # the payload really is live: an unsafe load runs it
    probe = tmp_path / "probe"
    torch.save(Payload(probe), tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert probe.read_text() == "pwned"
    return path, marker


def test_checkpoint_with_a_pickle_payload_never_runs(tmp_path, capsys):
    ckpt, marker = _evil(tmp_path, "checkpoint.pt", lambda p: {"format": 1, "config": {}, "space": p, "step": 0,
                                                                "model": {}, "ema": {}})
    for argv in (["sample", "--checkpoint", str(ckpt), "--out", str(tmp_path / "s.png")],
                 ["extract", "--checkpoint", str(ckpt), "--arch", "max", "--out", str(tmp_path / "x")],
                 ["search", "--checkpoint", str(ckpt), "--table", str(tmp_path), "--budget-ms", "10",
                  "--out", str(tmp_path / "search"), "--no-progress"]):
        code, _, err = run(argv, capsys)
        assert code == 2 and "Traceback" not in err and str(ckpt) in err, (argv, err)
        assert not marker.exists(), argv


def test_subnet_and_judge_files_with_a_payload_never_run(tmp_path):
    from ditnas.judge import Judge
    from ditnas.supernet.extract import load_subnet

    sub, marker = _evil(tmp_path, "subnet.pt", lambda p: {"arch": "max", "config": {}, "space": {}, "weights": p})
    with pytest.raises(DitnasError, match="subnet file"):
        load_subnet(sub)
    judge, judge_marker = _evil(tmp_path, "judge.pt", lambda p: {"header": p, "state_dict": {}})
    with pytest.raises(DitnasError, match="judge file"):
        Judge.load(judge)
    assert not marker.exists() and not judge_marker.exists()


def test_no_unsafe_loader_anywhere_in_the_package():
    """Every torch.load passes weights_only=True, YAML is only safe_load-ed, no pickle/np allow_pickle."""
    problems = []
    for path in sorted((ROOT / "ditnas").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                if any(n in ("pickle", "cPickle", "dill", "cloudpickle", "shelve") for n in names):
                    problems.append(f"{path.name}:{node.lineno} imports a pickle module")
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = getattr(node.func.value, "id", None)
            kwargs = {k.arg: k.value for k in node.keywords}
            if owner == "torch" and node.func.attr == "load":
                flag = kwargs.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{path.name}:{node.lineno} torch.load without weights_only=True")
            if owner == "yaml" and node.func.attr in ("load", "unsafe_load", "full_load", "load_all"):
                problems.append(f"{path.name}:{node.lineno} yaml.{node.func.attr}")
            if owner == "np" and node.func.attr == "load":
                flag = kwargs.get("allow_pickle")
                if not (isinstance(flag, ast.Constant) and flag.value is False):
                    problems.append(f"{path.name}:{node.lineno} np.load without allow_pickle=False")
    assert problems == []


def test_a_storage_password_is_never_echoed(tmp_path, capsys):
    url = "postgresql://ditnas:s3cr3t-Pa55@127.0.0.1:1/none"
    code, out, err = run(["search", "--checkpoint", str(tmp_path / "missing.pt"), "--table", str(tmp_path),
                          "--budget-ms", "10", "--storage", url, "--out", str(tmp_path / "s"), "--no-progress"], capsys)
    assert code == 2 and "storage" in err
    written = "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file())
    assert "s3cr3t" not in out + err + written
    from ditnas.search.optuna_search import open_storage

    with pytest.raises(DitnasError) as exc:
        open_storage(url, tmp_path)
    assert "s3cr3t" not in str(exc.value) and "ditnas:***@127.0.0.1:1" in str(exc.value)
