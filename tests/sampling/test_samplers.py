import pytest
import torch

from pixelflow.cascade import CascadeSchedule
from pixelflow.conditioning import ClassCondition
from pixelflow.model import build_model
from pixelflow.sampling.call_counter import CallCounter
from pixelflow.sampling.samplers import CascadeNoise, CascadeSampler, SamplerConfig, euler_time_grid, to_uint8


def run(model, schedule, labels, seed=0, **kw):
    sampler = CascadeSampler(model, schedule, SamplerConfig(**{"steps": 2, "guidance_scale": 3.0, **kw}))
    return sampler.sample(labels, generator=torch.Generator().manual_seed(seed))


def test_euler_time_grid_shift_and_endpoint():
    assert euler_time_grid(3, 1.0).tolist() == pytest.approx([0, 0.4995, 0.999, 1.0])
    t = euler_time_grid(3, 2.0)
    assert t[1].item() == pytest.approx(0.4995 / (2 - 0.4995)) and t[-1] == 1.0


def test_same_seed_same_images_different_seed_different(tiny_model, tiny_schedule):
    labels = torch.tensor([1, 2])
    a, b = run(tiny_model, tiny_schedule, labels, 7), run(tiny_model, tiny_schedule, labels, 7)
    c = run(tiny_model, tiny_schedule, labels, 8)
    assert torch.equal(a.images, b.images)
    assert not torch.allclose(a.images, c.images)
    assert a.images.shape == (2, 3, 32, 32)
    assert [f.shape[-1] for f in a.stage_finals] == [4, 8, 16, 32]


@pytest.mark.parametrize("method,calls", [("euler", [2, 2, 2, 2]), ("heun", [3, 3, 3, 3]), ("ab2", [2, 2, 2, 2])])
def test_model_calls_per_stage(tiny_model, tiny_schedule, method, calls):
    assert run(tiny_model, tiny_schedule, torch.tensor([0]), method=method).nfe == calls


@pytest.mark.slow
def test_dopri5_runs_adaptively_and_agrees_with_fine_heun(tiny_model, tiny_schedule):
    labels = torch.tensor([3, 4])
    noise = CascadeNoise.draw(tiny_schedule, 2, 3, doubled=True, generator=torch.Generator().manual_seed(0))
    dopri = CascadeSampler(tiny_model, tiny_schedule, SamplerConfig(method="dopri5", guidance_scale=2.0)).sample(labels, noise=noise)
    assert all(n >= 8 and (n - 2) % 6 == 0 for n in dopri.nfe)
    euler_noise = CascadeNoise(noise.init, [n[:2] for n in noise.transitions])
    heun = CascadeSampler(tiny_model, tiny_schedule, SamplerConfig(method="heun", steps=20, guidance_scale=2.0)).sample(
        labels, noise=euler_noise)
    assert (dopri.images - heun.images).abs().max() < 0.02


def test_guidance_is_one_batched_forward_and_follows_the_stage_ramp(tiny_model, tiny_schedule):
    calls = []
    tiny_model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    labels = torch.tensor([1, 2, 3])
    run(tiny_model, tiny_schedule, labels, steps=1)
    assert calls == [3, 6, 6, 6]  # stage 0 has w = 1: conditional only; then [null; class] in one batch
    assert [tiny_schedule.stage_cfg(3.0, k) for k in range(4)] == pytest.approx([1, 1 + 2 / 6, 1 + 4 / 3, 3])


def test_guidance_formula(tiny_model, tiny_schedule):
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor(300.0), torch.tensor([1, 2])
    sampler = CascadeSampler(tiny_model, tiny_schedule, SamplerConfig(steps=1))
    v_u = tiny_model(x, t.expand(2), torch.full_like(y, 10))
    v_c = tiny_model(x, t.expand(2), y)
    assert torch.allclose(sampler.velocity(x, t, ClassCondition(y, 10), 2.5), v_u + 2.5 * (v_c - v_u), atol=1e-5)


def test_guidance_interval_skips_unconditional_outside(tiny_model, tiny_schedule):
    calls = []
    tiny_model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    run(tiny_model, tiny_schedule, torch.tensor([1]), steps=1, guidance_interval=(0.4, 0.8))
    # stage starts T = 0, 175, 426, 719 -> progress 0, .18, .43, .72: guided only in stages 2 and 3
    assert calls == [1, 1, 2, 2]


def test_guidance_scale_changes_images(tiny_model, tiny_schedule):
    labels = torch.tensor([1])
    assert not torch.allclose(run(tiny_model, tiny_schedule, labels, guidance_scale=1.0).images,
                              run(tiny_model, tiny_schedule, labels, guidance_scale=4.0).images)


def test_per_sample_noise_is_batch_independent(tiny_model, tiny_schedule):
    both = CascadeNoise.per_sample(tiny_schedule, [11, 12], 3, doubled=False)
    alone = CascadeNoise.per_sample(tiny_schedule, [12], 3, doubled=False)
    assert torch.equal(both.init[1:], alone.init)
    assert all(torch.equal(a[1:], b) for a, b in zip(both.transitions, alone.transitions))
    doubled = CascadeNoise.per_sample(tiny_schedule, [11, 12], 3, doubled=True)
    assert doubled.transitions[0].shape[0] == 4


@pytest.mark.parametrize("source", ["seeds", "generator"])
def test_dopri5_draws_the_same_image_noise_as_the_fixed_grid_methods(tiny_schedule, source):
    """The doubled state's first half gets a fixed-grid run's draws, so methods compare on the same noise."""
    def noise(doubled: bool) -> CascadeNoise:
        if source == "seeds":
            return CascadeNoise.per_sample(tiny_schedule, [11, 12, 13], 3, doubled)
        return CascadeNoise.draw(tiny_schedule, 3, 3, doubled, torch.Generator().manual_seed(11))

    single, doubled = noise(False), noise(True)
    assert torch.equal(single.init, doubled.init)
    for one, two in zip(single.transitions, doubled.transitions, strict=True):
        assert two.shape[0] == 6 and torch.equal(two[:3], one)
        assert not torch.allclose(two[3:], one)  # the second half is drawn apart, not copied


@pytest.mark.parametrize("doubled", [False, True])
def test_a_seed_draws_what_a_generator_seeded_with_it_draws(tiny_schedule, doubled):
    seeded = CascadeNoise.per_sample(tiny_schedule, [7], 3, doubled)
    drawn = CascadeNoise.draw(tiny_schedule, 1, 3, doubled, torch.Generator().manual_seed(7))
    assert torch.equal(seeded.init, drawn.init)
    assert all(torch.equal(a, b) for a, b in zip(seeded.transitions, drawn.transitions, strict=True))


@pytest.mark.parametrize("bad,match", [
    (dict(method="rk4"), "sampler method must be one of"), (dict(steps=0), "steps must be a positive integer"),
    (dict(steps=[2, 0]), "steps must be a positive integer"), (dict(steps=[]), "steps must be"),
    (dict(steps=2.5), "steps must be"), (dict(steps=True), "steps must be"), (dict(steps="10"), "steps must be"),
    (dict(shift=0), "shift must be a number > 0"), (dict(shift="1"), "shift must be a number"),
    (dict(guidance_scale=0.5), r"guidance_scale must be a number >= 1 \(1 = no guidance\), got 0.5"),
    (dict(guidance_interval=(0.8, 0.2)), "guidance_interval must be null or"),
    (dict(guidance_interval=[0.5]), "guidance_interval must be null or"), (dict(atol=0), "atol must be a number > 0"),
    (dict(rtol=-1e-3), "rtol must be a number > 0"),
])
def test_invalid_sampler_settings_are_clear_errors_when_made(bad, match):
    with pytest.raises(ValueError, match=match):
        SamplerConfig(**bad)


def test_settings_are_normalised_once_and_the_config_is_frozen():
    config = SamplerConfig(steps=[1, 2, 3, 4], guidance_scale=5, guidance_interval=[0, 1], shift=2)
    assert config.steps == (1, 2, 3, 4) and config.guidance_interval == (0.0, 1.0)
    assert isinstance(config.guidance_scale, float) and isinstance(config.shift, float)
    assert config == SamplerConfig(steps=(1, 2, 3, 4), guidance_scale=5.0, guidance_interval=(0.0, 1.0), shift=2.0)
    assert hash(config) == hash(SamplerConfig(**vars(config)))  # usable as a key (sweep cells)
    with pytest.raises(AttributeError):
        config.steps = 3
    assert SamplerConfig(steps=7).stage_steps(4) == (7, 7, 7, 7) and config.stage_steps(4) == (1, 2, 3, 4)
    assert SamplerConfig(method="dopri5").doubled and not SamplerConfig(method="heun").doubled


def test_a_preset_mapping_gives_the_config_and_names_unknown_keys():
    preset = {"method": "euler", "steps": [10, 10, 10, 10], "shift": 1.0, "guidance_scale": 5.0,
              "guidance_interval": None, "atol": 1e-6, "rtol": 1e-3}
    assert SamplerConfig.from_mapping(preset) == SamplerConfig(steps=(10, 10, 10, 10), guidance_scale=5.0)
    with pytest.raises(ValueError, match=r"sampler: unknown setting\(s\) \['cfg'\]; a sampler takes \['method'"):
        SamplerConfig.from_mapping({"cfg": 4.0})
    with pytest.raises(ValueError, match="callbacks.x.sampler: shift must be a number > 0"):
        SamplerConfig.from_mapping({"shift": 0}, "callbacks.x.sampler")


def test_per_stage_steps_are_checked_against_the_schedule(tiny_model, tiny_schedule):
    with pytest.raises(ValueError, match=r"sampler steps \[1, 2\] give 2 stage\(s\) but the schedule has 4: give one count "
                                         "per stage, or one int for every stage"):
        CascadeSampler(tiny_model, tiny_schedule, SamplerConfig(steps=[1, 2]))
    assert CascadeSampler(tiny_model, tiny_schedule, SamplerConfig(steps=[1, 2, 3, 4])).steps == (1, 2, 3, 4)
    with pytest.raises(TypeError, match="config must be a SamplerConfig"):
        CascadeSampler(tiny_model, tiny_schedule, {"steps": 2})


def test_out_of_range_label_is_a_clear_error(tiny_model, tiny_schedule):
    with pytest.raises(ValueError, match="class labels"):
        run(tiny_model, tiny_schedule, torch.tensor([10]))


def test_to_uint8():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    assert to_uint8(x)[0, :, :, 0].flatten().tolist() == [0, 0, 128, 255]


@pytest.mark.parametrize("method", ["euler", "dopri5"])
def test_seeds_draw_each_images_noise_inside_the_sampler_as_per_sample_noise(tiny_model, tiny_schedule, method):
    """``seeds=`` is per-sample noise (Dopri5's doubled layout included) drawn by the sampler itself."""
    sampler = CascadeSampler(tiny_model, tiny_schedule, SamplerConfig(method=method, steps=1, rtol=1e-2, atol=1e-3))
    labels = torch.tensor([1, 2])
    noise = CascadeNoise.per_sample(tiny_schedule, [11, 12], 3, doubled=method == "dopri5")
    assert sampler.draw_noise(2, seeds=[11, 12]).transitions[0].shape[0] == (4 if method == "dopri5" else 2)
    assert torch.equal(sampler.sample(labels, seeds=[11, 12]).images, sampler.sample(labels, noise=noise).images)
    drawn = CascadeNoise.draw(tiny_schedule, 2, 3, method == "dopri5", torch.Generator().manual_seed(5))
    assert torch.equal(sampler.sample(labels, generator=torch.Generator().manual_seed(5)).images,
                       sampler.sample(labels, noise=drawn).images)


def test_one_source_of_noise_and_one_seed_per_image(tiny_model, tiny_schedule):
    sampler = CascadeSampler(tiny_model, tiny_schedule, SamplerConfig(steps=1))
    with pytest.raises(ValueError, match="pass one source of noise .* got seeds and generator"):
        sampler.sample(torch.tensor([1]), torch.Generator(), seeds=[1])
    with pytest.raises(ValueError, match="3 seeds given for 2 images"):
        sampler.sample(torch.tensor([1, 2]), seeds=[1, 2, 3])


class _AlwaysBothBranches(CascadeSampler):
    """The full computation: [uncond; cond] forward and v_u + w (v_c - v_u) even where w == 1, with the
    conditioning computed inside every forward (the adaLN vectors computed ahead are not used)."""

    def velocity(self, x, timestep, cond, weight, modulation=None, t=None, stage=None):
        v_u, v_c = self.model(torch.cat([x, x]), timestep.expand(2 * x.shape[0]), **cond.both_kwargs()).chunk(2)
        return v_u + weight * (v_c - v_u)


def check_guidance_skip_against_the_full_computation(model, schedule, condition, batch: int, config: SamplerConfig) -> None:
    """The sampler and :class:`_AlwaysBothBranches` on the same noise: the same images to float rounding and model
    calls, in fewer network rows (some calls, w = 1, ran the conditional rows only), as a forward hook and the
    :class:`CallCounter` both count."""
    noise = CascadeNoise.draw(schedule, batch, 3, doubled=False, generator=torch.Generator().manual_seed(4))
    rows = []
    model.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    counter = CallCounter(model)
    fast = CascadeSampler(counter, schedule, config).sample(condition, noise=noise)
    fast_rows, rows[:] = sum(rows), []
    full = _AlwaysBothBranches(model, schedule, config).sample(condition, noise=noise)
    assert fast.nfe == full.nfe and (fast.images - full.images).abs().max() < 1e-5
    assert counter.rows == fast_rows < sum(rows)


@pytest.mark.parametrize("kw", [dict(guidance_scale=3.0), dict(guidance_scale=1.0),
                                dict(guidance_scale=3.0, guidance_interval=(0.4, 0.8)),
                                dict(method="heun", guidance_scale=3.0), dict(method="ab2", guidance_scale=1.0)])
def test_guidance_skip_matches_the_full_computation_to_float_rounding(tiny_model, tiny_schedule, kw):
    # with guidance_scale=3 stage 0 (w = 1 under the ramp) runs conditional-only
    check_guidance_skip_against_the_full_computation(tiny_model, tiny_schedule, torch.tensor([1, 5, 7]), 3,
                                                     SamplerConfig(**{"steps": 3, **kw}))


def test_guidance_scale_one_runs_only_the_conditional_branch(tiny_model, tiny_schedule):
    calls = []
    tiny_model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    run(tiny_model, tiny_schedule, torch.tensor([1, 2]), steps=2, guidance_scale=1.0)
    assert calls == [2] * 8


@pytest.mark.slow
def test_guidance_skip_in_dopri5_keeps_the_doubled_state_and_matches_the_full_computation(tiny_model, tiny_schedule):
    labels = torch.tensor([2, 3])
    noise = CascadeNoise.draw(tiny_schedule, 2, 3, doubled=True, generator=torch.Generator().manual_seed(0))
    config = SamplerConfig(method="dopri5", guidance_scale=2.0, rtol=1e-2, atol=1e-3)
    fast = CascadeSampler(tiny_model, tiny_schedule, config).sample(labels, noise=noise)
    full = _AlwaysBothBranches(tiny_model, tiny_schedule, config).sample(labels, noise=noise)
    assert fast.nfe == full.nfe and (fast.images - full.images).abs().max() < 1e-4


def test_ab2_time_grid_spans_the_whole_stage_like_dopri5(tiny_model, tiny_schedule):
    sampler = CascadeSampler(tiny_model, tiny_schedule, SamplerConfig(method="ab2", steps=4, shift=2.0))
    t, timesteps = sampler.stage_time_grid(2)
    table = tiny_schedule.timestep_tables[2]
    assert t[0] == 0 and t[-1] == 1 and len(timesteps) == 4
    assert timesteps[0].item() == pytest.approx(float(table[0]))
    assert timesteps[1].item() == pytest.approx(float(table[0] + (0.25 / (2 - 0.25)) * (table[-1] - table[0])))


def test_sampling_runs_in_inference_mode_and_training_still_works_after_it(tiny_model):
    """The sampler runs under inference mode, hands back plain tensors, and the tables it caches on the way stay
    usable by autograd."""
    from pixelflow import layers, rope
    from pixelflow.cascade import CascadeSchedule

    rope._rope_tables.cache_clear()
    rope._pair_tables.cache_clear()
    layers._frequencies.cache_clear()
    schedule = CascadeSchedule(image_size=32, num_stages=4)  # fresh: its cached tables are built while sampling
    seen = []
    sampler = CascadeSampler(tiny_model, schedule, SamplerConfig(steps=2, guidance_scale=3.0))
    out = sampler.sample(torch.tensor([1, 2]), generator=torch.Generator().manual_seed(0),
                         on_stage_end=lambda stage, x: seen.append(torch.is_inference_mode_enabled() and x.is_inference()))
    assert seen == [True] * 4
    assert not out.images.is_inference() and not any(x.is_inference() for x in out.stage_finals)
    assert out.images is out.stage_finals[-1]
    out.images.add_(1)  # the caller's to modify
    assert not schedule.timestep_tables.is_inference() and not schedule.block_noise_scale_tril.is_inference()
    assert not any(t.is_inference() for t in (*rope.rope_2d(16, tiny_model.head_dim), *rope.rope_pairs(16, tiny_model.head_dim)))

    model = build_model("Test/2", num_classes=10)
    model.load_state_dict(tiny_model.state_dict())
    pair = schedule.training_pair(torch.rand(2, 3, 32, 32) * 2 - 1, 3, torch.tensor([3, 700]))
    loss = (model(pair.x_t, pair.timestep, torch.tensor([1, 2])) - pair.target).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in model.transformer_blocks.parameters())


def test_noise_is_drawn_in_fp32_under_a_callers_autocast():
    """The block-noise correlation is a matmul: drawn inside a bf16 autocast it would be rounded to bf16."""
    sampler = CascadeSampler(build_model("Test/2", num_classes=10).eval(), CascadeSchedule(image_size=32),
                             SamplerConfig(method="dopri5"))
    plain = sampler.draw_noise(3, seeds=[1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = sampler.draw_noise(3, seeds=[1, 2, 3])
        from_generator = sampler.draw_noise(3, generator=torch.Generator().manual_seed(0))
    assert all(t.dtype == torch.float32 for t in [inside.init, *inside.transitions, *from_generator.transitions])
    assert torch.equal(plain.init, inside.init)
    assert all(torch.equal(a, b) for a, b in zip(plain.transitions, inside.transitions))
    expected = sampler.draw_noise(3, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(expected.transitions, from_generator.transitions))
