"""Live tensor bytes on CPU, for tests that check a memory model against what a run allocates."""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Live tensor bytes and their high-water mark on CPU: each op output's storage counts until it is freed."""

    def __init__(self, *tensors: torch.Tensor):
        super().__init__()
        self.current = self.peak = 0
        self._live: dict[int, int] = {}
        self._add(tensors)

    def _add(self, tensors) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if storage.nbytes() and key not in self._live:
                    self._live[key] = storage.nbytes()
                    weakref.finalize(storage, self._free, key)
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._add(tree_flatten(out)[0])
        return out
