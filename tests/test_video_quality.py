"""Video quality metrics (ditnas/video_quality.py) with a digits judge trained for real on moving-digit frames.

The judge is trained as the code does (judge.train_judge on video_quality.judge_split), on a small 12x12
canvas for speed; the numbers asserted: per-frame accuracy on real clips, the consistency ratio of a frozen
clip computed exactly, shuffled frames lowering it, and a brute-force cosine reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ditnas.config import DataConfig
from ditnas.data import load_split
from ditnas.errors import DitnasError
from ditnas.judge import train_judge
from ditnas.video_data import make_moving_digits
from ditnas.video_quality import (
    consecutive_cosine,
    frame_label_accuracy,
    frames_of,
    judge_split,
    save_frame_strip,
    save_gif,
    temporal_consistency,
)

torch.set_num_threads(1)
SIZE = 12  # the smallest canvas with room to move an 8x8 glyph a few pixels: a fast judge


@pytest.fixture(scope="module")
def trained():
    split = load_split(DataConfig(source="moving_digits", frames=4, clips=400, image_size=SIZE))
    judge = train_judge(judge_split(split), epochs=10, batch_size=32, lr=1e-2, progress=False)
    return judge, split


@pytest.fixture(scope="module")
def long_clips():
    clips, labels = make_moving_digits(48, frames=8, size=SIZE, seed=7)
    return clips, labels


def test_judge_split_holds_every_frame_with_its_clip_label(trained):
    _, split = trained
    frames = judge_split(split)
    n, _, t, _, _ = split.train_x.shape
    assert frames.latent_shape == (1, 1, SIZE, SIZE) and frames.train_x.shape[0] == n * t
    assert torch.equal(frames.train_x[t + 2, :, 0], split.train_x[1, :, 2])  # clip 1, frame 2
    assert torch.equal(frames.train_y[t:2 * t], split.train_y[1].repeat(t))


def test_frame_label_accuracy_on_real_clips_is_high(trained):
    judge, split = trained
    accuracy = frame_label_accuracy(judge, split.val_x, split.val_y)
    assert accuracy >= 0.85, accuracy
    assert frame_label_accuracy(judge, split.val_x, (split.val_y + 1) % 10) <= 0.3  # wrong labels score low
    # brute force: judge each frame alone
    hits = [int(judge.predict(split.val_x[i:i + 1, :, f])[0] == split.val_y[i])
            for i in range(split.val_x.shape[0]) for f in range(split.val_x.shape[2])]
    assert accuracy == pytest.approx(sum(hits) / len(hits), abs=1e-6)  # a float32 mean


@torch.no_grad()
def test_consecutive_cosine_equals_a_brute_force_reference(trained, long_clips):
    judge, _ = trained
    clips = long_clips[0][:3]
    sims = []
    for clip in clips:
        feats = [judge.features(clip[None, :, f]).double().numpy()[0] for f in range(clip.shape[1])]
        sims += [float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) for a, b in zip(feats[1:], feats[:-1])]
    assert consecutive_cosine(judge, clips) == pytest.approx(float(np.mean(sims)), abs=1e-6)


def test_a_frozen_clip_has_exactly_the_inverse_real_cosine(trained, long_clips):
    judge, _ = trained
    real = long_clips[0]
    frozen = real[:, :, :1].repeat(1, 1, real.shape[2], 1, 1)  # one repeated frame per clip
    assert consecutive_cosine(judge, frozen) == pytest.approx(1.0, abs=1e-9)
    real_cos = consecutive_cosine(judge, real)
    assert temporal_consistency(judge, frozen, real) == pytest.approx(1.0 / real_cos, rel=1e-9)
    assert temporal_consistency(judge, frozen, frozen) == pytest.approx(1.0, abs=1e-9)


def test_shuffled_frames_lower_temporal_consistency(trained, long_clips):
    judge, _ = trained
    real = long_clips[0]
    other, _ = make_moving_digits(48, frames=8, size=SIZE, seed=8)
    ordered = temporal_consistency(judge, other, real)  # independent real clips: about 1
    shuffled = temporal_consistency(judge, other[:, :, torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])], real)
    assert 0.9 < ordered < 1.1, ordered
    assert shuffled < ordered - 0.05, (shuffled, ordered)


def test_strip_and_gif_writers(tmp_path, long_clips):
    clips = long_clips[0][:3]
    strip = Image.open(save_frame_strip(clips, tmp_path / "strip.png"))
    scale = 128 // SIZE
    assert strip.size == ((8 * (SIZE + 1) + 1) * scale, (3 * (SIZE + 1) + 1) * scale)
    gif = Image.open(save_gif(clips, tmp_path / "clips.gif"))
    assert gif.n_frames == 8 and gif.size == ((3 * (SIZE + 1) + 1) * scale, (SIZE + 1 + 1) * scale)
    gif.seek(5)  # frame 5 of clip 1 sits in the second tile
    tile = np.asarray(gif.convert("L"))[scale * 1: scale * (1 + SIZE), scale * (SIZE + 2): scale * (2 * SIZE + 2)]
    want = ((clips[1, 0, 5].clamp(-1, 1) + 1) * 127.5).round().numpy()
    assert np.abs(tile[::scale, ::scale].astype(float) - want).max() <= 1


def test_metric_errors(trained):
    judge, split = trained
    with pytest.raises(DitnasError, match="got 3 labels for 4 clips"):
        frame_label_accuracy(judge, split.val_x[:4], split.val_y[:3])
    with pytest.raises(DitnasError, match=r"clips \(N, C, T, H, W\)"):
        consecutive_cosine(judge, split.val_x[:, :, 0])
    with pytest.raises(DitnasError, match=">= 2 frames"):
        consecutive_cosine(judge, split.val_x[:, :, :1])
    assert frames_of(split.val_x).shape == (split.val_x.shape[0] * 4, 1, SIZE, SIZE)
