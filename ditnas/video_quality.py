"""Video quality with the still-image digits judge: per-frame label accuracy, temporal consistency, strips/GIFs.

The judge (judge.py) scores still images, so a clip (C, T, H, W) is scored frame by frame:

- `frame_label_accuracy`: the share of generated frames the judge classifies as the clip's label (a moving
  digit must stay that digit in every frame);
- `temporal_consistency`: mean cosine similarity of consecutive frames' judge features (a VBench-style
  frame-to-frame proxy, method.md §7.8 item 27) of the generated clips divided by the same number on real
  clips: 1 = as smooth as real motion, < 1 = flicker or jumps, > 1 = smoother than real (e.g. frozen);
- `judge_split`: the frames of a clip split as a still-image split, to train the judge on (T = 1 splits are
  returned as they are);
- `save_frame_strip` / `save_gif`: a PNG of a few clips (one row per clip, one column per frame) and an
  animated GIF of them side by side, written like the sample grids (PIL, atomic writes).
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ditnas.data import DatasetSplit
from ditnas.errors import DitnasError
from ditnas.io import atomic_write_bytes
from ditnas.judge import Judge


def _check_clips(clips: Tensor, what: str) -> Tensor:
    if clips.dim() != 5:
        raise DitnasError(f"{what} must be clips (N, C, T, H, W); got shape {tuple(clips.shape)}")
    # assumption: as judge.evaluate_samples, clamp to the data range and zero non-finite pixels
    return torch.nan_to_num(clips.detach().float(), nan=0.0, posinf=1.0, neginf=-1.0).clamp(-1.0, 1.0)


def frames_of(clips: Tensor) -> Tensor:
    """(N, C, T, H, W) -> (N*T, C, H, W), clip-major (clip 0's frames first)."""
    n, c, t, h, w = clips.shape
    return clips.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)


def judge_split(split: DatasetSplit) -> DatasetSplit:
    """The split the judge trains on: every frame of every clip as a still image with its clip's label
    (moving digits: the label is the digit, on the canvas in every frame); a still-image split unchanged."""
    if split.latent_shape[1] == 1:
        return split

    def still(x: Tensor) -> Tensor:
        return frames_of(x)[:, :, None]

    def labels(y: Tensor | None, x: Tensor) -> Tensor | None:
        return None if y is None else y.repeat_interleave(x.shape[2])

    return DatasetSplit(f"{split.name}:frames", still(split.train_x), labels(split.train_y, split.train_x),
                        still(split.val_x), labels(split.val_y, split.val_x), split.num_classes, split.class_names)


@torch.no_grad()
def frame_label_accuracy(judge: Judge, clips: Tensor, labels: Tensor) -> float:
    """Share of all frames of `clips` (N, C, T, H, W) the judge classifies as their clip's label (N,)."""
    x = _check_clips(clips, "clips")
    labels = torch.as_tensor(labels).reshape(-1).to(torch.int64)
    if labels.shape[0] != x.shape[0]:
        raise DitnasError(f"got {labels.shape[0]} labels for {x.shape[0]} clips; pass one label per clip")
    judge.eval()
    pred = judge.predict(frames_of(x)).cpu()
    return float((pred == labels.cpu().repeat_interleave(x.shape[2])).float().mean())


@torch.no_grad()
def consecutive_cosine(judge: Judge, clips: Tensor) -> float:
    """Mean cosine similarity of the judge features of frames t and t+1, over every clip and t."""
    x = _check_clips(clips, "clips")
    if x.shape[2] < 2:
        raise DitnasError(f"temporal consistency needs clips of >= 2 frames; got {x.shape[2]}")
    judge.eval()
    feats = judge.features(frames_of(x)).reshape(x.shape[0], x.shape[2], -1).double()
    # assumption: eps 1e-8 in the norms, so an all-zero (fully inactive) feature vector scores 0, not NaN
    return float(F.cosine_similarity(feats[:, 1:], feats[:, :-1], dim=-1, eps=1e-8).mean())


def temporal_consistency(judge: Judge, generated: Tensor, real: Tensor) -> float:
    """consecutive_cosine(generated) / consecutive_cosine(real): 1 = real clips' frame-to-frame smoothness."""
    real_cos = consecutive_cosine(judge, real)
    if not real_cos > 0:
        raise DitnasError(f"the real clips' consecutive-frame cosine is {real_cos:g}; temporal consistency is a ratio "
                          "to it, pass real clips the judge responds to")
    return consecutive_cosine(judge, generated) / real_cos


def _pixels(image: Tensor, frame_size: int) -> Image.Image:
    """(C, H, W) in [-1, 1] -> a PIL image, upscaled so frames of `frame_size` pixels are readable (128 px)."""
    c = image.shape[0]
    arr = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    pic = Image.fromarray(arr[..., 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
    scale = max(1, 128 // frame_size)
    return pic.resize((pic.width * scale, pic.height * scale), Image.NEAREST)


def _tile(images: list[list[Tensor]]) -> Tensor:
    """Rows of (C, H, W) tiles -> one (C, H', W') canvas with 1-pixel white gaps."""
    c, h, w = images[0][0].shape
    rows, cols = len(images), max(len(r) for r in images)
    canvas = torch.ones(c, rows * (h + 1) + 1, cols * (w + 1) + 1)
    for r, row in enumerate(images):
        for col, tile in enumerate(row):
            canvas[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + col * (w + 1): 1 + col * (w + 1) + w] = tile.cpu()
    return canvas


def save_frame_strip(clips: Tensor, path: Path, max_clips: int = 8) -> Path:
    """PNG: one row per clip (at most `max_clips`), one column per frame."""
    x = _check_clips(clips, "clips")[:max_clips]
    image = _pixels(_tile([[clip[:, t] for t in range(clip.shape[1])] for clip in x]), max(x.shape[-2:]))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def save_gif(clips: Tensor, path: Path, max_clips: int = 8, frame_ms: int = 150) -> Path:
    """Animated GIF (looping): the first `max_clips` clips side by side, one GIF frame per clip frame."""
    x = _check_clips(clips, "clips")[:max_clips]
    frames = [_pixels(_tile([[clip[:, t] for clip in x]]), max(x.shape[-2:])) for t in range(x.shape[2])]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)
