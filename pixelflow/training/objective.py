"""The cascade flow-matching loss and the recipe choices it reads (:class:`Objective`): what the network
predicts and in which space the MSE is taken, where in each stage time is drawn, how a batch is shared
between stages and weighted, and an optional representation-alignment term.

Every sample gets one stage and one timestep index; each stage's samples keep that stage's size (no padding)
and all stages run in one packed pass. The default ``Objective()`` is the published recipe: v-prediction,
v-loss, uniform timestep index, stages balanced within the batch, weight 1, no alignment.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pixelflow.cascade import CascadeSchedule, TrainingPair
from pixelflow.prediction import TRAIN_MIN_DIVISOR, check_prediction, convert
from pixelflow.training.repa import RepaAlignment
from pixelflow.training.time_sampling import TimeSampling

__all__ = ["Objective", "RepaSettings", "cascade_loss", "cpu_generator", "drop_captions", "stages_by_fraction"]

# Captions -> (states (B, L, D), 0/1 mask (B, L)), e.g. pixelflow.text.TextEncoder.encode.
EncodeText = Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class RepaSettings:
    """``objective.repa``: the encoder to build (a Hydra ``_target_`` mapping), the block whose output is aligned
    (0-based), the weight lambda of the term and the projector's hidden width."""

    encoder: Mapping[str, Any]
    block: int
    weight: float = 0.5
    projector_dim: int = 256

    def __post_init__(self) -> None:
        if not isinstance(self.encoder, Mapping) or "_target_" not in self.encoder:
            raise ValueError("objective.repa.encoder must be a mapping with a _target_, e.g. {_target_: "
                             f"pixelflow.training.repa.MNISTClassifierEncoder}}, got {self.encoder!r}")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 0:
            raise ValueError(f"objective.repa.block must be a block index >= 0, got {self.block!r}")
        if not float(self.weight) > 0 or int(self.projector_dim) < 1:
            raise ValueError(f"objective.repa needs weight > 0 and projector_dim >= 1, got {self.weight}, {self.projector_dim}")
        object.__setattr__(self, "encoder", dict(self.encoder))


@dataclass(frozen=True)
class Objective:
    """The training recipe's choices (``conf/objective``), checked when made and against a model by :meth:`check`.

    ``prediction`` / ``loss``: ``v``, ``x`` or ``eps`` (:mod:`pixelflow.prediction`). ``time_sampling``: a
    :mod:`~pixelflow.training.time_sampling` setting, one or one per stage. ``stage_fractions``: each stage's
    share of a batch (None: equal, the published balance); ``stage_weights``: each stage's loss weight
    (None: 1). ``repa``: :class:`RepaSettings` or None.
    """

    prediction: str = "v"
    loss: str = "v"
    time_sampling: Any = "uniform"
    stage_fractions: tuple[float, ...] | None = None
    stage_weights: tuple[float, ...] | None = None
    repa: RepaSettings | None = None
    _times: TimeSampling | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_prediction(self.prediction, "objective.prediction")
        check_prediction(self.loss, "objective.loss")
        for name in ("stage_fractions", "stage_weights"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str) or not isinstance(value, Sequence) or not value \
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value):
                raise ValueError(f"objective.{name} must be null or a list of positive numbers, one per stage, got {value!r}")
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if self.stage_fractions is not None and abs(sum(self.stage_fractions) - 1.0) > 1e-6:
            raise ValueError(f"objective.stage_fractions must sum to 1, got {list(self.stage_fractions)} "
                             f"(sum {sum(self.stage_fractions):g})")
        if isinstance(self.repa, Mapping):
            object.__setattr__(self, "repa", RepaSettings(**self.repa))

    @classmethod
    def from_config(cls, values: Mapping[str, Any] | None, num_stages: int) -> Objective:
        """An objective from a ``conf/objective`` mapping (None: the published one), checked against the stage count."""
        values = dict(values or {})
        names = [f for f in cls.__dataclass_fields__ if not f.startswith("_")]
        if unknown := sorted(set(values) - set(names)):
            raise ValueError(f"objective: unknown setting(s) {unknown}; it takes {names} (conf/objective presets)")
        objective = cls(**values)
        objective.check_stages(num_stages)
        return objective

    def check_stages(self, num_stages: int) -> None:
        """Per-stage lists must have one entry per stage; parses the time sampling for that count."""
        for name in ("stage_fractions", "stage_weights"):
            value = getattr(self, name)
            if value is not None and len(value) != num_stages:
                raise ValueError(f"objective.{name} has {len(value)} entries but the cascade has {num_stages} stage(s) "
                                 f"(cascade.num_stages): give one per stage")
        object.__setattr__(self, "_times", TimeSampling.parse(self.time_sampling, num_stages))

    @property
    def times(self) -> TimeSampling:
        if self._times is None:
            raise RuntimeError("Objective.check_stages(num_stages) must run before sampling times")
        return self._times

    def describe(self) -> dict[str, Any]:
        """The settings as plain data, as recorded in checkpoints and export config.yaml."""
        return {"prediction": self.prediction, "loss": self.loss,
                "time_sampling": self.times.describe() if self._times else self.time_sampling,
                "stage_fractions": None if self.stage_fractions is None else list(self.stage_fractions),
                "stage_weights": None if self.stage_weights is None else list(self.stage_weights),
                "repa": None if self.repa is None else {"encoder": dict(self.repa.encoder), "block": self.repa.block,
                                                        "weight": self.repa.weight, "projector_dim": self.repa.projector_dim}}

    def stages(self, schedule: CascadeSchedule, batch: int, generator: torch.Generator | None) -> torch.Tensor:
        """One stage per sample: balanced (published) or by ``stage_fractions``."""
        if self.stage_fractions is None:
            return schedule.balanced_stages(batch, generator=generator)
        return stages_by_fraction(batch, self.stage_fractions, generator)

    def sample_loss(self, pred: torch.Tensor, pair: TrainingPair) -> torch.Tensor:
        """(B,) pixel-mean squared error of ``pred`` in the ``loss`` space (before the stage weight); the truth is mapped there the same way
        (clamped divisors included, as JiT), so the loss re-weights the prediction's own error."""
        x_t, t, line = pair.x_t.float(), pair.t.float(), pair.line
        mapped = convert(pred.float(), x_t, t, line, self.prediction, self.loss, TRAIN_MIN_DIVISOR)
        target = convert(pair.truth(self.prediction).float(), x_t, t, line, self.prediction, self.loss, TRAIN_MIN_DIVISOR)
        return (mapped - target).square().mean(dim=(1, 2, 3))

    def stage_weight(self, stage: int) -> float:
        return 1.0 if self.stage_weights is None else self.stage_weights[stage]


def stages_by_fraction(batch: int, fractions: Sequence[float], generator: torch.Generator | None = None) -> torch.Tensor:
    """One stage per sample, floor(batch f_k) of stage k, the remainder drawn without replacement with weights f."""
    share = torch.tensor(fractions, dtype=torch.float64)
    counts = (share * batch).floor().long()
    left = batch - int(counts.sum())
    if left:
        counts += torch.bincount(torch.multinomial(share, left, replacement=False, generator=generator), minlength=len(share))
    stages = torch.repeat_interleave(torch.arange(len(share)), counts)
    return stages[torch.randperm(batch, generator=generator)]


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
    objective: Objective | None = None,
    alignment: RepaAlignment | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The batch's loss (mean over samples of each sample's weighted pixel-mean squared error, plus lambda times
    the alignment term) and what to log: ``stage<k>`` (each stage's mean error) and ``repa``.

    Class-to-image: ``labels`` are class ids, replaced by the null class with probability
    ``label_dropout``. Text-to-image: ``labels`` are captions, replaced by the empty prompt with
    that probability (the same draw), then encoded by ``encode_text`` (a frozen text encoder).
    ``objective`` None is the published recipe; ``alignment`` is the REPA term of ``objective.repa``.
    """
    if objective is None:
        objective = Objective()
        objective.check_stages(schedule.num_stages)
    batch, device = images.shape[0], images.device
    stages = objective.stages(schedule, batch, cpu_generator(generator)).to(device)
    t_index = objective.times.indices(stages, schedule.num_train_timesteps, generator)
    drop = torch.rand(batch, generator=generator, device=device) < label_dropout if label_dropout > 0 else None
    condition = _text_condition(labels, drop, encode_text, device) if encode_text else _class_condition(model, labels, drop)
    indices = [(stages == k).nonzero(as_tuple=True)[0] for k in range(schedule.num_stages)]
    present = [k for k in range(schedule.num_stages) if indices[k].numel()]
    pairs = [schedule.training_pair(images[indices[k]], k, t_index[indices[k]], generator=generator) for k in present]
    order = torch.cat([indices[k] for k in present])
    inputs, timesteps = [p.x_t for p in pairs], [p.timestep for p in pairs]
    if alignment is None:
        preds = model(inputs, timesteps, **condition(order))  # packed
    else:
        preds, tokens = model(inputs, timesteps, **condition(order), return_block=alignment.block)
    losses, logs = [], {}
    for pair, pred in zip(pairs, preds):
        sample_loss = objective.sample_loss(pred, pair)
        logs[f"stage{pair.stage}"] = sample_loss.detach().mean()
        losses.append(sample_loss if objective.stage_weights is None else sample_loss * objective.stage_weight(pair.stage))
    loss = torch.cat(losses).mean()
    if alignment is not None:
        grids = [p.x_t.shape[-1] // model.patch_size for p in pairs]
        repa = alignment.loss(tokens, grids, images[order])
        logs["repa"] = repa.detach()
        loss = loss + alignment.weight * repa
    return loss, logs


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


def cpu_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """randperm on CPU needs a CPU generator; derive one deterministically from a device generator."""
    if generator is None or generator.device.type == "cpu":
        return generator
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)))
