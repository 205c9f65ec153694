"""The latency verbs end to end on the host-torch backend with a tiny space (real measurements)."""

import json

import pandas as pd
import pytest

from cli_helpers import run

from ditnas.cli import main
from ditnas.latency_models.session import ProfilingSession
from ditnas.latency_models.stage import load_predictor

TINY = [
    "--set", "model.max_heads=2", "--set", "model.head_dim=8", "--set", "model.cond_dim=16",
    "--set", "model.cond_tokens=1", "--set", "space.depth=3", "--set", "space.stage_pattern=[0,1,0]",
    "--set", "space.skippable=[1]", "--set", "space.widths=[0.5,1.0]", "--set", "space.mlp_ratios=[2,4]",
    "--set", "space.ops=[sa,ssa]",
]


@pytest.fixture(scope="module")
def session_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("session")
    with pytest.raises(SystemExit) as exc:
        main(["profile", "--backend", "host-torch", "--out", str(out), "--models", "7", "--warmup", "1", "--iters", "3",
              "--no-progress", *TINY])
        raise SystemExit(0)
    assert exc.value.code == 0
    return out


def test_profile_writes_session_table_and_predictor(session_dir):
    session = ProfilingSession.load(session_dir)
    samples = session.samples()
    # every program measured exactly `iters` times: nothing lost, nothing duplicated
    assert (samples.groupby("key").size() == 3).all()
    assert (samples["kind"] == "model").groupby(samples["key"]).first().sum() == 7
    assert (session_dir / "table" / "table.parquet").exists() and (session_dir / "table" / "predictor.json").exists()


def test_profile_rerun_resumes_without_duplicates(session_dir, capsys):
    before = ProfilingSession.load(session_dir).samples()
    code, out, _ = run(["profile", "--backend", "host-torch", "--out", str(session_dir), "--models", "7", "--warmup", "1",
                        "--iters", "3", "--no-progress", *TINY], capsys)
    assert code == 0
    after = ProfilingSession.load(session_dir).samples()
    pd.testing.assert_frame_equal(before, after)


def test_predict_sums_measured_cells(session_dir, capsys):
    code, out, _ = run(["latency", "predict", "--arch", "max", "--table", str(session_dir)], capsys)
    assert code == 0 and "measured" in out
    table, predictor = load_predictor(session_dir)
    arch = table.space.max_arch()
    detail = predictor.predict_detail(arch)
    assert (detail["source"] == "measured").all()
    assert predictor.predict(arch, calibrated=False) == pytest.approx(detail["p50"].sum())


def test_validate_and_show(session_dir, capsys):
    code, out, _ = run(["latency", "validate", "--table", str(session_dir), "--n", "2"], capsys)
    assert code == 0 and "held-out archs: 2" in out
    code, out, _ = run(["latency", "show", "--table", str(session_dir)], capsys)
    assert code == 0 and "covers" in out and "host-torch" in out


def test_validate_with_too_few_models_says_what_to_do(session_dir, capsys):
    code, _, err = run(["latency", "validate", "--table", str(session_dir), "--n", "30"], capsys)
    assert code == 2 and "--models 36" in err


def test_remeasure_adds_whole_models_and_refits(session_dir, capsys):
    arch = "sa:0.5:2 | skip | ssa:1:4"
    code, out, err = run(["latency", "remeasure", "--session", str(session_dir), "--arch", arch, *TINY], capsys)
    assert code == 0, err
    table, _ = load_predictor(session_dir)
    assert any(arch in a for a in table.model_rows()["arch"])
    manifest = json.loads((session_dir / "table" / "table.json").read_text())
    assert manifest["n_models"] == len(table.model_rows())
    # the arch's line: the old table's prediction beside the new measurement, which the new table holds
    lines = [ln for ln in out.splitlines() if "measured" in ln and "predicted" in ln and ln.startswith("  ")]
    assert len(lines) == 1, out
    line = lines[0]
    measured = float(line.split("measured ")[1].split(" ms")[0])
    rows = table.model_rows()
    assert measured == pytest.approx(float(rows[rows["arch"].str.contains(arch, regex=False)]["p50"].iloc[0]), rel=1e-3)
    assert "predicted " in line and "%" in line
    # the old table is kept, named, and differs from the new one by the added row
    kept = session_dir / "table.v1"
    assert "previous table kept as" in out and (kept / "table.json").exists()
    old_rows = json.loads((kept / "table.json").read_text())["n_models"]
    assert old_rows == manifest["n_models"] - 1


def test_table_from_another_device_is_refused(session_dir, tmp_path, capsys):
    from ditnas.errors import DitnasError
    from ditnas.latency_models.table import LatencyTable

    table = LatencyTable.load(session_dir / "table")
    other = dict(table.identity, device_id="pixel-8")
    with pytest.raises(DitnasError, match="pixel-8"):
        table.check_compatible(other)


def test_bad_table_path(tmp_path, capsys):
    code, _, err = run(["latency", "predict", "--arch", "max", "--table", str(tmp_path)], capsys)
    assert code == 2 and str(tmp_path) in err and "Traceback" not in err


def test_profile_ingest_phone_artifacts(tmp_path, capsys):
    """Artifacts in the documented phone formats (written by the project's own writers) enter a session."""
    from ditnas.latency_models.artifacts import (
        AndroidDeviceInfo,
        XCTestMeasurement,
        device_model_name,
        ios_test_name,
        minibench_records,
        write_minibench_json,
        write_xcodebuild_log,
    )

    keys = ["block:sa:w1:r4:n64:s0", "block:ssa:w0.5:r2:n16:s1"]
    records = []
    for key, ms in zip(keys, (1.5, 0.7)):
        records += minibench_records(device_model_name(key).removesuffix("_xnnpack_fp32"), [ms] * 5, load_ms=3.0,
                                     device=AndroidDeviceInfo())
    android = write_minibench_json(tmp_path / "benchmark_results.json", records)
    code, out, err = run(["profile", "ingest", str(android), "--session", str(tmp_path / "pixel")], capsys)
    assert code == 0, err
    samples = ProfilingSession.load(tmp_path / "pixel").samples()
    assert sorted(samples["key"].unique()) == sorted(keys)
    assert samples.set_index("key").loc[keys[0], "latency_ms"] == pytest.approx(1.5)
    # the same file again adds nothing
    code, out, _ = run(["profile", "ingest", str(android), "--session", str(tmp_path / "pixel")], capsys)
    assert code == 0 and "added 0" in out

    values = [0.0021, 0.0020, 0.0022]
    log = write_xcodebuild_log(tmp_path / "xcodebuild.log", [
        XCTestMeasurement(ios_test_name("forward", device_model_name(keys[0])), values)])
    code, out, err = run(["profile", "ingest", str(log), "--session", str(tmp_path / "iphone")], capsys)
    assert code == 0, err
    got = ProfilingSession.load(tmp_path / "iphone").samples()
    assert sorted(got["latency_ms"].round(6)) == sorted(round(v * 1000, 6) for v in values)


def test_profile_ingest_unknown_format(tmp_path, capsys):
    junk = tmp_path / "notes.txt"
    junk.write_text("hello\n")
    code, _, err = run(["profile", "ingest", str(junk), "--session", str(tmp_path / "s")], capsys)
    assert code == 2 and "notes.txt" in err and "Traceback" not in err
    assert not (tmp_path / "s" / "samples.parquet").exists()
