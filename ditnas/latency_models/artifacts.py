"""Device artifact names and writers of the formats the phone toolchains produce.

Names. A program travels to a phone as `<device stem>_<backend>_<dtype>.pte`, the convention the
ExecuTorch minibench app and the iOS Benchmark app parse (toolchain.md §2.2, §8). The device stem is
the program key with ':' -> '_' and '.' -> 'p' (`block:sa:w0.5:r4:n64:s0` ->
`block_sa_w0p5_r4_n64_s0`), so it is a plain `\\w+` word: minibench's regex
`(?<name>\\w+)_(?<backend>[\\w+]+)_(?<quantization>\\w+)` then splits it correctly, and the iOS
app's punctuation-to-'_' test naming leaves it intact. `key_from_name` reads every form back
(device stems, `file_stem` names with '.', raw keys, with or without the backend/dtype/extension tail).

Writers. Tests and `ditnas profile ingest` demos need the device formats without a device, so this
module writes them exactly as documented:
- minibench `benchmark_results.json` (BenchmarkMetric.kt: a list of
  `{benchmarkModel: {name, backend, quantization}, metric, actualValue, targetValue,
  deviceInfo: {device, arch, os, totalMem, availMem}}`);
- xcodebuild/XCTest stdout with `Test Case '-[GenericTests test_forward_<resource>_iOS_<ver>_<machine>]'
  measured [Clock Monotonic Time, s] average: ..., values: [...]` lines (GenericTests.mm,
  DynamicTestCase.m, ResourceTestCase.m naming);
- a Core ML benchmark JSON holding coremltools `MLModelBenchmarker.Measurement`s
  (`statistics {minimum, maximum, average, std_dev, median}`, `samples` in ms), the "your JSON" of
  toolchain.md §2.4, in the schema `COREML_BENCHMARK_FORMAT` below.
ETDumps are not written here: they come from the real ExecuTorch runtime (`write_host_etdump`).
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ditnas.errors import DitnasError
from ditnas.io import atomic_write_text, write_json
from ditnas.latency_models.programs import Cell

COREML_BENCHMARK_FORMAT = "ditnas.coreml-benchmark/1"
MINIBENCH_LATENCY_METRIC = "avg_inference_latency(ms)"
XCTEST_CLOCK_METRIC = "Clock Monotonic Time, s"
XCTEST_MEMORY_METRIC = "Memory Peak Physical, kB"
IOS_TEST_CLASS = "GenericTests"  # the Benchmark app's class for plain .pte resources

_NUM = r"\d+(?:[.p]\d+)?"
# the program part of a name; the tail (backend, dtype, "pte", extension) is allowed and ignored
_NAME_PATTERNS = (
    re.compile(rf"^(?P<kind>block)_(?P<op>[A-Za-z0-9]+)_w(?P<w>{_NUM})_r(?P<r>{_NUM})_n(?P<n>\d+)_s(?P<s>\d+)(?P<tail>(?:_\w*)?)$"),
    re.compile(rf"^(?P<kind>patch_embed|final|down|up)_w(?P<w>{_NUM})_n(?P<n>\d+)_s(?P<s>\d+)(?P<tail>(?:_\w*)?)$"),
    re.compile(r"^(?P<kind>model)_(?P<sha>[0-9a-f]{8,64})_n(?P<n>\d+)(?P<tail>(?:_\w*)?)$"),
)
_EXTENSIONS = (".pte", ".etdp", ".etdump", ".mlpackage", ".json", ".log", ".txt")


def device_stem(key: str) -> str:
    """`block:sa:w0.5:r4:n64:s0` -> `block_sa_w0p5_r4_n64_s0` (a `\\w+` word, see module doc)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", key.replace(".", "p"))


def device_model_name(key: str, backend: str = "xnnpack", dtype: str = "fp32") -> str:
    """The on-device file stem `<device stem>_<backend>_<dtype>` that minibench and iOS parse."""
    return f"{device_stem(key)}_{backend}_{dtype}"


def _num(text: str) -> float:
    return float(text.replace("p", "."))


def cell_from_name(name: str) -> dict[str, Any] | None:
    """Cell fields (key, kind, op, width, mlp_ratio, tokens, stage, arch) named by a file or model
    name, or None when the name is not a program of this project. Model cells carry only the arch
    sha in their key, so `arch` is left empty (a plan file can fill it in)."""
    text = Path(str(name)).name
    for ext in _EXTENSIONS:
        if text.endswith(ext):
            text = text[: -len(ext)]
            break
    text = re.sub(r"[^A-Za-z0-9_.]", "_", text)  # raw keys: ':' -> '_'
    for pattern in _NAME_PATTERNS:
        m = pattern.match(text)
        if not m:
            continue
        kind = m["kind"]
        if kind == "model":
            return {
                "key": f"model:{m['sha']}:n{m['n']}",
                "kind": "model",
                "op": "",
                "width": 0.0,
                "mlp_ratio": 0.0,
                "tokens": int(m["n"]),
                "stage": 0,
                "arch": "",
            }
        if kind == "block":
            cell = Cell("block", m["op"], _num(m["w"]), _num(m["r"]), int(m["n"]), int(m["s"]))
        else:
            cell = Cell(kind, width=_num(m["w"]), tokens=int(m["n"]), stage=int(m["s"]))
        return cell.fields()
    return None


def key_from_name(name: str, *, source: str = "artifact") -> str:
    cell = cell_from_name(name)
    if cell is None:
        raise DitnasError(
            f"{source}: {name!r} names no ditnas program; device files must be named "
            "<device stem>_<backend>_<dtype> as `prepare` writes them (e.g. block_sa_w0p5_r4_n64_s0_xnnpack_fp32.pte)"
        )
    return cell["key"]


def load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DitnasError(f"{what} {path} does not exist; check the path") from None
    except ValueError as exc:
        raise DitnasError(
            f"{what} {path} is truncated or not JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
            "pull or copy it again from the device"
        ) from None
    except OSError as exc:
        raise DitnasError(f"{what} {path} is unreadable ({exc.strerror}); check its permissions") from None


# ----------------------------------------------------------------------------------------------
# minibench benchmark_results.json
# ----------------------------------------------------------------------------------------------
@dataclass
class AndroidDeviceInfo:
    """minibench's DeviceInfo: `device` = Build.BRAND, `arch` = Build.MODEL, `os` = "Android <release>"."""

    device: str = "google"
    arch: str = "Pixel 8"
    os: str = "Android 15"
    totalMem: int = 8 * 1024**3
    availMem: int = 4 * 1024**3


def trimmed_mean(values: Sequence[float], share: float = 0.1) -> float:
    """Mean of the middle 80% (minibench's trimmean_inference_latency)."""
    ordered = sorted(values)
    cut = int(len(ordered) * share)
    kept = ordered[cut : len(ordered) - cut] or ordered
    return statistics.fmean(kept)


def minibench_records(
    name: str,
    latencies_ms: Sequence[float],
    *,
    load_ms: float,
    device: AndroidDeviceInfo,
    backend: str = "xnnpack",
    quantization: str = "fp32",
    pss_mb: float = 0.0,
    load_status: int = 0,
) -> list[dict[str, Any]]:
    """The records minibench writes for one model: load time and status, average and trimmed-mean
    latency over its timed iterations, PSS memory."""
    model = {"name": name, "backend": backend, "quantization": quantization}

    def rec(metric: str, value: float) -> dict[str, Any]:
        return {"benchmarkModel": dict(model), "metric": metric, "actualValue": float(value), "targetValue": 0.0, "deviceInfo": asdict(device)}

    out = [rec("model_load_time(ms)", load_ms), rec("load_status", load_status)]
    if latencies_ms:
        out += [
            rec(MINIBENCH_LATENCY_METRIC, statistics.fmean(latencies_ms)),
            rec("trimmean_inference_latency(ms)", trimmed_mean(latencies_ms)),
        ]
    out.append(rec("ram_pss_usage(mb)", pss_mb))
    return out


def write_minibench_json(path: Path, records: Sequence[dict[str, Any]]) -> Path:
    write_json(Path(path), list(records))
    return Path(path)


# ----------------------------------------------------------------------------------------------
# xcodebuild / XCTest log
# ----------------------------------------------------------------------------------------------
def _punct_to_underscore(text: str) -> str:
    # NSCharacterSet.punctuationCharacterSet -> "_" (ResourceTestCase.m, DynamicTestCase.m)
    return re.sub(r"[!-/:-@\[-^`{-~]", lambda m: m.group(0) if m.group(0) in "+$<=>^`|~" else "_", text)


def ios_test_name(method: str, resource_file: str, *, ios_version: str = "18.1", machine: str = "iPhone17,2") -> str:
    """`test_forward_block_sa_w0p5_r4_n64_s0_xnnpack_fp32_pte_iOS_18_1_iPhone17_2`: the Benchmark app's
    dynamic test name for one resource on one device."""
    resource = _punct_to_underscore(Path(resource_file).name)
    device = _punct_to_underscore(f"iOS_{ios_version}_{machine}")
    return f"test_{method}_{resource}_{device}"


@dataclass
class XCTestMeasurement:
    """One `measured [...]` result of one test: the metric and its per-iteration values (metric units)."""

    test_name: str
    values: list[float]
    metric: str = XCTEST_CLOCK_METRIC
    test_class: str = IOS_TEST_CLASS


def xctest_measured_line(m: XCTestMeasurement) -> str:
    """The line XCTest prints for a performance metric (units are the metric's own: s, kB)."""
    avg = statistics.fmean(m.values)
    rsd = 100.0 * statistics.pstdev(m.values) / avg if avg else 0.0
    metric_id = {
        XCTEST_CLOCK_METRIC: "com.apple.dt.XCTMetric_Clock.time.monotonic",
        XCTEST_MEMORY_METRIC: "com.apple.dt.XCTMetric_Memory.physical_peak",
    }.get(m.metric, "com.apple.dt.XCTMetric")
    values = ", ".join(f"{v:.6f}" for v in m.values)
    return (
        f"Test Case '-[{m.test_class} {m.test_name}]' measured [{m.metric}] average: {avg:.6f}, "
        f"relative standard deviation: {rsd:.3f}%, values: [{values}], performanceMetricID:{metric_id}, "
        'baselineName: "", baselineAverage: , polarity: prefers smaller, maxPercentRegression: 10.000%, '
        "maxPercentRelativeStandardDeviation: 10.000%, maxRegression: 0.100, maxStandardDeviation: 0.100"
    )


def xcodebuild_log_text(measurements: Sequence[XCTestMeasurement]) -> str:
    """A `xcodebuild test` stdout: suite/case start and pass lines around the measured lines."""
    lines = ["Test Suite 'All tests' started at 2026-01-01 12:00:00.000."]
    by_case: dict[tuple[str, str], list[XCTestMeasurement]] = {}
    for m in measurements:
        by_case.setdefault((m.test_class, m.test_name), []).append(m)
    for (cls, name), ms in by_case.items():
        lines.append(f"Test Case '-[{cls} {name}]' started.")
        lines.extend(xctest_measured_line(m) for m in ms)
        lines.append(f"Test Case '-[{cls} {name}]' passed (1.234 seconds).")
    lines.append("Test Suite 'All tests' passed at 2026-01-01 12:00:10.000.")
    lines.append("** TEST SUCCEEDED **")
    return "\n".join(lines) + "\n"


def write_xcodebuild_log(path: Path, measurements: Sequence[XCTestMeasurement]) -> Path:
    atomic_write_text(Path(path), xcodebuild_log_text(measurements))
    return Path(path)


# ----------------------------------------------------------------------------------------------
# Core ML benchmark JSON (coremltools MLModelBenchmarker measurements)
# ----------------------------------------------------------------------------------------------
def measurement(samples_ms: Sequence[float]) -> dict[str, Any]:
    """`MLModelBenchmarker.Measurement` as JSON: statistics (np.std is the population std) + samples."""
    values = [float(v) for v in samples_ms]
    stats = None
    if values:
        stats = {
            "minimum": min(values),
            "maximum": max(values),
            "average": statistics.fmean(values),
            "std_dev": statistics.pstdev(values),
            "median": statistics.median(values),
        }
    return {"statistics": stats, "samples": values}


@dataclass
class CoreMLBenchmarkResult:
    key: str
    model: str  # the .mlpackage file name
    predict_ms: list[float]
    load_ms: list[float] = field(default_factory=list)


def coreml_benchmark_payload(
    results: Sequence[CoreMLBenchmarkResult],
    *,
    device: dict[str, Any],
    compute_units: str = "CPU_AND_NE",
    tool: str = "coremltools.MLModelBenchmarker",
    tool_version: str | None = None,
    warmup: bool = True,
) -> dict[str, Any]:
    return {
        "format": COREML_BENCHMARK_FORMAT,
        "tool": tool,
        "tool_version": tool_version,
        "compute_units": compute_units,
        "warmup": warmup,
        "device": dict(device),
        "results": [
            {"key": r.key, "model": r.model, "load": measurement(r.load_ms), "predict": measurement(r.predict_ms)} for r in results
        ],
    }


def write_coreml_benchmark_json(path: Path, payload: dict[str, Any]) -> Path:
    write_json(Path(path), payload)
    return Path(path)


# ----------------------------------------------------------------------------------------------
# ETDump from the real runtime on this host (what executor_runner --etdump_path writes on a phone)
# ----------------------------------------------------------------------------------------------
def write_host_etdump(prepared: Any, runs: int, dest: Path) -> Path:
    """Run a lowered program `runs` times on this host's XNNPACK runtime with the event tracer on and
    copy the ETDump to `dest`, the same flatbuffer executor_runner writes with --num_executions."""
    from ditnas.latency_models.backends.executorch_xnnpack import (
        ExecuTorchXnnpackBackend,
    )

    etdp = ExecuTorchXnnpackBackend().write_etdump(prepared, runs)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(etdp, dest)
    return dest
