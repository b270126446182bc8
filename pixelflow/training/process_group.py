"""Process-group lifetime: a gloo group is destroyed when its process exits, as Lightning does for NCCL.

Left to C++ static destruction, a gloo group's threads abort the process ("terminate called without an
active exception", SIGABRT), which fails a ``ddp_spawn`` or CPU FSDP run after its last step and checkpoint:
the work objects those threads hold are freed while the interpreter is being torn down. So at exit, while
the interpreter is still whole: the ranks meet (no rank shuts its group down while another still talks to
it), the group is destroyed, and the garbage that still holds its work is collected.
"""

from __future__ import annotations

import atexit
import gc
import logging
from datetime import timedelta

import torch.distributed as dist

__all__ = ["destroy_gloo_group_at_exit"]

logger = logging.getLogger(__name__)

_registered = False
EXIT_BARRIER_TIMEOUT = timedelta(seconds=60)  # a rank that died already must not hold the others' exit for long


def _destroy_if_initialized() -> None:
    if not dist.is_initialized():
        return
    try:
        dist.monitored_barrier(timeout=EXIT_BARRIER_TIMEOUT)
    except RuntimeError as error:  # another rank is gone: nothing left to wait for
        logger.warning("at exit, not every rank reached the final barrier: %s", error)
    dist.destroy_process_group()
    gc.collect()


def destroy_gloo_group_at_exit() -> None:
    """Register, once per process, the destruction of this process's default group at interpreter exit, when
    that group is gloo. At exit, after every collective of the run: Lightning still gathers an FSDP model's
    state dict after teardown, so the group must outlive the Trainer."""
    global _registered
    if _registered or not (dist.is_available() and dist.is_initialized()) or dist.get_backend() != "gloo":
        return
    atexit.register(_destroy_if_initialized)
    _registered = True
