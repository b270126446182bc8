"""Process-group lifetime: a gloo group is destroyed when its process exits, as Lightning does for NCCL.

Left to C++ static destruction, a gloo group's threads abort the process about one exit in three
("terminate called without an active exception", SIGABRT; 9 of 30 two-process runs on 2026-12-01), which
fails a ``ddp_spawn`` or CPU FSDP run after its last step and checkpoint.
"""

from __future__ import annotations

import atexit

import torch.distributed as dist

__all__ = ["destroy_gloo_group_at_exit"]

_registered = False


def _destroy_if_initialized() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def destroy_gloo_group_at_exit() -> None:
    """Register, once per process, the destruction of this process's default group at interpreter exit, when
    that group is gloo. At exit, after every collective of the run: Lightning still gathers an FSDP model's
    state dict after teardown, so the group must outlive the Trainer."""
    global _registered
    if _registered or not (dist.is_available() and dist.is_initialized()) or dist.get_backend() != "gloo":
        return
    atexit.register(_destroy_if_initialized)
    _registered = True
