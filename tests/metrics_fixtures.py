"""Helpers shared by the metrics tests."""

import numpy as np


def independent_fid(a: np.ndarray, b: np.ndarray, mean_b: np.ndarray | None = None) -> float:
    """Frechet distance of the Gaussians fitted to feature rows ``a`` and ``b`` (``b``'s mean optionally replaced),
    computed without torch-fidelity and exactly even when N < D.

    S_a S_b = ca^T (ca cb^T) cb / (na nb) has the non-zero eigenvalues of M M^T with M = ca cb^T / sqrt(na nb),
    so tr sqrt(S_a S_b) is the sum of M's singular values (an N x N SVD instead of a D x D square root).
    """
    a, b = a.astype(np.float64), b.astype(np.float64)
    ca, cb = a - a.mean(0), b - b.mean(0)
    na, nb = len(a) - 1, len(b) - 1
    tr_covmean = np.linalg.svd(ca @ cb.T / np.sqrt(na * nb), compute_uv=False).sum()
    diff = a.mean(0) - (b.mean(0) if mean_b is None else mean_b)
    return float(diff @ diff + (ca**2).sum() / na + (cb**2).sum() / nb - 2 * tr_covmean)
