"""The `ditnas run` stages' video fixes (configs/video.yaml): the distilled student's evaluation judges clips
frame by frame, the report draws clips as frame strips with their GIFs and says the latency is the whole clip's,
the quality stage's grid shows every frame, pruning keeps a causal subnet frame-causal and streamable, and the
distill stage's video_2in1 method (S2DiT 2-in-1) writes a causal streaming student load_subnet reads."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from ditnas.arch import SearchSpace
from ditnas.config import DistillConfig, ModelConfig, load_config
from ditnas.data import DatasetSplit
from ditnas.supernet.model import ElasticDiT
from ditnas.supernet.quality import save_grid
from ditnas.video_quality import frames_of, save_frame_strip, save_gif

torch.set_num_threads(1)

CFG = ModelConfig(max_heads=2, head_dim=8, cond_dim=32, cond_tokens=2)


def _subnet(latent: tuple[int, int, int, int]):
    space = SearchSpace(depth=2, ops=("sa",), widths=(1.0,), mlp_ratios=(2.0,), skippable=(), stage_pattern=(0, 0),
                        latent=latent, num_classes=3)
    torch.manual_seed(0)
    return ElasticDiT(space, CFG).extract(space.max_arch()).eval()


def _split(latent: tuple[int, int, int, int]) -> DatasetSplit:
    g = torch.Generator().manual_seed(0)
    x = torch.rand((12, *latent), generator=g) * 2 - 1
    return DatasetSplit("toy", x[:8], torch.arange(8) % 3, x[8:], torch.arange(4) % 3, 3, ("a", "b", "c"))


@pytest.mark.parametrize("frames", [1, 4])
def test_evaluate_student_judges_every_frame_with_its_clips_label(monkeypatch, tmp_path, frames):
    """Clips reach the still-image judge as (N*T, C, 1, H, W) frames, clip-major, each with its clip's label, against
    the validation clips' frames; still images (T = 1) reach it unchanged."""
    import ditnas.judge as judge_module
    from ditnas.compress.distill import EVAL_SEED, evaluate_student, sample_student

    latent = (1, frames, 8, 8)
    seen: dict = {}
    monkeypatch.setattr(judge_module, "load_or_train_judge",
                        lambda split, cache, progress=False: seen.setdefault("judge_split", split) and "judge")
    monkeypatch.setattr(judge_module, "evaluate_samples",
                        lambda judge, x, labels, ref: seen.update(x=x, labels=labels, ref=ref) or {"fd": 1.5, "label_accuracy": 0.5})
    model, split, cfg = _subnet(latent), _split(latent), DistillConfig(eval_samples=5, student_steps=2)
    result = evaluate_student(model, cfg, split, tmp_path)

    labels = torch.arange(5) % 3
    clips = sample_student(model, 2, cfg.shift, labels, latent, EVAL_SEED)
    assert result == {"steps": 2, "n": 5, "fd": 1.5, "label_accuracy": 0.5}
    assert tuple(seen["x"].shape) == (5 * frames, 1, 1, 8, 8)
    assert torch.equal(seen["labels"], labels.repeat_interleave(frames))
    assert tuple(seen["ref"].shape) == (4 * frames, 1, 1, 8, 8)
    assert tuple(seen["judge_split"].train_x.shape) == (8 * frames, 1, 1, 8, 8)
    want = frames_of(clips)[:, :, None] if frames > 1 else clips
    torch.testing.assert_close(seen["x"], want, rtol=0, atol=1e-6)
    if frames > 1:  # frame 2 of clip 1 is row 1 * T + 2
        torch.testing.assert_close(seen["x"][frames + 2, :, 0], clips[1, :, 2], rtol=0, atol=1e-6)


def test_report_samples_are_a_frame_strip_per_class_for_clips(tmp_path):
    """Class-major clips (4 per class) -> a strip of each class's first clip (pixel-equal to save_frame_strip);
    still images -> the same grid as before (byte-equal to save_grid)."""
    from ditnas.reports.report import save_samples

    g = torch.Generator().manual_seed(1)
    clips = torch.rand((12, 1, 4, 8, 8), generator=g) * 2 - 1
    got = save_samples(clips, tmp_path / "strip.png", per_class=4)
    want = save_frame_strip(clips[[0, 4, 8]], tmp_path / "want.png", max_clips=3)
    a, b = Image.open(got), Image.open(want)
    assert a.size == b.size and a.tobytes() == b.tobytes()
    assert a.size[1] < a.size[0]  # 3 rows (classes) x 4 columns (frames)
    # beside it, the same clips animated: frame for frame video_quality.save_gif's
    want_gif = save_gif(clips[[0, 4, 8]], tmp_path / "want.gif", max_clips=3)
    assert _gif_frames(got.with_suffix(".gif")) == _gif_frames(want_gif) and len(_gif_frames(want_gif)) == 4

    images = torch.rand((12, 1, 1, 8, 8), generator=g) * 2 - 1
    got = save_samples(images, tmp_path / "grid.png", per_class=4)
    assert got.read_bytes() == save_grid(images, tmp_path / "want_grid.png", nrow=4).read_bytes()
    assert not got.with_suffix(".gif").exists()


def _gif_frames(path):
    image = Image.open(path)
    frames = []
    for i in range(image.n_frames):
        image.seek(i)
        frames.append(image.convert("L").tobytes())
    return frames


def test_quality_samples_grid_shows_every_frame_of_each_clip_and_a_gif(tmp_path):
    """supernet/quality.py save_grid (the quality stage's samples_max.png): clip i's frame f is a constant
    tile (i*4 + f) -- every frame appears in the PNG, clip-major, left to right; the GIF's frame f is the grid of
    frame f. Still images keep the earlier grid (no GIF)."""
    n, t, size, nrow = 6, 4, 8, 3
    levels = torch.linspace(-1, 1, n * t)
    clips = levels.reshape(n, 1, t, 1, 1).expand(n, 1, t, size, size).contiguous()
    png = save_grid(clips, tmp_path / "samples_max.png", nrow=nrow)
    image = Image.open(png)
    scale = max(1, (256 // t) // size)
    cell = t * (size + 1) - 1  # a clip's strip; 3-pixel gaps between clips
    assert image.size == ((nrow * (cell + 3) - 3 + 2) * scale, (2 * (size + 1) + 1) * scale)
    pixels = image.load()
    want = ((levels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).tolist()
    for i in range(n):
        r, col = divmod(i, nrow)
        for f in range(t):  # the centre of clip i's frame f
            x = (1 + col * (cell + 3) + f * (size + 1) + size // 2) * scale
            y = (1 + r * (size + 1) + size // 2) * scale
            assert pixels[x, y] == want[i * t + f], (i, f)
    frames = _gif_frames(png.with_suffix(".gif"))
    assert len(frames) == t
    for f in range(t):
        still = save_grid(clips[:, :, f], tmp_path / f"frame{f}.png", nrow=nrow)  # an image grid of frame f
        small = Image.open(still).convert("L")
        small = small.resize((small.width // (256 // size) * 8, small.height // (256 // size) * 8), Image.NEAREST)
        assert frames[f] == small.tobytes(), f
    assert not still.with_suffix(".gif").exists()


def test_report_puts_each_models_gif_beside_its_frame_strip(tmp_path):
    """The report's sample figures: the max net's samples_max.png with its GIF, and a subnet's frame strip with its GIF."""
    import base64
    from ditnas.reports.report import write_report

    run = tmp_path / "run"
    (run / "quality").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"kind": "ditnas.run", "stages": {}}))
    clips = torch.rand((20, 1, 2, 8, 8), generator=torch.Generator().manual_seed(3)) * 2 - 1
    save_grid(clips, run / "quality" / "samples_max.png", nrow=2)
    html = write_report(run).read_text()
    gif = base64.b64encode((run / "quality" / "samples_max.gif").read_bytes()).decode()
    png = base64.b64encode((run / "quality" / "samples_max.png").read_bytes()).decode()
    assert html.index(png) < html.index(f"data:image/gif;base64,{gif}") < html.index("max net, supernet weights")


def test_report_names_the_clip_and_whole_clip_latency(tmp_path):
    from ditnas.reports.report import clip_note

    for name, latent in (("video", [1, 4, 16, 16]), ("image", [1, 1, 16, 16])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "table.json").write_text(json.dumps({"space": {"latent": latent}}))
    note = clip_note(tmp_path / "video")
    assert "(C, T, H, W) = (1, 4, 16, 16)" in note and "whole clip" in note and "frame strip" in note
    assert "not the per-chunk time of streaming" in note
    streamed = clip_note(tmp_path / "video", streamed=True)  # a search.stream_chunk run's search priced streams
    assert "ONE STREAMED CLIP" in streamed and "not the per-chunk" not in streamed
    assert clip_note(tmp_path / "image") == ""
    assert clip_note(tmp_path / "missing") == ""
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "table.json").write_text("{trunc")
    assert clip_note(tmp_path / "broken") == ""


def test_video_config_loads_and_is_small():
    """configs/video.yaml: moving digits, causal, and small enough for a ~15 min run."""
    from pathlib import Path

    import ditnas

    cfg = load_config(Path(ditnas.__file__).parent / "configs" / "video.yaml")
    cfg.data.check(), cfg.search.check(), cfg.latency.check(), cfg.compress.check()
    assert cfg.data.source == "moving_digits" and cfg.data.frames > 1 and cfg.model.causal
    assert cfg.train.steps <= 500 and cfg.search.trials <= 32 and cfg.latency.models <= 6
    # the search prices one clip streamed a frame at a time against a target FPS, on a table with streaming cells
    assert cfg.search.stream_chunk == cfg.latency.stream_chunk == cfg.compress.export.stream_chunk == 1
    assert cfg.search.target_fps and cfg.search.steps == (4,) and cfg.compress.distill.student_steps == 4


def test_export_stream_chunk_is_checked_and_off_by_default():
    from ditnas.config import ExportConfig
    from ditnas.errors import ConfigFieldError

    assert ExportConfig().stream_chunk == 0
    assert ExportConfig(stream_chunk=2).check().stream_chunk == 2
    with pytest.raises(ConfigFieldError, match="compress.export.stream_chunk"):
        ExportConfig(stream_chunk=-1).check()


def test_search_latency_definition_names_the_whole_clip():
    from ditnas.pipeline import clip_latency_note

    assert clip_latency_note((1, 1, 16, 16)) == ""  # images: the definition is unchanged
    note = clip_latency_note((1, 4, 16, 16))
    assert "whole clip of 4 frames" in note and "1x4x16x16" in note
    assert clip_latency_note((1, 4, 16, 16), streamed=True) == ""  # the streaming definition says it itself


# ----- pruning a frame-causal video subnet (compress/prune.py) ------------------------------------
PRUNE_LATENT = (1, 4, 16, 16)
# every op with a frame-causal mode, both token resolutions
PRUNE_SPACE = SearchSpace(depth=6, ops=("sa", "gqa", "assa", "lcha", "ssa"), widths=(0.5, 1.0), mlp_ratios=(2.0,),
                          skippable=(), stage_pattern=(0, 0, 1, 1, 0, 0), free_stages=True, latent=PRUNE_LATENT,
                          num_classes=10)
PRUNE_CFG = ModelConfig(max_heads=4, head_dim=8, cond_dim=32, cond_tokens=2, causal=True)
PRUNE_ARCH = "lcha:1:2 gqa:1:2 | ssa:1:2 assa:1:2 | sa:1:2 lcha:1:2"


def _causal_video_subnet(tmp_path):
    """A frame-causal subnet (model.causal: true) saved in the extract format, as `ditnas extract` writes it."""
    from ditnas.compress.kd import save_subnet
    from ditnas.config import RunConfig

    torch.manual_seed(0)
    net = ElasticDiT(PRUNE_SPACE, PRUNE_CFG)
    with torch.no_grad():  # leave adaLN-Zero's identity blocks, or every frame's output is its input
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    arch = PRUNE_SPACE.parse(PRUNE_ARCH)
    sub = net.extract(arch).eval()
    record = {"arch": str(arch), "config": RunConfig(model=PRUNE_CFG).to_dict(), "space": PRUNE_SPACE.to_dict()}
    save_subnet(tmp_path / "chosen", sub, record)
    return sub, record


def _clip_inputs(n: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *PRUNE_LATENT, generator=g), torch.rand(n, generator=g),
            torch.randint(0, 11, (n,), generator=g))


@torch.no_grad()
def _assert_frame_causal_and_streams(model, tol_causal=1e-6, tol_stream=1e-5):
    """Frames <= t ignore later frames (<= tol), later frames do change (teeth), and the Streamer's chunked output
    equals the whole-clip causal forward for every chunk size dividing T."""
    from ditnas.supernet.streaming import Streamer

    x, t, y = _clip_inputs()
    whole = model(x, t, y)
    for cut in range(1, PRUNE_LATENT[1]):
        later = x.clone()
        later[:, :, cut:] += torch.randn(later[:, :, cut:].shape, generator=torch.Generator().manual_seed(cut))
        moved = model(later, t, y)
        assert (moved - whole)[:, :, :cut].abs().max().item() <= tol_causal, cut
        assert (moved - whole)[:, :, cut:].abs().max().item() > 1e-3, cut
    for chunk in (1, 2):
        run = Streamer(model, chunk).run(x, t, y)
        assert (run.output - whole).abs().max().item() <= tol_stream, chunk


def test_a_pruned_causal_video_subnet_is_frame_causal_and_streams(tmp_path):
    """Blocks, heads (GQA: whole KV groups) and FFN channels pruned from a frame-causal subnet of every op: the
    exported model equals the masked one, and -- saved and rebuilt by load_subnet -- is frame-causal and streams."""
    from ditnas.compress.prune import PruneMask, Unit, apply_mask, export_pruned, save_pruned
    from ditnas.supernet.extract import load_subnet

    sub, record = _causal_video_subnet(tmp_path)
    mask = PruneMask({Unit("blocks", 4), Unit("heads", 0, 1), Unit("heads", 1, 0), Unit("heads", 2, 2),
                      Unit("heads", 3, 1), Unit("heads", 5, 3), Unit("channels", 0, 2), Unit("channels", 2, 0),
                      Unit("channels", 3, 1), Unit("channels", 5, 1)})
    pruned = export_pruned(sub, mask, 16)
    x, t, y = _clip_inputs()
    with torch.no_grad():
        assert (pruned(x, t, y) - apply_mask(sub, mask, 16)(x, t, y)).abs().max().item() <= 1e-5
    save_pruned(tmp_path / "pruned", pruned, record)
    loaded = load_subnet(tmp_path / "pruned")
    assert loaded.causal and str(loaded.arch) == str(pruned.arch) and loaded.arch.slots[4].is_skip
    assert loaded.num_params() < sub.num_params()
    mixers = [b.mixers[op] for b, op in zip(loaded.blocks, loaded.ops) if op != "skip"]
    assert [m.max_heads for m in mixers] == [3, 2, 3, 3, 3]  # gqa (kv_group 2) lost one KV group = 2 query heads
    with torch.no_grad():
        assert (loaded(x, t, y) - pruned(x, t, y)).abs().max().item() == 0.0
    _assert_frame_causal_and_streams(loaded)


def test_greedy_pruning_of_a_causal_video_subnet_keeps_it_streamable(tmp_path):
    """prune_subnet (scores, removals, KD recovery on moving-digit clips) to a memory budget: the result is
    still frame-causal and streams."""
    from ditnas.compress.prune import prune_subnet
    from ditnas.config import DataConfig, KDConfig, PruneConfig
    from ditnas.supernet.extract import load_subnet

    sub, _ = _causal_video_subnet(tmp_path)
    budget = sub.num_params() * 4 / 2**20 * 0.8
    m = prune_subnet(PruneConfig(memory_mb=budget, calib_items=8, rescore_every=64, recover_steps=1, final_steps=1, sensitivity="taylor",
                                 channel_group=16), KDConfig(steps=1, batch_size=4, eval_items=8), tmp_path / "chosen",
                     None, tmp_path / "pruned",
                     data_cfg=DataConfig(source="moving_digits", frames=4, image_size=16, clips=24))
    kinds = {r["kind"] for r in m["metrics"]["removed"]}
    assert kinds >= {"heads", "channels"}, kinds
    loaded = load_subnet(tmp_path / "pruned")
    assert loaded.causal and loaded.num_params() * 4 / 2**20 <= budget
    _assert_frame_causal_and_streams(loaded)


# ----- the distill stage's video_2in1 method (pipeline.distill_video_stage) ------------------------
TINY_2IN1 = ["data.source=moving_digits", "data.frames=2", "data.clips=40", "model.max_heads=2", "model.head_dim=8",
             "model.cond_dim=16", "model.cond_tokens=1", "space.depth=2", "space.stage_pattern=[0,0]",
             "space.skippable=[]", "space.ops=[sa,lcha]", "space.widths=[0.5,1.0]", "space.mlp_ratios=[2.0]",
             "compress.distill.method=video_2in1", "compress.distill.kd_steps=2", "compress.distill.steps=2",
             "compress.distill.batch_size=4", "compress.distill.lr=1e-3", "compress.distill.gap_clips=4",
             "compress.distill.teacher_substeps=1", "compress.distill.regression_pairs=8",
             "compress.distill.eval_samples=8", "compress.distill.checkpoint_every=1"]
STUDENT_2IN1 = "lcha:0.5:2 sa:1:2"


def _teacher_and_kd_student(cfg, root):
    """The extract / KD stages' folders: the max net and a student, from one (perturbed) supernet of `cfg`."""
    from ditnas.compress.kd import save_subnet
    from ditnas.data import load_split
    from ditnas.supernet.train import build_space, build_supernet

    split = load_split(cfg.data)
    space = build_space(cfg, split)
    torch.manual_seed(0)
    net = build_supernet(cfg, space)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    for name, arch in (("teacher", space.max_arch()), ("kd", space.parse(STUDENT_2IN1))):
        save_subnet(root / name, net.extract(arch).eval(),
                    {"arch": str(arch), "config": cfg.to_dict(), "space": space.to_dict()})
    return split, root / "teacher", root / "kd"


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    """The quality stage's judge cache, shared: both runs below have the same data, so the judge trains once."""
    return tmp_path_factory.mktemp("quality") / "judge"


@pytest.mark.parametrize("causal", [False, True])
def test_distill_stage_video_2in1_writes_a_causal_streaming_student_load_subnet_reads(tmp_path, judge_dir, causal):
    """A bidirectional run (S2DiT: bidirectional teacher, the student made causal) and a causal run (video.yaml):
    <distill>/subnet.pt is the trained student.pt, rebuilt causal by load_subnet, streaming; the metrics are the
    judge's over the streamed clips' frames (recomputed here from the loaded student) and the teacher gaps."""
    from ditnas.compress.video_distill import evaluate_clips
    from ditnas.io import torch_load
    from ditnas.manifest import read_manifest
    from ditnas.pipeline import distill_video_stage
    from ditnas.supernet.extract import load_subnet
    from ditnas.supernet.streaming import Streamer

    cfg = load_config(None, [*TINY_2IN1, f"model.causal={str(causal).lower()}"])
    split, teacher, kd = _teacher_and_kd_student(cfg, tmp_path)
    before = load_subnet(kd)
    assert before.causal == causal and load_subnet(teacher).causal == causal
    lines: list[str] = []
    record = distill_video_stage(cfg, tmp_path / "distill", teacher, kd, judge_dir, lines.append)

    assert record["outputs"] == {"subnet": str(tmp_path / "distill")}
    student = load_subnet(tmp_path / "distill")
    assert student.causal and str(student.arch) == str(before.arch)
    saved = torch_load(tmp_path / "distill" / "student.pt", what="test")
    assert all(torch.equal(v, saved["weights"][k]) for k, v in student.state_dict().items())
    assert max((v - before.state_dict()[k]).abs().max().item() for k, v in student.state_dict().items()) > 1e-4
    x = torch.randn(2, *split.latent_shape, generator=torch.Generator().manual_seed(5))
    t, y = torch.tensor([0.3, 0.8]), torch.tensor([1, 2])
    with torch.no_grad():
        whole = student(x, t, y)
        assert (Streamer(student, 1).run(x, t, y).output - whole).abs().max().item() <= 1e-5
        later = x.clone()
        later[:, :, 1] += 1.0
        assert (student(later, t, y) - whole)[:, :, 0].abs().max().item() <= 1e-6

    m = record["metrics"]
    assert m["method"] == "video_2in1" and m["teacher_causal"] == causal
    assert m["kd_steps"] == 2 and m["generator_updates"] == 2
    assert {"teacher_gap_initial", "teacher_gap_after_kd", "teacher_gap"} <= set(m) and m["teacher_gap"] > 0
    assert m["eval"]["n"] == 8 and m["eval"]["sampler"] == "streamed, chunk 1" and m["fd"] == m["eval"]["fd"]
    again = evaluate_clips(student, split, judge_dir, n=8, chunk=1, steps=4, shift=cfg.compress.distill.shift)
    assert again["eval"]["label_accuracy"] == m["eval"]["label_accuracy"]
    assert again["eval"]["fd"] == pytest.approx(m["eval"]["fd"], rel=1e-9)
    assert again["eval_whole_clip"]["fd"] == pytest.approx(m["eval_whole_clip"]["fd"], rel=1e-9)
    assert any(judge_dir.iterdir()) and not (tmp_path / "distill" / "judge").exists()  # the run's judge
    manifest = read_manifest(tmp_path / "distill", "ditnas.video_distill")
    assert "subnet.pt" in manifest["files"] and manifest["sampler"]["steps"] == 4  # export ships this sampler
    assert any(line.startswith("[distill] 4/4") for line in lines)


def test_video_2in1_on_still_images_is_one_error_naming_the_field(tmp_path):
    from ditnas.errors import ConfigFieldError
    from ditnas.pipeline import distill_video_stage

    cfg = load_config(None, ["compress.distill.method=video_2in1"])  # the default data: still digits
    with pytest.raises(ConfigFieldError, match=r"compress.distill.method: video_2in1 .* still images .* choose kdmd"):
        distill_video_stage(cfg, tmp_path / "distill", tmp_path / "teacher", tmp_path / "kd", tmp_path / "judge")
    assert not (tmp_path / "distill").exists()


def test_video_2in1_config_maps_onto_video_distill_config_and_keeps_other_runs_fingerprints():
    import dataclasses

    from ditnas.compress.video_distill import VideoDistillConfig, video_config
    from ditnas.config import RunConfig
    from ditnas.errors import ConfigFieldError
    from ditnas.pipeline import VIDEO_DISTILL_FIELDS, distill_inputs

    # the video fields' defaults are VideoDistillConfig's; the shared fields keep compress.distill's
    assert video_config(DistillConfig()) == dataclasses.replace(VideoDistillConfig(), steps=1000, batch_size=64,
                                                                checkpoint_every=100)
    changed = DistillConfig(method="video_2in1", chunk=2, kd_steps=7, kd_lr=0.01, kd_lambda_out=0.5, kd_lambda_feat=0.25,
                            steps=9, stream_loss="dmd", student_steps=3, batch_size=5, lr=0.02, critic_lr=0.03,
                            critic_updates=2, cfg_scale=1.5, shift=2.0, teacher_substeps=3, regression_pairs=11,
                            class_dropout=0.2, grad_clip=4.0, gap_clips=6, checkpoint_every=13, seed=17).check()
    assert video_config(changed) == VideoDistillConfig(
        kd_steps=7, kd_lr=0.01, lambda_out=0.5, lambda_feat=0.25, steps=9, method="dmd", student_steps=3, chunk=2,
        batch_size=5, lr=0.02, critic_lr=0.03, critic_updates=2, cfg_scale=1.5, shift=2.0, teacher_substeps=3,
        regression_pairs=11, class_dropout=0.2, grad_clip=4.0, eval_clips=6, checkpoint_every=13, seed=17)
    for field, value in (("stream_loss", "gan"), ("chunk", 0), ("kd_steps", -1), ("gap_clips", 0), ("kd_lr", 0.0),
                         ("grad_clip", float("nan")), ("method", "video")):
        with pytest.raises(ConfigFieldError, match=f"compress.distill.{field}"):
            dataclasses.replace(DistillConfig(), **{field: value}).check()
    # the video fields enter the stage's fingerprint only when video_2in1 runs (a kdmd run folder stays reusable)
    kdmd = distill_inputs(RunConfig())
    assert not any(k.rsplit(".", 1)[1] in VIDEO_DISTILL_FIELDS for k in kdmd) and "compress.distill.steps" in kdmd
    video = distill_inputs(RunConfig(compress=dataclasses.replace(RunConfig().compress, distill=changed)))
    assert set(video) - set(kdmd) == {f"compress.distill.{f}" for f in VIDEO_DISTILL_FIELDS}
