"""Both metric protocols against the outputs of ADM's own evaluator code on fixed features (tests/data/adm_evaluator)."""

import json
from pathlib import Path

import numpy as np
import pytest

from pixelflow.metrics import fid as M
from pixelflow.metrics.adm import adm_inception_score, adm_precision_recall, adm_squared_distances

DATA = Path(__file__).resolve().parent / "data" / "adm_evaluator"
ADM = json.loads((DATA / "adm_outputs.json").read_text())


@pytest.fixture(scope="module")
def features():
    with np.load(DATA / "features.npz") as z:
        logits = (z["logit_factor_a"].astype(np.float32) @ z["logit_factor_b"].astype(np.float32)) / 8
        return z["sample_pool"].astype(np.float32), z["ref_pool"].astype(np.float32), logits


def test_adm_precision_recall_equals_adms_evaluator(features):
    sample, ref, _ = features
    assert adm_precision_recall(sample, ref) == (ADM["precision_recall"]["precision"], ADM["precision_recall"]["recall"])


def test_float32_fallback_when_float16_overflows_equals_adms_evaluator(features):
    sample, ref, _ = features
    scaled = ADM["precision_recall_features_times_16"]
    assert ((ref * 16) ** 2).sum(1).max() > np.finfo(np.float16).max  # the float16 norms overflow
    assert np.isfinite(adm_squared_distances(ref[:2] * 16, sample[:2] * 16)).all()
    assert adm_precision_recall(sample * 16, ref * 16) == (scaled["precision"], scaled["recall"])


def test_exact_protocol_differs_where_float16_rounding_decides(features):
    """float32 distances put 1 of the 300 references on the other side of a ball's border than ADM's float16 ones."""
    sample, ref, _ = features
    precision, recall = M.precision_recall(sample, ref)
    assert precision == pytest.approx(ADM["precision_recall"]["precision"], abs=1e-7)
    assert recall == pytest.approx(ADM["precision_recall"]["recall"] - 1 / 300, abs=1e-7)
    assert recall == pytest.approx(ADM["precision_recall_features_times_16"]["recall"], abs=1e-7)  # = ADM's float32 path


def test_adm_inception_score_equals_adms_evaluator(features):
    """Consecutive splits of 5,000 with a shorter last one (7,500: 5,000 + 2,500), float32; equal to ADM's up to
    the float32 rounding of the softmax (TensorFlow's vs PyTorch's)."""
    _, _, logits = features
    assert adm_inception_score(logits)[0] == pytest.approx(ADM["inception_score_7500"], rel=1e-6)
    assert adm_inception_score(logits[:5000])[0] == pytest.approx(ADM["inception_score_5000"], rel=1e-6)


def test_exact_protocol_inception_score_splits_into_equal_parts(features):
    """torch-fidelity cuts 7,500 into two parts of 3,750: another number than ADM's for N not a multiple of 5,000;
    for N = 5,000 (one split) only float64 vs ADM's float32 separates them (a few parts in a million)."""
    _, _, logits = features
    exact = M.inception_score(logits)[0]
    assert abs(exact - ADM["inception_score_7500"]) > 1e-3
    halves = [adm_inception_score(logits[:3750], 3750)[0], adm_inception_score(logits[3750:], 3750)[0]]
    assert exact == pytest.approx(np.mean(halves), rel=1e-5)
    one_split = M.inception_score(logits[:5000])[0]
    assert one_split == pytest.approx(ADM["inception_score_5000"], rel=1e-5)
    assert one_split != pytest.approx(ADM["inception_score_5000"], rel=1e-6)
