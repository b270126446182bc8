"""pixelflow.training.memory_estimate's training terms that come from how Lightning and DDP hold gradients, and the
behaviour of those two that the terms rest on."""

import lightning as L
import pytest
import torch
import torch.distributed as dist

from pixelflow.model import build_model
from pixelflow.sampling.memory import sampling_peak_bytes
from pixelflow.training import memory_estimate as estimate_memory
from tests.live_bytes import LiveBytes

ZERO = {"forward": [0.0] * 4, "retained": [0.0] * 4, "working_set": [0.0, 0.0], "k_opt": 2.0}


def test_grid_and_forward_phases_count_the_held_gradients_and_ddp_its_buckets():
    gradients = 4 * estimate_memory.param_count("XL/4")
    plain = estimate_memory.predict(ZERO, "XL/4", 256, 32, ema=True)
    with torch.device("meta"):
        net = build_model("XL/4", num_classes=1000)
    # the grid's sampling above the weights (already static), plus the gradients of the step just taken
    grid_sampling = sampling_peak_bytes(net, 256, 16, "euler", "bf16", steps=10) - gradients
    assert plain["sample_grid"] == pytest.approx(grid_sampling + gradients)
    first_step = estimate_memory.predict(ZERO, "XL/4", 256, 32, ema=True, gradients_kept=False)
    assert plain["forward"] - first_step["forward"] == gradients
    ddp = estimate_memory.predict(ZERO, "XL/4", 256, 32, ema=True, ddp=True)
    assert ddp["static"] - plain["static"] == gradients
    more_steps = estimate_memory.predict(ZERO, "XL/4", 256, 32, ema=True, grid_steps=30)
    assert more_steps["sample_grid"] > plain["sample_grid"]


class GradientsAtForward(L.LightningModule):
    """Records whether the gradients of the step before are still held when training_step runs."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.held: list[bool] = []

    def training_step(self, batch, batch_idx):
        self.held.append(self.layer.weight.grad is not None)
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class GradientsAfterStep(L.Callback):
    def __init__(self):
        self.held: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, *args):  # where SampleGrid samples
        self.held.append(pl_module.layer.weight.grad is not None)


def test_lightning_keeps_a_steps_gradients_through_the_callbacks_and_the_next_forward(tmp_path):
    module, callback = GradientsAtForward(), GradientsAfterStep()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                        default_root_dir=tmp_path)
    trainer.fit(module, torch.utils.data.DataLoader(torch.randn(12, 4), batch_size=4))
    assert module.held == [False, True, True] and callback.held == [True, True, True]


def test_ddp_buckets_hold_a_second_copy_of_the_gradients():
    """One gloo process: wrapping allocates exactly 4 bytes per parameter (the buckets), and a backward another 4
    (param.grad, apart from the buckets under DDP's default gradient_as_bucket_view=False)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 256))
        fp32_bytes = 4 * sum(p.numel() for p in model.parameters())
        tracker = LiveBytes(*model.parameters())
        start = tracker.current
        with tracker:
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            wrapped = tracker.current - start
            ddp(torch.randn(8, 256)).sum().backward()
        assert wrapped == fp32_bytes and tracker.current - start == 2 * fp32_bytes
    finally:
        dist.destroy_process_group()
