"""The `ditnas run` stages' video fixes (configs/video.yaml): the distilled student's evaluation judges clips
frame by frame, the report draws clips as frame strips and says the latency is the whole clip's."""

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
from ditnas.video_quality import frames_of, save_frame_strip

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

    images = torch.rand((12, 1, 1, 8, 8), generator=g) * 2 - 1
    got = save_samples(images, tmp_path / "grid.png", per_class=4)
    assert got.read_bytes() == save_grid(images, tmp_path / "want_grid.png", nrow=4).read_bytes()


def test_report_names_the_clip_and_whole_clip_latency(tmp_path):
    from ditnas.reports.report import clip_note

    for name, latent in (("video", [1, 4, 16, 16]), ("image", [1, 1, 16, 16])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "table.json").write_text(json.dumps({"space": {"latent": latent}}))
    note = clip_note(tmp_path / "video")
    assert "(C, T, H, W) = (1, 4, 16, 16)" in note and "whole clip" in note and "frame strip" in note
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
