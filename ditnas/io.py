"""Atomic writes and small file helpers: nothing half-written is ever left under a final name."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from io import BytesIO
from pathlib import Path
from typing import Any

import torch

from ditnas.errors import DitnasError


def write_error(path: Path, exc: BaseException) -> DitnasError:
    """The one message for a write that the disk refused (full, read-only, no permission)."""
    reason = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else str(exc).splitlines()[0][:200]
    return DitnasError(f"cannot write {path} ({reason}); free space or choose a writable output folder, then "
                       "rerun the same command (what was written before is intact)")


def _os_error_in_chain(exc: BaseException) -> OSError | None:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _atomic(path: Path, write) -> None:
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise write_error(path, exc) from None
    except RuntimeError as exc:  # torch.save: a refused write surfaces as its zip writer's RuntimeError
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        cause = _os_error_in_chain(exc)
        if cause is not None or "writ" in str(exc).lower():
            raise write_error(path, cause or exc) from None
        raise
    except BaseException:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda h: h.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def read_json(path: Path, *, missing: str, damaged: str) -> Any:
    """JSON from `path`; a missing or an unreadable/truncated file is one DitnasError ending in the
    caller's advice (`missing` / `damaged`: what to do about it)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DitnasError(f"{path} does not exist; {missing}") from None
    except (OSError, ValueError) as exc:
        raise DitnasError(f"{path} is unreadable or truncated ({type(exc).__name__}); {damaged}") from None


def write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def digest_path(path: Path) -> Path:
    """`<file>.sha256`, beside every torch file ditnas writes: a flipped bit in tensor data still loads, so
    torch's reader alone cannot tell a damaged checkpoint from a good one."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def atomic_torch_save(path: Path, payload: Any) -> None:
    """Write a torch file and its digest. The digest goes first and keeps the previous file's hash too, so a
    kill between the two renames leaves the old file still accepted, never a good file refused."""
    path = Path(path)
    buffer = BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    previous = file_sha256(path) if path.is_file() else None
    side = digest_path(path)
    atomic_write_text(side, json.dumps({"sha256": hashlib.sha256(data).hexdigest(), "previous": previous}) + "\n")
    try:
        atomic_write_bytes(path, data)
    except DitnasError:  # the disk refused the file: the digest goes back to naming what is there
        if previous is None:
            side.unlink(missing_ok=True)
        else:
            try:
                atomic_write_text(side, json.dumps({"sha256": previous, "previous": None}) + "\n")
            except DitnasError:
                pass  # the digest still lists the old file's hash as `previous`: it loads
        raise


def verify_digest(path: Path, what: str) -> None:
    """Refuse a torch file whose sha256 is not the one its `.sha256` recorded (a file without one, written by
    an older ditnas or by hand, is loaded as it is)."""
    side = digest_path(path)
    if not side.is_file():
        return
    record = read_json(side, missing="", damaged=f"delete it to load {path} unchecked, or re-run the step that wrote it")
    if not isinstance(record, dict) or "sha256" not in record:
        raise DitnasError(f"{side} is not a ditnas digest; delete it to load {path} unchecked, or re-run the step that wrote it")
    actual = file_sha256(path)
    if actual not in (record.get("sha256"), record.get("previous")):
        raise DitnasError(f"{what} {path} does not match the sha256 in {side.name} (changed or damaged since it was "
                          f"written); restore it from a copy, or delete it and its {side.name} and re-run the step that wrote it")


def torch_load(path: Path, what: str = "checkpoint") -> Any:
    """`torch.load(weights_only=True)` with one clear error for missing or damaged files (digest checked)."""
    path = Path(path)
    if not path.is_file():
        raise DitnasError(f"{what} {path} does not exist; check the path (train writes <out>/checkpoint.pt)")
    verify_digest(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated zips/pickles
        raise DitnasError(
            f"{what} {path} is unreadable or truncated ({type(exc).__name__}); re-run the step that wrote it"
        ) from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def versions(*packages: str) -> dict[str, str | None]:
    """Versions of ditnas, python and `packages` for a manifest (None where one is not installed)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"ditnas": None, "python": platform.python_version()}
    for name in ("ditnas", *packages):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out
