"""The quality judge: a small CNN classifier of real images, used to score generated samples.

`label_accuracy` asks "does a sample conditioned on class k look like a k?"; `fd` is the Frechet
distance between the judge's penultimate features of samples and of real images (an FID-style
score with a domain-specific feature extractor instead of Inception). `real_fd_floor` is the FD
two independent draws of real data reach: the best score a perfect generator could get.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ditnas.data import DatasetSplit
from ditnas.errors import DitnasError
from ditnas.io import atomic_torch_save, verify_digest

FORMAT = "ditnas-judge"
# Bump when the architecture or training recipe changes, so cached judges are retrained.
JUDGE_VERSION = 1
DEFAULT_EPOCHS = 30
_CHUNK = 1024  # images per forward pass when scoring many samples (bounds activation memory)


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Use `n` intra-op threads inside the block and restore the caller's setting afterwards."""
    before = torch.get_num_threads()
    if n is not None and n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Judge(nn.Module):
    """conv32 -> conv64 -> maxpool -> fc128 (features) -> classes, on (C, H, W) images in [-1, 1]."""

    def __init__(self, num_classes: int, channels: int = 1, image_size: int = 16) -> None:
        super().__init__()
        if num_classes < 2:
            raise DitnasError(
                f"the judge needs labelled data with at least 2 classes (got {num_classes}); "
                "use 'digits' or an image folder with class subfolders"
            )
        self.num_classes, self.channels, self.image_size = num_classes, channels, image_size
        half = image_size // 2
        self.conv = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.BatchNorm2d(32),  # BN makes the short CPU training budget converge reliably
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * half * half, 128), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(128, num_classes)
        # Filled in by training / loading; kept as plain attributes (not buffers) for the header.
        self.val_accuracy: float = float("nan")
        self.fingerprint: str = ""
        self.seed: int = 0
        self.epochs: int = 0
        self.train_seconds: float = 0.0

    # -- inputs ---------------------------------------------------------------------------------
    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Accept (B, C, T, H, W) with T == 1 or (B, C, H, W); return (B, C, H, W) float32."""
        if x.ndim == 5:
            if x.shape[2] != 1:
                raise DitnasError(
                    f"the judge scores still images but got {x.shape[2]} frames (shape {tuple(x.shape)}); "
                    "score frames separately"
                )
            x = x[:, :, 0]
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.channels, self.image_size, self.image_size):
            raise DitnasError(
                f"the judge expects images of shape (B, {self.channels}, [1,] {self.image_size}, "
                f"{self.image_size}) but got {tuple(x.shape)}; generate at the judge's resolution"
            )
        return x.to(torch.float32)

    def _chunked(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        x = self._prepare(x)
        if x.shape[0] <= _CHUNK:
            return fn(x)
        return torch.cat([fn(x[i : i + _CHUNK]) for i in range(0, x.shape[0], _CHUNK)])

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self._features(x)))

    # -- public API -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(self._prepare(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) class logits."""
        return self._chunked(self._logits, x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 128) penultimate activations, the feature space of `frechet_distance`."""
        return self._chunked(self._features, x)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) int64 predicted class."""
        return self.logits(x).argmax(dim=1)

    def header(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": JUDGE_VERSION,
            "num_classes": self.num_classes,
            "channels": self.channels,
            "image_size": self.image_size,
            "fingerprint": self.fingerprint,
            "val_accuracy": float(self.val_accuracy),
            "seed": self.seed,
            "epochs": self.epochs,
            "train_seconds": float(self.train_seconds),
        }

    def save(self, path: str | Path) -> None:
        """Write atomically (temp file in the same folder, then os.replace)."""
        atomic_torch_save(Path(path), {"header": self.header(), "state_dict": self.state_dict()})

    @classmethod
    def load(cls, path: str | Path) -> Judge:
        path = Path(path)
        if not path.is_file():
            raise DitnasError(f"judge file {path} does not exist; train one with load_or_train_judge")
        verify_digest(path, "judge file")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            header, state = payload["header"], payload["state_dict"]
            if header.get("format") != FORMAT:
                raise ValueError(f"format is {header.get('format')!r}")
        except Exception as exc:  # truncated zip, pickle errors, wrong layout: all mean "bad file"
            raise DitnasError(
                f"judge file {path} is truncated or not a ditnas judge ({type(exc).__name__}); "
                "delete it to retrain"
            ) from None
        if header.get("version") != JUDGE_VERSION:
            raise DitnasError(
                f"judge file {path} is version {header.get('version')}, this ditnas uses "
                f"{JUDGE_VERSION}; delete it to retrain"
            )
        judge = cls(int(header["num_classes"]), int(header["channels"]), int(header["image_size"]))
        try:
            judge.load_state_dict(state)
        except RuntimeError as exc:
            raise DitnasError(
                f"judge file {path} has mismatched weights ({exc}); delete it to retrain"
            ) from None
        judge.val_accuracy = float(header["val_accuracy"])
        judge.fingerprint = str(header["fingerprint"])
        judge.seed = int(header["seed"])
        judge.epochs = int(header["epochs"])
        judge.train_seconds = float(header["train_seconds"])
        return judge.eval()


def _shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each image by a random integer offset in [-max_shift, max_shift] on both axes.

    Edges are replicated (not wrapped), which for digits keeps the -1 background.
    """
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    out = padded[torch.arange(b)[:, None, None], :, rows, cols]  # advanced dims first: (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def _accuracy(judge: Judge, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = judge.training
    judge.eval()
    acc = float((judge.predict(x) == y).float().mean())
    judge.train(was_training)
    return acc


def train_judge(
    split: DatasetSplit,
    *,
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = 64,
    lr: float = 3e-3,
    # assumption: one thread; at this model size a second thread gains little when the machine
    # is idle and loses ~1.5x when the cores are shared (measured on 2 cores).
    threads: int | None = 1,
    progress: bool = True,
) -> Judge:
    """Train the judge on split.train_x (random +-1 px shifts) and measure accuracy on split.val_x.

    Deterministic for a seed on one machine; the global torch RNG and thread count are restored.
    """
    if split.train_y is None or split.val_y is None or split.num_classes < 2:
        raise DitnasError(
            f"dataset {split.name} is unlabelled; the judge needs labels (use 'digits' or class subfolders)"
        )
    c, t, h, w = split.latent_shape
    if t != 1 or h != w:
        raise DitnasError(
            f"dataset {split.name} has sample shape {split.latent_shape}; "
            "the judge needs square still images"
        )
    if epochs < 1:
        raise DitnasError(f"epochs={epochs} must be at least 1")
    x_train, y_train = split.train_x[:, :, 0], split.train_y
    n = x_train.shape[0]
    steps_per_epoch = max(1, -(-n // batch_size))

    start = time.perf_counter()
    # fork_rng: weight init and dropout use the global RNG; seed it locally, restore it after.
    with _threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        judge = Judge(split.num_classes, c, h)
        opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.2
        )
        bar = _progress_bar(progress, epochs)
        with bar if bar is not None else contextlib.nullcontext():
            task = bar.add_task("training judge", total=epochs) if bar is not None else None
            for epoch in range(epochs):
                judge.train()
                perm = torch.randperm(n, generator=gen)
                total = 0.0
                for i in range(0, n, batch_size):
                    idx = perm[i : i + batch_size]
                    if len(idx) < 2:  # BatchNorm cannot train on a single image
                        continue
                    xb = _shift(x_train[idx], gen)
                    loss = F.cross_entropy(judge._logits(xb), y_train[idx], label_smoothing=0.05)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    total += float(loss.detach()) * len(idx)
                if bar is not None:
                    bar.update(task, advance=1, description=f"training judge (loss {total / n:.3f})")
        judge.eval()
        judge.val_accuracy = _accuracy(judge, split.val_x, split.val_y)
    judge.train_seconds = time.perf_counter() - start
    judge.fingerprint = split.fingerprint()
    judge.seed, judge.epochs = seed, epochs
    if progress:
        from rich.console import Console

        Console(stderr=True).print(
            f"judge: val accuracy {judge.val_accuracy:.4f} on {len(split.val_x)} images "
            f"({judge.train_seconds:.1f} s, {epochs} epochs)"
        )
    return judge


def _progress_bar(enabled: bool, epochs: int) -> Any:
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )


def judge_cache_path(split: DatasetSplit, cache_dir: str | Path, seed: int = 0) -> Path:
    """Where `load_or_train_judge` keeps the judge for this data and seed."""
    return Path(cache_dir) / f"judge-v{JUDGE_VERSION}-{split.fingerprint()[:16]}-s{seed}.pt"


def load_or_train_judge(
    split: DatasetSplit, cache_dir: str | Path, seed: int = 0, *, progress: bool = True
) -> Judge:
    """Load the cached judge for (data fingerprint, seed), training and caching it if absent."""
    path = judge_cache_path(split, cache_dir, seed)
    if path.exists():
        try:
            judge = Judge.load(path)
            if judge.fingerprint == split.fingerprint() and judge.seed == seed:
                return judge
        except DitnasError:
            pass  # assumption: a corrupt cache entry is simply rebuilt, not a user error
    judge = train_judge(split, seed=seed, progress=progress)
    judge.save(path)
    return judge


def _as_2d_float64(feats: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    if isinstance(feats, torch.Tensor):
        arr = feats.detach().cpu().double().numpy()
    else:
        arr = np.asarray(feats, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 2:
        raise DitnasError(f"{name} must be (N, D) features with N >= 2; got shape {arr.shape}")
    return arr


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets.

    FD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)). The trace of the matrix square root
    is computed as sum(sqrt(eig(S_a^(1/2) S_b S_a^(1/2)))): that matrix is symmetric PSD, so the
    eigenvalues are real (no imaginary residue to discard, unlike sqrtm(S_a S_b)) and singular
    covariances (ReLU features, few samples) need no epsilon offset.
    """
    a, b = _as_2d_float64(feats_a, "feats_a"), _as_2d_float64(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise DitnasError(f"feature sets have different widths ({a.shape[1]} vs {b.shape[1]})")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    mu_a, mu_b = a.mean(0), b.mean(0)
    # atleast_2d: np.cov returns a 0-d array for one-dimensional features
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _psd_sqrt(cov_a)
    mid = root_a @ cov_b @ root_a
    eig = np.linalg.eigvalsh((mid + mid.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    fd = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_covmean)
    return max(fd, 0.0)  # tiny negatives are rounding error


@torch.no_grad()
def evaluate_samples(
    judge: Judge,
    samples: torch.Tensor,
    labels: torch.Tensor | None = None,
    reference: torch.Tensor | None = None,
) -> dict[str, float | int]:
    """Score generated samples with the judge.

    Returns `n` and `n_nonfinite` always, `label_accuracy` when `labels` (the conditioning classes)
    are given, and `fd` when `reference` is given: real images (B, C, [T,] H, W), or precomputed
    (N, D) judge features of real images.
    """
    judge.eval()
    n = int(samples.shape[0])
    finite = torch.isfinite(samples)
    n_nonfinite = int((~finite.flatten(1).all(1)).sum()) if n else 0
    # assumption: samples are clamped to the data range as a decoder would, and NaN/inf pixels
    # (a diverged model) are zeroed so they score badly instead of poisoning the statistics.
    x = torch.nan_to_num(samples.float(), nan=0.0, posinf=1.0, neginf=-1.0).clamp(-1.0, 1.0)
    out: dict[str, float | int] = {"n": n, "n_nonfinite": n_nonfinite}
    feats = judge.features(x)
    if labels is not None:
        labels = torch.as_tensor(labels).reshape(-1).to(torch.int64)
        if labels.shape[0] != n:
            raise DitnasError(f"got {labels.shape[0]} labels for {n} samples; pass one label per sample")
        pred = judge.head(feats).argmax(dim=1)
        out["label_accuracy"] = float((pred == labels).float().mean()) if n else float("nan")
    if reference is not None:
        ref_feats = reference if reference.ndim == 2 else judge.features(reference)
        out["fd"] = frechet_distance(feats, ref_feats)
    return out


@torch.no_grad()
def real_fd_floor(judge: Judge, split: DatasetSplit, n: int, seed: int = 0) -> float:
    """FD between two disjoint random draws of n real images each (train and val pooled).

    This is what a perfect generator scores at sample size n (FD is biased upwards at small n),
    so compare it with `evaluate_samples(..., reference=<n real images>)` at the same n.
    assumption: when the pool holds fewer than 2n images, n is reduced to half the pool.
    """
    judge.eval()
    pool = torch.cat([split.train_x, split.val_x])
    n = min(n, pool.shape[0] // 2)
    if n < 2:
        raise DitnasError(f"dataset {split.name} is too small for an FD floor (need at least 4 images)")
    perm = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(seed))
    feats = judge.features(pool[perm[: 2 * n]])
    return frechet_distance(feats[:n], feats[n:])
