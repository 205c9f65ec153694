"""Training where users train: `torchrun` data parallelism (2 CPU ranks on gloo, for real), bf16 autocast,
and the device flag. Promise: N ranks follow the single-process run with the same global batch, a DDP run
resumed from its checkpoint equals an uninterrupted one, and a device or world size that cannot work is
one clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from cli_helpers import run
from ditnas.config import load_config
from ditnas.data import load_dataset
from ditnas.io import torch_load
from ditnas.supernet.train import CHECKPOINT_NAME, Trainer

TINY = [
    "model.max_heads=2", "model.head_dim=8", "model.cond_dim=16", "model.cond_tokens=1", "space.depth=3",
    "space.stage_pattern=[0,1,0]", "space.skippable=[1]", "space.widths=[0.5,1.0]", "space.mlp_ratios=[2,4]",
    "space.ops=[sa,lcha,ssa]", "train.batch_size=8", "train.steps=6", "train.checkpoint_every=3",
    "train.warmup_steps=2", "sample.steps=2", "train.threads=1", "train.device=cpu",
    # attentive: its pick depends on a minibatch loss, so it is the sampler that needs the ranks' losses averaged
    "train.sampler=attentive", "train.attentive_trials=2",
]


def _train(out: Path, ranks: int, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    sets = [arg for item in (*TINY, *extra) for arg in ("--set", item)]
    verb = ["-m", "ditnas.cli", "train", "--out", str(out), "--no-eval", "--no-progress", *sets]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *launcher, *verb], env=env, capture_output=True, text=True, timeout=300)


def _losses(out: Path) -> list[tuple[float, float, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return [(r["loss_max"], r["loss_subnets"], r["distill"]) for r in rows]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    single = _train(root / "single", 1)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = _train(root / "ddp", 2)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    return root


def test_two_gloo_ranks_follow_the_single_process_run(runs):
    one, two = _losses(runs / "single"), _losses(runs / "ddp")
    assert len(one) == len(two) == 6
    # the same numbers up to float summation order (a shard's mean, then the mean over ranks)
    for a, b in zip(one, two):
        assert a == pytest.approx(b, rel=2e-4), (one, two)
    wa, wb = (torch_load(runs / name / CHECKPOINT_NAME) for name in ("single", "ddp"))
    assert wa["step"] == wb["step"] == 6
    worst = max(float((wa["model"][k] - wb["model"][k]).abs().max()) for k in wa["model"])
    assert worst < 1e-4, worst
    manifest = json.loads((runs / "ddp" / "run.json").read_text())  # written once, by rank 0
    assert manifest["device"] == {"type": "cpu", "precision": "fp32", "ranks": 2}


def test_ddp_resumed_from_its_checkpoint_equals_uninterrupted(runs):
    out = runs / "ddp_resumed"
    first = _train(out, 2, ("train.steps=3",))
    assert first.returncode == 0, first.stderr[-2000:]
    assert torch_load(out / CHECKPOINT_NAME)["step"] == 3
    second = _train(out, 2)
    assert second.returncode == 0, second.stderr[-2000:]
    assert _losses(out) == _losses(runs / "ddp")
    a, b = (torch_load(d / CHECKPOINT_NAME) for d in (out, runs / "ddp"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


def test_a_world_size_that_does_not_divide_the_batch_is_refused(tmp_path):
    done = _train(tmp_path / "odd", 2, ("train.batch_size=7",))
    # torchrun exits 1 when a rank fails and stops the others: the first rank to fail exited 2 (a user
    # error, one line); the other exited 2 too or was stopped by torchrun before it got there
    assert done.returncode == 1 and done.stderr.count("exitcode  : 2") >= 1, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors and all("train.batch_size" in e and "7 does not split over 2 ranks" in e for e in errors), done.stderr
    assert "ConfigFieldError" not in done.stderr and "ditnas/" not in done.stderr  # (torchrun's own traceback follows)
    assert not (tmp_path / "odd" / CHECKPOINT_NAME).exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_clear_error(tmp_path, capsys):
    args = ["train", "--out", str(tmp_path / "gpu"), "--no-eval", "--no-progress", "--device", "cuda",
            *[a for item in TINY for a in ("--set", item)]]
    code, _, err = run(args, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "--device (train.device)" in err and "sees no CUDA GPU" in err
    code, _, err = run([*args[:-2 * len(TINY)], "--device", "tpu"], capsys)
    assert code == 2 and "'tpu' is not a device" in err


def test_bf16_autocast_trains_in_bf16_and_stays_close_to_fp32(tmp_path):
    split = load_dataset("digits")
    trainers = {p: Trainer(load_config(None, [*TINY, f"train.precision={p}"]), tmp_path / p, split)
                for p in ("fp32", "bf16")}
    seen: dict[str, set[torch.dtype]] = {"fp32": set(), "bf16": set()}

    class MatmulDtypes(TorchFunctionMode):  # the dtype every linear/matmul of a step produced
        def __init__(self, into: set):
            super().__init__()
            self.into = into

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (F.linear, torch.matmul, torch.bmm, torch.Tensor.__matmul__) and isinstance(out, torch.Tensor):
                self.into.add(out.dtype)
            return out

    losses = {}
    for p, t in trainers.items():
        with MatmulDtypes(seen[p]):
            losses[p] = [t.train_step().loss_max for _ in range(3)]
    assert seen["bf16"] == {torch.bfloat16} and seen["fp32"] == {torch.float32}, seen  # autocast really ran
    assert losses["bf16"] != losses["fp32"]
    for a, b in zip(losses["fp32"], losses["bf16"]):
        assert b == pytest.approx(a, rel=0.03), losses
    weights = trainers["bf16"].model.state_dict()
    assert all(v.dtype == torch.float32 for v in weights.values() if v.dtype.is_floating_point)
