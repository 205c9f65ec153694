"""`ios`: ExecuTorch + XNNPACK on an iPhone through the ExecuTorch iOS Benchmark app (toolchain.md §2.3).

prepare:  the XNNPACK lowering of `executorch-xnnpack` (reused, not duplicated), then the bundle
          layout the app reads: `ios/Benchmark/Resources/<device stem>_xnnpack_fp32.pte` (GenericTests
          takes every .pte in `Resources`), `ios/ios_plan.json` and `ios/run_xcodebuild.sh` holding the
          `xcodebuild test` command line, which tees stdout to `ios/xcodebuild.log`.
measure:  needs macOS with Xcode: copies the resources into the app, runs xcodebuild, parses the log.
          On any other host it raises a DitnasError saying so (no phone or Mac is assumed here).
parse:    xcodebuild stdout -> one row per value of every
          `Test Case '-[<Class> <test>]' measured [<metric>, <unit>] average: <a>, relative standard
          deviation: <r>%, values: [<v1>, <v2>, ...], ...` line (XCTest's own output, the line ExecuTorch
          CI scrapes in .github/scripts/extract_benchmark_results.py). The test name
          `test_<method>_<resource>_<OS>_<version>_<machine>` gives program key, method, OS and model.

ingest:   format `xcodebuild-log` (text with XCTest `measured [` lines): forward tests' `Clock
          Monotonic Time` values are the samples, one run of each program per log.
writers:  `ios_test_name`, `xctest_measured_line`, `write_xcodebuild_log` write the log as XCTest and
          the Benchmark app do, for tests and demos without a Mac.

# assumption: a forward test's values are its per-iteration wall times (XCTClockMetric over
# XCTMeasureOptions.iterationCount = 20 in GenericTests.mm; XCTest runs one extra, unreported,
# first iteration), so they are the samples; load tests are kept as rows but are not samples.
"""

from __future__ import annotations

import platform
import re
import shlex
import shutil
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ditnas.errors import DitnasError
from ditnas.io import atomic_write_text, write_json
from ditnas.latency_models.artifacts import (
    ArtifactProbe,
    ParsedArtifact,
    cell_from_name,
    device_model_name,
    parsed_artifact,
)
from ditnas.latency_models.backends.base import (
    ArtifactFormat,
    Backend,
    Prepared,
    check_counts,
    package_version,
    register_backend,
)
from ditnas.latency_models.backends.executorch_xnnpack import PARITY_ATOL, ExecuTorchXnnpackBackend
from ditnas.latency_models.programs import Program

PLAN_FILE = "ios_plan.json"
SCRIPT_FILE = "run_xcodebuild.sh"
LOG_FILE = "xcodebuild.log"
GENERIC_TESTS_ITERATIONS = 20  # XCTMeasureOptions.iterationCount in GenericTests.mm (forward)
XCTEST_CLOCK_METRIC = "Clock Monotonic Time, s"
XCTEST_MEMORY_METRIC = "Memory Peak Physical, kB"
IOS_TEST_CLASS = "GenericTests"  # the Benchmark app's class for plain .pte resources
XCODEBUILD_LOG = ArtifactFormat(
    "xcodebuild-log",
    "xcodebuild test stdout with XCTest `measured [...] average: ..., values: [...]` lines",
    feeds=("ios",),
)

# the measured line; `values` is what makes one row per iteration possible. The test name is
# anything up to `]`: the Benchmark app's names once held ',' and '.' (pytorch/executorch#5410:
# `test_forward_models_llama2_iPhone_iPhone14,2_iOS_17.6.1`), which `[\w+]+` refused
MEASURED = re.compile(
    r"Test Case\s+'-\[(?P<cls>[\w.]+)\s+(?P<test>[^\]\s]+)\]'\s+measured\s+\[(?P<metric>[^\]]+)\]\s+"
    r"average:\s+(?P<avg>[-+\d.eE]+),\s+relative standard deviation:\s+(?P<rsd>[-+\d.eE]+)%,\s+"
    r"values:\s+\[(?P<values>[^\]]*)\]"
)
# the resource may hold '+' (a backend such as `xnnpack+custom+qe`, extract_benchmark_results.py)
TEST_NAME = re.compile(
    r"^test_(?P<method>[A-Za-z]+)_(?P<resource>[\w+]+?)_(?P<os>iOS|iPadOS|macOS|visionOS|tvOS)_(?P<ver>\d+(?:_\d+)*)_(?P<machine>[A-Za-z]\w*)$"
)
UNIT_SCALE_MS = {"s": 1e3, "seconds": 1e3, "ms": 1.0, "us": 1e-3, "ns": 1e-6}  # "seconds": pre-Xcode 11 `[Time, seconds]`


@register_backend
class IosBackend(Backend):
    name = "ios"
    requires = ("executorch",)
    install = "executorch==1.5.1 (with torch==2.13.0)"
    precision = "fp32"
    compute_unit = "cpu"
    formats = (XCODEBUILD_LOG,)

    def __init__(
        self,
        threads: int = 1,
        *,
        udid: str | None = None,
        benchmark_dir: Path | str = "executorch/extension/benchmark/apple/Benchmark",
        xcodebuild: str = "xcodebuild",
        development_team: str | None = None,
        strict: bool = False,
        parity_atol: float | None = PARITY_ATOL,
        device_info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(threads)
        self.udid = udid
        self.benchmark_dir = Path(benchmark_dir)  # the app inside an executorch checkout
        self.xcodebuild = xcodebuild
        self.development_team = development_team
        self._xnnpack = ExecuTorchXnnpackBackend(threads, strict=strict, parity_atol=parity_atol, etdump=False)
        self._device = dict(device_info) if device_info else None

    def tool_versions(self) -> dict[str, str | None]:
        return {"torch": package_version("torch"), "executorch": package_version("executorch")}

    def device(self) -> dict[str, Any]:
        # assumption: without a device query (needs macOS), the caller names the phone; the model and
        # OS are filled in from the test names when a log is ingested into a new session
        return self._device or {"device_id": self.udid, "device_model": None, "os": None}

    # ----- prepare -----------------------------------------------------------------------------
    def xcodebuild_command(self, *, benchmark_dir: str | None = None) -> list[str]:
        bench = benchmark_dir or str(self.benchmark_dir)
        cmd = [
            self.xcodebuild,
            "test",
            "-project",
            f"{bench}/Benchmark.xcodeproj",
            "-scheme",
            "Benchmark",
            "-destination",
            f"id={self.udid}" if self.udid else "platform=iOS,name=<DeviceName>",
            "-testPlan",
            "Tests",
        ]
        if self.development_team:
            cmd += ["-allowProvisioningUpdates", f"DEVELOPMENT_TEAM={self.development_team}"]
        return cmd

    def prepare(self, programs: list[Program], workdir: Path) -> list[Prepared]:
        workdir = Path(workdir)
        prepared = self._xnnpack.prepare(programs, workdir)
        resources = workdir / "ios" / "Benchmark" / "Resources"
        resources.mkdir(parents=True, exist_ok=True)
        for item in prepared:
            bundled = resources / f"{device_model_name(item.key())}.pte"
            shutil.copyfile(item.artifacts["pte"], bundled)
            item.artifacts["ios_resource"] = bundled
            item.report["device_name"] = bundled.stem
        self._write_plan(workdir / "ios")
        return prepared

    def _write_plan(self, folder: Path) -> None:
        ptes = sorted((folder / "Benchmark" / "Resources").glob("*.pte"))  # all prepared so far
        cmd = self.xcodebuild_command(benchmark_dir="$BENCHMARK_DIR")
        plan = {
            "backend": self.name,
            "udid": self.udid,
            "benchmark_dir": str(self.benchmark_dir),
            "resources": [p.name for p in ptes],
            "keys": {p.stem: (cell_from_name(p.stem) or {}).get("key") for p in ptes},
            "xcodebuild": shlex.join(self.xcodebuild_command()),
            "iterations_per_test": GENERIC_TESTS_ITERATIONS,
        }
        write_json(folder / PLAN_FILE, plan)
        quoted = " ".join('"$BENCHMARK_DIR/Benchmark.xcodeproj"' if "$BENCHMARK_DIR" in a else shlex.quote(a) for a in cmd)
        lines = [
            "#!/bin/sh",
            "# Generated by ditnas (ios). Needs macOS, Xcode and a signed ExecuTorch Benchmark app",
            "# (extension/benchmark/apple/Benchmark). Then: ditnas profile ingest xcodebuild.log --session <dir>",
            "set -eu",
            'cd "$(dirname "$0")"',
            f'BENCHMARK_DIR="${{BENCHMARK_DIR:-{self.benchmark_dir}}}"',
            'cp Benchmark/Resources/*.pte "$BENCHMARK_DIR/Resources/"',
            f"{quoted} 2>&1 | tee {LOG_FILE}",
        ]
        script = folder / SCRIPT_FILE
        atomic_write_text(script, "\n".join(lines) + "\n")
        script.chmod(0o755)

    # ----- measure -----------------------------------------------------------------------------
    def check_runtime(self) -> str:
        if platform.system() != "Darwin":
            raise DitnasError(
                f"ios: running the Benchmark app needs macOS with Xcode (this host is {platform.system()}); "
                f"copy the prepared ios/ folder to a Mac, run ios/{SCRIPT_FILE}, then `ditnas profile ingest ios/{LOG_FILE} --session <dir>`"
            )
        found = shutil.which(self.xcodebuild)
        if found is None:
            raise DitnasError(f"ios: `{self.xcodebuild}` was not found; install Xcode and its command-line tools (xcode-select --install)")
        return found

    def measure(self, prepared: list[Prepared], warmup: int, iters: int) -> list[dict[str, Any]]:
        check_counts(warmup, iters)
        self.check_runtime()
        if iters != GENERIC_TESTS_ITERATIONS:
            raise DitnasError(
                f"ios: the Benchmark app times {GENERIC_TESTS_ITERATIONS} iterations per test (GenericTests.mm), "
                f"not iters={iters}; open the session with iters={GENERIC_TESTS_ITERATIONS}"
            )
        if not prepared:
            return []
        folder = prepared[0].artifacts["ios_resource"].parent.parent.parent
        for item in prepared:
            shutil.copyfile(item.artifacts["ios_resource"], self.benchmark_dir / "Resources" / item.artifacts["ios_resource"].name)
        proc = subprocess.run(self.xcodebuild_command(), capture_output=True, text=True, check=False)
        log = folder / LOG_FILE
        atomic_write_text(log, proc.stdout + proc.stderr)
        rows = parse_xcodebuild_log(log)
        out = []
        for item in prepared:
            values = [r["latency_ms"] for r in rows if r["key"] == item.key() and r["method"] == "forward" and r["latency_ms"] is not None]
            if not values:
                raise DitnasError(f"ios: {log} has no forward measurement of {item.key()} (xcodebuild exit {proc.returncode}); read the log")
            out += [{"key": item.key(), "iteration": i, "latency_ms": v} for i, v in enumerate(values)]
        return out

    # ----- ingest ------------------------------------------------------------------------------
    def parse(self, artifact: Path) -> list[dict[str, Any]]:
        return parse_xcodebuild_log(Path(artifact))

    @classmethod
    def sniff(cls, probe: ArtifactProbe) -> str | None:
        return XCODEBUILD_LOG.name if probe.json is None and "measured [" in probe.text else None

    @classmethod
    def read_artifact(cls, path: Path, fmt: str = XCODEBUILD_LOG.name, **opts: Any) -> ParsedArtifact:
        """Forward tests' clock values (ms) per program; other tests' names are listed in `ignored`."""
        path = Path(path)
        rows = parse_xcodebuild_log(path)
        samples: dict[str, list[float]] = {}
        ignored: list[str] = []
        lines: dict[str, int] = {}
        for r in rows:
            if r["key"] is None:
                if r["test_name"] not in ignored:
                    ignored.append(r["test_name"])
                continue
            if not is_forward_time(r):
                continue
            if lines.setdefault(r["key"], r["line"]) != r["line"]:
                raise DitnasError(
                    f"xcodebuild log {path}: {r['key']} is measured on lines {lines[r['key']]} and {r['line']}; "
                    "ingest one run per log (split the log)"
                )
            samples.setdefault(r["key"], []).append(r["latency_ms"])
        timed = [r for r in rows if r["key"] is not None and r["device_model"]]
        device = {"device_model": timed[0]["device_model"], "os": timed[0]["os"]} if timed else {}
        return parsed_artifact(path, fmt, rows, samples, device=device, ignored=ignored)


def _machine_id(text: str) -> str:
    # iPhone17_2 -> iPhone17,2 (the app replaced the ',' of the hardware identifier by '_')
    return re.sub(r"^([A-Za-z]+\d+)_(\d+)$", r"\1,\2", text)


def parse_test_name(test: str) -> dict[str, Any]:
    """`test_forward_<resource>_iOS_18_1_iPhone17_2` -> method, resource, key, os, device_model."""
    m = TEST_NAME.match(test)
    if not m:
        return {"method": None, "resource": None, "key": None, "os": None, "device_model": None}
    cell = cell_from_name(m["resource"])
    return {
        "method": m["method"],
        "resource": m["resource"],
        "key": cell["key"] if cell else None,
        "os": f"{m['os']} {m['ver'].replace('_', '.')}",
        "device_model": _machine_id(m["machine"]),
    }


def parse_xcodebuild_log(path: Path) -> list[dict[str, Any]]:
    """One row per value of every XCTest `measured [...]` line: key, test_class, test_name, method,
    metric, unit, iteration, value (metric units), latency_ms (time metrics only), os, device_model, line.
    A line that says `measured [` but does not parse is a DitnasError naming its line number."""
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise DitnasError(f"xcodebuild log {path} is unreadable ({exc.strerror}); check the path") from None
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if "measured [" not in line:
            continue
        m = MEASURED.search(line)
        if not m:
            raise DitnasError(
                f"xcodebuild log {path} line {lineno}: a `measured [...]` line that does not parse "
                "(expected \"Test Case '-[Class test]' measured [Metric, unit] average: A, relative standard deviation: R%, "
                "values: [v1, v2, ...]\"); fix or remove the line"
            )
        try:
            values = [float(v) for v in m["values"].split(",") if v.strip()]
        except ValueError:
            raise DitnasError(f"xcodebuild log {path} line {lineno}: values [{m['values'][:60]}] are not numbers; fix or remove the line") from None
        if not values:
            raise DitnasError(f"xcodebuild log {path} line {lineno}: the values list is empty; re-run the test")
        metric, _, unit = m["metric"].rpartition(", ")
        metric, unit = (metric, unit.strip()) if metric else (m["metric"], "")
        scale = UNIT_SCALE_MS.get(unit)
        meta = parse_test_name(m["test"])
        for i, v in enumerate(values):
            rows.append(
                {
                    "key": meta["key"],
                    "test_class": m["cls"],
                    "test_name": m["test"],
                    "method": meta["method"],
                    "metric": metric,
                    "unit": unit,
                    "iteration": i,
                    "value": v,
                    "latency_ms": v * scale if scale is not None else None,
                    "os": meta["os"],
                    "device_model": meta["device_model"],
                    "line": lineno,
                }
            )
    if not rows:
        raise DitnasError(
            f"xcodebuild log {path} has no `measured [...]` lines; pass the stdout of `xcodebuild test` on the Benchmark app "
            "(the tests may have failed before measuring)"
        )
    return rows


def is_forward_time(row: dict[str, Any]) -> bool:
    return row["method"] == "forward" and row["metric"] == XCTEST_CLOCK_METRIC.rpartition(", ")[0] and row["latency_ms"] is not None


# ----------------------------------------------------------------------------------------------
# writing an xcodebuild log as XCTest and the Benchmark app do (tests and demos without a Mac)
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
