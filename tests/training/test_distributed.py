"""Two-process DDP on CPU (gloo): gradients equal the single-process global batch; Lightning DDP trains."""

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from pixelflow.cascade import CascadeSchedule
from pixelflow.data.imagenet import ImageNetDataModule
from pixelflow.model import build_model
from pixelflow.training.lit_module import PixelFlowLitModule
from tests.fixed_pairs import fixed_pair_loss, random_test_model
from tests.imagefolder import make_image_folder

SCHEDULE = CascadeSchedule(image_size=16)


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    return images, torch.arange(8)


def _ddp_grads(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = DistributedDataParallel(random_test_model(8))
        images, ids = global_batch()
        local = slice(rank * 8 // world, (rank + 1) * 8 // world)
        fixed_pair_loss(model, SCHEDULE, images[local], ids[local]).backward()
        torch.save({n: p.grad for n, p in model.module.named_parameters()}, Path(out_dir) / f"grads{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_gradients_equal_single_process_global_batch(tmp_path):
    mp.spawn(_ddp_grads, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    model = random_test_model(8)
    images, ids = global_batch()
    fixed_pair_loss(model, SCHEDULE, images, ids).backward()
    reference = {n: p.grad for n, p in model.named_parameters()}
    ranks = [torch.load(tmp_path / f"grads{r}.pt") for r in range(2)]
    assert sum(g.abs().sum() for g in reference.values()) > 0
    for name, grad in reference.items():
        torch.testing.assert_close(ranks[0][name], grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ranks[1][name], grad, rtol=1e-5, atol=1e-7)
    # Not a vacuous match: one rank's half-batch alone gives a different gradient.
    model.zero_grad()
    fixed_pair_loss(model, SCHEDULE, images[:4], ids[:4]).backward()
    assert max((p.grad - reference[n]).abs().max() for n, p in model.named_parameters()) > 1e-4


class RankReport(L.Callback):
    """Each rank writes what it trained on and where its weights ended."""

    def __init__(self, out_dir: str):
        self.out_dir, self.first_batch = out_dir, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first_batch is None:
            self.first_batch = batch[0].clone()

    def on_train_end(self, trainer, pl_module):
        params = torch.cat([p.detach().flatten() for p in pl_module.model.parameters()])
        torch.save({"params": params, "first_batch": self.first_batch, "step": trainer.global_step,
                    "world": trainer.world_size, "skips": trainer.datamodule.skips.total},
                   Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_lightning_ddp_spawn_trains_in_sync_on_disjoint_data(tmp_path):
    folder = make_image_folder(tmp_path / "train")
    data = ImageNetDataModule(str(folder), batch_size=3, image_size=16, num_workers=0)
    torch.manual_seed(0)
    model = build_model("Test/2", num_classes=data.num_classes)
    initial = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    module = PixelFlowLitModule(model, SCHEDULE, lr=1e-3, class_names=data.class_names)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[RankReport(str(tmp_path))])
    trainer.fit(module, datamodule=data)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["step"] for r in ranks] == [3, 3] and [r["world"] for r in ranks] == [2, 2]
    torch.testing.assert_close(ranks[0]["params"], ranks[1]["params"], rtol=0, atol=0)  # DDP kept them identical
    assert (ranks[0]["params"] - initial).abs().max() > 0
    assert not torch.equal(ranks[0]["first_batch"], ranks[1]["first_batch"])  # each rank read its own samples
    # 3 steps x 3 samples x 2 ranks = 18 reads > 15 files: every file, corrupt ones included, was met once.
    assert sum(r["skips"] for r in ranks) >= 3
