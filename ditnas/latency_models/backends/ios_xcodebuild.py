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

# assumption: a forward test's values are its per-iteration wall times (XCTClockMetric over
# XCTMeasureOptions.iterationCount = 20 in GenericTests.mm; XCTest runs one extra, unreported,
# first iteration), so they are the samples; load tests are kept as rows but are not samples.
"""

from __future__ import annotations

import platform
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

from ditnas.errors import DitnasError
from ditnas.io import atomic_write_text, write_json
from ditnas.latency_models.artifacts import (
    XCTEST_CLOCK_METRIC,
    cell_from_name,
    device_model_name,
)
from ditnas.latency_models.backends.base import (
    Backend,
    Prepared,
    check_counts,
    package_version,
)
from ditnas.latency_models.backends.executorch_xnnpack import ExecuTorchXnnpackBackend
from ditnas.latency_models.programs import Program

PLAN_FILE = "ios_plan.json"
SCRIPT_FILE = "run_xcodebuild.sh"
LOG_FILE = "xcodebuild.log"
GENERIC_TESTS_ITERATIONS = 20  # XCTMeasureOptions.iterationCount in GenericTests.mm (forward)

# the measured line; `values` is what makes one row per iteration possible
MEASURED = re.compile(
    r"Test Case\s+'-\[(?P<cls>[\w.]+)\s+(?P<test>[\w+]+)\]'\s+measured\s+\[(?P<metric>[^\]]+)\]\s+"
    r"average:\s+(?P<avg>[-+\d.eE]+),\s+relative standard deviation:\s+(?P<rsd>[-+\d.eE]+)%,\s+"
    r"values:\s+\[(?P<values>[^\]]*)\]"
)
TEST_NAME = re.compile(
    r"^test_(?P<method>[A-Za-z]+)_(?P<resource>\w+?)_(?P<os>iOS|iPadOS|macOS|visionOS|tvOS)_(?P<ver>\d+(?:_\d+)*)_(?P<machine>[A-Za-z]\w*)$"
)
UNIT_SCALE_MS = {"s": 1e3, "ms": 1.0, "us": 1e-3, "ns": 1e-6}


class IosBackend(Backend):
    name = "ios"
    requires = ("executorch",)
    precision = "fp32"
    compute_unit = "cpu"

    def __init__(
        self,
        threads: int = 1,
        *,
        udid: str | None = None,
        benchmark_dir: Path | str = "executorch/extension/benchmark/apple/Benchmark",
        xcodebuild: str = "xcodebuild",
        development_team: str | None = None,
        strict: bool = False,
        parity_atol: float | None = 1e-4,
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
