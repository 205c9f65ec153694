"""Adversarial step distillation (Taming / SnapGen-V style): a few-step student against a discriminator
built on the frozen teacher.

- Discriminator = the frozen first `disc_blocks` teacher blocks (`SubDiTTrunk`, the "trunk") + one small
  trainable head per trunk block on that block's token features, conditioned on t and the label through
  the teacher's own (frozen) conditioning vector c(t, y). The trunk's weights never change; gradients still
  flow through it to the generator's samples.
- Inputs are noised to τ before the trunk ("diffusion GAN", DMD2 `--diffusion_gan`); the trunk is a
  denoiser, its features are meaningful on noisy inputs.  # assumption: the τ law of the DMD term
- Loss: non-saturating (softplus) — D: softplus(D(fake)) + softplus(-D(real)); G: softplus(-D(fake)),
  DMD2's GAN-head form.  # assumption: Taming's loss form is [NF]
- Generator = the few-step student (`dmd.FewStepGenerator`, one backward-simulated step per update), plus
  the same knowledge terms λ_out·L_out + λ_feat·L_feat on its x_t as K-DMD.  # assumption: Taming pairs
  adversarial training with KD; weights as K-DMD's
- TTUR as K-DMD: `critic_updates` discriminator updates per generator update.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ditnas.compress.dmd import TTUR, FewStepGenerator, _adam, knowledge_terms, make_projector, sample_tau, x0_from_v
from ditnas.errors import DitnasError
from ditnas.supernet.flow import interpolate
from ditnas.supernet.model import SubDiT, patchify


class SubDiTTrunk(nn.Module):
    """The first `blocks` (non-skip) blocks of a frozen SubDiT: (x, t, y) -> ([features per block], c).

    Walks `SubDiT._sub_plan()` exactly as `_Trunk._walk` does (the parity test holds it to that), stopping
    after the chosen block; each feature is that block's output slice of the residual stream."""

    def __init__(self, teacher: SubDiT, blocks: int):
        super().__init__()
        plan = teacher._sub_plan()
        real = [i for i, entry in enumerate(plan) if entry[1] is not None]
        if blocks > len(real):
            raise DitnasError(f"compress.distill.disc_blocks: {blocks} but the teacher {teacher.arch} has only "
                              f"{len(real)} blocks; choose disc_blocks <= {len(real)}")
        self.teacher = teacher
        self.last = real[blocks - 1]
        self.teacher.requires_grad_(False).eval()
        self.feature_dims = [self._width(plan[i]) for i in real[:blocks]]
        self.cond_dim = teacher.y_embed.embedding_dim

    def _width(self, entry) -> int:
        return entry[6] if len(entry) > 6 else entry[3] * self.teacher.head_dim

    def train(self, mode: bool = True) -> SubDiTTrunk:
        super().train(mode)
        self.teacher.eval()  # frozen: never in training mode
        return self

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
        m = self.teacher
        plan = m._sub_plan()
        tokens, grid = patchify(x, m.patch_size)
        h = m.patch(tokens)
        c, ctx = m._condition(t, y)
        stage, saved, feats = 0, [], []
        for entry in plan[: self.last + 1]:
            slot_stage, block, op, heads, hidden, mod_key = entry[:6]
            if slot_stage != stage:
                h, grid, stage = m._transition(h, grid, slot_stage, saved, m.down, m.up)
            if block is None:
                continue
            d = self._width(entry)
            if d == m.stream:
                full = heads is None or heads == m._all_heads(block, op)
                h = block(h, c, ctx, grid, op, None if full else heads, hidden, mod_key)
            else:
                inner = block(h[..., :d], c, ctx, grid, op, heads, hidden, mod_key)
                h = torch.cat([inner, h[..., d:]], dim=-1)
            feats.append(h[..., :d])
        return feats, c


class Head(nn.Module):
    """Per-token logit from (feature, c), averaged over tokens: LN -> Linear(d + c) -> SiLU -> Linear(1)."""

    def __init__(self, dim: int, cond_dim: int, hidden: int = 64):  # assumption: 64 hidden units
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, feat: Tensor, c: Tensor) -> Tensor:
        if feat.dim() == 2:  # (B, d): a toy trunk without tokens
            feat = feat.unsqueeze(1)
        feat = F.layer_norm(feat, feat.shape[-1:])
        cc = c.unsqueeze(1).expand(-1, feat.shape[1], -1)
        return self.net(torch.cat([feat, cc], dim=-1)).mean(dim=(1, 2))


class Discriminator(nn.Module):
    """Frozen trunk + trainable heads; `forward(x, t, y)` -> (B,) logits (sum over heads)."""

    def __init__(self, trunk: nn.Module, feature_dims: list[int], cond_dim: int):
        super().__init__()
        self.trunk = trunk.requires_grad_(False)
        self.heads = nn.ModuleList(Head(d, cond_dim) for d in feature_dims)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        feats, c = self.trunk(x, t, y)
        return sum(head(f, c) for head, f in zip(self.heads, feats))

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())


def d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Non-saturating discriminator loss (DMD2): softplus(D(fake)) + softplus(-D(real))."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def g_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating generator loss (DMD2): softplus(-D(fake))."""
    return F.softplus(-fake_logits).mean()


@dataclass(frozen=True)
class AdversarialSettings:
    student_steps: int = 4
    lambda_out: float = 1.0
    lambda_feat: float = 1.0
    lr: float = 1e-4
    critic_lr: float = 2e-4
    critic_updates: int = 5
    ttur_mode: str = "dmd2"
    shift: float = 3.0
    batch_size: int = 64
    grad_clip: float = 10.0


RealSampler = Callable[[int, torch.Generator], tuple[Tensor, Tensor]]  # (n, rng) -> (x0, y)


class Adversarial:
    """Student vs. frozen-trunk discriminator; same `iteration`/`state_dict` protocol as `dmd.KDMD`."""

    def __init__(self, student: nn.Module, teacher: nn.Module, disc: Discriminator, settings: AdversarialSettings, *,
                 shape: tuple[int, ...], real: RealSampler, generator: torch.Generator,
                 few_step_teacher: nn.Module | None = None):
        self.s, self.student, self.teacher, self.disc = settings, student, teacher, disc
        self.teacher.requires_grad_(False).eval()
        self.kd_teacher = (teacher if few_step_teacher is None else few_step_teacher).requires_grad_(False).eval()
        self.student.requires_grad_(True).train()
        self.use_kd = use_kd = settings.lambda_out > 0 or settings.lambda_feat > 0
        self.projector = make_projector(student, self.kd_teacher) if use_kd else None
        self.device = next(student.parameters()).device
        if self.projector is not None:
            self.projector.to(self.device)
        gen_params = list(student.parameters()) + (list(self.projector.parameters()) if self.projector is not None else [])
        self.opt_g = _adam(gen_params, settings.lr)
        self.opt_c = _adam(disc.head_parameters(), settings.critic_lr)  # assumption: K-DMD's Adam (0, 0.99) for the heads
        self.ttur = TTUR(settings.critic_updates, settings.ttur_mode)
        self.gen = FewStepGenerator(student, settings.student_steps, settings.shift)
        self.shape, self.real, self.rng = tuple(shape), real, generator
        self.counts = {"generator_updates": 0, "critic_updates": 0}
        # the critic.pt "critic" slot holds the heads only (the trunk is the teacher's, frozen)
        self.critic = disc.heads

    def _noised(self, x: Tensor) -> tuple[Tensor, Tensor]:
        tau = sample_tau(x.shape[0], self.rng, self.s.shift, self.device)
        eps = torch.randn(x.shape, generator=self.rng).to(self.device)
        return interpolate(x, eps, tau), tau

    def iteration(self, i: int) -> dict[str, Any]:
        s, n = self.s, self.s.batch_size
        x_real, y = self.real(n, self.rng)
        x_real, y = x_real.to(self.device), y.to(self.device)
        noise = torch.randn((n, *self.shape), generator=self.rng).to(self.device)
        # assumption: the backpropagated step k ~ U{0..K-1}, one k per batch (DMD2 backward simulation picks likewise)
        k = int(torch.randint(0, s.student_steps, (1,), generator=self.rng))
        record: dict[str, Any] = {"k": k}
        gen_step = self.ttur.generator_step(i)
        x_t, t = self.gen.simulate(noise, y, k)
        terms = None
        if gen_step and self.use_kd:  # one student forward serves the knowledge terms and x̂0
            terms = knowledge_terms(self.student, self.kd_teacher, self.projector, x_t, t, y)
            x0 = x0_from_v(x_t, t, terms["v"])
        else:
            with torch.set_grad_enabled(gen_step):
                x0 = x0_from_v(x_t, t, self.student(x_t, t, y))
        if gen_step:
            x_fake, tau = self._noised(x0)
            loss_adv = g_loss(self.disc(x_fake, tau, y))
            loss = loss_adv
            record["loss_adv"] = float(loss_adv.detach())
            if terms is not None:
                loss = loss + s.lambda_out * terms["out"] + s.lambda_feat * terms["feat"]
                record.update(loss_out=float(terms["out"].detach()), loss_feat=float(terms["feat"].detach()))
            self.opt_g.zero_grad(set_to_none=True)
            loss.backward()
            params = [p for g in self.opt_g.param_groups for p in g["params"]]
            norm = torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
            self.opt_g.step()
            self.opt_g.zero_grad(set_to_none=True)
            self.disc.zero_grad(set_to_none=True)
            self.counts["generator_updates"] += 1
            record.update(loss_generator=float(loss.detach()), grad_norm=float(norm))
        if self.ttur.critic_step(i):
            xf, tf = self._noised(x0.detach())
            xr, tr = self._noised(x_real)
            logits = self.disc(torch.cat([xr, xf]), torch.cat([tr, tf]), torch.cat([y, y]))
            loss_d = d_loss(logits[:n], logits[n:])
            self.opt_c.zero_grad(set_to_none=True)
            loss_d.backward()
            norm_c = torch.nn.utils.clip_grad_norm_(self.disc.head_parameters(), s.grad_clip)
            self.opt_c.step()
            self.opt_c.zero_grad(set_to_none=True)
            self.student.zero_grad(set_to_none=True)
            self.counts["critic_updates"] += 1
            record.update(loss_critic=float(loss_d.detach()), critic_grad_norm=float(norm_c),
                          d_real=float(logits[:n].mean().detach()), d_fake=float(logits[n:].mean().detach()))
        return record

    def state_dict(self) -> dict[str, Any]:
        return {
            "student": self.student.state_dict(),
            "critic": self.disc.heads.state_dict(),
            "projector": self.projector.state_dict() if self.projector is not None else {},
            "opt_g": self.opt_g.state_dict(),
            "opt_c": self.opt_c.state_dict(),
            "counts": dict(self.counts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.disc.heads.load_state_dict(state["critic"])
        if self.projector is not None:
            self.projector.load_state_dict(state["projector"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_c.load_state_dict(state["opt_c"])
        self.counts = {k: int(v) for k, v in state["counts"].items()}
