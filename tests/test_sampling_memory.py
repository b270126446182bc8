import pytest
import torch

from pixelflow.model import build_model
from pixelflow.sampling_memory import (
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
