"""Text conditioning for text-to-image models: prompts -> T5 states and masks.

The network runs on [unconditional rows; conditional rows]; the unconditional branch encodes
the empty prompt "" (as the published pipeline). :class:`TextCondition` is the text
:class:`pixelflow.conditioning.Conditioning` the sampler, training module and demo receive;
:class:`TextEncoder` makes one from prompts.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["TextCondition", "TextEncoder", "load_t5", "tiny_random_t5", "T5_NAME"]

T5_NAME = "google/flan-t5-xl"  # the released model's text encoder (encoder only, width 2048)
T5_MAX_LENGTH = 512  # published: prompts padded (and truncated) to 512 tokens


@dataclass(frozen=True)
class TextCondition:
    """Text states (2B, L, D) and 0/1 masks (2B, L), rows ordered [uncond; cond]."""

    states: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.states.ndim != 3 or tuple(self.mask.shape) != tuple(self.states.shape[:2]):
            raise ValueError(f"text states must be (2B, L, D) with a (2B, L) mask, got {tuple(self.states.shape)} "
                             f"and {tuple(self.mask.shape)}")
        if self.states.shape[0] % 2:
            raise ValueError(f"text rows must be [uncond; cond] (an even count), got {self.states.shape[0]}")

    @property
    def batch(self) -> int:
        """Number of images (B): half the rows."""
        return self.states.shape[0] // 2

    def cond(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(states, mask) of the conditional rows only (for guidance 1)."""
        return self.states[self.batch:], self.mask[self.batch:]

    def cond_kwargs(self) -> dict[str, torch.Tensor]:
        """Model keyword arguments for the B conditional rows."""
        states, mask = self.cond()
        return {"text_states": states, "text_mask": mask}

    def both_kwargs(self) -> dict[str, torch.Tensor]:
        """Model keyword arguments for all 2B rows, [uncond; cond]."""
        return {"text_states": self.states, "text_mask": self.mask}

    def stage_weight(self, cfg: float, stage: int, schedule: object) -> float:
        """Published text guidance: the same weight ``cfg`` at every stage (no ramp)."""
        return cfg

    def check(self, model: nn.Module) -> None:
        """Raise ValueError unless ``model`` is a text-to-image model of this text width."""
        width = getattr(model, "cross_attention_dim", None)
        if not width:
            raise ValueError("this is a class-to-image model (no cross-attention): condition it on class labels, not text")
        if self.states.shape[-1] != width:
            raise ValueError(f"text states have width {self.states.shape[-1]} but the model's cross_attention_dim is "
                             f"{width}: use the text encoder the model was trained with")

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TextCondition:
        return TextCondition(self.states.to(device, dtype), self.mask.to(device))


class TextEncoder:
    """A frozen T5 encoder and its tokenizer; encodes prompts to (states, mask), caching by prompt.

    ``model`` is a ``transformers`` encoder (e.g. ``T5EncoderModel``), ``tokenizer`` its tokenizer.
    Prompts are padded to ``max_length`` with truncation and the mask is passed to the encoder.
    ``spec`` says how to build it again (:func:`load_t5`'s ``source`` and ``max_length``, or ``tiny_random_t5``
    and its arguments); training checkpoints record it, so a model samples from its ``.ckpt`` with its encoder.
    """

    def __init__(self, model: nn.Module, tokenizer, max_length: int = T5_MAX_LENGTH, cache_size: int = 256,
                 spec: dict[str, Any] | None = None):
        if max_length < 1 or cache_size < 0:
            raise ValueError(f"max_length must be >= 1 and cache_size >= 0, got {max_length}, {cache_size}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.max_length, self.cache_size, self.spec = tokenizer, max_length, cache_size, spec
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @property
    def width(self) -> int:
        """D_text: the width of the states (the model's ``cross_attention_dim``)."""
        return int(self.model.config.d_model)

    def device_bytes(self) -> int:
        """Device memory it can hold: its weights plus a full prompt cache (states and masks of ``cache_size`` prompts)."""
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        dtype_bytes = next(self.model.parameters()).element_size()
        return weights + self.cache_size * self.max_length * (self.width * dtype_bytes + 8)

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt")
        device = next(self.model.parameters()).device
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state, mask

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """States (N, max_length, D_text) and 0/1 mask (N, max_length), one row per prompt."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a sequence of strings, got {prompts!r}")
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        fresh = dict(zip(missing, zip(*self._encode_uncached(missing)))) if missing else {}
        rows = []
        for prompt in prompts:
            row = fresh.get(prompt) or self._cache[prompt]
            rows.append(row)
            if self.cache_size:
                self._cache[prompt] = row
                self._cache.move_to_end(prompt)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def condition(self, prompts: Sequence[str], negative_prompt: str = "") -> TextCondition:
        """[uncond; cond] rows for ``prompts``; the unconditional branch encodes ``negative_prompt``."""
        states, mask = self.encode([negative_prompt] * len(prompts) + list(prompts))
        return TextCondition(states, mask)


def load_t5(source: str | Path = T5_NAME, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
            max_length: int = T5_MAX_LENGTH) -> TextEncoder:
    """The T5 encoder and tokenizer from a local folder or the Hugging Face cache; never downloads."""
    from transformers import AutoTokenizer, T5EncoderModel

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
        model = T5EncoderModel.from_pretrained(str(source), local_files_only=True)
    except OSError as err:
        raise FileNotFoundError(
            f"T5 text encoder {str(source)!r} is not available locally (nothing is downloaded). Put {T5_NAME} "
            f"(config.json, model weights and tokenizer files) in a folder and pass that folder, or fetch it once "
            f"into the Hugging Face cache with `hf download {T5_NAME}`. ({err})"
        ) from err
    return TextEncoder(model.to(device, dtype), tokenizer, max_length, spec={"source": str(source), "max_length": max_length})


def tiny_random_t5(d_model: int = 64, num_layers: int = 2, num_heads: int = 4, d_ff: int = 128, seed: int = 0,
                   max_length: int = 32, cache_size: int = 1024,
                   neighbour_offsets: Sequence[int] | None = (-2, -1, 1, 2), neighbour_bias: float = 10.0) -> TextEncoder:
    """A small random-init T5 encoder with the byte-level ByT5 tokenizer: needs no files and downloads nothing.

    Random weights are enough for training a small text-to-image model (distinct prompts give distinct
    states); ``seed`` fixes them, so every run (and a resumed one) builds the same encoder. Random
    attention is near uniform, so every byte's state would mix in the whole prompt; with
    ``neighbour_offsets`` the relative position bias (``neighbour_bias`` logits) makes head h attend to the
    byte at offset ``neighbour_offsets[h % len]``, so a byte's state encodes its word, not the sentence,
    and a word gets about the same states in any phrasing (None: keep the random bias).
    """
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    if d_model % num_heads:
        raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
    tokenizer = ByT5Tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff,
                      num_layers=num_layers, num_heads=num_heads, dropout_rate=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
    if neighbour_offsets:
        _attend_to_neighbours(model, list(neighbour_offsets), neighbour_bias)
    arguments = dict(d_model=d_model, num_layers=num_layers, num_heads=num_heads, d_ff=d_ff, seed=seed, max_length=max_length,
                     cache_size=cache_size, neighbour_offsets=None if neighbour_offsets is None else list(neighbour_offsets),
                     neighbour_bias=neighbour_bias)
    return TextEncoder(model, tokenizer, max_length, cache_size, spec={"tiny_random_t5": arguments})


@torch.no_grad()
def _attend_to_neighbours(model: nn.Module, offsets: list[int], strength: float) -> None:
    """Relative position bias (shared by every layer): head h -> offset ``offsets[h % len]`` (+strength), itself 0,
    every other position -strength (the byte itself when the offset falls outside the prompt)."""
    from transformers.models.t5.modeling_t5 import T5Attention

    config = model.config
    bias = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight  # (buckets, heads)
    buckets = T5Attention._relative_position_bucket(torch.tensor([0, *offsets]), bidirectional=True,
                                                    num_buckets=config.relative_attention_num_buckets,
                                                    max_distance=config.relative_attention_max_distance).tolist()
    bias.fill_(-strength)
    bias[buckets[0], :] = 0.0
    for head in range(bias.shape[1]):
        bias[buckets[1 + head % len(offsets)], head] = strength
