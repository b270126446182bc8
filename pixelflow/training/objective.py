"""The cascade flow-matching loss: balanced stages per batch, each at its own size in one packed pass, per-sample MSE."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pixelflow.cascade import CascadeSchedule

__all__ = ["cascade_loss", "drop_captions"]

# Captions -> (states (B, L, D), 0/1 mask (B, L)), e.g. pixelflow.text.TextEncoder.encode.
EncodeText = Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]]


def drop_captions(captions: Sequence[str], drop: torch.Tensor) -> list[str]:
    """Captions with the dropped ones replaced by the empty prompt "" (the unconditional branch)."""
    if len(captions) != len(drop):
        raise ValueError(f"{len(captions)} captions for a batch of {len(drop)} images")
    return ["" if dropped else caption for caption, dropped in zip(captions, drop.tolist())]


def cascade_loss(
    model: torch.nn.Module,
    schedule: CascadeSchedule,
    images: torch.Tensor,
    labels: torch.Tensor | Sequence[str],
    generator: torch.Generator | None = None,
    label_dropout: float = 0.0,
    encode_text: EncodeText | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Mean over samples of each sample's pixel-mean squared velocity error, and the per-stage means.

    Every sample gets one stage (balanced within the batch) and one index i ~ U{0..N-1}; each
    stage's samples keep that stage's size (no padding) and all stages run in one packed pass
    (a list of stage inputs: ``PixelFlowTransformer.forward_packed``).
    Class-to-image: ``labels`` are class ids, replaced by the null class with probability
    ``label_dropout``. Text-to-image: ``labels`` are captions, replaced by the empty prompt with
    that probability (the same draw), then encoded by ``encode_text`` (a frozen text encoder).
    """
    batch, device = images.shape[0], images.device
    stages = schedule.balanced_stages(batch, generator=_cpu(generator)).to(device)
    t_index = torch.randint(0, schedule.num_train_timesteps, (batch,), generator=generator, device=device)
    drop = torch.rand(batch, generator=generator, device=device) < label_dropout if label_dropout > 0 else None
    condition = _text_condition(labels, drop, encode_text, device) if encode_text else _class_condition(model, labels, drop)
    indices = [(stages == k).nonzero(as_tuple=True)[0] for k in range(schedule.num_stages)]
    present = [k for k in range(schedule.num_stages) if indices[k].numel()]
    pairs = [schedule.training_pair(images[indices[k]], k, t_index[indices[k]], generator=generator) for k in present]
    order = torch.cat([indices[k] for k in present])
    preds = model([p.x_t for p in pairs], [p.timestep for p in pairs], **condition(order))  # packed
    losses, per_stage = [], {}
    for k, pair, pred in zip(present, pairs, preds):
        sample_loss = (pred.float() - pair.target.float()).square().mean(dim=(1, 2, 3))
        losses.append(sample_loss)
        per_stage[k] = sample_loss.detach().mean()
    return torch.cat(losses).mean(), per_stage


def _class_condition(model: torch.nn.Module, labels: torch.Tensor, drop: torch.Tensor | None) -> Callable:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"a class-to-image loss needs integer class labels, got {type(labels).__name__}; captions need "
                        "a text-to-image model and a text encoder (encode_text)")
    if drop is not None:
        labels = torch.where(drop, torch.full_like(labels, model.null_class), labels)
    return lambda idx: {"class_labels": labels[idx]}


def _text_condition(captions: Sequence[str], drop: torch.Tensor | None, encode_text: EncodeText,
                    device: torch.device) -> Callable:
    if isinstance(captions, (str, torch.Tensor)) or not all(isinstance(c, str) for c in captions):
        raise TypeError(f"a text-to-image loss needs a list of caption strings per batch, got {type(captions).__name__}; "
                        "use a caption datamodule (e.g. pixelflow.data.mnist_captions.MNISTCaptionDataModule)")
    if drop is not None:
        captions = drop_captions(captions, drop)
    states, mask = encode_text(captions)
    # Padding past the longest caption is masked out (weight exp(-10000) = 0): drop it to save compute.
    keep = max(int(mask.sum(dim=1).max()), 1)
    states, mask = states[:, :keep].to(device), mask[:, :keep].to(device)
    return lambda idx: {"text_states": states[idx], "text_mask": mask[idx]}


def _cpu(generator: torch.Generator | None) -> torch.Generator | None:
    """randperm on CPU needs a CPU generator; derive one deterministically from a device generator."""
    if generator is None or generator.device.type == "cpu":
        return generator
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)))
