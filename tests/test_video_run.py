"""`ditnas run --config ditnas/configs/video.yaml` end to end on a tiny clip setting (2 frames of 16x16, a causal
2-head model, a host-torch table): every stage finishes and the report names the clip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import ditnas
from ditnas.search.threads import torch_threads

VIDEO_CONFIG = Path(ditnas.__file__).parent / "configs" / "video.yaml"
TINY_VIDEO = ["data.frames=2", "data.clips=96", "model.max_heads=2", "model.head_dim=8", "model.cond_dim=16",
              "model.cond_tokens=1", "space.depth=3", "space.stage_pattern=[0,1,0]", "space.skippable=[1]",
              "space.ops=[sa,lcha]", "train.steps=20", "train.batch_size=8", "train.checkpoint_every=0",
              "train.warmup_steps=5", "train.eval_samples=8", "latency.backend=host-torch", "latency.models=4",
              "latency.iters=3", "latency.warmup=1", "latency.generation_steps=[4]", "latency.generation_iters=2",
              "search.steps=[4]", "search.trials=4", "search.dp_seeds=2", "search.population=4", "search.eval_items=16",
              "compress.prune.calib_items=8", "compress.prune.final_steps=2", "compress.prune.recover_steps=0",
              "compress.kd.steps=3", "compress.kd.batch_size=8", "compress.kd.eval_items=16", "compress.distill.steps=2",
              "compress.distill.batch_size=4", "compress.distill.eval_samples=8", "compress.distill.regression_pairs=8",
              "compress.distill.gap_clips=4", "compress.distill.teacher_substeps=2", "compress.export.timing_iters=2", "compress.export.stream_chunk=1",
              # the host-torch table's eager streams are nothing like video.yaml's 60 FPS target: the run's own
              # default budget (between the cheapest arch and the max net) applies
              "search.target_fps=null"]


@pytest.mark.slow  # every stage on clips, an XNNPACK export and the report: minutes on 2 cores
def test_video_run_finishes_every_stage_and_the_report_shows_clips(tmp_path):
    from ditnas.cli import main
    from ditnas.supernet.extract import load_subnet

    out = tmp_path / "video"
    sets = [a for item in TINY_VIDEO for a in ("--set", item)]
    with torch_threads(1), pytest.raises(SystemExit) as exc:
        main(["run", "--config", str(VIDEO_CONFIG), "--out", str(out), "--no-progress", *sets])
        raise SystemExit(0)
    assert exc.value.code == 0
    stages = json.loads((out / "run.json").read_text())["stages"]
    assert list(stages) == ["train", "profile", "search", "extract", "prune", "kd", "quality", "distill", "export", "report"]
    assert all(s["status"] in ("done", "skipped") for s in stages.values())
    distill = stages["distill"]["metrics"]
    assert distill["method"] == "video_2in1" and distill["generator_updates"] == 2  # video.yaml's 2-in-1 distillation
    assert distill["eval"]["n"] == 8  # the student judged on its clips' frames
    assert load_subnet(out / "distill").causal  # the streaming student, in the extract format export read
    assert (out / "export" / "student_xnnpack_fp32.pte").is_file()
    assert sorted(p.name for p in (out / "export" / "stream").glob("*.pte")) == ["chunk_t0.pte", "chunk_t1.pte"]
    assert stages["export"]["metrics"]["stream_programs"] == 2
    html = (out / "report.html").read_text()
    assert stages["search"]["metrics"]["latency_definition"].startswith("one streamed clip: 2 latent frames in chunks of 1")
    assert "(C, T, H, W) = (1, 2, 16, 16)" in html and "ONE STREAMED CLIP" in html
    assert "samples unavailable" not in html
    assert "data:image/gif" in html and "streaming student as trained" in html  # each model's clips animated
    assert (out / "quality" / "samples_max.gif").is_file()
