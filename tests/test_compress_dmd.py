"""K-DMD (compress/dmd.py) and the step-distillation stage (compress/distill.py).

Core tests run on 2-D toys: small MLP velocity nets trained by flow matching here; the stage tests run on
sub-DiTs extracted from a tiny supernet trained for a few steps."""

import copy
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from ditnas.compress.distill import STATE_NAME, TEACHER_NAME, distill_steps, read_metrics
from ditnas.compress.dmd import (
    KDMD,
    TTUR,
    FewStepGenerator,
    KDMDSettings,
    TrajectorySettings,
    dmd_grad,
    dmd_loss,
    few_step_error,
    ode_trajectory,
    refined_grid,
    train_trajectory_teacher,
    trajectory_pairs,
    x0_from_v,
)
from ditnas.manifest import check_files, read_manifest
from ditnas.config import DistillConfig, load_config
from ditnas.data import load_dataset
from ditnas.errors import DitnasError
from ditnas.io import atomic_torch_save, torch_load
from ditnas.search.threads import torch_threads
from ditnas.supernet.extract import extract_subnet, load_subnet
from ditnas.supernet.flow import euler_sample, interpolate, time_grid
from ditnas.supernet.train import CHECKPOINT_NAME, train_supernet


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


# ----------------------------------------------------------------------------------------------
# 2-D toys
# ----------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """v(x, t): 2 -> 64 -> 64 -> 2 with a Fourier embedding of t; y is ignored (unconditional)."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 + 16, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2))

    @staticmethod
    def embed(t):
        e = t.reshape(-1, 1) * (2 ** torch.arange(8, dtype=torch.float32)) * math.pi
        return torch.cat([torch.sin(e), torch.cos(e)], -1)

    def forward(self, x, t, y):
        return self.net(torch.cat([x, self.embed(t)], -1))


MODES = torch.tensor([[2.0, 2.0], [-2.0, 2.0]])


def target(n, g):
    """The mixture the teacher learns: two modes, std 0.15."""
    return MODES[torch.randint(0, 2, (n,), generator=g)] + 0.15 * torch.randn(n, 2, generator=g)


def wrong(n, g):
    """The student starts as a flow model of one wrong mode at (0, -2)."""
    return torch.tensor([0.0, -2.0]) + 0.15 * torch.randn(n, 2, generator=g)


def flow_match(sampler, steps, seed):
    torch.manual_seed(seed)
    net, g = MLP(), torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(steps):
        x0, eps, t = sampler(256, g), torch.randn(256, 2, generator=g), torch.rand(256, generator=g)
        loss = (net(interpolate(x0, eps, t), t, None) - (eps - x0)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def mixture_distance(x):
    """Mean distance of samples to the nearest mixture mode."""
    return torch.cdist(x, MODES).min(1).values.mean().item()


@pytest.fixture(scope="module")
def toys():
    return {"teacher": flow_match(target, 800, 0), "student": flow_match(wrong, 800, 1)}


def zeros(n, g):
    return torch.zeros(n, dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# the DMD gradient
# ----------------------------------------------------------------------------------------------
def test_identical_fake_and_real_give_zero_gradient_and_constant_loss(toys):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g)
    tau, eps = torch.rand(64, generator=g) * 0.9 + 0.05, torch.randn(64, 2, generator=g)
    net = toys["teacher"]
    grad, _ = dmd_grad(x, tau, eps, torch.zeros(64, dtype=torch.long), net, copy.deepcopy(net), cfg_scale=1.0,
                       null_label=1)
    assert grad.abs().max().item() == 0.0
    xx = x.clone().requires_grad_(True)
    loss = dmd_loss(xx, grad)
    loss.backward()
    assert loss.item() == 0.0 and xx.grad.abs().max().item() == 0.0
    # a different fake score gives a non-zero direction (the test above can fail)
    other, _ = dmd_grad(x, tau, eps, torch.zeros(64, dtype=torch.long), net, toys["student"], cfg_scale=1.0, null_label=1)
    assert other.abs().mean().item() > 0.1


def test_dmd_grad_equals_the_formula_with_cfg_and_dloss_dx_is_grad_over_numel(toys):
    g = torch.Generator().manual_seed(1)
    real, fake = toys["teacher"], toys["student"]
    x = torch.randn(32, 2, generator=g)
    tau, eps = torch.rand(32, generator=g), torch.randn(32, 2, generator=g)
    y = torch.zeros(32, dtype=torch.long)

    class Cond(nn.Module):  # a conditional real net: label 0 -> teacher, null label 1 -> student
        def forward(self, x, t, y):
            return torch.where((y == 0).reshape(-1, 1), real(x, t, y), fake(x, t, y))

    scale = 3.0
    grad, _ = dmd_grad(x, tau, eps, y, Cond(), fake, cfg_scale=scale, null_label=1)
    with torch.no_grad():
        xt = (1 - tau[:, None]) * x + tau[:, None] * eps
        v_real = fake(xt, tau, y) + scale * (real(xt, tau, y) - fake(xt, tau, y))
        x0_real = xt - tau[:, None] * v_real
        x0_fake = xt - tau[:, None] * fake(xt, tau, y)
        expected = (x0_fake - x0_real) / (x - x0_real).abs().mean(1, keepdim=True)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)
    xx = x.clone().requires_grad_(True)
    dmd_loss(xx, grad).backward()
    torch.testing.assert_close(xx.grad, grad / x.numel(), rtol=1e-6, atol=1e-9)


def test_x0_from_v_inverts_the_interpolation():
    g = torch.Generator().manual_seed(2)
    x0, eps, t = torch.randn(8, 1, 1, 4, 4, generator=g), torch.randn(8, 1, 1, 4, 4, generator=g), torch.rand(8, generator=g)
    torch.testing.assert_close(x0_from_v(interpolate(x0, eps, t), t, eps - x0), x0)


# ----------------------------------------------------------------------------------------------
# TTUR and the generator
# ----------------------------------------------------------------------------------------------
def test_ttur_counts_follow_the_ratio():
    assert TTUR(5, "dmd2").counts(10) == {"generator_updates": 2, "critic_updates": 10}
    assert TTUR(5, "exclusive").counts(10) == {"generator_updates": 2, "critic_updates": 8}
    assert TTUR(1, "exclusive").counts(7) == {"generator_updates": 7, "critic_updates": 7}
    assert TTUR(3).iterations(4) == 12


@pytest.mark.parametrize("mode,counts", [("dmd2", (2, 10)), ("exclusive", (2, 8))])
def test_kdmd_updates_whom_the_schedule_says(toys, mode, counts):
    student, teacher = copy.deepcopy(toys["student"]), toys["teacher"]
    s = KDMDSettings(student_steps=2, cfg_scale=1.0, lambda_out=0, lambda_feat=0, critic_updates=5, ttur_mode=mode,
                     shift=1.0, batch_size=16, lr=1e-3, critic_lr=1e-3)
    tr = KDMD(student, teacher, s, shape=(2,), labels=zeros, generator=torch.Generator().manual_seed(0))
    teacher_before = copy.deepcopy(teacher.state_dict())
    for i in range(10):
        sb, cb = copy.deepcopy(student.state_dict()), copy.deepcopy(tr.critic.state_dict())
        tr.iteration(i)
        s_changed = any(not torch.equal(sb[k], v) for k, v in student.state_dict().items())
        c_changed = any(not torch.equal(cb[k], v) for k, v in tr.critic.state_dict().items())
        assert s_changed == tr.ttur.generator_step(i)
        assert c_changed == tr.ttur.critic_step(i)
    assert (tr.counts["generator_updates"], tr.counts["critic_updates"]) == counts
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())


def test_few_step_sampler_is_euler_sample_on_the_training_grid(toys):
    net = toys["teacher"]
    g = torch.Generator().manual_seed(3)
    z = torch.randn(16, 2, generator=g)
    gen = FewStepGenerator(net, 4, 3.0)
    ref = euler_sample(net, torch.zeros(16, dtype=torch.long), (2,), steps=4, null_label=1, generator=g, shift=3.0, noise=z)
    torch.testing.assert_close(gen.sample(z, None), ref, rtol=0, atol=0)
    # the generator's training input at step k is the sampler's own state after k steps (backward simulation)
    x = z
    for k in range(4):
        x_k, t_k, x0 = gen.train_step(z, None, k, grad=False)
        torch.testing.assert_close(x_k, x, rtol=0, atol=0)
        assert float(t_k[0]) == pytest.approx(float(gen.times[k]))
        x = x + (gen.times[k + 1] - gen.times[k]) * net(x, t_k, None)
    torch.testing.assert_close(x0, ref, rtol=0, atol=1e-6)  # the last step's x̂0 is the sample


def test_one_step_dmd_moves_the_generator_onto_the_mixture(toys):
    student, teacher = copy.deepcopy(toys["student"]), toys["teacher"]
    z = torch.randn(512, 2, generator=torch.Generator().manual_seed(5))
    gen = FewStepGenerator(student, 1, 1.0)
    before = mixture_distance(gen.sample(z, None))
    s = KDMDSettings(student_steps=1, cfg_scale=1.0, lambda_out=0, lambda_feat=0, lr=1e-3, critic_lr=1e-3,
                     critic_updates=5, shift=1.0, batch_size=256)
    tr = KDMD(student, teacher, s, shape=(2,), labels=zeros, generator=torch.Generator().manual_seed(0))
    for i in range(5 * 300):
        tr.iteration(i)
    x = gen.sample(z, None)
    after = mixture_distance(x)
    # measured (800-step toys): 4.46 -> 0.77 (5.8x); both modes reached (50% of samples at x > 0)
    assert before > 4.0 and after < before / 4
    assert 0.2 < (x[:, 0] > 0).float().mean().item() < 0.8


# ----------------------------------------------------------------------------------------------
# the few-step teacher ξ'
# ----------------------------------------------------------------------------------------------
def test_ode_trajectory_is_the_fine_euler_sampler_read_at_the_student_times(toys):
    net, times = toys["teacher"], time_grid(2, 3.0)
    fine, marks = refined_grid(times, 5)
    assert len(fine) == 11 and marks == [0, 5, 10]
    torch.testing.assert_close(fine[marks], times)
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    states, x0 = ode_trajectory(net, z, torch.zeros(8, dtype=torch.long), times, substeps=5, cfg_scale=1.0, null_label=1)
    assert states.shape == (2, 8, 2)
    torch.testing.assert_close(states[0], z, rtol=0, atol=0)
    # the end point equals euler_sample on the same 10-step grid (uniform split of a shifted grid)
    x = z
    for a, b in zip(fine[:-1], fine[1:]):
        x = x + (b - a) * net(x, torch.full((8,), float(a)), None)
    torch.testing.assert_close(x0, x, rtol=0, atol=1e-6)


def test_trajectory_teacher_lands_on_the_ode_solution_in_few_steps(toys):
    teacher, times = toys["teacher"], time_grid(2, 1.0)
    s = TrajectorySettings(steps=400, pairs=512, substeps=14, batch_size=128, lr=1e-3, cfg_scale=1.0, null_label=1)
    labels = lambda n, g: torch.zeros(n, dtype=torch.long)  # noqa: E731
    train = trajectory_pairs(teacher, times, s, shape=(2,), labels=labels, generator=torch.Generator().manual_seed(0))
    held = trajectory_pairs(teacher, times, s, shape=(2,), labels=labels, generator=torch.Generator().manual_seed(1))
    before = few_step_error(teacher, times, held)
    frozen = copy.deepcopy(teacher.state_dict())
    xi = train_trajectory_teacher(teacher, times, train, s, torch.Generator().manual_seed(2))
    after = few_step_error(xi, times, held)
    # measured (800-step toy): 2-step MSE to the 28-step ODE end point 0.252 (teacher) -> 0.011 (ξ'), held-out noise
    assert after < before / 5
    assert all(torch.equal(frozen[k], v) for k, v in teacher.state_dict().items())
    assert all(not p.requires_grad for p in xi.parameters())


# ----------------------------------------------------------------------------------------------
# the stage on real sub-DiTs
# ----------------------------------------------------------------------------------------------
TINY = [
    "model.max_heads=2", "model.head_dim=8", "model.cond_dim=16", "model.cond_tokens=1",
    "space.depth=3", "space.stage_pattern=[0,1,0]", "space.skippable=[1]", "space.widths=[0.5,1.0]",
    "space.mlp_ratios=[2,4]", "space.ops=[sa,lcha,ssa]",
    "train.batch_size=8", "train.steps=6", "train.checkpoint_every=0", "train.warmup_steps=2",
]


def build_pair(root: Path) -> dict:
    """A supernet trained 6 steps; teacher = its max subnet, student = its min subnet (both extracted)."""
    cfg = load_config(None, TINY)
    train_supernet(cfg, root / "run", split=load_dataset("digits"))
    ckpt = root / "run" / CHECKPOINT_NAME
    extract_subnet(ckpt, "max", root / "teacher")
    extract_subnet(ckpt, "min", root / "student")
    return {"teacher": root / "teacher", "student": root / "student", "root": root}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_pair(tmp_path_factory.mktemp("distill"))


def small(**kw) -> DistillConfig:
    base = dict(method="kdmd", steps=3, batch_size=4, critic_updates=2, checkpoint_every=1, eval_samples=0, lr=1e-3,
                critic_lr=1e-3, few_step_teacher="trajectory", teacher_pairs=16, teacher_kd_steps=3, teacher_substeps=2)
    return DistillConfig(**{**base, **kw})


def test_distill_writes_a_loadable_student_and_a_manifest(pair, tmp_path):
    out = tmp_path / "out"
    manifest = distill_steps(small(), pair["teacher"], pair["student"], out)
    student = load_subnet(out)
    original = load_subnet(pair["student"])
    assert str(student.arch) == str(original.arch)
    assert any(not torch.equal(a, b) for a, b in zip(student.state_dict().values(), original.state_dict().values()))
    assert manifest["kind"] == "ditnas.distill" and read_manifest(out, "ditnas.distill")["arch"] == str(original.arch)
    m = manifest["metrics"]
    assert (m["generator_updates"], m["critic_updates"], m["iterations"]) == (3, 6, 6)
    assert m["critic_updates_per_generator_update"] == 2 and m["ttur_mode"] == "dmd2"
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(6))
    assert all("loss_critic" in r for r in rows) and sum("loss_generator" in r for r in rows) == 3
    assert all(math.isfinite(r["grad_norm"]) for r in rows if "grad_norm" in r)
    assert (out / "losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert manifest["sampler"]["steps"] == 4 and manifest["sampler"]["times"][0] == 1.0
    xi = m["few_step_teacher"]
    assert xi["kind"] == "trajectory" and (out / TEACHER_NAME).exists() and TEACHER_NAME in manifest["files"]
    assert xi["teacher_k_step_mse"] > 0 and xi["few_step_teacher_k_step_mse"] > 0
    check_files(out)


def test_resume_equals_uninterrupted(pair, tmp_path):
    cfg = small(steps=4)
    full = tmp_path / "full"
    distill_steps(cfg, pair["teacher"], pair["student"], full)

    class Stop(Exception):
        pass

    def kill_at(done, total, record):
        if done == 5:  # one iteration after the checkpoint at 4 (every 1 generator update = 2 iterations)
            raise Stop

    part = tmp_path / "part"
    with pytest.raises(Stop):
        distill_steps(cfg, pair["teacher"], pair["student"], part, progress=kill_at)
    assert torch_load(part / STATE_NAME)["iteration"] == 4
    distill_steps(cfg, pair["teacher"], pair["student"], part)
    a, b = torch_load(full / "subnet.pt")["weights"], torch_load(part / "subnet.pt")["weights"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = torch_load(full / STATE_NAME)["trainer"], torch_load(part / STATE_NAME)["trainer"]
    assert all(torch.equal(sa["critic"][k], sb["critic"][k]) for k in sa["critic"])
    assert read_metrics(full / "metrics.jsonl") == read_metrics(part / "metrics.jsonl")
    # a longer run continues from the finished one
    more = distill_steps(small(steps=5), pair["teacher"], pair["student"], part)
    assert more["metrics"]["generator_updates"] == 5 and len(read_metrics(part / "metrics.jsonl")) == 10


def test_corrupt_state_is_refused_and_nothing_is_overwritten(pair, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / STATE_NAME).write_bytes(b"not a checkpoint")
    (out / "metrics.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(DitnasError, match=str(out / STATE_NAME)):
        distill_steps(small(), pair["teacher"], pair["student"], out)
    assert (out / STATE_NAME).read_bytes() == b"not a checkpoint"
    assert (out / "metrics.jsonl").read_text() == '{"step": 0}\n' and not (out / "subnet.pt").exists()
    # a state written for another config is refused the same way
    good = tmp_path / "good"
    distill_steps(small(steps=1), pair["teacher"], pair["student"], good)
    before = (good / STATE_NAME).read_bytes()
    with pytest.raises(DitnasError, match="different config"):
        distill_steps(small(steps=1, cfg_scale=4.0), pair["teacher"], pair["student"], good)
    assert (good / STATE_NAME).read_bytes() == before
    # ... and so is a student file that changed since (same arch, other weights)
    changed = tmp_path / "changed"
    changed.mkdir()
    state = torch_load(pair["student"] / "subnet.pt")
    state["weights"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["weights"].items()}
    atomic_torch_save(changed / "subnet.pt", state)
    with pytest.raises(DitnasError, match="different student sha256"):
        distill_steps(small(steps=1), pair["teacher"], changed, good)
    assert (good / STATE_NAME).read_bytes() == before


def test_corrupt_student_is_refused_by_name(pair, tmp_path):
    bad = tmp_path / "bad_student"
    bad.mkdir()
    (bad / "subnet.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(DitnasError, match=str(bad / "subnet.pt")):
        distill_steps(small(), pair["teacher"], bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_teacher_student_mismatch_names_both(pair, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    state = torch_load(pair["student"] / "subnet.pt")
    state["space"] = {**state["space"], "latent": [1, 1, 8, 8]}  # same weights, other latent size
    assert "latent=1x1x16x16" in state["arch"]
    state["arch"] = state["arch"].replace("latent=1x1x16x16", "latent=1x1x8x8")
    atomic_torch_save(other / "subnet.pt", state)
    with pytest.raises(DitnasError, match="latent shape") as err:
        distill_steps(small(), pair["teacher"], other, tmp_path / "out")
    assert str(pair["teacher"]) in str(err.value) and str(other) in str(err.value)
    assert "arch" in str(err.value) and not (tmp_path / "out").exists()


def test_output_folder_may_not_be_an_input(pair, tmp_path):
    student = tmp_path / "student"
    shutil.copytree(pair["student"], student)
    with pytest.raises(DitnasError, match="student's folder"):
        distill_steps(small(), pair["teacher"], student, student)


@pytest.mark.slow
def test_manifest_scores_the_student_with_the_judge(pair, tmp_path):
    """eval_samples > 0: FD / label accuracy of the student's 4-step samples (trains the digits judge: slow)."""
    manifest = distill_steps(small(steps=1, eval_samples=40), pair["teacher"], pair["student"], tmp_path / "out",
                             judge_cache=tmp_path / "judge")
    ev = manifest["metrics"]["eval"]
    assert ev["n"] == 40 and ev["steps"] == 4 and ev["fd"] > 0 and 0.0 <= ev["label_accuracy"] <= 1.0


def test_knowledge_terms_add_to_dmd_and_switch_off_to_plain_dmd(pair):
    """λ_out = λ_feat = 0 is plain DMD (no projector, generator loss = DMD loss); otherwise the generator loss is
    DMD + λ_out L_out + λ_feat L_feat on the student's own x_t."""
    teacher = load_subnet(pair["teacher"])
    for lam in (0.0, 0.5):
        student = load_subnet(pair["student"])
        s = KDMDSettings(student_steps=2, critic_updates=1, batch_size=4, lambda_out=lam, lambda_feat=2 * lam)
        tr = KDMD(student, teacher, s, shape=(1, 1, 16, 16), labels=lambda n, g: torch.randint(0, 10, (n,), generator=g),
                  generator=torch.Generator().manual_seed(0), few_step_teacher=copy.deepcopy(teacher))
        r = tr.iteration(0)
        if lam == 0:
            assert tr.projector is None and "loss_out" not in r and r["loss_generator"] == r["loss_dmd"]
        else:
            assert tr.projector is not None and r["loss_out"] > 0 and r["loss_feat"] > 0
            assert r["loss_generator"] == pytest.approx(r["loss_dmd"] + lam * r["loss_out"] + 2 * lam * r["loss_feat"],
                                                        rel=1e-5)
            assert all(p.grad is None for p in tr.kd_teacher.parameters())  # ξ' frozen
            assert all(not p.requires_grad for p in tr.kd_teacher.parameters())


def test_corrupt_few_step_teacher_is_refused_by_name(pair, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / TEACHER_NAME).write_bytes(b"garbage")
    with pytest.raises(DitnasError, match=str(out / TEACHER_NAME)):
        distill_steps(small(), pair["teacher"], pair["student"], out)
    assert (out / TEACHER_NAME).read_bytes() == b"garbage" and not (out / STATE_NAME).exists()
