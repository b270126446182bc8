"""The PixelFlow web demo page (gradio Blocks), wired on top of :mod:`pixelflow.demo.service`.

``build_demo(cfg)`` makes the page (a help page when no checkpoint is found); ``launch(cfg)`` serves it.
``cfg`` is ``conf/demo.yaml`` composed (see that file for every key; ``sampler`` is a ``conf/sampler`` preset).
"""

from __future__ import annotations

import inspect
import logging
import shutil
import tempfile
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import gradio as gr

from pixelflow.checkpoint import HUB_PREFIX, CheckpointError
from pixelflow.demo.service import FIELDS, RANGES, DemoInputError, DemoModel, checkpoint_help, resolve_path, upscale_nearest, write_zip
from pixelflow.sampling.samplers import SamplerConfig

__all__ = ["build_demo", "launch"]

log = logging.getLogger(__name__)

METHOD_NAMES = {"euler": "Euler", "heun": "Heun", "ab2": "AB2", "dopri5": "Dopri5"}  # the status line's
_PROGRESS = gr.Progress()  # gradio swaps in a per-request tracker for a parameter defaulting to a Progress
_ZIP_MAX_AGE_S = 600  # per-request zip folders older than this are removed (gradio keeps its own copy)


def _positive_int(cfg: Mapping[str, Any], key: str, hi: int | None = None) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (hi is not None and value > hi):
        raise ValueError(f"demo config: {key} must be an integer from 1 to {hi or 'any'}, got {value!r}")
    return value


def _header(dm: DemoModel) -> str:
    sides = " → ".join(f"{s} px" for s in dm.stage_sides)
    if dm.is_text:
        return (f"# PixelFlow: text-to-image in pixel space\n"
                f"Model `{dm.source}` · prompts up to {dm.encoder.max_length} tokens · cascade {sides} · {dm.device.type}")
    return (f"# PixelFlow: class-to-image in pixel space\n"
            f"Model `{dm.source}` · {len(dm.class_names)} classes · cascade {sides} · {dm.device.type}")


def _condition_names(dm: DemoModel) -> list[str]:
    """The leading inputs: the class (class-to-image) or the prompt and negative prompt (text-to-image)."""
    return ["prompt", "negative_prompt"] if dm.is_text else ["class_value"]


def _prune(root: Path) -> None:
    now = time.time()
    for old in root.iterdir():
        try:
            stale = now - old.stat().st_mtime > _ZIP_MAX_AGE_S
        except FileNotFoundError:  # removed by a concurrent request's prune
            continue
        if stale:
            shutil.rmtree(old, ignore_errors=True)


def _generate_handler(dm: DemoModel, display_size: int, zip_root: Path):
    """The Generate callback: raw values in (validated here, not by gradio), gallery/previews/zip/status out.

    Its signature is spelled out so API clients can pass values by name (``client.predict(seed=7, ...)``).
    """
    sides, num_stages = dm.stage_sides, len(dm.stage_sides)
    conditions = _condition_names(dm)
    names = [*conditions, "dopri5", "shift", "guidance_scale", *(f"steps_{k + 1}" for k in range(num_stages)), "seed",
             "num_images"]

    def generate(*args: Any) -> tuple[list, list, Any, str]:
        *values, progress = args  # gradio appends the request's Progress tracker (see the signature below)
        if len(values) != len(names):
            raise gr.Error(f"expected {len(names)} values ({', '.join(names)}), got {len(values)}", title="Invalid input")
        condition, (dopri5, shift, guidance_scale, *steps, seed, num_images) = values[:len(conditions)], values[len(conditions):]
        try:
            if dm.is_text:
                request = dm.validate(None, dopri5, shift, guidance_scale, steps, seed, num_images, *condition)
            else:
                request = dm.validate(*condition, dopri5, shift, guidance_scale, steps, seed, num_images)
        except DemoInputError as err:
            raise gr.Error(str(err), title="Invalid input", print_exception=False) from err

        def on_step(stage: int, step: int, total: int) -> None:
            progress((step, total), desc=f"Stage {stage + 1}/{num_stages} ({sides[stage]} px)", unit="steps")

        result = dm.generate(request, on_step)
        if dm.is_text:
            short = request.prompt if len(request.prompt) <= 60 else request.prompt[:57] + "..."
            label, subject = f"“{short}”", f"for prompt **“{short}”**"
        else:
            label = dm.class_labels[request.class_index]
            subject = f"of class **{label}**"
        gallery = [(upscale_nearest(im, display_size), f"{label} · #{i}") for i, im in enumerate(result.images)]
        previews = [(upscale_nearest(im, display_size), f"#{i} · stage {k + 1} ({sides[k]} px)")
                    for i, stages in enumerate(result.stage_previews) for k, im in enumerate(stages)]
        _prune(zip_root)
        folder = zip_root / uuid.uuid4().hex
        folder.mkdir()
        zip_path = write_zip(result, folder / f"{request.file_stem}.zip", dm.source)
        method = "Dopri5" if request.dopri5 else f"{METHOD_NAMES[dm.fixed_method]}, steps {'/'.join(map(str, request.steps))}"
        status = (f"{request.num_images} image(s) {subject} · seed {request.seed} · {method} · "
                  f"guidance {request.guidance_scale:g} · shift {request.shift:g} · {sum(result.nfe)} model calls · "
                  f"{result.seconds:.1f} s")
        download = gr.DownloadButton(f"Download {request.num_images} PNG(s) (zip)", value=str(zip_path), interactive=True)
        return gallery, previews, download, status

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    generate.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, kind) for n in names] + [inspect.Parameter("progress", kind, default=_PROGRESS)])
    return generate


def _controls(dm: DemoModel, init: Mapping[str, Any]) -> list[gr.components.Component]:
    """The published demo's controls plus the number of images, initialised from ``cfg.controls`` (the condition,
    seed and number of images) and the sampler preset ``dm.sampler`` (method, steps, shift, guidance scale)."""
    sampler = dm.sampler
    try:
        steps = list(sampler.stage_steps(len(dm.stage_sides)))
    except ValueError as err:
        raise ValueError(f"demo config sampler: {err}") from err
    condition = (None,) if dm.is_text else (init["class_index"],)
    text = (init.get("prompt", ""), init.get("negative_prompt", "")) if dm.is_text else ()
    try:
        req = dm.validate(*condition, sampler.method == "dopri5", sampler.shift, sampler.guidance_scale, steps, init["seed"],
                          init["num_images"], *text)
    except DemoInputError as err:
        raise ValueError(f"demo config (controls and sampler): {err}") from err
    if dm.is_text:
        conditions = [gr.Textbox(req.prompt, label=FIELDS["prompt"], placeholder="what to draw, e.g. a handwritten seven",
                                 lines=2, elem_id="prompt"),
                      gr.Textbox(req.negative_prompt, label=FIELDS["negative_prompt"], elem_id="negative_prompt",
                                 placeholder="what the unconditional branch encodes (empty: as published)")]
    else:
        conditions = [gr.Dropdown(list(zip(dm.class_labels, range(len(dm.class_labels)))), value=req.class_index,
                                  label=FIELDS["class_value"], elem_id="class")]
    dopri5 = gr.Checkbox(req.dopri5, label=FIELDS["dopri5"], info="adaptive ODE solver; ignores the step sliders", elem_id="dopri5")
    shift = gr.Slider(*RANGES["shift"], value=req.shift, step=0.5, label=FIELDS["shift"], elem_id="shift")
    guidance_scale = gr.Slider(*RANGES["guidance_scale"], value=req.guidance_scale, step=0.5, label=FIELDS["guidance_scale"],
                               elem_id="guidance_scale")
    steps = [gr.Slider(*RANGES["steps"], value=s, step=1, label=f"{FIELDS['steps']} (stage {k + 1}, {side} px)", elem_id=f"steps{k}")
             for k, (s, side) in enumerate(zip(req.steps, dm.stage_sides))]
    seed = gr.Number(req.seed, precision=0, minimum=RANGES["seed"][0], maximum=RANGES["seed"][1], label=FIELDS["seed"], elem_id="seed")
    num_images = gr.Slider(1, dm.max_images, value=req.num_images, step=1, label=FIELDS["num_images"], elem_id="num_images")
    dopri5.change(lambda on: [gr.Slider(interactive=not on) for _ in steps], dopri5, steps, queue=False, api_visibility="private")
    return [*conditions, dopri5, shift, guidance_scale, *steps, seed, num_images]


def build_demo(cfg: Mapping[str, Any], sampler_overrides: Sequence[str] = ()) -> gr.Blocks:
    """The page for ``cfg``; if the checkpoint is missing or unreadable, a page that says how to get one.

    A checkpoint's recorded sampler (a distilled student's) sets the controls unless the command line named a
    preset (``sampler=NAME`` in ``sampler_overrides``, the Hydra command-line overrides)."""
    display_size = _positive_int(cfg, "display_size")
    hub = str(cfg["ckpt"]).startswith(HUB_PREFIX)  # hf://owner/name: huggingface_hub's cache resolves it
    path = Path(cfg["ckpt"]) if hub else resolve_path(cfg["ckpt"])
    if path.is_dir():  # an export folder: its model.pt or model.safetensors (config.yaml beside it)
        path = next((path / n for n in ("model.pt", "model.safetensors") if (path / n).is_file()), path / "model.pt")
    dm, problem = None, None
    sampler = SamplerConfig.from_mapping(cfg["sampler"], "demo config sampler")
    if not hub and not path.exists():
        problem = checkpoint_help(path)
    else:
        try:
            dm = DemoModel.load(str(cfg["ckpt"]) if hub else path, resolve_path(cfg["config"]) if cfg.get("config") else None,
                                cfg["device"], _positive_int(cfg, "max_images"), bool(cfg.get("allow_download", False)),
                                cfg.get("ema"), cfg.get("precision", "auto"), cfg.get("text_encoder"),
                                asdict(sampler), sampler_overrides)
        except CheckpointError as err:
            problem = checkpoint_help(cfg["ckpt"] if hub else path, str(err))
    if dm is None:
        log.warning("no usable checkpoint; the page explains how to get one:\n%s", problem)
    else:
        kind = "text-to-image" if dm.is_text else f"{len(dm.class_names)} classes"
        log.info("loaded %s (%s, %s px, %s)", dm.source, kind, dm.stage_sides[-1], dm.device)
        if cfg.get("compile", False):
            num_images = int(cfg["controls"]["num_images"])
            seconds = dm.compile(num_images, dm.sampler.guidance_scale)
            log.info("compiled the network in %.1f s (warmed for %s image(s) at guidance %s)", seconds, num_images,
                     dm.sampler.guidance_scale)
    with gr.Blocks(title="PixelFlow demo", analytics_enabled=bool(cfg.get("analytics", False)),
                   delete_cache=(3600, 3600)) as demo:
        if dm is None:
            gr.Markdown("# PixelFlow: class-to-image in pixel space")
            gr.Markdown(problem, elem_id="no-checkpoint")
            return demo
        gr.Markdown(_header(dm))
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                inputs = _controls(dm, cfg["controls"])
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="Generated images", format="png", columns=2, height="auto", elem_id="gallery")
                status = gr.Markdown(label="Status", elem_id="status")
                download = gr.DownloadButton("Download PNGs (zip)", interactive=False, elem_id="download")
                previews = gr.Gallery(label="Cascade stages (each upsampled to the final size)", format="png",
                                      columns=len(dm.stage_sides), height="auto", elem_id="previews")
        zip_root = Path(tempfile.mkdtemp(prefix="pixelflow_demo_"))
        weakref.finalize(demo, shutil.rmtree, zip_root, True)
        button.click(_generate_handler(dm, display_size, zip_root), inputs, [gallery, previews, download, status],
                     api_name="generate", preprocess=False)
    demo.queue(default_concurrency_limit=_positive_int(cfg, "concurrency_limit"), max_size=_positive_int(cfg, "max_queue"))
    return demo


def launch(cfg: Mapping[str, Any], sampler_overrides: Sequence[str] = (), **launch_kwargs: Any) -> gr.Blocks:
    """Build and serve the demo on ``cfg.host:cfg.port`` (see :func:`build_demo`); extra keyword arguments go to
    ``Blocks.launch``."""
    port = _positive_int(cfg, "port", hi=65535)
    demo = build_demo(cfg, sampler_overrides)
    demo.launch(server_name=str(cfg["host"]), server_port=port, share=bool(cfg["share"]), show_error=True, ssr_mode=False,
                **launch_kwargs)
    return demo
