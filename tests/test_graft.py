"""Grafting (supernet/graft.py): per-slot activation distillation from a trained teacher, the grafted start
of supernet training, and its bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch

from ditnas.config import load_config
from ditnas.data import load_split
from ditnas.errors import DitnasError
from ditnas.supernet.graft import GRAFTED_NAME, capture, copy_teacher, graft_ffn, graft_mixer, graft_supernet
from ditnas.supernet.train import CHECKPOINT_NAME, Trainer, build_space, build_supernet, train_supernet

TINY = [
    "model.max_heads=2", "model.head_dim=8", "model.cond_dim=16", "model.cond_tokens=1",
    "space.depth=3", "space.stage_pattern=[0,1,0]", "space.skippable=[1]", "space.widths=[0.5,1.0]",
    "space.mlp_ratios=[2,4]", "space.ops=[sa,lcha,ssa,assa]",
    "train.batch_size=8", "train.steps=6", "train.checkpoint_every=0", "train.warmup_steps=2",
    "graft.teacher_steps=10", "graft.steps=15", "graft.batches=3", "graft.lr=5e-3",
]


@pytest.fixture(scope="module")
def split():
    return load_split(load_config(None, TINY).data)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory, split):
    out = tmp_path_factory.mktemp("teacher")
    train_supernet(load_config(None, TINY + ["train.steps=20"]), out, split=split)
    return out / CHECKPOINT_NAME


def _batches(space, n=3, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, t, h, w = space.latent
    return [(torch.randn(batch, c, t, h, w, generator=g), torch.rand(batch, generator=g),
             torch.randint(0, space.num_classes, (batch,), generator=g)) for _ in range(n)]


def test_graft_mixer_regresses_the_teacher_and_leaves_it_unchanged(split, teacher_ckpt):
    torch.manual_seed(0)
    cfg = load_config(None, TINY)
    model = build_supernet(cfg, build_space(cfg, split))
    arch = copy_teacher(model, teacher_ckpt)
    caches = capture(model, arch, _batches(model.space))
    block = model.blocks[0]
    teacher_before = copy.deepcopy(block.mixers["sa"].state_dict())
    heads = sorted(model.head_counts.values())
    for op in ("lcha", "ssa", "assa"):
        before, after = graft_mixer(block.mixers[op], block.mixers["sa"], caches[0], heads, model.head_dim, 40, 5e-3)
        assert after < 0.85 * before, (op, before, after)  # held-out L1 to the teacher falls
    for k, v in block.mixers["sa"].state_dict().items():
        assert torch.equal(v, teacher_before[k]), k  # the teacher op is only read


def test_graft_ffn_brings_narrow_ratios_to_the_full_output(split, teacher_ckpt):
    torch.manual_seed(0)
    cfg = load_config(None, TINY)
    model = build_supernet(cfg, build_space(cfg, split))
    arch = copy_teacher(model, teacher_ckpt)
    caches = capture(model, arch, _batches(model.space))
    before, after = graft_ffn(model.blocks[2].ffn, caches[2], [2 * model.dim, 4 * model.dim], 40, 5e-3)
    assert after < 0.5 * before


def test_copied_teacher_runs_exactly_as_its_max_net(split, teacher_ckpt):
    from ditnas.supernet.train import load_supernet

    teacher, _, _ = load_supernet(teacher_ckpt)
    torch.manual_seed(1)  # another init: every weight the max net uses must come from the teacher
    cfg = load_config(None, TINY)
    model = build_supernet(cfg, build_space(cfg, split))
    arch = copy_teacher(model, teacher_ckpt)
    assert arch == model.space.max_arch()
    x, t, y = _batches(model.space, n=1)[0]
    with torch.no_grad():
        assert torch.allclose(model.run(arch, x, t, y), teacher.run(arch, x, t, y), atol=1e-6)
        # ops the teacher's max net does not use keep their own (fresh) init
        assert not torch.equal(model.blocks[0].mixers["lcha"].q.weight, teacher.blocks[0].mixers["lcha"].q.weight)


def test_graft_supernet_then_train_from_it(tmp_path, split):
    cfg = load_config(None, TINY)
    manifest = graft_supernet(cfg, tmp_path / "g", split=split)
    rows = manifest["slots"]
    assert {(r["slot"], r["op"]) for r in rows} == {(i, op) for i in (0, 2) for op in ("lcha", "ssa", "assa", "ffn")} | {
        (1, op) for op in ("lcha", "ssa", "assa", "ffn")}
    assert all(r["after"] < r["before"] for r in rows)
    grafted = tmp_path / "g" / GRAFTED_NAME
    state = torch.load(grafted, weights_only=False)
    trainer = Trainer(load_config(None, TINY + [f"train.init={grafted}"]), tmp_path / "t", split)
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v.cpu(), state["model"][k]), k
    assert trainer.ema.state_dict()["final.weight"].equal(state["model"]["final.weight"])  # the EMA starts there too
    trainer.train_step()  # and it trains
    from ditnas.supernet.train import load_supernet

    scored, _, meta = load_supernet(grafted)  # graft-and-score: the search reads it as a step-0 checkpoint
    assert meta["step"] == 0 and all(torch.equal(v, state["model"][k]) for k, v in scored.state_dict().items())


def test_graft_ops_only(tmp_path, split):
    manifest = graft_supernet(load_config(None, TINY + ["graft.ops=[lcha]", "graft.ffn=false"]), tmp_path, split=split)
    assert {r["op"] for r in manifest["slots"]} == {"lcha"}


def test_bad_inputs(tmp_path, split, teacher_ckpt):
    with pytest.raises(DitnasError, match=r"graft.ops \['gqa'\] are not in space.ops"):
        graft_supernet(load_config(None, TINY + ["graft.ops=[gqa]"]), tmp_path / "a", split=split)
    with pytest.raises(DitnasError, match=r"max_heads=2, head_dim=8.*but this space needs max_heads=4, head_dim=8"):
        graft_supernet(load_config(None, TINY + ["model.max_heads=4", f"graft.teacher={teacher_ckpt}"]),
                       tmp_path / "b", split=split)
    with pytest.raises(DitnasError, match="graft.teacher_steps"):
        graft_supernet(load_config(None, TINY + ["graft.teacher_steps=0"]), tmp_path / "c", split=split)
    with pytest.raises(DitnasError, match="train.init .* does not exist"):
        Trainer(load_config(None, TINY + [f"train.init={tmp_path / 'nope.pt'}"]), tmp_path / "d", split)
    with pytest.raises(DitnasError, match="is not a grafted supernet"):
        Trainer(load_config(None, TINY + [f"train.init={teacher_ckpt}"]), tmp_path / "e", split)
    graft_supernet(load_config(None, TINY + ["graft.ops=[lcha]", "graft.ffn=false", "graft.steps=1"]), tmp_path / "f", split=split)
    with pytest.raises(DitnasError, match=r"another space config \(differs in \['widths'\]\)"):
        Trainer(load_config(None, TINY + ["space.widths=[1.0]", f"train.init={tmp_path / 'f' / GRAFTED_NAME}"]),
                tmp_path / "g", split)
