"""End-to-end tests of the CLI: real train -> extract -> sample, and one clear error per bad input."""

import json
import subprocess
import sys

import pytest
import torch

from cli_helpers import run

from ditnas.cli import main

TINY = [
    "--set", "model.max_heads=2", "--set", "model.head_dim=8", "--set", "model.cond_dim=16",
    "--set", "model.cond_tokens=1", "--set", "space.depth=3", "--set", "space.stage_pattern=[0,1,0]",
    "--set", "space.skippable=[1]", "--set", "space.widths=[0.5,1.0]", "--set", "space.mlp_ratios=[2,4]",
    "--set", "space.ops=[sa,lcha,ssa]", "--set", "train.batch_size=8", "--set", "train.steps=4",
    "--set", "train.checkpoint_every=2", "--set", "sample.steps=2",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", str(out), "--no-eval", "--no-progress", *TINY])
        raise SystemExit(0)
    assert exc.value.code == 0
    return out


def test_train_writes_its_artifacts(trained):
    manifest = json.loads((trained / "run.json").read_text())
    assert manifest["step"] == 4 and manifest["finished"]
    assert manifest["val_flow_loss_ema"]["max"] > 0
    assert (trained / "samples_max.png").stat().st_size > 100
    assert len((trained / "metrics.jsonl").read_text().splitlines()) == 4


def test_extract_and_sample(trained, tmp_path, capsys):
    code, out, _ = run(["extract", "--checkpoint", str(trained / "checkpoint.pt"), "--arch", "sa:0.5:2 | skip | ssa:1:4",
                        "--out", str(tmp_path / "sub")], capsys)
    assert code == 0, out
    manifest = json.loads((tmp_path / "sub" / "manifest.json").read_text())
    assert manifest["parity_max_abs_error"] <= 1e-5
    assert manifest["params"] < manifest["supernet_params"]
    from ditnas.supernet.extract import load_subnet
    from ditnas.supernet.train import load_supernet

    sub = load_subnet(tmp_path / "sub")
    model, _, _ = load_supernet(trained / "checkpoint.pt")
    x, t, y = torch.randn(2, 1, 1, 16, 16), torch.tensor([0.3, 0.8]), torch.tensor([1, 10])
    assert (sub(x, t, y) - model.run(sub.arch, x, t, y)).abs().max() <= 1e-5
    code, out, _ = run(["sample", "--checkpoint", str(tmp_path / "sub"), "--out", str(tmp_path / "g.png"),
                        "--steps", "2", "--per-class", "2"], capsys)
    assert code == 0 and (tmp_path / "g.png").exists()


def test_arch_from_file(trained, tmp_path, capsys):
    arch_file = tmp_path / "arch.txt"
    arch_file.write_text("# chosen by hand\nlcha:1:2 | sa:1:4 | ssa:0.5:2\n")
    code, out, err = run(["extract", "--checkpoint", str(trained / "checkpoint.pt"), "--arch", str(arch_file),
                          "--out", str(tmp_path / "sub")], capsys)
    assert code == 0, err
    assert "lcha:1:2 | sa:1:4 | ssa:0.5:2" in out


@pytest.mark.parametrize(
    "arch, fragment",
    [
        ("sa:1:4 | foo:1:4 | sa", "unknown op 'foo'"),
        ("sa:1:4 | sa sa", "ends at half resolution"),
        ("sa:0.3:4 | sa | sa", "width 0.3 not in the space"),
        ("sa sa | sa | sa sa", "5 slots but the supernet has 3"),
    ],
)
def test_bad_arch_is_one_line_and_writes_nothing(trained, tmp_path, capsys, arch, fragment):
    code, _, err = run(["extract", "--checkpoint", str(trained / "checkpoint.pt"), "--arch", arch,
                        "--out", str(tmp_path / "sub")], capsys)
    assert code == 2
    assert fragment in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "sub").exists()


def test_bad_checkpoints(trained, tmp_path, capsys):
    missing = tmp_path / "none.pt"
    code, _, err = run(["extract", "--checkpoint", str(missing), "--arch", "max", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "does not exist" in err
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes((trained / "checkpoint.pt").read_bytes()[:4096])
    code, _, err = run(["extract", "--checkpoint", str(truncated), "--arch", "max", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "truncated" in err
    state = torch.load(trained / "checkpoint.pt", weights_only=True)
    state["ema"]["final.weight"] = torch.zeros(4, 3)
    torch.save(state, tmp_path / "wrong.pt")
    code, _, err = run(["extract", "--checkpoint", str(tmp_path / "wrong.pt"), "--arch", "max", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "final.weight has shape (4, 3)" in err
    assert not (tmp_path / "o").exists()


def test_train_refuses_a_different_config_on_an_existing_run(trained, capsys):
    before = (trained / "checkpoint.pt").read_bytes()
    code, _, err = run(["train", "--out", str(trained), "--no-eval", "--no-progress", *TINY, "--set", "model.head_dim=4"], capsys)
    assert code == 2 and "another model/space config" in err
    assert (trained / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize(
    "setup, fragment",
    [
        (lambda d: None, "has no readable images"),
        (lambda d: (d / "bad.png").write_bytes(b"not a png"), "bad.png"),
    ],
)
def test_bad_image_folder(tmp_path, capsys, setup, fragment):
    folder = tmp_path / "imgs"
    folder.mkdir()
    setup(folder)
    code, _, err = run(["train", "--out", str(tmp_path / "o"), "--no-eval", "--no-progress", *TINY,
                        "--set", f"data.source={folder}"], capsys)
    assert code == 2 and fragment in err and "Traceback" not in err


def test_bad_config_values(tmp_path, capsys):
    code, _, err = run(["train", "--out", str(tmp_path / "o"), "--set", "train.stepz=3"], capsys)
    assert code == 2 and "unknown field(s) ['stepz']" in err
    code, _, err = run(["train", "--out", str(tmp_path / "o"), "--set", "train.steps=many"], capsys)
    assert code == 2 and "config.train.steps: expected int" in err
    code, _, err = run(["train", "--out", str(tmp_path / "o"), "--config", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2 and "does not exist" in err


def test_console_script_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ditnas.cli", "extract", "--checkpoint", str(tmp_path / "x.pt"),
                           "--arch", "max", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
