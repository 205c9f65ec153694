import random
import subprocess
import sys

import pytest

from ditnas.arch import Arch, SearchSpace, Slot
from ditnas.errors import DitnasError

SPACE = SearchSpace(depth=6, stage_pattern=(0, 0, 1, 1, 0, 0), skippable=(1, 4), free_stages=True)


def test_round_trip_random_archs():
    rng = random.Random(0)
    for _ in range(300):
        arch = SPACE.sample(rng)
        assert Arch.parse(str(arch)) == arch
        assert SPACE.parse(str(arch)) == arch


def test_string_form_reads_as_documented():
    arch = Arch.parse("[patch=2 latent=1x1x16x16 classes=10 steps=4] sa:1:4*2 | ssa:0.5:3*2 | lcha:0.75:4 skip")
    assert [s.op for s in arch.slots] == ["sa", "sa", "ssa", "ssa", "lcha", "skip"]
    assert [s.stage for s in arch.slots] == [0, 0, 1, 1, 0, 0]
    assert arch.slots[2] == Slot("ssa", 0.5, 3.0, 1)
    assert arch.steps == 4 and arch.depth == 5 and arch.stream_width == 1.0
    assert arch.tokens(0) == 64 and arch.tokens(1) == 16


def test_shorthand_defaults_and_half_resolution_edges():
    arch = Arch.parse("| ssa*2 | sa | ssa |")
    assert [s.stage for s in arch.slots] == [1, 1, 0, 1]
    assert arch.layout() == "| ssa:1:4*2 | sa:1:4 | ssa:1:4 |"
    assert arch.slots[0] == Slot("ssa", 1.0, 4.0, 1)
    assert Arch.parse(str(arch)) == arch


def test_key_is_stable_across_processes():
    arch = SPACE.sample(random.Random(3))
    code = f"from ditnas.arch import Arch; print(Arch.parse({str(arch)!r}).key())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == arch.key()
    assert len({SPACE.sample(random.Random(i)).key() for i in range(50)}) > 45


def test_max_and_min_arch():
    fixed = SearchSpace(depth=6, stage_pattern=(0, 0, 1, 1, 0, 0), skippable=(1, 4))
    assert fixed.max_arch().layout() == "sa:1:4*2 | sa:1:4*2 | sa:1:4*2"
    assert fixed.min_arch().layout() == "ssa:0.5:2 skip | ssa:0.5:2*2 | skip ssa:0.5:2"
    assert fixed.validate(fixed.min_arch()) == fixed.min_arch()


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("sa:1:4*5 foo:1:4", "unknown op 'foo'"),
        ("sa:1:4*2 | sa*2", "ends at half resolution"),
        ("sa:1:4 | | sa", "empty segment"),
        ("sa:x:4", "cannot read slot"),
        ("sa:-1:4", "positive width"),
        ("[patch=2 colour=red] sa", "unknown header field"),
        ("[patch=two] sa", "malformed"),
        ("", "no slots"),
    ],
)
def test_malformed_strings(text, fragment):
    with pytest.raises(DitnasError, match=fragment):
        Arch.parse(text)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("sa:1:4*5", "5 slots but the supernet has 6"),
        ("sa:0.6:4*6", "width 0.6 not in the space"),
        ("sa:1:5*6", "MLP ratio 5 not in the space"),
        ("skip sa*5", "slot 0 cannot be skipped"),
        ("[latent=3x1x16x16] sa*6", "latent"),
    ],
)
def test_validation_names_the_field(text, fragment):
    with pytest.raises(DitnasError, match=fragment):
        SPACE.parse(text)


def test_fixed_stage_layout_is_enforced():
    fixed = SearchSpace(depth=4, stage_pattern=(0, 1, 1, 0))
    with pytest.raises(DitnasError, match="stage layout"):
        fixed.parse("sa*4")
    assert fixed.parse("sa | ssa*2 | sa").depth == 4


def test_stage_ops_restrict_ops_per_stage():
    space = SearchSpace(depth=4, stage_pattern=(0, 1, 1, 0), stage_ops={0: ("lcha",), 1: ("ssa", "sa")})
    assert space.max_arch().layout() == "lcha:1:4 | ssa:1:4*2 | lcha:1:4"
    with pytest.raises(DitnasError, match="not allowed at stage 1"):
        space.parse("lcha | lcha*2 | lcha")


def test_bad_space_is_rejected():
    with pytest.raises(DitnasError, match="widths"):
        SearchSpace(depth=2, widths=(0.5,))
    with pytest.raises(DitnasError, match="stage_pattern"):
        SearchSpace(depth=2, stage_pattern=(0, 1, 0))
