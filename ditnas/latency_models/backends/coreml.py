"""`coreml`: one Core ML `.mlpackage` per program via coremltools (toolchain.md §1.2, §2.4).

prepare:  torch.export -> run_decompositions({}) -> ct.convert(convert_to="mlprogram",
          compute_precision=FLOAT16, minimum_deployment_target=iOS18) -> `<name>.mlpackage`
          (xnnpack-notes.md: this recipe converts a DiT block in ~1 s on Linux; without
          run_decompositions it fails with "Provided Dialect: TRAINING"). Written to a temporary
          folder and renamed, so no half package is left under the final name.
measure:  needs macOS (coremltools has no runtime elsewhere: `libcoremlpython` is absent). On macOS
          each sample is one `MLModel.predict` bracketed by perf_counter_ns, and the samples are also
          written as a Core ML benchmark JSON beside the package. On any other host: a DitnasError.
parse:    the Core ML benchmark JSON (`COREML_BENCHMARK_FORMAT`: coremltools
          `MLModelBenchmarker.Measurement`s, `statistics {minimum, maximum, average, std_dev,
          median}` and `samples` in ms, for `load` and `predict`) -> one row per sample.

ingest:   format `coreml-benchmark-json` (an object with `format` = COREML_BENCHMARK_FORMAT):
          `predict.samples` per program. No upstream tool writes a Core ML benchmark report file
          (MLModelBenchmarker returns dataclasses; the ExecuTorch Benchmark app's CoreMLTests print
          XCTest lines), so the schema is ours, shaped after `MLModelBenchmarker.Measurement`.

Only whole-program Core ML times are measurements; per-op Core ML times are estimates
(toolchain.md TL;DR 4), so none are produced here.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ditnas.errors import DitnasError
from ditnas.io import write_json
from ditnas.latency_models.artifacts import (
    ArtifactProbe,
    ParsedArtifact,
    cell_from_name,
    load_json,
    parsed_artifact,
)
from ditnas.latency_models.backends.base import (
    ArtifactFormat,
    Backend,
    Prepared,
    check_counts,
    host_info,
    package_version,
    register_backend,
)
from ditnas.latency_models.backends.executorch_xnnpack import file_stem
from ditnas.latency_models.programs import Program

COMPUTE_UNITS = ("ALL", "CPU_AND_GPU", "CPU_AND_NE", "CPU_ONLY")
PRECISIONS = {"fp16": "FLOAT16", "fp32": "FLOAT32"}
COREML_BENCHMARK_FORMAT = "ditnas.coreml-benchmark/1"
COREML_BENCHMARK_JSON = ArtifactFormat(
    "coreml-benchmark-json",
    f"Core ML benchmark JSON (object with format={COREML_BENCHMARK_FORMAT!r})",
    feeds=("coreml",),
)


@register_backend
class CoreMLBackend(Backend):
    name = "coreml"
    requires = ("coremltools",)
    install = "coremltools==9.0"
    precision = "fp16"
    compute_unit = "cpu_and_ne"
    formats = (COREML_BENCHMARK_JSON,)

    def __init__(
        self,
        threads: int = 1,
        *,
        compute_units: str = "CPU_AND_NE",
        precision: str = "fp16",
        target: str = "iOS18",
        device_info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(threads)  # assumption: Core ML picks its own threads; the count is only recorded
        if compute_units not in COMPUTE_UNITS:
            raise DitnasError(f"coreml: compute_units={compute_units!r}; choose from {', '.join(COMPUTE_UNITS)}")
        if precision not in PRECISIONS:
            raise DitnasError(f"coreml: precision={precision!r}; choose from {', '.join(PRECISIONS)}")
        self.compute_units = compute_units
        self.compute_unit = compute_units.lower()  # instance value shadows the class default
        self.precision = precision
        self.target = target
        self._device = dict(device_info) if device_info else None

    def tool_versions(self) -> dict[str, str | None]:
        return {"torch": package_version("torch"), "coremltools": package_version("coremltools")}

    def device(self) -> dict[str, Any]:
        return self._device or host_info()

    # ----- prepare -----------------------------------------------------------------------------
    def convert(self, program: Program) -> Any:
        """The program as a coremltools MLModel (mlprogram)."""
        import coremltools as ct

        module = program.module.eval().requires_grad_(False)
        with torch.no_grad():
            ep = torch.export.export(module, tuple(program.inputs)).run_decompositions({})
        try:
            return ct.convert(
                ep,
                convert_to="mlprogram",
                compute_precision=getattr(ct.precision, PRECISIONS[self.precision]),
                minimum_deployment_target=getattr(ct.target, self.target),
                compute_units=getattr(ct.ComputeUnit, self.compute_units),
            )
        except Exception as exc:  # noqa: BLE001 -- coremltools raises many types for unsupported ops
            raise DitnasError(
                f"coreml: program {program.key()} does not convert ({type(exc).__name__}: {str(exc)[:200]}); "
                "rewrite the unsupported op or profile this cell with executorch-xnnpack"
            ) from None

    def prepare(self, programs: list[Program], workdir: Path) -> list[Prepared]:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        prepared = []
        for program in programs:
            model = self.convert(program)
            target = workdir / f"{file_stem(program.key())}.mlpackage"
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=workdir))
            try:
                model.save(str(tmp / target.name))
                if target.exists():
                    shutil.rmtree(target)
                os.replace(tmp / target.name, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            spec = model.get_spec()
            report = {
                "inputs": [i.name for i in spec.description.input],
                "outputs": [o.name for o in spec.description.output],
                "precision": self.precision,
                "target": self.target,
                "compute_units": self.compute_units,
                "mlpackage_bytes": sum(f.stat().st_size for f in target.rglob("*") if f.is_file()),
            }
            prepared.append(Prepared(program, artifacts={"mlpackage": target}, report=report))
        return prepared

    # ----- measure -----------------------------------------------------------------------------
    @staticmethod
    def check_runtime() -> None:
        if platform.system() != "Darwin":
            raise DitnasError(
                f"coreml: running a Core ML model needs macOS (this host is {platform.system()}: coremltools converts "
                "here but cannot predict); measure on a Mac, or with MLModelBenchmarker on a tethered iPhone, and "
                "`ditnas profile ingest` its benchmark JSON"
            )

    def measure(self, prepared: list[Prepared], warmup: int, iters: int) -> list[dict[str, Any]]:
        check_counts(warmup, iters)
        self.check_runtime()
        import coremltools as ct  # macOS only from here: not exercised by this project's Linux tests

        rows: list[dict[str, Any]] = []
        for item in prepared:
            t0 = time.perf_counter_ns()
            model = ct.models.MLModel(str(item.artifacts["mlpackage"]), compute_units=getattr(ct.ComputeUnit, self.compute_units))
            load_ms = (time.perf_counter_ns() - t0) / 1e6
            feeds = {name: t.numpy() for name, t in zip(item.report["inputs"], item.program.inputs)}
            for _ in range(warmup):
                model.predict(feeds)
            samples = []
            for i in range(iters):
                t0 = time.perf_counter_ns()
                model.predict(feeds)
                samples.append((time.perf_counter_ns() - t0) / 1e6)
                rows.append({"key": item.key(), "iteration": i, "latency_ms": samples[-1]})
            payload = coreml_benchmark_payload(
                [CoreMLBenchmarkResult(item.key(), item.artifacts["mlpackage"].name, samples, [load_ms])],
                device=self.info(),
                compute_units=self.compute_units,
                tool="coremltools.MLModel.predict",
                tool_version=package_version("coremltools"),
                warmup=warmup > 0,
            )
            item.artifacts["benchmark"] = write_coreml_benchmark_json(item.artifacts["mlpackage"].with_suffix(".benchmark.json"), payload)
        return rows

    # ----- ingest ------------------------------------------------------------------------------
    def parse(self, artifact: Path) -> list[dict[str, Any]]:
        return parse_coreml_benchmark_json(Path(artifact))

    @classmethod
    def sniff(cls, probe: ArtifactProbe) -> str | None:
        data = probe.json
        return COREML_BENCHMARK_JSON.name if isinstance(data, dict) and data.get("format") == COREML_BENCHMARK_FORMAT else None

    @classmethod
    def read_artifact(cls, path: Path, fmt: str = COREML_BENCHMARK_JSON.name, **opts: Any) -> ParsedArtifact:
        """`predict.samples` (ms) per program; the file's device fields (device_id, device_model, os)."""
        path = Path(path)
        rows = parse_coreml_benchmark_json(path)
        samples: dict[str, list[float]] = {}
        for r in rows:
            if r["phase"] == "predict":
                samples.setdefault(r["key"], []).append(r["latency_ms"])
        dev = load_json(path, "Core ML benchmark").get("device") or {}
        device = {k: v for k, v in dev.items() if k in ("device_id", "device_model", "os")}
        return parsed_artifact(path, fmt, rows, samples, device=device)


def parse_coreml_benchmark_json(path: Path) -> list[dict[str, Any]]:
    """One row per sample: key, model, phase (load | predict), iteration, latency_ms, compute_units,
    plus the file's device fields (device_id, device_model, os)."""
    path = Path(path)
    data = load_json(path, "Core ML benchmark")
    if not isinstance(data, dict) or data.get("format") != COREML_BENCHMARK_FORMAT:
        raise DitnasError(f"Core ML benchmark {path}: field 'format' is not {COREML_BENCHMARK_FORMAT!r}; write it with coreml.coreml_benchmark_payload")
    device = data.get("device") or {}
    rows = []
    for index, res in enumerate(data.get("results") or []):
        name = res.get("key") or res.get("model") or ""
        cell = cell_from_name(name) or cell_from_name(str(res.get("model", "")))
        if cell is None:
            raise DitnasError(f"Core ML benchmark {path}: results[{index}] names no ditnas program ({name!r}); set its 'key'")
        for phase in ("load", "predict"):
            m = res.get(phase) or {}
            samples = m.get("samples")
            if not isinstance(samples, list):
                raise DitnasError(f"Core ML benchmark {path}: results[{index}].{phase}.samples is missing; it must list the times in ms")
            for i, v in enumerate(samples):
                rows.append(
                    {
                        "key": cell["key"],
                        "model": res.get("model"),
                        "phase": phase,
                        "iteration": i,
                        "latency_ms": float(v),
                        "compute_units": data.get("compute_units"),
                        "device_id": device.get("device_id"),
                        "device_model": device.get("device_model"),
                        "os": device.get("os"),
                    }
                )
    if not any(r["phase"] == "predict" for r in rows):
        raise DitnasError(f"Core ML benchmark {path} holds no predict samples; re-run the benchmark")
    return rows


# ----------------------------------------------------------------------------------------------
# writing the Core ML benchmark JSON (coremltools MLModelBenchmarker measurements)
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
