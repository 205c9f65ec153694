"""`executorch-xnnpack`: ExecuTorch with the XNNPACK delegate, run and timed in this process.

prepare:  lowering.lower (the one recipe: freeze, torch.export, constant_prop_pass,
          to_edge_transform_and_lower(XnnpackPartitioner), generate_etrecord=True) -> <name>.pte + <name>.etrecord + <name>.delegation.json,
          with a delegation report and an output parity check against eager.
reuse:    a program whose .pte, .etrecord and .delegation.json (written last) are on disk is not
          lowered again, so an interrupted `ditnas profile` resumes where lowering stopped.
measure:  executorch.runtime loads every .pte; each timed sample is one `Method.execute` bracketed
          by time.perf_counter_ns, all programs interleaved (base.interleaved_rounds). Then a short
          separate run with the event tracer on writes <name>.etdp (per-op events) for programs
          without one, so tracing overhead never enters the timed samples.
parse:    an .etdp (+ the .etrecord beside it) -> one row per event per run via the Inspector.
ingest:   format `etdump` (flatbuffer identifier `ED00` at bytes 8..12), whichever device wrote it
          (this host, executor_runner on a phone): the per-run `Method::execute` times, minus the
          warm-up runs its `<name>.run.json` sidecar names, are the samples of the program that
          sidecar (or the file name) names.

Every API here was checked against the installed executorch 1.5.1 (toolchain.md §1.1, §2.1).
executorch is imported lazily so `get_backend` can report it missing with an install hint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ditnas.errors import DitnasError
from ditnas.io import write_json
from ditnas.latency_models.artifacts import (
    ArtifactProbe,
    ParsedArtifact,
    cell_from_name,
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
from ditnas.latency_models.lowering import COMPUTE_OPS, delegation_report  # noqa: F401 -- old import path
from ditnas.latency_models.lowering import Lowered, check_recipe, input_specs, recipe_fingerprint, sidecar_path, write_pte
from ditnas.latency_models.lowering import lower as lower_program
from ditnas.latency_models.programs import Program

# COMPUTE_OPS and delegation_report live in lowering.py (the one recipe); re-exported here
ETDUMP_MAGIC = b"ED00"  # flatbuffer file identifier at bytes 8..12 of a size-prefixed ETDump
PTE_MAGIC = b"ET12"
ETDUMP = ArtifactFormat(
    "etdump",
    "ExecuTorch ETDump (.etdp, flatbuffer identifier ED00)",
    # an ETDump is ExecuTorch's, whichever device ran it; a new session from one is an Android one
    feeds=("android-adb", "executorch-xnnpack", "ios"),
)


def file_stem(key: str) -> str:
    """A file-system-safe name for a program key (keys hold ':' and '.')."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key)


def _flat(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out for t in _flat(item)]


def _save_etrecord(etrecord: Any, path: Path) -> None:
    # ETRecord.save takes a path; write beside the target and rename so no half file is left
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        etrecord.save(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def set_et_threads(threads: int) -> int:
    """Size ExecuTorch's process-wide XNNPACK thread pool; returns the count now in effect.

    Not restored afterwards, on purpose: resetting the pool while a loaded XNNPACK method is still
    alive crashed the process here ("double free or corruption"), so it is reset only when the count
    differs, before any program is loaded by the caller.
    """
    from executorch.extension.pybindings import portable_lib

    if portable_lib._threadpool_get_thread_count() != threads:
        portable_lib._unsafe_reset_threadpool(threads)
    return portable_lib._threadpool_get_thread_count()


# The .pte-vs-eager check of every profiled program: max |pte - eager| <= PARITY_ATOL x max(1, max |eager|).
# Measured on 467 lowered programs (2026-12-08): almost all agree to ~3e-7 relative, but the half-width blocks with
# MLP ratio 4 at 64 tokens (`w0.5:r4:n64`, XNNPACK takes another GEMM path there) differ by 7.9e-5 to 1.13e-4 relative;
# the old 1e-4 refused one of them and stopped `ditnas run --config video.yaml`. 5e-4 keeps 4x margin over that and
# is still ~1000x below what a lowering that changes the function produces.
PARITY_ATOL = 5e-4


@register_backend
class ExecuTorchXnnpackBackend(Backend):
    name = "executorch-xnnpack"
    requires = ("executorch",)
    install = "executorch==1.5.1 (with torch==2.13.0)"
    retimes_session = True
    formats = (ETDUMP,)

    def __init__(
        self,
        threads: int = 1,
        *,
        strict: bool = False,
        parity_atol: float | None = PARITY_ATOL,
        etdump: bool = True,
        etdump_runs: int = 3,
        isolate: bool = True,
        etrecord: bool | None = None,
    ) -> None:
        super().__init__(threads)
        self.isolate = isolate  # time in a fresh interpreter that never lowered anything (pte_timer.py)
        self.strict = strict  # raise when attention/matmul/linear/conv fall back to portable kernels
        self.parity_atol = parity_atol  # None skips the .pte-vs-eager check
        self.etdump = etdump
        self.etdump_runs = etdump_runs
        # the ETRecord only names the ops of an ETDump; without ETDumps it is ~30% of each lowering for nothing
        self.etrecord = etdump if etrecord is None else etrecord

    def tool_versions(self) -> dict[str, str | None]:
        return {"torch": package_version("torch"), "executorch": package_version("executorch")}

    # ----- prepare -----------------------------------------------------------------------------
    def lower(self, program: Program) -> tuple[Any, dict[str, Any]]:
        """ExportedProgram -> ExecutorchProgramManager and the delegation report, by the one recipe
        (lowering.py) every shipped .pte follows too."""
        lowered = lower_program(program.module, tuple(program.inputs), backend="xnnpack", etrecord=self.etrecord,
                                what=f"program {program.key()}")
        return lowered.program, lowered.report

    def prepare(self, programs: list[Program], workdir: Path) -> list[Prepared]:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        prepared = []
        for program in programs:
            stem = file_stem(program.key())
            et, report = self.lower(program)
            if self.strict and report["non_delegated_compute_ops"]:
                raise DitnasError(
                    f"program {program.key()}: compute ops {report['non_delegated_compute_ops']} are not delegated to "
                    "XNNPACK and would run on slow portable kernels; rewrite them as in xnnpack-notes.md or pass strict=False"
                )
            pte, etrecord = workdir / f"{stem}.pte", workdir / f"{stem}.etrecord"
            # the .pte and its recipe sidecar (lowering.check_recipe accepts profiled programs too)
            write_pte(Lowered(et, report, recipe_fingerprint("xnnpack"), input_specs(program.inputs)), pte)
            (workdir / f"{stem}.etdp").unlink(missing_ok=True)  # an ETDump of an older build is stale
            artifacts = {"pte": pte}
            if self.etrecord:
                _save_etrecord(et.get_etrecord(), etrecord)
                artifacts["etrecord"] = etrecord
            item = Prepared(program, artifacts=artifacts, report=report)
            if self.parity_atol is not None:
                err, scale = self.parity(item)
                # assumption: the tolerance is absolute for unit-scale outputs and relative above (PARITY_ATOL)
                tol = self.parity_atol * max(1.0, scale)
                report.update(parity_max_abs_err=err, parity_output_scale=scale, parity_tolerance=tol)
                if not err <= tol:
                    raise DitnasError(
                        f"program {program.key()}: .pte output differs from eager by {err:.3g} > {tol:.3g} "
                        f"({pte}); the lowering changed the function, do not time it"
                    )
            report["pte_bytes"] = pte.stat().st_size
            write_json(workdir / f"{stem}.delegation.json", {"key": program.key(), **report})
            prepared.append(item)
        return prepared

    def reuse(self, program: Program, workdir: Path) -> Prepared | None:
        workdir, stem = Path(workdir), file_stem(program.key())
        pte, etrecord, report = (workdir / f"{stem}{suffix}" for suffix in (".pte", ".etrecord", ".delegation.json"))
        if not (pte.is_file() and report.is_file() and (etrecord.is_file() or not self.etrecord)):
            return None
        try:  # lowered before the recipe sidecar existed, or by another recipe / tool version: lower again
            check_recipe(pte, "xnnpack")
        except DitnasError:
            return None
        # the report is written last by prepare(): its presence means the .pte passed every check
        artifacts = {"pte": pte, **({"etrecord": etrecord} if etrecord.is_file() else {})}
        return Prepared(program, artifacts=artifacts, report=load_delegation_report(report))

    # ----- the per-user cache of lowered programs (lowered_cache.py) -------------------------
    def cache_options(self) -> dict[str, Any]:
        """What changes the files `prepare` writes (and which programs it accepts) besides the program."""
        return {"strict": self.strict, "parity_atol": self.parity_atol, "etrecord": self.etrecord}

    def cache_files(self, program: Program, workdir: Path) -> list[Path]:
        """The files of one finished build (none if it did not finish: its report is written last)."""
        stem = Path(workdir) / file_stem(program.key())
        suffixes = (".pte", ".etrecord", ".delegation.json") if self.etrecord else (".pte", ".delegation.json")
        files = [Path(f"{stem}{suffix}") for suffix in suffixes]
        files.insert(1, sidecar_path(files[0]))
        return files if all(f.is_file() for f in files) else []

    # ----- run ---------------------------------------------------------------------------------
    @staticmethod
    def load(pte: Path, etdump: bool = False) -> Any:
        from executorch.runtime import Runtime

        return Runtime.get().load_program(Path(pte), enable_etdump=etdump, debug_buffer_size=0)

    @staticmethod
    def load_method(program: Any, item: Prepared) -> Any:
        return load_method(program, item.key(), item.artifacts["pte"])

    def run_once(self, item: Prepared) -> list[torch.Tensor]:
        set_et_threads(self.threads)
        method = self.load_method(self.load(item.artifacts["pte"]), item)
        return list(method.execute(list(item.program.inputs)))

    def parity(self, item: Prepared) -> tuple[float, float]:
        """(max |.pte output - eager output|, max |eager output|) over all outputs."""
        got = self.run_once(item)
        want = _flat(item.program.eager())
        if len(got) != len(want):
            raise DitnasError(f"program {item.key()}: .pte returns {len(got)} outputs, eager {len(want)}")
        err = max(float((g - w).abs().max()) for g, w in zip(got, want))
        return err, max(float(w.abs().max()) for w in want)

    def measure(self, prepared: list[Prepared], warmup: int, iters: int) -> list[dict[str, Any]]:
        from ditnas.latency_models.backends.pte_timer import (
            time_here,
            time_in_fresh_process,
        )

        check_counts(warmup, iters)
        jobs = [(item.key(), item.artifacts["pte"], list(item.program.inputs)) for item in prepared]
        # the timing pass runs in a fresh interpreter by default: see pte_timer.py for why
        timer = time_in_fresh_process if self.isolate else time_here
        rows = timer(jobs, self.threads, warmup, iters)
        if self.etdump:
            for item in prepared:
                etdp = item.artifacts["pte"].with_suffix(".etdp")
                item.artifacts["etdump"] = etdp if etdp.is_file() else self.write_etdump(item, self.etdump_runs)
        return rows

    def write_etdump(self, item: Prepared, runs: int) -> Path:
        """Run `runs` times with the event tracer on and write <name>.etdp beside the .pte."""
        pte = item.artifacts["pte"]
        set_et_threads(self.threads)
        program = self.load(pte, etdump=True)
        method = self.load_method(program, item)
        for _ in range(runs):
            method.execute(list(item.program.inputs))
        etdp = pte.with_suffix(".etdp")
        tmp = pte.with_name(f".{etdp.name}.tmp")
        # both paths are required; with debug_buffer_size=0 no debug buffer file is written
        program.write_etdump_result_to_file(str(tmp), str(pte.with_name(f"{pte.stem}_debug.bin")))
        os.replace(tmp, etdp)
        return etdp

    # ----- ingest ------------------------------------------------------------------------------
    def parse(self, artifact: Path) -> list[dict[str, Any]]:
        return parse_etdump(artifact)

    @classmethod
    def sniff(cls, probe: ArtifactProbe) -> str | None:
        return ETDUMP.name if probe.head[8:12] == ETDUMP_MAGIC else None

    @classmethod
    def read_artifact(cls, path: Path, fmt: str = ETDUMP.name, *, etdump_warmup: int | None = None, **opts: Any) -> ParsedArtifact:
        """The dump's per-run `Method::execute` times after the warm-up runs (the sidecar's
        `warmup`, else `etdump_warmup`, else 0) as the samples of the program it names."""
        path = Path(path)
        side = read_sidecar(path)
        key = side.get("key") or (cell_from_name(path.name) or {}).get("key")
        if not key:
            raise DitnasError(f"ETDump {path}: its name names no ditnas program and no {path.stem}.run.json says which; rename it <device stem>.etdp")
        rows = parse_etdump(path)
        times = execute_times(rows, path)
        warmup = int(side.get("warmup", 0) if etdump_warmup is None else etdump_warmup)
        if warmup >= len(times):
            raise DitnasError(f"ETDump {path} holds {len(times)} runs, not more than the {warmup} warm-up runs to drop; pass a smaller etdump_warmup")
        return parsed_artifact(path, fmt, rows, {key: times[warmup:]}, device=side.get("device") or {})


def load_method(program: Any, key: str, pte: Path) -> Any:
    try:
        return program.load_method("forward")
    except RuntimeError as exc:
        raise DitnasError(
            f"program {key}: the ExecuTorch runtime cannot load {pte} ({exc}); XNNPACK refuses some graphs only at "
            "load time, e.g. tensors of more than 6 dims -- reshape them to <= 6"
        ) from None


def parse_etdump(artifact: Path, etrecord: Path | None = None) -> list[dict[str, Any]]:
    """One row per (event, run) of an ETDump: event_block, event, run, latency_ms, delegated,
    delegate_backend. The .etrecord beside it (same stem) is used when present, for op names."""
    artifact = Path(artifact)
    if not artifact.is_file():
        raise DitnasError(f"ETDump {artifact} does not exist; run the program with the event tracer on first")
    head = artifact.read_bytes()[:12]
    if head[8:12] != ETDUMP_MAGIC:
        raise DitnasError(
            f"{artifact} is not an ETDump (no 'ED00' identifier); pass the .etdp file the runtime wrote, "
            "or re-run the program with enable_etdump"
        )
    if etrecord is None and artifact.with_suffix(".etrecord").is_file():
        etrecord = artifact.with_suffix(".etrecord")
    from executorch.devtools import Inspector

    try:
        inspector = Inspector(etdump_path=str(artifact), etrecord=str(etrecord) if etrecord else None)
        df = inspector.to_dataframe()
    except Exception as exc:  # noqa: BLE001 -- flatc / flatbuffer errors come as many types
        raise DitnasError(f"ETDump {artifact} is unreadable ({type(exc).__name__}); re-run the program that wrote it") from None
    rows: list[dict[str, Any]] = []
    for rec in df.to_dict("records"):
        for run, value in enumerate(rec.get("raw") or []):
            rows.append(
                {
                    "event_block": rec["event_block_name"],
                    "event": rec["event_name"],
                    "run": run,
                    "latency_ms": float(value),
                    "delegated": bool(rec.get("is_delegated_op")),
                    "delegate_backend": rec.get("delegate_backend_name") or "",
                }
            )
    # assumption: load/init events alone (the "Default" block) are not a profile; an executed
    # method always records events in its "Execute" block
    if not any(r["event_block"] != "Default" for r in rows):
        raise DitnasError(
            f"ETDump {artifact} has no execution events; the runtime was built without the event tracer or "
            "the method never ran -- use executorch>=1.5 wheels and execute before writing the dump"
        )
    return rows


def execute_times(rows: list[dict[str, Any]], source: Path) -> list[float]:
    """Per-run `Method::execute` times (ms) of parsed ETDump rows, in run order."""
    runs = sorted((r["run"], r["latency_ms"]) for r in rows if r["event"] == "Method::execute" and r["event_block"] != "Default")
    if not runs:
        raise DitnasError(f"ETDump {source} has no Method::execute events; run the program with the event tracer on and re-pull it")
    return [t for _, t in runs]


def read_sidecar(path: Path) -> dict[str, Any]:
    """The `<name>.run.json` beside an ETDump (key, warmup, iters, device), or {} when absent."""
    side = path.with_name(path.stem + ".run.json")
    if not side.is_file():
        return {}
    try:
        return json.loads(side.read_text())
    except ValueError:
        raise DitnasError(f"{side} is truncated or not JSON; delete it and pass etdump_warmup= yourself") from None


def write_host_etdump(prepared: Prepared, runs: int, dest: Path) -> Path:
    """Run a lowered program `runs` times on this host's XNNPACK runtime with the event tracer on and
    copy the ETDump to `dest`, the same flatbuffer executor_runner writes with --num_executions."""
    etdp = ExecuTorchXnnpackBackend().write_etdump(prepared, runs)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(etdp, dest)
    return dest


def load_delegation_report(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        raise DitnasError(f"delegation report {path} is missing or unreadable; re-run prepare") from None
