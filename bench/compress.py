"""Benchmark: what compression buys, measured on a finished `ditnas run` folder.

    python bench/compress.py --run runs/bench_run [--out bench/results/compress.json] [--work runs/bench_compress]
                             [--samples 1000] [--rounds 5] [--iters 4] [--grid docs/compress_samples.png]
                             [--half-kd-steps N] [--pruned FOLDER]

`--run` is a run folder whose stages up to export are done (bench/run.py writes runs/bench_run); its
supernet, latency table, teacher (the max net), KD subnet, K-DMD student and student .pte are reused,
nothing there is changed. Into `--work` it adds what the run does not make:

- the half-latency subnet: `ditnas run`'s own stages (search -> extract -> prune if needed -> KD) rerun
  with `search.budget_ms` = 50% of the max net's measured generation, on a copy of the run's manifest
  whose train and profile stages point at the run's artifacts (so they are reused, not redone). When
  50% is below the cheapest arch the space can reach, the run's own budget is used and the JSON says so;
- the KD-only 4-step student (the KD subnet sampled at 4 steps on the student's time grid) and an
  adversarially step-distilled student (`compress.distill` with method adversarial, same updates);
- .pte programs of the teacher: 28 steps with the sampler's CFG (the shipped guided sampler) and 28
  steps without guidance, and of the half-latency subnet (28 steps, no guidance);
- with `--pruned FOLDER` (a pruned subnet, e.g. bench/prune_ablation.py's `tri-level`): its FD, .pte
  timing and the same two ratios as the half-latency subnet, and a row in the sample grid.

Figures (JSON keys; goals from the compression issue):
- `fd_ratio_at_half_latency` (<= 1.10) and `measured_speedup_at_half_latency` (>= 2): FD of the
  half-latency subnet at 28 steps without CFG / the max net's, and max net / subnet measured ms;
- `student_fd_ratio` (<= 1.2): 4-step K-DMD student FD / the 28-step teacher's FD with the CFG scale the
  student was distilled toward (`student_fd_ratio_vs_unguided_teacher` beside it), `student_label_accuracy`
  (>= 0.95); the same for the KD-only and adversarial students;
- `end_to_end_speedup` (>= 10): teacher .pte 28 steps with CFG vs student .pte 4 steps, timed in
  alternating rounds (each round one fresh interpreter timing both) at `--threads`;
- `pte_speedup_vs_eager` (>= 1.5), `pte_rel_err` (<= 1e-3), `delegated_share` (>= 0.95): the student's
  export manifest.
All FDs: the digits judge's features, `--samples` samples (labels 0..9 cycling, one noise seed for
every model) against the training images; `real_fd_floor` is real-vs-real at the same n. Tri-level vs
single-level pruning is bench/prune_ablation.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

from common import machine, report  # noqa: E402

from ditnas.compress.distill import EVAL_SEED, distill_steps, sample_student  # noqa: E402
from ditnas.compress.export import export_subnet  # noqa: E402
from ditnas.config import load_config  # noqa: E402
from ditnas.data import load_split  # noqa: E402
from ditnas.errors import DitnasError  # noqa: E402
from ditnas.io import read_json, write_json  # noqa: E402
from ditnas.judge import evaluate_samples, load_or_train_judge, real_fd_floor  # noqa: E402
from ditnas.latency_models.generation_profile import time_generations_in_fresh_process  # noqa: E402
from ditnas.pipeline import RUN_MANIFEST, run_pipeline  # noqa: E402
from ditnas.search.threads import torch_threads  # noqa: E402
from ditnas.supernet.extract import load_subnet  # noqa: E402
from ditnas.supernet.flow import euler_sample  # noqa: E402
from ditnas.supernet.quality import save_grid  # noqa: E402

NEEDED = ("train", "profile", "search", "extract", "kd", "distill", "export")


def _finished_run(run: Path) -> dict:
    manifest = read_json(run / RUN_MANIFEST, missing=f"run `python bench/run.py --folder {run}` first",
                         damaged=f"run `python bench/run.py --folder {run}` again")
    missing = [s for s in NEEDED if manifest["stages"].get(s, {}).get("status") not in ("done", "skipped")]
    if missing:
        raise DitnasError(f"{run}: stages {', '.join(missing)} are not done; finish it with `ditnas run --out {run}`")
    return manifest


class Scorer:
    """FD (vs training images) and label accuracy of samples, every model on the same labels and noise."""

    def __init__(self, split, judge, n: int) -> None:
        self.split, self.judge, self.n = split, judge, n
        self.labels = torch.arange(n) % split.num_classes
        self.shape = tuple(split.latent_shape)
        self.noise = torch.randn((n, *self.shape), generator=torch.Generator().manual_seed(EVAL_SEED))
        self.samples: dict[str, torch.Tensor] = {}

    def score(self, name: str, x: torch.Tensor) -> dict:
        self.samples[name] = x[: self.split.num_classes]  # one of each digit, for the grid
        s = evaluate_samples(self.judge, x, self.labels, self.split.train_x)
        return {"fd": float(s["fd"]), "label_accuracy": float(s["label_accuracy"]), "samples": self.n}

    @torch.no_grad()
    def euler(self, name: str, model, steps: int, cfg_scale: float) -> dict:
        t0 = time.time()
        x = euler_sample(model, self.labels, self.shape, steps=steps, cfg_scale=cfg_scale,
                         null_label=self.split.num_classes, generator=torch.Generator().manual_seed(0),
                         noise=self.noise.clone())
        return {**self.score(name, x), "steps": steps, "cfg_scale": cfg_scale, "seconds": round(time.time() - t0, 1)}

    def few_step(self, name: str, model, steps: int, shift: float) -> dict:
        # sample_student draws its noise from EVAL_SEED: the same noise as `euler`
        x = sample_student(model, steps, shift, self.labels, self.shape, EVAL_SEED)
        return {**self.score(name, x), "steps": steps, "shift": shift}


def half_latency_subnet(cfg, manifest: dict, work: Path, log, kd_steps: int | None = None) -> dict:
    """`ditnas run`'s search..KD rerun at 50% of the max net's measured generation (train/profile reused);
    `kd_steps` overrides `compress.kd.steps` for it (the run's own when None)."""
    metrics = manifest["stages"]["search"]["metrics"]
    max_ms, cheapest = float(metrics["max_net_ms"]), float(metrics["cheapest_ms"])
    budget, rule = 0.5 * max_ms, "0.5 x max net measured"
    if budget <= cheapest:
        budget, rule = float(metrics["budget_ms"]), (f"the run's budget: 0.5 x max net ({0.5 * max_ms:.3g} ms) is below the "
                                                     f"cheapest reachable arch ({cheapest:.3g} ms)")
    folder = work / "half"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / RUN_MANIFEST).exists():  # reuse the run's supernet and table: copy their stage records only
        seed = {k: v for k, v in manifest.items() if k != "stages"}
        seed["stages"] = {s: manifest["stages"][s] for s in ("train", "profile")}
        write_json(folder / RUN_MANIFEST, seed)
    half_cfg = replace(cfg, search=replace(cfg.search, budget_ms=budget))
    if kd_steps is not None:
        half_cfg = replace(half_cfg, compress=replace(cfg.compress, kd=replace(cfg.compress.kd, steps=kd_steps)))
    out = run_pipeline(half_cfg, folder, progress=False, log=log, stop_after="kd")
    return {"budget_ms": budget, "budget_rule": rule, "max_net_ms": max_ms, "cheapest_ms": cheapest,
            "kd_steps": half_cfg.compress.kd.steps,
            "arch": out["stages"]["search"]["outputs"]["best"]["arch"], "pruned": out["stages"]["prune"]["status"] == "done",
            "kd_subnet": out["stages"]["kd"]["outputs"]["subnet"], "folder": str(folder)}


def export_pte(cfg, subnet: Path, out: Path, name: str, steps: int, cfg_scale: float) -> Path:
    """A 28-step (or any) .pte through the shipped recipe, reused when already written."""
    export_cfg = replace(cfg.compress.export, steps=steps, cfg_scale=cfg_scale, time_shift=1.0, sampler="host-loop")
    if (out / "manifest.json").is_file():
        return out / read_json(out / "manifest.json", missing="", damaged=f"delete {out} and rerun")["artifact"]
    m = export_subnet(export_cfg, subnet, out, name=name, measure=False)
    return out / m["artifact"]


def time_rounds(jobs: list[tuple[str, Path, int, float | None]], threads: int, rounds: int, iters: int) -> dict:
    """Median ms per whole generation of each job, over `rounds` fresh interpreters timing them all
    (the order reversed every other round, so neither side always runs first)."""
    runs: dict[str, list[float]] = {key: [] for key, *_ in jobs}
    for r in range(rounds):
        order = jobs if r % 2 == 0 else jobs[::-1]
        for key, times in time_generations_in_fresh_process(order, threads, 1, iters).items():
            runs[key] += times
    return {key: {"median_ms": statistics.median(t), "n": len(t), "min_ms": min(t), "max_ms": max(t)} for key, t in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/bench_run"))
    ap.add_argument("--work", type=Path, default=Path("runs/bench_compress"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/compress.json"))
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=4, help="timed generations per job and round")
    ap.add_argument("--grid", type=Path, default=Path("docs/compress_samples.png"))
    ap.add_argument("--pruned", type=Path, default=None,
                    help="a pruned subnet folder (e.g. bench/prune_ablation.py's tri-level) to score and time beside the rest")
    ap.add_argument("--half-kd-steps", type=int, default=None,
                    help="KD steps of the half-latency subnet (default: the run's compress.kd.steps)")
    args = ap.parse_args()
    started = time.time()
    manifest = _finished_run(args.run)
    cfg = load_config(args.run / "config.yaml")
    stages = manifest["stages"]
    teacher_dir, kd_dir = Path(stages["extract"]["outputs"]["teacher"]), Path(stages["kd"]["outputs"]["subnet"])
    student_dir, student_pte = Path(stages["distill"]["outputs"]["subnet"]), Path(stages["export"]["outputs"]["pte"])
    dcfg = cfg.compress.distill
    cfg_scale = dcfg.cfg_scale  # the guidance the student was distilled toward
    result: dict = {"machine": machine("torch", "executorch"), "run": str(args.run), "samples": args.samples,
                    "threads": args.threads, "distill": {"method": dcfg.method, "steps": dcfg.steps, "student_steps": dcfg.student_steps}}
    seconds: dict[str, float] = {}

    def log(msg: str) -> None:
        print(msg, flush=True)

    with torch_threads(args.threads):
        split = load_split(cfg.data)
        judge = load_or_train_judge(split, args.work / "judge", progress=False)
        scorer = Scorer(split, judge, args.samples)
        result["real_fd_floor"] = real_fd_floor(judge, split, args.samples)
        teacher = load_subnet(teacher_dir)
        t = time.time()
        result["teacher_28"] = scorer.euler("teacher, 28 steps", teacher, 28, 1.0)
        result["teacher_28_cfg"] = scorer.euler(f"teacher, 28 steps, cfg {cfg_scale:g}", teacher, 28, cfg_scale)
        seconds["teacher_quality"] = time.time() - t

        t = time.time()
        half = half_latency_subnet(cfg, manifest, args.work, log, args.half_kd_steps)
        seconds["half_latency_search_kd"] = time.time() - t
        half_model = load_subnet(Path(half["kd_subnet"]))
        half["quality"] = scorer.euler("half-latency subnet, 28 steps", half_model, 28, 1.0)
        half["params"], half["teacher_params"] = half_model.num_params(), teacher.num_params()
        result["half_latency"] = half
        if args.pruned:
            pruned_model = load_subnet(args.pruned)
            result["pruned"] = {"folder": str(args.pruned), "arch": str(pruned_model.arch), "params": pruned_model.num_params(),
                                "quality": scorer.euler("pruned subnet, 28 steps", pruned_model, 28, 1.0)}

        t = time.time()
        result["kd_only"] = scorer.few_step("KD only, 4 steps", load_subnet(kd_dir), dcfg.student_steps, dcfg.shift)
        result["kdmd"] = scorer.few_step(f"K-DMD student, {dcfg.student_steps} steps", load_subnet(student_dir),
                                         dcfg.student_steps, dcfg.shift)
        adv_dir = args.work / "adversarial"
        distill_steps(replace(dcfg, method="adversarial", eval_samples=0), teacher_dir, kd_dir, adv_dir, data_cfg=cfg.data)
        result["adversarial"] = scorer.few_step(f"adversarial student, {dcfg.student_steps} steps", load_subnet(adv_dir),
                                                dcfg.student_steps, dcfg.shift)
        seconds["students"] = time.time() - t

        t = time.time()
        teacher_cfg_pte = export_pte(cfg, teacher_dir, args.work / "teacher_cfg", "teacher-cfg", 28, cfg_scale)
        teacher_pte = export_pte(cfg, teacher_dir, args.work / "teacher", "teacher", 28, 0.0)
        half_pte = export_pte(cfg, Path(half["kd_subnet"]), args.work / "half_export", "half", 28, 0.0)
        jobs = [("teacher_28_cfg", teacher_cfg_pte, 28, None), ("student", student_pte, dcfg.student_steps, None),
                ("teacher_28", teacher_pte, 28, None), ("half_28", half_pte, 28, None)]
        if args.pruned:
            jobs.append(("pruned_28", export_pte(cfg, args.pruned, args.work / "pruned_export", "pruned", 28, 0.0), 28, None))
        seconds["exports"] = time.time() - t
        t = time.time()
        timing = time_rounds(jobs, args.threads, args.rounds, args.iters)
        seconds["timing"] = time.time() - t
    result["timing"] = timing

    teacher_fd, teacher_cfg_fd = result["teacher_28"]["fd"], result["teacher_28_cfg"]["fd"]
    result["fd_ratio_at_half_latency"] = half["quality"]["fd"] / teacher_fd
    result["measured_speedup_at_half_latency"] = timing["teacher_28"]["median_ms"] / timing["half_28"]["median_ms"]
    if args.pruned:  # the same two figures for the pruned subnet
        result["pruned"]["fd_ratio"] = result["pruned"]["quality"]["fd"] / teacher_fd
        result["pruned"]["measured_speedup"] = timing["teacher_28"]["median_ms"] / timing["pruned_28"]["median_ms"]
    for key in ("kdmd", "kd_only", "adversarial"):
        prefix = "student" if key == "kdmd" else f"{key}_student"
        result[f"{prefix}_fd_ratio"] = result[key]["fd"] / teacher_cfg_fd
        result[f"{prefix}_fd_ratio_vs_unguided_teacher"] = result[key]["fd"] / teacher_fd
        result[f"{prefix}_label_accuracy"] = result[key]["label_accuracy"]
    result["end_to_end_speedup"] = timing["teacher_28_cfg"]["median_ms"] / timing["student"]["median_ms"]
    export_metrics = read_json(student_pte.parent / "manifest.json", missing=f"finish the export stage of {args.run}",
                               damaged=f"rerun `ditnas run --out {args.run}` (the damaged export is redone)")["metrics"]
    parity = export_metrics["parity"]
    result["pte_speedup_vs_eager"] = export_metrics.get("timing", {}).get("pte_speedup_vs_eager")
    result["pte_rel_err"] = max(parity["max_step_rel_error"], parity["generation_rel_error"])
    result["delegated_share"] = export_metrics["delegated_share"]
    result["goals"] = {"fd_ratio_at_half_latency": 1.10, "measured_speedup_at_half_latency": 2.0, "student_fd_ratio": 1.2,
                       "student_label_accuracy": 0.95, "end_to_end_speedup": 10.0, "pte_speedup_vs_eager": 1.5,
                       "pte_rel_err": 1e-3, "delegated_share": 0.95}
    result["seconds"] = {k: round(v, 1) for k, v in seconds.items()} | {"total": round(time.time() - started, 1)}

    if args.grid:
        names = list(scorer.samples)
        save_grid(torch.cat([scorer.samples[n] for n in names]), args.grid, nrow=split.num_classes)
        result["grid"] = {"path": str(args.grid), "rows": names}

    lower_is_better = {"fd_ratio_at_half_latency", "student_fd_ratio", "pte_rel_err"}
    result["goals_met"] = {k: None if result[k] is None else bool(result[k] <= g if k in lower_is_better else result[k] >= g)
                           for k, g in result["goals"].items()}

    def met(key: str) -> str:
        goal, value, ok = result["goals"][key], result[key], result["goals_met"][key]
        if value is None:
            return "not measured"
        return f"{value:.4g} (goal {'<=' if key in lower_is_better else '>='} {goal:g}: {'met' if ok else 'MISSED'})"

    rows = [("max net (teacher) 28 steps", f"FD {teacher_fd:.2f} (cfg {cfg_scale:g}: {teacher_cfg_fd:.2f}, "
                                          f"acc {result['teacher_28_cfg']['label_accuracy']:.3f})"),
            ("real FD floor", f"{result['real_fd_floor']:.2f}"),
            ("half-latency budget", f"{half['budget_ms']:.4g} ms ({half['budget_rule']}); {half['arch']}"
                                    f"{' pruned' if half['pruned'] else ''}; KD {half['kd_steps']} steps"),
            ("half-latency subnet 28 steps", f"FD {half['quality']['fd']:.2f}  {timing['half_28']['median_ms']:.2f} ms vs "
                                             f"{timing['teacher_28']['median_ms']:.2f} ms")]
    rows += [(k, met(k)) for k in ("fd_ratio_at_half_latency", "measured_speedup_at_half_latency")]
    if args.pruned:
        pr = result["pruned"]
        rows.append(("pruned subnet 28 steps", f"FD {pr['quality']['fd']:.2f} (ratio {pr['fd_ratio']:.3g})  "
                                               f"{timing['pruned_28']['median_ms']:.2f} ms ({pr['measured_speedup']:.3g}x)  {pr['arch']}"))
    for key in ("kdmd", "kd_only", "adversarial"):
        rows.append((f"{key} student {dcfg.student_steps} steps", f"FD {result[key]['fd']:.2f}  acc {result[key]['label_accuracy']:.3f}"))
    rows += [(k, met(k)) for k in ("student_fd_ratio", "student_label_accuracy", "end_to_end_speedup", "pte_speedup_vs_eager",
                                   "pte_rel_err", "delegated_share")]
    rows.append(("timing (median ms)", json.dumps({k: round(v["median_ms"], 3) for k, v in timing.items()})))
    rows.append(("seconds", json.dumps(result["seconds"])))
    report(rows, result, args.out)


if __name__ == "__main__":
    main()
