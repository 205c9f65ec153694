"""Tests for video data: moving digits (ditnas/video_data.py), their loader hook and 5-D `.npy` clips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ditnas.config import DataConfig, load_config
from ditnas.data import BatchSampler, load_dataset, load_split
from ditnas.errors import ConfigFieldError, DitnasError
from ditnas.video_data import bounce, check_chunking, default_glyph_size, make_moving_digits, render


@pytest.fixture(scope="module")
def clips16() -> tuple[torch.Tensor, torch.Tensor]:
    return make_moving_digits(300, frames=8, size=16, seed=0)


def _mass_and_centroid(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame ink mass (N, T) and centre of mass (N, T, 2) of channel 0, ink = (x + 1) / 2."""
    ink = (x[:, 0].double() + 1.0) / 2.0  # (N, T, H, W)
    mass = ink.sum(dim=(2, 3))
    rows = torch.arange(ink.shape[2], dtype=torch.float64)
    cols = torch.arange(ink.shape[3], dtype=torch.float64)
    cy = (ink.sum(3) * rows).sum(2) / mass
    cx = (ink.sum(2) * cols).sum(2) / mass
    return mass, torch.stack([cy, cx], dim=-1)


def _reference_clips(n: int, frames: int, size: int, digits_per_clip: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force, native 8x8 glyphs only: scalar bouncing and pixel-by-pixel pasting, same RNG draw order."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    g, room = 8, size - 8
    rng = np.random.RandomState(seed)
    ink = np.zeros((n, frames, size, size))
    labels = None
    for _ in range(digits_per_clip):
        index = rng.randint(0, len(digits.images), size=n)
        start = rng.uniform(0.0, room, size=(n, 2))
        angle = rng.uniform(0.0, 2.0 * np.pi, size=n)
        speed = np.minimum(rng.uniform(size / 16.0, size / 8.0, size=n), room)
        labels = digits.target[index] if labels is None else labels
        for k in range(n):
            pos = [float(start[k, 0]), float(start[k, 1])]
            vel = [speed[k] * np.sin(angle[k]), speed[k] * np.cos(angle[k])]
            for t in range(frames):
                if t > 0:
                    for a in range(2):
                        pos[a] += vel[a]
                        if pos[a] < 0:
                            pos[a], vel[a] = -pos[a], -vel[a]
                        elif pos[a] > room:
                            pos[a], vel[a] = 2 * room - pos[a], -vel[a]
                r, c = int(np.rint(pos[0])), int(np.rint(pos[1]))
                for i in range(g):
                    for j in range(g):
                        v = digits.images[index[k], i, j] / 16.0
                        ink[k, t, r + i, c + j] = max(ink[k, t, r + i, c + j], v)
    return ink * 2.0 - 1.0, labels.astype(np.int64)


# -- the generator -------------------------------------------------------------------------------
def test_shapes_dtypes_range_and_labels(clips16: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = clips16
    assert x.shape == (300, 1, 8, 16, 16) and x.dtype == torch.float32 and x.is_contiguous()
    assert y.shape == (300,) and y.dtype == torch.int64
    assert 0 <= int(y.min()) and int(y.max()) <= 9 and len(torch.unique(y)) == 10
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0  # blank = -1, full stroke = +1
    # native 8x8 glyphs: the image digits' value grid (0..16 -> multiples of 1/8 in [-1, 1])
    assert torch.equal(x * 8, torch.round(x * 8))
    big, _ = make_moving_digits(20, frames=3, size=32, seed=0, digits_per_clip=2, channels=3)
    assert big.shape == (20, 3, 3, 32, 32) and default_glyph_size(32) == 12 and default_glyph_size(16) == 8
    assert big.min() >= -1.0 and big.max() <= 1.0
    assert torch.equal(big[:, 0], big[:, 1]) and torch.equal(big[:, 0], big[:, 2])  # grey replicated to RGB


@pytest.mark.parametrize("digits_per_clip", [1, 2])
def test_equals_a_brute_force_reference(digits_per_clip: int) -> None:
    x, y = make_moving_digits(12, frames=7, size=16, digits_per_clip=digits_per_clip, seed=5)
    ref_x, ref_y = _reference_clips(12, 7, 16, digits_per_clip, seed=5)
    np.testing.assert_allclose(x[:, 0].numpy(), ref_x, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(y.numpy(), ref_y)  # the label is the first digit's class


def test_deterministic_under_a_seed() -> None:
    a, ya = make_moving_digits(64, frames=5, digits_per_clip=2, seed=11)
    b, yb = make_moving_digits(64, frames=5, digits_per_clip=2, seed=11)
    assert torch.equal(a, b) and torch.equal(ya, yb)  # bit-identical
    c, _ = make_moving_digits(64, frames=5, digits_per_clip=2, seed=12)
    assert not torch.equal(a, c)


def test_digits_really_move_and_stay_on_the_canvas(clips16: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, _ = clips16
    mass, centroid = _mass_and_centroid(x)
    assert float(mass.min()) > 1.0  # every frame holds a digit
    # one digit never leaves the canvas, so no ink is cut off at a wall: the mass is the same in every frame
    torch.testing.assert_close(mass, mass[:, :1].expand_as(mass), rtol=0, atol=1e-9)
    assert float(centroid.min()) >= 0.0 and float(centroid.max()) <= 15.0
    step = (centroid[:, 1:] - centroid[:, :-1]).norm(dim=-1)  # centroid displacement per frame, px
    assert float((step > 0.5).double().mean()) > 0.9  # most frame-to-frame steps move (measured: 0.97)
    assert bool((step > 0.5).any(dim=1).all())  # every clip moves at some point
    assert float(step.max()) <= 2.0 * np.sqrt(2) + 1.0  # speed <= size/8 = 2 px/frame plus rounding


def test_bounce_reflects_off_the_walls() -> None:
    room = 8.0
    # next to the top wall moving up, next to the right wall moving right
    pos = bounce(np.array([[0.2, 7.9]]), np.array([[-1.5, 1.0]]), frames=6, room=room)[0]
    np.testing.assert_allclose(pos[:, 0], [0.2, 1.3, 2.8, 4.3, 5.8, 7.3], atol=1e-12)
    np.testing.assert_allclose(pos[:, 1], [7.9, 7.1, 6.1, 5.1, 4.1, 3.1], atol=1e-12)
    # many random starts and velocities up to the room: always inside, speed kept per axis
    rng = np.random.RandomState(0)
    start = rng.uniform(0, room, (500, 2))
    vel = rng.uniform(-room, room, (500, 2))
    traj = bounce(start, vel, frames=20, room=room)
    assert traj.min() >= 0.0 and traj.max() <= room


def test_a_clip_started_at_a_wall_stays_in_bounds() -> None:
    glyph = np.ones((1, 8, 8), np.float32)
    for start, vel in (([0.1, 4.0], [-2.0, 0.0]), ([8.0, 7.6], [1.7, 1.9]), ([3.0, 0.0], [0.5, -2.0])):
        corners = np.rint(bounce(np.array([start]), np.array([vel]), frames=10, room=8)).astype(np.int64)
        frames = render(glyph, corners, size=16)[0]  # (T, 16, 16)
        assert (frames.sum(axis=(1, 2)) == 64).all()  # the whole 8x8 glyph is on the canvas in every frame
        first = np.argwhere(frames[0])[0]
        assert tuple(first) == tuple(corners[0, 0])
        assert len({tuple(c) for c in corners[0]}) > 1  # it did move off the wall


# -- the loader ----------------------------------------------------------------------------------
def test_loader_returns_5d_splits() -> None:
    s = load_dataset("moving_digits", image_size=16, frames=4, clips=80, seed=2)
    assert s.name == "moving_digits" and s.latent_shape == (1, 4, 16, 16)
    assert s.train_x.shape[0] + s.val_x.shape[0] == 80 and s.val_x.shape[0] >= 10
    assert s.num_classes == 10 and s.class_names == tuple(str(i) for i in range(10))
    clips, labels = make_moving_digits(80, frames=4, size=16, seed=2)
    # the split is a partition of the clips made under the same seed, labels aligned
    both = torch.cat([s.train_x, s.val_x]).flatten(1)
    both_y = torch.cat([s.train_y, s.val_y])
    order, ref_order = np.lexsort(both.numpy().T), np.lexsort(clips.flatten(1).numpy().T)
    assert torch.equal(both[order], clips.flatten(1)[ref_order])
    assert torch.equal(both_y[order], labels[ref_order])
    again = load_dataset("moving_digits", image_size=16, frames=4, clips=80, seed=2)
    assert again.fingerprint() == s.fingerprint()
    assert load_dataset("moving_digits", frames=4, clips=80, seed=3).fingerprint() != s.fingerprint()
    x, y = BatchSampler(s, batch_size=16, seed=0).next()
    assert x.shape == (16, 1, 4, 16, 16) and y is not None and y.shape == (16,)


def test_load_split_from_config_overrides() -> None:
    cfg = load_config(overrides=["data.source=moving_digits", "data.frames=3", "data.digits_per_clip=2",
                                 "data.clips=40", "data.image_size=32", "data.channels=3"])
    assert cfg.data == DataConfig(source="moving_digits", image_size=32, channels=3, frames=3, digits_per_clip=2,
                                  clips=40)
    s = load_split(cfg.data)
    assert s.latent_shape == (3, 3, 32, 32) and s.train_x.shape[0] + s.val_x.shape[0] == 40
    # image sources ignore the clip fields and stay (N, C, 1, H, W)
    assert load_split(DataConfig(frames=5)).latent_shape == (1, 1, 16, 16)


# -- .npy clips ----------------------------------------------------------------------------------
def test_npy_clips_round_trip_with_labels(tmp_path: Path) -> None:
    rng = np.random.RandomState(0)
    clips = (rng.randn(30, 2, 5, 4, 4) * 2).astype(np.float32)  # outside [-1, 1]: stored values kept
    labels = np.repeat(np.arange(3), 10)
    np.save(tmp_path / "clips.npy", clips)
    np.save(tmp_path / "clips.labels.npy", labels)
    s = load_dataset(tmp_path / "clips.npy", seed=1)
    assert s.latent_shape == (2, 5, 4, 4) and s.num_classes == 3
    xs = torch.cat([s.train_x, s.val_x]).numpy()
    ys = torch.cat([s.train_y, s.val_y]).numpy()
    order = np.lexsort(xs.reshape(len(xs), -1).T)
    ref_order = np.lexsort(clips.reshape(len(clips), -1).T)
    np.testing.assert_array_equal(xs[order], clips[ref_order])
    np.testing.assert_array_equal(ys[order], labels[ref_order])
    assert torch.bincount(s.val_y).tolist() == [2, 2, 2]  # stratified: 15% of 10 -> 2 per class


def test_npy_clips_round_trip_without_labels(tmp_path: Path) -> None:
    clips = np.arange(7 * 1 * 3 * 2 * 2, dtype=np.float64).reshape(7, 1, 3, 2, 2)
    np.save(tmp_path / "vid.npy", clips)
    s = load_dataset(tmp_path / "vid.npy")
    assert s.latent_shape == (1, 3, 2, 2) and s.train_y is None and s.val_y is None and s.num_classes == 0
    xs = torch.cat([s.train_x, s.val_x]).numpy()
    np.testing.assert_array_equal(xs[np.argsort(xs[:, 0, 0, 0, 0])], clips.astype(np.float32))


# -- bad input: one clear error each -------------------------------------------------------------
def _one_line(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("shape", [(4, 1, 2, 3, 3, 3), (4, 8, 8)])
def test_npy_clip_wrong_ndim_names_the_layout(tmp_path: Path, shape: tuple[int, ...]) -> None:
    f = tmp_path / "clips.npy"
    np.save(f, np.zeros(shape, np.float32))
    with pytest.raises(DitnasError) as info:
        load_dataset(f)
    message = _one_line(info)
    assert str(f) in message and f"ndim {len(shape)}" in message and "(N, C, T, H, W)" in message


def test_npy_clip_label_length_mismatch(tmp_path: Path) -> None:
    np.save(tmp_path / "clips.npy", np.zeros((6, 1, 4, 3, 3), np.float32))
    np.save(tmp_path / "clips.labels.npy", np.arange(5))
    with pytest.raises(DitnasError) as info:
        load_dataset(tmp_path / "clips.npy")
    message = _one_line(info)
    assert str(tmp_path / "clips.labels.npy") in message and "5 labels" in message and "6 samples" in message


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"frames": 0}, "frames=0 must be at least 1"),
        ({"digits_per_clip": 3}, "digits_per_clip=3 is not supported; use 1 or 2"),
        ({"digits_per_clip": 0}, "digits_per_clip=0 is not supported; use 1 or 2"),
        ({"size": 8}, "a 8x8 canvas (data.image_size) leaves a 8x8 digit no room to move; use image_size >= 9"),
        ({"size": 16, "glyph_size": 16}, "a 16x16 canvas"),
        ({"glyph_size": 0}, "glyph_size=0 must be a positive"),
        ({"n_clips": 0}, "clips=0 must be at least 1"),
        ({"channels": 2}, "channels=2 is not supported"),
    ],
)
def test_bad_generator_arguments(kwargs: dict, fragment: str) -> None:
    args = {"n_clips": 4, **kwargs}
    with pytest.raises(DitnasError) as info:
        make_moving_digits(**args)
    assert fragment in _one_line(info)


def test_loader_canvas_too_small() -> None:
    with pytest.raises(DitnasError) as info:
        load_dataset("moving_digits", image_size=8, clips=10)
    assert "data.image_size" in _one_line(info)


@pytest.mark.parametrize(
    "field,value,fragment",
    [
        ("frames", 0, "data.frames: 0 must be >= 1"),
        ("digits_per_clip", 3, "data.digits_per_clip: 3: choose 1 or 2"),
        ("clips", 1, "data.clips: 1 must be >= 2"),
    ],
)
def test_bad_config_fields(field: str, value: int, fragment: str) -> None:
    cfg = DataConfig(source="moving_digits", **{field: value})
    with pytest.raises(ConfigFieldError) as info:
        load_split(cfg)
    assert info.value.field == f"data.{field}" and fragment in _one_line(info)


def test_check_chunking() -> None:
    assert check_chunking(8, 2) == 4 and check_chunking(8, 8) == 1 and check_chunking(8, 1) == 8
    for frames, chunk in ((8, 3), (8, 0), (8, 16), (0, 4)):
        with pytest.raises(DitnasError) as info:
            check_chunking(frames, chunk)
        message = _one_line(info)
        assert f"chunk size {chunk}" in message and f"{frames} frames" in message


def test_bounce_and_render_refuse_impossible_motion() -> None:
    with pytest.raises(DitnasError) as info:
        bounce(np.zeros((1, 2)), np.array([[9.0, 0.0]]), frames=3, room=8)
    assert "room of 8" in _one_line(info)
    with pytest.raises(DitnasError) as info:
        render(np.ones((1, 8, 8), np.float32), np.array([[[0, 9]]]), size=16)
    assert "outside [0, 8]" in _one_line(info)
