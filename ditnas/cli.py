"""`ditnas <verb>`: parse, validate, call one stage function, print where the output went.

User errors (DitnasError) print one line to stderr and exit 2, without a traceback.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from ditnas.console import progress_bar, quiet_third_party, redact_secrets
from ditnas.errors import ConfigFieldError, DitnasError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Hardware-aware architecture search and compression for Diffusion Transformers.")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (sections data/space/model/train/sample/latency/search/sweep)")]


SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override, e.g. --set train.steps=500")]


def load_run_config(config: Path | None, overrides: list[str] | None, flags: dict[str, object]):
    """The run config: defaults, then the YAML, then `--set` overrides, then this command's own flags
    (`{"search.trials": 8, ...}`; None = not given), so every default lives in config.py."""
    import json

    from ditnas.config import load_config

    given = [f"{name}={json.dumps(value)}" for name, value in flags.items() if value is not None]
    return load_config(config, [*(overrides or []), *given])


@contextmanager
def field_flags(flags: dict[str, str]):
    """Name the flag beside the config field in a stage's error (`--budget-ms (search.budget_ms): ...`)."""
    try:
        yield
    except ConfigFieldError as exc:
        raise DitnasError(exc.with_flag(flags.get(exc.field))) from None


@app.command()
def train(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    out: Annotated[Path, typer.Option(help="output folder (checkpoint, run.json, samples)")] = Path("runs/supernet"),
    resume: Annotated[bool, typer.Option(help="continue the checkpoint in --out if there is one")] = True,
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="judge max/min samples (label accuracy, FD)")] = True,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | mps (train.device)")] = None,
    precision: Annotated[Optional[str], typer.Option(help="fp32 | bf16 autocast (train.precision)")] = None,
) -> None:
    """Train the elastic supernet (max + sampled subnets per step, train.sampler; in-place distillation). Under `torchrun --nproc-per-node N`
    the N ranks train data-parallel on shards of the global batch (train.batch_size)."""
    from ditnas.supernet.run import train_run

    flags = {"train.device": device, "train.precision": precision}
    cfg = load_run_config(config, overrides, flags)
    with field_flags({"train.device": "--device", "train.precision": "--precision"}):
        manifest = train_run(cfg, out, resume=resume, progress=progress, evaluate=evaluate)
    if manifest.get("kind") == "ditnas.supernet.rank":  # a torchrun rank other than 0: rank 0 reports
        return
    loss = manifest["val_flow_loss_ema"]
    typer.echo(f"trained {manifest['step']} steps -> {out / manifest['checkpoint']}")
    typer.echo("val flow loss (EMA): " + "  ".join(f"{name} {value:.4f}" for name, value in loss.items()))
    for name, q in manifest.get("quality", {}).items():
        typer.echo(f"{name}: label accuracy {q['label_accuracy']:.3f}  FD {q['fd']:.2f} (real-vs-real floor {q['fd_floor']:.2f})")
    typer.echo(f"manifest {out / 'run.json'}, samples {out / manifest['samples']}")


@app.command()
def graft(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    out: Annotated[Path, typer.Option(help="output folder (grafted.pt, graft.json)")] = Path("runs/graft"),
    teacher: Annotated[Optional[str], typer.Option(help="max (train the max arch alone first) or a supernet checkpoint.pt (graft.teacher)")] = None,
    ops: Annotated[Optional[str], typer.Option(help="comma-separated ops to graft (graft.ops; default every op but the teacher's)")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Start every op of every slot from a trained teacher by per-slot activation distillation (Grafting);
    then train the supernet from it: `ditnas train --set train.init=OUT/grafted.pt`."""
    from ditnas.supernet.graft import graft_supernet

    flags = {"graft.teacher": teacher, "graft.ops": [o.strip() for o in ops.split(",") if o.strip()] if ops else None}
    with field_flags({"graft.teacher": "--teacher", "graft.ops": "--ops"}):
        cfg = load_run_config(config, overrides, flags)
        bar = progress_bar(progress)
        with bar:
            task = bar.add_task("graft", total=None, phase="graft", info="")
            manifest = graft_supernet(cfg, out, progress=lambda i, n, what: bar.update(task, completed=i, total=n, info=what))
    typer.echo(f"teacher {manifest['teacher']} ({manifest['teacher_arch']}) in {manifest['teacher_seconds']:.0f} s; "
               f"grafted {len(manifest['slots'])} slot ops in {manifest['graft_seconds']:.0f} s")
    for row in manifest["slots"]:
        typer.echo(f"  slot {row['slot']} {row['op']:>5}: {row['loss']} to the teacher {row['before']:.4f} -> {row['after']:.4f}")
    typer.echo(f"-> {out / manifest['grafted']}; train from it: ditnas train --set train.init={out / manifest['grafted']}")


@app.command()
def extract(
    arch: Annotated[str, typer.Option(help="layout string, max/mid/min/narrowest, or a file holding one ('#' comments)")],
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
    arch: Annotated[str, typer.Option(help="layout string, max/mid/min/narrowest, or a file holding one (supernet checkpoints only)")] = "max",
    steps: Annotated[int, typer.Option(min=1)] = 28,
    cfg_scale: Annotated[float, typer.Option(help="guidance scale w (1 = off)")] = 2.0,
    per_class: Annotated[int, typer.Option(min=1)] = 8,
    seed: int = 0,
    guidance: Annotated[str, typer.Option(help="cfg (classifier-free) | pdg (Path-Drop Guidance: the unconditional "
                                          "branch skips the middle slots; a model trained with train.path_drop > 0)")] = "cfg",
    pdg_dense: Annotated[Optional[int], typer.Option(help="pdg: slots at each end the unconditional branch keeps; "
                                                     "default the checkpoint's train.token_drop_dense")] = None,
) -> None:
    """Draw a class-by-class sample grid from a supernet subnet or an extracted model."""
    import torch

    from ditnas.arch import resolve_arch
    from ditnas.supernet.extract import SUBNET_NAME, load_subnet
    from ditnas.supernet.flow import SAMPLER_GUIDANCE
    from ditnas.supernet.quality import generate, save_grid, velocity_fn
    from ditnas.supernet.token_drop import dense_only_fn
    from ditnas.supernet.train import load_supernet

    if checkpoint.is_dir() or checkpoint.name == SUBNET_NAME:
        model = load_subnet(checkpoint)
        latent, classes, fn = model.arch.latent, model.arch.num_classes, velocity_fn(model)
        dense = pdg_dense if pdg_dense is not None else 1  # assumption: a subnet file does not say; the field's default
        uncond, depth = dense_only_fn(model, dense), len(model.arch.slots)
    else:
        supernet, run_cfg, _ = load_supernet(checkpoint)
        chosen = resolve_arch(supernet.space, arch)
        latent, classes, fn = chosen.latent, chosen.num_classes, velocity_fn(supernet, chosen)
        dense = pdg_dense if pdg_dense is not None else run_cfg.train.token_drop_dense
        uncond, depth = dense_only_fn(supernet, dense, chosen), len(chosen.slots)
    if guidance not in SAMPLER_GUIDANCE:
        raise DitnasError(f"--guidance {guidance!r} unknown; choose one of {', '.join(SAMPLER_GUIDANCE)}")
    if guidance == "pdg":
        from ditnas.supernet.token_drop import check_pdg_dense

        check_pdg_dense(dense, depth, "--pdg-dense")
    labels = torch.arange(max(classes, 1)).repeat_interleave(per_class)
    samples = generate(fn, labels, tuple(latent), steps=steps, cfg_scale=cfg_scale if classes else 1.0,
                       null_label=classes, seed=seed, guidance=guidance, uncond_fn=uncond)
    typer.echo(f"wrote {save_grid(samples, out, nrow=per_class)}")


profile_app = typer.Typer(no_args_is_help=False, help="Device profiling sessions: measure a search space, ingest phone artifacts.")
app.add_typer(profile_app, name="profile")


PROFILE_FLAGS = {"latency.backend": "--backend", "latency.models": "--models", "latency.warmup": "--warmup",
                 "latency.iters": "--iters", "latency.threads": "--threads", "latency.seed": "--seed"}


@profile_app.callback(invoke_without_command=True)
def profile(
    ctx: typer.Context,
    backend: Annotated[Optional[str], typer.Option(help="host-torch | executorch-xnnpack | android-adb | ios | coreml (latency.backend)")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "--space", "-c", help="run config YAML: its space/model sections define what to profile, its latency section how")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="profile a trained supernet instead of a fresh one")] = None,
    out: Annotated[Optional[Path], typer.Option(help="session folder (rerun to resume)")] = None,
    overrides: SetOpt = None,
    models: Annotated[Optional[int], typer.Option(help="whole-model programs to measure (calibration rows; latency.models)")] = None,
    warmup: Annotated[Optional[int], typer.Option(help="untimed runs per program (latency.warmup)")] = None,
    iters: Annotated[Optional[int], typer.Option(help="timed runs per program, interleaved across programs (latency.iters)")] = None,
    threads: Annotated[Optional[int], typer.Option(help="fixed thread count for every measurement (latency.threads)")] = None,
    seed: Annotated[Optional[int], typer.Option(help="which random archs become whole-model programs (latency.seed)")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Measure every cell of a search space (and whole models) on one backend into a session folder."""
    if ctx.invoked_subcommand is not None:
        return
    if out is None:
        raise DitnasError("ditnas profile needs --out (and --config CONFIG or --checkpoint); see --help")
    from ditnas.latency_models.profile import profile_space, supernet_for_profiling

    flags = {"latency.backend": backend, "latency.models": models, "latency.warmup": warmup, "latency.iters": iters,
             "latency.threads": threads, "latency.seed": seed}
    with field_flags(PROFILE_FLAGS):
        cfg = load_run_config(config, overrides, flags)
        supernet = supernet_for_profiling(cfg, checkpoint)
        bar = progress_bar(progress)
        with bar:
            task = bar.add_task("profile", total=None, phase="profile", info="")
            session = profile_space(supernet, cfg.latency, out, cfg_scale=cfg.sample.cfg_scale,
                                    progress=lambda i, n, key: bar.update(task, completed=i, total=n, info=key))
    from ditnas.latency_models.stage import build_table

    table, predictor = build_table(session, supernet)
    summary = session.summary()
    uncertain = summary[summary["p50_rel_se"] > 0.03]
    typer.echo(f"session {out}: {len(summary)} programs measured on {session.device.get('device_model')} "
               f"({session.device.get('backend')}, {session.device.get('threads')} thread(s))")
    typer.echo(table.coverage_summary(supernet.space))
    typer.echo(f"table + predictor in {table.root} (calibration: {predictor.calibration.method})")
    for guidance, fit in predictor.generation.fits.items():
        typer.echo(f"generations ({guidance}): {fit.n} timed, fit {fit.method}, median in-sample error "
                   f"{fit.in_sample_median_abs_err_pct:.1f}%" if fit.n else f"generations ({guidance}): none timed")
    if len(uncertain):
        typer.echo(f"{len(uncertain)} program(s) have a p50 uncertain by more than 3% (standard error); profile into a "
                   f"new --out with more --iters: {', '.join(uncertain['key'][:5])}")
    drift = session.drift_since_last_pass()
    if drift is not None and abs(drift - 1) > 0.05:
        typer.echo(f"note: programs re-timed in this pass run {drift:.2f}x their previous times (machine speed changed); "
                   "every row of the table is from this pass")


@profile_app.command("ingest")
def profile_ingest(
    artifacts: Annotated[list[Path], typer.Argument(help="minibench JSON, xcodebuild logs, ETDumps (.etdp), Core ML benchmark JSON")],
    session: Annotated[Path, typer.Option(help="session folder to add the samples to (created from the files' device info if new)")],
    threads: Annotated[int, typer.Option(min=1, help="thread count the phone ran with (phone apps do not record it)")] = 1,
    etdump_warmup: Annotated[Optional[int], typer.Option(help="leading runs to drop from ETDumps without a sidecar")] = None,
    replace: Annotated[bool, typer.Option(help="replace programs the session already holds")] = False,
) -> None:
    """Add the measurements a phone wrote (artifacts) to a profiling session."""
    from ditnas.latency_models.ingest import ingest, session_for_artifacts

    target = session_for_artifacts(session, artifacts, threads=threads)
    report = ingest(artifacts, target, etdump_warmup=etdump_warmup, replace=replace)
    typer.echo(f"session {session}: added {len(report.added)} program(s) from {len(artifacts)} file(s); "
               f"skipped {len(report.skipped)} already measured; replaced {len(report.replaced)}")


latency_app = typer.Typer(no_args_is_help=True, help="Latency tables: predict, validate, show, re-measure.")
app.add_typer(latency_app, name="latency")
TableOpt = Annotated[Path, typer.Option(help="table folder, or the session folder holding table/")]


@latency_app.command("predict")
def latency_predict(
    arch: Annotated[str, typer.Option(help="layout string, max/mid/min/narrowest, or a file holding one ('#' comments)")],
    table: TableOpt,
    steps: Annotated[Optional[int], typer.Option(min=1, help="denoising steps of the generation (default: the arch's, 28)")] = None,
    detail: Annotated[bool, typer.Option(help="print the per-cell breakdown")] = True,
) -> None:
    """Per-step and total latency of one arch on the table's device (labelled: measured/interpolated/regressed)."""
    from ditnas.arch import resolve_arch
    from ditnas.latency_models.generation_latency import GUIDANCE
    from ditnas.latency_models.stage import load_predictor, table_space

    tbl, predictor = load_predictor(table)
    chosen = resolve_arch(table_space(tbl), arch)
    per_step = predictor.predict(chosen)
    low, mid, high = (predictor.predict_range(chosen)[k] for k in ("p10", "p50", "p90"))
    ident = tbl.identity
    typer.echo(f"{chosen}")
    typer.echo(f"device {ident.get('device_model')} / {ident.get('backend')} / {ident.get('threads')} thread(s)")
    table_sum = predictor.predict(chosen, calibrated=False)
    typer.echo(f"per step (one batch-1 call, no guidance): {per_step:.3f} ms calibrated ({predictor.calibration.method}); "
               f"table sum {table_sum:.3f} ms (p10..p90 band {low:.3f}..{high:.3f}, p50 {mid:.3f})")
    for guidance in GUIDANCE:
        try:
            total = predictor.predict_generation(chosen, steps or chosen.steps, guidance)
        except DitnasError as exc:
            typer.echo(f"generation ({guidance}): not priced -- {exc}")
            continue
        typer.echo(f"generation ({guidance}): {total:.2f} ms = {predictor.generation.definition(guidance, steps or chosen.steps)}")
    if detail:
        frame = predictor.predict_detail(chosen)
        typer.echo(frame[["key", "p50", "source"]].to_string(index=False))


@latency_app.command("validate")
def latency_validate(
    table: TableOpt,
    n: Annotated[int, typer.Option(min=1, help="held-out whole-model archs")] = 30,
    seed: int = 0,
) -> None:
    """Share of held-out archs predicted within ±10% of measured, and the median |error|."""
    from ditnas.latency_models.stage import validate_table

    result = validate_table(table, n, seed)
    typer.echo(f"held-out archs: {result['n']}  within ±10%: {result['within_10pct']:.2f} "
               f"(uncalibrated {result['within_10pct_uncalibrated']:.2f})  median |err|: {result['median_abs_err_pct']:.2f}% "
               f"(uncalibrated {result['median_abs_err_pct_uncalibrated']:.2f}%)  calibration: {result['calibration']}")


@latency_app.command("show")
def latency_show(table: TableOpt) -> None:
    """What a table holds: device, coverage of its space, calibration, p50 per op and width."""
    from ditnas.latency_models.stage import load_predictor

    tbl, predictor = load_predictor(table)
    typer.echo(tbl.describe())
    if tbl.space is not None:
        typer.echo(tbl.coverage_summary(tbl.space))
    typer.echo(f"calibration: {predictor.calibration.method} — {predictor.calibration.note}")
    blocks = tbl.cell_rows()
    blocks = blocks[blocks["kind"] == "block"]
    if len(blocks):
        pivot = blocks.pivot_table(index=["op", "stage"], columns="width", values="p50", aggfunc="median")
        typer.echo("block p50 ms (median over MLP ratios), rows op/stage, columns width:")
        typer.echo(pivot.round(4).to_string())


@latency_app.command("remeasure")
def latency_remeasure(
    session: Annotated[Path, typer.Option(help="the session folder to measure into (its device settings are reused)")],
    archs: Annotated[list[str], typer.Option("--arch", help="layout string, max/mid/min/narrowest, or a file with one per line ('#' comments)")],
    config: Annotated[Optional[Path], typer.Option("--config", "--space", "-c", help="run config of the supernet (or --checkpoint)")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option()] = None,
    overrides: SetOpt = None,
    replace: Annotated[bool, typer.Option(help="rebuild <session>/table in place instead of keeping the old one as table.v<N>")] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Closed loop: measure given archs (e.g. a search's winners) as whole models, rebuild, refit.
    On local backends the session's other programs are re-timed in the same pass. Prints the old
    table's prediction beside each measurement; the old table stays as table.v<N> unless --replace."""
    from ditnas.arch import resolve_archs
    from ditnas.latency_models.profile import supernet_for_profiling
    from ditnas.latency_models.stage import remeasure_archs

    supernet = supernet_for_profiling(load_run_config(config, overrides, {}), checkpoint)
    chosen = [arch for item in archs for arch in resolve_archs(supernet.space, item)]
    bar = progress_bar(progress)
    with bar:
        task = bar.add_task("remeasure", total=None, phase="remeasure", info="")
        done = remeasure_archs(session, chosen, supernet, replace=replace,
                               progress=lambda i, n, key: bar.update(task, completed=i, total=n, info=key))
    device = done.table.identity
    typer.echo(f"per step (batch 1, no guidance) on {device.get('device_model')} / {device.get('backend')} / "
               f"{device.get('threads')} thread(s): predicted by the previous table vs measured now")
    for row in done.rows:
        pred = "-" if row["predicted_ms"] is None else f"{row['predicted_ms']:.3f} ms"
        meas = "-" if row["measured_ms"] is None else f"{row['measured_ms']:.3f} ms"
        err = "" if row["err_pct"] is None else f"  ({row['err_pct']:+.1f}%)"
        typer.echo(f"  {row['arch']}: predicted {pred}, measured {meas}{err}")
    typer.echo(f"table now has {len(done.table.model_rows())} whole-model rows; calibration: {done.predictor.calibration.method}")
    typer.echo(f"previous table kept as {done.kept}" if done.kept else f"table rebuilt in place in {done.table.root}")


SEARCH_FLAGS = {"search.budget_ms": "--budget-ms", "search.steps": "--steps", "search.trials": "--trials",
                "search.storage": "--storage", "search.sampler": "--sampler", "search.dp_seeds": "--seeds",
                "search.memory_mb": "--memory-mb", "search.seed": "--seed", "search.quality": "--quality",
                "search.quality_steps": "--quality-steps", "search.guidance": "--guidance", "search.threads": "--threads",
                "search.fidelity_archs": "--fidelity", "search.rerank_top": "--rerank-top",
                "search.stream_chunk": "--stream-chunk", "search.target_fps": "--target-fps"}
SWEEP_FLAGS = {**{k: v for k, v in SEARCH_FLAGS.items() if not k.startswith(("search.guidance", "search.threads", "search.stream", "search.target"))},  # set by --set in a sweep
               "sweep.budgets_ms": "--budgets", "sweep.ray_address": "--ray-address",
               "sweep.max_in_flight": "--max-in-flight", "sweep.retries": "--retries"}


@app.command()
def search(
    checkpoint: Annotated[Path, typer.Option(help="trained supernet checkpoint.pt")],
    table: Annotated[Path, typer.Option(help="latency table folder (or the session folder holding table/)")],
    budget_ms: Annotated[Optional[float], typer.Option(help="latency budget of ONE WHOLE generation (all steps, with --guidance), ms (search.budget_ms)")] = None,
    guidance: Annotated[Optional[str], typer.Option(help="sampler priced: none (one batch-1 call per step) | cfg (one batch-2 call per step, as `ditnas sample` runs) | pdg (the full + the dense-only net per step, `ditnas sample --guidance pdg`; search.pdg_dense) (search.guidance, default none)")] = None,
    threads: Annotated[Optional[int], typer.Option(help="thread count the budget is for; refused unless the table was measured at it (search.threads)")] = None,
    steps: Annotated[Optional[list[int]], typer.Option(help="denoising steps; repeat for a set, a joint dimension (search.steps, default 28)")] = None,
    trials: Annotated[Optional[int], typer.Option(help="Optuna trials added by this call (search.trials, default 64)")] = None,
    out: Annotated[Path, typer.Option(help="results folder (rerun continues the study)")] = Path("runs/search"),
    storage: Annotated[Optional[str], typer.Option(help="Optuna storage URL, e.g. postgresql://user@host:5432/db (search.storage; default: a journal file in --out)")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="nsga2 | tpe | gp (search.sampler)")] = None,
    seeds: Annotated[Optional[int], typer.Option(help="DP layouts enqueued as the first trials (search.dp_seeds, default 16)")] = None,
    memory_mb: Annotated[Optional[float], typer.Option(help="peak-memory limit (constraint), MB (search.memory_mb)")] = None,
    seed: Annotated[Optional[int], typer.Option(help="sampler seed (search.seed)")] = None,
    quality: Annotated[Optional[str], typer.Option(help="quality signal: supernet | proxy (trained from scratch) | finetune (extracted + fine-tuned) (search.quality, default supernet)")] = None,
    quality_steps: Annotated[Optional[int], typer.Option(help="training steps per arch of the proxy / finetune signal (search.quality_steps, default 200)")] = None,
    fidelity: Annotated[Optional[int], typer.Option(help="train this many of the search's archs standalone and report how the quality signal ranks them (search.fidelity_archs; 0 = off, each costs a training run)")] = None,
    rerank_top: Annotated[Optional[int], typer.Option(help="train the best N feasible archs in successive-halving rungs (search.rerank_steps) and pick by the trained loss (search.rerank_top; 0 = pick by the signal)")] = None,
    stream_chunk: Annotated[Optional[int], typer.Option(help="clips: price ONE STREAMED CLIP, this many latent frames per chunk, one --steps value per chunk; needs a table profiled with latency.stream_chunk (search.stream_chunk)")] = None,
    target_fps: Annotated[Optional[float], typer.Option(help="streaming budget in latent frames per second (budget = frames / FPS); with --stream-chunk, instead of --budget-ms (search.target_fps)")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Search layouts under a latency budget: exact DP seeds, then Optuna multi-objective (latency, quality)."""
    from ditnas.latency_models.stage import table_dir
    from ditnas.search.stage import run_search

    flags = {"search.budget_ms": budget_ms, "search.steps": steps or None, "search.trials": trials,
             "search.storage": storage, "search.sampler": sampler, "search.dp_seeds": seeds,
             "search.memory_mb": memory_mb, "search.seed": seed, "search.quality": quality,
             "search.quality_steps": quality_steps, "search.guidance": guidance, "search.threads": threads,
             "search.fidelity_archs": fidelity, "search.rerank_top": rerank_top,
             "search.stream_chunk": stream_chunk, "search.target_fps": target_fps}
    with field_flags(SEARCH_FLAGS):
        cfg = load_run_config(config, overrides, flags).search
        bar = progress_bar(progress)
        with bar:
            task = bar.add_task("search", total=None, phase="search", info="")
            manifest = run_search(
                cfg, checkpoint, table_dir(table), out,
                progress=lambda phase, done, total, what: bar.update(task, completed=done, total=total, phase=phase, info=what),
            )
    best = manifest.get("best") or {}
    typer.echo(f"latency = {manifest['latency_definition']}")
    typer.echo(f"{manifest['trials_total']} trials in the study ({manifest['trials_feasible']} feasible); feasible Pareto front: {manifest['pareto_size']} arch(s)")
    if best:
        typer.echo(f"best feasible: {best.get('arch')}  quality {best.get('quality'):.4f}  latency {best.get('latency_ms'):.2f} ms"
                   f"  (picked by {manifest.get('best_by', 'signal')})")
    rr = manifest.get("rerank")
    if rr:
        typer.echo(f"rerank of the top {len(rr['candidates'])}: {rr['signal']} loss {rr['pick_loss']:.4f} after "
                   f"{rr['pick_steps']} steps; " + ("changed the signal's pick " + rr["signal_pick"] if rr["changed_pick"]
                                                    else "kept the signal's pick"))
    fid = manifest.get("fidelity")
    if fid:
        typer.echo(f"signal vs standalone ({fid['archs']} archs, {fid['standalone_steps']} steps each): Kendall tau "
                   f"{fid['kendall_tau']:.2f}, Spearman rho {fid['spearman_rho']:.2f}; the signal's favourite is "
                   f"{fid['signal_best_gap_pct']:.1f}% worse than their best")
    typer.echo(f"results in {out} (trials.csv, pareto.csv, manifest.json); dashboard: {manifest.get('dashboard')}")


def _numbers(text: str | None, kind: type, flag: str) -> list | None:
    if text is None:
        return None
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DitnasError(f"{flag} {text!r} must be comma-separated numbers, e.g. 8,12,16") from None


@app.command()
def sweep(
    checkpoint: Annotated[Path, typer.Option(help="trained supernet checkpoint.pt")],
    tables: Annotated[str, typer.Option(help="comma-separated latency table folders (one per device)")],
    budgets: Annotated[Optional[str], typer.Option(help="comma-separated total latency budgets, ms, e.g. 8,12,16 (sweep.budgets_ms)")] = None,
    trials: Annotated[Optional[int], typer.Option(help="finished trials per (budget, table) study (search.trials, default 64)")] = None,
    steps: Annotated[Optional[str], typer.Option(help="denoising steps, comma-separated for a set (search.steps, default 28)")] = None,
    out: Annotated[Path, typer.Option(help="sweep results folder (rerun tops studies up)")] = Path("runs/sweep"),
    storage: Annotated[Optional[str], typer.Option(help="Optuna storage URL (search.storage; default: out/sweep.journal)")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="nsga2 | tpe | gp (search.sampler)")] = None,
    ray_address: Annotated[Optional[str], typer.Option(envvar="RAY_ADDRESS", help="attach to a running cluster (ray start --head ...); default: a local one (sweep.ray_address)")] = None,
    max_in_flight: Annotated[Optional[int], typer.Option(help="evaluations running at once (sweep.max_in_flight)")] = None,
    retries: Annotated[Optional[int], typer.Option(help="retries of a task whose worker died (sweep.retries, default 2)")] = None,
    seeds: Annotated[Optional[int], typer.Option(help="DP layouts enqueued first in each study (search.dp_seeds, default 16)")] = None,
    seed: Annotated[Optional[int], typer.Option(help="sampler seed (search.seed)")] = None,
    quality: Annotated[Optional[str], typer.Option(help="quality signal: supernet | proxy | finetune, trained on the workers (search.quality)")] = None,
    quality_steps: Annotated[Optional[int], typer.Option(help="training steps per arch of the proxy / finetune signal (search.quality_steps)")] = None,
    fidelity: Annotated[Optional[int], typer.Option(help="per study, train this many of its archs standalone and report how the signal ranks them (search.fidelity_archs)")] = None,
    rerank_top: Annotated[Optional[int], typer.Option(help="per study, train the best N feasible archs in successive-halving rungs and pick by the trained loss (search.rerank_top)")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Fan (budget x device table) searches out over a Ray cluster; one Optuna study per pair, each
    checked and seeded with exact-DP layouts under its budget as `ditnas search` does (and reranked / checked
    for fidelity on the driver afterwards when asked)."""
    from ditnas.latency_models.stage import table_dir
    from ditnas.search.sweep import sweep as run_sweep

    flags = {"sweep.budgets_ms": _numbers(budgets, float, "--budgets"), "search.trials": trials,
             "search.steps": _numbers(steps, int, "--steps"), "search.storage": storage, "search.sampler": sampler,
             "sweep.ray_address": ray_address, "sweep.max_in_flight": max_in_flight, "sweep.retries": retries,
             "search.dp_seeds": seeds, "search.seed": seed, "search.quality": quality,
             "search.quality_steps": quality_steps, "search.fidelity_archs": fidelity, "search.rerank_top": rerank_top}
    table_list = [table_dir(Path(t.strip())) for t in tables.split(",") if t.strip()]
    with field_flags(SWEEP_FLAGS):
        cfg = load_run_config(config, overrides, flags)
        total = len(cfg.sweep.budgets_ms) * len(table_list) * cfg.search.trials
        bar = progress_bar(progress)
        with bar:
            task = bar.add_task("sweep", total=total, phase="sweep", info="")
            after: dict[str, int] = {}  # phase -> bar task

            def after_search(phase: str, done: int, n: int, what: str) -> None:  # rerank / fidelity per study
                if phase not in after:
                    after[phase] = bar.add_task(phase, total=n, phase=phase, info="")
                bar.update(after[phase], completed=done, total=n, info=what)

            manifest = run_sweep(
                cfg.search, cfg.sweep, checkpoint, table_list, out,
                on_result=lambda label, number, result: bar.update(task, advance=1, info=f"{label} #{number}"),
                progress=after_search,
            )
    typer.echo(f"sweep of {len(manifest.get('studies', []))} studies -> {out / 'sweep.json'}, combined front {out / 'front.csv'}")


# ----- stage 4: compression and export ----------------------------------------------------------
def _loss_bar(progress: bool, phase: str, total: int | None):
    bar = progress_bar(progress)
    task = bar.add_task(phase, total=total, phase=phase, info="")

    def update(done: int, n: int, record: dict) -> None:
        losses = "  ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float) and k != "seconds")
        bar.update(task, completed=done, total=n, info=losses)
    return bar, update


PRUNE_FLAGS = {"compress.prune.budget_ms": "--budget-ms", "compress.prune.memory_mb": "--memory-mb",
               "compress.prune.units": "--units"}


@app.command()
def prune(
    subnet: Annotated[Path, typer.Option(help="subnet folder written by `ditnas extract` (or a KD/prune output)")],
    out: Annotated[Path, typer.Option(help="output folder for the pruned subnet.pt + manifest.json")],
    table: Annotated[Optional[Path], typer.Option(help="latency table the budget is priced on (session or table folder)")] = None,
    budget_ms: Annotated[Optional[float], typer.Option(help="per-step latency budget on --table, ms (compress.prune.budget_ms)")] = None,
    memory_mb: Annotated[Optional[float], typer.Option(help="parameter-memory budget, MB (compress.prune.memory_mb)")] = None,
    units: Annotated[Optional[str], typer.Option(help="comma-separated unit kinds: blocks,heads,channels (compress.prune.units)")] = None,
    measure: Annotated[bool, typer.Option(help="measure the pruned model on this host's XNNPACK runtime")] = False,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Tri-level structured pruning (blocks, heads, FFN channel groups) to a latency/memory budget, with KD recovery."""
    from ditnas.compress.prune import prune_subnet
    from ditnas.latency_models.stage import table_dir

    flags = {"compress.prune.budget_ms": budget_ms, "compress.prune.memory_mb": memory_mb,
             "compress.prune.units": units.split(",") if units else None}
    with field_flags(PRUNE_FLAGS):
        cfg = load_run_config(config, overrides, flags)
        manifest = prune_subnet(cfg.compress.prune, cfg.compress.kd, subnet, table_dir(table) if table else None, out,
                                data_cfg=cfg.data, progress=typer.echo, measure=measure)
    metrics = manifest.get("metrics", {})
    typer.echo(f"pruned: {manifest.get('arch', '')}")
    typer.echo("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                         if isinstance(v, (int, float))))
    typer.echo(f"wrote {out / 'subnet.pt'} and {out / 'manifest.json'}")


DISTILL_FLAGS = {"compress.distill.method": "--method", "compress.distill.steps": "--steps", "compress.kd.steps": "--steps"}


@app.command()
def distill(
    teacher: Annotated[Path, typer.Option(help="teacher subnet folder (e.g. the extracted max net)")],
    student: Annotated[Path, typer.Option(help="student subnet folder (extracted, pruned or KD-trained)")],
    out: Annotated[Path, typer.Option(help="output folder (rerun resumes from its checkpoint)")],
    method: Annotated[Optional[str], typer.Option(help="kd | kdmd | adversarial (compress.distill.method, default kdmd)")] = None,
    steps: Annotated[Optional[int], typer.Option(help="training steps (compress.kd.steps or compress.distill.steps)")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar with the losses")] = True,
) -> None:
    """Distil a student from a teacher: KD (same steps), or K-DMD / adversarial to a few-step student."""
    with field_flags(DISTILL_FLAGS):
        base = load_run_config(config, overrides, {"compress.distill.method": method})
        kd = base.compress.distill.method == "kd"
        cfg = load_run_config(config, overrides, {"compress.distill.method": method,
                                                  ("compress.kd.steps" if kd else "compress.distill.steps"): steps})
        bar, update = _loss_bar(progress, cfg.compress.distill.method, None)
        with bar:
            if kd:
                from ditnas.compress.kd import distill_kd

                manifest = distill_kd(cfg.compress.kd, teacher, student, out, data_cfg=cfg.data, progress=update)
            else:
                from ditnas.compress.distill import distill_steps

                manifest = distill_steps(cfg.compress.distill, teacher, student, out, data_cfg=cfg.data, progress=update)
    metrics = manifest.get("metrics", {})
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    typer.echo(f"{cfg.compress.distill.method}: " + "  ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    typer.echo(f"wrote {out / 'subnet.pt'} and {out / 'manifest.json'}")


EXPORT_FLAGS = {"compress.export.backend": "--backend", "compress.export.dtype": "--dtype",
                "compress.export.steps": "--steps", "compress.export.cfg_scale": "--cfg-scale",
                "compress.export.sampler": "--sampler", "compress.export.guidance": "--guidance"}


@app.command()
def export(
    subnet: Annotated[Path, typer.Option(help="subnet folder to ship (extracted, pruned or distilled)")],
    out: Annotated[Path, typer.Option(help="output folder for <name>_<backend>_<dtype>.pte (or .mlpackage) + manifest.json")],
    backend: Annotated[Optional[str], typer.Option(help="xnnpack | coreml | mlpackage (compress.export.backend)")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="fp32 | fp16 (compress.export.dtype)")] = None,
    steps: Annotated[Optional[int], typer.Option(help="denoising steps of the shipped sampler (compress.export.steps)")] = None,
    cfg_scale: Annotated[Optional[float], typer.Option(help="guidance baked into the denoiser; 0 = none (compress.export.cfg_scale)")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="host-loop | unrolled | fastest: ship the faster of the two, timed here "
                                                       "(compress.export.sampler)")] = None,
    guidance: Annotated[Optional[str], typer.Option(help="cfg | pdg: where a guided denoiser's unconditional velocity "
                                                        "comes from (compress.export.guidance; pdg: compress.export.pdg_dense)")] = None,
    name: Annotated[Optional[str], typer.Option(help="file name stem (default dit_<arch key>)")] = None,
    measure: Annotated[bool, typer.Option(help="time eager vs .pte (one call and one whole generation) after export")] = True,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Export a subnet for a phone: ExecuTorch .pte (XNNPACK / Core ML) or a Core ML .mlpackage, lowered with the recipe the tables were priced with."""
    from ditnas.compress.export import export_subnet

    flags = {"compress.export.backend": backend, "compress.export.dtype": dtype, "compress.export.steps": steps,
             "compress.export.cfg_scale": cfg_scale, "compress.export.sampler": sampler, "compress.export.guidance": guidance}
    with field_flags(EXPORT_FLAGS):
        cfg = load_run_config(config, overrides, flags)
        manifest = export_subnet(cfg.compress.export, subnet, out, name=name, measure=measure)
    metrics = manifest.get("metrics", {})
    typer.echo(f"{manifest.get('arch')}")
    if "delegated_share" in metrics:
        typer.echo(f"delegated share {metrics['delegated_share']:.3f}; non-delegated compute ops: "
                   f"{metrics.get('delegation', {}).get('non_delegated_compute_ops') or 'none'}")
    parity = metrics.get("parity") or {}
    if parity.get("checked", True) and "generation_rel_error" in parity:
        typer.echo(f"parity vs eager: step {parity['max_step_rel_error']:.2e}, whole generation {parity['generation_rel_error']:.2e} (relative)")
    timing = metrics.get("timing") or {}
    if timing.get("pte_speedup_vs_eager") is not None:
        typer.echo(f"{timing.get('steps', cfg.compress.export.steps)}-step generation: .pte {timing.get('pte_generation_ms', float('nan')):.2f} ms, "
                   f"eager {timing.get('eager_generation_ms', float('nan')):.2f} ms ({timing['pte_speedup_vs_eager']:.2f}x)")
    choice = metrics.get("sampler") or {}
    if choice:
        typer.echo(f"shipped sampler: {choice['shipped']} ({choice['why']})")
    typer.echo(f"wrote {out / manifest['artifact']} and {out / 'manifest.json'}")


@app.command()
def generate(
    pte: Annotated[Path, typer.Option(help="a .pte written by `ditnas export`")],
    out: Annotated[Path, typer.Option(help="PNG grid to write")] = Path("grid.png"),
    label: Annotated[int, typer.Option(help="class to generate")] = 0,
    n: Annotated[int, typer.Option(min=1, help="images")] = 16,
    steps: Annotated[Optional[int], typer.Option(min=1, help="denoising steps (default: the export's)")] = None,
    seed: int = 0,
    threads: Annotated[int, typer.Option(min=1, help="ExecuTorch runtime threads")] = 1,
    table: Annotated[Optional[Path], typer.Option(help="latency table to print the predicted generation time from")] = None,
) -> None:
    """Run an exported few-step model on this host's ExecuTorch runtime: samples + measured vs predicted time."""
    from ditnas.compress.export import generate_from_pte
    from ditnas.supernet.quality import save_grid

    images, timing = generate_from_pte(pte, label=label, n=n, steps=steps, seed=seed, threads=threads)
    grid = save_grid(images, out, nrow=min(n, 8))
    typer.echo(f"wrote {grid}: {n} image(s) of class {label}")
    line = (f"measured: {timing['median_ms']:.2f} ms per image ({timing['steps']} steps, {threads} thread(s), "
            f"median of {n}, on the ExecuTorch runtime)")
    if table is not None:
        from ditnas.compress.export import _export_meta
        from ditnas.latency_models.stage import load_predictor, table_dir

        tbl, predictor = load_predictor(table_dir(table))
        gen = _export_meta(pte)
        try:
            arch = tbl.space.parse(gen["arch"], source=str(pte))
            guidance = "cfg" if gen.get("guided") else "none"
            predicted = predictor.predict_generation(arch, timing["steps"], guidance)
            line += f"; predicted {predicted:.2f} ms on {tbl.describe()}"
        except (DitnasError, KeyError):
            # a pruned model's per-block heads/hidden lie outside the table's space (prune.StatePricer prices those)
            line += f"; not predicted: its arch is outside the space of {tbl.describe()}"
    typer.echo(line)


DEFAULT_RUN_CONFIG = Path(__file__).parent / "configs" / "default.yaml"  # shipped as package data


@app.command("run")
def run_all(
    out: Annotated[Path, typer.Option(help="run folder (rerun continues from the last finished stage)")] = Path("runs/main"),
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    stop_after: Annotated[Optional[str], typer.Option(help="stop after this stage (train, profile, search, extract, prune, kd, distill, export)")] = None,
    progress: Annotated[bool, typer.Option(help="show progress")] = True,
) -> None:
    """The main job: train -> profile -> search -> extract -> prune -> KD -> distill -> export -> report.
    Without --config it runs the quick default, ditnas/configs/default.yaml."""
    from ditnas.pipeline import run_pipeline

    cfg = load_run_config(config or DEFAULT_RUN_CONFIG, overrides, {})
    manifest = run_pipeline(cfg, out, progress=progress, log=typer.echo, stop_after=stop_after)
    for name, rec in manifest.get("stages", {}).items():
        typer.echo(f"  {name:<8} {rec.get('status', ''):<8} {rec.get('wall_s', 0):8.1f} s")
    html = manifest.get("stages", {}).get("report", {}).get("outputs", {}).get("html")
    typer.echo(f"run manifest {out / 'run.json'}" + (f", report {html}" if html else ""))


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a folder written by `ditnas run`")],
    check: Annotated[bool, typer.Option("--check/--no-check", help="then open it in headless Chromium: every image "
                                        "loads, no console errors; skipped when no browser is installed")] = True,
) -> None:
    """(Re)write the run's self-contained HTML report from its artifacts."""
    from ditnas.reports.report import write_report

    path = write_report(run_dir)
    typer.echo(f"wrote {path}")
    if check:
        from ditnas.reports.render_check import BrowserMissing, check_render

        try:
            result = check_render(path, path.with_name("report_screenshot.png"))
        except BrowserMissing as exc:  # the report is written; only its check needs the browser
            typer.echo(f"render check skipped: {exc}")
            return
        typer.echo(f"render check: {result.summary()}")
        if not result.ok:
            raise DitnasError(f"{path} does not render cleanly: {len(result.broken_images)} broken image(s) "
                              f"{list(result.broken_images)[:3]}, console errors {list(result.console_errors)[:3]}; "
                              "open it in a browser to see where (the run's artifacts are unchanged)")


def main(argv: list[str] | None = None) -> None:
    quiet_third_party()
    try:
        code = app(args=argv, standalone_mode=False)
        # typer turns Ctrl-C into Exit(130) and, not standalone, *returns* that code: without this a
        # Ctrl-C ended any verb silently with exit status 0
        if code == 130:
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except DitnasError as exc:
        typer.echo(redact_secrets(f"error: {exc}"), err=True)
        sys.exit(2)
    except OSError as exc:  # the disk refused (full, read-only, no permission) outside an atomic write
        where = f" {exc.filename}" if exc.filename else ""
        typer.echo(redact_secrets(f"error: cannot access{where} ({exc.strerror or type(exc).__name__}); free space "
                                  "or choose a writable folder, then rerun the same command"), err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; rerun the same command to resume from the last checkpoint", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        # usage errors (missing or unknown option, a value of the wrong type) arrive here in
        # non-standalone mode: click's ClickException, or typer >= 0.2x's vendored copy of it, which
        # `click.ClickException` does not match; both can show themselves and carry an exit code
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            import io

            shown = io.StringIO()  # click echoes the offending argument: a storage URL's password with it
            exc.show(file=shown)
            sys.stderr.write(redact_secrets(shown.getvalue()))
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
