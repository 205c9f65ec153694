"""Benchmark: does the search's quality signal rank archs the way training them would?

Draws archs across the default space with a seed (max and min reported apart from the random ones),
trains each standalone for `train.steps` steps (the ground truth: EMA val flow loss on the fixed
n=512 eval batch, seed 1234), measures the standalone seed-to-seed spread on a few archs × 2 seeds,
and scores three signals (ditnas/search/signals.py) against it:

- supernet: weight-sharing loss of a supernet trained with the default config (trained here into
  --work, or --checkpoint);
- proxy: the arch trained from scratch for --proxy-steps (evaluated inside the ground-truth run at
  that step: the first N steps of the long run ARE an N-step run, same data order/noise/seed; the
  signal cache is filled on the way and the test suite checks equality with an independent run);
- finetune: the arch extracted from that supernet and fine-tuned --finetune-steps steps.

    python bench/fidelity.py --out bench/results/fidelity.json [--checkpoint ckpt.pt] [--jobs 2] [--archs 12]

Training runs in --jobs worker processes (1 torch thread each) and every result goes through the
signal cache in --work/search_cache, so an interrupted run resumes where it stopped. Prints a table and
writes JSON (written as `"partial": true` after every finished job, final at the end).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from common import machine, report

from ditnas.config import load_config
from ditnas.data import load_split
from ditnas.io import file_sha256, write_json
from ditnas.supernet.flow import EVAL_SEED, VAL_BATCH, fixed_eval_batch
from ditnas.supernet.train import CHECKPOINT_NAME, build_space, build_supernet, load_supernet, train_supernet

DEFAULT_SEARCH_TRIALS = 64  # SearchConfig.trials: what one default search evaluates


# ----- rank statistics ------------------------------------------------------------------------
def kendall_tau(a: list[float], b: list[float]) -> float:
    from scipy.stats import kendalltau

    return float(kendalltau(a, b).statistic)  # tau-b (ties counted once)


def spearman_rho(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def best_at_budget(signal: list[float], truth: list[float], cost: list[float], budgets: list[float],
                   tolerance_pct: float) -> dict[str, Any]:
    """Per budget: the signal's best arch among those with cost <= budget, and whether its standalone
    loss is the best there (strict) or within `tolerance_pct` of the best (agreement)."""
    rows = []
    for budget in budgets:
        fit = [i for i, c in enumerate(cost) if c <= budget]
        pick = min(fit, key=lambda i: signal[i])
        best = min(fit, key=lambda i: truth[i])
        rows.append({"budget": budget, "archs_fit": len(fit), "signal_pick": pick, "standalone_best": best,
                     "pick_gap_pct": 100.0 * (truth[pick] - truth[best]) / truth[best],
                     "strict": pick == best, "agree": truth[pick] <= truth[best] * (1 + tolerance_pct / 100.0)})
    return {"agreement": sum(r["agree"] for r in rows) / len(rows),
            "agreement_strict": sum(r["strict"] for r in rows) / len(rows), "per_budget": rows}


# ----- jobs (run in worker processes) ---------------------------------------------------------
def _env(overrides: list[str]):
    cfg = load_config(None, overrides)
    split = load_split(cfg.data)
    space = build_space(cfg, split)
    batch = fixed_eval_batch(split.val_x, split.val_y, VAL_BATCH, seed=EVAL_SEED, null_label=space.num_classes)
    return cfg, split, space, batch


def _signal(kind: str, cfg, split, batch, cache: Path, *, supernet=None, sha=None, seed=None, steps=0):
    from ditnas.search.signals import make_signal

    return make_signal(kind, steps, supernet, batch, cfg=cfg, split=split, cache_dir=cache, checkpoint_sha256=sha,
                       eval_seed=EVAL_SEED, seed=seed, threads=1)


def job(spec: dict[str, Any]) -> dict[str, Any]:
    """One unit of work: train the supernet, or one (signal, arch, seed) training curve."""
    torch.set_num_threads(1)
    cfg, split, space, batch = _env(spec["overrides"])
    start = time.perf_counter()
    if spec["kind"] == "supernet_train":
        out = Path(spec["work"]) / "supernet"
        timing = out / "timing.json"
        if (out / CHECKPOINT_NAME).exists() and timing.exists():
            return {**spec, **json.loads(timing.read_text()), "reused": True}
        (out / CHECKPOINT_NAME).unlink(missing_ok=True)  # a partial run would not be timed honestly
        cfg = replace(cfg, train=replace(cfg.train, checkpoint_every=0, threads=1))
        trainer = train_supernet(cfg, out, split=split)
        result = {"seconds": time.perf_counter() - start, "steps": trainer.step}
        write_json(timing, result)
        return {**spec, **result, "reused": False}
    arch = space.parse(spec["arch"], source="bench")
    supernet = sha = None
    if spec["kind"] == "finetune":
        supernet, _, _ = load_supernet(Path(spec["checkpoint"]))
        sha = spec["sha"]
    sig = _signal(spec["kind"], cfg, split, batch, Path(spec["cache"]), supernet=supernet, sha=sha, seed=spec["seed"])
    curve = sig.curve(arch, spec["at"])
    return {**spec, "curve": {str(k): v for k, v in curve.items()}, "trained_steps": sig.trained_steps,
            "seconds": time.perf_counter() - start}


# ----- the benchmark --------------------------------------------------------------------------
def draw_archs(space, n: int, seed: int) -> dict[str, Any]:
    archs = {"max": space.max_arch(), "min": space.min_arch()}
    rng = random.Random(seed)
    seen = {space.max_arch().layout(), space.min_arch().layout()}
    i = 0
    while len(archs) < n:
        a = space.sample(rng)
        if a.layout() not in seen:
            seen.add(a.layout())
            archs[f"r{i}"] = a
            i += 1
    return archs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a supernet trained with the default config (default: train one)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench_fidelity"), help="scratch folder (supernet, signal cache)")
    parser.add_argument("--archs", type=int, default=12, help="archs drawn: max, min and archs-2 random")
    parser.add_argument("--arch-seed", type=int, default=0)
    parser.add_argument("--proxy-steps", type=int, default=200)
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--spread-archs", type=int, default=3, help="random archs trained with a second seed")
    parser.add_argument("--spread-seed", type=int, default=1)
    parser.add_argument("--budgets", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (1 torch thread each)")
    parser.add_argument("--timing-rounds", type=int, default=3, help="interleaved step timing: rounds")
    parser.add_argument("--timing-burst", type=int, default=5, help="interleaved step timing: steps per burst")
    parser.add_argument("--set", action="append", default=[], help="config override section.field=value")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    load_at_start = machine()["loadavg_at_start"]

    overrides = list(args.set)
    cfg, split, space, batch = _env(overrides)
    truth_steps = cfg.train.steps
    archs = draw_archs(space, args.archs, args.arch_seed)
    names = list(archs)
    random_names = [n for n in names if n.startswith("r")]
    spread_names = random_names[: args.spread_archs]
    cache = args.work / "search_cache"
    from ditnas.latency_models.flops import arch_macs_analytic

    ref = build_supernet(cfg, space)
    macs = {n: int(arch_macs_analytic(ref, a)) for n, a in archs.items()}
    params = {n: int(ref.extract(a).num_params()) for n, a in archs.items()}
    del ref

    # evaluated on the way of each ground-truth run (free): the proxy at other step counts
    proxy_at = sorted({s for s in (50, 100, 500) if s < truth_steps} | {args.proxy_steps, truth_steps})
    finetune_at = sorted({0, 50, 100, args.finetune_steps})
    base = {"overrides": overrides, "cache": str(cache), "work": str(args.work)}
    ckpt = args.checkpoint or args.work / "supernet" / CHECKPOINT_NAME
    done: dict[str, dict] = {}
    supernet_info: dict[str, Any] = {"source": "given" if args.checkpoint else "trained here"}

    def summarize(final: bool) -> dict[str, Any]:
        return summary(args, cfg, space, batch, archs, names, random_names, spread_names, macs, params, done,
                       ckpt, supernet_info, proxy_at, finetune_at, truth_steps, cache, final, started, load_at_start)

    def spec(kind: str, name: str, seed: int | None, at: list[int]) -> dict[str, Any]:
        return {**base, "kind": kind, "name": name, "arch": str(archs[name]), "seed": seed, "at": at}

    truth = sorted(names, key=lambda n: -macs[n])  # longest first: better packing over the workers
    queue = [] if args.checkpoint else [{**base, "kind": "supernet_train", "name": "supernet"}]
    queue += [spec("proxy", n, None, proxy_at) for n in truth]
    later = [spec("proxy", n, args.spread_seed, [args.proxy_steps, truth_steps]) for n in spread_names]

    def finetune_specs() -> list[dict]:
        sha = file_sha256(ckpt)
        return [{**spec("finetune", n, None, finetune_at), "checkpoint": str(ckpt), "sha": sha} for n in names]

    if args.checkpoint:
        queue += finetune_specs()
    queue += later
    def finished(r: dict[str, Any]) -> list[dict]:
        key = r["kind"] if r["kind"] == "supernet_train" else f"{r['kind']}:{r['name']}:{r['seed']}"
        done[key] = r
        print(f"[{time.time() - started:7.0f}s] done {key} ({r.get('seconds', 0):.0f}s)", flush=True)
        more = []
        if r["kind"] == "supernet_train":
            supernet_info.update({"seconds": r["seconds"], "steps": r["steps"], "reused_from_earlier_run": r["reused"]})
            more = finetune_specs()
        write_json(args.out, summarize(False))
        return more

    if args.jobs <= 1:  # in this process, in order
        while queue:
            queue = finished(job(queue[0])) + queue[1:]
    else:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            running = [pool.apply_async(job, (s,)) for s in queue]
            while running:
                ready = [r for r in running if r.ready()]
                running = [r for r in running if all(r is not x for x in ready)]
                for r in ready:
                    running += [pool.apply_async(job, (s2,)) for s2 in finished(r.get())]
                if not ready:
                    time.sleep(2)
    # step costs measured side by side (alternating bursts), so load from other processes hits all alike;
    # the wall times of the runs above were taken under whatever load the machine had at the time
    from supernet import interleaved_step_seconds

    print("timing steps in interleaved bursts ...", flush=True)
    step_seconds = interleaved_step_seconds(cfg, split, archs, rounds=args.timing_rounds, burst=args.timing_burst)
    supernet_info["interleaved_step_seconds"] = step_seconds
    result = summarize(True)
    rows = [(f"{sig} τ / τ random / ρ / agreement", f"{v['kendall_tau']:.2f} / {v['kendall_tau_random_only']:.2f} / "
             f"{v['spearman_rho']:.2f} / {v['best_at_budget_agreement']:.2f}") for sig, v in result["signals"].items()]
    rows += [(f"{sig} mean gap % / compute s", f"{v['gap_pct_mean']:.1f} / {v['compute']['seconds']:.0f}")
             for sig, v in result["signals"].items()]
    rows += [("standalone seed spread % (max / mean)", f"{result['standalone_seed_spread_pct']:.2f} / "
              f"{result['standalone_seed_spread_pct_mean']:.2f}"),
             ("between-arch spread % (random archs)", f"{result['standalone_between_arch_spread_pct_random']:.2f}")]
    print()
    print(f"{'arch':<5} {'MMACs':>7} {'standalone':>10} {'supernet':>9} {'proxy':>8} {'finetune':>9}  layout")
    for row in result["archs"]:
        print(f"{row['name']:<5} {row['macs'] / 1e6:>7.2f} {row['standalone']:>10.4f} {row['supernet']:>9.4f} "
              f"{row['proxy']:>8.4f} {row['finetune']:>9.4f}  {row['arch']}")
    report(rows, result, args.out)


def summary(args, cfg, space, batch, archs, names, random_names, spread_names, macs, params, done, ckpt, supernet_info,
            proxy_at, finetune_at, truth_steps, cache, final, started, load_at_start) -> dict[str, Any]:
    """The JSON result from whatever has finished (`partial` until every job is done)."""

    def curve(kind: str, name: str, seed=None) -> dict[str, dict] | None:
        r = done.get(f"{kind}:{name}:{seed}")
        return None if r is None else r["curve"]

    def value(kind: str, name: str, steps: int, weights: str = "ema", seed=None) -> float | None:
        c = curve(kind, name, seed)
        return None if c is None or str(steps) not in c else float(c[str(steps)][weights])

    supernet_loss: dict[str, float] = {}
    if ckpt.exists() and ("supernet_train" in done or args.checkpoint):
        from ditnas.search.signals import make_signal

        model, _, _ = load_supernet(ckpt)
        sig = make_signal("supernet", 0, model, batch, threads=1)
        supernet_loss = {n: sig(a) for n, a in archs.items()}

    truth = {n: value("proxy", n, truth_steps) for n in names}
    have = [n for n in names if truth[n] is not None]
    result: dict[str, Any] = {"benchmark": "fidelity", "partial": not final, "date": time.strftime("%Y-%m-%d"),
                              "truth": f"standalone from scratch, {truth_steps} steps, EMA weights, val flow loss "
                                       f"n={VAL_BATCH} seed {EVAL_SEED}, train.seed {cfg.train.seed}",
                              "archs_drawn": len(names), "arch_seed": args.arch_seed, "archs_trained": len(have)}

    # seed spread
    spreads = {}
    for n in spread_names:
        a, b = value("proxy", n, truth_steps), value("proxy", n, truth_steps, seed=args.spread_seed)
        if a is not None and b is not None:
            spreads[n] = {"seed0": a, f"seed{args.spread_seed}": b, "spread_pct": 100.0 * abs(a - b) / ((a + b) / 2)}
    proxy_spreads = {}
    for n in spread_names:
        a, b = value("proxy", n, args.proxy_steps), value("proxy", n, args.proxy_steps, seed=args.spread_seed)
        if a is not None and b is not None:
            proxy_spreads[n] = 100.0 * abs(a - b) / ((a + b) / 2)
    spread = max((s["spread_pct"] for s in spreads.values()), default=None)
    result["standalone_seed_spread_pct"] = spread
    result["standalone_seed_spread_pct_mean"] = statistics.mean(s["spread_pct"] for s in spreads.values()) if spreads else None
    result["standalone_seed_spread"] = spreads
    result[f"proxy{args.proxy_steps}_seed_spread_pct"] = proxy_spreads
    rnd = [truth[n] for n in random_names if truth[n] is not None]
    result["standalone_between_arch_spread_pct_random"] = (
        100.0 * (max(rnd) - min(rnd)) / min(rnd) if len(rnd) > 1 else None)
    result["standalone_between_arch_stdev_pct_random"] = (
        100.0 * statistics.stdev(rnd) / statistics.mean(rnd) if len(rnd) > 2 else None)

    # budgets: analytic MACs of one forward (ditnas.latency_models.flops.arch_macs_analytic) as the latency proxy
    # from the second-cheapest arch's cost (below it only the cheapest fits: a choice of one) to the dearest
    costs = sorted(macs[n] for n in names)
    lo, hi = costs[1], costs[-1]
    budgets = [lo + k * (hi - lo) / (args.budgets - 1) for k in range(args.budgets)]
    result["budgets"] = {"cost": "analytic MACs of one forward (arch_macs_analytic), no latency table",
                         "rule": f"{args.budgets} evenly spaced from the second-cheapest drawn arch's MACs to the dearest's "
                                 "(so at least 2 archs fit each budget)",
                         "macs": budgets,
                         "tolerance": "within standalone_seed_spread_pct (the max over the seed pairs) of standalone's best"}

    # signals
    cand: dict[str, dict[str, float | None]] = {
        "supernet": {n: supernet_loss.get(n) for n in names},
        "proxy": {n: value("proxy", n, args.proxy_steps) for n in names},
        "finetune": {n: value("finetune", n, args.finetune_steps) for n in names},
    }
    extra: dict[str, dict[str, float | None]] = {}
    for s in proxy_at:
        for w in ("ema", "raw"):
            extra[f"proxy{s}_{w}"] = {n: value("proxy", n, s, w) for n in names}
    for s in finetune_at:
        for w in ("ema", "raw"):
            extra[f"finetune{s}_{w}"] = {n: value("finetune", n, s, w) for n in names}

    def metrics(values: dict[str, float | None], full: bool) -> dict[str, Any] | None:
        use = [n for n in have if values.get(n) is not None]
        if len(use) < 3:
            return None
        sig, tru = [values[n] for n in use], [truth[n] for n in use]
        ru = [n for n in use if n in random_names]
        out = {"archs": len(use), "kendall_tau": kendall_tau(sig, tru), "spearman_rho": spearman_rho(sig, tru),
               "kendall_tau_random_only": kendall_tau([values[n] for n in ru], [truth[n] for n in ru]) if len(ru) > 2 else None,
               "spearman_rho_random_only": spearman_rho([values[n] for n in ru], [truth[n] for n in ru]) if len(ru) > 2 else None,
               "gap_pct_mean": statistics.mean(100.0 * (values[n] - truth[n]) / truth[n] for n in use)}
        if full:
            out["gap_pct"] = {n: 100.0 * (values[n] - truth[n]) / truth[n] for n in use}
            out["gap_pct_mean_random_only"] = statistics.mean(out["gap_pct"][n] for n in ru) if ru else None
            if spread is not None and len(use) == len(names):
                b = best_at_budget(sig, tru, [macs[n] for n in use], budgets, spread)
                out["best_at_budget_agreement"] = b["agreement"]
                out["best_at_budget_agreement_strict"] = b["agreement_strict"]
                out["best_at_budget"] = [{**r, "signal_pick": use[r["signal_pick"]], "standalone_best": use[r["standalone_best"]]}
                                         for r in b["per_budget"]]
        return out

    # compute
    sn_steps = cfg.train.steps
    per_step = 1 + cfg.train.num_random + (1 if cfg.train.sampler in ("sandwich", "attentive") else 0)
    sn_seconds = supernet_info.get("seconds")
    proxy_seconds = [float(done[f"proxy:{n}:None"]["curve"][str(args.proxy_steps)]["seconds"])
                     for n in names if f"proxy:{n}:None" in done]
    ft_seconds = [float(done[f"finetune:{n}:None"]["curve"][str(args.finetune_steps)]["seconds"])
                  for n in names if f"finetune:{n}:None" in done]
    compute = {
        "supernet": {"train_steps": sn_steps, "subnets_per_step": per_step, "subnet_steps": sn_steps * per_step,
                     "seconds": sn_seconds, "per_arch_steps": 0,
                     "note": "trained once for every arch; each scored arch then costs one forward"},
        "proxy": {"train_steps_per_arch": args.proxy_steps, "archs": len(names), "arch_steps": args.proxy_steps * len(names),
                  "seconds": sum(proxy_seconds) if len(proxy_seconds) == len(names) else None,
                  "seconds_per_arch_mean": statistics.mean(proxy_seconds) if proxy_seconds else None,
                  f"default_search_{DEFAULT_SEARCH_TRIALS}_trials_arch_steps": DEFAULT_SEARCH_TRIALS * args.proxy_steps,
                  f"default_search_{DEFAULT_SEARCH_TRIALS}_trials_seconds_estimate":
                      DEFAULT_SEARCH_TRIALS * statistics.mean(proxy_seconds) if proxy_seconds else None},
        "finetune": {"supernet_subnet_steps": sn_steps * per_step, "train_steps_per_arch": args.finetune_steps,
                     "archs": len(names), "arch_steps": args.finetune_steps * len(names),
                     "seconds": (sn_seconds + sum(ft_seconds)) if sn_seconds is not None and len(ft_seconds) == len(names) else None,
                     "seconds_finetune_only": sum(ft_seconds) if len(ft_seconds) == len(names) else None,
                     "seconds_per_arch_mean": statistics.mean(ft_seconds) if ft_seconds else None},
    }
    timed = supernet_info.get("interleaved_step_seconds")
    if timed:
        arch_step = [timed[n] for n in names]
        compute["supernet"]["seconds_at_interleaved_step_time"] = sn_steps * timed["supernet"]
        compute["proxy"]["seconds_at_interleaved_step_time"] = args.proxy_steps * sum(arch_step)
        compute["proxy"][f"default_search_{DEFAULT_SEARCH_TRIALS}_trials_seconds_at_interleaved_step_time"] = (
            DEFAULT_SEARCH_TRIALS * args.proxy_steps * statistics.mean(arch_step))
        compute["finetune"]["seconds_at_interleaved_step_time"] = (sn_steps * timed["supernet"]
                                                                   + args.finetune_steps * sum(arch_step))
        result["interleaved_step_seconds"] = timed
    result["signals"] = {}
    for kind, values in cand.items():
        m = metrics(values, True)
        if m is not None:
            m.setdefault("best_at_budget_agreement", None)
            m["compute"] = compute[kind]
            result["signals"][kind] = m
    result["finetune_gap_pct"] = result["signals"].get("finetune", {}).get("gap_pct_mean")
    result["curves"] = {k: m for k, v in extra.items() if (m := metrics(v, False)) is not None}
    result["archs"] = [{"name": n, "arch": archs[n].layout(), "macs": macs[n], "params": params[n], "standalone": truth[n],
                        "supernet": cand["supernet"][n], "proxy": cand["proxy"][n], "finetune": cand["finetune"][n],
                        "standalone_train_seconds": (curve("proxy", n) or {}).get(str(truth_steps), {}).get("seconds")}
                       for n in names]
    result["supernet"] = {**supernet_info, "checkpoint": str(ckpt)}
    jobs = [r for k, r in done.items() if k != "supernet_train"]
    result["provenance"] = {
        "train_steps_run_by_this_call": sum(int(r.get("trained_steps", 0)) for r in jobs),
        "jobs_served_from_signal_cache": sum(1 for r in jobs if int(r.get("trained_steps", 0)) == 0),
        "jobs": len(jobs),
        "note": "cached results keep the loss and training seconds measured when they were trained (an earlier "
                "call on the same --work); the supernet likewise (supernet.reused_from_earlier_run); "
                "interleaved_step_seconds is always measured by this call",
    }
    result["config"] = cfg.to_dict()
    result["wall_seconds"] = time.time() - started
    result["machine"] = machine("torch", "scipy", torch_threads=1, jobs=args.jobs, loadavg_at_bench_start=load_at_start)
    return result


if __name__ == "__main__":
    sys.exit(main())
