"""Tests for ditnas.data: loaders, deterministic splits, input errors and the resumable sampler."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ditnas.data import BatchSampler, DatasetSplit, load_dataset
from ditnas.errors import DitnasError


@pytest.fixture(scope="module")
def digits() -> DatasetSplit:
    return load_dataset("digits")


def _write_png(path: Path, value: int, size: tuple[int, int] = (12, 12), mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 255 - value, 0)
    Image.new(mode, size, color).save(path)


# -- digits --------------------------------------------------------------------------------------
def test_digits_shape_range_labels(digits: DatasetSplit) -> None:
    assert digits.name == "digits"
    assert digits.train_x.shape[1:] == (1, 1, 16, 16)
    assert digits.latent_shape == (1, 1, 16, 16)
    assert digits.train_x.shape[0] + digits.val_x.shape[0] == 1797
    assert digits.val_x.shape[0] == pytest.approx(0.15 * 1797, abs=10)
    for x in (digits.train_x, digits.val_x):
        assert x.dtype == torch.float32
        assert x.min() >= -1.0 and x.max() <= 1.0
        assert x.min() == -1.0  # the blank background maps to -1
    assert digits.train_x.max() > 0.99  # full-intensity strokes reach ~+1
    for y in (digits.train_y, digits.val_y):
        assert y is not None and y.dtype == torch.int64
        assert set(y.tolist()) == set(range(10))
    assert digits.num_classes == 10
    assert digits.class_names == tuple(str(i) for i in range(10))


def test_digits_size_and_channels() -> None:
    s = load_dataset("digits", image_size=8, channels=3)
    assert s.latent_shape == (3, 1, 8, 8)
    assert torch.equal(s.train_x[:, 0], s.train_x[:, 2])  # grey replicated to RGB
    # At native size the values are the raw 0..16 grid mapped to [-1, 1] (multiples of 1/8).
    assert torch.allclose(s.train_x * 8, torch.round(s.train_x * 8))


def test_split_determinism(digits: DatasetSplit) -> None:
    again = load_dataset("digits", seed=0)
    assert torch.equal(again.train_x, digits.train_x) and torch.equal(again.val_y, digits.val_y)
    assert again.fingerprint() == digits.fingerprint()
    other = load_dataset("digits", seed=1)
    assert other.val_x.shape == digits.val_x.shape
    assert not torch.equal(other.val_x, digits.val_x)
    assert other.fingerprint() != digits.fingerprint()
    assert len(digits.fingerprint()) == 64


def test_split_is_stratified(digits: DatasetSplit) -> None:
    assert digits.train_y is not None and digits.val_y is not None
    train_counts = torch.bincount(digits.train_y, minlength=10)
    val_counts = torch.bincount(digits.val_y, minlength=10)
    totals = train_counts + val_counts
    assert torch.all((val_counts.double() - 0.15 * totals.double()).abs() <= 1.0)


def test_split_is_a_partition() -> None:
    """At native 8x8 the split's images are exactly load_digits' images, each used once."""
    from sklearn.datasets import load_digits

    s = load_dataset("digits", image_size=8)
    ref = load_digits()
    xs = ((torch.cat([s.train_x, s.val_x]).flatten(1) + 1) * 8).round().numpy()
    ys = torch.cat([s.train_y, s.val_y]).numpy()
    rows = np.column_stack([xs, ys])
    ref_rows = np.column_stack([ref.data, ref.target])
    np.testing.assert_array_equal(rows[np.lexsort(rows.T)], ref_rows[np.lexsort(ref_rows.T)])


# -- image folders -------------------------------------------------------------------------------
def test_image_folder_with_classes(tmp_path: Path) -> None:
    for i in range(4):
        _write_png(tmp_path / "cat" / f"{i}.png", 10 + i, size=(20, 10), mode="RGB")
        _write_png(tmp_path / "dog" / f"{i}.jpg", 200 + i, mode="RGB")
    (tmp_path / "dog" / "notes.txt").write_text("not an image, ignored")
    s = load_dataset(tmp_path, image_size=8, channels=3)
    assert s.num_classes == 2 and s.class_names == ("cat", "dog")
    assert s.latent_shape == (3, 1, 8, 8)
    assert s.train_x.shape[0] + s.val_x.shape[0] == 8
    assert s.val_x.shape[0] >= 1
    ys = torch.cat([s.train_y, s.val_y])
    xs = torch.cat([s.train_x, s.val_x])
    assert sorted(ys.tolist()) == [0] * 4 + [1] * 4
    # cat images are dark in red, dog images bright: labels follow the folder names.
    red = xs[:, 0].mean(dim=(1, 2, 3))
    assert torch.all((red > 0) == (ys == 1))
    assert xs.min() >= -1 and xs.max() <= 1


def test_unlabelled_folder(tmp_path: Path) -> None:
    for i in range(5):
        _write_png(tmp_path / f"img{i}.png", 40 * i)
    s = load_dataset(tmp_path, image_size=4)
    assert s.num_classes == 0 and s.train_y is None and s.val_y is None
    assert s.latent_shape == (1, 1, 4, 4)
    values = sorted(torch.cat([s.train_x, s.val_x])[:, 0, 0, 0, 0].tolist())
    assert values == pytest.approx([40 * i / 127.5 - 1 for i in range(5)], abs=1e-5)


def test_folder_load_is_deterministic(tmp_path: Path) -> None:
    for i in range(10):
        _write_png(tmp_path / f"{i}.png", 20 * i)
    a, b = load_dataset(tmp_path, image_size=4), load_dataset(tmp_path, image_size=4)
    assert torch.equal(a.val_x, b.val_x) and a.fingerprint() == b.fingerprint()


# -- errors --------------------------------------------------------------------------------------
def _raises_naming(path: Path, **kwargs) -> DitnasError:
    with pytest.raises(DitnasError) as info:
        load_dataset(path, **kwargs)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)
    return info.value


def test_empty_folder(tmp_path: Path) -> None:
    _raises_naming(tmp_path)


def test_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("hi")
    _raises_naming(tmp_path)


def test_corrupt_image(tmp_path: Path) -> None:
    _write_png(tmp_path / "good.png", 3)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(DitnasError, match="bad.png"):
        load_dataset(tmp_path)


def test_truncated_image(tmp_path: Path) -> None:
    _write_png(tmp_path / "good.png", 3)
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64), dtype=np.uint8)).save(buf, "PNG")
    cut = tmp_path / "cut.png"
    cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(DitnasError) as info:
        load_dataset(tmp_path)
    assert str(cut) in str(info.value)


def test_missing_path(tmp_path: Path) -> None:
    _raises_naming(tmp_path / "nope")


def test_unsupported_file(tmp_path: Path) -> None:
    f = tmp_path / "data.csv"
    f.write_text("1,2,3")
    _raises_naming(f)


def test_mixed_loose_images_and_class_folders(tmp_path: Path) -> None:
    _write_png(tmp_path / "loose.png", 1)
    _write_png(tmp_path / "a" / "1.png", 1)
    _raises_naming(tmp_path)


def test_empty_class_folder(tmp_path: Path) -> None:
    _write_png(tmp_path / "a" / "1.png", 1)
    _write_png(tmp_path / "a" / "2.png", 1)
    (tmp_path / "b").mkdir()
    with pytest.raises(DitnasError) as info:
        load_dataset(tmp_path)
    assert str(tmp_path / "b") in str(info.value)


def test_npy_bad_ndim(tmp_path: Path) -> None:
    f = tmp_path / "lat.npy"
    np.save(f, np.zeros((4, 8, 8), np.float32))
    _raises_naming(f)


def test_npy_non_finite(tmp_path: Path) -> None:
    f = tmp_path / "lat.npy"
    arr = np.zeros((4, 2, 3, 3), np.float32)
    arr[1, 0, 0, 0] = np.nan
    np.save(f, arr)
    _raises_naming(f)


def test_npy_label_length_mismatch(tmp_path: Path) -> None:
    f = tmp_path / "lat.npy"
    np.save(f, np.zeros((4, 2, 3, 3), np.float32))
    np.save(tmp_path / "lat.labels.npy", np.arange(3))
    _raises_naming(tmp_path / "lat.labels.npy")


def test_npy_garbage_file(tmp_path: Path) -> None:
    f = tmp_path / "lat.npy"
    f.write_bytes(b"garbage")
    _raises_naming(f)


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"val_fraction": 0.0}, "val_fraction=0.0 must be strictly between 0 and 1"),
        ({"val_fraction": 1.0}, "val_fraction=1.0 must be strictly between 0 and 1"),
        ({"channels": 2}, "channels=2 is not supported"),
        ({"image_size": 0}, "image_size=0 must be a positive"),
    ],
)
def test_bad_arguments(kwargs: dict, fragment: str) -> None:
    with pytest.raises(DitnasError, match=fragment):
        load_dataset("digits", **kwargs)


# -- npy latents ---------------------------------------------------------------------------------
def test_npy_round_trip(tmp_path: Path) -> None:
    rng = np.random.RandomState(0)
    lat = (rng.randn(40, 4, 2, 2) * 3).astype(np.float32)  # outside [-1, 1]: must not be rescaled
    labels = np.repeat(np.arange(4), 10)
    np.save(tmp_path / "lat.npy", lat)
    np.save(tmp_path / "lat.labels.npy", labels)
    s = load_dataset(tmp_path / "lat.npy", seed=3)
    assert s.latent_shape == (4, 1, 2, 2) and s.num_classes == 4
    assert s.train_y is not None and s.val_y is not None
    xs = torch.cat([s.train_x, s.val_x])[:, :, 0].numpy()
    ys = torch.cat([s.train_y, s.val_y]).numpy()
    order = np.lexsort(xs.reshape(len(xs), -1).T)
    ref_order = np.lexsort(lat.reshape(len(lat), -1).T)
    np.testing.assert_array_equal(xs[order], lat[ref_order])
    np.testing.assert_array_equal(ys[order], labels[ref_order])
    assert torch.bincount(s.val_y).tolist() == [2, 2, 2, 2]  # stratified: 15% of 10 -> 2 per class


def test_npy_5d_unlabelled(tmp_path: Path) -> None:
    np.save(tmp_path / "vid.npy", np.ones((6, 3, 2, 4, 4), np.float16))
    s = load_dataset(tmp_path / "vid.npy")
    assert s.latent_shape == (3, 2, 4, 4) and s.train_y is None and s.num_classes == 0
    assert s.train_x.dtype == torch.float32


# -- sampler -------------------------------------------------------------------------------------
def _indexed_split(n: int = 23, labelled: bool = True) -> DatasetSplit:
    """Each sample's value is its index, so batches reveal which samples were drawn."""
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1, 1)
    y = torch.arange(n) % 3 if labelled else None
    return DatasetSplit("idx", x, y, x[:2], None if y is None else y[:2], 3 if labelled else 0)


def test_sampler_epochs_cover_every_sample() -> None:
    split = _indexed_split(24)
    s = BatchSampler(split, batch_size=6, seed=0)
    for _ in range(3):
        seen = torch.cat([s.next()[0].flatten() for _ in range(4)])
        assert sorted(seen.long().tolist()) == list(range(24))
    x, y = s.next()
    assert x.shape == (6, 1, 1, 1, 1) and y is not None and torch.equal(y, x.flatten().long() % 3)


def test_sampler_large_batches_and_unlabelled() -> None:
    s = BatchSampler(_indexed_split(5, labelled=False), batch_size=12, seed=1)
    x, y = next(s)
    assert x.shape[0] == 12 and y is None
    counts = torch.bincount(x.flatten().long(), minlength=5)
    assert counts.min() >= 2  # two full epochs plus two extra samples


def test_sampler_seed_matters() -> None:
    split = _indexed_split()
    a, b = BatchSampler(split, 8, seed=0), BatchSampler(split, 8, seed=1)
    assert not torch.equal(a.next()[0], b.next()[0])


@pytest.mark.parametrize("k", [0, 1, 2, 3, 7])
def test_sampler_resume_is_exact(tmp_path: Path, k: int) -> None:
    split = _indexed_split(23)  # 23 is not a multiple of 5: batches straddle epochs
    a = BatchSampler(split, batch_size=5, seed=7)
    for _ in range(k):
        a.next()
    f = tmp_path / "state.pt"
    torch.save(a.state_dict(), f)
    expected = [a.next() for _ in range(12)]

    b = BatchSampler(split, batch_size=5, seed=7)
    b.next()  # a fresh sampler that has already moved on must be fully overwritten
    b.load_state_dict(torch.load(f, weights_only=True))
    got = [b.next() for _ in range(12)]
    for (xe, ye), (xg, yg) in zip(expected, got):
        assert torch.equal(xe, xg) and torch.equal(ye, yg)


def test_sampler_state_mismatch() -> None:
    state = BatchSampler(_indexed_split(23), 5).state_dict()
    with pytest.raises(DitnasError, match="23 samples"):
        BatchSampler(_indexed_split(24), 5).load_state_dict(state)
    with pytest.raises(DitnasError, match="batch_size"):
        BatchSampler(_indexed_split(23), 4).load_state_dict(state)
    with pytest.raises(DitnasError, match="incomplete or malformed"):
        BatchSampler(_indexed_split(23), 5).load_state_dict({"n": 23})
    broken = dict(state, cursor=99)
    with pytest.raises(DitnasError, match="inconsistent permutation/cursor"):
        BatchSampler(_indexed_split(23), 5).load_state_dict(broken)
