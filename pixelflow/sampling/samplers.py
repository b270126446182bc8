"""Cascade samplers: Euler (published default), Heun, Adams-Bashforth 2 and adaptive Dopri5 (torchdiffeq).

One sampler serves class-to-image and text-to-image models: what differs (the model's conditioning
arguments, the unconditional branch and the stage-wise guidance rule) comes from the
:class:`~pixelflow.conditioning.Conditioning` it is given. All randomness is drawn up front into a
:class:`CascadeNoise`, by the sampler (from per-sample seeds or a ``torch.Generator``) or supplied by the
caller, so seeds fully determine the images and golden checks can inject the published draws.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from numbers import Integral, Real
from typing import Any

import torch
from torchdiffeq import odeint

from pixelflow.cascade import CascadeSchedule
from pixelflow.conditioning import Conditioning, as_conditioning
from pixelflow.layers import fp32_region
from pixelflow.model import Modulation
from pixelflow.prediction import SAMPLE_MIN_DIVISOR, convert
from pixelflow.sampling.integrators import STEPPERS

__all__ = ["METHODS", "SamplerConfig", "CascadeNoise", "CascadeSampler", "SampleOutput", "ab2_time_grid", "euler_time_grid",
           "to_uint8"]

METHODS = ("euler", "heun", "ab2", "dopri5")
# The Euler time grid stops short of 1 and maps its end to the table's last entry.
_EULER_T_MAX = 0.999


def _number(name: str, value: Any, low: float, strict: bool, meaning: str = "") -> float:
    """``value`` as a float above ``low`` (or at it unless ``strict``), else a ValueError naming the setting."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and (value > low if strict else value >= low)
    if not ok:
        raise ValueError(f"{name} must be a number {'>' if strict else '>='} {low:g}{meaning}, got {value!r}")
    return float(value)


def _steps(value: Any) -> int | tuple[int, ...]:
    """One positive step count for every stage, or a tuple of them (one per stage)."""
    def count(v: Any) -> bool:
        return isinstance(v, Integral) and not isinstance(v, bool) and v >= 1

    if count(value):
        return int(value)
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) and all(count(v) for v in value):
        return tuple(int(v) for v in value)
    raise ValueError(f"steps must be a positive integer (every stage) or a list of them (one per stage), got {value!r}")


def _interval(value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2 \
            and all(isinstance(v, Real) and not isinstance(v, bool) for v in value) and 0 <= value[0] <= value[1] <= 1:
        return float(value[0]), float(value[1])
    raise ValueError(f"guidance_interval must be null or [lo, hi] with 0 <= lo <= hi <= 1, got {value!r}")


@dataclass(frozen=True)
class SamplerConfig:
    """Sampler settings, checked and normalised when made (a list from a config becomes a tuple).

    ``steps``: per stage, one int for every stage or a tuple with one entry per stage (its length is checked
    against the schedule by :class:`CascadeSampler`); Dopri5 uses neither ``steps`` nor ``shift``.
    ``guidance_scale``: the classifier-free guidance scale, 1 = no guidance (class conditions: the top of the
    published stage ramp; text: the weight of every stage). ``guidance_interval`` (lo, hi) limits guidance to
    global progress T / (N - 1) in [lo, hi]; outside it only the conditional branch runs (w = 1). ``None``
    (published) guides everywhere. ``atol`` / ``rtol``: Dopri5's tolerances.
    """

    method: str = "euler"
    steps: int | tuple[int, ...] = 30
    shift: float = 1.0
    guidance_scale: float = 4.0
    guidance_interval: tuple[float, float] | None = None
    atol: float = 1e-6
    rtol: float = 1e-3

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"sampler method must be one of {METHODS}, got {self.method!r}")
        settle = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        settle("steps", _steps(self.steps))
        settle("shift", _number("shift", self.shift, 0, strict=True))
        settle("guidance_scale", _number("guidance_scale", self.guidance_scale, 1, strict=False, meaning=" (1 = no guidance)"))
        settle("guidance_interval", _interval(self.guidance_interval))
        settle("atol", _number("atol", self.atol, 0, strict=True))
        settle("rtol", _number("rtol", self.rtol, 0, strict=True))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | SamplerConfig, where: str = "sampler") -> SamplerConfig:
        """A config from a mapping of its fields (e.g. a ``conf/sampler`` preset); ``where`` names it in errors."""
        if isinstance(values, SamplerConfig):
            return values
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"{where}: unknown setting(s) {unknown}; a sampler takes {names} (conf/sampler presets)")
        try:
            return cls(**dict(values))
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err

    @property
    def doubled(self) -> bool:
        """Dopri5 integrates the guidance-doubled state, as published: its transition noise covers 2B rows."""
        return self.method == "dopri5"

    def stage_steps(self, num_stages: int) -> tuple[int, ...]:
        """The step count of each of ``num_stages`` stages."""
        if isinstance(self.steps, int):
            return (self.steps,) * num_stages
        if len(self.steps) != num_stages:
            raise ValueError(f"sampler steps {list(self.steps)} give {len(self.steps)} stage(s) but the schedule has "
                             f"{num_stages}: give one count per stage, or one int for every stage")
        return self.steps


@dataclass
class CascadeNoise:
    """Every random draw of one sampling run: the stage-0 latent and each transition's block noise.

    For Dopri5 the transition noise covers the guidance-doubled state (2B rows), as in the published code: the
    first B rows (the images') are drawn first, exactly as a fixed-step method's, and the state's second
    half after them, so every method samples the same images' draws from the same seed or generator.
    """

    init: torch.Tensor
    transitions: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def draw(
        cls, schedule: CascadeSchedule, batch: int, channels: int, doubled: bool,
        generator: torch.Generator | None = None, device: torch.device | str = "cpu",
    ) -> CascadeNoise:
        sides = schedule.stage_sides
        init = torch.randn((batch, channels, sides[0], sides[0]), generator=generator, device=device)
        transitions = [schedule.block_noise((batch, channels, s, s), generator, device) for s in sides[1:]]
        if doubled:  # the second half's rows, after every draw of the images'
            transitions = [torch.cat([z, schedule.block_noise(z.shape, generator, device)]) for z in transitions]
        return cls(init, transitions)

    @classmethod
    def per_sample(
        cls, schedule: CascadeSchedule, seeds: Sequence[int], channels: int, doubled: bool,
        device: torch.device | str = "cpu",
    ) -> CascadeNoise:
        """Each sample's draws from its own seed, so an image does not depend on its batch.

        Seeds force one normal draw per sample and stage; the block correlation then runs once per
        stage over the whole batch.
        """
        sides = schedule.stage_sides
        halves = 2 if doubled else 1
        inits, raw = [], [[[] for _ in sides[1:]] for _ in range(halves)]
        for seed in seeds:  # same draw order as ``draw(batch=1)`` from this seed
            g = torch.Generator(device).manual_seed(int(seed))
            inits.append(torch.randn((1, channels, sides[0], sides[0]), generator=g, device=device))
            for half in range(halves):
                for k, s in enumerate(sides[1:]):
                    raw[half][k].append(torch.randn((1, channels, s // 2, s // 2, 4), generator=g, device=device))
        # Doubled transition noise is laid out [the images' rows; the second half's rows] over the whole batch.
        transitions = [schedule.correlate_blocks(torch.cat([z for half in raw for z in half[k]]))
                       for k in range(len(sides) - 1)]
        return cls(torch.cat(inits), transitions)


def euler_time_grid(num_steps: int, shift: float) -> torch.Tensor:
    """Stage-local times (N+1,) float64: shifted linspace(0, 0.999, N), then 1.0 appended."""
    u = torch.linspace(0, _EULER_T_MAX, num_steps, dtype=torch.float64)
    t = u / (shift + (1 - shift) * u)
    return torch.cat([t, torch.ones(1, dtype=torch.float64)])


def ab2_time_grid(num_steps: int, shift: float) -> torch.Tensor:
    """AB2's stage-local times (N+1,) float64: linspace(0, 1, N+1), shifted as the Euler grid."""
    u = torch.linspace(0, 1, num_steps + 1, dtype=torch.float64)
    return u / (shift + (1 - shift) * u)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] NCHW float -> [0, 255] NHWC uint8."""
    return (x / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


@dataclass
class SampleOutput:
    """What one :meth:`CascadeSampler.sample` call made (network rows: count them with
    :class:`~pixelflow.sampling.call_counter.CallCounter`)."""

    images: torch.Tensor  # (B, C, H, W) float in [-1, 1] (unclamped)
    stage_finals: list[torch.Tensor]  # each stage's final latent (first B rows)
    nfe: list[int]  # batched model calls per stage


class CascadeSampler:
    """Runs the whole cascade for a batch of conditions (class labels or text) with guidance.

    The stage weight is the condition's rule (class: the published ramp; text: ``guidance_scale`` at every
    stage); ``guidance_interval`` then limits it for either. Where the weight is exactly 1 (stage 0
    under the class ramp, every stage at ``guidance_scale=1``, outside ``guidance_interval``) only the
    conditional branch runs: v_u + 1 (v_c - v_u) is v_c, up to float rounding.

    A network that predicts ``x`` or ``eps`` (its ``prediction``) is integrated through the velocity its
    guided output implies at the state and stage-local time of the call (:func:`pixelflow.prediction.convert`;
    the conversion is affine in the output, so guiding before or after it is the same).
    """

    def __init__(self, model: torch.nn.Module, schedule: CascadeSchedule, config: SamplerConfig):
        if not isinstance(config, SamplerConfig):
            raise TypeError(f"config must be a SamplerConfig (SamplerConfig.from_mapping reads a preset), got {type(config).__name__}")
        self.model, self.schedule, self.config = model, schedule, config
        self.steps = config.stage_steps(schedule.num_stages)
        self.prediction = getattr(model, "prediction", "v")

    @property
    def device(self) -> torch.device:
        """Where the network runs, and so where the noise is drawn."""
        return next(self.model.parameters()).device

    # ---- velocity with guidance -------------------------------------------------------
    def _weight_at(self, stage_weight: float, timestep: float) -> float:
        """The guidance weight at global timestep T: 1 outside the guidance interval."""
        if self.config.guidance_interval is None:
            return stage_weight
        lo, hi = self.config.guidance_interval
        return stage_weight if lo <= timestep / (self.schedule.num_train_timesteps - 1) <= hi else 1.0

    def velocity(self, x: torch.Tensor, timestep: torch.Tensor, cond: Conditioning, weight: float,
                 modulation: Modulation | None = None, t: torch.Tensor | float | None = None,
                 stage: int | None = None) -> torch.Tensor:
        """v_u + w (v_c - v_u) from one batched forward over [uncond; cond] rows; w == 1 runs v_c alone.

        ``modulation``: the network's adaLN vectors for this call's rows, computed ahead (it then stands in for
        ``timestep``; see :meth:`PixelFlowTransformer.modulations`). ``t`` and ``stage``: the stage-local time of ``x``
        and its stage, which an ``x`` or ``eps`` network's conversion to the velocity needs.
        """
        batch = x.shape[0]
        rows = batch if weight == 1.0 else 2 * batch
        timestep = None if modulation is not None else timestep.expand(rows)
        if weight == 1.0:
            out = self.model(x, timestep, **cond.cond_kwargs(), modulation=modulation)
        else:
            uncond, conditional = self.model(torch.cat([x, x]), timestep, **cond.both_kwargs(), modulation=modulation).chunk(2)
            out = torch.add(uncond, conditional - uncond, alpha=weight)
        if self.prediction == "v":
            return out
        if t is None or stage is None:
            raise ValueError(f"the network predicts {self.prediction!r}: velocity() needs the stage and the stage-local "
                             "time t of x")
        return convert(out, x, t, self.schedule.line(stage), self.prediction, "v", SAMPLE_MIN_DIVISOR)

    def _modulations(self, stage: int, timesteps: torch.Tensor, cond: Conditioning, guided: bool) -> list[Modulation]:
        """adaLN vectors at ``timesteps`` for the rows of a guided ([uncond; cond]) or a conditional-only call."""
        kwargs = cond.both_kwargs() if guided else cond.cond_kwargs()
        return self.model.modulations(timesteps, self.schedule.stage_sides[stage] // self.model.patch_size, **kwargs)

    def _stage_modulations(self, stage: int, timesteps: torch.Tensor, cond: Conditioning,
                           weights: list[float]) -> list[Modulation]:
        """The network's adaLN vectors for every step of a fixed-step stage, in one batched pass."""
        guided = [w != 1.0 for w in weights]
        prepared = self._modulations(stage, timesteps, cond, guided=any(guided))
        if not any(guided) or all(guided):
            return prepared
        return [m if g else m.last(cond.batch) for m, g in zip(prepared, guided)]

    # ---- per-stage integrators ------------------------------------------------------
    def stage_time_grid(self, stage: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(stage-local times (N+1,) float64, global timesteps of time points 0..N-1 as float32).

        Euler/Heun use the published time grid (shifted linspace to 0.999, then 1); AB2 a shifted
        linspace(0, 1, N+1) on the same time axis Dopri5 integrates.
        """
        n = self.steps[stage]
        if self.config.method == "ab2":
            t = ab2_time_grid(n, self.config.shift)
            return t, self.schedule.stage_timestep(stage, t[:-1]).float()
        t = euler_time_grid(n, self.config.shift)
        return t, self.schedule.stage_timestep(stage, t[:-1], _EULER_T_MAX).float()

    def _fixed_step_stage(self, x, stage, cond, weight, on_step):
        t, timesteps = self.stage_time_grid(stage)
        # Everything per step is prepared here, on the host, once per stage.
        t32 = t.float()
        dts, points = (t32[1:] - t32[:-1]).tolist(), t32[:-1].tolist()
        weights = [self._weight_at(weight, T) for T in timesteps.tolist()]
        timesteps = timesteps.to(x.device)
        modulations = self._stage_modulations(stage, timesteps, cond, weights)
        calls = 0

        def velocity(y: torch.Tensor, n: int) -> torch.Tensor:
            nonlocal calls
            calls += 1
            return self.velocity(y, timesteps[n], cond, weights[n], modulations[n], points[n], stage)

        report = None if on_step is None else (lambda done, total: on_step(stage, done, total))
        x = STEPPERS[self.config.method](x, velocity, dts, report)
        return x, calls

    def _dopri5_stage(self, state, stage, cond, weight, on_step):
        """Adaptive Dopri5 on the guidance-doubled state, as published (torchdiffeq syncs for step control)."""
        table = self.schedule.timestep_tables[stage]
        t0, t_last = float(table[0]), float(table[-1])
        batch, nfe = cond.batch, 0
        interval = self.config.guidance_interval is not None

        def rhs(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            nonlocal nfe
            nfe += 1
            timestep = (t0 + t * (t_last - t0)).float().reshape(1)
            w = self._weight_at(weight, float(timestep)) if interval else weight
            modulation = self._modulations(stage, timestep, cond, guided=w != 1.0)[0]  # the call form compile warms
            v = self.velocity(y[:batch], timestep, cond, w, modulation, t, stage)
            return torch.cat([v, v])

        ends = torch.tensor([0.0, 1.0], device=state.device)
        out = odeint(rhs, state, ends, method="dopri5", atol=self.config.atol, rtol=self.config.rtol)[-1]
        if on_step is not None:
            on_step(stage, 1, 1)
        return out, nfe

    # ---- the cascade ----------------------------------------------------------------
    def draw_noise(self, batch: int, seeds: Sequence[int] | None = None,
                   generator: torch.Generator | None = None) -> CascadeNoise:
        """Every draw of a run of ``batch`` images, on the network's device: image i's from ``seeds[i]`` (batch
        independent), else all from ``generator`` (None: torch's default one). Dopri5's draws cover its doubled state."""
        channels, doubled = self.model.in_channels, self.config.doubled
        if seeds is not None and len(seeds) != batch:
            raise ValueError(f"{len(seeds)} seeds given for {batch} images: give one seed per image")
        with fp32_region(self.device):  # the block correlation is a matmul: under a caller's autocast it would run in bf16
            if seeds is None:
                return CascadeNoise.draw(self.schedule, batch, channels, doubled, generator, self.device)
            return CascadeNoise.per_sample(self.schedule, seeds, channels, doubled, self.device)

    def sample(
        self,
        condition: Conditioning | torch.Tensor,
        generator: torch.Generator | None = None,
        noise: CascadeNoise | None = None,
        *,
        seeds: Sequence[int] | None = None,
        on_stage_end: Callable[[int, torch.Tensor], None] | None = None,
        on_step: Callable[[int, int, int], None] | None = None,
    ) -> SampleOutput:
        """Generate B images for ``condition``: class labels (B,) or a :class:`Conditioning` (e.g. a
        :class:`~pixelflow.text.TextCondition`). The draws come from one of ``seeds`` (one per image, see
        :func:`pixelflow.sampling.indexed.sample_seed`), ``generator`` or ``noise`` (injected, e.g. published draws);
        with none of them from torch's default generator.

        Sampling runs under ``torch.inference_mode()`` (``on_stage_end`` sees inference tensors); the returned
        images and stage finals are plain tensors, free to modify in place.
        """
        given = [name for name, value in (("seeds", seeds), ("generator", generator), ("noise", noise)) if value is not None]
        if len(given) > 1:
            raise ValueError(f"pass one source of noise (seeds=, generator= or noise=), got {' and '.join(given)}")
        args = (condition, seeds, generator, noise, on_stage_end, on_step)
        # Inference mode is lighter per operator than no_grad (no view or version tracking), but a compiled
        # network's graphs guard on the dispatch keys it changes: those sample under no_grad, as compile warms them.
        if isinstance(getattr(self.model, "_orig_mod", None), torch.nn.Module):
            with torch.no_grad():
                return self._sample(*args)
        with torch.inference_mode():
            out = self._sample(*args)
        # Outside inference mode an inference tensor cannot change in place or enter autograd: hand back copies.
        finals = [x.clone() for x in out.stage_finals]
        return replace(out, images=finals[-1], stage_finals=finals)

    def _sample(
        self, condition: Conditioning | torch.Tensor, seeds: Sequence[int] | None, generator: torch.Generator | None,
        noise: CascadeNoise | None, on_stage_end: Callable[[int, torch.Tensor], None] | None,
        on_step: Callable[[int, int, int], None] | None,
    ) -> SampleOutput:
        device = self.device
        cond = as_conditioning(self.model, condition.to(device))
        doubled = self.config.doubled
        batch = cond.batch
        if noise is None:
            noise = self.draw_noise(batch, seeds, generator)
        if noise.init.shape[0] != batch:
            raise ValueError(f"noise is for {noise.init.shape[0]} images but the condition for {batch}")
        x = noise.init.to(device)
        if doubled:
            x = torch.cat([x, x])
        finals, nfes = [], []
        for stage in range(self.schedule.num_stages):
            if stage:
                x = self.schedule.transition(x, stage, noise.transitions[stage - 1].to(device))
            weight = cond.stage_weight(self.config.guidance_scale, stage, self.schedule)
            integrate = self._dopri5_stage if doubled else self._fixed_step_stage
            x, nfe = integrate(x, stage, cond, weight, on_step)
            finals.append(x[:batch])
            nfes.append(nfe)
            if on_stage_end is not None:
                on_stage_end(stage, x[:batch])
        return SampleOutput(images=x[:batch], stage_finals=finals, nfe=nfes)
