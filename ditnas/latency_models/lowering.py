"""The ONE lowering recipe: every profiling program and every shipped .pte goes through `lower`.

    freeze     module.eval().requires_grad_(False)   (constant_prop_pass on parameters that still
               require grad crashes XNNPACK preprocess on a loaded subnet)
    warm       one eager call, so cached RoPE / BNA tables are tensors export lifts as constants
    export     torch.export.export(module, inputs) under no_grad, static shapes (one program per
               resolution / batch: dynamic shapes fail to resize on device, compress-export-notes.md)
    constprop  executorch.exir.passes.constant_prop_pass   (folds LCHA's per-tap conv weights and
               leading-slice widths into constants; without it every LCHA block leaves three
               aten.convolution on portable kernels and the graph splits into 2-5 delegates, measured
               1.02-1.59x slower per arch)
    partition  to_edge_transform_and_lower(partitioner=[XnnpackPartitioner()])   (backend "xnnpack")
               or [CoreMLPartitioner(FP16, iOS18)]                              (backend "coreml")
    emit       .to_executorch()

`write_pte` writes the program atomically with a sidecar `<name>.pte.recipe.json` (recipe fingerprint,
delegation report, input shapes); `check_recipe` refuses a .pte whose sidecar is missing (lowered
outside ditnas) or names another recipe or other tool versions -- so what a latency table prices is
what ships.

Core ML: the ExecuTorch Core ML partitioner lowers ahead of time on Linux (coremltools compiles the
delegate payload); the .pte only *runs* where the runtime registers CoreMLBackend (macOS / iOS
builds). `runtime_can_run` says whether this host can execute a lowered program.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ditnas.errors import DitnasError
from ditnas.io import atomic_write_bytes, write_json

BACKENDS = ("xnnpack", "coreml")
# the runtime name each backend's delegate registers under (executorch.runtime backend_registry)
RUNTIME_BACKEND = {"xnnpack": "XnnpackBackend", "coreml": "CoreMLBackend"}

# Compute ops that must run inside the delegate (toolchain.md §1.1: an undelegated mm was half of
# Whisper's decoder time). Matched against get_delegation_info op types (aten_<op>_<overload>).
COMPUTE_OPS = re.compile(r"^aten_(_?softmax|_?log_softmax|mm|bmm|addmm|baddbmm|matmul|linear|convolution)(_|$)")
SIDECAR_SUFFIX = ".recipe.json"


@dataclass(frozen=True)
class Recipe:
    """A small frozen description of how a program is lowered; its fingerprint travels with every .pte."""

    name: str
    version: int
    steps: tuple[str, ...]
    partitioner: str
    options: tuple[tuple[str, str], ...] = ()


_STEPS = (
    "freeze: eval() + requires_grad_(False)",
    "warm: one eager call (RoPE/BNA tables cached, so export lifts them as constants)",
    "export: torch.export.export(static shapes, no_grad)",
    "constprop: executorch.exir.passes.constant_prop_pass",
    "partition: to_edge_transform_and_lower",
    "emit: to_executorch",
)
RECIPES = {
    "xnnpack": Recipe("ditnas-xnnpack-v1", 1, _STEPS, "XnnpackPartitioner()"),
    # Core ML: FP16 and iOS 18 as the coremltools export (toolchain.md §1.2)
    "coreml": Recipe("ditnas-coreml-v1", 1, _STEPS, "CoreMLPartitioner(compile_specs)",
                     (("compute_precision", "FLOAT16"), ("minimum_deployment_target", "iOS18"))),
}
RECIPE = RECIPES["xnnpack"]


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def recipe_fingerprint(backend: str = "xnnpack", *, constant_prop: bool = True) -> dict[str, Any]:
    """The recipe of `backend` plus the tool versions that lower it (what a sidecar records)."""
    recipe = _recipe(backend)
    out: dict[str, Any] = {**asdict(recipe), "backend": backend,
                           "torch": torch.__version__.split("+")[0], "executorch": _version("executorch")}
    if backend == "coreml":
        out["coremltools"] = _version("coremltools")
    if not constant_prop:  # only tests build this, to show the recipe matters; check_recipe refuses it
        out["name"] = recipe.name + "-no-constprop"
        out["steps"] = [s for s in recipe.steps if not s.startswith("constprop")]
    out["steps"] = list(out["steps"])
    out["options"] = [list(o) for o in out["options"]]
    return out


def _recipe(backend: str) -> Recipe:
    if backend not in RECIPES:
        raise DitnasError(f"lowering: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return RECIPES[backend]


@dataclass
class Lowered:
    """A lowered program: the ExecuTorch program manager, its delegation report and the recipe it followed."""

    program: Any  # executorch.exir.ExecutorchProgramManager
    report: dict[str, Any]
    recipe: dict[str, Any]
    inputs: list[dict[str, Any]] = field(default_factory=list)  # [{"shape": [...], "dtype": "float32"}]

    @property
    def backend(self) -> str:
        return self.recipe["backend"]

    @property
    def buffer(self) -> bytes:
        return self.program.buffer

    def get_etrecord(self) -> Any:
        return self.program.get_etrecord()


def delegation_report(graph_module: torch.fx.GraphModule) -> dict[str, Any]:
    """Delegated vs non-delegated call nodes of a lowered edge graph, per op type."""
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(graph_module)
    by_op = {
        op: {"delegated": b.delegated, "non_delegated": b.non_delegated} for op, b in sorted(info.delegation_by_operator.items())
    }
    non_delegated = sorted(op for op, b in by_op.items() if b["non_delegated"])
    compute = {op: b for op, b in by_op.items() if COMPUTE_OPS.match(op)}
    compute_total = sum(b["delegated"] + b["non_delegated"] for b in compute.values())
    compute_delegated = sum(b["delegated"] for b in compute.values())
    return {
        "delegated_subgraphs": info.num_delegated_subgraphs,
        "delegated_nodes": info.num_delegated_nodes,
        "non_delegated_nodes": info.num_non_delegated_nodes,
        "non_delegated_ops": non_delegated,
        "non_delegated_compute_ops": sorted(op for op, b in compute.items() if b["non_delegated"]),
        "compute_nodes": compute_total,
        "compute_delegated": compute_delegated,
        "delegated_share": compute_delegated / compute_total if compute_total else 1.0,
        "by_op": by_op,
    }


def input_specs(inputs: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> list[dict[str, Any]]:
    return [{"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for t in inputs]


def _partitioner(backend: str) -> Any:
    if backend == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
            XnnpackPartitioner,
        )

        return XnnpackPartitioner()
    try:
        import coremltools as ct
        from executorch.backends.apple.coreml.compiler import CoreMLBackend
        from executorch.backends.apple.coreml.partition import CoreMLPartitioner
    except ImportError as exc:
        raise DitnasError(f"lowering for backend coreml needs coremltools==9.0 and executorch's Core ML backend "
                          f"({exc.name or exc} is missing); pip install coremltools==9.0") from None
    specs = CoreMLBackend.generate_compile_specs(
        compute_precision=ct.precision.FLOAT16, minimum_deployment_target=ct.target.iOS18
    )
    return CoreMLPartitioner(compile_specs=specs)


_OP_IN_MESSAGE = re.compile(r"(aten[._:]+[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)")


def _op_named(exc: BaseException) -> str:
    found = _OP_IN_MESSAGE.findall(str(exc))
    return found[0] if found else "an op"


def lower(
    module: torch.nn.Module,
    inputs: list[torch.Tensor] | tuple[torch.Tensor, ...],
    *,
    backend: str = "xnnpack",
    etrecord: bool = True,
    constant_prop: bool = True,
    what: str = "program",
    graph_edits: tuple[Callable[[Any], Any], ...] = (),
) -> Lowered:
    """Lower `module` at `inputs` (static shapes) with the recipe of `backend`.

    `module` is frozen in place (eval, requires_grad False): lower a copy of a model you still train.

    `constant_prop=False` exists only so tests can show what the recipe prevents; such a program's
    sidecar names another recipe and `check_recipe` refuses it.

    `graph_edits` (a hook for callers whose graphs need it, e.g. latency_models/stream_programs.py): functions
    ExportedProgram -> ExportedProgram applied right after export, before constprop. They must not
    change what the program computes; their names are recorded in the sidecar's recipe ("graph_edits").
    """
    from executorch.exir import to_edge_transform_and_lower
    from executorch.exir.passes.constant_prop_pass import constant_prop_pass

    recipe = recipe_fingerprint(backend, constant_prop=constant_prop)
    inputs = tuple(inputs)
    module = module.eval().requires_grad_(False)
    try:
        with torch.no_grad():
            # programs.build_program: without this call ~45 arange/pow/cos/sin nodes building RoPE
            # tables stay outside the delegate
            module(*inputs)
            ep = torch.export.export(module, inputs)
    except Exception as exc:  # noqa: BLE001 -- torch.export raises many types
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise DitnasError(f"{what}: torch.export failed ({first}); the module must take tensors only and have "
                          "no data-dependent control flow") from None
    for edit in graph_edits:
        ep = edit(ep)
    if graph_edits:
        recipe["graph_edits"] = [getattr(e, "__name__", type(e).__name__) for e in graph_edits]
    if constant_prop:
        ep = constant_prop_pass(ep)
    partitioner = _partitioner(backend)
    try:
        edge = to_edge_transform_and_lower(ep, partitioner=[partitioner], generate_etrecord=etrecord)
        report = delegation_report(edge.exported_program().graph_module)
        program = edge.to_executorch()
    except DitnasError:
        raise
    except Exception as exc:  # noqa: BLE001 -- edge verifier / partitioner / emitter errors come as many types
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)[:200]
        raise DitnasError(f"{what}: backend {backend} cannot lower {_op_named(exc)} ({first}); replace that op "
                          "(xnnpack-notes.md lists delegating rewrites) or choose another backend") from None
    return Lowered(program, report, recipe, input_specs(inputs))


def require_delegated(lowered: Lowered, what: str = "program") -> None:
    """Refuse a program whose compute ops (attention, matmul, linear, conv) are not all delegated."""
    bad = lowered.report["non_delegated_compute_ops"]
    if bad:
        raise DitnasError(
            f"{what}: compute ops {bad} are not delegated to backend {lowered.backend} and would run on slow "
            "portable kernels; rewrite them as in xnnpack-notes.md"
        )


def sidecar_path(pte: Path) -> Path:
    pte = Path(pte)
    return pte.with_name(pte.name + SIDECAR_SUFFIX)


def sidecar_payload(lowered: Lowered, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"recipe": lowered.recipe, "delegation": lowered.report, "inputs": lowered.inputs, **(extra or {})}


def write_pte(lowered: Lowered, path: Path, *, extra: dict[str, Any] | None = None) -> Path:
    """Write the .pte atomically, then its sidecar `<path>.recipe.json` (recipe, delegation, inputs).

    The sidecar is written after the .pte, so a .pte without a sidecar is either foreign or the
    trace of an interrupted write; `check_recipe` refuses both.
    """
    path = Path(path)
    sidecar_path(path).unlink(missing_ok=True)  # a stale sidecar must never vouch for a new .pte
    atomic_write_bytes(path, lowered.buffer)
    write_json(sidecar_path(path), sidecar_payload(lowered, extra))
    return path


def read_sidecar(pte: Path) -> dict[str, Any]:
    side = sidecar_path(pte)
    if not side.is_file():
        raise DitnasError(f"{pte} has no {side.name}: it was lowered outside ditnas (or its write was cut short); "
                          "lower it again with ditnas so its latency is the recipe's")
    try:
        payload = json.loads(side.read_text())
    except (OSError, ValueError):
        raise DitnasError(f"{side} is unreadable or truncated; lower {pte} again with ditnas") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("recipe"), dict):
        raise DitnasError(f"{side} records no recipe; lower {pte} again with ditnas")
    return payload


def check_recipe(pte: Path, backend: str | None = None) -> dict[str, Any]:
    """The sidecar of `pte` if it was lowered with this ditnas recipe and these tool versions, else a
    DitnasError saying what differs."""
    pte = Path(pte)
    if not pte.is_file():
        raise DitnasError(f"{pte} does not exist; pass a .pte written by ditnas")
    payload = read_sidecar(pte)
    got = payload["recipe"]
    want = recipe_fingerprint(backend or got.get("backend", "xnnpack"))
    diffs = [f"{k} {got.get(k)!r} != {want[k]!r}" for k in ("name", "version", "backend") if got.get(k) != want[k]]
    if diffs:
        raise DitnasError(f"{pte} was lowered with another recipe ({'; '.join(diffs)}); lower it again with ditnas "
                          f"recipe {want['name']}")
    versions = [k for k in ("torch", "executorch", "coremltools") if k in want and got.get(k) != want[k]]
    if versions:
        what = ", ".join(f"{k} {got.get(k)} (now {want[k]})" for k in versions)
        raise DitnasError(f"{pte} was lowered with other tool versions: {what}; lower it again with this install")
    return payload


def runtime_can_run(backend: str) -> bool:
    """Whether this host's ExecuTorch runtime registers the delegate of `backend`."""
    from executorch.runtime import Runtime

    return RUNTIME_BACKEND[backend] in Runtime.get().backend_registry.registered_backend_names
