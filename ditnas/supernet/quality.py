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
    guidance: str = "cfg",
    uncond_fn: VelocityFn | None = None,
) -> Tensor:
    """Samples for `labels`, in batches, clamped to the data range [-1, 1] (guidance: flow.euler_sample)."""
    g = torch.Generator().manual_seed(seed)
    outs = []
    for i in range(0, labels.shape[0], batch):
        outs.append(
            euler_sample(fn, labels[i : i + batch], shape, steps=steps, cfg_scale=cfg_scale,
                         null_label=null_label, generator=g, shift=shift, guidance=guidance, uncond_fn=uncond_fn)
        )
    return torch.cat(outs).clamp(-1, 1)


def _grid_image(x: Tensor, nrow: int, scale_to: int) -> Image.Image:
    """(N, C, T, H, W) in [-1, 1] -> a PIL grid of `nrow` samples per row, each sample its T frames left to right
    (1-pixel gaps; 3 between samples of more than one frame), upscaled so the grid's frames are readable."""
    n, c, t, h, w = x.shape
    sep = 1 if t == 1 else 3
    cell = t * (w + 1) - 1
    rows = (n + nrow - 1) // nrow
    grid = torch.ones(c, rows * (h + 1) + 1, nrow * (cell + sep) - sep + 2)
    for i in range(n):
        r, col = divmod(i, nrow)
        for f in range(t):
            left = 1 + col * (cell + sep) + f * (w + 1)
            grid[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, left : left + w] = x[i, :, f]
    pixels = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(pixels[..., 0] if c == 1 else pixels, mode="L" if c == 1 else "RGB")
    scale = max(1, scale_to // max(h, w))  # upscale tiny digits so the grid is readable
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def save_grid(samples: Tensor, path: Path, nrow: int) -> Path:
    """Write (N, C, T, H, W) or (N, C, H, W) samples in [-1, 1] as a PNG grid of `nrow` samples per row.

    Clips (T > 1) show every frame: each clip is a frame strip (its T frames left to right), and an animated
    GIF of the same grid (one GIF frame per clip frame, `path` with suffix .gif) is written beside the PNG."""
    x = samples if samples.dim() == 5 else samples[:, :, None]
    frames = x.shape[2]
    path = Path(path)
    # assumption: a clip grid is upscaled 1/T as much as an image grid, so it stays as wide as the image grid
    atomic_write_bytes(path, _png(_grid_image(x.cpu(), nrow, 256 // frames)))
    if frames > 1:
        import io

        gif = [_grid_image(x[:, :, f : f + 1].cpu(), nrow, 64) for f in range(frames)]
        buffer = io.BytesIO()
        gif[0].save(buffer, format="GIF", save_all=True, append_images=gif[1:], duration=150, loop=0)
        atomic_write_bytes(path.with_suffix(".gif"), buffer.getvalue())
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
