"""`ditnas <verb>`: parse, validate, call one stage function, print where the output went.

User errors (DitnasError) print one line to stderr and exit 2, without a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ditnas.errors import DitnasError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Hardware-aware architecture search and compression for Diffusion Transformers.")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (sections data/space/model/train/sample)")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override, e.g. --set train.steps=500")]


@app.command()
def train(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    out: Annotated[Path, typer.Option(help="output folder (checkpoint, run.json, samples)")] = Path("runs/supernet"),
    resume: Annotated[bool, typer.Option(help="continue the checkpoint in --out if there is one")] = True,
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="judge max/min samples (label accuracy, FD)")] = True,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Train the elastic supernet (sandwich rule + in-place distillation)."""
    from ditnas.config import load_config
    from ditnas.supernet.run import train_run

    cfg = load_config(config, overrides or [])
    manifest = train_run(cfg, out, resume=resume, progress=progress, evaluate=evaluate)
    loss = manifest["val_flow_loss_ema"]
    typer.echo(f"trained {manifest['step']} steps -> {out / manifest['checkpoint']}")
    typer.echo(f"val flow loss (EMA): max {loss['max']:.4f}  min {loss['min']:.4f}")
    for name, q in manifest.get("quality", {}).items():
        typer.echo(f"{name}: label accuracy {q['label_accuracy']:.3f}  FD {q['fd']:.2f} (real-vs-real floor {q['fd_floor']:.2f})")
    typer.echo(f"manifest {out / 'run.json'}, samples {out / manifest['samples']}")


@app.command()
def extract(
    arch: Annotated[str, typer.Option(help="layout string, 'max', 'min', or a file holding one")],
    checkpoint: Annotated[Path, typer.Option(help="supernet checkpoint.pt")],
    out: Annotated[Path, typer.Option(help="output folder for subnet.pt + manifest.json")],
    ema: Annotated[bool, typer.Option(help="use the EMA weights")] = True,
) -> None:
    """Extract one sub-DiT as a standalone model (with a parity check against the supernet)."""
    from ditnas.supernet.extract import extract_subnet

    manifest = extract_subnet(checkpoint, arch, out, use_ema=ema)
    typer.echo(f"{manifest['arch']}")
    typer.echo(f"params {manifest['params']:,} (supernet {manifest['supernet_params']:,}); "
               f"parity max|err| {manifest['parity_max_abs_error']:.2e}")
    typer.echo(f"wrote {out / 'subnet.pt'} and {out / 'manifest.json'}")


@app.command()
def sample(
    checkpoint: Annotated[Path, typer.Option(help="supernet checkpoint.pt, or a folder written by `ditnas extract`")],
    out: Annotated[Path, typer.Option(help="PNG grid to write")] = Path("samples.png"),
    arch: Annotated[str, typer.Option(help="layout string / max / min (supernet checkpoints only)")] = "max",
    steps: Annotated[int, typer.Option(min=1)] = 28,
    cfg_scale: Annotated[float, typer.Option(help="classifier-free guidance scale (1 = off)")] = 2.0,
    per_class: Annotated[int, typer.Option(min=1)] = 8,
    seed: int = 0,
) -> None:
    """Draw a class-by-class sample grid from a supernet subnet or an extracted model."""
    import torch

    from ditnas.supernet.extract import SUBNET_NAME, load_subnet, read_arch_argument
    from ditnas.supernet.quality import generate, save_grid, velocity_fn
    from ditnas.supernet.train import load_supernet

    if checkpoint.is_dir() or checkpoint.name == SUBNET_NAME:
        model = load_subnet(checkpoint)
        latent, classes, fn = model.arch.latent, model.arch.num_classes, velocity_fn(model)
    else:
        supernet, _, _ = load_supernet(checkpoint)
        chosen = read_arch_argument(arch, supernet)
        latent, classes, fn = chosen.latent, chosen.num_classes, velocity_fn(supernet, chosen)
    labels = torch.arange(max(classes, 1)).repeat_interleave(per_class)
    samples = generate(fn, labels, tuple(latent), steps=steps, cfg_scale=cfg_scale if classes else 1.0,
                       null_label=classes, seed=seed)
    typer.echo(f"wrote {save_grid(samples, out, nrow=per_class)}")


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=False)
    except DitnasError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; rerun the same command to resume from the last checkpoint", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
