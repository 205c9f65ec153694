"""The stage-4 verbs end to end on a tiny supernet trained for real: `ditnas distill --method kd`,
`ditnas prune`, `ditnas export`, `ditnas generate`, each output loadable by the next, and each verb's
bad input one clear error with exit status 2 and nothing written."""

from __future__ import annotations

import pytest
from cli_helpers import run
from test_compress_kd import one_thread, shared_env  # noqa: F401 -- fixtures shared with the KD tests

from ditnas.manifest import read_manifest
from ditnas.supernet.extract import load_subnet


@pytest.fixture(scope="module")
def env(tmp_path_factory, one_thread):  # noqa: F811
    return shared_env(tmp_path_factory)


def test_distill_kd_then_prune_then_export_then_generate(env, tmp_path, capsys):
    kd_out, pruned, shipped = tmp_path / "kd", tmp_path / "pruned", tmp_path / "export"
    code, out, err = run(["distill", "--teacher", str(env["teacher"]), "--student", str(env["student"]), "--out",
                          str(kd_out), "--method", "kd", "--steps", "3", "--no-progress"], capsys)
    assert code == 0, err
    assert read_manifest(kd_out)["kind"] == "ditnas.kd" and load_subnet(kd_out).arch == load_subnet(env["student"]).arch

    before = load_subnet(kd_out).num_params()
    budget_mb = before * 4 / 2**20 * 0.8  # 80% of the fp32 parameter memory
    code, out, err = run(["prune", "--subnet", str(kd_out), "--out", str(pruned), "--memory-mb", f"{budget_mb:.6f}",
                          "--set", "compress.prune.recover_steps=0", "--set", "compress.prune.final_steps=0",
                          "--set", "compress.prune.calib_items=16"], capsys)
    assert code == 0, err
    after = load_subnet(pruned).num_params()
    assert after * 4 / 2**20 <= budget_mb < before * 4 / 2**20

    code, out, err = run(["export", "--subnet", str(pruned), "--out", str(shipped), "--steps", "2", "--name", "tiny",
                          "--no-measure"], capsys)
    assert code == 0, err
    pte = shipped / "tiny_xnnpack_fp32.pte"
    assert pte.is_file() and "delegated share" in out and "parity vs eager" in out
    assert "shipped sampler: host-loop (sampler fastest needs timing" in out  # --no-measure: nothing to compare

    code, out, err = run(["generate", "--pte", str(pte), "--label", "3", "--n", "2", "--out", str(tmp_path / "g.png")], capsys)
    assert code == 0, err
    assert (tmp_path / "g.png").is_file() and "measured:" in out and "2 steps" in out


def test_bad_inputs_are_one_clear_error(env, tmp_path, capsys):
    code, _, err = run(["generate", "--pte", str(tmp_path / "nope.pte")], capsys)
    assert code == 2 and "does not exist" in err and "Traceback" not in err
    fake = tmp_path / "fake.pte"
    fake.write_bytes(b"\0" * 64)
    code, _, err = run(["generate", "--pte", str(fake)], capsys)
    assert code == 2 and "lowered outside ditnas" in err
    code, _, err = run(["distill", "--teacher", str(env["teacher"]), "--student", str(env["student"]), "--out",
                        str(tmp_path / "d"), "--method", "dmd"], capsys)
    assert code == 2 and "--method (compress.distill.method)" in err and "kdmd" in err
    code, _, err = run(["export", "--subnet", str(env["student"]), "--out", str(tmp_path / "e"), "--backend", "tflite"], capsys)
    assert code == 2 and "--backend (compress.export.backend)" in err
    code, _, err = run(["export", "--subnet", str(env["student"]), "--out", str(tmp_path / "e"), "--sampler", "loop"], capsys)
    assert code == 2 and "--sampler (compress.export.sampler): unknown 'loop'" in err
    assert not (tmp_path / "e").exists() and not (tmp_path / "d").exists()
    code, _, err = run(["prune", "--subnet", str(env["student"]), "--out", str(tmp_path / "p"), "--units", "rows"], capsys)
    assert code == 2 and "--units (compress.prune.units)" in err


def test_export_ships_the_time_grid_a_student_was_distilled_on(tmp_path):
    from ditnas.compress.export import student_sampler
    from ditnas.manifest import write_manifest
    from ditnas.config import ExportConfig

    (tmp_path / "subnet.pt").write_bytes(b"x")
    write_manifest(tmp_path, "ditnas.distill", inputs={}, config={}, metrics={}, files=["subnet.pt"],
                   extra={"sampler": {"steps": 4, "shift": 3.0, "cfg_scale": 1.0}})
    adopted = student_sampler(ExportConfig(steps=ExportConfig().steps), tmp_path)
    assert (adopted.steps, adopted.time_shift) == (4, 3.0)
    kept = student_sampler(ExportConfig(steps=2, time_shift=1.5), tmp_path)  # the user's own choice wins
    assert (kept.steps, kept.time_shift) == (2, 1.5)
    (tmp_path / "extracted").mkdir()  # an extracted subnet records no sampler: the config as given
    assert student_sampler(ExportConfig(), tmp_path / "extracted") == ExportConfig()
