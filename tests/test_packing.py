"""Packed stages (pixelflow.packing): one pass over the layers gives each stage's own forward."""

import pytest
import torch

from pixelflow.cascade import CascadeSchedule
from pixelflow.model import build_model
from pixelflow.packing import Packing
from pixelflow.training.objective import cascade_loss

BATCHES = (3, 1, 2, 4)  # unequal on purpose: a misaligned segment shows
SIDES = (2, 4, 8, 16)  # Test/2 (patch 2): token grids 1, 2, 4, 8


def random_model(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def stage_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(b, 3, s, s, generator=g) for b, s in zip(BATCHES, SIDES)]
    ts = [torch.rand(b, generator=g) * 999 for b in BATCHES]
    return xs, ts


def assert_same(packed: list[torch.Tensor], separate: list[torch.Tensor]) -> None:
    assert [p.shape for p in packed] == [s.shape for s in separate]
    for p, s in zip(packed, separate):
        torch.testing.assert_close(p, s, rtol=1e-5, atol=1e-6)


def test_packed_class_forward_is_each_stage_forward():
    model = random_model("Test/2", num_classes=10).eval()
    xs, ts = stage_inputs()
    labels = torch.arange(sum(BATCHES)) % 11  # the null class (10) included
    rows = torch.tensor(BATCHES).cumsum(0).tolist()
    separate = [model(x, t, labels[r - b:r]) for x, t, b, r in zip(xs, ts, BATCHES, rows)]
    assert_same(model(xs, ts, labels), separate)


def test_packed_text_forward_is_each_stage_forward():
    model = random_model("T2I-Test/2").eval()
    xs, ts = stage_inputs()
    g = torch.Generator().manual_seed(2)
    states = torch.randn(sum(BATCHES), 12, 24, generator=g)
    mask = (torch.arange(12) < torch.randint(1, 13, (sum(BATCHES), 1), generator=g)).float()
    rows = torch.tensor(BATCHES).cumsum(0).tolist()
    separate = [model(x, t, text_states=states[r - b:r], text_mask=mask[r - b:r]) for x, t, b, r in zip(xs, ts, BATCHES, rows)]
    assert_same(model(xs, ts, text_states=states, text_mask=mask), separate)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_gradients_are_each_stage_gradients(checkpointing):
    model = random_model("Test/2", num_classes=10, gradient_checkpointing=checkpointing).train()
    xs, ts = stage_inputs()
    labels = torch.arange(sum(BATCHES)) % 10
    rows = torch.tensor(BATCHES).cumsum(0).tolist()

    def grads(outputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        model.zero_grad()
        sum(o.square().mean() for o in outputs).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    packed = grads(model(xs, ts, labels))
    separate = grads([model(x, t, labels[r - b:r]) for x, t, b, r in zip(xs, ts, BATCHES, rows)])
    assert packed.keys() == separate.keys()
    for name in packed:
        torch.testing.assert_close(packed[name], separate[name], rtol=1e-4, atol=1e-6, msg=name)


def test_cascade_loss_pairs_each_stage_with_its_own_labels():
    """The packed loss equals a stage-by-stage loss with the same draws: conditions follow their samples."""
    model = random_model("Test/2", num_classes=10).eval()
    schedule = CascadeSchedule(image_size=16)
    images = torch.rand(10, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    labels = torch.arange(10) % 10

    g = torch.Generator().manual_seed(4)
    stages = schedule.balanced_stages(10, generator=g)
    t_index = torch.randint(0, schedule.num_train_timesteps, (10,), generator=g)
    dropped = torch.where(torch.rand(10, generator=g) < 0.3, torch.full_like(labels, 10), labels)
    losses = []
    for k in range(4):
        idx = (stages == k).nonzero(as_tuple=True)[0]
        pair = schedule.training_pair(images[idx], k, t_index[idx], generator=g)
        losses.append((model(pair.x_t, pair.timestep, dropped[idx]) - pair.target).square().mean(dim=(1, 2, 3)))
    expected = torch.cat(losses).mean()

    loss, per_stage = cascade_loss(model, schedule, images, labels, torch.Generator().manual_seed(4), 0.3)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    assert sorted(per_stage) == ["stage0", "stage1", "stage2", "stage3"]


def test_bad_packings_are_clear_errors():
    model = random_model("Test/2", num_classes=10)
    xs, ts = stage_inputs()
    labels = torch.zeros(sum(BATCHES), dtype=torch.long)
    with pytest.raises(ValueError, match="one timestep tensor per stage"):
        model(xs, ts[:3], labels)
    with pytest.raises(ValueError, match="class_labels of shape"):
        model(xs, ts, labels[:-1])
    with pytest.raises(ValueError, match="single stage input"):
        model(xs, ts, labels, return_intermediates=True)
    with pytest.raises(ValueError, match="positive batch size and token count"):
        Packing.of((2, 0), (1, 4))
