"""Phone backends (android-adb, ios, coreml) and `ingest`, without a phone or a Mac.

Artifacts ingested here are produced by this project (a real ETDump from the host XNNPACK runtime,
the flatbuffer executor_runner writes on a phone; minibench JSON, xcodebuild logs and Core ML
benchmark JSON from the writers in each backend's file) and, in the "real formats" section, taken
from the upstream projects (tests/fixtures/phone/, each test names its source). adb is a shell script that records its argv, so the
exact command sequence is asserted. Cost: 3 XNNPACK lowerings and 1 coremltools conversion.
"""

from __future__ import annotations

import json
import os
import platform
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ditnas.arch import SearchSpace
from ditnas.config import ModelConfig
from ditnas.errors import DitnasError
from ditnas.latency_models import (
    ProfilingSession,
    cells_for_space,
    get_backend,
    programs_for_cells,
)
from ditnas.latency_models.artifacts import (
    ArtifactProbe,
    ParsedArtifact,
    cell_from_name,
    device_model_name,
    parsed_artifact,
)
from ditnas.latency_models.backends import (
    ArtifactFormat,
    Backend,
    Prepared,
    backend_names,
    register_backend,
    unregister_backend,
)
from ditnas.latency_models.backends.android_adb import (
    AndroidDeviceInfo,
    minibench_records,
    parse_minibench_json,
    write_minibench_json,
)
from ditnas.latency_models.backends.coreml import (
    CoreMLBenchmarkResult,
    coreml_benchmark_payload,
    measurement,
    write_coreml_benchmark_json,
)
from ditnas.latency_models.backends.executorch_xnnpack import (
    ExecuTorchXnnpackBackend,
    parse_etdump,
    write_host_etdump,
)
from ditnas.latency_models.backends.ios_xcodebuild import (
    XCTestMeasurement,
    ios_test_name,
    parse_xcodebuild_log,
    write_xcodebuild_log,
    xcodebuild_log_text,
)
from ditnas.latency_models.ingest import (
    detect_format,
    ingest,
    read_artifact,
    session_for_artifacts,
)
from ditnas.supernet.model import ElasticDiT

pytest.importorskip("executorch")

CFG = ModelConfig(max_heads=2, head_dim=8, cond_dim=16, cond_tokens=1)
WARMUP, ITERS = 2, 5
SA_HALF, SA_FULL = "block:sa:w0.5:r2:n64:s0", "block:sa:w1:r2:n64:s0"
SERIAL = "FAKE123"

FAKE_ADB = r"""#!/bin/sh
# fake adb: one line per call, arguments separated by \037; "pulls" a real ETDump made on the host
for a in "$@"; do printf '%s\037' "$a"; done >> "$FAKE_ADB_LOG"
printf '\n' >> "$FAKE_ADB_LOG"
if [ "$1" = "-s" ]; then shift 2; fi
case "$1" in
  devices) echo "List of devices attached"
           if [ -z "${FAKE_ADB_NO_DEVICE:-}" ]; then printf 'FAKE123\tdevice\n'; fi ;;
  push) [ -f "$2" ] || exit 1 ;;
  pull) cp "$FAKE_ETDUMP" "$3" ;;
  shell)
    case "$2" in
      getprop) printf '[ro.product.brand]: [google]\n[ro.product.model]: [Pixel 8]\n'
               printf '[ro.build.version.release]: [15]\n[ro.product.cpu.abi]: [arm64-v8a]\n[ro.soc.model]: [Tensor G3]\n' ;;
      run-as) if [ "$4" = "cat" ]; then
                if [ -n "${FAKE_MINIBENCH_DIR:-}" ]; then cat "$FAKE_MINIBENCH_DIR/$(cat "$FAKE_ADB_LOG.model")"; else cat "$FAKE_MINIBENCH"; fi
              fi ;;
      am) prev=""; for a in "$@"; do [ "$prev" = "model_dir" ] && basename "$a" > "$FAKE_ADB_LOG.model"; prev="$a"; done
          echo "Status: ok" ;;
    esac ;;
  *) exit 1 ;;
esac
"""


@pytest.fixture(scope="module")
def programs():
    torch.manual_seed(0)
    space = SearchSpace(depth=1, ops=("sa",), widths=(0.5, 1.0), mlp_ratios=(2.0,), stage_pattern=(0,))
    net = ElasticDiT(space, CFG).eval()
    progs = programs_for_cells(net, cells_for_space(space, kinds=("block",)))
    return {p.key(): p for p in progs}


@pytest.fixture()
def fake_adb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fake `adb` first on PATH; returns a reader of the calls it received."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    adb = bindir / "adb"
    adb.write_text(FAKE_ADB)
    adb.chmod(adb.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "adb_calls.log"
    log.write_text("")
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_ADB_LOG", str(log))
    monkeypatch.delenv("FAKE_ADB_NO_DEVICE", raising=False)

    def calls() -> list[list[str]]:
        return [line.split("\x1f")[:-1] for line in log.read_text().splitlines()]

    return calls


@pytest.fixture(scope="module")
def android(programs, tmp_path_factory):
    """android-adb prepare of one SA block (lowering 1) and a real ETDump of warm-up + iterations."""
    work = tmp_path_factory.mktemp("android")
    runner = work / "executor_runner"
    runner.write_bytes(b"\x7fELF fake runner")  # only pushed, never executed
    backend = get_backend("android-adb", runner=runner)
    prepared = backend.prepare([programs[SA_HALF]], work / "artifacts", warmup=WARMUP, iters=ITERS)
    etdump = write_host_etdump(prepared[0], WARMUP + ITERS, work / "host.etdp")
    return backend, prepared, etdump, work


def _open_android_session(root: Path) -> ProfilingSession:
    return ProfilingSession.open(root, get_backend("android-adb"), warmup=WARMUP, iters=ITERS)


# ----------------------------------------------------------------------------------------------
# names
# ----------------------------------------------------------------------------------------------
def test_device_names_round_trip_every_kind() -> None:
    for key in (SA_HALF, "block:lcha:w0.25:r2.5:n16:s1", "patch_embed:w1:n64:s0", "up:w0.5:n16:s1", "model:0123456789abcdef:n64"):
        name = device_model_name(key)
        assert name.replace("_", "").isalnum()  # a \w+ word: minibench's regex splits it
        for form in (name, name + ".pte", key, ios_test_name("forward", name + ".pte").split("_", 2)[2]):
            assert cell_from_name(form)["key"] == key, form
    assert cell_from_name("resnet50_xnnpack_fp32") is None
    assert ios_test_name("forward", "block_sa_w0p5_r2_n64_s0_xnnpack_fp32.pte", ios_version="18.1", machine="iPhone17,2") == (
        "test_forward_block_sa_w0p5_r2_n64_s0_xnnpack_fp32_pte_iOS_18_1_iPhone17_2"
    )


# ----------------------------------------------------------------------------------------------
# android-adb
# ----------------------------------------------------------------------------------------------
def test_android_prepare_reuses_xnnpack_lowering_and_writes_plan(android) -> None:
    _, prepared, _, work = android
    item = prepared[0]
    art = work / "artifacts"
    assert item.artifacts["pte"].read_bytes()[4:8] == b"ET12" and item.artifacts["etrecord"].is_file()
    assert item.report["delegated_subgraphs"] >= 1 and item.report["parity_max_abs_err"] <= item.report["parity_tolerance"]
    plan = json.loads((art / "android_plan.json").read_text())
    assert plan["warmup"] == WARMUP and plan["iters"] == ITERS
    (entry,) = plan["programs"]
    assert entry["key"] == SA_HALF and entry["remote_pte"] == "/data/local/tmp/ditnas/block_sa_w0p5_r2_n64_s0_xnnpack_fp32.pte"
    script = (art / "run_on_device.sh").read_text()
    assert os.access(art / "run_on_device.sh", os.X_OK)
    assert (
        "$ADB shell /data/local/tmp/ditnas/executor_runner --model_path /data/local/tmp/ditnas/block_sa_w0p5_r2_n64_s0_xnnpack_fp32.pte "
        f"--num_executions {WARMUP + ITERS} --cpu_threads 1 --etdump_path /data/local/tmp/ditnas/block_sa_w0p5_r2_n64_s0_xnnpack_fp32.etdp"
    ) in script


def test_android_measure_runs_the_exact_adb_sequence(android, fake_adb, monkeypatch) -> None:
    _, prepared, etdump, work = android
    monkeypatch.setenv("FAKE_ETDUMP", str(etdump))
    backend = get_backend("android-adb", runner=work / "executor_runner")
    rows = backend.measure(prepared, WARMUP, ITERS)
    pte, remote = prepared[0].artifacts["pte"], "/data/local/tmp/ditnas/block_sa_w0p5_r2_n64_s0_xnnpack_fp32"
    local = pte.parent / "android" / "block_sa_w0p5_r2_n64_s0_xnnpack_fp32.etdp"
    s = ["-s", SERIAL]
    assert fake_adb() == [
        ["devices"],
        [*s, "shell", "getprop"],
        [*s, "shell", "mkdir", "-p", "/data/local/tmp/ditnas"],
        [*s, "push", str(work / "executor_runner"), "/data/local/tmp/ditnas/executor_runner"],
        [*s, "shell", "chmod", "755", "/data/local/tmp/ditnas/executor_runner"],
        [*s, "push", str(pte), f"{remote}.pte"],
        [*s, "shell", "/data/local/tmp/ditnas/executor_runner", "--model_path", f"{remote}.pte",
         "--num_executions", str(WARMUP + ITERS), "--cpu_threads", "1", "--etdump_path", f"{remote}.etdp"],
        [*s, "pull", f"{remote}.etdp", str(local)],
    ]  # fmt: skip
    # the samples are the dump's Method::execute runs after the warm-up ones, in order
    want = [r["latency_ms"] for r in sorted(parse_etdump(etdump), key=lambda r: r["run"]) if r["event"] == "Method::execute"]
    assert len(want) == WARMUP + ITERS
    assert [r["latency_ms"] for r in rows] == want[WARMUP:]
    assert [r["iteration"] for r in rows] == list(range(ITERS)) and {r["key"] for r in rows} == {SA_HALF}
    side = json.loads(local.with_name(local.stem + ".run.json").read_text())
    assert side["warmup"] == WARMUP and side["device"]["device_model"] == "Pixel 8" and side["device"]["device_id"] == SERIAL

    # the pulled dump (with its sidecar) ingests into a session of that phone: the same samples
    session = _open_android_session(work / "session")
    report = ingest([local], session)
    assert report.added == {SA_HALF: ITERS}
    got = session.samples()
    assert got["latency_ms"].tolist() == want[WARMUP:] and set(got["device"]) == {SERIAL}
    assert got["width"].tolist() == [0.5] * ITERS and set(got["backend"]) == {"android-adb"}


def test_run_on_device_script_is_the_same_sequence(android, fake_adb, monkeypatch) -> None:
    _, _, etdump, work = android
    monkeypatch.setenv("FAKE_ETDUMP", str(etdump))
    art = work / "artifacts"
    subprocess.run(["sh", str(art / "run_on_device.sh")], check=True, env={**os.environ, "SERIAL": SERIAL})
    calls = fake_adb()
    assert [c[2] for c in calls] == ["shell", "push", "shell", "push", "shell", "pull"]
    assert calls[4][:4] == ["-s", SERIAL, "shell", "/data/local/tmp/ditnas/executor_runner"]
    assert calls[4][4:] == ["--model_path", "/data/local/tmp/ditnas/block_sa_w0p5_r2_n64_s0_xnnpack_fp32.pte",
                            "--num_executions", str(WARMUP + ITERS), "--cpu_threads", "1",
                            "--etdump_path", "/data/local/tmp/ditnas/block_sa_w0p5_r2_n64_s0_xnnpack_fp32.etdp"]  # fmt: skip
    pulled = art / "android" / "block_sa_w0p5_r2_n64_s0_xnnpack_fp32.etdp"
    assert pulled.read_bytes() == etdump.read_bytes()
    side = json.loads(pulled.with_name(pulled.stem + ".run.json").read_text())
    assert side == {"key": SA_HALF, "warmup": WARMUP, "iters": ITERS, "threads": 1, "backend": "android-adb"}


def test_session_run_with_android_backend(programs, android, fake_adb, monkeypatch, tmp_path) -> None:
    """ProfilingSession.run drives prepare (lowering 3) + measure over the fake adb and stores the samples."""
    _, _, etdump, work = android
    monkeypatch.setenv("FAKE_ETDUMP", str(etdump))
    backend = get_backend("android-adb", runner=work / "executor_runner")
    session = ProfilingSession.open(tmp_path / "session", backend, warmup=WARMUP, iters=ITERS)
    assert session.device["device_id"] == SERIAL and session.device["device_model"] == "Pixel 8"
    assert session.device["os"] == "Android 15" and session.device["soc"] == "Tensor G3"
    assert session.run([programs[SA_HALF]], backend) == [SA_HALF]
    df = session.samples()
    assert len(df) == ITERS and set(df["key"]) == {SA_HALF} and (df["latency_ms"] > 0).all()
    assert (session.artifacts_dir / "run_on_device.sh").is_file()
    assert (session.artifacts_dir / "android" / "block_sa_w0p5_r2_n64_s0_xnnpack_fp32.etdp").is_file()


def test_minibench_run_parse_and_ingest(android, fake_adb, monkeypatch, tmp_path) -> None:
    _, prepared, _, _ = android
    dev = AndroidDeviceInfo(device="google", arch="Pixel 8", os="Android 15")
    lat = [4.0, 4.2, 3.9, 4.1, 9.0]
    records = minibench_records(device_model_name(SA_FULL).removesuffix("_xnnpack_fp32"), lat, load_ms=12.5, device=dev)
    records += minibench_records("resnet50", [30.0], load_ms=80.0, device=dev)  # not ours: reported, not ingested
    source = write_minibench_json(tmp_path / "device_results.json", records)
    monkeypatch.setenv("FAKE_MINIBENCH", str(source))
    out = get_backend("android-adb").run_minibench(prepared, WARMUP, ITERS, tmp_path / "benchmark_results.json")
    name, folder = "block_sa_w0p5_r2_n64_s0_xnnpack_fp32", "/data/local/tmp/minibench/block_sa_w0p5_r2_n64_s0_xnnpack_fp32"
    assert [c[2:] for c in fake_adb()[1:]] == [
        ["shell", "mkdir", "-p", folder],
        ["push", str(prepared[0].artifacts["pte"]), f"{folder}/{name}.pte"],
        ["shell", "run-as", "org.pytorch.minibench", "rm", "-f", "files/benchmark_results.json"],
        ["shell", "am", "start", "-W", "-S", "-n", "org.pytorch.minibench/org.pytorch.minibench.BenchmarkActivity",
         "--es", "model_dir", folder, "--ei", "num_iter", str(ITERS), "--ei", "num_warm_up_iter", str(WARMUP)],
        ["shell", "run-as", "org.pytorch.minibench", "cat", "files/benchmark_results.json"],
    ]  # fmt: skip
    assert detect_format(out) == "minibench-json"
    rows = parse_minibench_json(out)
    mine = [r for r in rows if r["key"] == SA_FULL]
    assert {r["metric"] for r in mine} == {"model_load_time(ms)", "load_status", "avg_inference_latency(ms)", "trimmean_inference_latency(ms)", "ram_pss_usage(mb)"}
    avg = next(r for r in mine if r["metric"] == "avg_inference_latency(ms)")
    assert avg["value"] == pytest.approx(sum(lat) / len(lat)) and avg["arch"] == "Pixel 8" and avg["os"] == "Android 15"

    session = _open_android_session(tmp_path / "session")
    report = ingest([out], session)
    assert report.added == {SA_FULL: 1}
    assert session.samples()["latency_ms"].tolist() == [pytest.approx(sum(lat) / len(lat))]
    logged = session.manifest["ingested"][-1]
    assert logged["aggregate"] is True and logged["ignored"] == ["resnet50"]
    assert ingest([out], session).skipped == [SA_FULL]  # never stored twice
    assert ingest([out], session, replace=True).replaced == [SA_FULL]
    assert len(session.samples()) == 1

    # the same file from another phone is refused, naming both
    other = write_minibench_json(tmp_path / "other.json", minibench_records("block_sa_w1_r2_n64_s0", lat, load_ms=1.0, device=AndroidDeviceInfo(arch="SM-S921B")))
    with pytest.raises(DitnasError, match="SM-S921B.*Pixel 8"):
        ingest([other], session)


def test_minibench_runs_one_program_per_launch(android, programs, fake_adb, monkeypatch, tmp_path) -> None:
    """BenchmarkActivity.kt (pytorch/executorch extension/benchmark/android/benchmark) benchmarks only
    the first .pte of `model_dir` and overwrites its results file: two programs need two launches."""
    _, prepared, _, _ = android
    second = Prepared(programs[SA_FULL], artifacts={"pte": prepared[0].artifacts["pte"]})  # any file to push
    results = tmp_path / "per_model"
    results.mkdir()
    dev = AndroidDeviceInfo()
    for item, ms in ((prepared[0], 1.0), (second, 2.0)):
        name = device_model_name(item.key())
        write_minibench_json(results / name, minibench_records(name.removesuffix("_xnnpack_fp32"), [ms] * 3, load_ms=1.0, device=dev))
    monkeypatch.setenv("FAKE_MINIBENCH_DIR", str(results))
    out = get_backend("android-adb").run_minibench([prepared[0], second], WARMUP, ITERS, tmp_path / "benchmark_results.json", poll_s=0)
    starts = [c for c in fake_adb() if "am" in c]
    assert [c[c.index("model_dir") + 1] for c in starts] == [f"/data/local/tmp/minibench/{device_model_name(k)}" for k in (SA_HALF, SA_FULL)]
    assert sum(c[2:6] == ["shell", "run-as", "org.pytorch.minibench", "rm"] for c in fake_adb()) == 2  # stale results deleted each time
    assert {k: v for k, v in read_artifact(out).samples.items()} == {SA_HALF: [1.0], SA_FULL: [2.0]}


def test_android_missing_adb_and_no_device_are_clear_errors(android, fake_adb, monkeypatch, tmp_path) -> None:
    _, prepared, _, _ = android
    monkeypatch.setenv("FAKE_ADB_NO_DEVICE", "1")
    with pytest.raises(DitnasError, match="no Android device attached"):
        get_backend("android-adb").measure(prepared, WARMUP, ITERS)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # adb not installed
    with pytest.raises(DitnasError, match="`adb` was not found; install Android platform-tools"):
        get_backend("android-adb").measure(prepared, WARMUP, ITERS)
    with pytest.raises(DitnasError, match="not found"):
        get_backend("android-adb", adb=str(tmp_path / "nope" / "adb")).info()


# ----------------------------------------------------------------------------------------------
# ios
# ----------------------------------------------------------------------------------------------
def test_ios_prepare_writes_benchmark_bundle_and_command(programs, tmp_path) -> None:
    backend = get_backend("ios", udid="00008140-0001", development_team="TEAM123")
    (item,) = backend.prepare([programs[SA_FULL]], tmp_path)  # lowering 2
    res = tmp_path / "ios" / "Benchmark" / "Resources" / "block_sa_w1_r2_n64_s0_xnnpack_fp32.pte"
    assert item.artifacts["ios_resource"] == res and res.read_bytes() == item.artifacts["pte"].read_bytes()
    plan = json.loads((tmp_path / "ios" / "ios_plan.json").read_text())
    assert plan["keys"] == {res.stem: SA_FULL}
    assert plan["xcodebuild"] == (
        "xcodebuild test -project executorch/extension/benchmark/apple/Benchmark/Benchmark.xcodeproj -scheme Benchmark "
        "-destination id=00008140-0001 -testPlan Tests -allowProvisioningUpdates DEVELOPMENT_TEAM=TEAM123"
    )
    script = (tmp_path / "ios" / "run_xcodebuild.sh").read_text()
    assert 'cp Benchmark/Resources/*.pte "$BENCHMARK_DIR/Resources/"' in script and "| tee xcodebuild.log" in script
    if platform.system() != "Darwin":
        with pytest.raises(DitnasError, match="needs macOS with Xcode"):
            backend.measure([item], 1, 20)


def _ios_log(tmp_path: Path) -> tuple[Path, list[float]]:
    seconds = [0.0121, 0.0119, 0.0125, 0.0118, 0.0120]
    tests = {
        key: ios_test_name(m, device_model_name(key) + ".pte", ios_version="18.1", machine="iPhone17,2")
        for key in (SA_HALF, SA_FULL)
        for m in ("forward",)
    }
    ms = [
        XCTestMeasurement(ios_test_name("load", device_model_name(SA_HALF) + ".pte"), [0.05, 0.04]),
        XCTestMeasurement(tests[SA_HALF], seconds),
        XCTestMeasurement(tests[SA_HALF], [2048.0, 2050.0], metric="Memory Peak Physical, kB"),
        XCTestMeasurement(tests[SA_FULL], [s * 2 for s in seconds]),
    ]
    return write_xcodebuild_log(tmp_path / "xcodebuild.log", ms), seconds


def test_xcodebuild_log_parses_one_row_per_value_and_ingests(tmp_path) -> None:
    log, seconds = _ios_log(tmp_path)
    line = next(x for x in log.read_text().splitlines() if "measured [Clock" in x and "forward" in x)
    assert line.startswith("Test Case '-[GenericTests test_forward_block_sa_w0p5_r2_n64_s0_xnnpack_fp32_pte_iOS_18_1_iPhone17_2]' measured [Clock Monotonic Time, s] average: 0.012060, relative standard deviation: ")
    rows = parse_xcodebuild_log(log)
    fwd = [r for r in rows if r["key"] == SA_HALF and r["method"] == "forward" and r["unit"] == "s"]
    assert [r["value"] for r in fwd] == seconds and [r["latency_ms"] for r in fwd] == pytest.approx([s * 1e3 for s in seconds])
    assert {(r["os"], r["device_model"]) for r in rows} == {("iOS 18.1", "iPhone17,2")}
    assert {r["method"] for r in rows} == {"load", "forward"} and len(rows) == 2 + 5 + 2 + 5
    assert detect_format(log) == "xcodebuild-log"

    session = session_for_artifacts(tmp_path / "ios_session", [log])  # the device comes from the test names
    assert session.device["backend"] == "ios" and session.device["device_model"] == "iPhone17,2"
    report = ingest([log], session)
    assert report.added == {SA_HALF: 5, SA_FULL: 5}
    df = session.samples()
    assert df[df["key"] == SA_HALF]["latency_ms"].tolist() == pytest.approx([s * 1e3 for s in seconds])


def test_malformed_xcodebuild_line_names_its_line_number(tmp_path) -> None:
    log, _ = _ios_log(tmp_path)
    lines = log.read_text().splitlines()
    n = next(i for i, x in enumerate(lines) if "measured [Clock" in x and "forward" in x)
    lines[n] = lines[n].split(" average:")[0] + " average: 0.012, relative standard deviation: 1.3%, values: [0.0121, 0.01"
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(DitnasError, match=f"line {n + 1}: a `measured \\[...\\]` line that does not parse"):
        parse_xcodebuild_log(log)
    with pytest.raises(DitnasError, match=f"line {n + 1}"):
        session_for_artifacts(tmp_path / "s", [log])


# ----------------------------------------------------------------------------------------------
# coreml
# ----------------------------------------------------------------------------------------------
def test_coreml_converts_one_mlpackage_and_refuses_to_run_off_macos(programs, tmp_path) -> None:
    pytest.importorskip("coremltools", reason="coremltools is not installed (pip install coremltools==9.0)")
    backend = get_backend("coreml")
    (item,) = backend.prepare([programs[SA_HALF]], tmp_path)  # the only conversion (~1 s)
    pkg = item.artifacts["mlpackage"]
    assert pkg.name == "block_sa_w0.5_r2_n64_s0.mlpackage" and (pkg / "Manifest.json").is_file()
    assert item.report["inputs"] == ["x", "c", "ctx"] and item.report["mlpackage_bytes"] > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    assert backend.info()["precision"] == "fp16" and backend.info()["compute_unit"] == "cpu_and_ne"
    if platform.system() != "Darwin":
        with pytest.raises(DitnasError, match="running a Core ML model needs macOS"):
            backend.measure([item], 1, 3)


def test_coreml_benchmark_json_ingests_predict_samples(tmp_path) -> None:
    device = {"device_id": "00008140-0001", "device_model": "iPhone17,2", "os": "iOS 18.1"}
    predict = [1.5, 1.4, 1.6]
    payload = coreml_benchmark_payload(
        [CoreMLBenchmarkResult(SA_HALF, "block_sa_w0.5_r2_n64_s0.mlpackage", predict, [20.0])], device=device, tool_version="9.0"
    )
    path = write_coreml_benchmark_json(tmp_path / "bench.json", payload)
    assert payload["results"][0]["predict"]["statistics"]["median"] == 1.5
    assert detect_format(path) == "coreml-benchmark-json"
    session = session_for_artifacts(tmp_path / "coreml_session", [path])
    assert session.device["backend"] == "coreml" and session.device["device_id"] == "00008140-0001"
    assert ingest([path], session).added == {SA_HALF: 3}
    assert session.samples()["latency_ms"].tolist() == predict
    with pytest.raises(DitnasError, match="comes from ios.*coreml session"):
        ingest([_ios_log(tmp_path)[0]], session)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
def test_unknown_format_and_truncated_json_are_clear_errors(tmp_path, android) -> None:
    session = ProfilingSession.open(tmp_path / "s", get_backend("ios", device_info={"device_id": "u", "device_model": "iPhone17,2"}), iters=5)
    odd = tmp_path / "notes.txt"
    odd.write_text("hello phone\n")
    with pytest.raises(DitnasError, match=r"notes.txt is in no format ditnas reads; known formats: coreml-benchmark-json.*etdump.*minibench-json.*xcodebuild-log"):
        ingest([odd], session)
    # a log whose measured lines name no ditnas program
    foreign = tmp_path / "foreign.log"
    foreign.write_text(xcodebuild_log_text([XCTestMeasurement("test_forward_resnet50_xnnpack_fp32_pte_iOS_18_1_iPhone17_2", [1.0])]))
    with pytest.raises(DitnasError, match=r"foreign.log \(xcodebuild-log\) holds no latency samples of a ditnas program \(names seen: test_forward_resnet50"):
        ingest([foreign], session)
    records = minibench_records("block_sa_w1_r2_n64_s0", [1.0, 2.0], load_ms=1.0, device=AndroidDeviceInfo())
    text = json.dumps(records)
    cut = tmp_path / "benchmark_results.json"
    cut.write_text(text[: len(text) // 2])
    with pytest.raises(DitnasError, match=r"benchmark_results.json is truncated or not JSON .*line 1 column"):
        ingest([cut], session)
    with pytest.raises(DitnasError, match="does not exist"):
        ingest([tmp_path / "missing.etdp"], session)
    assert session.samples().empty  # nothing written by any of them


def test_etdump_without_events_is_refused(android, tmp_path) -> None:
    _, prepared, _, _ = android
    program = ExecuTorchXnnpackBackend.load(prepared[0].artifacts["pte"], etdump=True)
    program.load_method("forward")  # init events only: never executed
    empty = tmp_path / "block_sa_w0p5_r2_n64_s0_xnnpack_fp32.etdp"
    program.write_etdump_result_to_file(str(empty), str(tmp_path / "debug.bin"))
    assert detect_format(empty) == "etdump"
    session = ProfilingSession.open(
        tmp_path / "s", get_backend("android-adb", device_info={"device_id": SERIAL, "device_model": "Pixel 8"}), iters=ITERS
    )
    with pytest.raises(DitnasError, match="has no execution events"):
        ingest([empty], session)
    assert session.samples().empty


# ----------------------------------------------------------------------------------------------
# real formats: fixtures taken from the upstream projects (tests/fixtures/phone/)
# ----------------------------------------------------------------------------------------------
FIXTURES = Path(__file__).parent / "fixtures" / "phone"
SSA_Q = "block:ssa:w0.5:r2:n16:s1"
# the timed runs behind minibench_benchmark_results.json (its avg and trimmean are computed from them)
MINIBENCH_RUNS = [0.412917, 0.398125, 0.401302, 0.395834, 0.447760, 0.399271, 0.396562, 0.403125, 0.394948, 0.41026]
# the forward test's 20 Clock Monotonic Time values (s) in xcodebuild_benchmark.log
IOS_FORWARD_S = [0.000861, 0.000652, 0.000641, 0.000639, 0.000655, 0.000644, 0.000640, 0.000648, 0.000637, 0.000642,
                 0.000651, 0.000639, 0.000644, 0.000650, 0.000638, 0.000646, 0.000641, 0.000649, 0.000643, 0.000640]  # fmt: skip


def test_minibench_upstream_test_data_parses() -> None:
    # Fixture: verbatim get_mock_extract_result() of pytorch/executorch
    # .github/scripts/test_extract_benchmark_results.py -- the records extract_benchmark_results.py
    # takes from an Android benchmark_results.json (note the extra "method" field and the integer
    # "quantization", which the app itself never writes).
    path = FIXTURES / "minibench_upstream_test_data.json"
    assert detect_format(path) == "minibench-json"
    rows = parse_minibench_json(path)
    assert [(r["name"], r["backend"], r["quantization"], r["metric"], r["value"], r["target"]) for r in rows] == [
        ("ic4", "q1", 0, "metric1", 100.0, 100.0),
        ("ic4", "q2", 0, "metric2", 200.0, 200.0),
    ]
    assert {(r["key"], r["arch"], r["device"], r["os"], r["totalMem"]) for r in rows} == {(None, "extract arch", "extract device", "extract os", 0)}
    with pytest.raises(DitnasError, match=r"minibench_upstream_test_data.json \(minibench-json\) holds no latency samples of a ditnas program \(names seen: ic4\)"):
        read_artifact(path)


def test_minibench_app_output_ingests_and_our_writer_matches_it(tmp_path) -> None:
    # Fixture: one run of the minibench app, laid out as the app writes it -- records in the order
    # of pytorch/executorch extension/benchmark/android/benchmark/app/src/main/java/org/pytorch/
    # minibench/ModelRunner.kt (avg, trimmean, load time, load_status, PSS), fields in
    # BenchmarkMetric.kt's declaration order as Gson().toJson(results) writes them in one line
    # (BenchmarkActivity.kt), deviceInfo {device=Build.BRAND, arch=Build.MODEL, os, totalMem=0,
    # availMem=0: MemoryInfo is never filled}; the name is the .pte stem extractBackendAndQuantization
    # splits. The model and the numbers are ours (no device ran a ditnas program upstream).
    path = FIXTURES / "minibench_benchmark_results.json"
    raw = json.loads(path.read_text())
    ours = minibench_records("block_sa_w0p5_r2_n64_s0", MINIBENCH_RUNS, load_ms=18.213541, pss_mb=1.2353515625,
                             device=AndroidDeviceInfo(device="samsung", arch="SM-S911U1", os="Android 14"))  # fmt: skip
    assert [{k: v for k, v in r.items() if k != "actualValue"} for r in ours] == [{k: v for k, v in r.items() if k != "actualValue"} for r in raw]
    assert [list(r) for r in ours] == [list(r) for r in raw]  # Gson's field order
    assert [r["actualValue"] for r in ours] == pytest.approx([r["actualValue"] for r in raw], rel=1e-12)
    # ModelRunner.kt: trimmed = sorted.subList(size / 10, size * 9 / 10): 5 runs keep the 4 fastest
    five = [4.0, 9.0, 3.0, 5.0, 6.0]
    assert next(r["actualValue"] for r in minibench_records("m", five, load_ms=1.0, device=AndroidDeviceInfo())
                if r["metric"] == "trimmean_inference_latency(ms)") == pytest.approx((3 + 4 + 5 + 6) / 4)  # fmt: skip

    assert detect_format(path) == "minibench-json"
    session = session_for_artifacts(tmp_path / "pixel", [path])
    assert session.device["backend"] == "android-adb" and session.device["device_model"] == "SM-S911U1"
    assert ingest([path], session).added == {SA_HALF: 1}
    assert session.samples()["latency_ms"].tolist() == [pytest.approx(sum(MINIBENCH_RUNS) / len(MINIBENCH_RUNS))]
    assert session.manifest["ingested"][-1]["aggregate"] is True


def test_minibench_failed_load_is_named_not_ingested() -> None:
    # Fixture: what ModelRunner.kt (pytorch/executorch, see above) writes when Module.loadMethod
    # fails: only model_load_time(ms) and load_status (the ExecutorchRuntimeException error code).
    path = FIXTURES / "minibench_load_failed.json"
    with pytest.raises(DitnasError, match=r"holds no latency samples of a ditnas program \(names seen: block_sa_w1_r2_n64_s0 \(load_status 34\)\)"):
        read_artifact(path)


def test_xcodebuild_log_from_upstream_lines_ingests(tmp_path) -> None:
    # Fixture lines, in order:
    # - verbatim from pytorch/executorch PR #8461 (Device Farm stdout of the iOS Benchmark app):
    #   suite starts and a GenericTests `test_forward_<model>_pte_iOS_18_0_iPhone15_4` start line;
    # - verbatim from pytorch/executorch PR #5410: a measured line of the app's earlier test naming
    #   (`test_forward_models_llama2_iPhone_iPhone14,2_iOS_17.6.1`, with ',' and '.'; the excerpt was
    #   cut after "maxStandardDeviatio", completed as XCTest prints it);
    # - ditnas programs in that layout: a `<source>:<line>: ` prefix, 3-decimal averages, load and
    #   forward tests each measured with XCTClockMetric + XCTMemoryMetric (extension/benchmark/apple/
    #   Benchmark/Tests/GenericTests.mm: 20 forward iterations; names from TestUtils/DynamicTestCase.m),
    #   one with a '+' backend (`xnnpack+custom`, as extract_benchmark_results.py allows);
    # - verbatim from SoundBlaster/SpecificationKit AGENTS_DOCS/markdown/3.0.0/agent_logs/
    #   02_CachedSatisfies.md lines 15049-15058: a real xcodebuild run of other tests (Clock, Memory
    #   Physical, Memory Peak Physical lines).
    path = FIXTURES / "xcodebuild_benchmark.log"
    assert detect_format(path) == "xcodebuild-log"
    rows = parse_xcodebuild_log(path)
    old = [r for r in rows if r["test_name"] == "test_forward_models_llama2_iPhone_iPhone14,2_iOS_17.6.1"]
    assert [r["value"] for r in old] == [125158.624, 125175.008, 125175.008, 125158.624, 125191.392] and {r["key"] for r in old} == {None}
    foreign = {(r["test_class"], r["metric"], r["unit"]) for r in rows if r["test_class"].startswith("SpecificationKitTests")}
    assert foreign == {("SpecificationKitTests.PerformanceBenchmarks", m, u) for m, u in
                       (("Clock Monotonic Time", "s"), ("Memory Physical", "kB"), ("Memory Peak Physical", "kB"))}  # fmt: skip

    parsed = read_artifact(path)
    assert parsed.format == "xcodebuild-log" and set(parsed.samples) == {SA_HALF, SSA_Q}
    assert parsed.samples[SA_HALF] == pytest.approx([v * 1e3 for v in IOS_FORWARD_S])  # forward clock only, in ms
    assert parsed.samples[SSA_Q] == pytest.approx([float(f"{v / 2:.6f}") * 1e3 for v in IOS_FORWARD_S])  # printed %.6f
    assert parsed.device == {"device_model": "iPhone15,4", "os": "iOS 18.0"}
    assert {"test_forward_models_llama2_iPhone_iPhone14,2_iOS_17.6.1", "testAnySpecificationPerformance"} <= set(parsed.ignored)

    session = session_for_artifacts(tmp_path / "iphone", [path])
    assert session.device["backend"] == "ios" and session.manifest["iters"] == 20
    assert ingest([path], session).added == {SA_HALF: 20, SSA_Q: 20}


def test_coreml_benchmark_json_is_mlmodelbenchmarker_measurements(tmp_path) -> None:
    # No upstream project writes a Core ML benchmark report file: coremltools' MLModelBenchmarker
    # (coremltools/models/ml_program/experimental/perf_utils.py, apple/coremltools) returns
    # dataclasses, and the ExecuTorch Benchmark app's CoreMLTests.mm (pytorch/executorch
    # extension/benchmark/apple/Benchmark/Tests) prints XCTest lines. So the project's documented
    # format is kept; its `load`/`predict` objects in the fixture are
    # dataclasses.asdict(MLModelBenchmarker.Measurement.from_samples(...)) written by coremltools 9.0.
    path = FIXTURES / "coreml_benchmark.json"
    data = json.loads(path.read_text())
    (res,) = data["results"]
    for phase in ("load", "predict"):
        got = measurement(res[phase]["samples"])  # our writer gives the upstream shape and numbers
        assert list(got) == list(res[phase]) and list(got["statistics"]) == list(res[phase]["statistics"])
        assert got["statistics"] == pytest.approx(res[phase]["statistics"], rel=1e-12)
    try:
        from coremltools.models.ml_program.experimental.perf_utils import MLModelBenchmarker
    except ImportError:
        MLModelBenchmarker = None  # the committed fixture still pins the shape
    if MLModelBenchmarker is not None:
        import dataclasses

        live = dataclasses.asdict(MLModelBenchmarker.Measurement.from_samples(samples=res["predict"]["samples"]))
        assert live == res["predict"]
    assert detect_format(path) == "coreml-benchmark-json"
    session = session_for_artifacts(tmp_path / "coreml", [path])
    assert session.device["backend"] == "coreml" and session.device["device_model"] == "iPhone16,1"
    assert ingest([path], session).added == {SA_HALF: 6}
    assert session.samples()["latency_ms"].tolist() == res["predict"]["samples"]


# ----------------------------------------------------------------------------------------------
# a phone type is one file: a backend registered here reads its own format through `ingest`
# ----------------------------------------------------------------------------------------------
TOY = ArtifactFormat("toyphone-csv", "toyphone results (text starting '# toyphone v1', then key,ms lines)", feeds=("toyphone",))


class ToyPhoneBackend(Backend):
    """Everything a new phone type needs, in one class (here in the test instead of backends/)."""

    name = "toyphone"
    formats = (TOY,)

    def __init__(self, threads: int = 1, *, device_info: dict | None = None) -> None:
        super().__init__(threads)
        self._device = dict(device_info or {})

    def prepare(self, programs, workdir):
        raise DitnasError("toyphone: copy the programs to the phone by hand")

    def measure(self, prepared, warmup, iters):
        raise DitnasError("toyphone: run the phone app, then ditnas profile ingest its results")

    def device(self) -> dict:
        return self._device

    @classmethod
    def sniff(cls, probe: ArtifactProbe) -> str | None:
        return TOY.name if probe.head.startswith(b"# toyphone v1") else None

    @classmethod
    def read_artifact(cls, path: Path, fmt: str, **opts) -> ParsedArtifact:
        lines = Path(path).read_text().splitlines()
        rows = [{"name": n, "latency_ms": float(ms)} for n, ms in (x.split(",") for x in lines[2:])]
        samples: dict[str, list[float]] = {}
        for r in rows:
            samples.setdefault(cell_from_name(r["name"])["key"], []).append(r["latency_ms"])
        return parsed_artifact(path, fmt, rows, samples, device={"device_model": lines[1].removeprefix("# model ")})


@pytest.fixture()
def toyphone():
    register_backend(ToyPhoneBackend)
    yield ToyPhoneBackend
    unregister_backend(ToyPhoneBackend.name)


def _toy_file(tmp_path: Path) -> Path:
    path = tmp_path / "results.txt"
    path.write_text("# toyphone v1\n# model Toy 3\nblock_sa_w1_r2_n64_s0_xnnpack_fp32,2.5\nblock_sa_w1_r2_n64_s0_xnnpack_fp32,2.7\n")
    return path


def test_a_new_phone_type_is_one_backend_class(tmp_path) -> None:
    path = _toy_file(tmp_path)
    with pytest.raises(DitnasError, match=r"results.txt is in no format ditnas reads; known formats: (?!.*toyphone)"):
        detect_format(path)
    register_backend(ToyPhoneBackend)
    try:
        assert "toyphone" in backend_names() and detect_format(path) == "toyphone-csv"
        session = session_for_artifacts(tmp_path / "toy", [path])  # the device comes from the file
        assert session.device["backend"] == "toyphone" and session.device["device_model"] == "Toy 3"
        report = ingest([path], session)
        assert report.added == {SA_FULL: 2} and report.files == [{"file": str(path), "format": "toyphone-csv"}]
        assert session.samples()["latency_ms"].tolist() == [2.5, 2.7]
        # the other formats still go to their own backends, and a toyphone session refuses them
        with pytest.raises(DitnasError, match=r"\(minibench-json\) comes from android-adb, but session .* is a toyphone session"):
            ingest([FIXTURES / "minibench_benchmark_results.json"], session)
        bad = tmp_path / "notes.txt"
        bad.write_text("hello\n")
        with pytest.raises(DitnasError, match=r"known formats: .*toyphone-csv: toyphone results"):
            detect_format(bad)
    finally:
        unregister_backend("toyphone")
    with pytest.raises(DitnasError, match="in no format ditnas reads"):
        detect_format(path)


def test_registry_refuses_clashes_and_ambiguous_files(toyphone, tmp_path) -> None:
    class Greedy(ToyPhoneBackend):
        name = "greedy"
        formats = (ArtifactFormat("any-json", "any JSON", feeds=("greedy",)),)

        @classmethod
        def sniff(cls, probe):
            return "any-json" if probe.json is not None else None

    register_backend(Greedy)
    try:
        with pytest.raises(DitnasError, match=r"claimed by several formats: .*minibench-json \(android-adb.*any-json \(greedy"):
            detect_format(FIXTURES / "minibench_benchmark_results.json")
    finally:
        unregister_backend("greedy")
    assert detect_format(FIXTURES / "minibench_benchmark_results.json") == "minibench-json"

    class Copycat(ToyPhoneBackend):
        name = "copycat"  # another backend claiming the toyphone format name

    with pytest.raises(DitnasError, match=r"declares artifact format 'toyphone-csv', which backend 'toyphone'"):
        register_backend(Copycat)

    class SameName(ToyPhoneBackend):
        name = "ios"
        formats = ()

    with pytest.raises(DitnasError, match=r"backend name 'ios' is taken by ditnas.latency_models.backends.ios_xcodebuild.IosBackend"):
        register_backend(SameName)


def test_registry_lists_every_backend_without_importing_runtimes() -> None:
    # a fresh interpreter: asking the registry (all backends, all formats) imports no runtime
    code = (
        "import json, sys; from ditnas.latency_models.backends import backend_names, artifact_formats; "
        "print(json.dumps([backend_names(), [[n, c.name] for n, (f, c) in artifact_formats().items()], "
        "'executorch' in sys.modules, 'coremltools' in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    names, formats, executorch_imported, coremltools_imported = json.loads(out.strip().splitlines()[-1])
    assert names == ["android-adb", "coreml", "executorch-xnnpack", "host-torch", "ios"]
    assert formats == [["coreml-benchmark-json", "coreml"], ["etdump", "executorch-xnnpack"], ["minibench-json", "android-adb"], ["xcodebuild-log", "ios"]]
    assert not executorch_imported and not coremltools_imported
