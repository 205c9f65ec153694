"""K-DMD: distribution-matching step distillation of a rectified-flow teacher (SnapGen++ Eq. 10).

The concept chain, one function each:

1. `FewStepGenerator` — the student run as a K-step Euler sampler from noise on `time_grid(K, shift)`.
   A generator update backpropagates through ONE student step: pick k ~ U{0..K-1}, run steps 0..k-1
   without grad (DMD2 "backward simulation": the student's own intermediate inputs), then take step k with
   grad and use its denoised estimate x̂0 = x_t - t·v as the generator output.
2. `dmd_grad` — re-noise x̂0 to τ, ask the real score (teacher with CFG) and the fake score (critic) for their
   x0-predictions, grad = (x̂0_fake - x̂0_real) / mean|x - x̂0_real| per sample (DMD2 code).
3. `dmd_loss` — 0.5·MSE(x, sg(x - grad)), whose derivative w.r.t. x is exactly grad / numel.
4. `critic_loss` — flow matching of the critic (fake score) on detached generator samples.
5. `TTUR` — which iteration updates whom: the generator every `ratio`-th iteration, the critic on every
   iteration (DMD2 convention, "dmd2") or only on the others ("exclusive").
6. `KDMD` — one object owning student, critic, projector and both optimizers; `iteration(i)` does one
   TTUR iteration and returns its metrics. Plus the few-step-teacher terms λ_out·L_out + λ_feat·L_feat on the
   same x_t as the student step (compress/kd.py's `kd_terms`).

The few-step teacher ξ' (`# assumption:`): SnapGen++ uses a 4-step Lightning LoRA on the teacher, which we do
not have. We build one inside the stage by trajectory KD ("reflow" onto the student's grid): run the teacher's
own ODE (CFG, `substeps` Euler steps per student interval) from a fixed set of noises, keep its states at the
student's K timesteps and its end point x0*, and regress a copy of the teacher so that x_k - t_k·v_ξ'(x_k) = x0*
at every kept state (`train_trajectory_teacher`). ξ' then lands on the teacher's 28-step solution in K steps,
and L_out / L_feat use its velocity and final-block features on the student's x_t (`few_step_teacher=
"trajectory"`). The default, `few_step_teacher="teacher"`, uses ξ itself (no CFG): on bench/distill.py (digits,
100 generator updates) it gave the better 4-step student (FD 24.98 vs 35.72 with the trajectory ξ').

Everything here works on any velocity net `f(x, t, y)`, so the tests run the same code on 2-D toys.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ditnas.supernet.flow import interpolate, shift_time, time_grid

# DMD2 code: t ~ U[min_step_percent, max_step_percent] = [0.02, 0.98] for the re-noising level
TAU_MIN, TAU_MAX = 0.02, 0.98


def _bcast(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def x0_from_v(x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """Denoised estimate of a rectified flow x_t = (1-t) x0 + t eps, v = eps - x0: x̂0 = x_t - t·v."""
    return x_t - _bcast(t, x_t) * v


def guided_velocity(net: nn.Module, x: Tensor, t: Tensor, y: Tensor, scale: float, null_label: int) -> Tensor:
    """CFG in v space (equivalently in x0 space, x0 is affine in v): v_null + g (v_cond - v_null)."""
    if scale == 1.0:
        return net(x, t, y)
    n = x.shape[0]
    both = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_label)]))
    v_cond, v_null = both[:n], both[n:]
    return v_null + scale * (v_cond - v_null)


def sample_tau(n: int, generator: torch.Generator, shift: float, device: torch.device | None = None) -> Tensor:
    """Re-noising levels τ: U[0.02, 0.98] (DMD2) then the SD3 shift (SnapGen++ supp. H: shift 3)."""
    u = TAU_MIN + (TAU_MAX - TAU_MIN) * torch.rand(n, generator=generator)
    return shift_time(u, shift).to(device)


@torch.no_grad()
def dmd_grad(
    x: Tensor,
    tau: Tensor,
    eps: Tensor,
    y: Tensor,
    real: nn.Module,
    fake: nn.Module,
    *,
    cfg_scale: float,
    null_label: int,
) -> tuple[Tensor, dict[str, float]]:
    """The DMD direction at generator samples x (detached): (x̂0_fake - x̂0_real) / mean|x - x̂0_real|.

    Re-noise x to τ with noise eps (x̃ = (1-τ) x + τ eps), x̂0 of the real score with CFG `cfg_scale`
    (SnapGen++ supp. H: cfg 4 on Qwen-Image), of the fake score without CFG (DMD2: fake cfg 1).
    """
    x = x.detach()
    x_tau = interpolate(x, eps, tau)
    x0_real = x0_from_v(x_tau, tau, guided_velocity(real, x_tau, tau, y, cfg_scale, null_label))
    x0_fake = x0_from_v(x_tau, tau, fake(x_tau, tau, y))
    dims = tuple(range(1, x.dim()))
    # DMD2 compute_distribution_matching_loss: normaliser mean|p_real| per sample
    weight = (x - x0_real).abs().mean(dim=dims, keepdim=True).clamp_min(1e-8)  # assumption: floor vs /0
    grad = (x0_fake - x0_real) / weight
    return torch.nan_to_num(grad), {"dmd_weight": float(weight.mean())}


def dmd_loss(x: Tensor, grad: Tensor) -> Tensor:
    """0.5·MSE(x, sg(x - grad)): d loss / dx = grad / x.numel() (DMD2 code)."""
    return 0.5 * (x - (x - grad).detach()).pow(2).mean()


def critic_loss(critic: nn.Module, x0: Tensor, y: Tensor, generator: torch.Generator, shift: float) -> Tensor:
    """Flow matching of the fake score on detached generator samples (SnapGen++: Eq. 4 on the student's x̂0)."""
    x0 = x0.detach()
    n = x0.shape[0]
    # assumption: the critic sees the same shifted τ law as the DMD term (where it is queried)
    t = sample_tau(n, generator, shift, x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    x_t = interpolate(x0, eps, t)
    return (critic(x_t, t, y) - (eps - x0)).pow(2).mean()


@dataclass(frozen=True)
class TTUR:
    """Two-time-scale update rule. `ratio` = critic updates per generator update (DMD2: 5).

    "dmd2": generator when i % ratio == 0, critic on every iteration (DMD2 train_sd.py);
    "exclusive": critic only on the iterations without a generator step.
    """

    ratio: int
    mode: str = "dmd2"

    def generator_step(self, i: int) -> bool:
        return i % self.ratio == 0

    def critic_step(self, i: int) -> bool:
        return self.mode == "dmd2" or not self.generator_step(i) or self.ratio == 1

    def iterations(self, generator_updates: int) -> int:
        return generator_updates * self.ratio

    def counts(self, iterations: int) -> dict[str, int]:
        return {"generator_updates": sum(self.generator_step(i) for i in range(iterations)),
                "critic_updates": sum(self.critic_step(i) for i in range(iterations))}


class FewStepGenerator:
    """The student as a K-step Euler sampler on `time_grid(K, shift)` (t_0 = 1 noise, t_K = 0)."""

    def __init__(self, net: nn.Module, steps: int, shift: float):
        self.net, self.steps, self.shift = net, steps, shift
        self.times = time_grid(steps, shift)

    @torch.no_grad()
    def sample(self, noise: Tensor, y: Tensor) -> Tensor:
        """x after all K steps; equals flow.euler_sample(net, ..., steps=K, shift=shift, cfg_scale=1)."""
        x = noise
        for k in range(self.steps):
            x = self._step(x, k, y)
        return x

    def _step(self, x: Tensor, k: int, y: Tensor) -> Tensor:
        t, t_next = float(self.times[k]), float(self.times[k + 1])
        v = self.net(x, torch.full((x.shape[0],), t, device=x.device), y)
        return x + (t_next - t) * v

    @torch.no_grad()
    def simulate(self, noise: Tensor, y: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(x_tk, t_k): the student's own input at step k (DMD2 backward simulation, no grad)."""
        x = noise
        for j in range(k):
            x = self._step(x, j, y)
        return x, torch.full((x.shape[0],), float(self.times[k]), device=x.device)

    def train_step(self, noise: Tensor, y: Tensor, k: int, *, grad: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """(x_tk, t_k, x̂0): the input at step k and the student's denoised output there, with grad through
        one student forward when `grad`."""
        x, t = self.simulate(noise, y, k)
        with torch.set_grad_enabled(grad):
            x0 = x0_from_v(x, t, self.net(x, t, y))
        return x, t, x0


# ----------------------------------------------------------------------------------------------
# knowledge terms (compress/kd.py) — the few-step-teacher part of Eq. 10
# ----------------------------------------------------------------------------------------------
def make_projector(student: nn.Module, teacher: nn.Module) -> nn.Module | None:
    """ϕ of SnapGen++ Eq. 7 (compress/kd.py's identity-initialised Projector); None for nets without a stream."""
    if not hasattr(student, "forward_with_features") or not hasattr(teacher, "forward_with_features"):
        return None
    from ditnas.compress.kd import projector_for

    return projector_for(student, teacher)


def knowledge_terms(student: nn.Module, teacher: nn.Module, projector: nn.Module | None,
                    x_t: Tensor, t: Tensor, y: Tensor) -> dict[str, Tensor]:
    """{"out": ‖v_T - v_S‖², "feat": ‖f_T - ϕ(f_S)‖²} on the same x_t (SnapGen++ Eqs. 6-7, compress/kd.py);
    a net without features (the toys) gets the output term only."""
    if projector is not None:
        from ditnas.compress.kd import kd_terms

        return kd_terms(student, teacher, projector, x_t, t, y)
    v_s = student(x_t, t, y)
    with torch.no_grad():
        v_t = teacher(x_t, t, y)
    return {"out": (v_t - v_s).pow(2).mean(), "feat": v_s.new_zeros(()), "v": v_s}


# ----------------------------------------------------------------------------------------------
# the few-step teacher ξ' (trajectory KD of the teacher onto its own ODE solutions)
# ----------------------------------------------------------------------------------------------
def refined_grid(times: Tensor, substeps: int) -> tuple[Tensor, list[int]]:
    """Split each interval of a decreasing grid into `substeps` equal Euler steps; returns the fine grid and
    the index of every coarse time inside it (so ODE states are read exactly at the student's times)."""
    parts, marks = [times[:1]], [0]
    for a, b in zip(times[:-1], times[1:]):
        parts.append(torch.linspace(float(a), float(b), substeps + 1)[1:])
        marks.append(marks[-1] + substeps)
    return torch.cat(parts), marks


@torch.no_grad()
def ode_trajectory(teacher: nn.Module, noise: Tensor, y: Tensor, times: Tensor, *, substeps: int, cfg_scale: float,
                   null_label: int) -> tuple[Tensor, Tensor]:
    """The teacher's Euler ODE solution from `noise` (with CFG), `substeps` steps per interval of `times`.

    Returns (states (K, B, ...) at times[0..K-1], x0* the end point)."""
    fine, marks = refined_grid(times, substeps)
    x, states = noise, []
    for j in range(len(fine) - 1):
        if j in marks:
            states.append(x)
        t = torch.full((x.shape[0],), float(fine[j]), device=x.device)
        x = x + (float(fine[j + 1]) - float(fine[j])) * guided_velocity(teacher, x, t, y, cfg_scale, null_label)
    return torch.stack(states), x


@dataclass(frozen=True)
class TrajectorySettings:
    steps: int = 200  # assumption: regression steps of ξ'
    pairs: int = 512  # assumption: (noise, ODE solution) pairs, generated once (DMD's regression set idea)
    substeps: int = 7  # assumption: 7 Euler steps per student interval = 28 for a 4-step student (the teacher's 28)
    batch_size: int = 64
    lr: float = 1e-4
    cfg_scale: float = 2.0
    null_label: int = 10


def trajectory_pairs(teacher: nn.Module, times: Tensor, s: TrajectorySettings, *, shape: tuple[int, ...], labels,
                     generator: torch.Generator, chunk: int = 128) -> dict[str, Tensor]:
    """`s.pairs` teacher ODE trajectories: labels y, states at the student's times, end points x0*."""
    device = next(teacher.parameters()).device
    y = labels(s.pairs, generator)
    noise = torch.randn((s.pairs, *shape), generator=generator)
    states, ends = [], []
    for i in range(0, s.pairs, chunk):
        st, x0 = ode_trajectory(teacher, noise[i:i + chunk].to(device), y[i:i + chunk].to(device), times,
                                substeps=s.substeps, cfg_scale=s.cfg_scale, null_label=s.null_label)
        states.append(st)
        ends.append(x0)
    return {"y": y.to(device), "states": torch.cat(states, dim=1), "x0": torch.cat(ends)}


def few_step_error(net: nn.Module, times: Tensor, pairs: dict[str, Tensor]) -> float:
    """MSE between `net`'s K-step Euler samples from the pairs' noise and the teacher's ODE end points."""
    gen = FewStepGenerator(net, len(times) - 1, 1.0)
    gen.times = times
    return float((gen.sample(pairs["states"][0], pairs["y"]) - pairs["x0"]).pow(2).mean())


def train_trajectory_teacher(teacher: nn.Module, times: Tensor, pairs: dict[str, Tensor], s: TrajectorySettings,
                             generator: torch.Generator) -> nn.Module:
    """ξ' = a copy of the teacher regressed so that, at every ODE state x_k of its own trajectory, its denoised
    estimate x_k - t_k·v lands on the ODE end point x0* (trajectory KD / "reflow" onto the student's grid).

    # assumption: our stand-in for SnapGen++'s few-step Lightning LoRA teacher (a full copy, not a LoRA)."""
    net = copy.deepcopy(teacher).requires_grad_(True).train()
    opt = torch.optim.Adam(net.parameters(), lr=s.lr)
    k_steps, n = pairs["states"].shape[0], pairs["x0"].shape[0]
    for _ in range(s.steps):
        idx = torch.randint(0, n, (min(s.batch_size, n),), generator=generator).to(pairs["x0"].device)
        k = torch.randint(0, k_steps, (idx.shape[0],), generator=generator).to(pairs["x0"].device)
        x_k = pairs["states"][k, idx]
        t = times.to(x_k.device)[k]
        loss = (x0_from_v(x_k, t, net(x_k, t, pairs["y"][idx])) - pairs["x0"][idx]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.requires_grad_(False).eval()


# ----------------------------------------------------------------------------------------------
# the K-DMD trainer
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KDMDSettings:
    student_steps: int = 4
    cfg_scale: float = 2.0
    lambda_out: float = 1.0
    lambda_feat: float = 1.0
    lr: float = 1e-4
    critic_lr: float = 2e-4
    critic_updates: int = 5
    ttur_mode: str = "dmd2"
    shift: float = 3.0
    critic_init: str = "student"
    batch_size: int = 64
    null_label: int = 10
    grad_clip: float = 10.0  # DMD2 SDXL: grad-norm clip 10


def _adam(params, lr: float) -> torch.optim.Optimizer:
    # SnapGen++ supp. H: Adam lr 1e-4, betas (0, 0.99) for K-DMD
    return torch.optim.Adam(params, lr=lr, betas=(0.0, 0.99))


class KDMD:
    """Student (generator), critic (fake score), projector and optimizers; one TTUR iteration at a time.

    `labels(n, generator)` draws conditioning labels; `shape` is one sample's shape. The teacher is frozen.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, settings: KDMDSettings, *, shape: tuple[int, ...],
                 labels, generator: torch.Generator, critic: nn.Module | None = None,
                 few_step_teacher: nn.Module | None = None):
        self.s = settings
        self.student, self.teacher = student, teacher
        self.teacher.requires_grad_(False).eval()
        # ξ' of Eq. 10 (the knowledge terms); None = the teacher itself
        self.kd_teacher = (teacher if few_step_teacher is None else few_step_teacher).requires_grad_(False).eval()
        if critic is None:
            # SnapGen++: critic initialised from the student; DMD2: from the teacher (config option)
            critic = copy.deepcopy(student if settings.critic_init == "student" else teacher)
        self.critic = critic.requires_grad_(True).train()
        self.student.requires_grad_(True).train()
        self.use_kd = use_kd = settings.lambda_out > 0 or settings.lambda_feat > 0
        self.projector = make_projector(student, self.kd_teacher) if use_kd else None
        if self.projector is not None:
            self.projector.to(next(student.parameters()).device)
        gen_params = list(student.parameters()) + (list(self.projector.parameters()) if self.projector is not None else [])
        self.opt_g = _adam(gen_params, settings.lr)
        self.opt_c = _adam(self.critic.parameters(), settings.critic_lr)
        self.ttur = TTUR(settings.critic_updates, settings.ttur_mode)
        self.gen = FewStepGenerator(student, settings.student_steps, settings.shift)
        self.shape, self.labels, self.rng = tuple(shape), labels, generator
        self.counts = {"generator_updates": 0, "critic_updates": 0}
        self.device = next(student.parameters()).device

    def _noise(self, n: int) -> Tensor:
        return torch.randn((n, *self.shape), generator=self.rng).to(self.device)

    def iteration(self, i: int) -> dict[str, Any]:
        s, n = self.s, self.s.batch_size
        y = self.labels(n, self.rng).to(self.device)
        noise = self._noise(n)
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
            tau = sample_tau(n, self.rng, s.shift, self.device)
            eps = self._noise(n)
            grad, info = dmd_grad(x0, tau, eps, y, self.teacher, self.critic, cfg_scale=s.cfg_scale,
                                  null_label=s.null_label)
            loss_dmd = dmd_loss(x0, grad)
            loss = loss_dmd
            record.update(loss_dmd=float(loss_dmd.detach()), dmd_grad_abs=float(grad.abs().mean()), **info)
            if terms is not None:
                loss = loss + s.lambda_out * terms["out"] + s.lambda_feat * terms["feat"]
                record.update(loss_out=float(terms["out"].detach()), loss_feat=float(terms["feat"].detach()))
            self.opt_g.zero_grad(set_to_none=True)
            loss.backward()
            params = [p for g in self.opt_g.param_groups for p in g["params"]]
            norm = torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
            self.opt_g.step()
            self.opt_g.zero_grad(set_to_none=True)
            self.critic.zero_grad(set_to_none=True)  # DMD2: no cross-contamination between the two updates
            self.counts["generator_updates"] += 1
            record.update(loss_generator=float(loss.detach()), grad_norm=float(norm))
        if self.ttur.critic_step(i):
            loss_c = critic_loss(self.critic, x0.detach(), y, self.rng, s.shift)
            self.opt_c.zero_grad(set_to_none=True)
            loss_c.backward()
            norm_c = torch.nn.utils.clip_grad_norm_(self.critic.parameters(), s.grad_clip)
            self.opt_c.step()
            self.opt_c.zero_grad(set_to_none=True)
            self.student.zero_grad(set_to_none=True)
            self.counts["critic_updates"] += 1
            record.update(loss_critic=float(loss_c.detach()), critic_grad_norm=float(norm_c))
        return record

    # ----- resumable state ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "student": self.student.state_dict(),
            "critic": self.critic.state_dict(),
            "projector": self.projector.state_dict() if self.projector is not None else {},
            "opt_g": self.opt_g.state_dict(),
            "opt_c": self.opt_c.state_dict(),
            "counts": dict(self.counts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.critic.load_state_dict(state["critic"])
        if self.projector is not None:
            self.projector.load_state_dict(state["projector"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_c.load_state_dict(state["opt_c"])
        self.counts = {k: int(v) for k, v in state["counts"].items()}
