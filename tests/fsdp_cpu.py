"""Lightning's FSDPStrategy on CPU processes (gloo), for tests: real sharding, real optimizer steps.

Lightning refuses FSDP without a GPU accelerator and passes FSDP ``device_id=None`` on CPU, which
torch rejects; torch itself shards and steps on CPU when given ``device_id=cpu``. This subclass
changes only what CPU needs (and spawns its processes, as ddp_spawn does), so everything else
(wrapping policy, full state-dict checkpoints, precision plugin, the clipping hook) is the production path.

One CPU-only torch quirk: the full optimizer state dict with ``offload_to_cpu=True`` (Lightning's
setting) calls ``.cpu()`` on the gathered states, a copy on GPU but a no-op on CPU, so tensors share
torch's reused gather buffer (``exp_avg`` of the last parameter of a unit came back holding its
``exp_avg_sq``). The optimizer state is therefore gathered here without offloading.
"""

from __future__ import annotations

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, OptimStateKeyType, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP


class CPUFSDPStrategy(FSDPStrategy):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(*args, **kwargs)

    def _configure_launcher(self) -> None:
        self._launcher = _MultiProcessingLauncher(self, start_method="spawn")

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return FSDP(module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                    sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs)

    def optimizer_state(self, optimizer):
        assert self._state_dict_type == "full"
        optimizer = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True),
                                  FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True)):
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state
