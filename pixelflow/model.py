"""The PixelFlow transformer: one DiT-style network shared by every stage.

Class-conditional (``num_classes > 0``) or text-conditional (``num_classes = 0`` and
``cross_attention_dim = D_text``: a cross-attention after each gated self-attention).
Weight-for-weight compatible with the released ImageNet-256 "XL/4" checkpoint and the published
text-to-image layout: the module tree below (its layers in :mod:`pixelflow.layers`) reproduces their state_dict key names (see
``tests/data/*manifest.json`` and ``tests/data/golden_t2i/model_config.json``).
Named sizes live in :data:`PIXELFLOW_CONFIGS`; build one with :func:`build_model`.

Each forward decides once, through :func:`pixelflow.cpu_inference.applies`, whether it runs the layers'
own forwards (training, autocast, other devices, compiled graphs) or the same maths with the CPU
inference kernels of :mod:`pixelflow.cpu_inference`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pixelflow import cpu_inference
from pixelflow.layers import ClassEmbedder, PatchEmbed, ScalarEmbedder, TransformerBlock, fp32_region, layer_norm, modulate
from pixelflow.packing import Packing, per_token
from pixelflow.precision import as_dtype
from pixelflow.prediction import check_prediction
from pixelflow.rope import RopeTables, rope_pairs

__all__ = ["PixelFlowTransformer", "Modulation", "PIXELFLOW_CONFIGS", "build_model"]


@dataclass(frozen=True)
class Modulation:
    """The adaLN vectors of one network call, computed ahead by :meth:`PixelFlowTransformer.modulations`:
    each block's six :meth:`~pixelflow.layers.TransformerBlock.factors` (rows, 1, D) and the head's shift and 1 + scale."""

    blocks: tuple[tuple[torch.Tensor, ...], ...]
    head: tuple[torch.Tensor, torch.Tensor]

    @property
    def rows(self) -> int:
        return self.head[0].shape[0]

    def select(self, rows: slice) -> Modulation:
        """The vectors of these rows (views)."""
        return Modulation(tuple(tuple(m[rows] for m in block) for block in self.blocks), tuple(m[rows] for m in self.head))

    def last(self, rows: int) -> Modulation:
        """The vectors of the last ``rows`` rows: the conditional half of [unconditional; conditional]."""
        return self.select(slice(-rows, None))


class PixelFlowTransformer(nn.Module):
    """Flow transformer; one set of weights serves every cascade stage.

    Class-to-image: ``forward(x, timestep, class_labels)`` with labels (B,) (``num_classes`` =
    null). Text-to-image (``num_classes=0, cross_attention_dim=D_text``):
    ``forward(x, timestep, text_states=E, text_mask=M)`` with E (B, L, D_text) and a 0/1 mask
    M (B, L). Maps a stage image ``x`` (B, C, s, s) in [-1, 1] and a global timestep T in
    [0, 999] (scalar or (B,)) to its ``prediction`` (B, C, s, s): the velocity ``v`` (published), the stage's
    clean image ``x`` or its noise ``eps`` (:mod:`pixelflow.prediction`; samplers convert it to the velocity
    they integrate). The stage is told to the network by r = s / patch_size. ``patch_bottleneck``: a
    low-rank patch embedding (:class:`~pixelflow.layers.PatchEmbed`); None keeps the released layout.
    """

    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        depth: int = 28,
        num_classes: int = 1000,
        patch_size: int = 4,
        in_channels: int = 3,
        out_channels: int = 3,
        attention_bias: bool = True,
        rope_theta: float = 10000.0,
        gradient_checkpointing: bool = False,
        cross_attention_dim: int | None = None,
        prediction: str = "v",
        patch_bottleneck: int | None = None,
    ):
        super().__init__()
        if attention_head_dim % 4:
            raise ValueError(f"attention_head_dim must be divisible by 4 for 2D RoPE, got {attention_head_dim}")
        if num_classes < 0 or (num_classes and cross_attention_dim):
            raise ValueError(f"choose class conditioning (num_classes > 0) or text conditioning (num_classes=0, "
                             f"cross_attention_dim=D_text), got num_classes={num_classes}, cross_attention_dim={cross_attention_dim}")
        hidden = num_attention_heads * attention_head_dim
        self.hidden_size, self.head_dim = hidden, attention_head_dim
        self.num_classes, self.patch_size = num_classes, patch_size
        self.cross_attention_dim = cross_attention_dim or None
        self.in_channels, self.out_channels = in_channels, out_channels
        self.rope_theta = rope_theta
        self.gradient_checkpointing = gradient_checkpointing
        self.prediction = check_prediction(prediction)
        if patch_bottleneck is not None and not 1 <= patch_bottleneck < hidden:
            raise ValueError(f"patch_bottleneck must be null or a rank in [1, hidden size {hidden}), got {patch_bottleneck}")
        self.patch_bottleneck = patch_bottleneck

        self.patch_embed = PatchEmbed(patch_size, in_channels, hidden, patch_bottleneck)
        self.timestep_embedder = ScalarEmbedder(hidden)
        self.latent_size_embedder = ScalarEmbedder(hidden)
        if num_classes:
            self.class_embedder = ClassEmbedder(num_classes, hidden)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(hidden, num_attention_heads, attention_head_dim, attention_bias, self.cross_attention_dim)
            for _ in range(depth)
        )
        self.proj_out_1 = nn.Linear(hidden, 2 * hidden)
        self.proj_out_2 = nn.Linear(hidden, patch_size * patch_size * out_channels)
        self.reset_parameters()

    @property
    def null_class(self) -> int:
        """The unconditional label (index ``num_classes``) of a class-to-image model."""
        if not self.num_classes:
            raise ValueError("this model has no class table (num_classes=0): its unconditional branch is the empty "
                             "prompt (pixelflow.text), not a null class")
        return self.num_classes

    def reset_parameters(self) -> None:
        """Published initialisation: Xavier Linears, N(0, 0.02) embeddings, zero adaLN and output."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for conv in (self.patch_embed.reduce, self.patch_embed.proj):
            if conv is not None:
                nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        for embedder in (self.timestep_embedder, self.latent_size_embedder):
            nn.init.normal_(embedder.linear_1.weight, std=0.02)
            nn.init.normal_(embedder.linear_2.weight, std=0.02)
        if self.num_classes:
            nn.init.normal_(self.class_embedder.embedding_table.weight, std=0.02)
        for block in self.transformer_blocks:
            nn.init.zeros_(block.norm1.linear.weight)
            nn.init.zeros_(block.norm1.linear.bias)
        for layer in (self.proj_out_1, self.proj_out_2):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def condition(self, timestep: torch.Tensor, class_labels: torch.Tensor | None, grid: int | torch.Tensor, batch: int,
                  device: torch.device) -> torch.Tensor:
        """Conditioning vector c = MLP_t(sin T) [+ E[y]] + MLP_r(sin r), shape (B, D); ``grid`` r is one side
        for the batch or one per sample (B,)."""
        timestep = torch.as_tensor(timestep, device=device).reshape(-1).expand(batch)
        r = grid if torch.is_tensor(grid) else torch.full((1,), grid, device=device)
        c = self.timestep_embedder(timestep)
        if class_labels is not None:
            c = c + self.class_embedder(class_labels)
        return c + self.latent_size_embedder(r)

    def modulations(
        self, timesteps: torch.Tensor, grid: int, class_labels: torch.Tensor | None = None,
        text_states: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
    ) -> list[Modulation]:
        """The adaLN vectors of calls at each of ``timesteps`` (N,) on a token grid of side ``grid``, in one batched pass.

        The rows are those of the condition arguments, as :meth:`forward` takes them (text enters through
        cross-attention, not these vectors: only its row count is read). ``self(x, None, ..., modulation=out[n])``
        equals ``self(x, timesteps[n], ...)`` to float rounding, so a sampler that knows a stage's time grid
        computes its conditioning once per stage instead of at every step.
        """
        rows_of = class_labels if class_labels is not None else text_states
        if rows_of is None:
            raise ValueError("pass the condition arguments of the calls: class_labels, or text_states and text_mask")
        rows = rows_of.shape[0]
        self._check_conditioning(rows, class_labels, text_states, text_mask)
        steps = timesteps.numel()
        per_row = timesteps.reshape(steps, 1).expand(steps, rows).reshape(-1)
        labels = None if class_labels is None else class_labels.repeat(steps)
        c = self.condition(per_row, labels, grid, steps * rows, timesteps.device)
        every_step = Modulation(tuple(block.factors(c) for block in self.transformer_blocks), self._head_modulation(c, None))
        return [every_step.select(slice(n * rows, (n + 1) * rows)) for n in range(steps)]

    def _check_modulation(self, modulation: Modulation, timestep, batch: int) -> None:
        if timestep is not None:
            raise ValueError("pass timestep=None with a modulation: it was computed from the timestep already")
        if modulation.rows != batch or len(modulation.blocks) != len(self.transformer_blocks):
            raise ValueError(f"modulation is for {modulation.rows} rows and {len(modulation.blocks)} blocks, the call has "
                             f"{batch} rows and {len(self.transformer_blocks)} blocks: compute it with this model's "
                             "modulations() for these rows")

    def _check_conditioning(self, batch: int, class_labels, text_states, text_mask) -> None:
        if self.cross_attention_dim:
            if class_labels is not None or text_states is None or text_mask is None:
                raise ValueError("this is a text-to-image model: pass text_states (B, L, D_text) and text_mask (B, L), "
                                 "not class labels")
            if text_states.shape[0] != batch or text_states.shape[-1] != self.cross_attention_dim or text_states.ndim != 3:
                raise ValueError(f"text_states must be ({batch}, L, {self.cross_attention_dim}), got {tuple(text_states.shape)}")
            if tuple(text_mask.shape) != tuple(text_states.shape[:2]):
                raise ValueError(f"text_mask must be {tuple(text_states.shape[:2])} (0/1 per text token), got {tuple(text_mask.shape)}")
        elif text_states is not None or text_mask is not None:
            raise ValueError("this model has no cross-attention (cross_attention_dim is None): it cannot take text")
        elif self.num_classes and (class_labels is None or class_labels.shape[0] != batch):
            raise ValueError(f"this is a class-to-image model: pass class_labels of shape ({batch},)")
        elif not self.num_classes and class_labels is not None:
            raise ValueError("this model has no class table (num_classes=0): it cannot take class labels")

    def forward(
        self,
        x: torch.Tensor | Sequence[torch.Tensor],
        timestep: torch.Tensor | float | Sequence[torch.Tensor],
        class_labels: torch.Tensor | None = None,
        return_intermediates: bool = False,
        text_states: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        modulation: Modulation | None = None,
        return_block: int | None = None,
    ):
        """The prediction at ``timestep`` of a stage batch ``x``, or of several stage batches at once (a list; see
        :meth:`forward_packed`, reached through here so that wrappers such as FSDP see the call).

        ``modulation`` (from :meth:`modulations`, for these rows and this stage) stands in for ``timestep``, which
        is then None; the condition arguments are passed and checked as usual. ``return_block`` (a list of
        stages only): also return block ``return_block``'s output tokens of each stage (representation alignment).
        """
        if isinstance(x, (list, tuple)):
            if return_intermediates or modulation is not None:
                raise ValueError("return_intermediates and modulation need a single stage input, not a list of stages")
            return self.forward_packed(x, timestep, class_labels, text_states, text_mask, return_block)
        if return_block is not None:
            raise ValueError("return_block needs a list of stage inputs (the packed training pass)")
        batch, grid = x.shape[0], self._grid(x)
        self._check_conditioning(batch, class_labels, text_states, text_mask)
        if modulation is None:
            c = self.condition(timestep, class_labels, grid, batch, x.device)
        else:
            self._check_modulation(modulation, timestep, batch)
            c = None
        x = as_dtype(x, self.patch_embed.proj.weight.dtype)
        fast = cpu_inference.applies(x)  # this call's one choice of kernels
        tokens = self._patchify(x, fast)
        rope = rope_pairs(grid, self.head_dim, self.rope_theta, x.device)
        h, blocks = self._trunk(tokens, c, rope, text_states, _text_bias(text_mask), None, fast,
                                return_intermediates, modulation)
        out = self._unpatchify(self._head(h, c, None, fast, modulation), grid)
        if return_intermediates:
            return out, {"tokens_in": tokens, "cond": c, "blocks": blocks}
        return out

    def forward_packed(
        self,
        xs: Sequence[torch.Tensor],
        timesteps: Sequence[torch.Tensor],
        class_labels: torch.Tensor | None = None,
        text_states: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        return_block: int | None = None,
    ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Several stages in one pass over the layers (:mod:`pixelflow.packing`): ``xs[j]`` (B_j, C, s_j, s_j) at
        ``timesteps[j]`` (B_j,); the condition covers the concatenated batch (sum of B_j rows, in the order
        of ``xs``). Returns ``[self(x, t, ...) for each stage]`` to float rounding, and with ``return_block``
        also that block's output tokens (B_j, r_j^2, D) of each stage."""
        if return_block is not None and not 0 <= return_block < len(self.transformer_blocks):
            raise ValueError(f"return_block={return_block} but the model has {len(self.transformer_blocks)} blocks (0-based)")
        if not xs or len(xs) != len(timesteps):
            raise ValueError(f"need one timestep tensor per stage input, got {len(xs)} inputs and {len(timesteps)}")
        device, grids, batches = xs[0].device, [self._grid(x) for x in xs], [x.shape[0] for x in xs]
        self._check_conditioning(sum(batches), class_labels, text_states, text_mask)
        timestep = torch.cat([torch.as_tensor(t, device=device).reshape(-1).expand(b) for t, b in zip(timesteps, batches)])
        sides = torch.tensor([g for g, b in zip(grids, batches) for _ in range(b)], device=device)  # r per sample
        c = self.condition(timestep, class_labels, sides, sum(batches), device)
        packing = Packing.of(tuple(batches), tuple(g * g for g in grids), device)
        xs = [as_dtype(x, self.patch_embed.proj.weight.dtype) for x in xs]
        fast = cpu_inference.applies(xs[0])  # this call's one choice of kernels
        tokens = torch.cat([self._patchify(x, fast).flatten(0, 1) for x in xs])[None]
        tables = [rope_pairs(g, self.head_dim, self.rope_theta, device) for g in grids]
        rope = RopeTables(*(torch.cat([table.repeat(b, 1) for table, b in zip(per_stage, batches)]) for per_stage in zip(*tables)))
        h, kept = self._trunk(tokens, c, rope, text_states, _text_bias(text_mask), packing, fast, capture=return_block)
        sizes = [b * g * g for b, g in zip(batches, grids)]
        out = self._head(h, c, packing, fast)[0].split(sizes)
        preds = [self._unpatchify(o.unflatten(0, (b, g * g)), g) for o, b, g in zip(out, batches, grids)]
        if return_block is None:
            return preds
        return preds, [t.unflatten(0, (b, g * g)) for t, b, g in zip(kept[0][0].split(sizes), batches, grids)]

    def _grid(self, x: torch.Tensor) -> int:
        """Token grid side r = s / patch_size of a square stage image (B, C, s, s)."""
        height, width, p = x.shape[-2], x.shape[-1], self.patch_size
        if x.ndim != 4 or height != width or height % p:
            raise ValueError(f"input must be (B, C, s, s), square with side divisible by patch size {p}, got {tuple(x.shape)}")
        return height // p

    def _patchify(self, x: torch.Tensor, fast: bool) -> torch.Tensor:
        return cpu_inference.patch_embed(self.patch_embed, x) if fast else self.patch_embed(x)

    def _trunk(self, h: torch.Tensor, c: torch.Tensor | None, rope: RopeTables, text_states, text_bias,
               packing: Packing | None, fast: bool, keep: bool = False,
               modulation: Modulation | None = None, capture: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The transformer blocks; with ``keep`` also every block's output, with ``capture`` block ``capture``'s.
        Without either the CPU inference path updates the stream ``h`` (the caller's fresh patch tokens) in place."""
        keep_any = keep or capture is not None
        outputs = []
        for i, block in enumerate(self.transformer_blocks):
            vectors = None if modulation is None else modulation.blocks[i]
            if fast:
                h = cpu_inference.block(block, h, c, rope, text_states, text_bias, packing, vectors, own_stream=not keep_any)
            elif self.gradient_checkpointing and self.training:
                h = checkpoint(block, h, c, rope, text_states, text_bias, packing, vectors, use_reentrant=False)
            else:
                h = block(h, c, rope, text_states, text_bias, packing, vectors)
            if keep or i == capture:
                outputs.append(h)
        return h, outputs

    def _head_modulation(self, c: torch.Tensor, packing: Packing | None) -> tuple[torch.Tensor, torch.Tensor]:
        with fp32_region(c.device):
            modulation = self.proj_out_1(F.silu(c.float()))
        shift, scale = per_token(modulation, packing).chunk(2, dim=-1)
        return shift, 1 + scale

    def _head(self, h: torch.Tensor, c: torch.Tensor | None, packing: Packing | None, fast: bool,
              modulation: Modulation | None = None) -> torch.Tensor:
        """Final adaLN LayerNorm and projection to patch pixels."""
        shift, factor = self._head_modulation(c, packing) if modulation is None else modulation.head
        h32 = cpu_inference.final_norm(h, shift, factor) if fast else modulate(layer_norm(h), shift, factor)
        return self.proj_out_2(as_dtype(h32, h.dtype))

    def _unpatchify(self, out: torch.Tensor, grid: int) -> torch.Tensor:
        """(B, r*r, p*p*C) with features ordered (row-in-patch, col-in-patch, channel) -> (B, C, r*p, r*p)."""
        p, channels = self.patch_size, self.out_channels
        out = out.reshape(out.shape[0], grid, grid, p, p, channels)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(out.shape[0], channels, grid * p, grid * p)


def _text_bias(text_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Published text mask: an additive (1 - m) * -10000 on the text positions, for every head and query."""
    return None if text_mask is None else ((1 - text_mask.float()) * -10000.0)[:, None, None, :]


PIXELFLOW_CONFIGS: dict[str, dict] = {
    # The released ImageNet-256 model (676.6M parameters).
    "XL/4": dict(num_attention_heads=16, attention_head_dim=72, depth=28, patch_size=4),
    "L/4": dict(num_attention_heads=16, attention_head_dim=64, depth=24, patch_size=4),
    "B/4": dict(num_attention_heads=12, attention_head_dim=64, depth=12, patch_size=4),
    "S/4": dict(num_attention_heads=6, attention_head_dim=64, depth=12, patch_size=4),
    # CPU quickstart on 32 px MNIST (stage sides 4, 8, 16, 32 -> token grids 1, 2, 4, 8).
    "Tiny/4": dict(num_attention_heads=4, attention_head_dim=32, depth=4, patch_size=4),
    # The same width at patch 2 (token grids 2, 4, 8, 16): ~4x the compute of Tiny/4.
    "Tiny/2": dict(num_attention_heads=4, attention_head_dim=32, depth=4, patch_size=2),
    # Unit tests: the layout of the public golden model.
    "Test/2": dict(num_attention_heads=2, attention_head_dim=16, depth=2, patch_size=2),
    # Text-to-image. The released 1024 px model's config.yaml is not available here: this is a
    # documented guess, the XL/4 trunk with Flan-T5-XL's width D_text = 2048, which gives
    # 882.1M parameters against the published 882M.
    "T2I-XL/4": dict(num_attention_heads=16, attention_head_dim=72, depth=28, patch_size=4,
                     num_classes=0, cross_attention_dim=2048),
    # Unit tests: the layout of the public T2I golden model (12 text tokens of width 24).
    "T2I-Test/2": dict(num_attention_heads=2, attention_head_dim=16, depth=2, patch_size=2,
                       num_classes=0, cross_attention_dim=24),
}


def build_model(name: str, **overrides) -> PixelFlowTransformer:
    """Build a named size from :data:`PIXELFLOW_CONFIGS`; keyword overrides win."""
    if name not in PIXELFLOW_CONFIGS:
        raise KeyError(f"unknown model size {name!r}; choose one of {sorted(PIXELFLOW_CONFIGS)}")
    return PixelFlowTransformer(**{**PIXELFLOW_CONFIGS[name], **overrides})
