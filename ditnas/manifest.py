"""The manifest every ditnas artifact folder carries (compression steps, exports, streaming chunk programs).

`{"kind", "inputs": {name: {"path", "sha256"}}, "config", "metrics", "files": {name: sha256},
"versions", "written"}`: the input hashes let a rerun tell that an input changed, the file hashes let
a loader refuse an artifact changed or damaged since it was written (`check_files`).
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ditnas.errors import DitnasError
from ditnas.io import file_sha256, read_json, versions, write_json

MANIFEST = "manifest.json"


def _hash_input(path: Path) -> dict[str, str]:
    path = Path(path)
    if path.is_dir():
        # a folder input (an extracted subnet) is hashed through its own manifest's file hashes
        inner = path / MANIFEST
        return {"path": str(path.resolve()), "sha256": file_sha256(inner) if inner.is_file() else ""}
    return {"path": str(path.resolve()), "sha256": file_sha256(path)}


def write_manifest(
    out: Path,
    kind: str,
    *,
    inputs: dict[str, Path],
    config: Any,
    metrics: dict[str, Any],
    files: list[str],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `<out>/manifest.json` (atomically, after the artifacts it names) and return it."""
    out = Path(out)
    payload = {
        "kind": kind,
        "inputs": {name: _hash_input(p) for name, p in inputs.items()},
        "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config,
        "metrics": metrics,
        "files": {name: file_sha256(out / name) for name in files},
        "versions": versions("torch", "executorch", "coremltools"),
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    write_json(out / MANIFEST, payload)
    return payload


def read_manifest(folder: Path, kind: str | None = None) -> dict[str, Any]:
    folder = Path(folder)
    manifest = read_json(folder / MANIFEST, missing=f"{folder} holds no {MANIFEST}; pass a folder a ditnas compression step wrote",
                         damaged=f"rerun the step that wrote {folder}")
    if kind is not None and manifest.get("kind") != kind:
        raise DitnasError(f"{folder / MANIFEST} is a {manifest.get('kind')!r} manifest, not {kind!r}; pass the folder of the right step")
    return manifest


def check_files(folder: Path, manifest: dict[str, Any] | None = None) -> None:
    """Refuse any file the manifest names whose sha256 changed since it was written."""
    folder = Path(folder)
    manifest = manifest if manifest is not None else read_manifest(folder)
    for name, recorded in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise DitnasError(f"{path} is missing though {folder / MANIFEST} names it; rerun the step that wrote {folder}")
        if file_sha256(path) != recorded:
            raise DitnasError(f"{path} does not match the sha256 {folder / MANIFEST} records (changed or damaged since it was "
                              f"written); rerun the step that wrote {folder}")
