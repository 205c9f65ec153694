"""Subnet extraction: a trained supernet + an Arch -> a standalone sub-DiT on disk with a manifest.

The folder holds `subnet.pt` (weights, arch string and the supernet config needed to rebuild the
module) and `manifest.json` (params, parity error against the supernet's `run`, input hashes).
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

import ditnas
from ditnas.arch import Arch, SearchSpace, resolve_arch
from ditnas.config import config_from_dict
from ditnas.errors import DitnasError
from ditnas.io import atomic_torch_save, file_sha256, read_json, torch_load, write_json
from ditnas.supernet.flow import interpolate
from ditnas.supernet.model import ElasticDiT, SubDiT, apply_prune_record
from ditnas.supernet.train import load_supernet, load_weights

SUBNET_NAME = "subnet.pt"


@torch.no_grad()
def parity_error(model: ElasticDiT, sub: SubDiT, arch: Arch, *, n: int = 8, seed: int = 0) -> float:
    """Max |run(arch) - sub| on a fixed random batch at several noise levels."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, *model.space.latent)
    x0, eps = torch.randn(shape, generator=g).clamp(-1, 1), torch.randn(shape, generator=g)
    t = torch.linspace(0.02, 0.98, n)
    y = torch.randint(0, model.space.num_classes + 1, (n,), generator=g)
    x_t = interpolate(x0, eps, t)
    return (model.run(arch, x_t, t, y) - sub(x_t, t, y)).abs().max().item()


def extract_subnet(checkpoint: Path, arch_text: str, out: Path, *, use_ema: bool = True) -> dict:
    """Extract `arch_text` from `checkpoint` into folder `out`; returns the manifest."""
    out = Path(out)
    model, cfg, state = load_supernet(checkpoint, use_ema=use_ema)
    arch = resolve_arch(model.space, arch_text)
    sub = model.extract(arch).eval()
    error = parity_error(model, sub, arch)
    atomic_torch_save(
        out / SUBNET_NAME,
        {"arch": str(arch), "config": state["config"], "space": state["space"], "weights": sub.state_dict()},
    )
    manifest = {
        "kind": "ditnas.subnet",
        "arch": str(arch),
        "arch_key": arch.key(),
        "params": sub.num_params(),
        "supernet_params": sum(p.numel() for p in model.parameters()),
        "parity_max_abs_error": error,
        "weights": "ema" if use_ema else "raw",
        "checkpoint": str(Path(checkpoint).resolve()),
        "checkpoint_sha256": file_sha256(Path(checkpoint)),
        "checkpoint_step": int(state["step"]),
        "files": {SUBNET_NAME: file_sha256(out / SUBNET_NAME)},  # load_subnet checks it
        "versions": {"ditnas": ditnas.__version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    write_json(out / "manifest.json", manifest)
    return manifest


def load_subnet(path: Path) -> SubDiT:
    """Rebuild a standalone sub-DiT written by `extract_subnet` (folder or subnet.pt)."""
    path = Path(path)
    if path.is_dir():
        path = path / SUBNET_NAME
    _check_recorded_hash(path)
    state = torch_load(path, what="subnet file")
    if not isinstance(state, dict) or not {"arch", "config", "space", "weights"} <= set(state):
        raise DitnasError(f"subnet file {path} is not a ditnas subnet; pass the folder written by `ditnas extract`")
    cfg = config_from_dict(state["config"], where=f"{path}:config")
    space = SearchSpace.from_dict(state["space"], source=f"{path}: field 'space'")
    skeleton = ElasticDiT(space, cfg.model)  # the structure only; weights are replaced below
    arch = space.parse(state["arch"], source=str(path))
    if state.get("prune"):  # a pruned subnet (compress/prune.py): the base arch re-shaped by the record
        record = state["prune"]
        sub = apply_prune_record(skeleton.extract(space.parse(record["base_arch"], source=f"{path}: prune.base_arch")),
                                 record, arch)
    else:
        sub = skeleton.extract(arch)
    load_weights(sub, state["weights"], path)
    return sub.eval()


def _check_recorded_hash(path: Path) -> None:
    """The manifest beside a subnet records its sha256: a changed or damaged file is refused."""
    manifest = path.parent / "manifest.json"
    if not manifest.exists() or not path.is_file():
        return
    recorded = (read_json(manifest, missing="", damaged=f"re-extract the subnet into {path.parent}")
                .get("files", {}).get(path.name))
    if recorded is not None and recorded != file_sha256(path):
        raise DitnasError(f"subnet file {path} does not match the sha256 {manifest} records (changed or damaged "
                          f"since extraction); re-run `ditnas extract` into {path.parent}")
