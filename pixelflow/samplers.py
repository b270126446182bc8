"""Deprecated import path, kept for scripts written before the move (e.g. ``../shared/bench/perf_compare.py``):
the samplers live in :mod:`pixelflow.sampling.samplers` since 2026-12-01."""

import warnings

from pixelflow.sampling.samplers import CascadeNoise, CascadeSampler, SamplerConfig, euler_grid, to_uint8

__all__ = ["SamplerConfig", "CascadeNoise", "CascadeSampler", "euler_grid", "to_uint8"]

warnings.warn("pixelflow.samplers moved to pixelflow.sampling.samplers; import from there", DeprecationWarning, stacklevel=2)
