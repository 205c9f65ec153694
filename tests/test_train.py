import random
from collections import Counter

import pytest
import torch

from ditnas.config import load_config
from ditnas.data import load_dataset
from ditnas.errors import DitnasError
from ditnas.supernet.flow import euler_sample, eval_flow_loss, fixed_eval_batch, interpolate, shift_time, time_grid
from ditnas.supernet.train import CHECKPOINT_NAME, SubnetSampler, Trainer, load_supernet, train_supernet

TINY = [
    "model.max_heads=2", "model.head_dim=8", "model.cond_dim=16", "model.cond_tokens=1",
    "space.depth=3", "space.stage_pattern=[0,1,0]", "space.skippable=[1]", "space.widths=[0.5,1.0]",
    "space.mlp_ratios=[2,4]", "space.ops=[sa,lcha,ssa]",
    "train.batch_size=8", "train.steps=6", "train.checkpoint_every=0", "train.warmup_steps=2",
]


@pytest.fixture(scope="module")
def split():
    return load_dataset("digits")


def _same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resumed_run_equals_uninterrupted(tmp_path, split):
    cfg = load_config(None, TINY)
    straight = train_supernet(cfg, tmp_path / "a", split=split)
    first = train_supernet(cfg, tmp_path / "b", stop_after=3, split=split)
    assert first.step == 3 and (tmp_path / "b" / CHECKPOINT_NAME).exists()
    resumed = train_supernet(cfg, tmp_path / "b", split=split)  # a fresh Trainer reads the checkpoint
    assert resumed.step == straight.step == 6
    _same_state(straight.model.state_dict(), resumed.model.state_dict())
    _same_state(straight.ema.state_dict(), resumed.ema.state_dict())
    assert [h["loss_max"] for h in straight.history] == [h["loss_max"] for h in resumed.history]


def test_sandwich_trains_max_and_min_every_step_with_detached_teacher(tmp_path, split):
    cfg = load_config(None, TINY + ["train.num_random=1"])
    trainer = Trainer(cfg, tmp_path, split)
    seen = []
    original = trainer.model.run

    def spy(arch, x, t, y):
        out = original(arch, x, t, y)
        seen.append((arch, out))
        return out

    trainer.model.run = spy
    for _ in range(3):
        seen.clear()
        trainer.train_step()
        archs = [a for a, _ in seen]
        assert archs[0] == trainer.space.max_arch() and archs[-1] == trainer.space.min_arch()
        assert len(archs) == 3


def test_distillation_target_carries_no_gradient(tmp_path, split):
    """With lambda_d only (no flow loss on subnets), the max-only parameters get no gradient from it."""
    cfg = load_config(None, TINY)
    trainer = Trainer(cfg, tmp_path, split)
    model = trainer.model
    x0, y = trainer.batches.next()
    t = torch.full((x0.shape[0],), 0.5)
    x_t = interpolate(x0, torch.randn_like(x0), t)
    teacher = model.run(trainer.space.max_arch(), x_t, t, y).detach()
    model.zero_grad()
    sub = trainer.space.min_arch()
    (model.run(sub, x_t, t, y) - teacher).pow(2).mean().backward()
    full_width_mod = model.blocks[0].mod["h2"]  # only the max (2-head) width uses this modulation
    assert full_width_mod.weight.grad is None
    assert model.blocks[0].mixers["sa"].q.weight.grad is None  # the min arch does not use slot 0's SA
    assert model.blocks[0].mixers["ssa"].q.weight.grad is not None


def test_uniform_sampler_frequencies(split):
    cfg = load_config(None, TINY)
    from ditnas.supernet.train import build_space

    space = build_space(cfg, split)
    sampler = SubnetSampler(space, "uniform", num_random=1, trials=3, mode="bestup")
    rng = random.Random(0)
    widths = Counter()
    ops = Counter()
    for _ in range(600):
        (arch,) = sampler.choose(rng, lambda a: 0.0)
        slot = arch.slots[0]
        widths[slot.width] += 1
        ops[slot.op] += 1
    assert all(abs(c / 600 - 1 / 2) < 0.07 for c in widths.values())
    assert all(abs(c / 600 - 1 / 3) < 0.07 for c in ops.values())


def test_attentive_sampler_picks_by_loss(split):
    cfg = load_config(None, TINY)
    from ditnas.supernet.train import build_space

    space = build_space(cfg, split)
    score = lambda a: float(a.depth) + sum(s.width for s in a.slots)  # noqa: E731
    for mode, pick in (("worstup", max), ("bestup", min)):
        sampler = SubnetSampler(space, "attentive", num_random=1, trials=4, mode=mode)
        rng, ref = random.Random(5), random.Random(5)
        chosen = sampler.choose(rng, score)
        candidates = [space.sample(ref) for _ in range(4)]
        assert chosen[0] == pick(candidates, key=score) and chosen[1] == space.min_arch()


def test_bad_sampler_name_is_clear(tmp_path, split):
    cfg = load_config(None, TINY + ["train.sampler=greedy"])
    with pytest.raises(DitnasError, match="train.sampler='greedy' unknown"):
        Trainer(cfg, tmp_path, split)


def test_checkpoint_mismatch_and_truncation(tmp_path, split):
    cfg = load_config(None, TINY + ["train.steps=1"])
    train_supernet(cfg, tmp_path / "run", split=split)
    ckpt = tmp_path / "run" / CHECKPOINT_NAME
    model, _, _ = load_supernet(ckpt)
    assert model.space.depth == 3
    other = load_config(None, TINY + ["train.steps=2", "model.head_dim=4"])
    with pytest.raises(DitnasError, match="another model/space config"):
        train_supernet(other, tmp_path / "run", split=split)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(DitnasError, match="unreadable or truncated"):
        load_supernet(broken)
    with pytest.raises(DitnasError, match="does not exist"):
        load_supernet(tmp_path / "nope.pt")
    state = torch.load(ckpt, weights_only=True)
    state["ema"]["patch.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "shapes.pt")
    with pytest.raises(DitnasError, match="patch.weight has shape"):
        load_supernet(tmp_path / "shapes.pt")


def test_flow_pieces():
    t = torch.linspace(0, 1, 11)
    assert torch.allclose(shift_time(t, 3.0)[[0, -1]], torch.tensor([0.0, 1.0]))
    assert torch.all(shift_time(t, 3.0) >= t)  # shift > 1 moves time toward noise
    grid = time_grid(4, 3.0)
    assert grid[0] == 1 and grid[-1] == 0 and torch.all(grid[1:] < grid[:-1])
    # the exact velocity of a point mass integrates to that point in one Euler step
    x0 = torch.full((2, 1, 1, 2, 2), 0.25)
    out = euler_sample(lambda x, tt, y: (x - x0) / tt.reshape(-1, 1, 1, 1, 1), torch.zeros(2, dtype=torch.long),
                       (1, 1, 2, 2), steps=1, null_label=10, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, x0, atol=1e-6)


def test_eval_loss_is_deterministic_and_exact_for_the_true_velocity():
    x0 = torch.randn(20, 1, 1, 4, 4)
    batch = fixed_eval_batch(x0, None, 40, seed=3, null_label=0)
    again = fixed_eval_batch(x0, None, 40, seed=3, null_label=0)
    assert torch.equal(batch.eps, again.eps) and torch.equal(batch.t, again.t)
    oracle = lambda x, t, y: batch.target  # noqa: E731
    assert eval_flow_loss(oracle, batch, chunk=64) == 0.0
    assert eval_flow_loss(lambda x, t, y: torch.zeros_like(x), batch) == pytest.approx(batch.target.pow(2).mean().item())


def test_standalone_trainer_trains_exactly_the_arch(split):
    from ditnas.supernet.train import StandaloneTrainer, build_space

    cfg = load_config(None, TINY)
    space = build_space(cfg, split)
    arch = space.min_arch()
    trainer = StandaloneTrainer(arch, cfg, split)
    assert trainer.model.arch == arch
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_step()
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and trainer.step == 1
