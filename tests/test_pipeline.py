"""`ditnas run` end to end on a tiny config (real training, a host-torch table, real search, KD, K-DMD,
an XNNPACK export and the report), then the resume contract: a rerun reuses every stage, a changed
search field redoes search and everything after it and run.json says why."""

from __future__ import annotations

import json

import pytest
from cli_helpers import run

from ditnas.search.threads import torch_threads

TINY = ["model.max_heads=2", "model.head_dim=8", "model.cond_dim=16", "model.cond_tokens=1", "space.depth=3",
        "space.stage_pattern=[0,1,0]", "space.skippable=[1]", "space.widths=[0.5,1.0]", "space.mlp_ratios=[2,4]",
        "space.ops=[sa,lcha]", "train.steps=30", "train.batch_size=16", "train.checkpoint_every=0",
        "train.warmup_steps=5", "latency.backend=host-torch", "latency.models=4", "latency.iters=3",
        "latency.warmup=1", "latency.generation_steps=[4]", "latency.generation_iters=2", "search.steps=[4]",
        "search.trials=4", "search.dp_seeds=2", "search.population=4", "search.eval_items=32",
        "compress.kd.steps=3", "compress.kd.eval_items=32", "compress.distill.steps=2",
        "compress.distill.batch_size=8", "compress.distill.eval_samples=0", "compress.export.timing_iters=2"]


# the config test_rerun_... leaves the `searched` run folder at (the tests after it continue that folder)
LAST = TINY + ["search.trials=6", "train.steps=31", "latency.iters=4"]


def _sets(items):
    return [a for item in items for a in ("--set", item)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def _run_to(out, stop_after=None):
    from ditnas.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["run", "--out", str(out), "--no-progress", *_sets(TINY), *(["--stop-after", stop_after] if stop_after else [])])
        raise SystemExit(0)
    assert exc.value.code == 0
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return _run_to(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    return _run_to(tmp_path_factory.mktemp("searched"), "search")


@pytest.mark.slow  # every stage, an XNNPACK export and the report: minutes on 2 cores
def test_every_stage_ran_and_the_report_shows_them(finished):
    manifest = json.loads((finished / "run.json").read_text())
    stages = manifest["stages"]
    assert list(stages) == ["train", "profile", "search", "extract", "prune", "kd", "quality", "distill", "export", "report"]
    assert all(s["status"] in ("done", "skipped") for s in stages.values())
    search = stages["search"]["metrics"]
    # the default budget: halfway from the cheapest reachable arch to the max net
    assert search["cheapest_ms"] < search["budget_ms"] < search["max_net_ms"]
    assert search["budget_ms"] == pytest.approx(0.5 * (search["cheapest_ms"] + search["max_net_ms"]))
    assert (finished / "export" / "student_xnnpack_fp32.pte").is_file()
    html = (finished / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5  # pareto, latency, layout, breakdown, curves, grids
    for section in ("Stages", "Search", "Latency: predicted vs measured", "Chosen arch", "Samples"):
        assert section in html


def test_rerun_reuses_and_a_changed_field_redoes_from_its_stage(searched, capsys):
    stop = ["--stop-after", "search"]
    before = json.loads((searched / "run.json").read_text())["stages"]
    assert list(before) == ["train", "profile", "search"] and all(s["status"] == "done" for s in before.values())
    code, out, err = run(["run", "--out", str(searched), "--no-progress", *_sets(TINY), *stop], capsys)
    assert code == 0, err
    assert out.count("inputs unchanged: reused") == 3
    assert json.loads((searched / "run.json").read_text())["stages"] == before  # nothing re-run, nothing rewritten
    code, out, err = run(["run", "--out", str(searched), "--no-progress", *_sets(TINY + ["search.trials=6"]), *stop], capsys)
    assert code == 0, err
    stages = json.loads((searched / "run.json").read_text())["stages"]
    assert stages["search"]["redone_because"] == ["input search.trials changed"]
    assert stages["search"]["metrics"]["trials"] == 4 + 6  # search.trials adds trials to the same study
    for name in ("train", "profile"):
        assert stages[name] == before[name]
    # a training change redoes train and what reads the checkpoint, not the table (latency ignores weights)
    code, out, err = run(["run", "--out", str(searched), "--no-progress", *_sets(TINY + ["search.trials=6", "train.steps=31"]),
                          *stop], capsys)
    assert code == 0, err
    stages = json.loads((searched / "run.json").read_text())["stages"]
    assert stages["train"]["redone_because"] == ["input train.steps changed"]
    assert stages["profile"] == before["profile"]
    assert stages["search"]["redone_because"] == ["input checkpoint_sha256 changed"]
    # a timing setting the old session cannot resume with: a new session, the old one kept aside
    changed = LAST
    code, out, err = run(["run", "--out", str(searched), "--no-progress", *_sets(changed), *stop], capsys)
    assert code == 0, err
    stages = json.loads((searched / "run.json").read_text())["stages"]
    assert stages["profile"]["redone_because"] == ["input latency.iters changed"]
    assert "moved to" in out and len(list(searched.glob("profile.replaced-*"))) == 1
    # a finished stage's artifact damaged on disk: that stage is redone (its folder kept aside), nothing else
    before = json.loads((searched / "run.json").read_text())["stages"]
    (searched / "search" / "manifest.json").write_text('{"trunc')
    code, out, err = run(["run", "--out", str(searched), "--no-progress", *_sets(changed), *stop], capsys)
    assert code == 0, err
    stages = json.loads((searched / "run.json").read_text())["stages"]
    assert len(stages["search"]["redone_because"]) == 1 and "unreadable or truncated" in stages["search"]["redone_because"][0]
    assert json.loads((searched / "search" / "manifest.json").read_text())["best"]
    assert len(list(searched.glob("search.damaged-*"))) == 1
    assert stages["train"] == before["train"] and stages["profile"] == before["profile"]


def test_ctrl_c_in_a_stage_loses_no_finished_stage(searched, capsys, monkeypatch):
    import ditnas.compress.kd as kd

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    args = ["run", "--out", str(searched), "--no-progress", *_sets(LAST), "--stop-after", "kd"]
    monkeypatch.setattr(kd, "distill_kd", interrupted)
    code, out, err = run(args, capsys)
    assert code == 130 and "rerun the same command" in err, out + err
    before = json.loads((searched / "run.json").read_text())["stages"]
    assert "kd" not in before and before["extract"]["status"] == "done"
    monkeypatch.undo()
    code, out, err = run(args, capsys)
    assert code == 0, err
    stages = json.loads((searched / "run.json").read_text())["stages"]
    assert stages["kd"]["status"] == "done" and out.count("inputs unchanged: reused") == len(before)
    assert all(stages[name] == before[name] for name in before)
    # a changed KD setting: KD starts in a fresh folder (its checkpoint belongs to the old settings), kept aside
    code, out, err = run([*args[:-2], "--set", "compress.kd.steps=4", *args[-2:]], capsys)
    assert code == 0, err
    stages = json.loads((searched / "run.json").read_text())["stages"]
    assert stages["kd"]["redone_because"] == ["input compress.kd.steps changed"] and stages["kd"]["metrics"]["steps"] == 4
    assert len(list(searched.glob("kd.changed-*"))) == 1 and all(stages[name] == before[name] for name in before)


def test_a_run_folder_of_other_tool_versions_is_refused(tmp_path, capsys):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({"kind": "ditnas.run", "stages": {}, "versions": {"torch": "2.0.0"}}))
    code, _, err = run(["run", "--out", str(folder), "--no-progress", *_sets(TINY)], capsys)
    assert code == 2 and "torch 2.0.0 (now 2." in err and "start fresh with another --out folder" in err
    (folder / "run.json").write_text(json.dumps({"kind": "ditnas.search"}))
    code, _, err = run(["run", "--out", str(folder), "--no-progress", *_sets(TINY)], capsys)
    assert code == 2 and "is not a ditnas run manifest" in err


def test_report_verb_and_a_bad_run_folder(searched, tmp_path, capsys):
    code, out, _ = run(["report", str(searched)], capsys)
    assert code == 0 and "report.html" in out
    html = (searched / "report.html").read_text()
    assert "Pareto" not in html or "data:image/png;base64," in html
    assert html.count("data:image/png;base64,") >= 4  # pareto, latency, layout, breakdown (+ curves, grid)
    # the baselines the Pareto marks: priced as the trials, within the budget when they fit
    search = json.loads((searched / "search" / "manifest.json").read_text())
    assert set(search["baselines"]) == {"all_sa", "uniform_interleave_sa_lcha"}
    for b in search["baselines"].values():
        assert (b["fits"] and b["latency_ms"] <= search["budget_ms_total"] and b["quality"] > 0) or "cannot fit" in b["note"]
    assert "baselines at the same budget" in html and "uniform_interleave_sa_lcha" in html
    # every latency names its device and kind; the published phone rows sit in their own table, labelled paper
    from ditnas.reports.report import PAPER_DEVICE, PAPER_ROWS, latency_figures

    stages = json.loads((searched / "run.json").read_text())["stages"]
    figures = latency_figures(stages, searched / "profile" / "table")
    backend = json.loads((searched / "profile" / "table" / "table.json").read_text())["identity"]["backend"]
    assert {r["kind"] for r in figures} >= {"measured", "predicted"} and all(backend in r["device"] for r in figures
                                                                         if not r["figure"].startswith("student"))
    if ((stages.get("export") or {}).get("metrics") or {}).get("timing"):
        assert any(r["figure"].startswith("student .pte") and r["ms"] > 0 and "ExecuTorch" in r["device"] for r in figures)
    figures_html, paper_html = html.split("<h2>Latency figures</h2>")[1].split("published, for scale")[:2]
    assert "paper" not in figures_html and paper_html.count(">paper<") == len(PAPER_ROWS) and PAPER_DEVICE in paper_html
    code, _, err = run(["report", str(tmp_path)], capsys)
    assert code == 2 and "not a ditnas run folder" in err


@pytest.mark.slow  # ~75 s: a judge is trained and the max net sampled (keeps the default run near 15 min)
def test_the_quality_check_runs_in_the_background_and_its_judge_is_shared(searched, capsys):
    """The judge + max-net FD leave the train stage: a background process from the profile stage's end on,
    recorded as the quality stage; its settings do not redo training; the distillation reuses its judge."""
    items = [*LAST, "compress.kd.steps=4", "train.eval_samples=8"]
    before = json.loads((searched / "run.json").read_text())["stages"]
    code, out, err = run(["run", "--out", str(searched), "--no-progress", *_sets(items), "--stop-after", "quality"], capsys)
    assert code == 0, err
    assert "judging the max net's samples in the background" in out
    stages = json.loads((searched / "run.json").read_text())["stages"]
    assert list(stages)[-1] == "quality" and stages["quality"]["status"] == "done"
    q = stages["quality"]["metrics"]
    assert q["quality"]["max"]["n_fd"] == 8 and q["quality"]["max"]["fd"] > 0 and q["judge_val_accuracy"] > 0.9
    assert "seconds_in_background" in q
    assert (searched / "quality" / "quality.json").is_file() and any((searched / "quality" / "judge").glob("*.pt"))
    assert (searched / "quality" / "samples_max.png").stat().st_size > 100  # the grid, drawn in the background too
    assert not (searched / "quality.work").exists()  # published whole
    assert all(stages[name] == before[name] for name in before)  # eval settings do not touch training

    code, out, err = run(["run", "--out", str(searched), "--no-progress", *_sets([*items[:-1], "train.eval_samples=10"]),
                          "--stop-after", "quality"], capsys)
    assert code == 0, err
    again = json.loads((searched / "run.json").read_text())["stages"]
    assert again["train"] == stages["train"] and again["quality"]["redone_because"] == ["input train.eval_samples changed"]
    assert again["quality"]["metrics"]["quality"]["max"]["n_fd"] == 10


@pytest.mark.slow  # grafting + training + a retrain: ~20 s on 2 cores
def test_graft_in_run_trains_from_the_grafted_start_and_a_graft_change_starts_afresh(tmp_path, capsys):
    """graft.in_run: the train stage grafts first and trains from grafted.pt -- the same weights as
    `ditnas graft` + `ditnas train --set train.init=...`; a changed graft setting retrains in a new folder."""
    import torch

    from ditnas.config import load_config
    from ditnas.supernet.train import train_supernet

    graft = ["train.steps=6", "graft.in_run=true", "graft.teacher_steps=2", "graft.steps=2", "graft.batches=2"]
    stop = ["--stop-after", "train"]
    code, out, err = run(["run", "--out", str(tmp_path / "r"), "--no-progress", *_sets(TINY + graft), *stop], capsys)
    assert code == 0, err
    train = json.loads((tmp_path / "r" / "run.json").read_text())["stages"]["train"]
    grafted = tmp_path / "r" / "train" / "graft" / "grafted.pt"
    assert train["outputs"]["grafted_from"] == str(grafted) and grafted.is_file()
    # the run's own config (`ditnas run` starts from configs/default.yaml), trained from its grafted.pt
    reference = train_supernet(load_config(tmp_path / "r" / "config.yaml", [f"train.init={grafted}"]), tmp_path / "ref")
    ours = torch.load(train["outputs"]["checkpoint"], weights_only=False)["model"]
    for k, v in reference.model.state_dict().items():
        assert torch.equal(v, ours[k]), k
    code, out, err = run(["run", "--out", str(tmp_path / "r"), "--no-progress", *_sets(TINY + graft + ["graft.steps=3"]),
                          *stop], capsys)
    assert code == 0, err
    assert "train.changed-" in out and len(list((tmp_path / "r").glob("train.changed-*"))) == 1
    assert json.loads((tmp_path / "r" / "train" / "graft" / "graft.json").read_text())["steps_per_op"] == 3
