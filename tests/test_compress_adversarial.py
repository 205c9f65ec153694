"""Adversarial step distillation (compress/adversarial.py): frozen teacher trunk + trainable heads."""

import copy
import math

import pytest
import torch
from torch import nn

from ditnas.compress.adversarial import Adversarial, AdversarialSettings, Discriminator, SubDiTTrunk, d_loss, g_loss
from ditnas.compress.distill import distill_steps, read_metrics
from ditnas.compress.dmd import FewStepGenerator
from ditnas.config import DistillConfig
from ditnas.errors import DitnasError
from ditnas.search.threads import torch_threads
from ditnas.supernet.extract import load_subnet
from ditnas.supernet.model import Block
from test_compress_dmd import MLP, build_pair, mixture_distance, target, toys  # noqa: F401 (toys: the fixture)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_pair(tmp_path_factory.mktemp("adversarial"))


def test_gan_losses_equal_the_reference_formulas():
    real, fake = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-3.0, 0.0, 1.0])
    sp = lambda z: math.log1p(math.exp(z))  # noqa: E731
    assert d_loss(real, fake).item() == pytest.approx(sum(sp(f) for f in fake.tolist()) / 3
                                                      + sum(sp(-r) for r in real.tolist()) / 3, rel=1e-6)
    assert g_loss(fake).item() == pytest.approx(sum(sp(-f) for f in fake.tolist()) / 3, rel=1e-6)


def test_trunk_features_equal_the_teacher_blocks_in_its_own_forward(pair):
    teacher = load_subnet(pair["teacher"])
    blocks = [b for b in teacher.blocks if isinstance(b, Block)]
    seen = []
    handles = [b.register_forward_hook(lambda m, i, o: seen.append(o)) for b in blocks]
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(3, 1, 1, 16, 16, generator=g), torch.rand(3, generator=g), torch.tensor([1, 4, 10])
    with torch.no_grad():
        teacher(x, t, y)
    for h in handles:
        h.remove()
    trunk = SubDiTTrunk(teacher, len(blocks))
    with torch.no_grad():
        feats, c = trunk(x, t, y)
    assert len(feats) == len(blocks) == len(seen)
    for got, want in zip(feats, seen):
        torch.testing.assert_close(got, want[..., : got.shape[-1]], rtol=0, atol=0)
    with pytest.raises(DitnasError, match="disc_blocks"):
        SubDiTTrunk(teacher, len(blocks) + 1)


def test_trunk_is_frozen_and_heads_learn(pair, tmp_path):
    teacher, student = load_subnet(pair["teacher"]), load_subnet(pair["student"])
    before = copy.deepcopy(teacher.state_dict())
    trunk = SubDiTTrunk(teacher, 2)
    disc = Discriminator(trunk, trunk.feature_dims, trunk.cond_dim)
    heads_before = copy.deepcopy(disc.heads.state_dict())
    g = torch.Generator().manual_seed(0)
    real = lambda n, gen: (torch.randn(n, 1, 1, 16, 16, generator=gen).clamp(-1, 1), torch.randint(0, 10, (n,), generator=gen))  # noqa: E731
    settings = AdversarialSettings(student_steps=2, critic_updates=2, batch_size=4, lr=1e-3, critic_lr=1e-3)
    tr = Adversarial(student, teacher, disc, settings, shape=(1, 1, 16, 16), real=real, generator=g)
    grads_seen = []
    for i in range(4):
        tr.iteration(i)
        assert all(p.grad is None for p in teacher.parameters())
        assert all(not p.requires_grad for p in teacher.parameters())
    # one discriminator backward by hand: heads get gradients, the trunk none
    x = torch.randn(4, 1, 1, 16, 16, generator=g)
    loss = d_loss(disc(x, torch.rand(4, generator=g), torch.zeros(4, dtype=torch.long)), disc(-x, torch.rand(4, generator=g), torch.zeros(4, dtype=torch.long)))
    loss.backward()
    grads_seen = [p.grad.abs().sum().item() for p in disc.heads.parameters()]
    assert all(g > 0 for g in grads_seen)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(heads_before[k], v) for k, v in disc.heads.state_dict().items())
    assert tr.counts == {"generator_updates": 2, "critic_updates": 4}


class MLPTrunk(nn.Module):
    """The toy teacher's two hidden layers as the frozen trunk; c = its time embedding."""

    def __init__(self, net: MLP):
        super().__init__()
        self.net = net

    def forward(self, x, t, y):
        temb = MLP.embed(t)
        layers = self.net.net
        h1 = layers[1](layers[0](torch.cat([x, temb], -1)))
        h2 = layers[3](layers[2](h1))
        return [h1, h2], temb


def test_one_step_adversarial_student_moves_onto_the_mixture(toys):
    teacher, student = copy.deepcopy(toys["teacher"]), copy.deepcopy(toys["student"])
    frozen = copy.deepcopy(teacher.state_dict())
    z = torch.randn(512, 2, generator=torch.Generator().manual_seed(5))
    gen = FewStepGenerator(student, 1, 1.0)
    before = mixture_distance(gen.sample(z, None))
    disc = Discriminator(MLPTrunk(teacher), [64, 64], 16)
    settings = AdversarialSettings(student_steps=1, lambda_out=0, lambda_feat=0, lr=1e-3, critic_lr=1e-3,
                                   critic_updates=2, shift=1.0, batch_size=256)
    real = lambda n, g: (target(n, g), torch.zeros(n, dtype=torch.long))  # noqa: E731
    tr = Adversarial(student, teacher, disc, settings, shape=(2,), real=real, generator=torch.Generator().manual_seed(0))
    for i in range(2 * 300):
        tr.iteration(i)
    after = mixture_distance(gen.sample(z, None))
    # measured (800-step toys): 4.46 -> 0.25 at 600 iterations (17x; the GAN collapses onto one of the two
    # modes, a known GAN trait, so only the distance is asserted)
    assert before > 4.0 and after < before / 8
    assert all(torch.equal(frozen[k], v) for k, v in teacher.state_dict().items())


def test_adversarial_stage_writes_a_loadable_student(pair, tmp_path):
    cfg = DistillConfig(method="adversarial", steps=2, batch_size=4, critic_updates=2, checkpoint_every=1,
                        eval_samples=0, disc_blocks=2, few_step_teacher="teacher")
    manifest = distill_steps(cfg, pair["teacher"], pair["student"], tmp_path / "out")
    student = load_subnet(tmp_path / "out")
    assert str(student.arch) == str(load_subnet(pair["student"]).arch)
    assert manifest["metrics"]["generator_updates"] == 2 and manifest["metrics"]["critic_updates"] == 4
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert len(rows) == 4 and all(math.isfinite(r["loss_critic"]) for r in rows)
