"""FSDP helpers: whether a run shards its model, and a full (unsharded) copy of a submodule for rank-0 work such
as exporting."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp import FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from pixelflow.checkpoint import model_kwargs
from pixelflow.model import PixelFlowTransformer

__all__ = ["is_fsdp", "gather_model"]


def is_fsdp(trainer: L.Trainer) -> bool:
    """Whether ``trainer`` shards the model with FSDP. Asks the strategy, so it holds before ``fit`` wraps the
    model too; from setup on, the strategy's root module is then a ``FullyShardedDataParallel``."""
    return isinstance(trainer.strategy, FSDPStrategy)


def gather_model(trainer: L.Trainer, model: nn.Module) -> PixelFlowTransformer | None:
    """``model`` (a PixelFlowTransformer inside the LightningModule) as a full fp32 CPU copy on global rank 0.

    Without FSDP this is ``model`` itself (every rank). Under FSDP every rank must call it (the
    gather is collective); ranks other than 0 get None.
    """
    if not is_fsdp(trainer):
        return model
    root, module = trainer.strategy.model, trainer.lightning_module
    prefix = next(name for name, m in module.named_modules() if m is model) + "."
    with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
        state = root.state_dict()
    if not trainer.is_global_zero:
        return None
    with torch.device("meta"):
        full = PixelFlowTransformer(**model_kwargs(model))
    full = full.to_empty(device="cpu")
    full.load_state_dict({k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}, strict=True)
    return full.eval()
