"""Tests for ditnas.judge: Frechet distance maths, the digits judge, its file format and scoring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from ditnas.data import DatasetSplit, load_dataset
from ditnas.errors import DitnasError
from ditnas.judge import (
    Judge,
    evaluate_samples,
    frechet_distance,
    judge_cache_path,
    load_or_train_judge,
    real_fd_floor,
    train_judge,
)

QUICK_EPOCHS = 4  # ~1-2 s on 2 cores; already ~99% on digits val


# -- Frechet distance (pure maths) ---------------------------------------------------------------
def _with_exact_moments(mean: np.ndarray, cov: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n samples whose sample mean and (ddof=1) covariance equal `mean` and `cov` exactly."""
    z = np.random.RandomState(seed).randn(n, len(mean))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.atleast_2d(np.cov(z, rowvar=False)))).T  # whiten: cov(z) == I
    return mean + z @ np.linalg.cholesky(cov).T


def _closed_form(m1: np.ndarray, c1: np.ndarray, m2: np.ndarray, c2: np.ndarray) -> float:
    covmean = scipy.linalg.sqrtm(c1 @ c2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * covmean))


def test_fd_of_identical_sets_is_zero() -> None:
    a = np.random.RandomState(0).randn(500, 16)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    t = torch.from_numpy(a).float()
    assert frechet_distance(t, t) == pytest.approx(0.0, abs=1e-4)


def test_fd_one_dimensional_closed_form() -> None:
    a = _with_exact_moments(np.array([1.0]), np.array([[4.0]]), 50, 0)
    b = _with_exact_moments(np.array([-2.0]), np.array([[0.25]]), 80, 1)
    # (mu1 - mu2)^2 + (sigma1 - sigma2)^2
    assert frechet_distance(a, b) == pytest.approx(9.0 + (2.0 - 0.5) ** 2, rel=1e-9)


def test_fd_matches_closed_form_for_full_covariances() -> None:
    rng = np.random.RandomState(3)
    d = 5
    m1, m2 = rng.randn(d), rng.randn(d)
    q1, q2 = rng.randn(d, d), rng.randn(d, d)
    c1, c2 = q1 @ q1.T + 0.1 * np.eye(d), q2 @ q2.T + 0.1 * np.eye(d)  # non-commuting
    a, b = _with_exact_moments(m1, c1, 200, 4), _with_exact_moments(m2, c2, 300, 5)
    assert frechet_distance(a, b) == pytest.approx(_closed_form(m1, c1, m2, c2), rel=1e-7)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)


def test_fd_handles_singular_covariances() -> None:
    rng = np.random.RandomState(0)
    a = np.zeros((100, 8))
    a[:, :2] = rng.randn(100, 2)  # rank 2 in 8 dimensions, like dead ReLU features
    b = a + 0.0
    assert frechet_distance(a, b) == pytest.approx(0.0, abs=1e-8)
    # same singular covariance, shifted mean: exactly the squared shift (no epsilon offset)
    shift = np.array([1.0, 2.0, 0, 0, 0, 0, 0, 0])
    assert frechet_distance(a, a + shift) == pytest.approx(5.0, rel=1e-9)
    # fewer samples than dimensions: against tr sqrt(S_a S_b) from the (real, >= 0) eigenvalues of S_a S_b
    c = rng.randn(10, 8)
    ca, cc = np.cov(a, rowvar=False), np.cov(c, rowvar=False)
    eig = np.clip(np.linalg.eigvals(ca @ cc).real, 0.0, None)
    ref = ((a.mean(0) - c.mean(0)) ** 2).sum() + np.trace(ca) + np.trace(cc) - 2 * np.sqrt(eig).sum()
    assert frechet_distance(a, c) == pytest.approx(ref, rel=1e-6)


def test_fd_grows_with_mean_shift() -> None:
    rng = np.random.RandomState(1)
    a, b = rng.randn(400, 6), rng.randn(400, 6)
    fds = [frechet_distance(a, b + shift) for shift in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(x < y for x, y in zip(fds, fds[1:]))
    # A pure shift by s in every one of 6 dimensions adds ~6 s^2.
    assert fds[-1] - fds[0] == pytest.approx(6 * 16, rel=0.05)


def test_fd_rejects_bad_shapes() -> None:
    with pytest.raises(DitnasError):
        frechet_distance(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(DitnasError):
        frechet_distance(np.zeros((1, 3)), np.zeros((10, 3)))
    with pytest.raises(DitnasError):
        frechet_distance(np.zeros(10), np.zeros(10))


# -- the judge -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits() -> DatasetSplit:
    return load_dataset("digits")


@pytest.fixture(scope="module")
def judge(digits: DatasetSplit) -> Judge:
    return train_judge(digits, seed=0, epochs=QUICK_EPOCHS, progress=False)


def test_quick_judge_is_accurate(judge: Judge, digits: DatasetSplit) -> None:
    assert judge.val_accuracy >= 0.95
    assert judge.fingerprint == digits.fingerprint()
    assert judge.epochs == QUICK_EPOCHS and judge.train_seconds > 0
    assert not judge.training
    # The reported accuracy is the accuracy of `predict` on the validation set.
    assert digits.val_y is not None
    acc = float((judge.predict(digits.val_x) == digits.val_y).float().mean())
    assert acc == pytest.approx(judge.val_accuracy)


@pytest.mark.slow
def test_full_judge_reaches_target_accuracy(digits: DatasetSplit, tmp_path: Path) -> None:
    # A corrupt cache entry is rebuilt: this trains the full-budget judge once and caches it.
    judge_cache_path(digits, tmp_path, seed=0).write_bytes(b"truncated")
    j = load_or_train_judge(digits, tmp_path, seed=0, progress=False)
    assert j.val_accuracy >= 0.97
    assert j.train_seconds < 120
    again = load_or_train_judge(digits, tmp_path, seed=0, progress=False)  # now a cache hit
    assert again.val_accuracy == j.val_accuracy and again.train_seconds == j.train_seconds


def test_training_is_polite_and_deterministic(digits: DatasetSplit) -> None:
    small = DatasetSplit(
        "small", digits.train_x[:256], digits.train_y[:256], digits.val_x[:64], digits.val_y[:64], 10
    )
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    a = train_judge(small, seed=5, epochs=1, threads=1, progress=False)
    assert torch.equal(torch.rand(3), expected_draw)  # global RNG untouched
    assert torch.get_num_threads() == threads
    b = train_judge(small, seed=5, epochs=1, threads=1, progress=False)
    assert torch.equal(a.logits(small.val_x), b.logits(small.val_x))


def test_input_layouts(judge: Judge, digits: DatasetSplit) -> None:
    x5 = digits.val_x[:7]
    with torch.no_grad():
        assert judge.logits(x5).shape == (7, 10)
        assert judge.features(x5).shape == (7, 128)
        assert torch.equal(judge.logits(x5), judge.logits(x5[:, :, 0]))
    with pytest.raises(DitnasError, match="16"):
        judge.logits(torch.zeros(2, 1, 1, 8, 8))
    with pytest.raises(DitnasError, match="frames"):
        judge.logits(torch.zeros(2, 1, 3, 16, 16))


def test_judge_needs_labels(digits: DatasetSplit) -> None:
    unlabelled = DatasetSplit("u", digits.train_x, None, digits.val_x, None, 0)
    with pytest.raises(DitnasError, match="unlabelled"):
        train_judge(unlabelled, progress=False)


def test_save_load_round_trip(judge: Judge, digits: DatasetSplit, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "judge.pt"
    judge.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["judge.pt", "judge.pt.sha256"]  # no temp file left behind
    loaded = Judge.load(path)
    assert not loaded.training
    assert loaded.val_accuracy == judge.val_accuracy
    assert loaded.fingerprint == judge.fingerprint and loaded.image_size == 16
    with torch.no_grad():
        assert torch.equal(loaded.logits(digits.val_x), judge.logits(digits.val_x))


def test_truncated_and_missing_files(judge: Judge, tmp_path: Path) -> None:
    path = tmp_path / "judge.pt"
    judge.save(path)
    data = path.read_bytes()
    for cut in (len(data) // 2, 10, 0):
        path.write_bytes(data[:cut])
        with pytest.raises(DitnasError) as info:
            Judge.load(path)
        assert str(path) in str(info.value)
    with pytest.raises(DitnasError, match="does not exist"):
        Judge.load(tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save({"header": {"format": "something else"}, "state_dict": {}}, other)
    with pytest.raises(DitnasError, match="not a ditnas judge"):
        Judge.load(other)


def test_load_or_train_uses_cache(judge: Judge, digits: DatasetSplit, tmp_path: Path) -> None:
    # Seed the cache with the quick judge so this test does not train for real.
    path = judge_cache_path(digits, tmp_path, seed=0)
    judge.save(path)
    loaded = load_or_train_judge(digits, tmp_path, seed=0, progress=False)
    with torch.no_grad():
        assert torch.equal(loaded.logits(digits.val_x[:32]), judge.logits(digits.val_x[:32]))
    assert judge_cache_path(digits, tmp_path, seed=1) != path
    assert judge_cache_path(load_dataset("digits", seed=1), tmp_path, seed=0) != path


# -- scoring -------------------------------------------------------------------------------------
def test_evaluate_real_and_bad_samples(judge: Judge, digits: DatasetSplit) -> None:
    n = 200
    real, labels = digits.val_x[:n], digits.val_y[:n]
    ref = digits.train_x[:n]
    good = evaluate_samples(judge, real, labels, reference=ref)
    assert good["n"] == n and good["n_nonfinite"] == 0
    assert good["label_accuracy"] >= 0.95

    shuffled = evaluate_samples(judge, real, labels.roll(1), reference=ref)
    assert shuffled["label_accuracy"] < 0.3  # wrong conditioning labels are caught

    noise = torch.rand(n, 1, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    bad = evaluate_samples(judge, noise, labels, reference=ref)
    assert bad["fd"] > 5 * good["fd"]

    # Precomputed reference features give the same FD as reference images.
    with torch.no_grad():
        feats = judge.features(ref)
    assert evaluate_samples(judge, real, reference=feats)["fd"] == pytest.approx(good["fd"])
    assert set(evaluate_samples(judge, real)) == {"n", "n_nonfinite"}

    nan = real.clone()
    nan[0] = float("nan")
    assert evaluate_samples(judge, nan, labels)["n_nonfinite"] == 1

    with pytest.raises(DitnasError, match="labels"):
        evaluate_samples(judge, real, labels[:5])


def test_real_fd_floor(judge: Judge, digits: DatasetSplit) -> None:
    floor = real_fd_floor(judge, digits, n=200, seed=0)
    assert floor == real_fd_floor(judge, digits, n=200, seed=0)
    assert floor != real_fd_floor(judge, digits, n=200, seed=1)
    noise = torch.rand(200, 1, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert 0 < floor < evaluate_samples(judge, noise, reference=digits.train_x[:200])["fd"] / 5
    half = (len(digits.train_x) + len(digits.val_x)) // 2
    capped = real_fd_floor(judge, digits, n=10**6, seed=0)
    assert capped == real_fd_floor(judge, digits, n=half, seed=0)  # n is capped at half the pool ...
    assert capped != real_fd_floor(judge, digits, n=half - 1, seed=0)  # ... and not below it
