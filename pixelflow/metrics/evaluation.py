"""The evaluation protocol: features of samples and reference, every metric, and the record of how.

:func:`evaluate` returns the content of ``metrics.json``: ``metrics`` (numbers), ``unavailable``
(metric -> reason, never a placeholder number), ``protocol`` (sample count, reference and its SHA-256,
feature extractor and its weights' SHA-256, sampler settings stored with the samples, metric settings)
and ``timing``. Reference features are cached under a key of what changes them
(:func:`inception_cache_parts`: reference SHA-256, count, extractor weights, device type and precision).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pixelflow.atomic import atomic_save_npz, atomic_write_text
from pixelflow.metrics import fid as M
from pixelflow.metrics.adm import adm_inception_score, adm_precision_recall
from pixelflow.metrics.dinov2 import DINOV2_INPUT_SIZE, DINOv2Features
from pixelflow.metrics.inception import (
    EXTRACTOR_NAME,
    PRECISION,
    SPATIAL_CHANNELS,
    InceptionFeatures,
    default_cache_dir,
    resolve_inception_weights,
)
from pixelflow.metrics.io import EvaluationInputError, ImageSet, load_image_set
from pixelflow.metrics.mnist_classifier import RECIPE, classify, load_or_train_classifier
from pixelflow.metrics.references import default_num_ref, is_mnist_reference, resolve_reference

__all__ = ["EvalOptions", "PROTOCOLS", "feature_cache_key", "inception_cache_parts", "dinov2_cache_parts", "evaluate",
           "evaluate_config", "format_table", "write_metrics"]

logger = logging.getLogger(__name__)
FEATURE_CACHE_VERSION = 1
# adm: ADM's evaluator arithmetic (float16 k-NN distances where they fit, IS over consecutive splits of 5,000, the
# last shorter; pixelflow.metrics.adm); exact: float32 distances and torch-fidelity's ceil(N / 5,000) equal IS parts.
PROTOCOLS = ("adm", "exact")


@dataclass
class EvalOptions:
    """Knobs of :func:`evaluate` (``conf/evaluate.yaml`` documents each)."""

    batch_size: int = 50
    device: str = "auto"
    inception_weights: str | None = None
    cache_dir: str | None = None
    kid: bool = False
    num_samples: int | None = None
    num_ref: int | None = None
    classifier: bool = False
    inception: bool = True  # False: only the MNIST classifier metrics (needs classifier=True)
    protocol: str = "adm"  # one of PROTOCOLS: how precision/recall and IS are computed
    dinov2_weights: str | None = None  # a local timm DINOv2 ViT file: adds FD-DINOv2


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EvaluationInputError(f"device={name} but no CUDA device is available; use device=cpu or device=auto")
    return name


def _count(images: ImageSet, limit: int | None, what: str) -> int:
    n = len(images) if limit is None else min(limit, len(images))
    if n < 2:
        raise EvaluationInputError(f"{what} {images.name} has {n} image(s) to use; FID needs at least 2 (and precision/recall more than "
                                   f"{M.PR_NEIGHBOURHOOD}). Pass more images or raise num_samples/num_ref")
    return n


def _extract(fn: Callable[[Iterable[np.ndarray]], Any], images: ImageSet, n: int, batch_size: int, what: str) -> tuple[Any, float]:
    """Run ``fn`` over the first ``n`` images behind a progress bar (images/s, ETA); returns (result, seconds)."""
    start = time.perf_counter()
    with tqdm(total=n, desc=what, unit="img", dynamic_ncols=True) as bar:
        def batches() -> Iterable[np.ndarray]:
            for batch in images.batches(batch_size, n):
                yield batch
                bar.update(len(batch))

        result = fn(batches())
    logger.info("%s: %d images in %.1f s", what, n, time.perf_counter() - start)
    return result, time.perf_counter() - start


def feature_cache_key(parts: list[Any]) -> str:
    """File name stem (in ``cache_dir/features``) of the features that ``parts`` describe."""
    return hashlib.sha256(json.dumps([FEATURE_CACHE_VERSION, *parts]).encode()).hexdigest()[:32]


def inception_cache_parts(ref_sha256: str, num_ref: int, weights_sha256: str, device: str | torch.device) -> list[Any]:
    """What a reference's Inception features depend on: the images, their count, the weights, and the arithmetic:
    the device type (CPU and CUDA convolutions round differently; the index of a CUDA device does not matter) and
    the extractor's precision (:data:`pixelflow.metrics.inception.PRECISION`)."""
    return ["inception", ref_sha256, num_ref, weights_sha256, torch.device(device).type, PRECISION]


def dinov2_cache_parts(ref_sha256: str, num_ref: int, weights_sha256: str, device: str | torch.device) -> list[Any]:
    """What a reference's DINOv2 features depend on (as :func:`inception_cache_parts`, with the DINOv2 weights)."""
    return ["dinov2", ref_sha256, num_ref, weights_sha256, torch.device(device).type, "fp32", DINOV2_INPUT_SIZE]


def _cached(cache: Path, parts: list[Any], compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    path = cache / "features" / f"{feature_cache_key(parts)}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as err:
            logger.warning("feature cache %s is unreadable (%s); recomputing", path, err)
    feats = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_npz(path, **feats)
    return feats


def evaluate(samples: ImageSet, ref: ImageSet, opts: EvalOptions) -> dict[str, Any]:
    """All metrics of ``samples`` against ``ref``; see the module docstring for the result's layout."""
    if not (opts.inception or opts.classifier or opts.dinov2_weights):
        raise EvaluationInputError("inception=false and classifier=false leave no metric to compute; enable one of them")
    if opts.protocol not in PROTOCOLS:
        raise EvaluationInputError(f"protocol={opts.protocol!r}: use adm (ADM's evaluator arithmetic, the default) or exact "
                                   "(float32 distances, torch-fidelity's IS splits)")
    adm = opts.protocol == "adm"
    device, cache = _device(opts.device), Path(opts.cache_dir) if opts.cache_dir else default_cache_dir()
    n_samples, n_ref = _count(samples, opts.num_samples, "samples"), _count(ref, opts.num_ref, "reference")
    metrics: dict[str, float] = {}
    unavailable: dict[str, str] = {}
    timing: dict[str, float] = {}
    weights = None
    if opts.inception:
        weights = resolve_inception_weights(opts.inception_weights, cache)
        net = InceptionFeatures(weights, device)
        gen, timing["sample_inception_seconds"] = _extract(net.extract, samples, n_samples, opts.batch_size, "Inception features (samples)")
        timing["inception_seconds_per_1000_images"] = 1000 * timing["sample_inception_seconds"] / n_samples
        start = time.perf_counter()
        real = _cached(cache, inception_cache_parts(ref.sha256, n_ref, weights.sha256, device),
                       lambda: _extract(net.extract, ref, n_ref, opts.batch_size, "Inception features (reference)")[0])
        timing["reference_inception_seconds"] = time.perf_counter() - start

        if ref.stats is not None:
            ref_pool = {"mu": ref.stats["mu"], "sigma": ref.stats["sigma"]}
            ref_spatial = {"mu": ref.stats["mu_s"], "sigma": ref.stats["sigma_s"]}
        else:
            ref_pool, ref_spatial = M.feature_statistics(real["pool"]), M.feature_statistics(real["spatial"])
        metrics["fid"] = M.frechet_distance(M.feature_statistics(gen["pool"]), ref_pool)
        metrics["sfid"] = M.frechet_distance(M.feature_statistics(gen["spatial"]), ref_spatial)
        if "logits" in gen:
            score = adm_inception_score if adm else M.inception_score
            metrics["inception_score"], metrics["inception_score_std"] = score(gen["logits"])
        else:
            unavailable["inception_score"] = ("the offline Inception weights (pool3 only) have no classifier layer; pass inception_weights="
                                              "/path/to/weights-inception-2015-12-05-6726825d.pth (torch-fidelity's full weights)")
        if min(n_samples, n_ref) > M.PR_NEIGHBOURHOOD:
            metrics["precision"], metrics["recall"] = (adm_precision_recall if adm else M.precision_recall)(gen["pool"], real["pool"])
        else:
            unavailable["precision"] = unavailable["recall"] = f"needs more than {M.PR_NEIGHBOURHOOD} sample and reference images"
        if opts.kid:
            metrics["kid"], metrics["kid_std"] = M.kernel_inception_distance(gen["pool"], real["pool"])

    dinov2_info = None
    if opts.dinov2_weights:
        encoder = DINOv2Features(opts.dinov2_weights, device)
        gen_d, timing["sample_dinov2_seconds"] = _extract(encoder.extract, samples, n_samples, opts.batch_size, "DINOv2 features (samples)")
        real_d = _cached(cache, dinov2_cache_parts(ref.sha256, n_ref, encoder.sha256, device),
                         lambda: _extract(encoder.extract, ref, n_ref, opts.batch_size, "DINOv2 features (reference)")[0])
        metrics["fd_dinov2"] = M.frechet_distance(M.feature_statistics(gen_d["dinov2"]), M.feature_statistics(real_d["dinov2"]))
        dinov2_info = {"weights_path": str(encoder.path), "weights_sha256": encoder.sha256, "width": encoder.width,
                       "feature": "class token after the final norm",
                       "input": f"bicubic (antialiased) resize to {DINOV2_INPUT_SIZE} x {DINOV2_INPUT_SIZE}, ImageNet mean/std",
                       "precision": "fp32 (strict)", "device": device}

    classifier_info = None
    if opts.classifier:
        clf = load_or_train_classifier(cache)
        classifier_info = {"recipe": RECIPE, "weights_sha256": clf.sha256, "mnist_test_accuracy": clf.test_accuracy,
                           "feature": "128-d penultimate layer", "path": str(clf.path)}
        run = lambda batches: classify(clf.model, batches)  # noqa: E731
        (gen_f, pred), timing["sample_classifier_seconds"] = _extract(run, samples, n_samples, opts.batch_size, "classifier (samples)")
        real_f = _cached(cache, ["classifier", ref.sha256, n_ref, clf.sha256],
                         lambda: {"features": _extract(run, ref, n_ref, opts.batch_size, "classifier (reference)")[0][0]})["features"]
        metrics["classifier_fid"] = M.frechet_distance(M.feature_statistics(gen_f), M.feature_statistics(real_f))
        labels = None if samples.labels is None else samples.labels[:n_samples]
        if labels is None:
            unavailable["classifier_accuracy"] = ("the samples carry no labels (ADM npz key 'arr_1'); "
                                                  "only conditional samples have a target class")
        elif labels.min() < -1 or labels.max() > 9:
            unavailable["classifier_accuracy"] = f"sample labels span {labels.min()}..{labels.max()}, not the 10 MNIST classes"
        elif labels.max() < 0:
            unavailable["classifier_accuracy"] = ("every sample label is -1 (no target class: text prompts without a "
                                                  "label; give them as label<TAB>prompt in the prompts file)")
        else:  # -1: a text-to-image sample whose prompt had no label; scored on the labelled ones
            known = labels >= 0
            metrics["classifier_accuracy"] = float((pred[known] == labels[known]).mean())

    protocol = {
        "num_samples": n_samples,
        "samples": {"path": samples.name, "sha256": samples.sha256, "image_shape": list(samples.shape[1:])},
        "reference": {"path": ref.name, "sha256": ref.sha256, "num_images": n_ref, "image_shape": list(ref.shape[1:]),
                      "fid_statistics": "precomputed in the reference file (mu, sigma, mu_s, sigma_s)" if ref.stats is not None
                      else f"computed from {n_ref} reference images"},
        "sampler_settings": samples.settings,
        "feature_extractor": None if weights is None else {
                              "name": EXTRACTOR_NAME, "weights": weights.description, "weights_path": str(weights.path),
                              "weights_sha256": weights.sha256, "input": "uint8 RGB, TF1-compatible bilinear resize to 299 x 299",
                              "fid_feature": "pool3 (2048)",
                              "sfid_feature": f"mixed_6/conv = Mixed_6d.branch1x1 output, channels 0-{SPATIAL_CHANNELS - 1}, "
                                              "NHWC-flattened (2023)",
                              "has_logits": weights.has_logits, "device": device,
                              "precision": f"{PRECISION} (strict: TF32 off, no autocast)"},
        "metric_protocol": opts.protocol,
        "metric_settings": {"precision_recall": f"k={M.PR_NEIGHBOURHOOD} nearest-neighbour manifolds on pool3 (ADM / Kynkaanniemi et al.), "
                                                + ("squared distances in float16 where finite, else float32, per 10,000 x 10,000 "
                                                   "block (ADM's evaluator)" if adm else "float32 distances (torch-fidelity)"),
                            "inception_score": "unbiased logits, " + (f"consecutive splits of {M.IS_SPLIT_SIZE}, the last shorter, "
                                               "float32 (ADM's evaluator)" if adm else
                                               f"ceil(N / {M.IS_SPLIT_SIZE}) equal consecutive parts, float64 (torch-fidelity)"),
                            "kid": "polynomial kernel, 100 subsets of min(1000, N)" if opts.kid else None},
        "classifier": classifier_info,
        "dinov2": dinov2_info,
        "options": asdict(opts),
    }
    return {"metrics": metrics, "unavailable": unavailable, "protocol": protocol, "timing": timing}


_ROWS = [("fid", "FID (Inception pool3)"), ("sfid", "sFID (Inception mixed_6/conv)"), ("inception_score", "Inception Score"),
         ("precision", "Precision (k=3)"), ("recall", "Recall (k=3)"), ("kid", "KID"), ("fd_dinov2", "FD-DINOv2"),
         ("classifier_accuracy", "MNIST classifier accuracy"), ("classifier_fid", "MNIST classifier FID")]


def format_table(result: dict[str, Any]) -> str:
    """A two-column text table of the metrics (unavailable ones with their reason)."""
    lines = [f"{'metric':32s} value", "-" * 40]
    for key, label in _ROWS:
        if key in result["metrics"]:
            lines.append(f"{label:32s} {result['metrics'][key]:.4f}")
        elif key in result["unavailable"]:
            lines.append(f"{label:32s} unavailable: {result['unavailable'][key]}")
    p = result["protocol"]
    lines.append(f"({p['num_samples']} samples vs {p['reference']['num_images']} reference images: {p['reference']['path']}; "
                 f"protocol {p['metric_protocol']})")
    return "\n".join(lines)


def write_metrics(result: dict[str, Any], path: str | Path) -> Path:
    """Write ``result`` as JSON (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2, sort_keys=False) + "\n")
    return path


def evaluate_config(cfg: Mapping[str, Any]) -> tuple[dict[str, Any], Path]:
    """Evaluate per ``cfg`` (the keys of conf/evaluate.yaml) and write ``metrics.json``; returns the result and its path."""
    if not cfg["samples"] or not cfg["ref"]:
        raise EvaluationInputError("both samples= and ref= are required, e.g. `python evaluate.py samples=DIR/samples.npz ref=mnist_test`")
    if cfg["classifier"] not in ("auto", True, False):
        raise EvaluationInputError(f"classifier={cfg['classifier']!r}: use auto, true or false")
    if cfg["num_threads"]:
        torch.set_num_threads(int(cfg["num_threads"]))
    samples_path, ref_name = Path(cfg["samples"]).expanduser(), str(cfg["ref"])
    samples = load_image_set(samples_path, cfg["num_workers"])
    ref = resolve_reference(ref_name, cfg["num_workers"])
    opts = EvalOptions(batch_size=cfg["batch_size"], device=cfg["device"], inception_weights=cfg["inception_weights"],
                       cache_dir=cfg["cache_dir"], kid=bool(cfg["kid"]), num_samples=cfg["num_samples"],
                       num_ref=default_num_ref(ref_name, cfg["num_ref"]), inception=bool(cfg["inception"]),
                       protocol=str(cfg["protocol"]), dinov2_weights=cfg["dinov2_weights"],
                       classifier=is_mnist_reference(ref_name) if cfg["classifier"] == "auto" else bool(cfg["classifier"]))
    result = evaluate(samples, ref, opts)
    out = Path(cfg["out"]) if cfg["out"] else (samples_path if samples_path.is_dir() else samples_path.parent) / "metrics.json"
    return result, write_metrics(result, out)
