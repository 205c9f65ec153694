"""Knowledge distillation (ditnas/compress/kd.py) on a tiny supernet trained for real: features are the
stream the final layer reads, the KD terms equal independent MSEs, the teacher is frozen, KD lowers the
KD loss, the output loads with load_subnet, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ditnas.compress.kd import (
    KDTrainer,
    Projector,
    distill_kd,
    forward_with_features,
    kd_loss,
    kd_terms,
    projector_for,
)
from ditnas.manifest import read_manifest
from ditnas.config import KDConfig, load_config
from ditnas.data import load_dataset
from ditnas.errors import DitnasError
from ditnas.search.threads import torch_threads
from ditnas.supernet.extract import extract_subnet, load_subnet
from ditnas.supernet.flow import fixed_eval_batch, mse
from ditnas.supernet.model import layer_norm, modulate, unpatchify
from ditnas.supernet.train import CHECKPOINT_NAME, train_supernet

# 4 heads of 8 (so head / GQA-group pruning has units), three blocks with a half-resolution middle.
SMALL = [
    "model.max_heads=4", "model.head_dim=8", "model.cond_dim=16", "model.cond_tokens=1",
    "space.depth=4", "space.stage_pattern=[0,1,1,0]", "space.skippable=[1,2]", "space.widths=[0.5,1.0]",
    "space.mlp_ratios=[2,4]", "space.ops=[sa,gqa,lcha]",
    "train.batch_size=16", "train.checkpoint_every=0", "train.warmup_steps=10",
]
TEACHER = "sa:1:4 | gqa:1:4 lcha:1:4 | sa:1:4"
STUDENT = "sa:0.5:2 | gqa:1:2 skip | lcha:0.5:4"


def build_subnets(root: Path, steps: int = 120) -> dict:
    """Train the SMALL supernet for `steps` steps; extract a teacher (full width) and a student."""
    cfg = load_config(None, SMALL + [f"train.steps={steps}"])
    split = load_dataset("digits")
    train_supernet(cfg, root / "run", split=split)
    ckpt = root / "run" / CHECKPOINT_NAME
    extract_subnet(ckpt, TEACHER, root / "teacher")
    extract_subnet(ckpt, STUDENT, root / "student")
    return {"root": root, "ckpt": ckpt, "teacher": root / "teacher", "student": root / "student", "split": split, "cfg": cfg}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def shared_env(tmp_path_factory, steps: int = 80) -> dict:
    """build_subnets once per test session (test_compress_prune.py reuses it, and adds a latency table)."""
    root = tmp_path_factory.getbasetemp() / f"compress_env_{steps}"
    done = root / "done"
    if done.exists():
        cfg = load_config(None, SMALL + [f"train.steps={steps}"])
        return {"root": root, "ckpt": root / "run" / CHECKPOINT_NAME, "teacher": root / "teacher",
                "student": root / "student", "split": load_dataset("digits"), "cfg": cfg}
    root.mkdir(parents=True, exist_ok=True)
    env = build_subnets(root, steps)
    done.write_text("ok")
    return env


@pytest.fixture(scope="module")
def env(tmp_path_factory, one_thread):
    return shared_env(tmp_path_factory)


def _batch(env, n=24, seed=5):
    split = env["split"]
    b = fixed_eval_batch(split.val_x, split.val_y, n, seed, split.num_classes)
    return b.x_t, b.t, b.y, b.target


def test_features_are_the_stream_the_final_layer_reads(env):
    for folder in ("teacher", "student"):
        model = load_subnet(env[folder])
        x, t, y, _ = _batch(env)
        v, f = forward_with_features(model, x, t, y)
        assert torch.equal(v, model(x, t, y))  # the same computation, bit for bit
        assert f.shape == (x.shape[0], model.arch.tokens(0), model.stream)
        # the final adaLN + Linear applied to the features gives the velocity back
        c, _ = model._condition(t, y)
        m = model.final_mod(F.silu(c)).reshape(x.shape[0], 1, 2 * model.stream)
        h = model.final(modulate(layer_norm(f), m[..., : model.stream], m[..., model.stream :]))
        assert torch.allclose(unpatchify(h, model.arch.grid(0), model.patch_size, model.channels), v, atol=1e-6)


def test_kd_terms_equal_independent_mses_and_the_teacher_is_frozen(env):
    teacher, student = load_subnet(env["teacher"]), load_subnet(env["student"])
    proj = projector_for(student, teacher)
    x, t, y, target = _batch(env)
    terms = kd_terms(student, teacher, proj, x, t, y)
    with torch.no_grad():
        v_t, f_t = forward_with_features(teacher, x, t, y)
        v_s, f_s = forward_with_features(student, x, t, y)
    assert terms["out"].item() == pytest.approx(((v_s - v_t) ** 2).mean().item(), rel=1e-6)
    assert terms["feat"].item() == pytest.approx(((proj(f_s) - f_t) ** 2).mean().item(), rel=1e-6)
    assert terms["out"].item() > 1e-4 and terms["feat"].item() > 1e-4  # a narrower student differs
    cfg = KDConfig(lambda_out=1.0, lambda_feat=1.0)
    parts = kd_loss(terms, target, cfg)
    assert parts["loss"].item() == pytest.approx(mse(v_s, target).item() + terms["out"].item() + terms["feat"].item(), rel=1e-6)
    parts = kd_loss(terms, target, KDConfig(lambda_out=0.5, lambda_feat=2.0))
    assert parts["loss"].item() == pytest.approx(mse(v_s, target).item() + 0.5 * terms["out"].item() + 2 * terms["feat"].item(), rel=1e-6)
    assert kd_loss(terms, target, KDConfig(lambda_out=0.0, lambda_feat=0.0))["loss"].item() == pytest.approx(mse(v_s, target).item())
    parts["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())  # frozen: no graph through the teacher
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0  # the projector is trained
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_projector_is_identity_initialised_and_a_self_teacher_has_zero_kd_terms(env):
    teacher = load_subnet(env["teacher"])
    x, t, y, _ = _batch(env)
    proj = Projector(teacher.stream, teacher.stream)
    f = torch.randn(3, 5, teacher.stream)
    assert torch.equal(proj(f), f)
    narrow = Projector(16, 32)
    g = torch.randn(2, 16)
    assert torch.equal(narrow(g)[:, :16], g) and torch.equal(narrow(g)[:, 16:], torch.zeros(2, 16))
    terms = kd_terms(teacher, teacher, proj, x, t, y)
    assert terms["out"].item() == 0.0 and terms["feat"].item() == 0.0


def test_kd_trainer_lowers_the_kd_loss_and_leaves_the_teacher_unchanged(env):
    teacher, student = load_subnet(env["teacher"]), load_subnet(env["student"])
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = KDConfig(steps=0, batch_size=16, lr=1e-3, seed=0)
    trainer = KDTrainer(student, teacher, cfg, env["split"])
    x, t, y, target = _batch(env, n=64, seed=11)

    def loss():
        with torch.no_grad():
            return kd_loss(kd_terms(trainer.student, teacher, trainer.projector, x, t, y), target, cfg)["loss"].item()

    start = loss()
    trainer.run(40)
    end = loss()
    assert end < 0.9 * start, (start, end)
    assert all(torch.equal(before_t[k], v) for k, v in teacher.state_dict().items())


def test_distill_kd_writes_a_loadable_student_and_resumed_equals_uninterrupted(env, tmp_path):
    cfg = KDConfig(steps=6, batch_size=8, checkpoint_every=2, seed=1, eval_items=32)
    full = distill_kd(cfg, env["teacher"], env["student"], tmp_path / "full")
    assert full["kind"] == "ditnas.kd"
    m = read_manifest(tmp_path / "full", "ditnas.kd")
    assert m["metrics"]["steps"] == 6 and set(m["metrics"]["before"]) >= {"kd_loss", "kd_out", "kd_feat", "val_flow_loss"}
    lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == list(range(1, 7))
    out = load_subnet(tmp_path / "full")
    assert str(out.arch) == str(load_subnet(env["student"]).arch)
    # interrupted after 3 steps (checkpoint at 2 and at the stop), then rerun into the same folder
    part = distill_kd(cfg, env["teacher"], env["student"], tmp_path / "resumed", stop_after=3)
    assert part["complete"] is False and part["step"] == 3
    assert not (tmp_path / "resumed" / "subnet.pt").exists()
    distill_kd(cfg, env["teacher"], env["student"], tmp_path / "resumed")
    again = load_subnet(tmp_path / "resumed")
    for (k, a), (_, b) in zip(out.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert (tmp_path / "resumed" / "metrics.jsonl").read_text() == (tmp_path / "full" / "metrics.jsonl").read_text()
    # the output really was trained: it differs from the input student
    src = load_subnet(env["student"])
    assert any(not torch.equal(a, b) for a, b in zip(src.state_dict().values(), out.state_dict().values()))
    # other settings into the same folder are refused, not mixed
    with pytest.raises(DitnasError, match="other inputs or settings"):
        distill_kd(replace(cfg, lr=1e-3), env["teacher"], env["student"], tmp_path / "resumed")


def test_distill_kd_lowers_the_kd_loss_end_to_end(env, tmp_path):
    cfg = KDConfig(steps=40, batch_size=16, lr=1e-3, checkpoint_every=100, seed=0, eval_items=128)
    m = distill_kd(cfg, env["teacher"], env["student"], tmp_path / "kd")
    before, after = m["metrics"]["before"], m["metrics"]["after"]
    assert after["kd_loss"] < 0.9 * before["kd_loss"], (before, after)
    assert after["kd_out"] < before["kd_out"]


def test_teacher_student_mismatch_names_both_archs(env, tmp_path):
    state = torch.load(env["student"] / "subnet.pt", weights_only=True)
    state["arch"] = state["arch"].replace("latent=1x1x16x16", "latent=1x1x8x8")
    state["space"] = dict(state["space"], latent=[1, 1, 8, 8])
    (tmp_path / "other").mkdir()
    torch.save(state, tmp_path / "other" / "subnet.pt")
    with pytest.raises(DitnasError, match=r"latent.*teacher \[patch=2 latent=1x1x16x16.*student \[patch=2 latent=1x1x8x8"):
        distill_kd(KDConfig(steps=1), env["teacher"], tmp_path / "other", tmp_path / "out")
