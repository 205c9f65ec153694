"""Sample quality of a sub-DiT, judged by the project's digits classifier.

- label accuracy of class-conditional samples drawn WITH classifier-free guidance;
- Fréchet distance (FD) in the judge's penultimate-feature space of samples drawn WITHOUT guidance
  (CFG collapses within-class variety and inflates FD) against real images, next to the real-vs-real
  floor a perfect generator would reach.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ditnas.arch import Arch
from ditnas.data import DatasetSplit
from ditnas.io import atomic_write_bytes
from ditnas.judge import Judge, evaluate_samples, real_fd_floor
from ditnas.supernet.flow import VelocityFn, euler_sample
from ditnas.supernet.model import ElasticDiT


def velocity_fn(model: torch.nn.Module, arch: Arch | None = None) -> VelocityFn:
    """A (x_t, t, y) -> v function for a supernet subnet (`run`) or a standalone model. Samplers and losses
    keep their tensors (and RNGs) on the CPU; a model on a GPU gets its inputs moved there and back."""
    if isinstance(model, ElasticDiT):
        target = arch or model.space.max_arch()
        fn = lambda x, t, y: model.run(target, x, t, y)  # noqa: E731
    else:
        fn = lambda x, t, y: model(x, t, y)  # noqa: E731
    device = next(model.parameters()).device
    if device.type == "cpu":
        return fn
    return lambda x, t, y: fn(x.to(device), t.to(device), y.to(device)).to(x.device)


@torch.no_grad()
def generate(
    fn: VelocityFn,
    labels: Tensor,
    shape: tuple[int, ...],
    *,
    steps: int,
    cfg_scale: float,
    null_label: int,
    seed: int,
    batch: int = 250,
    shift: float = 1.0,
) -> Tensor:
    """Samples for `labels`, in batches, clamped to the data range [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    outs = []
    for i in range(0, labels.shape[0], batch):
        outs.append(
            euler_sample(fn, labels[i : i + batch], shape, steps=steps, cfg_scale=cfg_scale,
                         null_label=null_label, generator=g, shift=shift)
        )
    return torch.cat(outs).clamp(-1, 1)


def save_grid(samples: Tensor, path: Path, nrow: int) -> Path:
    """Write (N, C, T, H, W) or (N, C, H, W) samples in [-1, 1] as a PNG grid (first frame)."""
    if samples.dim() == 5:
        samples = samples[:, :, 0]
    n, c, h, w = samples.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.ones(c, rows * (h + 1) + 1, nrow * (w + 1) + 1)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + col * (w + 1) : 1 + col * (w + 1) + w] = samples[i]
    pixels = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(pixels[..., 0] if c == 1 else pixels, mode="L" if c == 1 else "RGB")
    scale = max(1, 256 // max(h, w))  # upscale tiny digits so the grid is readable
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path = Path(path)
    atomic_write_bytes(path, _png(image))
    return path


def _png(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def evaluate_quality(
    fn: VelocityFn,
    judge: Judge,
    split: DatasetSplit,
    *,
    steps: int = 28,
    cfg_scale: float = 2.0,
    n_label: int = 500,
    n_fd: int = 1000,
    seed: int = 0,
    shift: float = 1.0,
) -> dict[str, float]:
    """label_accuracy (with CFG), fd (without CFG, vs real train images) and the real-vs-real fd_floor.

    Clips (T > 1) are judged frame by frame: accuracy and FD over all frames (the judge trained on frames,
    video_quality.judge_split), the floor at the same number of frames."""
    num_classes = split.num_classes
    shape = tuple(split.train_x.shape[1:])
    labels = torch.arange(n_label) % num_classes
    guided = generate(fn, labels, shape, steps=steps, cfg_scale=cfg_scale, null_label=num_classes, seed=seed, shift=shift)
    fd_labels = torch.from_numpy(np.random.default_rng(seed).integers(0, num_classes, n_fd))
    free = generate(fn, fd_labels, shape, steps=steps, cfg_scale=1.0, null_label=num_classes, seed=seed + 1, shift=shift)
    frames = shape[1]
    if frames > 1:  # clips: the still-image judge scores every frame (ditnas/video_quality.py)
        from ditnas.video_quality import frames_of, judge_split

        guided, labels = frames_of(guided)[:, :, None], labels.repeat_interleave(frames)
        free, split = frames_of(free)[:, :, None], judge_split(split)
    accuracy = evaluate_samples(judge, guided, labels)["label_accuracy"]
    reference = split.train_x
    fd = evaluate_samples(judge, free, None, reference)["fd"]
    floor = real_fd_floor(judge, split, n_fd * frames, seed)
    return {"label_accuracy": float(accuracy), "fd": float(fd), "fd_floor": float(floor), "n_label": n_label, "n_fd": n_fd,
            "steps": steps, "cfg_scale": cfg_scale}
