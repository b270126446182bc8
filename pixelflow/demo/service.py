"""Generation logic behind the web demo: checkpoint discovery, request validation, sampling to PIL images.

Nothing here imports gradio, so every piece is testable as plain Python; :mod:`pixelflow.demo.app`
wires it into a page. Field names in error messages are the labels the page shows.
"""

from __future__ import annotations

import io
import json
import math
import re
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from pixelflow.checkpoint import RELEASED_URL, CheckpointError, LoadedModel, load_pixelflow
from pixelflow.precision import resolve_precision
from pixelflow.sampling.choice import choose_sampler
from pixelflow.sampling.compile import compile_for_sampling, sampling_shapes
from pixelflow.sampling.indexed import sample_indexed
from pixelflow.sampling.prompts import load_text_encoder
from pixelflow.sampling.samplers import CascadeSampler, SamplerConfig, to_uint8
from pixelflow.text import TextEncoder

__all__ = ["DemoInputError", "GenerationRequest", "Generation", "DemoModel", "resolve_path", "resolve_class_names",
           "checkpoint_help", "upscale_nearest", "write_zip", "FIELDS", "RANGES"]

REPO_ROOT = Path(__file__).resolve().parents[2]
QUICKSTART_CKPT = REPO_ROOT / "runs" / "mnist_quickstart" / "checkpoints" / "last.ckpt"

# Control labels (as in the published demo) and their allowed ranges, shared by the page and the validation.
FIELDS = dict(class_value="Class", prompt="Prompt", negative_prompt="Negative Prompt", dopri5="Dopri5 ODE",
              shift="Noise Shift", guidance_scale="Classifier-free Guidance Scale",
              steps="Num Inference Steps", seed="Seed", num_images="Number of Images")
RANGES: dict[str, tuple[int, int]] = dict(shift=(1, 100), guidance_scale=(1, 25), steps=(1, 100), seed=(0, 2**32 - 1))
MAX_PROMPT_CHARS = 2000  # longer text is cut by the tokenizer anyway (max_length tokens)


class DemoInputError(ValueError):
    """A request value is missing, of the wrong type or out of range; the message names the field."""


@dataclass(frozen=True)
class GenerationRequest:
    """One validated request: a class (class-to-image) or a prompt and negative prompt (text-to-image).

    Image #i of a request is sample i of a run with seed ``seed``: its noise seed is ``seed * 10**7 + i``
    (:mod:`pixelflow.sampling.indexed`), so ``sample.py seed=S classes=[C]`` with the same sampler settings starts
    sample i from the same noise.
    """

    class_index: int | None
    dopri5: bool
    shift: float
    guidance_scale: float
    steps: tuple[int, ...]
    seed: int
    num_images: int
    prompt: str | None = None
    negative_prompt: str | None = None

    @property
    def file_stem(self) -> str:
        """File name prefix of the PNGs and the zip: the class (or the prompt's first words) and the seed."""
        if self.prompt is None:
            return f"pixelflow_class{self.class_index}_seed{self.seed}"
        words = "_".join(re.findall(r"[a-z0-9]+", self.prompt.lower()))[:40].strip("_") or "empty"
        return f"pixelflow_{words}_seed{self.seed}"


@dataclass
class Generation:
    """Result of :meth:`DemoModel.generate`."""

    request: GenerationRequest
    images: list[Image.Image]  # final images at the model's resolution
    stage_previews: list[list[Image.Image]]  # [image][stage], each upsampled (nearest) to the final size
    nfe: list[int]  # batched model calls per stage
    seconds: float


def resolve_path(path: str | Path) -> Path:
    """Absolute path: as given if absolute or existing relative to the cwd, else relative to the repo root."""
    p = Path(path).expanduser()
    return p.resolve() if p.is_absolute() or p.exists() else REPO_ROOT / p


def checkpoint_help(path: Path, error: str | None = None) -> str:
    """Markdown for a missing (``error=None``) or unloadable checkpoint: what went wrong and how to get one."""
    head = f"### No checkpoint found at `{path}`" if error is None else f"### Could not load `{path}`\n\n{error}"
    lines = [
        head,
        "",
        "The demo needs trained weights. Either:",
        "",
        "- **Train the quickstart MNIST model** (CPU, a few minutes): run `make train` in the repository, "
        "then start the demo again with `python demo.py`.",
        f"- **Use the released ImageNet 256 model**: download `model.pt` and `config.yaml` from [{RELEASED_URL}]({RELEASED_URL}) "
        "into one folder and run `python demo.py ckpt=/path/to/model.pt`.",
        "- **Use any project checkpoint**: `python demo.py ckpt=runs/<run>/checkpoints/last.ckpt`.",
    ]
    if QUICKSTART_CKPT.is_file() and QUICKSTART_CKPT != path:
        lines += ["", f"A quickstart training checkpoint exists already: `python demo.py ckpt={QUICKSTART_CKPT}`."]
    return "\n".join(lines)


def resolve_class_names(num_classes: int, names: Sequence[str] | None) -> list[str]:
    """Readable class names: the checkpoint's, else ImageNet's (timm, offline) for 1000 classes, else ``class i``."""
    if names is not None:
        if len(names) != num_classes:
            raise CheckpointError(f"the checkpoint lists {len(names)} class names but its model has {num_classes} classes")
        return [str(n) for n in names]
    if num_classes == 1000:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(num_classes)]
    return [f"class {i}" for i in range(num_classes)]


def upscale_nearest(image: Image.Image, min_side: int) -> Image.Image:
    """Enlarge by the smallest whole factor that reaches ``min_side`` (nearest neighbour keeps pixels crisp)."""
    factor = max(1, math.ceil(min_side / min(image.size)))
    return image if factor == 1 else image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def _to_pil(x: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] NCHW (1 or 3 channels) -> PIL images (the pixels :func:`pixelflow.sampling.indexed.sample_uint8` gives)."""
    arrays = to_uint8(x).numpy()
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]


def _range_error(field: str, lo: float, hi: float, value: Any, whole: bool) -> DemoInputError:
    kind = "a whole number" if whole else "a number"
    return DemoInputError(f"{field} must be {kind} from {lo} to {hi}, got {value!r}")


def _number(field: str, value: Any, lo: float, hi: float, whole: bool = False) -> float:
    """``value`` as a finite number in [lo, hi] (whole if asked), else a :class:`DemoInputError`."""
    numeric = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not numeric or not lo <= value <= hi or (whole and value != int(value)):
        raise _range_error(field, lo, hi, value, whole)
    return value


def _text(field: str, value: Any) -> str:
    """``value`` as a prompt string of at most :data:`MAX_PROMPT_CHARS`, else a :class:`DemoInputError`."""
    if not isinstance(value, str) or len(value) > MAX_PROMPT_CHARS:
        raise DemoInputError(f"{field} must be text of at most {MAX_PROMPT_CHARS} characters, got {str(value)[:80]!r}")
    return value.strip()


class DemoModel:
    """A loaded model plus what the page needs: class names (or a text encoder), the stage sizes, validation and generation.

    A text-to-image checkpoint loads its text encoder (``text_encoder`` overrides the config's source; see
    :func:`pixelflow.sampling.prompts.load_text_encoder`) on the same device, in bf16 when sampling in bf16.
    ``sampler``: the settings a request does not set (guidance interval, Dopri5's tolerances) and the page's initial
    controls; None: the sampler the checkpoint records (a distilled student's), else the default. A request picks
    Dopri5 or the sampler's fixed-step method (Euler when the sampler is Dopri5), the steps, shift and guidance scale.
    """

    def __init__(self, loaded: LoadedModel, device: str = "cpu", max_images: int = 4, precision: str = "auto",
                 text_encoder: str | None = None, sampler: SamplerConfig | None = None):
        if not isinstance(max_images, int) or max_images < 1:
            raise ValueError(f"max_images must be a positive integer, got {max_images!r}")
        if sampler is None:
            sampler = SamplerConfig.from_mapping(loaded.sampler) if loaded.sampler else SamplerConfig()
        self.sampler = sampler
        self.fixed_method = "euler" if sampler.method == "dopri5" else sampler.method  # the Dopri5 checkbox off
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.model = loaded.model.to(self.device).eval()
        self.schedule = loaded.schedule
        self.source = loaded.source
        self.max_images = max_images
        self.class_names = resolve_class_names(self.model.num_classes, loaded.class_names)
        self.class_labels = [n if n == str(i) else f"{i}: {n}" for i, n in enumerate(self.class_names)]
        self.encoder: TextEncoder | None = None
        if self.model.cross_attention_dim:
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
            try:
                self.encoder = load_text_encoder(loaded, text_encoder, self.device, dtype)
            except (FileNotFoundError, ValueError) as err:
                raise CheckpointError(f"the text encoder of this text-to-image checkpoint could not be loaded: {err}") from err

    @property
    def is_text(self) -> bool:
        """True for a text-to-image model (prompt boxes instead of the class dropdown)."""
        return self.encoder is not None

    @classmethod
    def load(cls, ckpt: str | Path, config: str | Path | None = None, device: str = "auto", max_images: int = 4,
             allow_download: bool = False, ema: float | None = None, precision: str = "auto",
             text_encoder: str | None = None, sampler: Mapping[str, Any] | None = None,
             sampler_overrides: Sequence[str] = ()) -> DemoModel:
        """Load ``ckpt`` (see :func:`load_pixelflow`, ``ema`` picks an EMA rate); ``device="auto"`` picks CUDA when available.

        ``sampler``: the composed preset, chosen against the checkpoint's recorded sampler as ``sample.py`` does
        (:func:`~pixelflow.sampling.choice.choose_sampler`, under the command line's ``sampler_overrides``)."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            dev = torch.device(device)
        except RuntimeError as err:
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}") from err
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but CUDA is not available; use device=cpu or device=auto")
        loaded = load_pixelflow(ckpt, config, allow_download=allow_download, ema=ema)
        chosen = None if sampler is None else choose_sampler(sampler, loaded.sampler, sampler_overrides)[0]
        return cls(loaded, str(dev), max_images, precision, text_encoder, chosen)

    @property
    def stage_sides(self) -> list[int]:
        return self.schedule.stage_sides

    def _class_index(self, value: Any) -> int:
        n = len(self.class_names)
        if isinstance(value, str):
            key = value.strip().lower()
            hits = [i for i, (name, label) in enumerate(zip(self.class_names, self.class_labels)) if key in (name.lower(), label.lower())]
            if len(hits) > 1:
                raise DemoInputError(f"{FIELDS['class_value']} {value!r} is ambiguous (indices {hits}); pass the index instead")
            if hits:
                return hits[0]
            if not key.isdigit():
                raise DemoInputError(f"{FIELDS['class_value']} must be a class index from 0 to {n - 1} or one of the "
                                     f"model's class names (e.g. {self.class_names[0]!r}), got {value!r}")
            value = int(key)
        return int(_number(FIELDS["class_value"], value, 0, n - 1, whole=True))

    def validate(self, class_value: Any, dopri5: Any, shift: Any, guidance_scale: Any, steps: Sequence[Any], seed: Any,
                 num_images: Any, prompt: Any = None, negative_prompt: Any = None) -> GenerationRequest:
        """Check every raw value (as the page or an API client sent it); raise :class:`DemoInputError` naming the field.

        A text-to-image model takes ``prompt`` (empty: an unconditional sample) and ``negative_prompt`` (what the
        unconditional branch encodes; default empty, as published) and no class; a class-to-image model the reverse.
        """
        if self.is_text:
            if class_value is not None:
                raise DemoInputError(f"this is a text-to-image model: give a {FIELDS['prompt']}, not a {FIELDS['class_value']}")
            prompt = _text(FIELDS["prompt"], prompt)
            negative_prompt = _text(FIELDS["negative_prompt"], "" if negative_prompt is None else negative_prompt)
        elif prompt is not None or negative_prompt is not None:
            raise DemoInputError(f"this is a class-to-image model: give a {FIELDS['class_value']}, not a {FIELDS['prompt']}")
        if not isinstance(dopri5, bool):
            raise DemoInputError(f"{FIELDS['dopri5']} must be true or false, got {dopri5!r}")
        num_stages = self.schedule.num_stages
        if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence) or len(steps) != num_stages:
            raise DemoInputError(f"{FIELDS['steps']} needs one value per stage ({num_stages}), got {steps!r}")
        lo, hi = RANGES["steps"]
        stage_steps = tuple(int(_number(f"{FIELDS['steps']} (stage {k + 1})", s, lo, hi, whole=True)) for k, s in enumerate(steps))
        return GenerationRequest(
            class_index=None if self.is_text else self._class_index(class_value),
            dopri5=dopri5,
            shift=float(_number(FIELDS["shift"], shift, *RANGES["shift"])),
            guidance_scale=float(_number(FIELDS["guidance_scale"], guidance_scale, *RANGES["guidance_scale"])),
            steps=stage_steps,
            seed=int(_number(FIELDS["seed"], seed, *RANGES["seed"], whole=True)),
            num_images=int(_number(FIELDS["num_images"], num_images, 1, self.max_images, whole=True)),
            prompt=prompt,
            negative_prompt=negative_prompt,
        )

    def compile(self, num_images: int, guidance_scale: float) -> float:
        """torch.compile the network (:mod:`pixelflow.sampling.compile`) warmed for ``num_images`` images at
        ``guidance_scale``; other request shapes compile when first asked for. Returns the seconds spent compiling."""
        shapes = sampling_shapes(self.schedule, [replace(self.sampler, guidance_scale=guidance_scale)], [num_images])
        self.model, seconds = compile_for_sampling(self.model, shapes, self.precision, room=2 * self.max_images * len(self.stage_sides))
        return seconds

    def generate(self, request: GenerationRequest, on_step: Callable[[int, int, int], None] | None = None) -> Generation:
        """Sample ``request.num_images`` images; the same request (seed included) gives the same pixels."""
        start = time.perf_counter()
        config = replace(self.sampler, method="dopri5" if request.dopri5 else self.fixed_method, steps=request.steps,
                         shift=request.shift, guidance_scale=request.guidance_scale)
        sampler = CascadeSampler(self.model, self.schedule, config)
        if self.encoder is None:
            condition = torch.full((request.num_images,), request.class_index, dtype=torch.long, device=self.device)
        else:
            text = self.encoder.condition([request.prompt] * request.num_images, request.negative_prompt)
            condition = text.to(self.device, torch.float32)
        out = sample_indexed(sampler, condition, range(request.num_images), request.seed, self.precision, on_step)
        side = self.schedule.image_size
        per_stage = [_to_pil(F.interpolate(x.float(), size=(side, side), mode="nearest")) for x in out.stage_finals]
        return Generation(request=request, images=_to_pil(out.images.float()),
                          stage_previews=[list(stages) for stages in zip(*per_stage)],
                          nfe=list(out.nfe), seconds=time.perf_counter() - start)


def write_zip(generation: Generation, path: Path, source: str) -> Path:
    """Write the final images as PNGs plus a ``settings.json`` that reproduces them into the zip at ``path``."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i, image in enumerate(generation.images):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            zf.writestr(f"{generation.request.file_stem}_{i}.png", buf.getvalue())
        zf.writestr("settings.json", json.dumps({**asdict(generation.request), "checkpoint": source}, indent=2))
    return path
