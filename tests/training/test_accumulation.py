"""Gradient accumulation: micro-batch 2 x accumulation 2 trains exactly like micro-batch 4 x 1."""

import lightning as L
import pytest
import torch

from pixelflow.cascade import CascadeSchedule
from tests.fixed_pairs import FixedPairModule, TensorDataModule, random_test_model


class RecordGrads(L.Callback):
    """The accumulated gradient each optimizer step sees, before clipping."""

    def __init__(self):
        self.grads: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append(torch.cat([p.grad.flatten().clone() for p in pl_module.model.parameters()]))


def train(micro: int, accumulation: int, steps: int = 2, clip: float = 0.05):
    module = FixedPairModule(random_test_model(8), CascadeSchedule(image_size=16), lr=1e-3, ema_decays=[0.9], label_dropout=0.0)
    data = TensorDataModule(8, micro)
    grads = RecordGrads()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, accumulate_grad_batches=accumulation,
                        gradient_clip_val=clip, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, callbacks=[grads])
    trainer.fit(module, datamodule=data)
    params = torch.cat([p.detach().flatten() for p in module.model.parameters()])
    ema = torch.cat([p.detach().flatten() for p in module.emas[0].module.parameters()])
    return trainer, data, grads.grads, params, ema


@pytest.mark.slow
def test_micro2_accum2_equals_micro4_accum1():
    t4, d4, g4, p4, e4 = train(micro=4, accumulation=1)
    t2, d2, g2, p2, e2 = train(micro=2, accumulation=2)
    assert t4.global_step == t2.global_step == 2
    assert d4.samples_consumed() == d2.samples_consumed() == 8
    assert len(g4) == len(g2) == 2
    for a, b in zip(g4, g2):
        assert a.norm() > 0.05  # well above the clip threshold: clipping of the *accumulated* gradient is exercised
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(g4[0], g4[1])  # step 2 saw different samples and weights
    torch.testing.assert_close(p2, p4, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(e2, e4, rtol=1e-5, atol=1e-7)
    # The comparison can fail: the same 8 samples without accumulation (4 optimizer steps of 2) end elsewhere.
    _, _, _, p_no_accum, _ = train(micro=2, accumulation=1, steps=4)
    assert (p_no_accum - p4).abs().max() > 1e-4
