import pytest
import torch

from pixelflow.model import build_model
from pixelflow.sampling.memory import (
    GIB,
    check_sampling_fits,
    max_fitting_batch,
    sampling_budget_bytes,
    sampling_peak_bytes,
)


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
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from estimate_memory import flan_t5_xl_bytes

    encoder = flan_t5_xl_bytes(2)
    assert 2.7 * GIB < encoder < 2.9 * GIB  # 1.22e9 weights in bf16 + 256 cached prompts
    assert max_fitting_batch(t2i_xl4, 1024, "euler", "bf16", 24e9, encoder_bytes=encoder) == 3
    assert max_fitting_batch(t2i_xl4, 1024, "euler", "bf16", 24e9) == 4
    with pytest.raises(ValueError, match=r"batch_size=4 at 1024 px \(euler, bf16\) .* use batch_size=3"):
        check_sampling_fits(t2i_xl4, 1024, 4, "euler", "bf16", 24e9, encoder_bytes=encoder)
