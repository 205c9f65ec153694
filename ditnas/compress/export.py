"""`ditnas export`: an extracted (pruned, distilled) subnet -> the artifact that ships.

    export_subnet(cfg, subnet, out)      -> out/<name>_<backend>_<dtype>.pte (+ .recipe.json sidecar,
                                            .etrecord, .etdp) and out/manifest.json (kind "ditnas.export")
                                         or out/<name>_coreml_fp16.mlpackage (backend "mlpackage")
    generate_from_pte(pte, label=, n=)   -> images generated on the ExecuTorch runtime by the host loop

The program is `generation.DenoiserProgram` (forward(x, t, y) -> v, CFG or PDG (`cfg.guidance`) inside when cfg.cfg_scale
guides) at batch 1 and the subnet's own latent shape: one static program per resolution
(compress-export-notes.md: dynamic shapes fail to resize on device). It is lowered by
`latency_models.lowering.lower`, the recipe the latency tables were profiled with, so what was
priced is what ships.

After lowering, on this host: the .pte (still under a staging name) runs on the ExecuTorch runtime
on the latents and timesteps of real generations (the eager sampler's own trajectory, every step)
and must match eager within cfg.parity_rtol (relative to the output scale), else a DitnasError and
nothing under the final name; the whole cfg.steps generation is compared too. Then an ETDump is
written and read with the devtools Inspector (per-op breakdown), and eager vs .pte time of one
denoiser call and of one whole generation are measured (fresh process, generation.time_generation).

`cfg.sampler`: besides the host-loop program, `fastest` (the default) and `unrolled` lower
`generation.UnrolledSampler` -- the `cfg.steps` Euler steps in one program (noise, y) -> x0, checked
against the eager unrolled sampler -- and `fastest` times both whole generations in fresh processes
(both orders) and ships the faster: the manifest's `artifact` names it, `sampler` records both times
and why, and the other program stays beside it. The host loop runs any step count; the unrolled
program saves the per-call overhead but only runs its own steps.

Core ML (`backend: coreml` .pte or `mlpackage`) converts on Linux but cannot run here (no
CoreMLBackend in the runtime, no Core ML in coremltools off macOS): the manifest says so and records
no parity / timing instead of inventing them.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ditnas.manifest import MANIFEST, check_files, read_manifest, write_manifest
from ditnas.config import ExportConfig
from ditnas.errors import DitnasError
from ditnas.supernet.token_drop import check_pdg_dense
from ditnas.io import write_json
from ditnas.latency_models.backends.base import time_calls
from ditnas.latency_models.generation import (
    DenoiserProgram,
    UnrolledSampler,
    generation_spec,
    run_generation,
    time_in_fresh_process,
)
from ditnas.latency_models.generation_profile import time_generations_in_fresh_process
from ditnas.latency_models.lowering import (
    Lowered,
    check_recipe,
    lower,
    read_sidecar,
    runtime_can_run,
    sidecar_path,
    write_pte,
)
from ditnas.search.threads import torch_threads
from ditnas.supernet.extract import load_subnet
from ditnas.supernet.flow import time_grid
from ditnas.supernet.model import SubDiT

KIND = "ditnas.export"
PARITY_LABELS = (0, 7)  # assumption: two classes' trajectories are enough real inputs for the parity check
TIMING_WARMUP = 3
LINUX_COREML = "Core ML programs cannot run on this host (no CoreMLBackend in the ExecuTorch runtime / no Core ML in coremltools off macOS); parity and timing need a Mac or an iPhone"


def artifact_name(name: str, backend: str, dtype: str) -> str:
    """`<name>_<backend>_<dtype>.pte` (ExecuTorch's benchmark infra parses this form); .mlpackage for Core ML packages."""
    if backend == "mlpackage":
        return f"{name}_coreml_{dtype}.mlpackage"
    return f"{name}_{backend}_{dtype}.pte"


def _generation_meta(cfg: ExportConfig, sub: SubDiT, program: DenoiserProgram) -> dict[str, Any]:
    return {**program.describe(), "steps": cfg.steps, "shift": cfg.time_shift, "latent": list(sub.arch.latent),
            "arch": str(sub.arch), "arch_key": sub.arch.key(), "num_classes": sub.arch.num_classes}


def _example_inputs(sub: SubDiT) -> tuple[Tensor, Tensor, Tensor]:
    return torch.zeros(1, *sub.arch.latent), torch.ones(1), torch.zeros(1, dtype=torch.long)


@torch.no_grad()
def trajectory_inputs(program: DenoiserProgram, sub: SubDiT, steps: int, shift: float, seed: int = 0) -> list[tuple[Tensor, Tensor, Tensor]]:
    """The (x_t, t, y) the shipped sampler really feeds its denoiser: every step of eager generations
    from seeded noise, one per class in PARITY_LABELS (real latents and timesteps, not random tensors)."""
    times = time_grid(steps, shift)
    g = torch.Generator().manual_seed(seed)
    out = []
    for label in PARITY_LABELS:
        label = min(label, sub.arch.num_classes - 1)
        x, y = torch.randn((1, *sub.arch.latent), generator=g), torch.tensor([label])
        for i in range(steps):
            t = torch.full((1,), float(times[i]))
            out.append((x.clone(), t, y))
            x = x + (times[i + 1] - times[i]) * program(x, t, y)
    return out


def _load_method(pte: Path) -> Any:
    from executorch.runtime import Runtime

    try:
        return Runtime.get().load_program(Path(pte)).load_method("forward")
    except RuntimeError as exc:
        raise DitnasError(f"{pte} cannot be loaded by the ExecuTorch runtime ({exc}); export it again") from None


def _rel(got: Tensor, want: Tensor) -> float:
    return float((got - want).abs().max()) / max(float(want.abs().max()), 1e-6)


@torch.no_grad()
def check_parity(pte: Path, program: DenoiserProgram, sub: SubDiT, cfg: ExportConfig) -> dict[str, Any]:
    """Per-step and whole-generation relative error of the .pte vs eager on real trajectories."""
    method = _load_method(pte)
    inputs = trajectory_inputs(program, sub, cfg.steps, cfg.time_shift)
    step_errors = [_rel(method.execute([x, t, y])[0], program(x, t, y)) for x, t, y in inputs]
    x0, y0 = inputs[0][0], inputs[0][2]
    want = run_generation(program, x0, y0, cfg.steps, cfg.cfg_scale, cfg.time_shift)
    got = run_generation(method, x0, y0, cfg.steps, cfg.cfg_scale, cfg.time_shift)
    return {"checked": True, "inputs": f"{len(inputs)} (x_t, t, y) of {len(PARITY_LABELS)} eager {cfg.steps}-step generations",
            "max_step_rel_error": max(step_errors), "generation_rel_error": _rel(got, want),
            "output_scale": float(want.abs().max()), "rtol": cfg.parity_rtol}


def op_breakdown(pte: Path, etrecord: Path | None, inputs: tuple[Tensor, ...], runs: int = 5) -> tuple[Path, list[dict[str, Any]]]:
    """Write `<pte>.etdp` from `runs` traced executions; per-event median ms via the devtools Inspector."""
    from executorch.runtime import Runtime

    from ditnas.latency_models.backends.executorch_xnnpack import parse_etdump

    program = Runtime.get().load_program(Path(pte), enable_etdump=True, debug_buffer_size=0)
    method = program.load_method("forward")
    for _ in range(runs):
        method.execute(list(inputs))
    etdp = pte.with_suffix(".etdp")
    tmp = pte.with_name(f".{etdp.name}.tmp")
    program.write_etdump_result_to_file(str(tmp), str(pte.with_name(f".{pte.stem}_debug.bin")))
    os.replace(tmp, etdp)
    rows = parse_etdump(etdp, etrecord)
    per: dict[tuple[str, bool], list[float]] = {}
    for r in rows:
        if r["event_block"] == "Default":
            continue
        per.setdefault((r["event"], r["delegated"]), []).append(r["latency_ms"])
    table = [{"event": ev, "delegated": d, "median_ms": statistics.median(v), "calls": len(v) // runs or 1}
             for (ev, d), v in per.items()]
    table.sort(key=lambda r: -r["median_ms"])
    return etdp, table


def _median_ms(call, warmup: int, iters: int) -> float:
    return statistics.median(time_calls(call, warmup, iters))


@torch.no_grad()
def measure_timings(pte: Path, program: DenoiserProgram, sub: SubDiT, cfg: ExportConfig) -> dict[str, Any]:
    """Eager (torch, cfg.threads) vs .pte (fresh process) ms of one denoiser call and of one whole generation."""
    x, t, y = trajectory_inputs(program, sub, 1, cfg.time_shift)[0]
    iters = cfg.timing_iters
    with torch_threads(cfg.threads):
        eager_call = _median_ms(lambda: program(x, t, y), TIMING_WARMUP, iters)
        eager_gen = _median_ms(lambda: run_generation(program, x, y, cfg.steps, cfg.cfg_scale, cfg.time_shift),
                               TIMING_WARMUP, iters)
    specs = [generation_spec(pte, 1, None), generation_spec(pte, cfg.steps, None)]
    call_runs, gen_runs = time_in_fresh_process(pte, specs, cfg.threads, TIMING_WARMUP, iters)
    pte_call, pte_gen = statistics.median(call_runs), statistics.median(gen_runs)
    return {"threads": cfg.threads, "iters": iters, "eager_call_ms": eager_call, "pte_call_ms": pte_call,
            "eager_generation_ms": eager_gen, "pte_generation_ms": pte_gen, "steps": cfg.steps,
            "pte_speedup_vs_eager": eager_gen / pte_gen, "call_speedup_vs_eager": eager_call / pte_call,
            "device": {"host": platform.node(), "machine": platform.machine(), "backend": "executorch-xnnpack"}}


@torch.no_grad()
def export_unrolled(cfg: ExportConfig, sub: SubDiT, program: DenoiserProgram, out: Path, name: str,
                    gen: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """`cfg.steps` steps of `program` unrolled into one program, lowered with the same recipe and checked
    against the eager unrolled sampler on seeded noise; returns (its .pte, metrics)."""
    sampler = UnrolledSampler(program, cfg.steps, cfg.time_shift).eval()
    example = (torch.zeros(1, *sub.arch.latent), torch.zeros(1, dtype=torch.long))
    lowered = lower(sampler, example, backend=cfg.backend, etrecord=False, what=f"unrolled {cfg.steps}-step sampler of {name}")
    final = out / artifact_name(f"{name}-unrolled{cfg.steps}", cfg.backend, cfg.dtype)

    def parity(staged: Path) -> dict[str, Any]:
        method = _load_method(staged)
        g = torch.Generator().manual_seed(0)
        errors = []
        for label in PARITY_LABELS:
            noise, y = torch.randn((1, *sub.arch.latent), generator=g), torch.tensor([min(label, sub.arch.num_classes - 1)])
            errors.append(_rel(method.execute([noise, y])[0], sampler(noise, y)))
        if not max(errors) <= cfg.parity_rtol:
            raise DitnasError(f"export of {name}: the unrolled sampler .pte differs from eager by {max(errors):.3g} "
                              f"(relative) > compress.export.parity_rtol {cfg.parity_rtol:g}; use compress.export.sampler "
                              "host-loop")
        return {"checked": True, "inputs": f"{len(errors)} seeded noises", "generation_rel_error": max(errors),
                "rtol": cfg.parity_rtol}

    metrics: dict[str, Any] = {"delegated_share": lowered.report["delegated_share"],
                               "non_delegated_compute_ops": lowered.report["non_delegated_compute_ops"]}
    metrics["parity"] = publish_checked(lowered, final, {"generation": {**gen, **sampler.describe()},
                                                         "export": {"name": name, "backend": cfg.backend, "dtype": cfg.dtype}},
                                        cfg.backend, parity)
    return final, metrics


# assumption: `fastest` tries the unrolled program only for few-step samplers: its lowering grows with the
# steps (~8 s per step for the quick default's student here), while the per-call overhead it saves is a
# shrinking share of a long generation
MAX_UNROLLED_STEPS = 8


def unrolled_skipped(cfg: ExportConfig, measure: bool) -> str | None:
    """Why no unrolled program is exported, or None when one is."""
    if cfg.sampler == "unrolled":
        return None
    if cfg.sampler == "host-loop":
        return "compress.export.sampler is host-loop"
    if cfg.backend == "mlpackage":
        return "a Core ML package ships the host-loop denoiser only"
    if not runtime_can_run(cfg.backend):
        return f"sampler fastest needs both programs timed, and {cfg.backend} programs cannot run here: host loop shipped"
    if not measure:
        return "sampler fastest needs timing, and this export was not timed (measure=False): host loop shipped"
    if cfg.steps > MAX_UNROLLED_STEPS:
        return (f"sampler fastest tries unrolling only up to {MAX_UNROLLED_STEPS} steps ({cfg.steps} asked); set "
                "compress.export.sampler unrolled to force it")
    return None


def choose_sampler(cfg: ExportConfig, host_loop: Path, unrolled: Path) -> dict[str, Any]:
    """Which program ships, with both whole-generation times when this host can run them (it cannot only when
    `unrolled` was asked for: `unrolled_skipped` spares `fastest` an export it could not time)."""
    if not runtime_can_run(cfg.backend):
        return {"shipped": "unrolled", "why": f"compress.export.sampler is unrolled; neither program can be timed here "
                                              f"({LINUX_COREML})"}
    jobs = [("host-loop", host_loop, cfg.steps, None), ("unrolled", unrolled, cfg.steps, None)]
    runs: dict[str, list[float]] = {"host-loop": [], "unrolled": []}
    for order in (jobs, jobs[::-1]):  # both orders: neither program always runs first
        for key, times in time_generations_in_fresh_process(order, cfg.threads, TIMING_WARMUP, cfg.timing_iters).items():
            runs[key] += times
    host_ms, unrolled_ms = statistics.median(runs["host-loop"]), statistics.median(runs["unrolled"])
    timed = (f"whole {cfg.steps}-step generation: unrolled {unrolled_ms:.4g} ms, host loop {host_ms:.4g} ms (median of "
             f"{len(runs['unrolled'])} each, 2 fresh processes, {cfg.threads} thread(s))")
    if cfg.sampler == "unrolled":
        shipped, why = "unrolled", f"compress.export.sampler is unrolled; {timed}"
    else:
        shipped = "unrolled" if unrolled_ms < host_ms else "host-loop"
        why = f"the {'unrolled program' if shipped == 'unrolled' else 'host loop'} is faster: {timed}"
    return {"shipped": shipped, "why": why, "host_loop_ms": host_ms, "unrolled_ms": unrolled_ms,
            "threads": cfg.threads, "samples": len(runs["unrolled"])}


def _save_etrecord(lowered: Lowered, path: Path) -> None:
    from ditnas.latency_models.backends.executorch_xnnpack import _save_etrecord as save

    save(lowered.get_etrecord(), path)


def _publish(staged: Path, final: Path) -> None:
    """Move a staged .pte (sidecar first, then the program) under its final name."""
    os.replace(sidecar_path(staged), sidecar_path(final))
    os.replace(staged, final)


def publish_checked(lowered: Lowered, final: Path, extra: dict[str, Any], backend: str,
                    parity: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Write `lowered` under a staging name beside `final`, run `parity` on it (it raises on a miss) when this
    host's runtime can run `backend`, then publish it; nothing is left under `final` or the staging name when
    the check fails. Returns the parity record."""
    staged = final.with_name(f".{final.name}.staging.pte")
    try:
        write_pte(lowered, staged, extra=extra)
        checked = parity(staged) if runtime_can_run(backend) else {"checked": False, "reason": LINUX_COREML}
        _publish(staged, final)
    finally:
        for leftover in (staged, sidecar_path(staged)):
            leftover.unlink(missing_ok=True)
    return checked


def student_sampler(cfg: ExportConfig, subnet: Path) -> ExportConfig:
    """A step-distilled student was trained on one time grid (`distill` records it as `sampler` in its
    manifest): ship that grid unless the export config sets steps / time shift away from the defaults."""
    folder = subnet if subnet.is_dir() else subnet.parent
    if not (folder / MANIFEST).is_file():
        return cfg
    sampler = read_manifest(folder).get("sampler") or {}
    defaults = ExportConfig()
    changes = {}
    if "steps" in sampler and cfg.steps == defaults.steps:
        changes["steps"] = int(sampler["steps"])
    if "shift" in sampler and cfg.time_shift == defaults.time_shift:
        changes["time_shift"] = float(sampler["shift"])
    return replace(cfg, **changes) if changes else cfg


def export_subnet(cfg: ExportConfig, subnet: Path, out: Path, *, name: str | None = None, measure: bool = True) -> dict[str, Any]:
    """Export the subnet at `subnet` (a `ditnas extract` folder or subnet.pt) into folder `out`; returns the manifest."""
    cfg = student_sampler(cfg.check(), Path(subnet))
    subnet, out = Path(subnet), Path(out)
    sub = load_subnet(subnet)
    name = name or f"dit_{sub.arch.key()[:10]}"
    if not name.replace("-", "").replace(".", "").replace("_", "").isalnum():
        raise DitnasError(f"export: name {name!r} may hold letters, digits, '-', '_' and '.' only (it names the file)")
    if cfg.guidance == "pdg":
        check_pdg_dense(cfg.pdg_dense, len(sub.arch.slots), "compress.export.pdg_dense")
    program = DenoiserProgram(sub, cfg.cfg_scale, guidance=cfg.guidance, pdg_dense=cfg.pdg_dense).eval()
    final = out / artifact_name(name, cfg.backend, cfg.dtype)
    out.mkdir(parents=True, exist_ok=True)
    gen = _generation_meta(cfg, sub, program)
    if cfg.backend == "mlpackage":
        return _export_mlpackage(cfg, subnet, out, final, program, sub, gen)

    lowered = lower(program, _example_inputs(sub), backend=cfg.backend, etrecord=True, what=f"subnet {subnet}")
    metrics: dict[str, Any] = {"delegation": {k: v for k, v in lowered.report.items() if k != "by_op"},
                               "delegated_share": lowered.report["delegated_share"]}
    files = [final.name, sidecar_path(final).name]

    def parity(staged: Path) -> dict[str, Any]:
        checked = check_parity(staged, program, sub, cfg)
        worst = max(checked["max_step_rel_error"], checked["generation_rel_error"])
        if not worst <= cfg.parity_rtol:
            raise DitnasError(f"export of {subnet}: the .pte differs from eager by {worst:.3g} (relative) > "
                              f"compress.export.parity_rtol {cfg.parity_rtol:g}; nothing was written under {final}")
        return checked

    metrics["parity"] = publish_checked(lowered, final, {"generation": gen, "export": {"name": name, "backend": cfg.backend,
                                                                                        "dtype": cfg.dtype}}, cfg.backend, parity)
    if runtime_can_run(cfg.backend):
        etrecord = final.with_suffix(".etrecord")
        _save_etrecord(lowered, etrecord)
        etdp, table = op_breakdown(final, etrecord, _example_inputs(sub))
        metrics["ops"] = table[:15]
        files += [etrecord.name, etdp.name]
        if measure:
            metrics["timing"] = measure_timings(final, program, sub, cfg)
    else:
        metrics["timing"] = {"measured": False, "reason": LINUX_COREML}
    unrolled, skip = None, unrolled_skipped(cfg, measure)
    if skip is None:
        unrolled, metrics["unrolled"] = export_unrolled(cfg, sub, program, out, name, gen)
        files += [unrolled.name, sidecar_path(unrolled).name]
    metrics["sampler"] = choose_sampler(cfg, final, unrolled) if skip is None else {"shipped": "host-loop", "why": skip}
    shipped, other = (unrolled, final) if metrics["sampler"]["shipped"] == "unrolled" else (final, unrolled)
    return write_manifest(
        out, KIND, inputs={"subnet": subnet}, config=cfg, metrics=metrics, files=files,
        extra={"arch": str(sub.arch), "arch_key": sub.arch.key(), "artifact": shipped.name, "recipe": lowered.recipe,
               "generation": read_sidecar(shipped)["generation"], "params": sub.num_params(),
               "alternative": other.name if other is not None else None},
    )


def _export_mlpackage(cfg: ExportConfig, subnet: Path, out: Path, final: Path, program: DenoiserProgram,
                      sub: SubDiT, gen: dict[str, Any]) -> dict[str, Any]:
    """coremltools 9.0: FP16, iOS 18, from the exported program with run_decompositions({}) (xnnpack-notes.md)."""
    try:
        import coremltools as ct
    except ImportError:
        raise DitnasError("export backend mlpackage needs coremltools; pip install coremltools==9.0") from None
    inputs = _example_inputs(sub)
    with torch.no_grad():
        program(*inputs)
        ep = torch.export.export(program.requires_grad_(False), inputs).run_decompositions({})
    try:
        model = ct.convert(ep, convert_to="mlprogram", compute_precision=ct.precision.FLOAT16,
                           minimum_deployment_target=ct.target.iOS18)
    except Exception as exc:  # noqa: BLE001 -- the converter raises many types
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)[:200]
        raise DitnasError(f"export of {subnet}: coremltools cannot convert the denoiser ({first}); use backend xnnpack") from None
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=out))
    try:
        model.save(str(staging / final.name))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging / final.name, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    side = out / f"{final.name}.json"
    write_json(side, {"generation": gen, "inputs": [{"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for t in inputs]})
    can_run = platform.system() == "Darwin"
    metrics = {"parity": {"checked": False, "reason": "" if can_run else LINUX_COREML},
               "timing": {"measured": False, "reason": "" if can_run else LINUX_COREML}}
    return write_manifest(
        out, KIND, inputs={"subnet": subnet}, config=cfg, metrics=metrics, files=[side.name],
        extra={"arch": str(sub.arch), "arch_key": sub.arch.key(), "artifact": final.name, "generation": gen,
               "recipe": {"name": "ditnas-mlpackage-v1", "steps": ["export", "run_decompositions({})",
                                                                   "ct.convert(mlprogram, FLOAT16, iOS18)"]},
               "params": sub.num_params()},
    )


def _export_meta(pte: Path) -> dict[str, Any]:
    """The generation record of a ditnas-exported .pte (sidecar; manifest hashes checked when present)."""
    pte = Path(pte)
    if not pte.is_file():
        raise DitnasError(f"{pte} does not exist; pass a .pte written by `ditnas export`")
    side = check_recipe(pte)
    gen = side.get("generation")
    if not isinstance(gen, dict) or gen.get("kind") not in ("denoiser", "unrolled") or "latent" not in gen:
        raise DitnasError(f"{pte} is not a ditnas export (its sidecar names no denoiser program); run `ditnas export` on a subnet")
    if (pte.parent / MANIFEST).is_file():
        manifest = read_manifest(pte.parent)
        if manifest.get("kind") == KIND and pte.name in (manifest.get("artifact"), manifest.get("alternative")):
            check_files(pte.parent, manifest)
    return gen


def generate_from_pte(pte: Path, *, label: int, n: int, steps: int | None = None, seed: int = 0,
                      threads: int = 1) -> tuple[Tensor, dict[str, Any]]:
    """`n` samples of class `label` generated on the ExecuTorch runtime by the host loop.

    Noise is drawn as `flow.euler_sample` draws it (randn((n, *latent)) from a generator seeded
    `seed`), so the eager sampler of the same subnet with that generator gives the same samples.
    Steps default to the export's; guidance and time shift are the export's (baked in / recorded).
    Returns (images (n, C, T, H, W), timing {ms_per_image, steps, ...}).
    """
    from ditnas.latency_models.backends.executorch_xnnpack import set_et_threads

    pte = Path(pte)
    gen = _export_meta(pte)
    steps = int(gen["steps"] if steps is None else steps)
    if n < 1 or steps < 1:
        raise DitnasError(f"generate_from_pte: n={n} and steps={steps} must be >= 1")
    unrolled = gen["kind"] == "unrolled"
    if unrolled and steps != gen["steps"]:
        raise DitnasError(f"{pte} is an unrolled {gen['steps']}-step sampler and generates with {gen['steps']} steps only, "
                          f"not {steps}; use the host-loop program beside it (the export manifest's `alternative`)")
    if not 0 <= label < gen["num_classes"]:
        raise DitnasError(f"generate_from_pte: label {label} is outside 0..{gen['num_classes'] - 1} of {pte}")
    set_et_threads(threads)
    method = _load_method(pte)
    meta = method.metadata
    latent = [1, *gen["latent"]]
    shapes = [list(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())]
    want = [latent, [1]] if unrolled else [latent, [1], [1]]
    if shapes != want:
        said = f"(noise {latent}, y [1])" if unrolled else f"(x {latent}, t [1], y [1])"
        raise DitnasError(f"{pte} takes inputs {shapes}, its sidecar says {said}: the program is "
                          "another model's or the sidecar was copied from another export; export again")
    noise = torch.randn((n, *gen["latent"]), generator=torch.Generator().manual_seed(seed))
    y = torch.tensor([label])
    images, times = [], []
    for i in range(n):
        t0 = time.perf_counter_ns()
        if unrolled:
            images.append(method.execute([noise[i : i + 1], y])[0])
        else:
            images.append(run_generation(method, noise[i : i + 1], y, steps, gen["cfg_scale"], gen["shift"]))
        times.append((time.perf_counter_ns() - t0) / 1e6)
    timing = {"ms_per_image": times, "median_ms": statistics.median(times), "steps": steps, "threads": threads,
              "cfg_scale": gen["cfg_scale"], "note": "in this process, after lowering nothing: no warm-up excluded"}
    return torch.cat(images), timing


__all__ = ["export_subnet", "generate_from_pte", "artifact_name", "read_sidecar"]
