"""What every phone artifact reader shares: program names on devices, one parsed-file type, a probe.

Names. A program travels to a phone as `<device stem>_<backend>_<dtype>.pte`, the convention the
ExecuTorch minibench app and the iOS Benchmark app parse (toolchain.md §2.2, §8). The device stem is
the program key with ':' -> '_' and '.' -> 'p' (`block:sa:w0.5:r4:n64:s0` ->
`block_sa_w0p5_r4_n64_s0`), so it is a plain `\\w+` word: minibench's regex
`(?<name>\\w+)_(?<backend>[\\w+]+)_(?<quantization>\\w+)` then splits it correctly, and the iOS
app's punctuation-to-'_' test naming leaves it intact. `key_from_name` reads every form back
(device stems, `file_stem` names with '.', raw keys, with or without the backend/dtype/extension tail).

Formats. Each artifact format is read (and, for tests and demos, written) by the backend of the
device that writes it: minibench JSON in `backends/android_adb.py`, xcodebuild logs in
`backends/ios_xcodebuild.py`, Core ML benchmark JSON in `backends/coreml.py`, ETDumps in
`backends/executorch_xnnpack.py`. `ingest` asks every registered backend's `sniff` with one
`ArtifactProbe` per file and gets a `ParsedArtifact` back (`parsed_artifact` builds one).
The writers' old names here (`minibench_records`, `write_xcodebuild_log`, ...) still resolve.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from ditnas.errors import DitnasError
from ditnas.latency_models.programs import Cell

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
# one parsed device file, and the probe every backend's `sniff` reads
# ----------------------------------------------------------------------------------------------
@dataclass
class ParsedArtifact:
    """One device file, parsed: every row it holds, and the latency samples per program key."""

    path: Path
    format: str
    rows: list[dict[str, Any]]
    samples: dict[str, list[float]]
    cells: dict[str, dict[str, Any]]
    device: dict[str, Any] = field(default_factory=dict)  # device fields the file names
    aggregate: bool = False  # True when a "sample" is a per-run average (minibench)
    ignored: list[str] = field(default_factory=list)  # names in the file that are no ditnas program


class ArtifactProbe:
    """A device file as the sniffers see it. Each view is read at most once, however many backends
    ask: `head` (first 4 KiB), `text` (empty for binary files), `json` (None unless the text starts
    like JSON; a truncated JSON file is a DitnasError naming it)."""

    HEAD_BYTES = 4096

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DitnasError(f"artifact {self.path} does not exist (or is a folder); pass the files the device produced")

    @cached_property
    def head(self) -> bytes:
        try:
            with self.path.open("rb") as f:
                return f.read(self.HEAD_BYTES)
        except OSError as exc:
            raise DitnasError(f"artifact {self.path} is unreadable ({exc.strerror}); check its permissions") from None

    @cached_property
    def is_text(self) -> bool:
        return b"\x00" not in self.head

    @cached_property
    def text(self) -> str:
        return self.path.read_text(errors="replace") if self.is_text else ""

    @cached_property
    def json(self) -> Any:
        if not self.is_text or not self.head.decode("utf-8", errors="replace").lstrip().startswith(("[", "{")):
            return None
        return load_json(self.path, "artifact")


def plan_cells(path: Path) -> dict[str, dict[str, Any]]:
    """Cell fields from an android_plan.json beside the file or one folder up (fills model archs)."""
    for folder in (path.parent, path.parent.parent):
        plan = folder / "android_plan.json"
        if plan.is_file():
            try:
                return {p["key"]: {k: p[k] for k in ("key", "kind", "op", "width", "mlp_ratio", "tokens", "stage", "arch")} for p in json.loads(plan.read_text())["programs"]}
            except (ValueError, KeyError, TypeError):
                return {}
    return {}


def parsed_artifact(
    path: Path,
    fmt: str,
    rows: list[dict[str, Any]],
    samples: dict[str, list[float]],
    *,
    device: dict[str, Any] | None = None,
    aggregate: bool = False,
    ignored: list[str] | None = None,
) -> ParsedArtifact:
    """What every reader ends with: refuse a file with no sample of a ditnas program, and give
    each program key its cell fields (from a plan file beside it, else from the key itself)."""
    path, ignored = Path(path), list(ignored or [])
    if not samples:
        raise DitnasError(
            f"artifact {path} ({fmt}) holds no latency samples of a ditnas program"
            + (f" (names seen: {', '.join(ignored[:5])})" if ignored else "")
            + "; check that the device ran the files `prepare` wrote"
        )
    plan = plan_cells(path)
    cells = {}
    for key in samples:
        cell = plan.get(key) or cell_from_name(key)
        if cell is None:
            raise DitnasError(f"artifact {path}: program {key!r} is not a ditnas key; rename the file as `prepare` named it")
        cells[key] = cell
    return ParsedArtifact(path, fmt, rows, samples, cells, dict(device or {}), aggregate, ignored)


# The format writers and constants moved to the backend of the device that writes the format;
# their old names here still resolve (imported on first use, so this module imports no backend).
_MOVED = {
    "ditnas.latency_models.backends.android_adb": (
        "MINIBENCH_LATENCY_METRIC", "AndroidDeviceInfo", "trimmed_mean", "minibench_records", "write_minibench_json",
    ),
    "ditnas.latency_models.backends.ios_xcodebuild": (
        "XCTEST_CLOCK_METRIC", "XCTEST_MEMORY_METRIC", "IOS_TEST_CLASS", "ios_test_name", "XCTestMeasurement",
        "xctest_measured_line", "xcodebuild_log_text", "write_xcodebuild_log",
    ),
    "ditnas.latency_models.backends.coreml": (
        "COREML_BENCHMARK_FORMAT", "measurement", "CoreMLBenchmarkResult", "coreml_benchmark_payload",
        "write_coreml_benchmark_json",
    ),
    "ditnas.latency_models.backends.executorch_xnnpack": ("write_host_etdump",),
}  # fmt: skip


def __getattr__(name: str) -> Any:
    for module, names in _MOVED.items():
        if name in names:
            return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
