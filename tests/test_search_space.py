import random

import numpy as np
import pytest

from ditnas.arch import Arch, SearchSpace, Slot
from ditnas.errors import DitnasError
from ditnas.search.dp import DPProblem, solve, to_arch
from ditnas.search.space import SearchChoices, SlotChoice

SPACES = {
    "fixed": SearchSpace(depth=6, stage_pattern=(0, 0, 1, 1, 0, 0), skippable=(1, 4)),
    "free": SearchSpace(depth=7, skippable=(0, 3, 6), free_stages=True),
    "stage_ops": SearchSpace(
        depth=5, ops=("sa", "lcha", "ssa"), widths=(0.5, 1.0), mlp_ratios=(2.0, 4.0), stage_pattern=(0, 1, 1, 0, 0),
        skippable=(2,), stage_ops={0: ("lcha", "sa"), 1: ("ssa",)},
    ),
    "free_stage_ops": SearchSpace(
        depth=6, ops=("lcha", "ssa"), widths=(1.0,), mlp_ratios=(4.0,), free_stages=True, skippable=(5,),
        stage_ops={1: ("ssa",)},
    ),
}


@pytest.mark.parametrize("name", sorted(SPACES))
def test_encode_decode_round_trip_random_archs(name):
    space = SPACES[name]
    choices = SearchChoices.from_space(space)
    dists = choices.distributions()
    rng = random.Random(0)
    for _ in range(200):
        arch = space.sample(rng)
        params = choices.encode(arch)
        assert list(params) == list(dists)  # fixed length: same parameters in every trial
        assert all(value in dists[key] for key, value in params.items())
        assert choices.decode(params) == arch


def test_distributions_are_fixed_length_string_categoricals():
    free = SearchChoices.from_space(SPACES["free"])
    dists = free.distributions()
    assert list(dists) == [f"slot{i}" for i in range(7)] + [f"stage{i}" for i in range(7)]
    assert all(isinstance(v, str) for values in dists.values() for v in values)
    assert dists["stage2"] == ["0", "1"]
    assert "skip" in dists["slot0"] and "skip" not in dists["slot1"]
    assert "lcha:1:4" in dists["slot1"] and "sa:0.5:2" in dists["slot1"]
    fixed = SearchChoices.from_space(SPACES["fixed"]).distributions()
    assert list(fixed) == [f"slot{i}" for i in range(6)]  # no stage parameters when the layout is fixed


def test_per_slot_respects_stage_ops_and_skippable():
    choices = SearchChoices.from_space(SPACES["stage_ops"])
    assert {c.op for c in choices.per_slot[0]} == {"lcha", "sa"}
    assert {c.op for c in choices.per_slot[1]} == {"ssa"}
    assert {c.op for c in choices.per_slot[2]} == {"ssa", "skip"}
    assert choices.stages == ((0,), (1,), (1,), (0,), (0,))
    free = SearchChoices.from_space(SPACES["free_stage_ops"])
    assert {c.op for c in free.per_slot[0]} == {"lcha", "ssa"}  # union over the stages it may take
    assert not free.allowed(0, SlotChoice("lcha", 1.0, 4.0), 1)
    assert free.allowed(0, SlotChoice("ssa", 1.0, 4.0), 1)


def test_mask_agrees_with_space_validation():
    for space in SPACES.values():
        choices = SearchChoices.from_space(space)
        mask = choices.mask()
        base = space.max_arch()
        for i in range(space.depth):
            for o, choice in enumerate(choices.all_choices):
                for r in (0, 1):
                    slots = list(base.slots)
                    slots[i] = choice.slot(r)
                    if space.free_stages:
                        # other slots at a stage their op allows, so only cell (i, o, r) is on trial
                        slots = [s if j == i else Slot(space.ops_for(0)[0], stage=0) for j, s in enumerate(slots)]
                    try:
                        space.validate(base.with_slots(slots))
                        valid = True
                    except DitnasError:
                        valid = False
                    assert mask[i, o, r] == valid, (i, choice.token(), r)


def test_decode_rejects_bad_parameters():
    choices = SearchChoices.from_space(SPACES["free_stage_ops"])
    params = choices.encode(SPACES["free_stage_ops"].max_arch())
    with pytest.raises(DitnasError, match="slot0"):
        choices.decode({**params, "slot0": "gqa:1:4"})
    with pytest.raises(DitnasError, match="not allowed at stage 1"):
        choices.decode({**params, "stage0": "1"})  # lcha is not allowed at half resolution
    with pytest.raises(DitnasError, match="stage3"):
        choices.decode({**params, "stage3": "2"})
    with pytest.raises(DitnasError, match="missing"):
        choices.decode({k: v for k, v in params.items() if k != "slot4"})
    space = SearchSpace(depth=2, skippable=(0, 1))
    all_skip = {"slot0": "skip", "slot1": "skip"}
    with pytest.raises(DitnasError, match="every slot is skipped"):
        SearchChoices.from_space(space).decode(all_skip)


def test_decode_keeps_base_header():
    space = SPACES["fixed"]
    choices = SearchChoices.from_space(space)
    base = Arch(space.max_arch().slots, steps=4)
    arch = choices.decode(choices.encode(space.min_arch()), base=base)
    assert arch.steps == 4 and arch.slots == space.min_arch().slots


def test_dp_layout_on_space_choices_becomes_a_valid_arch():
    space = SPACES["free_stage_ops"]
    choices = SearchChoices.from_space(space)
    mask = choices.mask()
    rng = np.random.default_rng(0)
    cost = np.where(mask, rng.uniform(1, 3, mask.shape), np.inf)
    cost[:, :, 1] *= 0.3
    score = rng.uniform(-1, 0, mask.shape)
    problem = DPProblem(cost, score, budget_ms=8.0, down_cost=0.2, up_cost=0.3, stages=choices.stages)
    result = solve(problem)
    arch = to_arch(result, choices, Arch((), steps=8, latent=space.latent))
    assert arch.steps == 8 and len(arch.slots) == space.depth
    assert choices.decode(choices.encode(arch), base=arch) == arch
    assert [choices.index(SlotChoice.of(s)) for s in arch.slots] == list(result.choice)
