"""One self-contained HTML file per run (`<run>/report.html`): what a release engineer reads.

It reads only the run folder's artifacts (run.json and each stage's files), so `ditnas report <run>`
regenerates it at any time. Figures are matplotlib PNGs embedded as base64; every latency figure
names its device, threads and definition. Sections whose stage has not run yet say so.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import pandas as pd

from ditnas.errors import DitnasError
from ditnas.io import atomic_write_text, read_json

OP_COLOURS = {"sa": "#4c72b0", "gqa": "#8172b3", "assa": "#64b5cd", "lcha": "#55a868", "ssa": "#dd8452", "skip": "#dddddd"}


def _fig_to_img(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _png(path: Path) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(Path(path).read_bytes()).decode()}">'


def _with_gif(png: Path) -> str:
    """The PNG, and the animated GIF of the same samples beside it when there is one (clips: `<png>.gif`)."""
    gif = Path(png).with_suffix(".gif")
    if not gif.is_file():
        return _png(png)
    return (_png(png) + f'<img src="data:image/gif;base64,{base64.b64encode(gif.read_bytes()).decode()}" '
            'alt="animated clips">')


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p><i>none</i></p>"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=str)[:160]
    return "" if v is None else str(v)


def _jsonl(path: Path) -> pd.DataFrame:
    if not path.is_file():
        return pd.DataFrame()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return pd.DataFrame(rows)


def _log_axes(ax: Any, *which: str) -> None:
    """Log scale with labels on a few plain numbers only (matplotlib's minor labels overlap on short ranges)."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    for name in which:
        axis = ax.xaxis if name == "x" else ax.yaxis
        (ax.set_xscale if name == "x" else ax.set_yscale)("log")
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())


# ----- sections ---------------------------------------------------------------------------------
def _search_manifest(search_dir: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((search_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _search_baselines(search_dir: Path) -> dict[str, Any]:
    return _search_manifest(search_dir).get("baselines") or {}


def fidelity_section(search_dir: Path) -> str:
    """How the search's quality signal ranked archs trained standalone (search.fidelity_archs), if measured."""
    fid = _search_manifest(search_dir).get("fidelity")
    if not fid:
        return ("<p>How far to trust the quality signal was not measured for this search (set "
                "<code>search.fidelity_archs</code>; docs/benchmarks.md has the default space's figures).</p>")
    return (f"<p>Quality signal vs standalone training on {fid['archs']} of the search's archs "
            f"({fid['standalone_steps']} steps each): Kendall τ {fid['kendall_tau']:.2f}, Spearman ρ "
            f"{fid['spearman_rho']:.2f}; the signal's favourite is {fid['signal_best_gap_pct']:.1f}% worse than "
            "their best.</p>" + _table([{"arch": r["arch"], "signal": f"{r['signal']:.4f}",
                                          "standalone": f"{r['standalone']:.4f}"} for r in fid["rows"]]))


def pareto_figure(search_dir: Path, best: dict[str, Any] | None, budget: float | None,
                  baselines: dict[str, Any] | None = None) -> str:
    import matplotlib.pyplot as plt

    trials = search_dir / "trials.csv"
    if not trials.is_file():
        return "<p><i>the search has not run</i></p>"
    df = pd.read_csv(trials)
    df = df[df["state"] == "COMPLETE"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    feas = df[df["feasible"].astype(bool)]
    ax.scatter(df["latency_ms"], df["quality"], s=12, c="#bbbbbb", label="over budget", zorder=1)
    front = search_dir / "pareto.csv"
    if front.is_file():
        f = pd.read_csv(front).sort_values("latency_ms")
        ax.step(f["latency_ms"], f["quality"], where="post", c="#c44e52", lw=1, alpha=0.7, zorder=2, label="Pareto front")
    # feasible trials above the front's line, hollow, so points on the front stay visible
    ax.scatter(feas["latency_ms"], feas["quality"], s=22, facecolors="none", edgecolors="#4c72b0", lw=1, zorder=3,
               label="within budget")
    for (name, b), marker in zip(sorted((baselines or {}).items()), ("s", "D", "^", "v")):
        if b.get("fits"):
            ax.scatter([b["latency_ms"]], [b["quality"]], s=60, marker=marker, c="#55a868", edgecolors="k", zorder=4,
                       label=f"baseline {name.replace('_', ' ')}")
    if best:
        ax.scatter([best["latency_ms"]], [best["quality"]], s=120, marker="*", c="gold", edgecolors="k", zorder=5,
                   label="chosen")
    if budget:
        ax.axvline(budget, ls="--", c="k", lw=1, label=f"budget {budget:.3g} ms")
    ax.set_xlabel("one generation, ms (predicted)")
    ax.set_ylabel("validation flow loss (lower is better)")
    ax.legend(fontsize=7)
    return _fig_to_img(fig)


def latency_figure(table_root: Path) -> str:
    """Predicted vs measured: the table's whole models (per step) and its timed generations, ±10% band."""
    import matplotlib.pyplot as plt

    from ditnas.latency_models.stage import load_predictor, table_generations

    table, predictor = load_predictor(table_root)
    points = []
    for r in table.model_rows().itertuples(index=False):
        points.append(("per step", float(r.p50), predictor.predict(table.space.parse(r.arch, source="report"))))
    gens = table_generations(table_root)
    if gens is not None:
        for r in gens.itertuples(index=False):
            arch = table.space.parse(r.arch, source="report")
            points.append((f"{r.guidance} @ {r.steps} steps", float(r.p50), predictor.predict_generation(arch, int(r.steps), r.guidance)))
    if not points:
        return "<p><i>the table holds no whole-model rows</i></p>"
    fig, ax = plt.subplots(figsize=(5.5, 5))
    lo, hi = min(min(p[1], p[2]) for p in points), max(max(p[1], p[2]) for p in points)
    grid = [lo * 0.8, hi * 1.2]
    ax.plot(grid, grid, "k-", lw=0.8)
    ax.fill_between(grid, [g * 0.9 for g in grid], [g * 1.1 for g in grid], color="#dddddd", label="±10%")
    for label in dict.fromkeys(p[0] for p in points):
        sel = [p for p in points if p[0] == label]
        ax.scatter([p[1] for p in sel], [p[2] for p in sel], s=16, label=label)
    _log_axes(ax, "x", "y")
    ax.set_xlabel("measured ms")
    ax.set_ylabel("predicted ms")
    ax.set_title(f"{table.describe()} (in-sample)", fontsize=8)
    ax.legend(fontsize=7)
    return _fig_to_img(fig)


def layout_figure(arch: Any) -> str:
    """Slots coloured by operator, bar height by width, half-resolution stages shaded."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(arch.slots)), 2.2))
    for i, slot in enumerate(arch.slots):
        if slot.stage == 1:
            ax.axvspan(i - 0.5, i + 0.5, color="#f3f3f3", zorder=0)
        height = 0.15 if slot.is_skip else slot.width
        ax.bar(i, height, color=OP_COLOURS.get(slot.op, "#999999"), edgecolor="k", lw=0.5)
        ax.text(i, height + 0.03, "skip" if slot.is_skip else f"{slot.op}\n×{slot.mlp_ratio:g}", ha="center", fontsize=7)
    ax.set_xticks(range(len(arch.slots)))
    ax.set_ylim(0, 1.45)
    ax.set_ylabel("width")
    ax.set_xlabel("slot (shaded: half resolution)")
    return _fig_to_img(fig)


def breakdown_figure(table_root: Path, arch: Any) -> str:
    import matplotlib.pyplot as plt

    from ditnas.latency_models.stage import load_predictor

    _, predictor = load_predictor(table_root)
    cost = predictor.decompose(arch)
    labels = [c.cell.key().split(":n")[0] for c in cost.cells] + ["fixed"]
    values = [c.ms for c in cost.cells] + [cost.fixed_ms]
    fig, ax = plt.subplots(figsize=(6.5, 0.25 * len(labels) + 1))
    ax.barh(range(len(labels)), values, color=["#4c72b0" if "block" in label else "#999999" for label in labels])
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    label = f"ms per denoiser call as profiled (interleaved, calibrated); total {cost.total_ms:.3g} ms"
    steps = getattr(arch, "steps", None)
    try:  # back-to-back calls in a generation run faster than interleaved ones: say what the search priced
        gen = predictor.predict_generation(arch, steps, "none") if steps else None
        label += f"\na {steps}-step generation (no guidance) is priced at {gen:.3g} ms ({gen / steps:.3g} ms per step)"
    except (DitnasError, KeyError, TypeError, ValueError):
        pass
    ax.set_xlabel(label)
    return _fig_to_img(fig)


def curves_figure(frame: pd.DataFrame, columns: list[str], title: str) -> str:
    import matplotlib.pyplot as plt

    cols = [c for c in columns if c in frame.columns]
    if frame.empty or not cols:
        return f"<p><i>no {title} curves</i></p>"
    fig, ax = plt.subplots(figsize=(6.5, 3))
    x = frame["step"] if "step" in frame.columns else range(len(frame))
    for c, style in zip(cols, ("-", "--", ":", "-.") * 4):  # line styles: equal curves stay visible
        ax.plot(x, frame[c].rolling(10, min_periods=1).mean(), style, lw=1.4, label=c)
    _log_axes(ax, "y")
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _fig_to_img(fig)


def save_samples(x: Any, out: Path, per_class: int) -> Path:
    """Class-major samples as a PNG: a grid of `per_class` columns for images; for clips (N, C, T, H, W), T > 1,
    a frame strip (video_quality.save_frame_strip) of each class's first clip, one row per class, a frame a column,
    and beside it (`out` with suffix .gif) those clips animated side by side (video_quality.save_gif)."""
    from ditnas.supernet.quality import save_grid

    if x.dim() == 5 and x.shape[2] > 1:
        from ditnas.video_quality import save_frame_strip, save_gif

        firsts = x[::per_class]
        save_gif(firsts, Path(out).with_suffix(".gif"), max_clips=firsts.shape[0])
        return save_frame_strip(firsts, out, max_clips=firsts.shape[0])
    return save_grid(x, out, nrow=per_class)


def subnet_grid(folder: Path, out: Path, steps: int, cfg_scale: float) -> str:
    """Samples of every class from an extracted / pruned / distilled subnet (eager, `steps` Euler steps);
    the PNG is kept and redrawn only when the subnet file is newer."""
    import torch

    from ditnas.supernet.extract import SUBNET_NAME, load_subnet
    from ditnas.supernet.quality import generate

    source = folder / SUBNET_NAME
    if not (out.is_file() and source.is_file() and out.stat().st_mtime >= source.stat().st_mtime):
        sub = load_subnet(folder)
        classes = sub.arch.num_classes
        labels = torch.arange(classes).repeat_interleave(4)
        with torch.no_grad():
            x = generate(sub, labels, tuple(sub.arch.latent), steps=steps, cfg_scale=cfg_scale,
                         null_label=classes, seed=0)
        save_samples(x, out, per_class=4)
    return _with_gif(out)


def streamed_student_grid(folder: Path, out: Path) -> tuple[str, dict[str, Any]] | None:
    """The video_2in1 student (`<run>/distill`, compress/video_distill.py) generating as it was trained: streamed
    chunk by chunk (`rollout`, eager torch) on its manifest's sampler; None for another distillation."""
    import torch

    from ditnas.compress.video_distill import KIND, rollout
    from ditnas.manifest import MANIFEST, read_manifest
    from ditnas.supernet.extract import SUBNET_NAME, load_subnet
    from ditnas.supernet.flow import time_grid
    from ditnas.supernet.streaming import Streamer

    if not (folder / MANIFEST).is_file():
        return None
    manifest = read_manifest(folder)
    sampler = manifest.get("sampler") or {}
    if manifest.get("kind") != KIND or "chunk" not in sampler:
        return None
    source = folder / SUBNET_NAME
    if not (out.is_file() and source.is_file() and out.stat().st_mtime >= source.stat().st_mtime):
        sub = load_subnet(folder)
        classes = sub.arch.num_classes
        labels = torch.arange(max(classes, 1)).repeat_interleave(4)
        noise = torch.randn((labels.shape[0], *sub.arch.latent), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            x = rollout(Streamer(sub, int(sampler["chunk"])), noise, labels,
                        time_grid(int(sampler["steps"]), float(sampler["shift"]))).clip.clamp(-1, 1)
        save_samples(x, out, per_class=4)
    return _with_gif(out), sampler


def student_grid(pte: Path, out: Path) -> tuple[str, dict[str, Any]]:
    """Samples of every class from the exported .pte, generated on this host's ExecuTorch runtime."""
    import torch

    from ditnas.compress.export import generate_from_pte

    images, timings = [], []
    for label in range(10):
        imgs, timing = generate_from_pte(pte, label=label, n=4, seed=label)
        images.append(imgs)
        timings.append(timing["median_ms"])
    samples = torch.cat(images)
    grid = save_samples(samples, out, per_class=4)
    per = "clip" if samples.dim() == 5 and samples.shape[2] > 1 else "image"  # a clip's frames come from one call
    return _with_gif(grid), {"median_ms_per_image": sorted(timings)[len(timings) // 2], "steps": timing["steps"], "per": per}


# ----- the document -------------------------------------------------------------------------------
CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}
h2{border-bottom:1px solid #ddd;margin-top:2em}img{max-width:100%;height:auto}.grid{display:flex;flex-wrap:wrap;gap:1em}.grid figure{margin:0;flex:1 1 30%;min-width:240px}
.grid img{vertical-align:top;image-rendering:pixelated}code{background:#f4f4f4}"""


# Published on-device figures (SnapGen++, arXiv 2601.08303, Tab. 2 and its supplement: iPhone 16 Pro Max, Core ML,
# 1024x1024 images, text-to-image). Shown apart from this run's figures, labelled "paper": never measured here.
IMAGE_NOTE = "K-DMD student; the image time includes the VAE decoder (120 ms) and overhead (supp. table)"
PAPER_ROWS = (
    {"model": "SnapGen (U-Net, 0.4B)", "figure": "one denoiser forward", "ms": 274.0, "note": "28-step base model"},
    {"model": "SnapGen++ tiny (DiT, 0.3B)", "figure": "one step / one 4-step image", "ms": "280 / 1200", "note": IMAGE_NOTE},
    {"model": "SnapGen++ small (DiT, 0.4B)", "figure": "one step / one 4-step image", "ms": "360 / 1800", "note": IMAGE_NOTE},
    {"model": "SnapGen++ full (DiT, 1.6B, 4-bit)", "figure": "one step / one 4-step image", "ms": "1580 / 6700",
     "note": IMAGE_NOTE + "; palettized weights"},
)
PAPER_DEVICE = "iPhone 16 Pro Max, Core ML (published)"


def latency_figures(stages: dict[str, Any], table_root: Path) -> list[dict[str, Any]]:
    """Every latency this run produced, each naming its device and whether it was measured or predicted."""
    device = "?"
    try:
        ident = read_json(table_root / "table.json", missing="", damaged="").get("identity", {})
        device = (f"{ident.get('device_id', '?')} {ident.get('device_model', '')}, {ident.get('backend', '?')}, "
                  f"{ident.get('threads', '?')} thread(s)")
    except (DitnasError, AttributeError):  # no or a damaged table: the figures still show, device unknown
        pass
    rows = []
    search = (stages.get("search") or {}).get("metrics") or {}
    if search.get("max_net_ms") is not None:
        kind = "measured" if "measured" in str(search.get("budget_source", "")) else "predicted"
        rows.append({"figure": "max net, one generation (search's reference)", "ms": search["max_net_ms"], "device": device,
                     "kind": kind})
    if search.get("budget_ms") is not None:
        rows.append({"figure": "search budget, one generation", "ms": search["budget_ms"], "device": device,
                     "kind": "budget (" + str(search.get("budget_source", "")) + ")"})
    best = ((stages.get("search") or {}).get("outputs") or {}).get("best")
    if best:
        rows.append({"figure": f"chosen arch, {best.get('steps')} steps", "ms": best.get("latency_ms"), "device": device,
                     "kind": "predicted"})
    timing = ((stages.get("export") or {}).get("metrics") or {}).get("timing") or {}
    if timing.get("pte_generation_ms") is not None:
        where = f"{timing.get('device', {}).get('host', 'this host')}, ExecuTorch XNNPACK, {timing.get('threads')} thread(s)"
        rows.append({"figure": f"student .pte (host loop), one {timing.get('steps')}-step generation",
                     "ms": timing["pte_generation_ms"], "device": where, "kind": "measured"})
        choice = ((stages.get("export") or {}).get("metrics") or {}).get("sampler") or {}
        if choice.get("unrolled_ms") is not None:  # timed side by side in their own processes: compare these two
            rows.append({"figure": f"sampler comparison, one {timing.get('steps')}-step generation: unrolled / host loop "
                                   f"({choice.get('shipped')} shipped)",
                         "ms": f"{choice['unrolled_ms']:.4g} / {choice['host_loop_ms']:.4g}", "device": where, "kind": "measured"})
        rows.append({"figure": f"student in eager torch, one {timing.get('steps')}-step generation",
                     "ms": timing.get("eager_generation_ms"), "device": where.replace("ExecuTorch XNNPACK", "eager torch"),
                     "kind": "measured"})
    return rows


def clip_note(table_root: Path, streamed: bool = False) -> str:
    """For a video run (latent T > 1): the clip shape, and which latency the search priced: one streamed clip
    (`streamed`: search.stream_chunk) or whole-clip calls; compression and export figures are whole-clip calls."""
    manifest = table_root / "table.json"
    if not manifest.is_file():
        return ""
    try:
        space = (read_json(manifest, missing="", damaged="") or {}).get("space") or {}
    except DitnasError:
        return ""  # the latency section says what is wrong with the table
    shape = space.get("latent") or []
    if len(shape) != 4 or int(shape[1]) <= 1:
        return ""
    c, t, h, w = (int(v) for v in shape)
    priced = (f"The search priced ONE STREAMED CLIP (chunk by chunk, its latency definition below); the pruning and "
              f"export latencies are of the whole clip (one call denoises all {t} frames)" if streamed else
              f"Every latency here is of the whole clip (one call denoises all {t} frames), not the per-chunk time of "
              "streaming")
    return (f"<p>Data: video clips, (C, T, H, W) = ({c}, {t}, {h}, {w}). {priced}; samples show each clip as a "
            "frame strip (a row per clip, a column per frame) with the clips animated beside it (GIF).</p>")


def write_report(run_dir: Path) -> Path:
    """Write `<run_dir>/report.html` from the run's artifacts; returns its path."""
    run_dir = Path(run_dir)
    manifest = read_json(run_dir / "run.json", missing=f"{run_dir} is not a ditnas run folder (no run.json); pass the "
                         "folder `ditnas run --out` wrote", damaged="rerun `ditnas run` on the same --out")
    stages = manifest.get("stages", {})
    parts = [f"<h1>ditnas run report</h1><p>run folder <code>{html.escape(str(run_dir.resolve()))}</code>, "
             f"updated {html.escape(str(manifest.get('updated', '')))}</p>"]
    parts.append("<h2>Stages</h2>" + _table([{"stage": k, "status": v.get("status"), "wall s": v.get("wall_s"),
                                             "redone because": "; ".join(v.get("redone_because", []))}
                                            for k, v in stages.items()]))
    streamed = str(((stages.get("search") or {}).get("metrics") or {}).get("latency_definition", "")).startswith(
        "one streamed clip")
    parts.append(clip_note(Path(((stages.get("profile") or {}).get("outputs") or {}).get("table", run_dir / "profile" / "table")),
                           streamed))
    search = stages.get("search", {})
    best = (search.get("outputs") or {}).get("best")
    budget = (search.get("metrics") or {}).get("budget_ms")
    if search:
        m = search.get("metrics", {})
        parts.append(f"<h2>Search</h2><p>budget {budget:.4g} ms ({html.escape(str(m.get('budget_source')))}; max net "
                     f"{m.get('max_net_ms', float('nan')):.4g} ms). Latency = {html.escape(str(m.get('latency_definition')))}.</p>")
        if best:
            picked = _search_manifest(run_dir / "search").get("best_by", "signal")
            parts.append(f"<p>chosen: <code>{html.escape(best['arch'])}</code> — {best['latency_ms']:.4g} ms, loss "
                         f"{best['quality']:.4g} at {best['steps']} steps (picked by {html.escape(str(picked))})</p>")
        baselines = _search_baselines(run_dir / "search")
        if baselines:
            parts.append("<p>baselines at the same budget (priced and scored as the trials):</p>" + _table(
                [{"baseline": k, "arch": b.get("arch", ""), "ms": b.get("latency_ms", ""), "loss": b.get("quality", ""),
                  "note": b.get("note", "")} for k, b in sorted(baselines.items())]))
        parts.append(pareto_figure(run_dir / "search", best, budget, baselines))
        parts.append(fidelity_section(run_dir / "search"))
    profile = stages.get("profile", {})
    table_root = Path((profile.get("outputs") or {}).get("table", run_dir / "profile" / "table"))
    if (table_root / "table.json").exists():
        parts.append("<h2>Latency: predicted vs measured</h2>" + latency_figure(table_root))
        if best:
            from ditnas.latency_models.stage import load_predictor

            table, _ = load_predictor(table_root)
            arch = table.space.parse(best["arch"], source="report")
            parts.append("<h2>Chosen arch</h2>" + layout_figure(arch) + breakdown_figure(table_root, arch))
    parts.append("<h2>Training curves</h2>" + curves_figure(_jsonl(run_dir / "train" / "metrics.jsonl"),
                                                            ["loss_max", "loss_subnets", "distill"], "supernet"))
    dist = _jsonl(run_dir / "distill" / "metrics.jsonl")
    parts.append(curves_figure(dist, [c for c in dist.columns if "loss" in c], "step distillation"))
    grids = []
    # `ditnas run` draws it in the quality stage; an older run folder has it in train/
    grid = next((p for p in (run_dir / "quality" / "samples_max.png", run_dir / "train" / "samples_max.png") if p.is_file()), None)
    if grid is not None:
        grids.append(f"<figure>{_with_gif(grid)}<figcaption>max net, supernet weights</figcaption></figure>")
    steps, cfg_scale = 28, float((manifest.get("config") or {}).get("sample", {}).get("cfg_scale", 2.0))
    for stage, key, caption in (("extract", "chosen", "chosen subnet, supernet weights"),
                                ("prune", "subnet", "pruned subnet"), ("kd", "subnet", "chosen subnet after KD")):
        record = stages.get(stage, {})
        folder = (record.get("outputs") or {}).get(key)
        if record.get("status") != "done" or not folder or not Path(folder).is_dir():
            if stage == "prune" and record.get("status") == "skipped":
                grids.append(f"<figure><p><i>not pruned: {html.escape(str(record.get('metrics', {}).get('reason', '')))}"
                             "</i></p><figcaption>pruned subnet</figcaption></figure>")
            continue
        try:
            img = subnet_grid(Path(folder), run_dir / f"report_{stage}.png", steps, cfg_scale)
            grids.append(f"<figure>{img}<figcaption>{caption}, {steps} steps, CFG {cfg_scale:g}</figcaption></figure>")
        except DitnasError as exc:
            grids.append(f"<p>{caption} samples unavailable: {html.escape(str(exc))}</p>")
    distilled = ((stages.get("distill") or {}).get("outputs") or {}).get("subnet")
    if distilled and Path(distilled).is_dir():
        try:
            streamed = streamed_student_grid(Path(distilled), run_dir / "report_distill_stream.png")
            if streamed is not None:
                img, sampler = streamed
                grids.append(f"<figure>{img}<figcaption>{sampler['steps']}-step streaming student as trained: "
                             f"{sampler['chunk']} frame(s) per chunk on its own cache (eager torch); the .pte below "
                             "runs the whole-clip sampler</figcaption></figure>")
        except DitnasError as exc:
            grids.append(f"<p>streaming student samples unavailable: {html.escape(str(exc))}</p>")
    export = stages.get("export", {})
    pte = (export.get("outputs") or {}).get("pte")
    if pte and Path(pte).is_file():
        try:
            img, timing = student_grid(Path(pte), run_dir / "report_student.png")
            grids.append(f"<figure>{img}<figcaption>{timing['steps']}-step student from the .pte on the ExecuTorch runtime "
                         f"({timing['median_ms_per_image']:.3g} ms per {timing['per']}, 1 thread, this host)</figcaption></figure>")
        except DitnasError as exc:
            grids.append(f"<p>student samples unavailable: {html.escape(str(exc))}</p>")
    parts.append("<h2>Samples</h2><div class='grid'>" + ("".join(grids) or "<p><i>none yet</i></p>") + "</div>")
    parts.append("<h2>Latency figures</h2><p>this run, on the devices named:</p>" + _table(latency_figures(stages, table_root)))
    parts.append(f"<p>published, for scale (not measured by ditnas; 1024&times;1024 text-to-image on {PAPER_DEVICE}):</p>"
                 + _table([{**r, "device": PAPER_DEVICE, "kind": "paper"} for r in PAPER_ROWS]))
    rows = [{"stage": k, **{mk: mv for mk, mv in (v.get("metrics") or {}).items() if not isinstance(mv, (dict, list))}}
            for k, v in stages.items()]
    parts.append("<h2>Stage metrics</h2>" + _table(rows))
    parts.append(f"<h2>Versions</h2>{_table([manifest.get('versions', {})])}")
    doc = f"<!doctype html><html><head><meta charset='utf-8'><title>ditnas run</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>"
    path = run_dir / "report.html"
    atomic_write_text(path, doc)
    return path
