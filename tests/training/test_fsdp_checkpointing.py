"""FSDP with activation checkpointing (``model.gradient_checkpointing=true``) on two CPU processes (gloo): the
blocks' forwards really run again in the backward, inside their FSDP units, and the optimizer steps equal
those of the same run without checkpointing."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest

from pixelflow.layers import TransformerBlock
from tests.training.test_long_runs import FSDP_CPU, _assert_same_state, _train


class CountBlockForwards(L.Callback):
    """Writes, per rank, how many TransformerBlock forwards each training step began (backward recomputation
    included: a pre-hook, since the recomputation stops once it has rebuilt what the backward needs, before a
    forward hook would run)."""

    def __init__(self, folder: str):
        self.folder, self.calls = Path(folder), 0

    def on_train_start(self, trainer, pl_module):
        for module in pl_module.modules():
            if isinstance(module, TransformerBlock):
                module.register_forward_pre_hook(self._count)

    def _count(self, *args) -> None:
        self.calls += 1

    def on_train_batch_end(self, trainer, pl_module, *args):
        with open(self.folder / f"rank{trainer.global_rank}.calls", "a") as f:
            f.write(f"{self.calls}\n")
        self.calls = 0


@pytest.mark.slow
def test_fsdp_with_gradient_checkpointing_recomputes_and_steps_as_without(tmp_path):
    runs = {}
    for ckpt in (True, False):
        folder = tmp_path / f"ckpt_{ckpt}"
        folder.mkdir()
        _train(folder / "run", 2, *FSDP_CPU, f"model.gradient_checkpointing={str(ckpt).lower()}",
               "callbacks.checkpoint.every_n_train_steps=1", "callbacks.checkpoint.keep_last=null",
               "+callbacks.count._target_=tests.training.test_fsdp_checkpointing.CountBlockForwards",
               f"+callbacks.count.folder={folder}")
        runs[ckpt] = folder
    calls = {ckpt: [[int(n) for n in (folder / f"rank{r}.calls").read_text().split()] for r in (0, 1)]
             for ckpt, folder in runs.items()}
    assert all(len(per_step) == 2 and min(per_step) > 0 for per_step in calls[False])
    assert calls[True] == [[2 * n for n in per_step] for per_step in calls[False]]  # every block forward ran twice
    for step in (1, 2):
        name = f"checkpoints/step_{step:07d}.ckpt"
        _assert_same_state(runs[True] / "run" / name, runs[False] / "run" / name)
