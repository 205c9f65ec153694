"""Moving digits: a small video set made in code from the embedded scikit-learn digits.

Video support needs clips that are cheap, deterministic and carry real motion, without a download. Each
clip is one or two 8x8 digit glyphs (scaled to `glyph_size`) bouncing around a `size` x `size` canvas,
after Moving MNIST (Srivastava et al. 2015) but built from the bundled digits. Values follow the image
digits' normalisation (blank = -1, full stroke = +1) so every downstream stage sees the same range;
clips are (N, C, T, H, W) and the label is the first digit's class.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ditnas.errors import DitnasError

MOVING_DIGITS = "moving_digits"
NATIVE_GLYPH = 8  # scikit-learn's digits are 8x8 on a 0..16 grid
_NATIVE_MAX = 16.0


def default_glyph_size(size: int) -> int:
    """Glyph edge for a `size` canvas: 8 on 16x16 (native, no resampling), 12 on 32x32, 3/8 of larger ones.

    assumption: 3/8 of the canvas (Moving MNIST puts 28 px digits on 64 px, ~0.44) but never below the
    native 8 px, so the default 16x16 canvas shows the unresampled glyphs with 8 px of room to move.
    """
    return max(NATIVE_GLYPH, (3 * size) // 8)


def check_chunking(frames: int, chunk: int) -> int:
    """The number of chunks a clip of `frames` splits into; streaming code calls this before cutting clips."""
    if frames < 1 or chunk < 1 or frames % chunk != 0:
        raise DitnasError(
            f"chunk size {chunk} does not divide the clip length of {frames} frames; "
            f"choose a chunk that divides {frames} (e.g. 1 or {frames}) or change data.frames"
        )
    return frames // chunk


def make_moving_digits(
    n_clips: int,
    frames: int = 8,
    size: int = 16,
    digits_per_clip: int = 1,
    seed: int = 0,
    channels: int = 1,
    glyph_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`n_clips` clips (N, C, T, H, W) float32 in [-1, 1] and their labels (N,) int64 (first digit's class).

    Bit-identical for a seed on every machine: every random draw comes from numpy's legacy RandomState
    (a frozen stream), and rendering is integer indexing plus a deterministic CPU resize.
    """
    glyph = default_glyph_size(size) if glyph_size is None else glyph_size
    _check_arguments(n_clips, frames, size, digits_per_clip, channels, glyph)
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    digits = load_digits()
    pool = _glyphs(np.asarray(digits.images, dtype=np.float32), glyph)  # (1797, g, g) in [0, 1]
    targets = np.asarray(digits.target, dtype=np.int64)

    rng = np.random.RandomState(seed)
    room = size - glyph  # top-left corners live in [0, room] on both axes
    layers = []
    first_index = None
    for _ in range(digits_per_clip):  # draws happen in a fixed order: digit, start, velocity per digit
        # assumption: glyphs are drawn with replacement from all 1797 digits, so one glyph can appear in a
        # train clip and a validation clip (with other motion); the clips, not the glyphs, are split
        index = rng.randint(0, len(pool), size=n_clips)
        start = rng.uniform(0.0, room, size=(n_clips, 2))
        velocity = _random_velocities(rng, n_clips, size, room)
        corners = np.rint(bounce(start, velocity, frames, room)).astype(np.int64)
        layers.append(render(pool[index], corners, size))
        first_index = index if first_index is None else first_index
    # assumption: overlapping digits combine by the brighter pixel (max), as Moving MNIST's generator does,
    # so an overlap never exceeds a full stroke
    canvas = layers[0]  # (N, T, S, S) in [0, 1]; the in-place ops below keep peak memory at two layers
    if len(layers) == 2:
        np.maximum(canvas, layers[1], out=canvas)
    canvas *= 2.0
    canvas -= 1.0  # [0, 1] -> [-1, 1]: blank = -1, full stroke = +1, as the image digits
    clips = torch.from_numpy(canvas)[:, None]  # (N, 1, T, S, S)
    clips = clips.repeat(1, channels, 1, 1, 1).contiguous()  # grey replicated to RGB, as the image digits
    return clips, torch.from_numpy(targets[first_index].copy())


def bounce(start: np.ndarray, velocity: np.ndarray, frames: int, room: float) -> np.ndarray:
    """Positions (N, T, 2) of points moving at `velocity` per frame in [0, room], reflected off the walls.

    A reflection mirrors the overshoot back inside and flips that velocity component; with |v| <= room
    one reflection per frame is enough, which `make_moving_digits` guarantees by capping the speed.
    """
    if np.any(np.abs(velocity) > room):
        raise DitnasError(f"a velocity exceeds the room of {room} px per frame; cap the speed at the free space")
    pos = np.asarray(start, dtype=np.float64).copy()
    vel = np.asarray(velocity, dtype=np.float64).copy()
    out = np.empty((pos.shape[0], frames, 2), dtype=np.float64)
    out[:, 0] = pos
    for t in range(1, frames):  # a loop over frames only; every clip moves at once
        pos = pos + vel
        low, high = pos < 0.0, pos > room
        pos = np.where(low, -pos, np.where(high, 2.0 * room - pos, pos))
        vel = np.where(low | high, -vel, vel)
        out[:, t] = pos
    return out


def render(glyphs: np.ndarray, corners: np.ndarray, size: int) -> np.ndarray:
    """Paste glyph n (g, g) at integer top-left `corners[n, t]` of frame t: (N, T, size, size) float32."""
    n, g = glyphs.shape[0], glyphs.shape[-1]
    frames = corners.shape[1]
    if corners.min(initial=0) < 0 or corners.max(initial=0) > size - g:
        raise DitnasError(f"a glyph corner lies outside [0, {size - g}]; positions must keep the glyph on the canvas")
    canvas = np.zeros((n, frames, size, size), dtype=np.float32)
    offsets = np.arange(g)
    rows = corners[:, :, 0, None, None] + offsets[None, None, :, None]  # (N, T, g, 1)
    cols = corners[:, :, 1, None, None] + offsets[None, None, None, :]  # (N, T, 1, g)
    clip_idx = np.arange(n)[:, None, None, None]
    frame_idx = np.arange(frames)[None, :, None, None]
    canvas[clip_idx, frame_idx, rows, cols] = glyphs[:, None]  # one fancy-index write for every pixel
    return canvas


def _random_velocities(rng: np.random.RandomState, n: int, size: int, room: int) -> np.ndarray:
    """Float velocities (N, 2) in px/frame: a uniform direction and a speed of size/16 .. size/8.

    assumption: 1-2 px per frame on the 16x16 canvas (2-4 on 32x32) crosses the free space in a few
    frames, so an 8-frame clip usually bounces at least once; capped at the free space (see `bounce`).
    """
    angle = rng.uniform(0.0, 2.0 * np.pi, size=n)
    speed = np.minimum(rng.uniform(size / 16.0, size / 8.0, size=n), float(room))
    return np.stack([speed * np.sin(angle), speed * np.cos(angle)], axis=1)


def _glyphs(images: np.ndarray, glyph: int) -> np.ndarray:
    """The 8x8 digits on [0, 1], resized to glyph x glyph with the image digits' bilinear resize."""
    x = np.clip(images / _NATIVE_MAX, 0.0, 1.0)
    if glyph == NATIVE_GLYPH:
        return x.astype(np.float32)
    t = torch.from_numpy(x.astype(np.float32))[:, None]
    t = F.interpolate(t, size=(glyph, glyph), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    return t[:, 0].numpy()


def _check_arguments(n_clips: int, frames: int, size: int, digits_per_clip: int, channels: int, glyph: int) -> None:
    if n_clips < 1:
        raise DitnasError(f"moving digits: clips={n_clips} must be at least 1; set data.clips to the number of clips")
    if frames < 1:
        raise DitnasError(f"moving digits: frames={frames} must be at least 1; set data.frames to the clip length")
    if digits_per_clip not in (1, 2):
        raise DitnasError(f"moving digits: digits_per_clip={digits_per_clip} is not supported; use 1 or 2")
    if channels not in (1, 3):
        raise DitnasError(f"moving digits: channels={channels} is not supported; use 1 (grayscale) or 3 (RGB)")
    if glyph < 1:
        raise DitnasError(f"moving digits: glyph_size={glyph} must be a positive number of pixels")
    if size <= glyph:
        raise DitnasError(
            f"moving digits: a {size}x{size} canvas (data.image_size) leaves a {glyph}x{glyph} digit no room to "
            f"move; use image_size >= {glyph + 1} (e.g. 16 or 32)"
        )
