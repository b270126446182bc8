"""Sample-quality maths on precomputed features: FID / sFID, Inception Score, precision-recall, KID.

All of it is torch-fidelity's implementation, called with ADM's (openai/guided-diffusion
``evaluations/evaluator.py``) settings; this is the ``exact`` metric protocol (float32 / float64 arithmetic).
ADM's own arithmetic for precision/recall and IS (the default ``adm`` protocol) is :mod:`pixelflow.metrics.adm`:

* Frechet distance: torch-fidelity's ``fid_statistics_to_metric`` on float64 mean / covariance.
* Inception Score: softmax of the *unbiased* logits (pool3 @ W, as ADM), float64, ceil(N / 5,000) near-equal
  consecutive parts, no shuffling: ADM's splits for N a multiple of 5,000 (50k -> 10 splits).
* Precision / recall (Kynkaanniemi et al. 2019, ADM's definition): k=3 nearest-neighbour balls; precision is
  the fraction of samples inside the reference manifold, recall the fraction of references inside the
  sample manifold, on float32 distances (ADM's float16 ones can count a point within float16 rounding of a
  ball's border differently).
* KID: torch-fidelity's unbiased MMD with a cubic polynomial kernel over random subsets.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import calculate_precision_recall_part

__all__ = ["feature_statistics", "frechet_distance", "inception_score", "precision_recall", "kernel_inception_distance",
           "IS_SPLIT_SIZE", "PR_NEIGHBOURHOOD"]

IS_SPLIT_SIZE = 5000
PR_NEIGHBOURHOOD = 3


def feature_statistics(features: np.ndarray) -> dict[str, np.ndarray]:
    """{'mu': mean (D,), 'sigma': covariance (D, D)} in float64, as ADM's reference batches store them."""
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need at least 2 feature vectors of shape (N, D) for a covariance, got {features.shape}")
    f = features.astype(np.float64)
    return {"mu": f.mean(axis=0), "sigma": np.cov(f, rowvar=False)}


def frechet_distance(stats_1: dict[str, np.ndarray], stats_2: dict[str, np.ndarray]) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), by torch-fidelity."""
    as64 = [{"mu": np.asarray(s["mu"], np.float64), "sigma": np.asarray(s["sigma"], np.float64)} for s in (stats_1, stats_2)]
    return float(fid_statistics_to_metric(as64[0], as64[1], verbose=False)["frechet_inception_distance"])


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> tuple[float, float]:
    """(mean, std) of exp(E KL(p(y|x) || p(y))) over consecutive splits of ``split_size`` samples."""
    splits = max(1, math.ceil(len(logits) / split_size))
    out = isc_features_to_metric(torch.from_numpy(np.asarray(logits)), splits=splits, shuffle=False)
    return out["inception_score_mean"], out["inception_score_std"]


def precision_recall(sample_features: np.ndarray, ref_features: np.ndarray, k: int = PR_NEIGHBOURHOOD,
                     batch_size: int = 10000) -> tuple[float, float]:
    """(precision, recall) with k-NN manifolds; memory-bounded (blocks of ``batch_size`` rows)."""
    for name, f in (("sample", sample_features), ("reference", ref_features)):
        if len(f) <= k:
            raise ValueError(f"precision/recall with k={k} needs more than {k} {name} images, got {len(f)}")
    return calculate_precision_recall_part(torch.from_numpy(np.asarray(sample_features, np.float32)),
                                           torch.from_numpy(np.asarray(ref_features, np.float32)), k, batch_size)


def kernel_inception_distance(sample_features: np.ndarray, ref_features: np.ndarray, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 2020) -> tuple[float, float]:
    """(mean, std) of unbiased polynomial-kernel MMD^2 over ``subsets`` random subsets (size capped by the set sizes)."""
    size = min(subset_size, len(sample_features), len(ref_features))
    out = kid_features_to_metric(torch.from_numpy(np.asarray(sample_features, np.float64)),
                                 torch.from_numpy(np.asarray(ref_features, np.float64)),
                                 kid_subsets=subsets, kid_subset_size=size, rng_seed=seed, verbose=False)
    return out["kernel_inception_distance_mean"], out["kernel_inception_distance_std"]
