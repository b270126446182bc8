"""Prompts for text-to-image sampling: lists and prompt files, and the checkpoint's text encoder.

A prompts file holds one prompt per line, optionally ``label<TAB>prompt`` (an integer target class, so
MNIST classifier accuracy can score the samples; -1 where absent). Blank lines are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pixelflow.checkpoint import LoadedModel
from pixelflow.text import T5_MAX_LENGTH, TextEncoder, load_t5, tiny_random_t5

__all__ = ["PromptSet", "read_prompts_file", "prompt_set", "load_text_encoder", "NO_LABEL"]

NO_LABEL = -1  # label of a prompt without a target class


@dataclass(frozen=True)
class PromptSet:
    """Prompts and their target labels (``NO_LABEL`` where absent), one each."""

    prompts: tuple[str, ...]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("no prompts given: pass prompts='[a handwritten seven,the digit 3]' or prompts_file=PATH")
        if len(self.labels) != len(self.prompts):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.labels)} labels")
        if not all(isinstance(p, str) for p in self.prompts):
            raise ValueError(f"prompts must be strings, got {list(self.prompts)!r}")

    def for_indices(self, indices: Sequence[int]) -> tuple[list[str], torch.Tensor]:
        """(prompts, labels) of sample indices: sample i gets prompt ``i % len(prompts)``."""
        picks = [int(i) % len(self.prompts) for i in indices]
        return [self.prompts[k] for k in picks], torch.tensor([self.labels[k] for k in picks], dtype=torch.long)


def read_prompts_file(path: str | Path) -> PromptSet:
    """One prompt per line, optionally ``label<TAB>prompt``; blank lines skipped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"prompts_file {path} does not exist: give a text file with one prompt per line "
                         "(optionally label<TAB>prompt)")
    prompts, labels = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        label, tab, prompt = line.partition("\t")
        if not tab:
            prompts.append(line.strip())
            labels.append(NO_LABEL)
            continue
        try:
            labels.append(int(label))
        except ValueError as err:
            raise ValueError(f"{path} line {number}: {label!r} before the tab is not an integer label; write "
                             "label<TAB>prompt (e.g. 7<TAB>a handwritten seven) or the prompt alone") from err
        if labels[-1] < NO_LABEL:
            raise ValueError(f"{path} line {number}: label {labels[-1]} must be a class index >= 0 (or -1 for none)")
        prompts.append(prompt.strip())
    if not prompts:
        raise ValueError(f"prompts_file {path} holds no prompts (only blank lines)")
    return PromptSet(tuple(prompts), tuple(labels))


def prompt_set(prompts: Sequence[str] | None = None, prompts_file: str | Path | None = None) -> PromptSet | None:
    """The prompts from a list or a file (not both); None when neither is given."""
    if prompts is not None and prompts_file is not None:
        raise ValueError("pass prompts= or prompts_file=, not both")
    if prompts_file is not None:
        return read_prompts_file(prompts_file)
    if prompts is None:
        return None
    if isinstance(prompts, str):
        raise ValueError(f"prompts must be a list of strings, e.g. prompts='[a handwritten seven,the digit 3]', got {prompts!r}")
    return PromptSet(tuple(prompts), (NO_LABEL,) * len(prompts))


def load_text_encoder(loaded: LoadedModel, source: str | None = None, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> TextEncoder:
    """The text encoder of a T2I checkpoint: ``source`` (override) or the one it names: an export's config.yaml
    ``text_encoder.source``, or the encoder a training ``.ckpt`` recorded (a T5 source, or ``tiny_random_t5``'s
    arguments, from which it is built again).

    A relative source that exists beside the checkpoint is read from there; otherwise it is a folder
    (relative to the cwd) or a Hugging Face name read from the local cache (never downloaded).
    """
    width = loaded.model.cross_attention_dim
    if not width:
        raise ValueError(f"{loaded.source} is a class-to-image checkpoint: it takes classes, not prompts")
    spec = dict(loaded.text_encoder or {})
    if source is None and "tiny_random_t5" in spec:
        encoder = tiny_random_t5(**spec["tiny_random_t5"])
        encoder.model.to(device, dtype)
    else:
        source = source or spec.get("source")
        if not source:
            raise ValueError(f"{loaded.source} is a text-to-image checkpoint that names no text encoder (config.yaml "
                             "text_encoder.source): pass text_encoder=PATH (a folder with the T5 encoder and tokenizer)")
        beside = Path(loaded.source).parent / source
        if not Path(source).is_absolute() and beside.exists():
            source = str(beside)
        encoder = load_t5(source, device, dtype, int(spec.get("max_length", T5_MAX_LENGTH)))
    if encoder.width != width:
        raise ValueError(f"text encoder {source or 'tiny_random_t5'} gives states of width {encoder.width} but the model's "
                         f"cross_attention_dim is {width}: pass the encoder the model was trained with (text_encoder=PATH)")
    return encoder
