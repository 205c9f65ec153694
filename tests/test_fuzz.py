"""Fuzzing with hypothesis: generated `Arch` strings, config overrides and CLI argument combinations.
The promise: never a traceback. Every input is either accepted (and then behaves: an accepted arch
round-trips through its string form) or rejected with the project's own one-line error."""

from __future__ import annotations

import dataclasses
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ditnas.arch import Arch, SearchSpace, resolve_arch
from ditnas.config import RunConfig, load_config
from ditnas.errors import DitnasError

SPACE = SearchSpace(depth=6, ops=("sa", "gqa", "assa", "lcha", "ssa"), widths=(0.5, 0.75, 1.0),
                    mlp_ratios=(2.0, 3.0, 4.0), skippable=(1, 4), stage_pattern=(0, 1, 1, 1, 1, 0))

# ----- Arch strings ---------------------------------------------------------------------------------
OPS = ["sa", "gqa", "assa", "lcha", "ssa", "skip", "max", "min", "mid", "narrowest", "conv", ""]
NUMBERS = ["0", "1", "0.5", "0.75", "2", "3", "4", "-1", "1e3", "nan", "inf", "1e400", ".", "01", "0x2"]
slot = st.builds(
    lambda op, w, r, n: op + (f":{w}" if w is not None else "") + (f":{r}" if r is not None else "") + (f"*{n}" if n is not None else ""),
    st.sampled_from(OPS), st.none() | st.sampled_from(NUMBERS), st.none() | st.sampled_from(NUMBERS),
    st.none() | st.sampled_from(["0", "1", "2", "4", "99", "-1", ""]),
)
header = st.none() | st.builds(
    lambda items: "[" + " ".join(items) + "]",
    st.lists(st.sampled_from(["patch=2", "patch=x", "latent=1x1x16x16", "latent=1x16", "classes=10", "steps=28",
                              "steps=-3", "colour=red", "=", "steps="]), max_size=4),
)
layout = st.lists(st.one_of(slot, st.just("|"), st.just("#"), st.just("]"), st.text(max_size=3)), max_size=12)
arch_text = st.builds(lambda h, parts: ((h + " ") if h else "") + " ".join(parts), header, layout)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch_text)
def test_arch_strings_parse_or_fail_with_a_clear_error(text):
    for parse in (lambda t: Arch.parse(t), lambda t: SPACE.parse(t), lambda t: resolve_arch(SPACE, t)):
        try:
            arch = parse(text)
        except DitnasError as exc:
            message = str(exc)
            assert message and "\n" not in message and "Traceback" not in message
            continue
        again = Arch.parse(str(arch))
        assert again == arch and str(again) == str(arch) and again.key() == arch.key()


# ----- config overrides -----------------------------------------------------------------------------
def _fields(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every settable field, nested sections included (compress.kd.steps, ...), and each section's own name."""
    names = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            names += ([name] if prefix else []) + _fields(hints[f.name], f"{name}.")
        else:
            names.append(name)
    return names


def test_the_fuzzed_fields_reach_the_compression_sections():
    assert {"compress.kd.steps", "compress.distill.method", "compress.export.sampler", "compress.prune"} <= set(_fields())


VALUES = ["1", "0", "-1", "2.5", "1e9", "true", "no", "null", "[]", "[1, 2]", "[a, b]", "{a: 1}", "sa", "'x'",
          "[0, 1, 1, 0]", "nan", "- x", "{", "']", ""]
override = st.builds(lambda k, v: f"{k}={v}", st.sampled_from(_fields() + ["train", "nope.field", "train.nope", "a.b.c"]),
                     st.sampled_from(VALUES))


@settings(max_examples=500, deadline=None)
@given(st.lists(override | st.text(max_size=12), max_size=4))
def test_config_overrides_load_or_fail_with_a_clear_error(items):
    try:
        cfg = load_config(None, items)
    except DitnasError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert isinstance(cfg, RunConfig)
    for section in (cfg.latency, cfg.search, cfg.sweep, cfg.compress):
        try:
            section.check()
        except DitnasError as exc:
            named = str(exc).split(":")[0]
            assert named.startswith(("latency.", "search.", "sweep.", "compress.")), exc  # names `section.field`
            assert "\n" not in str(exc)


# ----- CLI argument combinations ----------------------------------------------------------------------
VERBS = [["extract"], ["sample"], ["search"], ["sweep"], ["latency", "predict"], ["latency", "validate"],
         ["latency", "show"], ["profile", "ingest"], ["extract", "--help"], ["prune"], ["distill"], ["export"],
         ["generate"], ["report"]]
FLAGS = ["--arch", "--checkpoint", "--table", "--out", "--budget-ms", "--steps", "--trials", "--seeds", "--sampler",
         "--budgets", "--tables", "--set", "--config", "--n", "--session", "--storage", "--bogus", "--memory-mb",
         "--subnet", "--teacher", "--student", "--method", "--name", "--units", "--pte", "--label", "--cfg-scale",
         "--dtype", "--backend"]
ARGS = ["max", "min", "sa:1:4*6", "x", "-1", "0", "1e9", "nan", "train.steps=x", "search.trials=-1", "a,b", "1,,2",
        "MISSING", "FILE", "postgresql://u:pw@127.0.0.1:1/db", "", "kdmd", "adversarial", "compress.kd.steps=0",
        "compress.distill.student_steps=x", "compress.export.sampler=nope", "blocks,heads", "fp16"]


@pytest.fixture(scope="module")
def junk_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "junk.pt"
    path.write_bytes(b"\x00not a checkpoint")
    return path


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(verb=st.sampled_from(VERBS), rest=st.lists(st.sampled_from(FLAGS) | st.sampled_from(ARGS), max_size=8))
def test_cli_argument_combinations_never_trace_back(verb, rest, junk_file, tmp_path, capsys):
    from ditnas.cli import main

    argv = [*verb, *(str(junk_file) if a == "FILE" else str(tmp_path / "missing") if a == "MISSING" else a for a in rest)]
    with pytest.raises(SystemExit) as exc:
        main(argv)
        raise SystemExit(0)
    err = capsys.readouterr().err
    assert exc.value.code in (0, 2), (argv, exc.value.code, err)
    assert "Traceback" not in err and "pw@" not in err, argv
