import random
from dataclasses import replace

import pytest
import torch

from ditnas.arch import SearchSpace, Slot
from ditnas.config import ModelConfig
from ditnas.errors import DitnasError
from ditnas.supernet.model import Block, ElasticDiT, SubDiT, merge_2x2, patchify, split_2x2, unpatchify

SPACE = SearchSpace(depth=6, stage_pattern=(0, 0, 1, 1, 0, 0), skippable=(1, 4), free_stages=True)
CFG = ModelConfig(max_heads=4, head_dim=8, cond_dim=32, cond_tokens=2)


def _supernet(seed: int = 0) -> ElasticDiT:
    torch.manual_seed(seed)
    model = ElasticDiT(SPACE, CFG)
    with torch.no_grad():  # leave the adaLN-Zero init, or every block is the identity and parity is trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _inputs(n: int = 3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 1, 16, 16, generator=g), torch.rand(n, generator=g), torch.randint(0, 11, (n,), generator=g)


def test_extract_equals_run_for_random_archs():
    model = _supernet()
    x, t, y = _inputs()
    rng = random.Random(0)
    outputs = []
    for _ in range(24):
        arch = SPACE.sample(rng)
        sub = model.extract(arch)
        ref = model.run(arch, x, t, y)
        assert (ref - sub(x, t, y)).abs().max().item() <= 1e-5, str(arch)
        outputs.append(ref)
    # the archs really differ: parity is not the trivial identity
    assert min((a - b).abs().max().item() for a, b in zip(outputs, outputs[1:])) > 1e-3


def test_max_arch_equals_supernet_forward():
    model = _supernet()
    x, t, y = _inputs()
    full = model(x, t, y)
    assert torch.equal(full, model.run(SPACE.max_arch(), x, t, y))
    assert (model.extract(SPACE.max_arch())(x, t, y) - full).abs().max() <= 1e-5


def test_extracted_model_owns_only_its_weights():
    model = _supernet()
    arch = SPACE.parse("sa:0.5:2 skip | ssa:0.5:2*2 | skip lcha:0.5:2")
    sub = model.extract(arch)
    d, dc, hd = 2 * 8, CFG.cond_dim, 8
    # one standalone block: qkv+out of its single mixer, cross-attn, FFN of ratio 2, modulation for width d
    assert isinstance(sub, SubDiT)
    assert sub.stream == d
    assert list(sub.blocks[0].mixers) == ["sa"] and not isinstance(sub.blocks[1], Block)  # one op; skip holds nothing
    mixer = sum(p.numel() for p in sub.blocks[0].mixers["sa"].parameters())
    assert mixer == 4 * (d * d + d) + 2 * 2 * hd  # q, k, v, o at width d; q/k norms over one head
    ffn = sum(p.numel() for p in sub.blocks[0].ffn.parameters())
    assert ffn == d * 2 * d + 2 * d + 2 * d * d + d
    # the copies are the leading slices of the supernet's weights
    assert torch.equal(sub.blocks[0].ffn.fc1.weight, model.blocks[0].ffn.fc1.weight[: 2 * d, :d])
    assert torch.equal(sub.blocks[0].ffn.fc2.weight, model.blocks[0].ffn.fc2.weight[:d, : 2 * d])
    mod = sum(p.numel() for p in sub.blocks[0].mod.parameters())
    assert mod == dc * 6 * d + 6 * d
    assert sub.num_params() < sum(p.numel() for p in model.parameters()) / 5
    # changing the supernet afterwards does not change the extracted copy
    x, t, y = _inputs()
    before = sub(x, t, y)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert torch.equal(before, sub(x, t, y))


def test_widths_use_private_modulation():
    model = _supernet()
    x, t, y = _inputs()
    arch = SPACE.parse("sa:0.5:4*6")
    before = model.run(arch, x, t, y)
    with torch.no_grad():  # perturbing the full-width modulation must not touch the half-width subnet
        for block in model.blocks:
            block.mod["h4"].weight.add_(1.0)
        model.final_mod["h4"].weight.add_(1.0)
    assert torch.equal(before, model.run(arch, x, t, y))
    assert not torch.equal(model(x, t, y), before)


def test_private_mod_gives_every_op_its_own_modulation_and_extracts_it():
    torch.manual_seed(0)
    model = ElasticDiT(SPACE, replace(CFG, private_mod=True))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    assert sorted(model.blocks[0].mod) == sorted(f"{op}_h{h}" for op in SPACE.ops for h in (2, 3, 4))
    x, t, y = _inputs()
    sa, ssa = SPACE.parse("sa:1:4*6"), SPACE.parse("ssa:1:4*6")
    before_sa, before_ssa = model.run(sa, x, t, y), model.run(ssa, x, t, y)
    with torch.no_grad():  # sa's modulation moves: ssa's subnet must not
        for block in model.blocks:
            block.mod["sa_h4"].weight.add_(1.0)
    assert torch.equal(before_ssa, model.run(ssa, x, t, y))
    assert not torch.equal(before_sa, model.run(sa, x, t, y))
    rng = random.Random(3)
    for _ in range(8):  # extraction copies the op's own modulation: parity as without private_mod
        arch = SPACE.sample(rng)
        assert (model.run(arch, x, t, y) - model.extract(arch)(x, t, y)).abs().max().item() <= 1e-5, str(arch)


def test_narrow_block_only_updates_leading_features_of_the_stream():
    model = _supernet()
    x, t, y = _inputs()
    arch = SPACE.parse("sa:1:4 sa:0.5:4*4 sa:1:4")
    seen = {}
    hooks = [
        model.blocks[0].register_forward_hook(lambda m, inp, out: seen.update(after_first=out)),
        model.blocks[1].register_forward_pre_hook(lambda m, inp: seen.update(narrow_in=inp[0])),
        model.blocks[5].register_forward_pre_hook(lambda m, inp: seen.update(before_last=inp[0])),
    ]
    wide = model.run(arch, x, t, y)
    for hook in hooks:
        hook.remove()
    assert seen["narrow_in"].shape[-1] == 16 and seen["before_last"].shape[-1] == 32
    # four half-width blocks in between: the trailing 16 features pass through untouched ...
    assert torch.equal(seen["before_last"][..., 16:], seen["after_first"][..., 16:])
    # ... while the leading 16 were updated
    assert (seen["before_last"][..., :16] - seen["after_first"][..., :16]).abs().max() > 1e-3
    sub = model.extract(arch)
    assert sub.stream == 32
    assert (wide - sub(x, t, y)).abs().max() <= 1e-5


def test_gradients_reach_only_the_active_subnet():
    model = _supernet()
    x, t, y = _inputs()
    arch = SPACE.parse("lcha:0.5:2 skip sa*4")
    model.zero_grad()
    model.run(arch, x, t, y).pow(2).mean().backward()
    assert model.blocks[0].mixers["lcha"].o.weight.grad is not None
    assert all(p.grad is None for p in model.blocks[0].mixers["sa"].parameters())
    assert all(p.grad is None for p in model.blocks[1].parameters())
    assert model.blocks[0].mod["h4"].weight.grad is None and model.blocks[2].mod["h2"].weight.grad is None  # other widths
    grads = [p.grad for p in model.blocks[0].mixers["lcha"].parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_shape_helpers_round_trip():
    x = torch.randn(2, 3, 2, 8, 12)
    tokens, grid = patchify(x, 2)
    assert grid == (2, 4, 6) and tokens.shape == (2, 48, 12)
    assert torch.equal(unpatchify(tokens, grid, 2, 3), x)
    merged, small = merge_2x2(tokens, grid)
    assert small == (2, 2, 3) and merged.shape == (2, 12, 48)
    back, big = split_2x2(merged, small)
    assert big == grid and torch.equal(back, tokens)


def test_patchify_equals_the_7d_reference_for_video():
    x = torch.randn(2, 3, 4, 8, 12)  # T = 4 frames
    b, c, t, h, w = x.shape
    ref = x.reshape(b, c, t, h // 2, 2, w // 2, 2).permute(0, 2, 3, 5, 4, 6, 1).reshape(b, t * 4 * 6, 12)
    tokens, grid = patchify(x, 2)
    assert torch.equal(tokens, ref) and grid == (4, 4, 6)
    assert torch.equal(unpatchify(tokens, grid, 2, 3), x)


def test_half_resolution_runs_on_a_quarter_of_the_tokens():
    model = _supernet()
    seen = []
    hook = model.blocks[2].mixers["sa"].register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[1]))
    x, t, y = _inputs()
    model.run(SPACE.max_arch(), x, t, y)
    hook.remove()
    assert seen == [16]


def test_widths_must_be_whole_heads():
    space = SearchSpace(depth=2, widths=(0.3, 1.0))
    with pytest.raises(DitnasError, match="whole number of heads"):
        ElasticDiT(space, CFG)


def test_invalid_arch_is_refused_by_run():
    model = _supernet()
    x, t, y = _inputs()
    arch = SPACE.max_arch().with_slots([Slot("sa", 0.6, 4.0, 0)] * 6)
    with pytest.raises(DitnasError, match="width 0.6"):
        model.run(arch, x, t, y)
