"""`android-adb`: ExecuTorch + XNNPACK on an Android phone, driven over adb (toolchain.md §2.2).

prepare:  the XNNPACK lowering of `executorch-xnnpack` (same .pte, .etrecord, delegation report and
          parity check; nothing duplicated), plus `android_plan.json` (program key -> on-device
          names) and `run_on_device.sh`, the exact adb sequence `measure` runs, for manual use.
measure:  `adb push` the runner (optional) and each .pte, `adb shell executor_runner --model_path ...
          --num_executions <warmup+iters> --cpu_threads <threads> --etdump_path ...`, `adb pull` the
          ETDump, and return the last `iters` `Method::execute` times of it (executor_runner has no
          warm-up flag, so warm-up runs are executed and dropped). A `<name>.run.json` sidecar beside
          each pulled dump records key, warm-up, iterations and device, so the dump can be re-ingested.
          The runner must be built with the event tracer (EXECUTORCH_BUILD_DEVTOOLS=ON,
          EXECUTORCH_ENABLE_EVENT_TRACER=ON); each sample is therefore a traced run.
minibench:`run_minibench` runs the minibench app once per program (it benchmarks one .pte per
          launch): push the .pte to its own folder, delete the old results, start
          BenchmarkActivity, poll `benchmark_results.json`; all records go into one file. It holds
          averages, not per-run samples, so it is ingested (`ditnas profile ingest`), not returned
          by `measure`.
parse:    minibench `benchmark_results.json` -> one row per record, with device info; an ETDump ->
          the xnnpack backend's rows.
ingest:   format `minibench-json` (a JSON list of `{benchmarkModel, metric, actualValue,
          targetValue, deviceInfo}` records, BenchmarkMetric.kt): `avg_inference_latency(ms)` is
          ONE row per model, flagged `aggregate`. Pulled ETDumps are read by executorch-xnnpack's
          `etdump` format (they may feed an android-adb session).
writers:  `minibench_records` / `write_minibench_json` write the file exactly as ModelRunner.kt and
          Gson do, for tests and demos without a phone.

# assumption: minibench reports averages only; its `avg_inference_latency(ms)` is stored as one row
# (iteration 0) per model and flagged `aggregate` in the manifest log, because it is the metric the
# iOS log maps to as well (ExecuTorch's extract_benchmark_results.py), keeping both phones comparable.
"""

from __future__ import annotations

import json
import platform
import shlex
import shutil
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ditnas.errors import DitnasError
from ditnas.io import atomic_write_text, write_json
from ditnas.latency_models.artifacts import (
    ArtifactProbe,
    ParsedArtifact,
    cell_from_name,
    device_model_name,
    load_json,
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
from ditnas.latency_models.backends.executorch_xnnpack import (
    PARITY_ATOL,
    ExecuTorchXnnpackBackend,
    execute_times,
    parse_etdump,
)
from ditnas.latency_models.programs import Program

PLAN_FILE = "android_plan.json"
SCRIPT_FILE = "run_on_device.sh"
MINIBENCH_PACKAGE = "org.pytorch.minibench"
MINIBENCH_ACTIVITY = f"{MINIBENCH_PACKAGE}/{MINIBENCH_PACKAGE}.BenchmarkActivity"
MINIBENCH_DIR = "/data/local/tmp/minibench"
MINIBENCH_RESULTS = "files/benchmark_results.json"  # in the app's data folder (BenchmarkActivity.kt)
INSTALL_ADB = "install Android platform-tools (`apt install adb`, or `sdkmanager platform-tools`) or pass adb=<path to adb>"
MINIBENCH_FIELDS = ("benchmarkModel", "metric", "actualValue", "targetValue", "deviceInfo")
MINIBENCH_LATENCY_METRIC = "avg_inference_latency(ms)"
MINIBENCH_JSON = ArtifactFormat(
    "minibench-json",
    "Android minibench benchmark_results.json (list of {benchmarkModel, metric, actualValue, targetValue, deviceInfo})",
    feeds=("android-adb",),
)


@register_backend
class AndroidAdbBackend(Backend):
    name = "android-adb"
    requires = ("executorch",)
    install = "executorch==1.5.1 (with torch==2.13.0)"
    precision = "fp32"
    compute_unit = "cpu"
    formats = (MINIBENCH_JSON,)

    def __init__(
        self,
        threads: int = 1,
        *,
        adb: str = "adb",
        serial: str | None = None,
        device_dir: str = "/data/local/tmp/ditnas",
        runner: Path | str | None = None,
        strict: bool = False,
        parity_atol: float | None = PARITY_ATOL,
        timeout_s: float = 600.0,
        device_info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(threads)
        self.adb = adb  # a name looked up on PATH, or a path
        self.serial = serial
        self.device_dir = device_dir.rstrip("/")
        # a cross-compiled executor_runner on this host to push; None: it is already on the device
        self.runner = Path(runner) if runner is not None else None
        self.timeout_s = timeout_s
        self._xnnpack = ExecuTorchXnnpackBackend(threads, strict=strict, parity_atol=parity_atol, etdump=False,
                                                etrecord=True)  # the phone writes the ETDumps; their op names
        # device fields known without adb (e.g. from an artifact's deviceInfo when ingesting)
        self._device = dict(device_info) if device_info else None
        self._checked = False  # `adb devices` asked once per backend object

    # ----- adb ---------------------------------------------------------------------------------
    @property
    def remote_runner(self) -> str:
        return f"{self.device_dir}/executor_runner"

    def adb_path(self) -> str:
        found = shutil.which(self.adb)
        if found is None:
            raise DitnasError(f"android-adb: `{self.adb}` was not found; {INSTALL_ADB}")
        return found

    def _run(self, args: list[str], *, device: bool = True, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [self.adb_path(), *(["-s", self.serial] if device and self.serial else []), *args]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise DitnasError(f"android-adb: `{shlex.join(cmd)}` did not finish in {self.timeout_s:.0f} s; check the device") from None
        if check and proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise DitnasError(f"android-adb: `{shlex.join(cmd)}` failed (exit {proc.returncode}: {tail[0]}); check the device and paths")
        return proc

    def attached(self) -> list[str]:
        """Serials `adb devices` lists in state `device`."""
        out = self._run(["devices"], device=False).stdout
        serials = []
        for line in out.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 2 and parts[1] == "device":
                serials.append(parts[0])
        return serials

    def ensure_device(self) -> str:
        """The serial to talk to; a DitnasError when none (or, without `serial`, several) are attached."""
        if self._checked and self.serial:
            return self.serial
        serials = self.attached()
        if self.serial:
            if self.serial not in serials:
                raise DitnasError(
                    f"android-adb: device {self.serial} is not attached (adb devices lists {serials or 'none'}); "
                    "connect it with USB debugging on, or pass another serial"
                )
            self._checked = True
            return self.serial
        if not serials:
            raise DitnasError("android-adb: no Android device attached (adb devices lists none); connect a phone with USB debugging on and accept the host key")
        if len(serials) > 1:
            raise DitnasError(f"android-adb: several devices attached ({', '.join(serials)}); pass serial=<one of them>")
        self.serial = serials[0]
        self._checked = True
        return self.serial

    def getprops(self) -> dict[str, str]:
        props = {}
        for line in self._run(["shell", "getprop"]).stdout.splitlines():
            # format: [ro.product.model]: [Pixel 8]
            if line.startswith("[") and "]: [" in line:
                name, _, value = line.partition("]: [")
                props[name[1:]] = value.rstrip().removesuffix("]")
        return props

    # ----- info --------------------------------------------------------------------------------
    def tool_versions(self) -> dict[str, str | None]:
        return {"torch": package_version("torch"), "executorch": package_version("executorch")}

    def device(self) -> dict[str, Any]:
        if self._device is None:
            serial = self.ensure_device()
            props = self.getprops()
            self._device = {
                "device_id": serial,
                "device_model": props.get("ro.product.model"),
                "device_brand": props.get("ro.product.brand"),
                "soc": props.get("ro.soc.model") or props.get("ro.board.platform"),
                "os": f"Android {props.get('ro.build.version.release', '?')}",
                "arch": props.get("ro.product.cpu.abi"),
            }
        return {**self._device, "host": platform.node()}

    # ----- prepare -----------------------------------------------------------------------------
    def remote_names(self, item: Prepared) -> dict[str, str]:
        name = device_model_name(item.key())
        return {"name": name, "pte": f"{self.device_dir}/{name}.pte", "etdump": f"{self.device_dir}/{name}.etdp"}

    def runner_command(self, item: Prepared, warmup: int, iters: int) -> list[str]:
        remote = self.remote_names(item)
        return [
            "shell",
            self.remote_runner,
            "--model_path",
            remote["pte"],
            "--num_executions",
            str(warmup + iters),
            "--cpu_threads",
            str(self.threads),
            "--etdump_path",
            remote["etdump"],
        ]

    def local_etdump(self, item: Prepared) -> Path:
        return item.artifacts["pte"].parent / "android" / f"{self.remote_names(item)['name']}.etdp"

    def command_plan(self, prepared: list[Prepared], warmup: int, iters: int) -> list[list[str]]:
        """adb argument lists (without the adb path and -s), in order: what `measure` runs."""
        plan = [["shell", "mkdir", "-p", self.device_dir]]
        if self.runner is not None:
            plan += [["push", str(self.runner), self.remote_runner], ["shell", "chmod", "755", self.remote_runner]]
        else:
            plan.append(["shell", "ls", self.remote_runner])
        for item in prepared:
            remote = self.remote_names(item)
            plan += [
                ["push", str(item.artifacts["pte"]), remote["pte"]],
                self.runner_command(item, warmup, iters),
                ["pull", remote["etdump"], str(self.local_etdump(item))],
            ]
        return plan

    def prepare(self, programs: list[Program], workdir: Path, *, warmup: int = 10, iters: int = 50) -> list[Prepared]:
        """Lower with the XNNPACK path and write the device plan + script (with these counts)."""
        workdir = Path(workdir)
        prepared = self._xnnpack.prepare(programs, workdir)
        for item in prepared:
            item.artifacts["device_pte"] = Path(self.remote_names(item)["pte"])
            item.report["device_name"] = self.remote_names(item)["name"]
        self._write_plan(workdir, prepared, warmup, iters)
        return prepared

    def _write_plan(self, workdir: Path, prepared: list[Prepared], warmup: int, iters: int) -> None:
        # session.run prepares one program at a time: merge into the plan already there
        plan_path = workdir / PLAN_FILE
        try:
            plan = json.loads(plan_path.read_text()) if plan_path.exists() else {}
        except ValueError:
            plan = {}  # a damaged plan is rebuilt from what is prepared now
        programs = {p["key"]: p for p in plan.get("programs", [])}
        for item in prepared:
            programs[item.key()] = {
                **item.program.cell.fields(),
                "local_pte": item.artifacts["pte"].name,
                "etrecord": item.artifacts["etrecord"].name,
                **{f"remote_{k}": v for k, v in self.remote_names(item).items()},
            }
        plan = {
            "backend": self.name,
            "device_dir": self.device_dir,
            "runner": str(self.runner) if self.runner else None,
            "threads": self.threads,
            "warmup": warmup,
            "iters": iters,
            "programs": sorted(programs.values(), key=lambda p: p["key"]),
        }
        write_json(plan_path, plan)
        # the script: the same adb sequence as measure, for a host where ditnas is not installed
        items = [_PlanItem(workdir / p["local_pte"], p["key"]) for p in plan["programs"]]
        lines = [
            "#!/bin/sh",
            "# Generated by ditnas (android-adb). Runs every program on the attached phone with",
            "# executor_runner built with the event tracer; then: ditnas profile ingest android/*.etdp --session <dir>",
            "# (executor_runner has no warm-up flag: ingest drops the first WARMUP runs, see the .run.json files).",
            "set -eu",
            'cd "$(dirname "$0")"',
            f'SERIAL="${{SERIAL:-{self.serial or ""}}}"',
            'ADB="${ADB:-adb}${SERIAL:+ -s $SERIAL}"',
            "mkdir -p android",
        ]
        for args in self.command_plan(items, warmup, iters):  # type: ignore[arg-type]
            if args[0] in ("push", "pull"):
                args = [args[0], *(_relative(a, workdir) for a in args[1:])]
            lines.append("$ADB " + shlex.join(args))
        for p in plan["programs"]:
            sidecar = {"key": p["key"], "warmup": warmup, "iters": iters, "threads": self.threads, "backend": self.name}
            lines.append(f"echo {shlex.quote(json.dumps(sidecar))} > {shlex.quote('android/' + p['remote_name'] + '.run.json')}")
        script = workdir / SCRIPT_FILE
        atomic_write_text(script, "\n".join(lines) + "\n")
        script.chmod(0o755)

    # ----- measure -----------------------------------------------------------------------------
    def measure(self, prepared: list[Prepared], warmup: int, iters: int) -> list[dict[str, Any]]:
        check_counts(warmup, iters)
        self.adb_path()
        self.ensure_device()
        device = self.info()
        rows: list[dict[str, Any]] = []
        for args in self.command_plan(prepared, warmup, iters):
            if args[0] == "pull":
                Path(args[2]).parent.mkdir(parents=True, exist_ok=True)
            proc = self._run(args, check=args[:2] != ["shell", "ls"])
            if args[:2] == ["shell", "ls"] and proc.returncode != 0:
                raise DitnasError(
                    f"android-adb: {self.remote_runner} is not on the device; build executor_runner with the event tracer "
                    "(toolchain.md §2.2) and pass runner=<path to it> so it is pushed"
                )
        for item in prepared:
            etdp = self.local_etdump(item)
            if not etdp.is_file():
                raise DitnasError(f"android-adb: adb pull left no ETDump at {etdp}; was executor_runner built with the event tracer?")
            sidecar = {"key": item.key(), "warmup": warmup, "iters": iters, "threads": self.threads, "backend": self.name, "device": device}
            write_json(etdp.with_name(etdp.stem + ".run.json"), sidecar)
            item.artifacts["etdump"] = etdp
            times = execute_times(parse_etdump(etdp, item.artifacts.get("etrecord")), etdp)
            if len(times) != warmup + iters:
                raise DitnasError(
                    f"android-adb: ETDump {etdp} holds {len(times)} runs, expected {warmup + iters} "
                    "(warm-up + iterations); re-run, the runner may have stopped early"
                )
            rows += [{"key": item.key(), "iteration": i, "latency_ms": t} for i, t in enumerate(times[warmup:])]
        return rows

    # ----- minibench ---------------------------------------------------------------------------
    def minibench_commands(self, item: Prepared, warmup: int, iters: int) -> list[list[str]]:
        """The adb sequence that benchmarks ONE program with the minibench app.

        One program per launch: BenchmarkActivity.kt benchmarks only the first .pte it finds in
        `model_dir` and overwrites files/benchmark_results.json, so each program gets its own folder
        and the previous results are deleted first (as android-llm-device-farm-test-spec.yml.j2 does
        with `run-as ... rm -rf files`), so a stale file is never read as this program's."""
        name = self.remote_names(item)["name"]
        folder = f"{MINIBENCH_DIR}/{name}"
        return [
            ["shell", "mkdir", "-p", folder],
            ["push", str(item.artifacts["pte"]), f"{folder}/{name}.pte"],
            ["shell", "run-as", MINIBENCH_PACKAGE, "rm", "-f", MINIBENCH_RESULTS],
            ["shell", "am", "start", "-W", "-S", "-n", MINIBENCH_ACTIVITY, "--es", "model_dir", folder,
             "--ei", "num_iter", str(iters), "--ei", "num_warm_up_iter", str(warmup)],
            ["shell", "run-as", MINIBENCH_PACKAGE, "cat", MINIBENCH_RESULTS],
        ]  # fmt: skip

    def run_minibench(self, prepared: list[Prepared], warmup: int, iters: int, out: Path, *, poll_s: float = 10.0) -> Path:
        """Run the minibench app on each prepared program in turn and save all their records as one
        benchmark_results.json at `out`. `am start -W` returns when the activity is shown, not when
        the benchmark ends, so the results file is polled (every `poll_s`, up to `timeout_s`)."""
        check_counts(warmup, iters)
        self.ensure_device()
        records: list[Any] = []
        for item in prepared:
            *steps, fetch = self.minibench_commands(item, warmup, iters)
            for args in steps:
                self._run(args)
            deadline = time.monotonic() + self.timeout_s
            while True:
                text = self._run(fetch, check=False).stdout.strip()
                if text or time.monotonic() > deadline:
                    break
                time.sleep(poll_s)
            try:
                got = json.loads(text)
            except ValueError:
                raise DitnasError(
                    f"android-adb: minibench wrote no readable {MINIBENCH_RESULTS} for {item.key()} within {self.timeout_s:.0f} s "
                    f"(got {text[:60]!r}); check `adb logcat` for the app, or raise timeout_s"
                ) from None
            records += got if isinstance(got, list) else [got]
        write_minibench_json(Path(out), records)
        parse_minibench_json(Path(out))  # refuse now what ingest would refuse later
        return Path(out)

    # ----- ingest ------------------------------------------------------------------------------
    def parse(self, artifact: Path) -> list[dict[str, Any]]:
        artifact = Path(artifact)
        if artifact.suffix == ".json":
            return parse_minibench_json(artifact)
        return parse_etdump(artifact)

    @classmethod
    def sniff(cls, probe: ArtifactProbe) -> str | None:
        data = probe.json
        if isinstance(data, list) and data and isinstance(data[0], dict) and "benchmarkModel" in data[0]:
            return MINIBENCH_JSON.name
        return None

    @classmethod
    def read_artifact(cls, path: Path, fmt: str = MINIBENCH_JSON.name, **opts: Any) -> ParsedArtifact:
        """One sample per ditnas model: its `avg_inference_latency(ms)` (an average: `aggregate`).
        Models that are no ditnas program, and failed loads, are listed in `ignored`."""
        path = Path(path)
        rows = parse_minibench_json(path)
        samples: dict[str, list[float]] = {}
        ignored: list[str] = []
        for r in rows:
            if r["key"] is None:
                if r["name"] not in ignored:
                    ignored.append(r["name"])
            elif r["metric"] == MINIBENCH_LATENCY_METRIC:
                if r["key"] in samples:
                    raise DitnasError(f"minibench results {path}: model {r['name']!r} has two {MINIBENCH_LATENCY_METRIC} records; keep one run per file")
                samples[r["key"]] = [r["value"]]
            elif r["metric"] == "load_status" and r["value"] != 0:
                ignored.append(f"{r['name']} (load_status {r['value']:g})")
        # deviceInfo: device = Build.BRAND, arch = Build.MODEL (BenchmarkMetric.kt)
        device = {"device_model": rows[0]["arch"], "device_brand": rows[0]["device"], "os": rows[0]["os"]} if rows else {}
        return parsed_artifact(path, fmt, rows, samples, device=device, aggregate=True, ignored=ignored)


class _PlanItem:
    """Just enough of a Prepared to render the script from the plan file."""

    def __init__(self, pte: Path, key: str) -> None:
        self.artifacts = {"pte": pte}
        self._key = key

    def key(self) -> str:
        return self._key


def _relative(path: str, base: Path) -> str:
    try:
        return str(Path(path).relative_to(base))
    except ValueError:
        return path


def parse_minibench_json(path: Path) -> list[dict[str, Any]]:
    """One row per minibench record: key (None when the name is not a ditnas program), name, backend,
    quantization, metric, value, target, and the deviceInfo fields device, arch, os, totalMem, availMem."""
    path = Path(path)
    data = load_json(path, "minibench results")
    if not isinstance(data, list):
        raise DitnasError(f"minibench results {path}: expected a JSON list of benchmark records, got {type(data).__name__}")
    rows = []
    for index, rec in enumerate(data):
        missing = [f for f in MINIBENCH_FIELDS if not isinstance(rec, dict) or f not in rec]
        if missing:
            raise DitnasError(f"minibench results {path}: record {index} lacks {missing}; is this a benchmark_results.json?")
        model, dev = rec["benchmarkModel"], rec["deviceInfo"]
        name = str(model.get("name", ""))
        cell = cell_from_name(name)
        if cell is None and model.get("backend"):
            cell = cell_from_name(f"{name}_{model.get('backend')}_{model.get('quantization', '')}")
        try:
            value, target = float(rec["actualValue"]), float(rec["targetValue"] or 0.0)
        except (TypeError, ValueError):
            raise DitnasError(f"minibench results {path}: record {index} actualValue {rec['actualValue']!r} is not a number") from None
        rows.append(
            {
                "key": cell["key"] if cell else None,
                "name": name,
                "backend": model.get("backend", ""),
                "quantization": model.get("quantization", ""),
                "metric": rec["metric"],
                "value": value,
                "target": target,
                "device": dev.get("device"),
                "arch": dev.get("arch"),
                "os": dev.get("os"),
                "totalMem": dev.get("totalMem"),
                "availMem": dev.get("availMem"),
                "latency_ms": value if rec["metric"] == MINIBENCH_LATENCY_METRIC else None,
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------
# writing benchmark_results.json as minibench does (tests and demos without a phone)
# ----------------------------------------------------------------------------------------------
@dataclass
class AndroidDeviceInfo:
    """minibench's DeviceInfo: `device` = Build.BRAND, `arch` = Build.MODEL, `os` = "Android <release>"."""

    device: str = "google"
    arch: str = "Pixel 8"
    os: str = "Android 15"
    # the app reads a fresh ActivityManager.MemoryInfo() without getMemoryInfo(), so it writes 0
    totalMem: int = 0
    availMem: int = 0


def trimmed_mean(values: Sequence[float]) -> float:
    """minibench's trimmean_inference_latency: the mean of the sorted latencies
    `subList(size / 10, size * 9 / 10)` (ModelRunner.kt; integer division, so 5 runs keep the 4
    fastest). An empty slice (a single run) falls back to all runs."""
    ordered = sorted(values)
    n = len(ordered)
    kept = ordered[n // 10 : n * 9 // 10] or ordered
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
    """The records minibench writes for one model, in ModelRunner.kt's order: average and
    trimmed-mean latency over its timed iterations, load time, load status, PSS memory. A failed
    load (load_status != 0) writes only load time and status, as the app does."""
    model = {"name": name, "backend": backend, "quantization": quantization}

    def rec(metric: str, value: float) -> dict[str, Any]:
        # Gson writes the fields in declaration order (BenchmarkMetric.kt)
        return {"benchmarkModel": dict(model), "metric": metric, "actualValue": float(value), "targetValue": 0.0, "deviceInfo": asdict(device)}

    if load_status != 0 or not latencies_ms:
        return [rec("model_load_time(ms)", load_ms), rec("load_status", load_status)]
    return [
        rec(MINIBENCH_LATENCY_METRIC, statistics.fmean(latencies_ms)),
        rec("trimmean_inference_latency(ms)", trimmed_mean(latencies_ms)),
        rec("model_load_time(ms)", load_ms),
        rec("load_status", load_status),
        rec("ram_pss_usage(mb)", pss_mb),
    ]


def write_minibench_json(path: Path, records: Sequence[dict[str, Any]]) -> Path:
    write_json(Path(path), list(records))
    return Path(path)
