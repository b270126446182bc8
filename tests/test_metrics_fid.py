"""The metric maths on synthetic features, against closed forms and an independent scipy Frechet distance."""

import numpy as np
import pytest
import scipy.linalg

from pixelflow.metrics import fid as M


def adm_frechet_distance(mu1, sigma1, mu2, sigma2):
    """ADM's / TTUR's formula with scipy.linalg.sqrtm, written independently of torch-fidelity."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean).real)


def _features(n, d, shift=0.0, seed=0):
    mix = np.random.default_rng(1234).normal(size=(d, d)) / np.sqrt(d)  # one distribution per (d, shift)
    rng = np.random.default_rng(seed)
    return (np.maximum(rng.normal(size=(n, d)) @ mix + shift, 0)).astype(np.float32)


def test_frechet_distance_matches_scipy_sqrtm():
    a, b = _features(600, 64), _features(500, 64, shift=0.3, seed=1)
    sa, sb = M.feature_statistics(a), M.feature_statistics(b)
    np.testing.assert_allclose(sa["mu"], a.astype(np.float64).mean(0), rtol=1e-12)
    expected = adm_frechet_distance(sa["mu"], sa["sigma"], sb["mu"], sb["sigma"])
    assert expected > 1.0
    assert M.frechet_distance(sa, sb) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_closed_forms():
    stats = M.feature_statistics(_features(300, 32))
    assert abs(M.frechet_distance(stats, stats)) < 1e-8
    moved = {"mu": stats["mu"] + 0.5, "sigma": stats["sigma"]}  # same covariance: FID = ||mean shift||^2
    assert M.frechet_distance(stats, moved) == pytest.approx(0.25 * 32, rel=1e-8)
    d = 8  # isotropic Gaussians: FID = d (s1 - s2)^2 for standard deviations s1, s2
    assert M.frechet_distance({"mu": np.zeros(d), "sigma": np.eye(d)}, {"mu": np.zeros(d), "sigma": 9 * np.eye(d)}) == pytest.approx(d * 4)


def test_feature_statistics_needs_two_rows():
    with pytest.raises(ValueError, match="at least 2 feature vectors"):
        M.feature_statistics(np.zeros((1, 4), np.float32))


def test_inception_score_closed_forms():
    assert M.inception_score(np.zeros((100, 1008)))[0] == pytest.approx(1.0)  # one uniform prediction for all
    k = 20  # confident, evenly spread over k classes: IS = k
    logits = np.zeros((6000, 1008))
    logits[np.arange(6000), np.arange(6000) % k] = 60.0
    mean, std = M.inception_score(logits)  # 2 splits: 5000 + 1000 consecutive samples, each balanced
    assert mean == pytest.approx(k, rel=1e-6) and std == pytest.approx(0, abs=1e-6)


def test_precision_recall_definitions():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(200, 16)).astype(np.float32)
    assert M.precision_recall(ref.copy(), ref) == (1.0, 1.0)
    assert M.precision_recall(ref + 100.0, ref) == (0.0, 0.0)
    half = np.concatenate([ref[:50], ref[:50] + 100.0])  # 50 on real points, 50 far away
    assert M.precision_recall(half, ref)[0] == 0.5
    # mode collapse: every sample next to one real image -> all realistic (precision 1), little coverage (recall)
    collapsed = ref[:1] + rng.normal(scale=1e-3, size=(100, 16)).astype(np.float32)
    precision, recall = M.precision_recall(collapsed, ref)
    assert precision == 1.0 and recall <= 0.02


def test_precision_recall_needs_more_than_k_points():
    with pytest.raises(ValueError, match="more than 3 sample images"):
        M.precision_recall(np.zeros((3, 4), np.float32), np.zeros((10, 4), np.float32))


def test_kid_separates_distributions():
    a, b, c = _features(400, 32, seed=0), _features(400, 32, seed=1), _features(400, 32, shift=0.5, seed=2)
    same, _ = M.kernel_inception_distance(a, b, subsets=20, subset_size=200)
    different, _ = M.kernel_inception_distance(a, c, subsets=20, subset_size=200)
    assert different > 0.05 and abs(same) < 0.05 * different
