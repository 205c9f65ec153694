"""Where training runs and in which precision: `train.device` (auto | cpu | cuda | mps) and
`train.precision` (fp32 | bf16 autocast). Data, noise and every RNG stay on the CPU (so a run draws the
same batches on any device and resumes anywhere); only the model and the batch it is fed move."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from ditnas.errors import ConfigFieldError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("fp32", "bf16")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str, *, local_rank: int = 0, field: str = "train.device") -> torch.device:
    """The torch device for a configured name; `auto` takes a CUDA GPU, then Apple's MPS, then the CPU.
    Under torchrun each rank takes the GPU of its LOCAL_RANK. A device this machine lacks is refused."""
    if name not in DEVICES:
        raise ConfigFieldError(field, f"{name!r} is not a device; use one of {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ConfigFieldError(field, f"cuda asked for, but torch {torch.__version__} ({build}) sees no CUDA GPU "
                                          "on this machine; use --device cpu, or auto to take a GPU only when there is one")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "mps":
        if not _mps_available():
            raise ConfigFieldError(field, "mps asked for, but torch sees no Apple MPS device here; use --device cpu or auto")
        return torch.device("mps")
    return torch.device("cpu")


def check_precision(precision: str, device: torch.device, field: str = "train.precision") -> None:
    if precision not in PRECISIONS:
        raise ConfigFieldError(field, f"{precision!r} is not a precision; use one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigFieldError(field, f"bf16 asked for, but {torch.cuda.get_device_name(device)} has no bf16 support; "
                                      "use --precision fp32")


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 autocast of the forward pass (weights, optimiser state and EMA stay fp32); fp32: nothing."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
