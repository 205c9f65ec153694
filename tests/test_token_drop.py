"""Token-dropped training (SPRINT structured drop, TREAD-style reinsertion), path drop and Path-Drop Guidance."""

import copy

import pytest
import torch
from torch import nn

from ditnas.arch import SearchSpace
from ditnas.config import ModelConfig, load_config
from ditnas.data import load_dataset
from ditnas.errors import ConfigFieldError, DitnasError
from ditnas.supernet.flow import euler_sample
from ditnas.supernet.model import Block, ElasticDiT, merge_2x2, patchify, split_2x2, unpatchify
from ditnas.supernet.ops import layer_norm
from ditnas.supernet.token_drop import dense_only_fn, draw_keep
from ditnas.supernet.train import CHECKPOINT_NAME, StandaloneTrainer, Trainer, build_space, train_supernet

TINY = [
    "model.max_heads=2", "model.head_dim=8", "model.cond_dim=16", "model.cond_tokens=1",
    "space.depth=3", "space.stage_pattern=[0,1,0]", "space.skippable=[1]", "space.widths=[0.5,1.0]",
    "space.mlp_ratios=[2,4]", "space.ops=[sa,lcha,ssa]",
    "train.batch_size=8", "train.steps=6", "train.checkpoint_every=0", "train.warmup_steps=2",
]
DROP = ["train.token_drop=0.75"]
# a transition inside the middle: slots 1..4 are the middle; slot 2 merges 2x2 (saving a skip tensor), slot 4 splits
SPACE = SearchSpace(depth=6, ops=("sa", "lcha", "ssa", "assa"), stage_pattern=(0, 0, 1, 1, 0, 0), skippable=(1, 4),
                    widths=(0.5, 1.0), mlp_ratios=(2.0, 4.0))
CFG = ModelConfig(max_heads=2, head_dim=8, cond_dim=16, cond_tokens=1)


@pytest.fixture(scope="module")
def split():
    return load_dataset("digits")


def _perturb(model: nn.Module, seed: int = 7) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # off the adaLN-Zero init: otherwise every block is the identity
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _supernet(space: SearchSpace = SPACE, cfg: ModelConfig = CFG) -> ElasticDiT:
    torch.manual_seed(0)
    return _perturb(ElasticDiT(space, cfg)).eval()


def _inputs(n: int = 3, latent=(1, 1, 16, 16)):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, *latent, generator=g), torch.rand(n, generator=g), torch.randint(0, 11, (n,), generator=g)


def _tokens_seen(model, run, blocks) -> dict[int, int]:
    """Tokens each of model.blocks[i] (i in blocks) received in `run()`."""
    seen, hooks = {}, []
    for i in blocks:
        hooks.append(model.blocks[i].register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].shape[1])))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


# ----- a) the middle sees N/4 tokens, the dense ends N ------------------------------------------------------------
def test_middle_slots_see_a_quarter_of_the_tokens():
    model = _supernet()
    arch = SPACE.parse("sa:1:4 lcha:1:4 | ssa:1:4 assa:0.5:2 | lcha:1:2 sa:1:4")
    x, t, y = _inputs()
    keep = draw_keep(torch.Generator().manual_seed(0), 3, (1, 8, 8))
    dense = _tokens_seen(model, lambda: model.run(arch, x, t, y), range(6))
    sparse = _tokens_seen(model, lambda: model.run(arch, x, t, y, keep, dense=1), range(6))
    assert dense == {0: 64, 1: 64, 2: 16, 3: 16, 4: 64, 5: 64}
    assert sparse == {0: 64, 1: 16, 2: 4, 3: 4, 4: 16, 5: 64}
    # two dense slots per end: only slots 2, 3 are the middle (dropped before slot 2 merges)
    assert _tokens_seen(model, lambda: model.run(arch, x, t, y, draw_keep(torch.Generator(), 3, (1, 8, 8)), dense=2),
                        range(6)) == {0: 64, 1: 64, 2: 4, 3: 4, 4: 64, 5: 64}


# ----- b) brute force: gather, middle blocks called by hand, scatter back -------------------------------------------
def _reference(sub, x, t, y, offsets, dense: int = 1):
    """The token-dropped forward of an extracted SubDiT, written out by hand (loops over every 2x2 group)."""
    tokens, grid = patchify(x, sub.patch_size)
    h = sub.patch(tokens)
    c, ctx = sub._condition(t, y)
    depth = len(sub.blocks)

    def block(i, h, grid):
        b = sub.blocks[i]
        if not isinstance(b, Block):
            return h
        d = b.mod["own"].out_features // 6  # a narrower block updates the stream's leading features
        return torch.cat([b(h[..., :d], c, ctx, grid, sub.ops[i], None, None, "own"), h[..., d:]], dim=-1)

    for i in range(dense):
        h = block(i, h, grid)
    tt, gh, gw = grid
    positions = []  # per sample: the kept flat positions in sub-grid row-major order
    for b in range(h.shape[0]):
        row = []
        for f in range(tt):
            for i in range(gh // 2):
                for j in range(gw // 2):
                    o = int(offsets[b, f, i, j])
                    row.append(f * gh * gw + (2 * i + o // 2) * gw + (2 * j + o % 2))
        positions.append(row)
    sub_h = torch.stack([h[b, positions[b]] for b in range(h.shape[0])])
    sub_grid, stage, saved = (tt, gh // 2, gw // 2), sub.stages[dense - 1], []
    for i in range(dense, depth - dense + 1):  # the last dense slot's transition still runs on the sub-grid
        if sub.stages[i] != stage:
            if sub.stages[i] == 1:
                saved.append(sub_h)
                merged, sub_grid = merge_2x2(sub_h, sub_grid)
                sub_h = sub.down(merged)
            else:
                sub_h, sub_grid = split_2x2(sub.up(sub_h), sub_grid)
                sub_h = sub_h + saved.pop()
            stage = sub.stages[i]
        if i < depth - dense:
            sub_h = block(i, sub_h, sub_grid)
    out = h.clone()
    for b in range(h.shape[0]):
        out[b, positions[b]] = sub_h[b]
    h = out
    for i in range(depth - dense, depth):
        h = block(i, h, grid)
    m = sub.final_mod(nn.functional.silu(c)).reshape(c.shape[0], 1, -1)
    d = h.shape[-1]
    h = layer_norm(h) * (1 + m[..., d:]) + m[..., :d]
    return unpatchify(sub.final(h), grid, sub.patch_size, sub.channels)


def test_token_dropped_forward_equals_a_hand_written_reference():
    model = _supernet()
    x, t, y = _inputs()
    keep = draw_keep(torch.Generator().manual_seed(3), 3, (1, 8, 8))
    for layout in ("sa:1:4 lcha:1:4 | ssa:1:4 assa:0.5:2 | lcha:1:2 sa:1:4",
                   "sa:0.5:4 skip | lcha:0.5:4 sa:1:2 | skip ssa:1:4"):
        arch = SPACE.parse(layout)
        sub = model.extract(arch)
        want = _reference(sub, x, t, y, keep)
        got_sub, got_super = sub(x, t, y, keep), model.run(arch, x, t, y, keep)
        assert (got_sub - want).abs().max().item() <= 1e-5, layout
        assert (got_super - want).abs().max().item() <= 1e-5, layout
        # the drop changes the function (the test is not the trivial identity) ...
        assert (got_super - model.run(arch, x, t, y)).abs().max().item() > 1e-3
        # ... and so does another keep pattern
        other = draw_keep(torch.Generator().manual_seed(4), 3, (1, 8, 8))
        assert (model.run(arch, x, t, y, other) - got_super).abs().max().item() > 1e-4


def test_a_sub_grid_that_cannot_run_falls_back_to_dense():
    # latent 12x12 -> a 6x6 token grid: its 3x3 sub-grid cannot merge 2x2 inside the middle
    space = SearchSpace(depth=4, ops=("sa", "lcha"), stage_pattern=(0, 1, 1, 0), widths=(1.0,), mlp_ratios=(2.0,),
                        latent=(1, 1, 12, 12))
    model = _supernet(space)
    x, t, y = _inputs(latent=(1, 1, 12, 12))
    arch = space.max_arch()
    keep = draw_keep(torch.Generator().manual_seed(0), 3, (1, 6, 6))
    assert torch.equal(model.run(arch, x, t, y, keep), model.run(arch, x, t, y))
    # no merge, but ASSA's 2x2 KV compression / SSA's stride 2 cannot run on a 3x3 sub-grid: dense too
    space = SearchSpace(depth=3, ops=("sa", "assa", "ssa"), widths=(1.0,), mlp_ratios=(2.0,), latent=(1, 1, 12, 12))
    model = _supernet(space)
    for layout in ("sa:1:2 assa:1:2 sa:1:2", "sa:1:2 ssa:1:2 sa:1:2"):
        arch = space.parse(layout)
        assert torch.equal(model.run(arch, x, t, y, keep), model.run(arch, x, t, y)), layout
    arch = space.parse("sa:1:2*3")  # the control: plain attention does drop on the 3x3 sub-grid
    assert not torch.equal(model.run(arch, x, t, y, keep), model.run(arch, x, t, y))


def test_frame_causal_clips_stay_causal_under_token_dropping():
    space = SearchSpace(depth=4, ops=("sa", "lcha", "ssa", "assa"), stage_pattern=(0, 0, 0, 0), widths=(1.0,),
                        mlp_ratios=(2.0,), latent=(1, 3, 16, 16))
    model = _supernet(space, ModelConfig(max_heads=2, head_dim=8, cond_dim=16, cond_tokens=1, causal=True))
    arch = space.parse("sa:1:2 lcha:1:2 ssa:1:2 assa:1:2")
    x, t, y = _inputs(2, latent=(1, 3, 16, 16))
    keep = draw_keep(torch.Generator().manual_seed(0), 2, (3, 8, 8))
    later = x.clone()
    later[:, :, 2] += 1.0  # change the last frame only
    a, b = model.run(arch, x, t, y, keep), model.run(arch, later, t, y, keep)
    assert torch.equal(a[:, :, :2], b[:, :, :2])  # earlier frames do not see it
    assert (a[:, :, 2] - b[:, :, 2]).abs().max() > 1e-3


# ----- c) off = the current code ------------------------------------------------------------------------------------
def test_token_drop_off_calls_the_model_exactly_as_before(tmp_path, split):
    """With token_drop=0 and path_drop=0 the trainer calls run(arch, x, t, y) with no drop arguments and never
    draws from the drop RNG, whatever the other drop fields say; its losses do not depend on them."""
    histories = []
    for extra in ([], ["train.token_drop=0.0", "train.token_drop_dense=1", "train.token_drop_finetune=0.5"]):
        trainer = Trainer(load_config(None, TINY + extra), tmp_path / str(len(histories)), split)
        calls, original = [], trainer.model.run
        trainer.model.run = lambda *a, **k: (calls.append(k), original(*a, **k))[1]
        rng_before = trainer.drop_rng.get_state().clone()
        for _ in range(3):
            trainer.train_step()
        assert calls and all(k == {} for k in calls)
        assert torch.equal(trainer.drop_rng.get_state(), rng_before)
        histories.append(trainer.history)
    assert histories[0] == histories[1]


# ----- d) resume -----------------------------------------------------------------------------------------------------
def test_resumed_run_equals_uninterrupted_with_token_drop(tmp_path, split):
    cfg = load_config(None, TINY + DROP + ["train.path_drop=0.3", "train.token_drop_finetune=0.34"])
    straight = train_supernet(cfg, tmp_path / "a", split=split)
    train_supernet(cfg, tmp_path / "b", stop_after=3, split=split)
    assert (tmp_path / "b" / CHECKPOINT_NAME).exists()
    resumed = train_supernet(cfg, tmp_path / "b", split=split)
    for got, want in ((resumed.model.state_dict(), straight.model.state_dict()),
                      (resumed.ema.state_dict(), straight.ema.state_dict())):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert [h["loss_max"] for h in straight.history] == [h["loss_max"] for h in resumed.history]
    assert torch.equal(straight.drop_rng.get_state(), resumed.drop_rng.get_state())


# ----- e) the fine-tune share runs dense ------------------------------------------------------------------------------
def test_last_finetune_share_of_steps_runs_every_token(tmp_path, split):
    cfg = load_config(None, TINY + DROP + ["train.token_drop_finetune=0.5"])  # 6 steps: 1-3 dropped, 4-6 dense
    trainer = Trainer(cfg, tmp_path, split)
    per_step, original = [], trainer.model.run
    trainer.model.run = lambda *a, **k: (per_step[-1].append(k.get("keep")), original(*a, **k))[1]
    for _ in range(6):
        per_step.append([])
        trainer.train_step()
    assert all(len(s) == 3 for s in per_step)  # max + 2 random subnets
    for step in per_step[:3]:  # the max net and its subnets share the step's keep pattern
        assert all(k is not None and k.shape == (8, 1, 4, 4) and torch.equal(k, step[0]) for k in step)
    assert not torch.equal(per_step[0][0], per_step[1][0])  # a fresh pattern each step
    assert all(k is None for step in per_step[3:] for k in step)
    # the standalone trainer follows the same schedule
    standalone = StandaloneTrainer(trainer.space.max_arch(), cfg, split)
    seen, forward = [], standalone.model.forward
    standalone.model.forward = lambda *a, **k: (seen.append(k.get("keep")), forward(*a, **k))[1]
    for _ in range(6):
        standalone.train_step()
    assert [k is not None for k in seen] == [True] * 3 + [False] * 3


# ----- f) bad values -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, field", [
    (["train.token_drop=0.5"], "train.token_drop"),
    (DROP + ["train.token_drop_dense=2"], "train.token_drop_dense"),  # depth 3: 2 + 2 dense slots, no middle
    (DROP + ["train.token_drop_dense=2", "space.depth=4", "space.stage_pattern=[0,1,1,0]"], "train.token_drop_dense"),
    (["train.path_drop=0.1", "train.token_drop_dense=0"], "train.token_drop_dense"),
    (["train.path_drop=1.5"], "train.path_drop"),
    (["train.path_drop=-0.1"], "train.path_drop"),
    (DROP + ["train.token_drop_finetune=1.5"], "train.token_drop_finetune"),
])
def test_bad_token_drop_values_name_their_field(tmp_path, split, extra, field):
    cfg = load_config(None, TINY + extra)
    for build in (lambda: Trainer(cfg, tmp_path, split),
                  lambda: StandaloneTrainer(build_space(cfg, split).max_arch(), cfg, split)):
        with pytest.raises(ConfigFieldError) as err:
            build()
        assert err.value.field == field and str(err.value).startswith(field) and "\n" not in str(err.value)


# ----- g) LCHA, SSA, ASSA on the kept sub-grid -----------------------------------------------------------------------
def test_local_ops_train_on_the_kept_sub_grid(split):
    cfg = load_config(None, TINY + DROP + ["space.depth=5", "space.stage_pattern=[0,0,0,0,0]", "space.skippable=[]",
                                           "space.ops=[sa,lcha,ssa,assa]", "train.token_drop_finetune=0"])
    space = build_space(cfg, split)
    arch = space.parse("sa:1:4 lcha:1:4 ssa:1:4 assa:1:4 sa:1:4")
    trainer = StandaloneTrainer(arch, cfg, split)
    seen = {}
    hooks = [trainer.model.blocks[i].mixers[op].register_forward_pre_hook(
        lambda m, args, op=op: seen.__setitem__(op, args[0].shape[1])) for i, op in ((1, "lcha"), (2, "ssa"), (3, "assa"))]
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    losses = [trainer.train_step() for _ in range(3)]  # adaLN-Zero: the mixers get gradients from step 3
    for h in hooks:
        h.remove()
    assert seen == {"lcha": 16, "ssa": 16, "assa": 16}  # 8x8 = 64 tokens, a quarter kept
    assert all(torch.isfinite(torch.tensor(loss)) for loss in losses)
    changed = {k.split(".")[3] for k, v in trainer.model.state_dict().items()
               if k.split(".")[1] in ("1", "2", "3") and ".mixers." in k and not torch.equal(v, before[k])}
    assert changed == {"lcha", "ssa", "assa"}  # each op got a gradient through its sub-grid


# ----- path drop and Path-Drop Guidance ----------------------------------------------------------------------------
def _dense_only_by_hand(sub, dense: int):
    """A copy of an extracted SubDiT with every middle block replaced by the identity (a skipped slot)."""
    hand = copy.deepcopy(sub)
    for i in range(dense, len(hand.blocks) - dense):
        hand.blocks[i] = nn.Identity()
    return hand


def test_path_drop_runs_the_dense_ends_only():
    model = _supernet()
    arch = SPACE.parse("sa:1:4 lcha:1:4 | ssa:1:4 assa:0.5:2 | lcha:1:2 sa:1:4")
    sub = model.extract(arch)
    x, t, y = _inputs()
    want = _dense_only_by_hand(sub, 1)(x, t, y)
    assert (model.run(arch, x, t, y, dense=1, path_drop=True) - want).abs().max().item() <= 1e-5
    assert (sub(x, t, y, dense=1, path_drop=True) - want).abs().max().item() <= 1e-5
    assert (want - sub(x, t, y)).abs().max().item() > 1e-3
    seen = _tokens_seen(model, lambda: model.run(arch, x, t, y, dense=1, path_drop=True), range(6))
    assert sorted(seen) == [0, 5]


def test_path_drop_in_training_skips_the_middle_for_the_whole_step(tmp_path, split):
    cfg = load_config(None, TINY + ["train.path_drop=0.5", "train.steps=8"])
    trainer = Trainer(cfg, tmp_path, split)
    per_step, original = [], trainer.model.run
    trainer.model.run = lambda *a, **k: (per_step[-1].append(k.get("path_drop", False)), original(*a, **k))[1]
    for _ in range(8):
        per_step.append([])
        trainer.train_step()
    assert all(len(set(s)) == 1 for s in per_step)  # every pass of a step alike
    assert 0 < sum(s[0] for s in per_step) < 8


def test_pdg_equals_the_hand_computed_guidance():
    model = _supernet()
    arch = SPACE.parse("sa:1:4 lcha:1:4 | ssa:1:4 assa:0.5:2 | lcha:1:2 sa:1:4")
    sub = model.extract(arch)
    hand = _dense_only_by_hand(sub, 1)
    labels, null = torch.tensor([1, 4, 7]), 10
    noise = torch.randn(3, 1, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    one = torch.ones(3)
    v_c, v_u = sub(noise, one, labels), hand(noise, one, torch.full_like(labels, null))
    for w in (1.0, 3.0):
        for fn, uncond in ((sub, dense_only_fn(sub, 1)), (lambda x, t, y: model.run(arch, x, t, y),
                                                        dense_only_fn(model, 1, arch))):
            # one Euler step from t = 1 to 0: x0 = noise - v
            x0 = euler_sample(fn, labels, (1, 1, 16, 16), steps=1, cfg_scale=w, null_label=null,
                              generator=torch.Generator(), noise=noise, guidance="pdg", uncond_fn=uncond)
            if w == 1.0:  # w = 1 is the conditional velocity, exactly
                assert torch.equal(x0, noise - fn(noise, one, labels))
            else:
                want = noise - (v_u + w * (v_c - v_u))
                assert (x0 - want).abs().max().item() <= 1e-6
                cfg = euler_sample(fn, labels, (1, 1, 16, 16), steps=1, cfg_scale=w, null_label=null,
                                   generator=torch.Generator(), noise=noise)
                assert (cfg - x0).abs().max().item() > 1e-3  # pdg is not cfg


def test_pdg_unconditional_pass_skips_the_middle_blocks():
    model = _supernet()
    sub = model.extract(SPACE.parse("sa:1:4 lcha:1:4 | ssa:1:4 assa:0.5:2 | lcha:1:2 sa:1:4"))
    counts = [0] * 6
    for i, block in enumerate(sub.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: counts.__setitem__(i, counts[i] + 1))
    during_uncond = []
    uncond = dense_only_fn(sub, 1)

    def spy(x, t, y):
        start = list(counts)
        out = uncond(x, t, y)
        during_uncond.append([c - s for c, s in zip(counts, start)])
        assert torch.all(y == 10)  # the null label
        return out

    euler_sample(sub, torch.tensor([2, 3]), (1, 1, 16, 16), steps=3, cfg_scale=3.0, null_label=10,
                 generator=torch.Generator().manual_seed(0), guidance="pdg", uncond_fn=spy)
    assert during_uncond == [[1, 0, 0, 0, 0, 1]] * 3
    assert counts == [6, 3, 3, 3, 3, 6]


def test_pdg_settings_are_checked_and_unknown_guidance_is_named():
    cfg = load_config(None, ["latency.guidance=[none,pdg]", "search.guidance=pdg"])  # priced (pdg_latency.py)
    assert cfg.latency.check().guidance == ("none", "pdg") and cfg.search.check().guidance == "pdg"
    for override, field in (("latency.pdg_dense=0", "latency.pdg_dense"), ("search.pdg_dense=0", "search.pdg_dense"),
                            ("latency.guidance=[none,pag]", "latency.guidance"), ("search.guidance=pag", "search.guidance")):
        section = getattr(load_config(None, [override]), field.split(".")[0])
        with pytest.raises(ConfigFieldError) as err:
            section.check()
        assert err.value.field == field
    with pytest.raises(DitnasError, match="guidance 'cgf' unknown"):
        euler_sample(lambda x, t, y: x, torch.tensor([0]), (1, 1, 2, 2), steps=1, cfg_scale=2.0, null_label=10,
                     generator=torch.Generator(), guidance="cgf")
    with pytest.raises(ValueError, match="uncond_fn"):
        euler_sample(lambda x, t, y: x, torch.tensor([0]), (1, 1, 2, 2), steps=1, cfg_scale=2.0, null_label=10,
                     generator=torch.Generator(), guidance="pdg")


def test_sample_cli_runs_pdg_and_names_a_bad_guidance(tmp_path, split, capsys):
    from cli_helpers import run

    train_supernet(load_config(None, TINY + ["train.steps=1", "train.path_drop=0.5"]), tmp_path / "run", split=split)
    ckpt = str(tmp_path / "run" / CHECKPOINT_NAME)
    common = ["sample", "--checkpoint", ckpt, "--steps", "2", "--per-class", "1"]
    code, out, err = run([*common, "--out", str(tmp_path / "pdg.png"), "--guidance", "pdg"], capsys)
    assert code == 0 and (tmp_path / "pdg.png").exists(), out + err
    code, out, err = run([*common, "--out", str(tmp_path / "x.png"), "--guidance", "cgf"], capsys)
    assert code != 0 and "--guidance 'cgf' unknown" in out + err
    code, out, err = run([*common, "--out", str(tmp_path / "x.png"), "--guidance", "pdg", "--pdg-dense", "2"], capsys)
    assert code != 0 and "--pdg-dense" in out + err
