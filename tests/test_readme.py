"""README's commands run as written: every `ditnas ...` line parses against the CLI (verb, flags,
values), and the latency examples run on a default-sized profile (12 whole models, the
`latency.models` default) of a tiny space on the host-torch backend."""

import re
import shlex
from pathlib import Path

import pytest
import typer
from cli_helpers import run

from ditnas.cli import app, main
from ditnas.config import LatencyConfig

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = ["--set", "model.max_heads=2", "--set", "model.head_dim=8", "--set", "model.cond_dim=16",
        "--set", "model.cond_tokens=1", "--set", "space.depth=3", "--set", "space.stage_pattern=[0,1,0]",
        "--set", "space.skippable=[1]", "--set", "space.widths=[0.5,1.0]", "--set", "space.mlp_ratios=[2,4]",
        "--set", "space.ops=[sa,ssa]"]


def readme_commands() -> list[list[str]]:
    """Every `ditnas ...` command in README's bash blocks (comments stripped; `...` elisions skipped)."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            for part in line.split("&&"):
                part = part.split(" # ")[0].split("  #")[0].strip()
                if part.startswith("ditnas ") and "..." not in part:
                    commands.append(shlex.split(part)[1:])
    return commands


def test_readme_has_the_commands_this_test_checks():
    verbs = {c[0] for c in readme_commands()}
    assert {"train", "extract", "sample", "profile", "latency", "search", "sweep"} <= verbs


@pytest.mark.parametrize("args", readme_commands(), ids=lambda a: " ".join(a)[:60])
def test_every_readme_command_parses(args):
    """The verb exists and click accepts every flag and value as written (nothing is run)."""
    command = typer.main.get_command(app)
    ctx = command.make_context("ditnas", list(args), resilient_parsing=False)
    # descend into sub-commands (profile ingest, latency predict, ...)
    while isinstance(ctx.command, typer.core.TyperGroup):
        remaining = [*getattr(ctx, "_protected_args", getattr(ctx, "protected_args", [])), *ctx.args]
        if not remaining:
            break
        name, *rest = remaining
        sub = ctx.command.get_command(ctx, name)
        assert sub is not None, f"README: `ditnas {' '.join(args)}`: no sub-command {name!r}"
        ctx = sub.make_context(name, rest, parent=ctx)


@pytest.fixture(scope="module")
def default_profile(tmp_path_factory):
    out = tmp_path_factory.mktemp("xnnpack")
    with pytest.raises(SystemExit) as exc:
        main(["profile", "--backend", "host-torch", "--out", str(out), "--warmup", "1", "--iters", "3", "--no-progress", *TINY])
        raise SystemExit(0)
    assert exc.value.code == 0
    return out


def test_readme_latency_examples_run_on_a_default_profile(default_profile, capsys):
    from ditnas.latency_models.stage import load_predictor

    table, _ = load_predictor(default_profile)
    assert len(table.model_rows()) == LatencyConfig().models  # a default profile's whole models
    latency = [c for c in readme_commands() if c[0] == "latency"]
    assert latency, "README shows no `ditnas latency` example"
    for args in latency:
        args = [str(default_profile) if a == "runs/xnnpack" else a for a in args]
        code, out, err = run(args, capsys)
        assert code == 0, f"README example `ditnas {' '.join(args)}` failed: {err}"
