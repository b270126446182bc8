"""Sampling: samplers and integrators, generation at scale, compilation, memory model, and sampler sweeps."""
