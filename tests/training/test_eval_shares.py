"""Sharing a sampling job among ranks: the chunks each rank draws, the balanced batch, the gather onto rank 0."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pixelflow.training import eval_shares
from pixelflow.training.eval_shares import balanced_batch, gather_to_rank_zero, rank_chunks


@pytest.mark.parametrize(("num_samples", "batch", "world"), [(20, 10, 2), (23, 4, 3), (5, 10, 4), (10_000, 625, 8)])
def test_every_index_is_drawn_once_in_chunks_that_do_not_depend_on_the_world_size(num_samples, batch, world):
    shares = [rank_chunks(num_samples, batch, rank, world) for rank in range(world)]
    drawn = torch.cat([chunk for share in shares for chunk in share])
    assert sorted(drawn.tolist()) == list(range(num_samples))
    one_process = rank_chunks(num_samples, batch, 0, 1)
    assert sorted((c.tolist() for share in shares for c in share), key=lambda c: c[0]) == [c.tolist() for c in one_process]
    assert max(map(len, shares)) - min(map(len, shares)) <= 1  # chunks dealt round-robin


@pytest.mark.parametrize(("fit", "num_samples", "world", "batch"), [
    (1000, 10_000, 8, 625),  # 1,250 a rank in two rounds of 625, not 1,000 + 250
    (100, 500, 1, 100),
    (100, 20, 2, 10),        # one round: 10 a rank
    (3, 20, 2, 3),
    (7, 7, 3, 3),
])
def test_balanced_batch_fits_and_spreads_the_samples_evenly(fit, num_samples, world, batch):
    assert balanced_batch(fit, num_samples, world) == batch
    chunks = [len(rank_chunks(num_samples, batch, rank, world)) for rank in range(world)]
    rounds = -(-num_samples // (world * fit))  # the fewest rounds any batch <= fit allows
    assert batch <= fit and max(chunks) == rounds


def test_balanced_batch_refuses_nonsense():
    with pytest.raises(ValueError, match="need fit, num_samples and world_size >= 1"):
        balanced_batch(0, 10, 1)


class GlooStrategy:
    """The parts of a Lightning strategy the gather uses, over a gloo process group."""

    root_device = torch.device("cpu")

    def __init__(self, rank: int):
        self.is_global_zero = rank == 0

    @staticmethod
    def all_gather(tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)


def _gather(rank: int, init_file: str, out_dir: str, gather_bytes: int) -> None:
    eval_shares.GATHER_BYTES = gather_bytes  # small: the rows travel in several pieces
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        positions = [torch.tensor([0, 1, 2, 5, 6]), torch.tensor([3, 4, 7])]
        local = (positions[rank].to(torch.uint8) * 10).reshape(-1, 1, 1).expand(-1, 2, 3).contiguous()  # row i holds 10 i
        gathered = gather_to_rank_zero(GlooStrategy(rank), local, positions, rank)
        torch.save(gathered, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("gather_bytes", [2 * 6, 2**20])  # one row of each rank a call; all in one call
def test_two_ranks_rows_land_at_their_positions_on_rank_zero(tmp_path, gather_bytes):
    mp.spawn(_gather, args=(str(tmp_path / "init"), str(tmp_path), gather_bytes), nprocs=2, join=True)
    want = (torch.arange(8, dtype=torch.uint8) * 10).reshape(-1, 1, 1).expand(-1, 2, 3)
    assert torch.equal(torch.load(tmp_path / "rank0.pt"), want)
    assert torch.load(tmp_path / "rank1.pt") is None


def test_one_rank_keeps_its_rows_and_a_wrong_count_is_refused():
    local = torch.arange(4, dtype=torch.uint8).reshape(4, 1, 1, 1)
    assert gather_to_rank_zero(GlooStrategy(0), local, [torch.arange(4)], 0) is local
    reordered = gather_to_rank_zero(GlooStrategy(0), local, [torch.tensor([3, 2, 1, 0])], 0)
    assert reordered.flatten().tolist() == [3, 2, 1, 0]
    with pytest.raises(ValueError, match="rank 0 holds 4 rows but its positions name 3"):
        gather_to_rank_zero(GlooStrategy(0), local, [torch.arange(3)], 0)
