"""ADM's evaluator arithmetic (openai/guided-diffusion ``evaluations/evaluator.py``) for precision/recall and IS.

ADM's published numbers come from rules that differ from the textbook (float32/float64) maths, and a number is
comparable with ADM's only when computed by the same rules:

* Precision / recall: k-NN balls on *squared* Euclidean distances ||u||^2 - 2 u.v + ||v||^2 (clamped at 0),
  computed in float16 from float16-cast features, block by block (10,000 x 10,000, as ADM); a block with any
  non-finite float16 distance (an overflow: float16 ends at 65,504) is recomputed in float32. The radius of a
  point is the distance to its k-th nearest neighbour among its own set (itself at index 0), in float32; a
  point is inside a manifold when its distance to one of the manifold's points is <= that point's radius.
* Inception Score: softmax of the logits in float32, then exp(mean KL(p(y|x) || p(y))) over consecutive splits of
  5,000 samples, the last one shorter when N is not a multiple of 5,000, averaged (float32 arithmetic, as numpy
  on ADM's float32 softmax). torch-fidelity instead cuts N into ceil(N / 5,000) near-equal parts.

Which float16 roundings happen depends on TensorFlow's kernels: here they follow its CPU kernels (Eigen's
float16 reduction order for the norms, products accumulated in float32 and rounded once), which reproduce the
evaluator's distances bit for bit (``tests/data/adm_evaluator/``). On a GPU TensorFlow sums the norms in float32,
which can move a distance by one float16 step; that decides a point only when it lies within that step of a
ball's border.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["ADM_BLOCK", "adm_squared_distances", "adm_precision_recall", "adm_inception_score", "IS_SPLIT_SIZE"]

ADM_BLOCK = 10_000  # ADM's row and column batch of pairwise distances
_EIGEN_PACKET, _EIGEN_LEAF = 8, 1024  # Eigen's float16 packet (8 lanes, AVX) and tree-reduction leaf on CPU
IS_SPLIT_SIZE = 5000


def _half_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """One float16 addition as Eigen's CPU packets do it: in float32, rounded to float16."""
    return (a.float() + b.float()).half()


def _eigen_half_row_sums(x: torch.Tensor) -> torch.Tensor:
    """Row sums of float16 ``x`` (N, D) in the order of TensorFlow's CPU ``reduce_sum`` (Eigen's inner-most
    reducer): halves split recursively down to 1,024 values; each leaf summed in four 8-lane float16 accumulators,
    merged, its lanes summed in float32 and rounded, its tail added one value at a time."""
    n = x.shape[1]
    if n > _EIGEN_LEAF:
        split = (n // 2) // _EIGEN_PACKET * _EIGEN_PACKET
        return _half_add(_eigen_half_row_sums(x[:, :split]), _eigen_half_row_sums(x[:, split:]))
    acc = torch.zeros(x.shape[0], 4, _EIGEN_PACKET, dtype=torch.float16)
    start = 0
    if n >= 4 * _EIGEN_PACKET:
        start = n // (4 * _EIGEN_PACKET) * (4 * _EIGEN_PACKET)
        for block in x[:, :start].reshape(x.shape[0], -1, 4, _EIGEN_PACKET).unbind(1):
            acc = _half_add(acc, block)
    packet = _half_add(_half_add(_half_add(acc[:, 0], acc[:, 1]), acc[:, 2]), acc[:, 3])
    while start <= n - _EIGEN_PACKET:
        packet = _half_add(packet, x[:, start:start + _EIGEN_PACKET])
        start += _EIGEN_PACKET
    tail = torch.zeros(x.shape[0], dtype=torch.float16)
    for j in range(start, n):
        tail = _half_add(tail, x[:, j])
    return _half_add(packet.float().sum(1).half(), tail)


def _squared_distances_half(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ADM's float16 distances: norms by :func:`_eigen_half_row_sums` of float16 squares, products accumulated in
    float32 and rounded, then each of ``norm_u - 2 uv``, ``+ norm_v`` rounded to float16 and clamped at 0."""
    norm_u = _eigen_half_row_sums(u.square())[:, None]
    norm_v = _eigen_half_row_sums(v.square())[None, :]
    products = (u.float() @ v.float().T).half()
    return torch.clamp((norm_u - 2 * products) + norm_v, min=0)


def _squared_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    norm_u = u.square().sum(1, keepdim=True)
    norm_v = v.square().sum(1, keepdim=True).T
    return torch.clamp(norm_u - 2 * (u @ v.T) + norm_v, min=0)


def adm_squared_distances(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Squared distances of one block of rows ``u`` and columns ``v``: float16 if all finite, else float32; as float32."""
    u32, v32 = torch.from_numpy(np.asarray(u, np.float32)), torch.from_numpy(np.asarray(v, np.float32))
    block = _squared_distances_half(u32.half(), v32.half())
    if torch.isfinite(block).all():
        return block.float().numpy()
    return _squared_distances(u32, v32).numpy()


def _blocked_distances(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Distances of ``rows`` (one row block) to every column, ADM's column blocks each judged on its own."""
    return np.concatenate([adm_squared_distances(rows, cols[j:j + ADM_BLOCK]) for j in range(0, len(cols), ADM_BLOCK)],
                          axis=1)


def _radii(features: np.ndarray, k: int) -> np.ndarray:
    radii = np.empty(len(features), np.float32)
    for i in range(0, len(features), ADM_BLOCK):
        distances = _blocked_distances(features[i:i + ADM_BLOCK], features)
        radii[i:i + ADM_BLOCK] = np.partition(distances, k, axis=1)[:, k]
    return radii


def adm_precision_recall(sample_features: np.ndarray, ref_features: np.ndarray, k: int = 3) -> tuple[float, float]:
    """(precision, recall) by ADM's rules (module docstring): precision = samples inside the reference manifold,
    recall = references inside the sample manifold."""
    for name, f in (("sample", sample_features), ("reference", ref_features)):
        if len(f) <= k:
            raise ValueError(f"precision/recall with k={k} needs more than {k} {name} images, got {len(f)}")
    ref_radii, sample_radii = _radii(ref_features, k), _radii(sample_features, k)
    ref_inside = np.zeros(len(ref_features), bool)
    sample_inside = np.zeros(len(sample_features), bool)
    for i in range(0, len(ref_features), ADM_BLOCK):
        for j in range(0, len(sample_features), ADM_BLOCK):
            d = adm_squared_distances(ref_features[i:i + ADM_BLOCK], sample_features[j:j + ADM_BLOCK])
            ref_inside[i:i + ADM_BLOCK] |= (d <= sample_radii[None, j:j + ADM_BLOCK]).any(axis=1)
            sample_inside[j:j + ADM_BLOCK] |= (d <= ref_radii[i:i + ADM_BLOCK, None]).any(axis=0)
    return float(sample_inside.mean()), float(ref_inside.mean())


def adm_inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> tuple[float, float]:
    """ADM's Inception Score of unbiased logits (N, 1008): the mean over consecutive splits of ``split_size`` (what
    ADM reports), and the standard deviation over those splits."""
    probs = torch.softmax(torch.from_numpy(np.asarray(logits, np.float32)), dim=1).numpy()
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i:i + split_size]
        kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))
