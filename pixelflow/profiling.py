"""Measuring torch code: seconds per call, FLOPs, live tensor bytes on CPU, and model FLOPs utilisation.

CUDA has allocator statistics (``torch.cuda.max_memory_allocated``); CPU has none, so
:class:`TensorMemoryTracker` counts the same quantity, live tensor storage, through a dispatch mode.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["TensorMemoryTracker", "synchronize", "timed", "count_flops", "PEAK_BF16_TFLOPS", "device_peak_tflops"]

# Dense bf16 tensor-core peaks (TFLOP/s, vendor data sheets) by a substring of the device name, for MFU.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0, "L4": 121.0,
                    "A10": 125.0}


class TensorMemoryTracker(TorchDispatchMode):
    """Live-tensor bytes and their high-water mark on CPU: every op output's storage is counted
    until it is freed (a weakref callback). Tensors made outside the mode are added with :meth:`track`."""

    def __init__(self) -> None:
        super().__init__()
        self.current = self.peak = 0
        self._live: dict[int, tuple[int, weakref.ref]] = {}

    def track(self, *tensors: Any) -> None:
        """Count the storage of every tensor in ``tensors`` (others and meta tensors are ignored) once."""
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in self._live:
                continue
            self._live[key] = (size, weakref.ref(storage, lambda _, k=key: self._free(k)))
            self.current += size
            self.peak = max(self.peak, self.current)

    def _free(self, key: int) -> None:
        size, _ = self._live.pop(key, (0, None))
        self.current -= size

    def reset_peak(self) -> None:
        """Start a new high-water mark from the bytes live now (to measure one phase after another)."""
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track(*tree_flatten(out)[0])
        return out


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work (a no-op elsewhere), so that a clock read after it covers that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Seconds per call of ``fn`` (after one untimed warm-up call)."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` as ``torch.utils.flop_counter.FlopCounterMode`` counts them (meta tensors work)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def device_peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The dense bf16 peak used for MFU: ``override`` if given, else :data:`PEAK_BF16_TFLOPS` by the CUDA
    device's name (None off CUDA or for a card not in the table)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
