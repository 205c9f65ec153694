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


def test_sandwich_trains_max_and_min_every_step(tmp_path, split):
    cfg = load_config(None, TINY + ["train.sampler=sandwich", "train.num_random=1"])
    trainer = Trainer(cfg, tmp_path, split)
    seen = []
    original = trainer.model.run

    def spy(arch, x, t, y):
        seen.append(arch)
        return original(arch, x, t, y)

    trainer.model.run = spy
    randoms = set()
    for _ in range(3):
        seen.clear()
        stats = trainer.train_step()
        assert seen[0] == trainer.space.max_arch() and seen[-1] == trainer.space.min_arch()
        assert len(seen) == 3 and stats.archs == [a.layout() for a in seen[1:]]
        randoms.add(seen[1])
    assert len(randoms) > 1  # the middle subnet is drawn afresh each step


def _perturbed_trainer(cfg, out, split) -> Trainer:
    """A Trainer whose supernet is off the adaLN-Zero init, so every subnet computes something different."""
    trainer = Trainer(cfg, out, split)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return trainer


def _reference_grads(model, archs, x_t, t, y, target, weight: float, *, detach: bool) -> dict:
    """Gradients of SnapGen++ Eqs. 4-5 computed independently of the trainer, with or without sg()."""
    model.zero_grad(set_to_none=True)
    v_max = model.run(archs[0], x_t, t, y)
    teacher = v_max.detach() if detach else v_max
    loss = (v_max - target).pow(2).mean()
    for arch in archs[1:]:
        v = model.run(arch, x_t, t, y)
        loss = loss + (v - target).pow(2).mean() + weight * (v - teacher).pow(2).mean()
    loss.backward()
    return {k: p.grad for k, p in model.named_parameters()}


def test_distillation_target_carries_no_gradient(tmp_path, split, monkeypatch):
    """The real train_step: its gradients equal those of L_max + sum_s L_s + lambda*||v_s - sg(v_max)||^2,
    and not those of the same loss without the stop-gradient (the teacher path would then learn from
    every subnet's distillation term)."""
    import copy

    import ditnas.supernet.train as train_module

    weight = 4.0
    cfg = load_config(None, TINY + ["train.grad_clip=0", f"train.distill_weight={weight}", "train.class_dropout=0"])
    trainer = _perturbed_trainer(cfg, tmp_path, split)
    before = copy.deepcopy(trainer.model)  # the weights the step starts from
    runs, losses = [], []
    original_run, original_mse = trainer.model.run, train_module.mse

    def run_spy(arch, x, t, y):
        runs.append((arch, x, t, y))
        return original_run(arch, x, t, y)

    def mse_spy(a, b):
        losses.append((a, b))
        return original_mse(a, b)

    trainer.model.run = run_spy
    monkeypatch.setattr(train_module, "mse", mse_spy)
    trainer.train_step()

    archs = [a for a, *_ in runs]
    _, x_t, t, y = runs[0]
    assert archs[0] == trainer.space.max_arch() and len(archs) == 3  # max, one random, min
    target = losses[0][1]
    teachers = [b for _, b in losses[1:] if b is not target]
    assert len(teachers) == len(archs) - 1  # one distillation term per subnet ...
    for teacher in teachers:  # ... against the max arch's output with no autograd history
        assert not teacher.requires_grad and teacher.grad_fn is None

    got = {k: p.grad for k, p in trainer.model.named_parameters()}
    want = _reference_grads(before, archs, x_t, t, y, target, weight, detach=True)
    wrong = {k: g.clone() if g is not None else None for k, g in
             _reference_grads(before, archs, x_t, t, y, target, weight, detach=False).items()}
    assert got.keys() == want.keys()
    for k in got:
        assert (got[k] is None) == (want[k] is None), k
        if got[k] is not None:
            assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-7), k
    # and the check can tell them apart: without sg() the gradients are visibly different
    gap = max((got[k] - wrong[k]).abs().max().item() for k in got if got[k] is not None)
    assert gap > 1e-3 * max(got[k].abs().max().item() for k in got if got[k] is not None)


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


def test_fair_sampling_draws_every_choice_of_every_slot_equally_often(split):
    """Per slot, the ops (+ skip), widths and MLP ratios of the random subnets cycle through decks: after
    any number of draws their counts differ by at most one (uniform draws drift further apart)."""
    from ditnas.supernet.fair_sampling import FairDraw

    cfg = load_config(None, TINY)
    space = Trainer(cfg, "/nonexistent", split).space
    fair, rng = FairDraw(space), random.Random(0)
    for n in (1, 7, 40, 123):
        archs = [fair.sample(rng) for _ in range(n)] if n == 1 else archs + [fair.sample(rng) for _ in range(n - len(archs))]
        for i in range(space.depth):
            ops = Counter(a.slots[i].op for a in archs)
            choices = (*space.ops, "skip") if i in space.skippable else space.ops
            counts = [ops.get(c, 0) for c in choices]
            assert max(counts) - min(counts) <= 1, (n, i, counts)
            kept = [a.slots[i] for a in archs if a.slots[i].op != "skip"]
            for field, values in (("width", space.widths), ("mlp_ratio", space.mlp_ratios)):
                got = Counter(getattr(s, field) for s in kept)
                assert max(got.get(v, 0) for v in values) - min(got.get(v, 0) for v in values) <= 1, (n, i, field)
    uniform = [space.sample(random.Random(0)) for _ in range(1)] + [space.sample(rng) for _ in range(122)]
    spread = max(max(c.values()) - min(c.values()) for c in (Counter(a.slots[i].op for a in uniform) for i in range(space.depth)))
    assert spread > 1  # the control: independent draws are not this even


def test_fair_sampling_resumed_run_equals_uninterrupted(tmp_path, split):
    cfg = load_config(None, TINY + ["train.fair_sampling=true", "train.num_random=2"])
    straight = train_supernet(cfg, tmp_path / "a", split=split)
    train_supernet(cfg, tmp_path / "b", stop_after=2, split=split)  # the decks are mid-cycle here
    resumed = train_supernet(cfg, tmp_path / "b", split=split)
    _same_state(straight.model.state_dict(), resumed.model.state_dict())
    assert [h["loss_subnets"] for h in straight.history] == [h["loss_subnets"] for h in resumed.history]
    assert straight.subnets.fair.state_dict() == resumed.subnets.fair.state_dict()


def test_progressive_ops_trains_reference_ops_first_then_every_op(tmp_path, split):
    # 6 steps at progressive_ops 0.5: steps 1-3 only each stage's reference op (widths, ratios, skips still
    # elastic), then all three ops; a run stopped inside the first phase resumes into the same schedule
    cfg = load_config(None, TINY + ["train.num_random=4", "train.progressive_ops=0.5"])
    trainer = Trainer(cfg, tmp_path / "t", split)
    per_step = [[trainer.space.parse(layout) for layout in trainer.train_step().archs] for _ in range(6)]
    slots = [[s for a in archs for s in a.slots if not s.is_skip] for archs in per_step]
    assert {s.op for step in slots[:3] for s in step} == {"sa"}
    assert {s.op for step in slots[3:] for s in step} == {"sa", "lcha", "ssa"}
    assert len({(s.width, s.mlp_ratio) for step in slots[:3] for s in step}) > 1
    straight = train_supernet(cfg, tmp_path / "a", split=split)
    train_supernet(cfg, tmp_path / "b", stop_after=2, split=split)
    resumed = train_supernet(cfg, tmp_path / "b", split=split)
    _same_state(straight.model.state_dict(), resumed.model.state_dict())
    with pytest.raises(DitnasError, match="train.progressive_ops"):
        Trainer(load_config(None, TINY + ["train.progressive_ops=1.0"]), tmp_path / "c", split)
