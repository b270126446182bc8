"""The fused CPU inference kernel equals the plain form, is taken where it applies and nowhere else."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pixelflow.fused as fused
from pixelflow.fused import cpu_inference, linear_gelu_tanh, rms_norm
from pixelflow.model import build_model

needs_onednn = pytest.mark.skipif(fused._LINEAR_POINTWISE is None, reason="this PyTorch has no oneDNN linear")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls of the fused oneDNN kernel."""
    calls = []
    kernel = fused._LINEAR_POINTWISE

    def counted(*args):
        calls.append(args[3])
        return kernel(*args)

    monkeypatch.setattr(fused, "_LINEAR_POINTWISE", counted)
    return calls


def plain(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    return F.gelu(linear(x), approximate="tanh")


@needs_onednn
@pytest.mark.parametrize("shape", [(3, 16), (4, 9, 16), (2, 5, 32)])
def test_linear_gelu_equals_plain_form(shape, kernel_calls):
    torch.manual_seed(0)
    linear = nn.Linear(16, 48)
    x = torch.randn(shape) * 3
    if shape[-1] == 32:
        x = x[..., ::2]  # a strided input
    with torch.no_grad():
        out = linear_gelu_tanh(x, linear)
        ref = plain(x, linear)
    assert kernel_calls == ["gelu"]
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_plain_form_where_the_kernel_does_not_apply(kernel_calls):
    torch.manual_seed(0)
    linear = nn.Linear(16, 48)
    x = torch.randn(4, 16)
    out = linear_gelu_tanh(x, linear)  # autograd on: training keeps ATen's kernel and its backward
    out.sum().backward()
    assert linear.weight.grad is not None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear_gelu_tanh(x, linear).dtype == torch.bfloat16
    with torch.no_grad():
        assert linear_gelu_tanh(x.double(), linear.double()).dtype == torch.float64
    assert kernel_calls == []


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_rms_norm_equals_aten_on_the_inference_path(overwrite, weighted, monkeypatch):
    """One vector_norm read for the sums of squares, the same values as ATen's rms_norm; in place with overwrite."""
    reads = []
    vector_norm = torch.linalg.vector_norm
    monkeypatch.setattr(torch.linalg, "vector_norm", lambda *a, **k: reads.append(1) or vector_norm(*a, **k))
    torch.manual_seed(0)
    x, weight = torch.randn(4, 9, 32) * 3, (torch.rand(32) + 0.5 if weighted else None)
    ref = F.rms_norm(x, (32,), weight, 1e-6)
    given = x.clone()
    with torch.no_grad():
        out = rms_norm(given, weight, 1e-6, overwrite=overwrite)
    assert reads == [1]
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert (out is given) == overwrite
    if not overwrite:
        assert torch.equal(given, x)


def test_rms_norm_with_autograd_is_aten_and_leaves_its_input():
    torch.manual_seed(0)
    x, weight = torch.randn(4, 32, requires_grad=True), torch.rand(32, requires_grad=True)
    out = rms_norm(x, weight, 1e-6, overwrite=True)
    assert out is not x
    torch.testing.assert_close(out, F.rms_norm(x, (32,), weight, 1e-6), rtol=0, atol=0)
    out.sum().backward()
    assert x.grad is not None and weight.grad is not None


def test_cpu_inference_predicate():
    x = torch.zeros(2)
    assert not cpu_inference(x)
    with torch.no_grad():
        assert cpu_inference(x)
        assert not cpu_inference(x.bfloat16())
        assert not cpu_inference(torch.zeros(2, device="meta"))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not cpu_inference(x)


@needs_onednn
@pytest.mark.parametrize("name", ["Test/2", "T2I-Test/2"])
def test_model_inference_equals_training_form(name, kernel_calls):
    """A forward without autograd (fused) gives the velocity a forward with autograd (plain) gives."""
    torch.manual_seed(0)
    model = build_model(name).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # non-trivial: the published init zeroes the output
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([10.0, 500.0, 990.0])
    kwargs = ({"class_labels": torch.tensor([0, 5, 1000])} if model.num_classes else
              {"text_states": torch.randn(3, 12, 24), "text_mask": torch.tensor([[1] * 12, [1] * 5 + [0] * 7, [1] + [0] * 11])})
    ref = model(x, t, **kwargs).detach()
    assert kernel_calls == []
    with torch.no_grad():
        out = model(x, t, **kwargs)
    assert kernel_calls == ["gelu"] * len(model.transformer_blocks)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
