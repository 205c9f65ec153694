"""2-in-1 video distillation (compress/video_distill.py) and causal supernet training on moving digits.

The rollout is checked against a brute-force recomputation of its causal context, against its own committed
caches (it must condition on what it generated), and the trainer for frozen teacher, loss reduction, exact
resume and the user errors."""

from __future__ import annotations

import copy

import pytest
import torch

from ditnas.arch import SearchSpace
from ditnas.config import DataConfig, ModelConfig, load_config
from ditnas.data import DatasetSplit, load_split
from ditnas.errors import DitnasError
from ditnas.supernet.flow import time_grid
from ditnas.supernet.model import ElasticDiT
from ditnas.supernet.streaming import Streamer
from ditnas.supernet.train import train_supernet
from ditnas.compress.video_distill import (
    StreamingDistiller,
    VideoDistillConfig,
    distill_video,
    eval_set,
    generate_recomputed,
    rollout,
    teacher_gap,
)

torch.set_num_threads(1)

LATENT = (1, 4, 8, 8)
SPACE = SearchSpace(depth=3, ops=("sa", "lcha", "ssa"), widths=(0.5, 1.0), mlp_ratios=(2.0,), skippable=(1,),
                    stage_pattern=(0, 0, 0), latent=LATENT, num_classes=10)
CFG = ModelConfig(max_heads=2, head_dim=8, cond_dim=32, cond_tokens=2)
TEACHER = "sa:1:2 sa:1:2 sa:1:2"
STUDENT = "lcha:1:2 skip ssa:0.5:2"
TIMES = time_grid(4, 3.0)


def _supernet() -> ElasticDiT:
    torch.manual_seed(0)
    net = ElasticDiT(SPACE, CFG)
    with torch.no_grad():  # leave adaLN-Zero's identity blocks, or every test is trivial
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval()


@pytest.fixture(scope="module")
def pair():
    net = _supernet()
    teacher = net.extract(SPACE.parse(TEACHER)).eval()
    student = net.extract(SPACE.parse(STUDENT)).set_causal(True).eval()
    return teacher, student


def _noise(n: int = 2, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *LATENT, generator=g), torch.randint(0, 10, (n,), generator=g)


def _split(n: int = 24) -> DatasetSplit:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *LATENT, generator=g).clamp(-1, 1)
    y = torch.randint(0, 10, (n,), generator=g)
    return DatasetSplit("toy-clips", x[:-4], y[:-4], x[-4:], y[-4:], 10)


# ----- the rollout ----------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 2])
def test_streamed_generation_equals_full_causal_recomputation(pair, chunk):
    _, student = pair
    noise, y = _noise()
    with torch.no_grad():
        streamed = rollout(Streamer(student, chunk), noise, y, TIMES).clip
    reference = generate_recomputed(student, noise, y, TIMES, chunk)
    assert (streamed - reference).abs().max().item() <= 1e-5
    # teeth: without the context (each chunk generated alone) the clip is another one
    alone = torch.cat([rollout(Streamer(student, chunk), noise[:, :, s:s + chunk], y, TIMES).clip
                       for s in range(0, LATENT[1], chunk)], dim=2)
    assert (alone - reference)[:, :, chunk:].abs().max().item() > 1e-3


def test_rollout_conditions_on_its_own_generated_chunks(pair):
    _, student = pair
    noise, y = _noise()
    streamer = Streamer(student, 1)
    with torch.no_grad():
        run = rollout(streamer, noise, y, TIMES)
        # chunk 2's input cache is exactly the commit of chunk 1's generated (clean) frames
        own = streamer.commit(run.clip[:, :, :1], y, streamer.new_cache(2))
        for name, tensor in run.caches[1].tensors().items():
            assert torch.equal(tensor, own.tensors()[name])
        bumped = rollout(streamer, noise, y, TIMES, edit=lambda k, x: x + 0.5 if k == 0 else x)
    changed = max((bumped.caches[1].tensors()[k] - v).abs().max().item() for k, v in run.caches[1].tensors().items())
    assert changed > 1e-3
    assert (bumped.clip[:, :, 1] - run.clip[:, :, 1]).abs().max().item() > 1e-3  # chunk 2 follows its context
    assert torch.equal(run.clip[:, :, 0] + 0.5, bumped.clip[:, :, 0])  # the edit is what was emitted
    # grad only when asked (Self-Forcing: through each chunk's last step)
    assert rollout(streamer, noise, y, TIMES, grad=True).clip.requires_grad and not run.clip.requires_grad


# ----- the trainer ----------------------------------------------------------------------------
@pytest.mark.parametrize("pairs", [0, 16])
def test_teacher_frozen_and_a_few_regression_steps_close_the_gap(pair, pairs):
    teacher, student = pair
    student = copy.deepcopy(student)
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = VideoDistillConfig(method="regression", batch_size=4, lr=2e-3, teacher_substeps=2, eval_clips=8, regression_pairs=pairs)
    evals = eval_set(teacher, cfg, 10, TIMES)
    before = teacher_gap(student, evals, cfg.chunk, TIMES)
    trainer = StreamingDistiller(student, teacher, cfg, 10)
    losses = [trainer.step()["loss_regression"] for _ in range(8)]
    after = teacher_gap(student, evals, cfg.chunk, TIMES)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert after < 0.8 * before, (before, after)
    assert all(torch.equal(v, frozen[k]) for k, v in teacher.state_dict().items())
    assert not any(p.requires_grad or p.grad is not None for p in teacher.parameters())


def test_dmd_updates_student_and_critic_on_ttur_schedule(pair):
    teacher, student = pair
    student = copy.deepcopy(student)
    cfg = VideoDistillConfig(method="dmd", batch_size=2, critic_updates=3, lr=1e-3)
    trainer = StreamingDistiller(student, teacher, cfg, 10)
    s0 = {k: v.clone() for k, v in student.state_dict().items()}
    c0 = {k: v.clone() for k, v in trainer.critic.state_dict().items()}
    record = trainer.step()
    assert trainer.updates == 1 and trainer.iterations == 1  # DMD2: the generator on iteration 0 ...
    trainer.step()
    assert trainer.updates == 2 and trainer.iterations == 4  # ... and every 3rd, the critic on every one
    assert record["loss_dmd"] >= 0 and record["dmd_grad_abs"] > 0
    assert max((v - s0[k]).abs().max().item() for k, v in student.state_dict().items()) > 0
    assert max((v - c0[k]).abs().max().item() for k, v in trainer.critic.state_dict().items()) > 0


def test_resumed_equals_uninterrupted(pair, tmp_path):
    teacher, student = pair
    cfg = VideoDistillConfig(kd_steps=2, steps=2, method="dmd", critic_updates=2, batch_size=2, eval_clips=2,
                             teacher_substeps=1, checkpoint_every=1)
    split = _split()
    whole = copy.deepcopy(student)
    seen = []
    manifest = distill_video(cfg, teacher, whole, split, tmp_path / "a", lambda s, n, r: seen.append((s, n, r["phase"])))
    assert seen == [(1, 4, "kd"), (2, 4, "kd"), (3, 4, "stream"), (4, 4, "stream")]
    assert manifest["kind"] == "ditnas.video_distill" and manifest["metrics"]["generator_updates"] == 2
    first = copy.deepcopy(student)
    partial = distill_video(cfg, teacher, first, split, tmp_path / "b", stop_after=3)
    assert partial == {"kind": "ditnas.video_distill", "complete": False, "step": 3}
    resumed = copy.deepcopy(student)  # a fresh process: the original student again, the checkpoint continues it
    distill_video(cfg, teacher, resumed, split, tmp_path / "b")
    for k, v in whole.state_dict().items():
        assert (v - resumed.state_dict()[k]).abs().max().item() <= 1e-6, k
    assert max((v - student.state_dict()[k]).abs().max().item() for k, v in whole.state_dict().items()) > 0


# ----- errors ---------------------------------------------------------------------------------
def test_bad_inputs_raise_one_line_errors(pair, tmp_path):
    teacher, student = pair
    split = _split()
    cfg = VideoDistillConfig(kd_steps=0, steps=1)
    bidirectional = _supernet().extract(SPACE.parse(STUDENT))
    with pytest.raises(DitnasError, match="not frame-causal"):
        distill_video(cfg, teacher, bidirectional, split, tmp_path / "x")
    other = ElasticDiT(SearchSpace(depth=3, ops=("sa",), widths=(1.0,), mlp_ratios=(2.0,), skippable=(),
                                   stage_pattern=(0, 0, 0), latent=(1, 2, 8, 8), num_classes=10), CFG)
    with pytest.raises(DitnasError, match=r"\(1, 2, 8, 8\) differs from the student's \(1, 4, 8, 8\)"):
        distill_video(cfg, other.extract(other.space.max_arch()), student, split, tmp_path / "x")
    with pytest.raises(DitnasError, match="chunk size 3 does not divide the clip length of 4 frames"):
        distill_video(VideoDistillConfig(chunk=3), teacher, student, split, tmp_path / "x")
    with pytest.raises(DitnasError, match="video_distill.method"):
        VideoDistillConfig(method="gan").check()


# ----- the supernet trains frame-causal on moving digits --------------------------------------
def test_causal_supernet_trains_on_moving_digits(tmp_path):
    cfg = load_config(None, ["data.source=moving_digits", "data.frames=2", "data.clips=64", "model.causal=true",
                             "model.max_heads=2", "model.head_dim=8", "model.cond_dim=32", "model.cond_tokens=2",
                             "space.depth=2", "space.stage_pattern=[0,0]", "space.skippable=[]",
                             "space.widths=[0.5,1.0]", "space.ops=[sa,lcha]", "space.mlp_ratios=[2.0]",
                             "train.steps=30", "train.batch_size=8", "train.warmup_steps=5", "train.lr=3e-3",
                             "train.checkpoint_every=0"])
    trainer = train_supernet(cfg, tmp_path, split=load_split(cfg.data))
    assert trainer.model.causal and trainer.model.extract(trainer.space.min_arch()).causal
    losses = [h["loss_max"] for h in trainer.history]
    assert len(losses) == 30 and all(map(lambda v: v == v and abs(v) < 1e3, losses))
    assert sum(losses[-10:]) / 10 < 0.9 * sum(losses[:10]) / 10, losses
    assert not ElasticDiT(SPACE, CFG).causal and ElasticDiT(SPACE, ModelConfig(causal=True, max_heads=2, head_dim=8)).causal
    assert DataConfig(source="moving_digits").frames == 8
