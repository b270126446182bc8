import pytest
import torch

from pixelflow.cascade import CascadeSchedule
from pixelflow.model import build_model
from pixelflow.precision import sampling_precision
from pixelflow.sampling.memory import (
    GIB,
    check_sampling_fits,
    max_fitting_batch,
    modulation_bytes,
    sampling_budget_bytes,
    sampling_peak_bytes,
)
from pixelflow.sampling.samplers import CascadeNoise, CascadeSampler, SamplerConfig
from tests.live_bytes import LiveBytes


@pytest.fixture(scope="module")
def xl4():
    with torch.device("meta"):
        return build_model("XL/4", num_classes=1000)


def test_peak_grows_with_batch_and_fp32_needs_more(xl4):
    bf16 = [sampling_peak_bytes(xl4, 256, b, "dopri5", "bf16") for b in (1, 16, 100)]
    assert bf16 == sorted(bf16) and bf16[0] > 4 * 676e6  # at least the fp32 weights
    assert sampling_peak_bytes(xl4, 256, 16, "dopri5", "fp32") > bf16[1]


def test_published_batch_fits_24gb_and_the_old_default_does_not(xl4):
    check_sampling_fits(xl4, 256, 16, "dopri5", "bf16", 24e9)
    with pytest.raises(ValueError, match=r"batch_size=100 .* needs an estimated .* GiB .* use batch_size=\d+"):
        check_sampling_fits(xl4, 256, 100, "dopri5", "bf16", 24e9)


def test_max_fitting_batch_is_the_boundary(xl4):
    best = max_fitting_batch(xl4, 256, "dopri5", "bf16", 24e9)
    assert sampling_budget_bytes(sampling_peak_bytes(xl4, 256, best, "dopri5", "bf16")) <= 24e9
    assert sampling_budget_bytes(sampling_peak_bytes(xl4, 256, best + 1, "dopri5", "bf16")) > 24e9
    assert max_fitting_batch(xl4, 256, "dopri5", "bf16", 1 * GIB) == 0


def test_unresolved_precision_is_refused(xl4):
    with pytest.raises(ValueError, match="resolved"):
        sampling_peak_bytes(xl4, 256, 1, "euler", "auto")


@pytest.fixture(scope="module")
def t2i_xl4():
    with torch.device("meta"):
        return build_model("T2I-XL/4")


def test_text_adds_its_states_cross_attention_copies_and_the_encoder(t2i_xl4):
    base = sampling_peak_bytes(t2i_xl4, 1024, 2, "euler", "bf16", text_length=0)
    with_text = sampling_peak_bytes(t2i_xl4, 1024, 2, "euler", "bf16")  # the published 512 tokens
    assert with_text - base == pytest.approx(2 * 2 * 512 * (4 * 2048 + 8))  # [uncond; cond] fp32 states + int64 masks
    assert sampling_peak_bytes(t2i_xl4, 1024, 2, "euler", "bf16", encoder_bytes=3e9) == pytest.approx(with_text + 3e9)
    # bf16 autocast caches a copy of every block's cross-attention weights (2 bytes each); fp32 does not
    with torch.device("meta"):
        no_text = build_model("T2I-XL/4", cross_attention_dim=None)  # the same network without cross-attention
    gap = {p: sampling_peak_bytes(t2i_xl4, 1024, 1, "euler", p) - sampling_peak_bytes(no_text, 1024, 1, "euler", p)
           for p in ("fp32", "bf16")}
    assert gap["bf16"] - gap["fp32"] == pytest.approx(2.0 * 28 * (2 * 1152**2 + 2 * 2048 * 1152))


def test_documented_1024px_batch_for_24gb(t2i_xl4):
    """docs/sampling.md: T2I-XL/4 at 1024 px, bf16, Euler, Flan-T5-XL (bf16, full prompt cache) on the same card."""
    from pixelflow.training.memory_estimate import flan_t5_xl_bytes

    encoder = flan_t5_xl_bytes(2)
    assert 2.7 * GIB < encoder < 2.9 * GIB  # 1.22e9 weights in bf16 + 256 cached prompts
    assert max_fitting_batch(t2i_xl4, 1024, "euler", "bf16", 24e9, encoder_bytes=encoder) == 3
    assert max_fitting_batch(t2i_xl4, 1024, "euler", "bf16", 24e9) == 4
    with pytest.raises(ValueError, match=r"batch_size=4 at 1024 px \(euler, bf16\) .* use batch_size=3"):
        check_sampling_fits(t2i_xl4, 1024, 4, "euler", "bf16", 24e9, encoder_bytes=encoder)


# --------------------------------------------------------------------------- the adaLN vectors of a stage

def test_fixed_grid_methods_hold_a_stage_of_modulations_and_dopri5_one_call(xl4):
    """Each added Euler step adds its adaLN vectors for the 2B guided rows (about 1 GiB at batch 16 and 30 steps);
    Dopri5 computes them per call, so its steps do not enter."""
    rows, added = 2 * 16, 28

    def peak(method: str, steps) -> float:
        return sampling_peak_bytes(xl4, 256, 16, method, "bf16", steps=steps)

    grown = peak("euler", 30) - peak("euler", 2)
    assert grown == pytest.approx(modulation_bytes(xl4, rows, added))
    assert modulation_bytes(xl4, rows, 30) == 30 * rows * 1152 * (32 * 28 + 12)  # 8D per block + 3D for the head, fp32
    assert 0.9 * GIB < modulation_bytes(xl4, rows, 30) < 1.0 * GIB
    assert peak("dopri5", 30) == peak("dopri5", 2)
    # A stage frees its vectors before the next computes its own: many steps at the small first stage cost nothing.
    assert peak("euler", [30, 2, 2, 2]) == peak("euler", 2) and peak("euler", [2, 2, 2, 30]) == peak("euler", 30)
    # The refusal counts them: a device that fits batch 16 at 2 steps a stage does not at 30.
    device = sampling_budget_bytes(peak("euler", 2))
    check_sampling_fits(xl4, 256, 16, "euler", "bf16", device, steps=2)
    best = max_fitting_batch(xl4, 256, "euler", "bf16", device, steps=30)
    assert 0 < best < 16
    with pytest.raises(ValueError, match=rf"batch_size=16 .* use batch_size={best}$"):
        check_sampling_fits(xl4, 256, 16, "euler", "bf16", device, steps=30)


@pytest.mark.parametrize("steps, match", [(0, "positive"), ([], "positive"), ([2, 0], "positive"), ([2] * 10, "not divisible")])
def test_bad_steps_are_refused(xl4, steps, match):
    with pytest.raises(ValueError, match=match):
        sampling_peak_bytes(xl4, 256, 1, "euler", "bf16", steps=steps)


def _measured_peak(net, steps, precision: str) -> int:
    schedule = CascadeSchedule(image_size=32)
    labels = torch.arange(2)
    noise = CascadeNoise.draw(schedule, 2, 3, False, torch.Generator().manual_seed(0))
    tracker = LiveBytes(*net.parameters(), labels, noise.init, *noise.transitions)
    with tracker, sampling_precision(precision, "cpu"):
        CascadeSampler(net, schedule, SamplerConfig(steps=steps, guidance_scale=4.0)).sample(labels, noise=noise)
    return tracker.peak


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_predicted_growth_with_steps_matches_a_measured_run(precision):
    """XL/4's width (16 heads of 72) at depth 1, 32 px, batch 2 with CFG: the measured peak grows from 2 to 30 Euler
    steps a stage by what the model predicts, within 5%; 30 steps at the first stage alone add nothing measurable."""
    torch.manual_seed(0)
    net = build_model("XL/4", num_classes=1000, depth=1).eval()
    with torch.no_grad():
        for p in net.parameters():  # the published init zeroes the output: random weights exercise the sampler
            p.normal_(0, 0.02)
    base = _measured_peak(net, 2, precision)
    grown = _measured_peak(net, 30, precision) - base
    predicted = (sampling_peak_bytes(net, 32, 2, "euler", precision, steps=30)
                 - sampling_peak_bytes(net, 32, 2, "euler", precision, steps=2))
    assert predicted == modulation_bytes(net, 4, 28) and grown == pytest.approx(predicted, rel=0.05)
    first_stage_only = _measured_peak(net, [30, 2, 2, 2], precision) - base
    assert sampling_peak_bytes(net, 32, 2, "euler", precision, steps=[30, 2, 2, 2]) == sampling_peak_bytes(
        net, 32, 2, "euler", precision, steps=2)
    assert abs(first_stage_only) < 0.05 * predicted
