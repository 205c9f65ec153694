"""The seams every stage shares: one JSON form of a search space, one `--arch` resolver, one typed
config with sections for every stage (and errors that name the field)."""

import json
import random

import pytest

from ditnas.arch import SearchSpace, resolve_arch, resolve_archs
from ditnas.config import LatencyConfig, RunConfig, SearchConfig, SweepConfig, load_config
from ditnas.errors import ConfigFieldError, DitnasError

SPACE = SearchSpace(depth=6, ops=("sa", "gqa", "lcha", "ssa"), widths=(0.5, 1.0), mlp_ratios=(2.0, 4.0),
                    skippable=(1, 4), stage_pattern=(0, 1, 1, 1, 1, 0), stage_ops={1: ("ssa", "lcha")})


# ----- SearchSpace <-> JSON -------------------------------------------------------------------------
def test_space_round_trips_through_json_and_its_key_is_stable():
    for space in (SPACE, SearchSpace(), SearchSpace(depth=3, free_stages=True, latent=(4, 2, 8, 8), num_classes=0)):
        d = json.loads(json.dumps(space.to_dict()))  # what a table/predictor/checkpoint stores
        back = SearchSpace.from_dict(d)
        assert back == space and back.key() == space.key()
        assert back.stage_ops == space.stage_ops  # int keys back from JSON's string keys
    # the key changes with anything that changes which archs exist
    assert SPACE.key() != SearchSpace.from_dict({**SPACE.to_dict(), "widths": [0.75, 1.0]}).key()
    # the form checkpoints written before this change hold (dataclasses.asdict: tuples, int keys)
    from dataclasses import asdict

    assert SearchSpace.from_dict(asdict(SPACE)) == SPACE


def test_space_from_a_bad_dict_is_one_clear_error():
    with pytest.raises(DitnasError, match=r"table.json: unknown search-space field\(s\) \['colour'\]"):
        SearchSpace.from_dict({**SPACE.to_dict(), "colour": "red"}, source="table.json")
    with pytest.raises(DitnasError, match="must be a mapping"):
        SearchSpace.from_dict(["sa"], source="x")
    with pytest.raises(DitnasError, match="search space: widths"):
        SearchSpace.from_dict({**SPACE.to_dict(), "widths": [0.5]})


# ----- resolve_arch ---------------------------------------------------------------------------------
def test_names_layouts_and_files_resolve_to_the_same_archs(tmp_path):
    assert resolve_arch(SPACE, "max") == SPACE.max_arch()
    assert resolve_arch(SPACE, "mid") == SPACE.mid_arch()
    assert resolve_arch(SPACE, "min") == SPACE.min_arch()
    assert resolve_arch(SPACE, "narrowest") == resolve_arch(SPACE, "min-width") == SPACE.narrowest_arch()
    rng = random.Random(0)
    archs = [SPACE.sample(rng) for _ in range(5)]
    for arch in archs:
        assert resolve_arch(SPACE, arch.layout()) == arch
        assert resolve_arch(SPACE, str(arch) + "  # a trailing comment") == arch
    path = tmp_path / "archs.txt"
    path.write_text("# the search's picks\n\n" + "\n".join(a.layout() + "  # pick" for a in archs) + "\nmax\n")
    assert resolve_archs(SPACE, str(path)) == [*archs, SPACE.max_arch()]
    one = tmp_path / "one.txt"
    one.write_text("# best at 80 ms\n" + archs[0].layout() + "\n")
    assert resolve_arch(SPACE, str(one)) == archs[0]


def test_bad_arch_arguments_are_one_line_errors(tmp_path):
    comments = tmp_path / "empty.txt"
    comments.write_text("# nothing here\n   # nor here\n\n")
    cases = [
        (str(comments), f"arch file {comments} holds no layout"),
        ("biggest", "'biggest' is not an arch name of the space; names: max, mid, min, narrowest, min-width"),
        ("sa:1:4 | ssa:0.75:4*4 | sa:1:4", "width 0.75 not in the space"),
        ("  # only a comment", "empty arch"),
    ]
    several = tmp_path / "several.txt"
    several.write_text("max\nmin\n")
    cases.append((str(several), "holds 2 layouts where one is expected"))
    bad_line = tmp_path / "bad.txt"
    bad_line.write_text("max\nsa:1:4 | ssa:0.5:2\n")
    cases.append((str(bad_line), f"{bad_line}:2"))  # the line that is wrong
    for text, message in cases:
        with pytest.raises(DitnasError) as err:
            resolve_archs(SPACE, text) if text == str(bad_line) else resolve_arch(SPACE, text)
        assert message in str(err.value) and "\n" not in str(err.value), (text, str(err.value))


# ----- typed config sections ------------------------------------------------------------------------
def test_every_stage_section_loads_from_yaml_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("latency:\n  backend: host-torch\n  iters: 20\nsearch:\n  budget_ms: 80\n  steps: [4, 28]\n"
                    "sweep:\n  budgets_ms: [60, 80]\n  ray_address: 127.0.0.1:6379\n")
    cfg = load_config(path, ["search.trials=9", "search.steps=8", "search.memory_mb=null", "sweep.retries=0"])
    assert cfg.latency == LatencyConfig(backend="host-torch", iters=20)
    assert cfg.search == SearchConfig(budget_ms=80.0, steps=(8,), trials=9)
    assert cfg.sweep == SweepConfig(budgets_ms=(60.0, 80.0), ray_address="127.0.0.1:6379", retries=0)
    # defaults live in one place: the dataclasses
    assert RunConfig().search.dp_seeds == 16 and RunConfig().search.dp_buckets == 2000
    assert RunConfig().search.population == 24 and RunConfig().search.sampler == "nsga2"


@pytest.mark.parametrize("override, message", [
    ("search.trials=lots", "search.trials: expected int, got 'lots'"),
    ("search.trials=true", "expected int, got True"),
    ("search.budget=80", "search: unknown field(s) ['budget']"),
    ("latency.threads=1.5", "latency.threads: expected int, got 1.5"),
    ("sweep.budgets_ms={a: 1}", "sweep.budgets_ms: expected a list"),
])
def test_a_bad_field_names_the_field(override, message):
    with pytest.raises(DitnasError) as err:
        load_config(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_section_checks_name_the_field():
    checks = [
        (SearchConfig(budget_ms=-1.0), "search.budget_ms"),
        (SearchConfig(steps=(0,)), "search.steps"),
        (SearchConfig(sampler="cmaes"), "search.sampler"),
        (SearchConfig(dp_seeds=-1), "search.dp_seeds"),
        (SearchConfig(population=1), "search.population"),
        (SweepConfig(), "sweep.budgets_ms"),
        (SweepConfig(budgets_ms=(10.0, float("nan"))), "sweep.budgets_ms"),
        (LatencyConfig(iters=0), "latency.iters"),
    ]
    for section, name in checks:
        with pytest.raises(ConfigFieldError) as err:
            section.check()
        assert err.value.field == name and str(err.value).startswith(f"{name}: ")
        assert err.value.with_flag("--flag") == f"--flag ({name}): {err.value.detail}"
    with pytest.raises(ConfigFieldError, match="search.budget_ms: missing"):
        SearchConfig().needs_budget()


@pytest.mark.parametrize("names", ["[biggest]", "[]"])
def test_train_refuses_unknown_quality_archs_before_training(tmp_path, names):
    from ditnas.supernet.run import train_run
    cfg = load_config(None, [f"train.quality_archs={names}"])
    with pytest.raises(ConfigFieldError, match="train.quality_archs"):
        train_run(cfg, tmp_path / "train", progress=False, evaluate=True)
    assert not (tmp_path / "train").exists()  # refused before any folder or step


def test_default_config_evaluates_only_the_max_net():
    from pathlib import Path
    import ditnas
    cfg = load_config(Path(ditnas.__file__).parent / "configs" / "default.yaml")
    assert cfg.train.quality_archs == ("max",)
