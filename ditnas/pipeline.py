"""`ditnas run`: every stage chained through its artifacts in one run folder, resumable.

    train -> profile -> search -> extract -> prune (only if the budget is not met) -> kd -> distill
          -> export -> report;  quality (judge + the max net's FD) runs in the background from the end
          of profile and is recorded before distill, which reuses its judge

Each stage is one call of its entry function (the same the single verbs call) writing into
`<run>/<stage>/`. `<run>/run.json` records per stage: status (done | skipped), the fingerprint of its
inputs (the config sections it reads + the hashes of the upstream artifacts it consumes), wall time,
metrics and outputs. Rerunning continues from the first stage that is not done; a done stage whose
fingerprint changed (a config field, a changed upstream artifact) is redone with every stage after
it (their inputs hold the upstream hashes and fingerprints), and run.json says why (`redone_because`). The manifest is written after every stage, atomically,
so an interrupted run loses at most the stage it was in (and that stage resumes from its own
checkpoints where it has them: train, kd, distill). A done stage whose recorded output is gone or no
longer matches its hash (`damaged_outputs`) is redone too: its folder is moved to
`<stage>.damaged-<time>` and the stage runs again; later stages are redone only if the new artifact
differs. A run folder another torch / executorch / optuna / ditnas wrote is refused, naming the versions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ditnas.config import RunConfig, dump_config
from ditnas.errors import DitnasError
from ditnas.io import file_sha256, read_json, versions, write_json

RUN_MANIFEST = "run.json"
# quality: the judge and the max net's FD / label accuracy, computed in a background process from the end of
# the profile stage on (supernet/background_quality.py); recorded when the distillation needs its judge
STAGES = ("train", "profile", "search", "extract", "prune", "kd", "quality", "distill", "export", "report")
# stages whose folder holds a checkpoint of one set of inputs (KD and distillation refuse another's):
# with changed inputs they start in a fresh folder, the old one kept aside. train, profile and search
# continue in theirs on purpose: training further, a session that resumes, trials added to one study
FRESH_ON_CHANGE = ("extract", "prune", "kd", "distill", "export")
# inputs that change where a resumable stage starts from: the stage is redone in a fresh folder, not resumed
FRESH_WHEN_CHANGED = {"train": ("graft.", "train.init")}
# default budget: halfway from the cheapest reachable arch's generation to the max net's (measured).
# A fixed fraction of the max net alone can fall below the cheapest arch when fixed costs dominate
# (a tiny space: the cheapest arch was 82% of the max net), and then the search has nothing to find.
BUDGET_FRACTION = 0.5
# backends whose programs are built on this host (lowered) before timing: worth lowering during training
BACKGROUND_LOWERING = ("executorch-xnnpack",)
# a run folder is continued only by the tool versions that started it (run.json "versions")
RUN_VERSIONS = ("torch", "executorch", "optuna")
Log = Callable[[str], None]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _section(cfg: RunConfig, *names: str) -> dict[str, Any]:
    """The config fields a stage reads, flat (`search.trials`: 64), so a change is named field by field."""
    out: dict[str, Any] = {}

    def flat(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value) and prefix.count(".") < 3 \
                and not prefix.endswith("stage_ops"):
            for k, v in value.items():
                flat(f"{prefix}.{k}", v)
        else:
            out[prefix] = value

    for name in names:
        node: Any = cfg
        for part in name.split("."):
            node = getattr(node, part)
        flat(name, dataclasses.asdict(node) if dataclasses.is_dataclass(node) else node)
    return json.loads(json.dumps(out, default=str))


def _fingerprint(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k)]


class Run:
    """The run folder and its manifest; `stage(name, inputs, fn)` runs or reuses one stage."""

    def __init__(self, root: Path, cfg: RunConfig, log: Log) -> None:
        self.root, self.cfg, self.log = Path(root), cfg, log
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / RUN_MANIFEST
        self.manifest: dict[str, Any] = (read_json(path, missing="", damaged=f"delete {path} to start the run over")
                                         if path.exists() else {"kind": "ditnas.run", "created": _now(), "stages": {}})
        self._check_folder(path)

    def _check_folder(self, path: Path) -> None:
        """Refuse a run folder that is not a ditnas run, or that other tool versions wrote: its checkpoints,
        lowered programs and studies are not valid here (a .pte of another executorch is refused anyway)."""
        if self.manifest.get("kind") != "ditnas.run" or not isinstance(self.manifest.get("stages"), dict):
            raise DitnasError(f"{path} is not a ditnas run manifest; pass another --out folder (or delete {self.root})")
        old, now = self.manifest.get("versions") or {}, versions(*RUN_VERSIONS)
        differ = [f"{k} {old[k]} (now {now[k]})" for k in ("ditnas", *RUN_VERSIONS) if k in old and old[k] != now[k]]
        if differ:
            raise DitnasError(f"{self.root} was run with {', '.join(differ)}: its stages cannot be continued with this "
                              f"install; start fresh with another --out folder, or delete {self.root}")

    def save(self) -> None:
        self.manifest["updated"] = _now()
        self.manifest["versions"] = versions(*RUN_VERSIONS)
        write_json(self.root / RUN_MANIFEST, self.manifest)

    def reusable(self, name: str, inputs: dict[str, Any]) -> bool:
        """Whether `stage(name, inputs, ...)` would reuse the stage's earlier result."""
        old = self.manifest["stages"].get(name)
        return (old is not None and old.get("status") in ("done", "skipped") and not _diff(old.get("inputs", {}), inputs)
                and not damaged_outputs(old.get("outputs", {})))

    def set_aside(self, name: str, why_tag: str, reason: str) -> None:
        """Move `<run>/<name>` to `<run>/<name>.<why_tag>-<time>` (kept, not deleted) so the stage starts anew."""
        folder = self.root / name
        if folder.exists():
            aside = self.root / f"{name}.{why_tag}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}"
            folder.rename(aside)
            self.log(f"[{name}] {reason}: {folder.name} moved to {aside}")

    def stage(self, name: str, inputs: dict[str, Any], fn: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        """Run stage `name` into `<run>/<name>` unless it is done with the same inputs; returns its record."""
        old = self.manifest["stages"].get(name)
        why: list[str] = []
        if old is not None and old.get("status") in ("done", "skipped"):
            changed = _diff(old.get("inputs", {}), inputs)
            why = [f"input {k} changed" for k in changed]
            damaged = [] if why else damaged_outputs(old.get("outputs", {}))  # changed inputs redo it anyway
            if not why and not damaged:
                self.log(f"[{name}] done earlier, inputs unchanged: reused")
                return old
            if damaged:  # the stage resumes from its own folder: set the damaged one aside, keep it for a look
                why += damaged
                self.set_aside(name, "damaged", "; ".join(damaged))
            elif name in FRESH_ON_CHANGE or any(k.startswith(p) for k in changed for p in FRESH_WHEN_CHANGED.get(name, ())):
                self.set_aside(name, "changed", "; ".join(why))
        started = time.time()
        self.log(f"[{name}] {'redoing: ' + ', '.join(why) if why else 'running'}")
        result = fn(self.root / name)
        record = {"status": result.pop("status", "done"), "inputs": inputs, "fingerprint": _fingerprint(inputs),
                  "wall_s": round(time.time() - started, 2), "finished": _now(), **result}
        if why:
            record["redone_because"] = why
        self.manifest["stages"][name] = record
        self.save()
        self.log(f"[{name}] {record['status']} in {record['wall_s']:.1f} s")
        return record


def damaged_outputs(outputs: dict[str, Any]) -> list[str]:
    """Why a finished stage's recorded outputs can no longer be used: a path gone, a file whose sha256
    changed (`<key>_sha256` beside it), a compression folder whose manifest's file hashes fail."""
    from ditnas.manifest import MANIFEST, check_files

    why = []
    for key, value in outputs.items():
        if not isinstance(value, str) or key.endswith(("_sha256", "_id")) or key == "html":
            continue
        path = Path(value)
        if not path.exists():
            why.append(f"output {key} {path} is missing")
        elif f"{key}_sha256" in outputs and path.is_file() and file_sha256(path) != outputs[f"{key}_sha256"]:
            why.append(f"output {key} {path} changed on disk")
        elif (path / MANIFEST).is_file() or (path.is_file() and (path.parent / MANIFEST).is_file()):
            folder = path if path.is_dir() else path.parent
            try:  # a stage folder's manifest: readable, and the files it names intact
                manifest = read_json(folder / MANIFEST, missing="", damaged="")
                files = manifest.get("files") if isinstance(manifest, dict) else None
                if isinstance(files, dict):  # {name: sha256} (compression steps, extract)
                    check_files(folder, manifest)
                elif isinstance(files, list):  # names only (search tables)
                    gone = [f for f in files if isinstance(f, str) and not (folder / f).exists()]
                    if gone:
                        why.append(f"output {key}: {folder / gone[0]} is missing")
            except DitnasError as exc:
                why.append(f"output {key}: {str(exc).split('; ')[0]}")
    return why


def max_generation_ms(table_root: Path, predictor: Any, arch: Any, steps: int, guidance: str) -> tuple[float, str]:
    """The max net's generation latency (one streamed clip under a StreamingPredictor): measured (the profile
    times the max arch's generations and streams) if available, else the predictor's; says which."""
    from ditnas.latency_models.stage import table_generations
    from ditnas.latency_models.stream_latency import StreamingPredictor, measured_stream_ms

    if isinstance(predictor, StreamingPredictor):
        measured = measured_stream_ms(predictor, arch)
        return (measured, "measured") if measured is not None else (predictor.predict(arch), "predicted")
    gens = table_generations(table_root)
    if gens is not None and len(gens):
        hit = gens[(gens["arch"] == str(arch)) & (gens["steps"] == steps) & (gens["guidance"] == guidance)]
        if len(hit):
            return float(hit["p50"].iloc[0]), "measured"
    return float(predictor.predict_generation(arch, steps, guidance)), "predicted"


# profile inputs a session cannot be resumed across (ProfilingSession.open / profile_space refuse them);
# the others (models, guidance, generation steps, ...) only add programs to the same session
SESSION_IDENTITY = ("space.", "model.", "latency.backend", "latency.threads", "latency.warmup", "latency.iters")


def _set_aside_incompatible_session(run: Run, inputs: dict[str, Any]) -> None:
    """A profile redone for another space, model or timing setting cannot resume the old session:
    move it aside (kept, not deleted) so the stage starts a new one in `<run>/profile`."""
    old = run.manifest["stages"].get("profile")
    if old is None:
        return
    changed = [k for k in _diff(old.get("inputs", {}), inputs) if k.startswith(SESSION_IDENTITY)]
    if changed:
        run.set_aside("profile", "replaced", f"{', '.join(changed)} changed: the old session cannot be resumed")


def cheapest_generation_ms(table: Any, predictor: Any, steps: int, guidance: str) -> float:
    """The predicted generation latency of the cheapest arch the space can reach (the DP's minimum)."""
    from ditnas.search.problem import min_reachable_ms
    from ditnas.search.space import SearchChoices

    per_step = min_reachable_ms(SearchChoices.from_space(table.space), predictor)
    return float(predictor.generation.generation_ms(per_step, steps, guidance))


def clip_latency_note(latent: Any, streamed: bool = False) -> str:
    """What a latency of a video space is: the whole clip's programs (T*H*W tokens per call), unless the search
    priced streaming (its definition then says so itself)."""
    c, t, h, w = (int(v) for v in latent)
    if t <= 1 or streamed:
        return ""
    return f"; whole clip of {t} frames per denoiser call ({c}x{t}x{h}x{w} latents), not per-chunk streaming"


def run_pipeline(cfg: RunConfig, out: Path, *, progress: bool = True, log: Log = print,
                 stop_after: str | None = None) -> dict[str, Any]:
    """Run (or continue) every stage on `cfg` into the run folder `out`; returns run.json's content."""
    if stop_after is not None and stop_after not in STAGES:
        raise DitnasError(f"stop_after {stop_after!r} is not a stage; choose one of {', '.join(STAGES)}")
    jobs: list[Any] = []  # background processes started for a later stage: stopped on any way out
    try:
        return _run_stages(cfg, out, progress=progress, log=log, stop_after=stop_after, jobs=jobs)
    finally:
        for job in jobs:
            job.stop()


def _run_stages(cfg: RunConfig, out: Path, *, progress: bool, log: Log, stop_after: str | None,
                jobs: list[Any]) -> dict[str, Any]:
    from ditnas.supernet.run import check_quality_settings

    check_quality_settings(cfg)
    cfg.search.check(), cfg.latency.check(), cfg.compress.check()
    run = Run(out, cfg, log)
    dump_config(cfg, run.root / "config.yaml")
    run.manifest["config"] = cfg.to_dict()
    records: dict[str, dict[str, Any]] = {}

    def done(name: str) -> bool:
        return stop_after == name

    # ----- 1. supernet ------------------------------------------------------------------------
    def train(folder: Path) -> dict[str, Any]:
        from ditnas.supernet.run import train_run

        start = cfg
        if cfg.graft.in_run:  # graft.in_run: the supernet starts from every op grafted on a trained teacher
            from ditnas.supernet.graft import graft_supernet
            from ditnas.supernet.train import GRAFTED_NAME

            if not (folder / "graft" / "graft.json").is_file():  # written last: a finished graft is reused
                log("[train] grafting every op onto the teacher first (graft.in_run)")
                graft_supernet(cfg, folder / "graft")
            start = replace(cfg, train=replace(cfg.train, init=str(folder / "graft" / GRAFTED_NAME)))
        # the judge's verdict and the sample grid: the quality stage's, in the background
        m = train_run(start, folder, resume=True, progress=progress, evaluate=False, samples=False)
        ckpt = folder / m["checkpoint"]
        grafted = {"grafted_from": start.train.init} if cfg.graft.in_run else {}
        return {"outputs": {"checkpoint": str(ckpt), "checkpoint_sha256": file_sha256(ckpt), **grafted},
                "metrics": {"step": m["step"], "val_flow_loss_ema": m["val_flow_loss_ema"]}}

    # latency depends on the space and model dimensions, not on the weights: training longer keeps the
    # table, and the profile's programs are lowered from a fresh supernet while the real one trains
    profile_inputs = {k: v for k, v in _section(cfg, "space", "model", "latency", "sample.cfg_scale").items()
                      if k not in ("latency.workers", "latency.lowering_cache")}  # how programs get built changes no figure
    # the post-training quality check is the quality stage's: its settings do not redo training
    train_inputs = {k: v for k, v in _section(cfg, "data", "space", "model", "train", "sample",
                                              *(["graft"] if cfg.graft.in_run else [])).items()
                    if k not in ("train.eval_samples", "train.quality_archs")}
    _set_aside_incompatible_session(run, profile_inputs)
    background = None
    if (stop_after != "train" and not run.reusable("train", train_inputs) and not run.reusable("profile", profile_inputs)
            and cfg.latency.backend in BACKGROUND_LOWERING):
        from ditnas.latency_models.background_lowering import BackgroundLowering

        background = BackgroundLowering(cfg, run.root / "profile")
        log(f"[profile] lowering programs in the background while the supernet trains ({background.log_path})")
    try:
        records["train"] = run.stage("train", train_inputs, train)
    finally:
        if background is not None:
            log(f"[profile] {background.finish()}")
    ckpt = Path(records["train"]["outputs"]["checkpoint"])
    if done("train"):
        return run.manifest

    # ----- 2. latency table -------------------------------------------------------------------
    def profile(folder: Path) -> dict[str, Any]:
        from ditnas.latency_models.profile import profile_space, supernet_for_profiling
        from ditnas.latency_models.stage import build_table

        supernet = supernet_for_profiling(cfg, ckpt)
        session = profile_space(supernet, cfg.latency, folder, cfg_scale=cfg.sample.cfg_scale,
                                progress=_line_progress(log, "profile"))
        table, predictor = build_table(session, supernet)
        return {"outputs": {"table": str(table.root), "table_id": table.table_id},
                "metrics": {"programs": int(len(session.summary())), "calibration": predictor.calibration.method,
                            "generation_fits": {g: f.method for g, f in predictor.generation.fits.items()}}}

    records["profile"] = run.stage("profile", profile_inputs, profile)
    table_root = Path(records["profile"]["outputs"]["table"])
    if done("profile"):
        return run.manifest

    # ----- the reference quality, in the background from here on: the timing pass is over, and the
    # search, KD and distillation leave a core idle (they run at 1 thread)
    from ditnas.supernet.background_quality import RESULT, BackgroundQuality, compute

    quality_inputs = {**_section(cfg, "data", "train.eval_samples", "train.quality_archs", "sample"),
                      "checkpoint_sha256": records["train"]["outputs"]["checkpoint_sha256"]}
    wanted = stop_after is None or STAGES.index(stop_after) >= STAGES.index("quality")
    job = None
    if wanted and not run.reusable("quality", quality_inputs):
        job = BackgroundQuality(cfg, ckpt, run.root / "quality.work")
        jobs.append(job)
        log(f"[quality] judging the max net's samples in the background ({job.folder / 'quality.log'})")

    # ----- 3. search --------------------------------------------------------------------------
    from ditnas.latency_models.stage import load_predictor
    from ditnas.latency_models.stream_latency import search_predictor

    table, predictor = load_predictor(table_root)
    steps = cfg.search.sorted_steps[0]
    max_arch = table.space.max_arch()
    if cfg.search.stream_chunk or cfg.search.guidance == "pdg":  # every latency below is one streamed clip / PDG step
        predictor = search_predictor(predictor, table_root, cfg.search.stream_chunk, steps, cfg.search.guidance,
                                     cfg.search.pdg_dense)
    reference, source = max_generation_ms(table_root, predictor, max_arch, steps, cfg.search.guidance)
    cheapest = cheapest_generation_ms(table, predictor, steps, cfg.search.guidance)
    top = max(reference, 1.1 * cheapest)  # a measured max net can undercut the predicted cheapest arch
    if cfg.search.target_fps is not None:
        budget = cfg.search.needs_budget(frames=table.space.latent[1])
    else:
        budget = cfg.search.budget_ms or cheapest + BUDGET_FRACTION * (top - cheapest)
    search_cfg = replace(cfg.search, budget_ms=float(budget), target_fps=None)

    def search(folder: Path) -> dict[str, Any]:
        from ditnas.search.stage import run_search

        m = run_search(search_cfg, ckpt, table_root, folder)
        if not m.get("best"):
            raise DitnasError(f"search found no arch under {budget:.3g} ms ({m['trials_total']} trials); raise "
                              "search.budget_ms or search.trials")
        return {"outputs": {"manifest": str(folder / "manifest.json"), "best": m["best"]},
                "metrics": {"budget_ms": budget,
                            "budget_source": f"cheapest arch + {BUDGET_FRACTION:g} x (max net {source} - cheapest)"
                            if cfg.search.budget_ms is None else "search.budget_ms",
                            "max_net_ms": reference, "cheapest_ms": cheapest,
                            "latency_definition": m["latency_definition"] + clip_latency_note(table.space.latent, bool(cfg.search.stream_chunk)),
                            "trials": m["trials_total"], "pareto_size": m["pareto_size"]}}

    records["search"] = run.stage("search", {**_section(cfg, "search"), "budget_ms": budget,
                                             "checkpoint_sha256": records["train"]["outputs"]["checkpoint_sha256"],
                                             "table_id": records["profile"]["outputs"]["table_id"]}, search)
    best = records["search"]["outputs"]["best"]
    if done("search"):
        return run.manifest

    # ----- 4. extract chosen subnet + the teacher (max net) -----------------------------------
    def extract(folder: Path) -> dict[str, Any]:
        from ditnas.supernet.extract import extract_subnet

        chosen = extract_subnet(ckpt, best["arch"], folder / "chosen")
        teacher = extract_subnet(ckpt, "max", folder / "teacher")
        return {"outputs": {"chosen": str(folder / "chosen"), "teacher": str(folder / "teacher")},
                "metrics": {"chosen_params": chosen["params"], "teacher_params": teacher["params"],
                            "parity_max_abs_error": max(chosen["parity_max_abs_error"], teacher["parity_max_abs_error"])}}

    records["extract"] = run.stage("extract", {"best": best["arch"],
                                               "checkpoint_sha256": records["train"]["outputs"]["checkpoint_sha256"]}, extract)
    chosen, teacher = Path(records["extract"]["outputs"]["chosen"]), Path(records["extract"]["outputs"]["teacher"])
    if done("extract"):
        return run.manifest

    # ----- 5. prune only when the chosen arch misses the budget ---------------------------------
    def prune(folder: Path) -> dict[str, Any]:
        from ditnas.supernet.extract import load_subnet

        arch = load_subnet(chosen).arch
        predicted = predictor.predict_generation(arch, steps, cfg.search.guidance)
        if predicted <= budget:
            return {"status": "skipped", "outputs": {"subnet": str(chosen)},
                    "metrics": {"reason": f"the chosen arch meets the budget ({predicted:.3g} <= {budget:.3g} ms)"}}
        from ditnas.compress.prune import prune_subnet

        per_step = predictor.generation.per_step_budget(budget, steps, cfg.search.guidance)
        if cfg.search.stream_chunk or cfg.search.guidance == "pdg":
            # assumption: the pruner prices one batch-1 call; a streamed clip's (or a PDG step's) budget is handed to
            # it as the same fraction of the chosen arch's call (they scale together: the same cells)
            per_step = predictor.base.predict(arch) * budget / predicted
        # the pruner stops at a predicted budget; on this host's own table the result is also timed (~1 min)
        m = prune_subnet(replace(cfg.compress.prune, budget_ms=per_step), cfg.compress.kd, chosen, table_root, folder,
                         data_cfg=cfg.data, progress=log, measure=cfg.latency.backend == "executorch-xnnpack")
        return {"outputs": {"subnet": str(folder)}, "metrics": m.get("metrics", {})}

    records["prune"] = run.stage("prune", {**_section(cfg, "compress.prune"), "budget_ms": budget,
                                           "chosen": best["arch"]}, prune)
    student_init = Path(records["prune"]["outputs"]["subnet"])
    if done("prune"):
        return run.manifest

    # ----- 6. KD from the max net --------------------------------------------------------------
    def kd(folder: Path) -> dict[str, Any]:
        from ditnas.compress.kd import distill_kd

        m = distill_kd(cfg.compress.kd, teacher, student_init, folder, data_cfg=cfg.data)
        return {"outputs": {"subnet": str(folder)}, "metrics": m.get("metrics", {})}

    records["kd"] = run.stage("kd", {**_section(cfg, "compress.kd"), "student": str(student_init),
                                     "prune": records["prune"].get("fingerprint")}, kd)
    if done("kd"):
        return run.manifest

    # ----- the reference quality: wait for the background check (its wall time is the wait) ----------
    def quality(folder: Path) -> dict[str, Any]:
        import shutil

        if job is not None:
            job.result()
            if folder.exists():
                shutil.rmtree(folder)
            job.folder.rename(folder)  # published whole: the stage folder never holds a partial result
            m = read_json(folder / RESULT, missing="rerun the same command", damaged="rerun the same command")
        else:  # not started in the background (a run stopped before this stage): here, now
            m = compute(cfg, ckpt, folder, progress=progress)
        judge = {"judge": str(folder / "judge")} if (folder / "judge").is_dir() else {}  # none without labels
        return {"outputs": {"quality": str(folder / RESULT), **judge},
                "metrics": {"quality": m["quality"], "judge_val_accuracy": m["judge_val_accuracy"],
                            "seconds_in_background" if job is not None else "seconds": m["seconds"]}}

    records["quality"] = run.stage("quality", quality_inputs, quality)
    judge_cache = Path(records["quality"]["outputs"].get("judge") or run.root / "quality" / "judge")
    if done("quality"):
        return run.manifest

    # ----- 7. step distillation to a few-step student -------------------------------------------
    def distill(folder: Path) -> dict[str, Any]:
        if cfg.compress.distill.method == "video_2in1":
            return distill_video_stage(cfg, folder, teacher, Path(records["kd"]["outputs"]["subnet"]), judge_cache, log)
        from ditnas.compress.distill import distill_steps

        # the quality stage's judge: the same network (data + seed), trained once per run
        m = distill_steps(cfg.compress.distill, teacher, Path(records["kd"]["outputs"]["subnet"]), folder,
                          data_cfg=cfg.data, judge_cache=judge_cache)
        return {"outputs": {"subnet": str(folder)}, "metrics": m.get("metrics", {})}

    records["distill"] = run.stage("distill", {**distill_inputs(cfg), "kd": records["kd"].get("fingerprint")}, distill)
    if done("distill"):
        return run.manifest

    # ----- 8. export + verify on the runtime ----------------------------------------------------
    def export(folder: Path) -> dict[str, Any]:
        from ditnas.compress.export import export_subnet

        # the student was trained on time_grid(student_steps, distill.shift): ship exactly that sampler
        export_cfg = replace(cfg.compress.export, steps=cfg.compress.distill.student_steps,
                             time_shift=cfg.compress.distill.shift)
        student = Path(records["distill"]["outputs"]["subnet"])
        m = export_subnet(export_cfg, student, folder, name="student")
        outputs, metrics = {"pte": str(folder / m["artifact"])}, dict(m.get("metrics", {}))
        if cfg.compress.export.stream_chunk:  # clips: also the chunk programs a phone streams with
            from ditnas.latency_models.stream_programs import export_stream_programs
            from ditnas.supernet.extract import load_subnet

            sub = load_subnet(student).eval()
            s = export_stream_programs(sub, cfg.compress.export.stream_chunk, int(sub.arch.latent[1]), folder / "stream")
            outputs["stream"] = str(folder / "stream")
            metrics["stream_programs"] = s["metrics"]["programs"]
        return {"outputs": outputs, "metrics": metrics}

    # stream_chunk = 0 (off) is left out of the inputs: run folders from before the field keep their export
    export_inputs = {k: v for k, v in _section(cfg, "compress.export").items()
                     if k != "compress.export.stream_chunk" or v}
    records["export"] = run.stage("export", {**export_inputs, "distill": records["distill"].get("fingerprint")},
                                  export)
    if done("export"):
        return run.manifest

    # ----- 9. report: regenerated on every run (cheap; it reads every stage's artifacts) ----------
    from ditnas.reports.report import write_report

    started = time.time()
    html = write_report(run.root)
    run.manifest["stages"]["report"] = {"status": "done", "outputs": {"html": str(html)}, "wall_s": round(time.time() - started, 2),
                                        "finished": _now()}
    run.save()
    log(f"[report] {html}")
    return run.manifest


# the distill stage's video_2in1 method (`_run_stages` calls these; module level so tests run the stage alone)
# video_2in1's own fields, left out of the other methods' inputs: their run folders stay reusable
VIDEO_DISTILL_FIELDS = ("chunk", "kd_steps", "kd_lr", "kd_lambda_out", "kd_lambda_feat", "stream_loss",
                        "regression_pairs", "class_dropout", "grad_clip", "gap_clips")


def distill_inputs(cfg: RunConfig) -> dict[str, Any]:
    """The compress.distill fields the distill stage's fingerprint holds (the KD stage's is added to them)."""
    video = cfg.compress.distill.method == "video_2in1"
    return {k: v for k, v in _section(cfg, "compress.distill").items()
            if video or k.rsplit(".", 1)[1] not in VIDEO_DISTILL_FIELDS}


def distill_video_stage(cfg: RunConfig, folder: Path, teacher: Path, student: Path, judge_cache: Path,
                        log: Log = print) -> dict[str, Any]:
    """compress.distill.method video_2in1: S2DiT's 2-in-1 distillation (compress/video_distill.py) of the KD
    stage's `student` into a 4-step frame-causal streaming student. `<folder>/subnet.pt` is it in the extract
    format (what export and the report read); the stage record is run.json's {outputs, metrics}."""
    from ditnas.compress.video_distill import distill_video, video_config
    from ditnas.data import load_split
    from ditnas.errors import ConfigFieldError

    split = load_split(cfg.data)
    if len(split.latent_shape) != 4 or int(split.latent_shape[1]) <= 1:
        raise ConfigFieldError("compress.distill.method", f"video_2in1 distils a streaming student of clips, but data "
                               f"{cfg.data.source!r} gives still images (latent {tuple(split.latent_shape)}, T = 1); "
                               "choose kdmd or adversarial, or clip data (data.source: moving_digits)")
    # The teacher is the run's max net as trained. S2DiT's teacher is bidirectional; a run with
    # model.causal=false gives exactly that (and the student is made causal here: make_causal).
    # assumption: with model.causal=true the teacher stays causal -- it was trained never to see later frames, so
    # set_causal(False) on it would be a model nobody trained; the metrics record teacher_causal. The KD stage
    # already ran output/feature KD from the same teacher, so stage (a) (compress.distill.kd_steps) mainly adapts
    # a bidirectional student to causal attention.
    line = _line_progress(log, "distill")
    m = distill_video(video_config(cfg.compress.distill), teacher, student, split, folder,
                      progress=lambda done, total, record: line(done, total, record["phase"]),
                      make_causal=True, eval_samples=cfg.compress.distill.eval_samples, judge_cache=judge_cache)
    metrics = dict(m["metrics"])
    # flat teacher gaps (MSE of the streamed student to the teacher's ODE solution): the report's metric table
    metrics.update(**metrics["before"], **metrics["after"], method="video_2in1", teacher_causal=m["teacher_causal"])
    return {"outputs": {"subnet": str(folder)}, "metrics": metrics}


def _line_progress(log: Log, phase: str) -> Callable[[int, int, str], None]:
    """Stage progress as a line per ~5% (the pipeline's own log; the stage's bar would interleave)."""
    state = {"last": -1}

    def update(done: int, total: int, what: str) -> None:
        if not total:
            return
        step = max(1, total // 20)
        if done // step != state["last"] or done == total:
            state["last"] = done // step
            log(f"[{phase}] {done}/{total} {what}")
    return update
