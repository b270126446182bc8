"""The CPU inference kernels hold to the layers' forwards: op by op, layer by layer and for whole forwards; where
the switch picks them and nowhere else; and what they overwrite (never a forward's input or a kept intermediate)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pixelflow import cpu_inference, layers
from pixelflow.layers import Attention, PatchEmbed, TransformerBlock
from pixelflow.model import build_model
from pixelflow.packing import Packing
from pixelflow.rope import RopeTables, apply_rope, rope_pairs

needs_onednn = pytest.mark.skipif(cpu_inference._LINEAR_POINTWISE is None, reason="this PyTorch has no oneDNN linear")
MODELS = ["Test/2", "T2I-Test/2"]


@pytest.fixture
def kernel_calls(monkeypatch):
    """The post-op of each call of the oneDNN linear kernel ("none" for a plain projection)."""
    calls = []
    kernel = cpu_inference._LINEAR_POINTWISE

    def counted(*args):
        calls.append(args[3])
        return kernel(*args)

    monkeypatch.setattr(cpu_inference, "_LINEAR_POINTWISE", counted)
    return calls


@pytest.fixture
def plain(monkeypatch):
    """Runs a call with the switch off: the layers' forwards, under the same grad mode and dtype."""
    def run(call):
        with monkeypatch.context() as patch:
            patch.setattr(cpu_inference, "applies", lambda x: False)
            return call()
    return run


def random_model(name: str) -> nn.Module:
    """Non-trivial weights: the published init zeroes the adaLN and output layers."""
    torch.manual_seed(0)
    model = build_model(name).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def conditions(model: nn.Module, rows: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    if model.num_classes:
        return {"class_labels": torch.arange(rows) % (model.num_classes + 1)}  # the null class included
    mask = (torch.arange(12) < torch.randint(1, 13, (rows, 1), generator=g)).float()
    return {"text_states": torch.randn(rows, 12, 24, generator=g), "text_mask": mask}


def test_the_switch_holds_for_float32_cpu_inference_only(monkeypatch):
    x = torch.zeros(2)
    assert not cpu_inference.applies(x)  # autograd on
    with torch.no_grad():
        assert cpu_inference.applies(x)
        assert not cpu_inference.applies(x.bfloat16()) and not cpu_inference.applies(x.double())
        assert not cpu_inference.applies(torch.zeros(2, device="meta"))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not cpu_inference.applies(x)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert not cpu_inference.applies(x)


def test_a_forward_decides_once(monkeypatch):
    model, decisions = random_model("Test/2"), []
    applies = cpu_inference.applies
    monkeypatch.setattr(cpu_inference, "applies", lambda x: decisions.append(1) or applies(x))
    x, t, kw = torch.randn(3, 3, 8, 8), torch.tensor([1.0, 2.0, 3.0]), conditions(model, 3)
    with torch.no_grad():
        model(x, t, **kw)
        model(x, t, return_intermediates=True, **kw)
        model([x[:2], torch.randn(1, 3, 4, 4)], [t[:2], t[2:]], **kw)
    assert decisions == [1, 1, 1]


@needs_onednn
@pytest.mark.parametrize("name", MODELS)
def test_the_kernels_run_where_the_switch_holds_and_nowhere_else(name, kernel_calls, monkeypatch):
    model = random_model(name)
    x, t, kw = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 900.0]), conditions(model, 2)
    with torch.no_grad():
        model(x, t, **kw)
    projections = ["none"] * 4 * (2 if model.cross_attention_dim else 1)  # q, k, v, out of each attention
    per_block = [*projections, "gelu", "none"]  # then the MLP: linear + GELU, linear
    assert kernel_calls == per_block * len(model.transformer_blocks)

    def refuse(*args, **kwargs):
        raise AssertionError("a CPU inference kernel ran off the switch")

    for kernel in ("patch_embed", "block", "final_norm"):
        monkeypatch.setattr(cpu_inference, kernel, refuse)
    model(x, t, **kw).sum().backward()  # autograd: training's forwards and their backward
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x, t, **kw).dtype == torch.bfloat16
    assert kernel_calls == per_block * len(model.transformer_blocks)


def test_layer_norm_is_the_parameter_free_one_bit_for_bit():
    torch.manual_seed(0)
    for shape in [(2, 1, 128), (3, 7, 16), (4, 64, 72)]:
        x = torch.randn(shape) * 3 + 1
        assert torch.equal(cpu_inference.layer_norm(x), layers.layer_norm(x))


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_rms_norm_is_atens_from_one_read(in_place, weighted, monkeypatch):
    reads = []
    vector_norm = torch.linalg.vector_norm
    monkeypatch.setattr(torch.linalg, "vector_norm", lambda *a, **k: reads.append(1) or vector_norm(*a, **k))
    torch.manual_seed(0)
    x, weight = torch.randn(4, 9, 32) * 3, (torch.rand(32) + 0.5 if weighted else None)
    given = x.clone()
    with torch.no_grad():
        out = cpu_inference.rms_norm(given, weight, 1e-6, in_place=in_place)
    assert reads == [1]
    torch.testing.assert_close(out, F.rms_norm(x, (32,), weight, 1e-6), rtol=1e-6, atol=1e-6)
    assert (out is given) == in_place
    if not in_place:
        assert torch.equal(given, x)


def test_modulate_and_rotate_write_the_plain_values_into_their_input():
    torch.manual_seed(0)
    normed, shift, factor = torch.randn(2, 16, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    expected = layers.modulate(normed, shift, factor)
    given = normed.clone()
    assert cpu_inference.modulate_(given, shift, factor) is given and torch.equal(given, expected)

    rope, x = rope_pairs(grid=4, head_dim=8), torch.randn(3, 16, 2, 8)
    expected = apply_rope(x, rope)
    given = x.clone()
    assert cpu_inference.rotate_(given, rope) is given and torch.equal(given, expected)
    odd = torch.randn(1, 3 * 16 * 2 * 8 + 1)[:, 1:].view(3, 16, 2, 8)  # pairs not aligned in memory
    before = odd.clone()
    out = cpu_inference.rotate_(odd, rope)  # a rotated copy, the input untouched
    assert out is not odd and torch.equal(odd, before) and torch.equal(out, apply_rope(before, rope))


@needs_onednn
@pytest.mark.parametrize("shape", [(3, 16), (4, 9, 16), (2, 5, 32)])
def test_linear_gelu_is_the_two_layers(shape, kernel_calls):
    torch.manual_seed(0)
    linear = nn.Linear(16, 48)
    x = torch.randn(shape) * 3
    if shape[-1] == 32:
        x = x[..., ::2]  # a strided input
    with torch.no_grad():
        out = cpu_inference.linear_gelu_tanh(x, linear)
        ref = F.gelu(linear(x), approximate="tanh")
    assert kernel_calls == ["gelu"] and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 16), (4, 9, 16), (2, 5, 32)])
def test_linear_is_the_layer(shape, bias, kernel_calls):
    torch.manual_seed(0)
    layer = nn.Linear(16, 24, bias=bias)
    x = torch.randn(shape)
    if shape[-1] == 32:
        x = x[..., ::2]  # a strided input
    with torch.no_grad():
        out, ref = cpu_inference.linear(x, layer), layer(x)
    assert kernel_calls == ["none"] and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bottleneck", [None, 5])
@pytest.mark.parametrize("patch", [2, 4])
def test_patch_matmul_is_the_convolution(patch, bottleneck):
    torch.manual_seed(0)
    embed, x = PatchEmbed(patch_size=patch, in_channels=3, hidden=24, bottleneck=bottleneck), torch.randn(2, 3, 16, 12)
    with torch.no_grad():
        out = cpu_inference.patch_embed(embed, x)
    assert out.shape == (2, 16 * 12 // patch**2, 24)
    torch.testing.assert_close(out, embed(x), rtol=1e-6, atol=1e-6)


def _layer_inputs(packed: bool, text: bool):
    """Stream, RoPE tables, text states and bias, packing for a 2-head width-32 layer: two samples of 16 tokens, or
    a packed row of two segments (one 1-token sample, two 16-token samples)."""
    g = torch.Generator().manual_seed(2)
    if packed:
        packing = Packing.of((1, 2), (1, 16))
        rope = RopeTables(*(torch.cat([one, grid.repeat(2, 1)]) for one, grid in zip(rope_pairs(1, 16), rope_pairs(4, 16))))
        x, rows = torch.randn(1, 33, 32, generator=g), 3
    else:
        packing, rope, x, rows = None, rope_pairs(4, 16), torch.randn(2, 16, 32, generator=g), 2
    states = torch.randn(rows, 5, 24, generator=g) if text else None
    bias = ((torch.arange(5) >= torch.tensor([[5], [2], [3]][:rows])) * -10000.0)[:, None, None, :] if text else None
    return x, rope, states, bias, packing


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("cross", [False, True])
def test_attention_is_the_module_forward(cross, packed):
    torch.manual_seed(0)
    attn = Attention(32, 2, 16, context_dim=24 if cross else None)
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    x, rope, states, bias, packing = _layer_inputs(packed, cross)
    given = x.clone()
    with torch.no_grad():
        out = cpu_inference.attention(attn, x, rope, states, bias, packing)
        ref = attn(x, rope, states, bias, packing)
    assert torch.equal(x, given)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("text", [False, True])
@pytest.mark.parametrize("own_stream", [False, True])
def test_block_is_the_module_forward_and_writes_its_stream_only_when_owned(own_stream, text, packed):
    torch.manual_seed(0)
    block = TransformerBlock(32, 2, 16, cross_attention_dim=24 if text else None)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x, rope, states, bias, packing = _layer_inputs(packed, text)
    c = torch.randn(3 if packed else 2, 32)
    given = x.clone()
    with torch.no_grad():
        ref = block(x, c, rope, states, bias, packing)
        modulation = block.factors(c, packing)
        out = cpu_inference.block(block, x, None, rope, states, bias, packing, modulation, own_stream=own_stream)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(x, given) != own_stream
    assert (out.data_ptr() == x.data_ptr()) == (own_stream and not text)  # the text residual makes a new stream


@pytest.mark.parametrize("name", MODELS)
def test_whole_forwards_are_the_plain_forwards(name, plain):
    """Single-stage, with intermediates, with modulations computed ahead, and packed: the kernels' forward against
    the layers' forward under no_grad, and against the autograd forward."""
    model = random_model(name)
    x, t, kw = torch.randn(3, 3, 16, 16), torch.tensor([10.0, 500.0, 990.0]), conditions(model, 3)
    xs = [torch.randn(b, 3, s, s) for b, s in ((3, 2), (1, 8), (2, 16))]
    ts = [torch.rand(b) * 999 for b in (3, 1, 2)]
    packed_kw = conditions(model, 6, seed=3)
    with torch.no_grad():
        (modulation,) = model.modulations(torch.tensor([300.0]), 8, **kw)

    def forwards():
        out, inter = model(x, t, return_intermediates=True, **kw)
        return [model(x, t, **kw), out, inter["tokens_in"], *inter["blocks"],
                model(x, None, modulation=modulation, **kw), *model(xs, ts, **packed_kw)]

    with torch.no_grad():
        fast, reference = forwards(), plain(forwards)
    autograd = [out.detach() for out in forwards()]
    assert fast[0].abs().max() > 0.1
    assert torch.equal(fast[0], fast[1])
    for ours, plain_form, training_form in zip(fast, reference, autograd, strict=True):
        torch.testing.assert_close(ours, plain_form, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours, training_form, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_a_forward_never_writes_its_inputs(name):
    model = random_model(name)
    x, t, kw = torch.randn(2, 3, 16, 16), torch.tensor([5.0, 500.0]), conditions(model, 2)
    xs, ts = [torch.randn(1, 3, 4, 4), torch.randn(1, 3, 16, 16)], [torch.tensor([3.0]), torch.tensor([700.0])]
    inputs = [x, t, *xs, *ts, *kw.values()]
    before = [i.clone() for i in inputs]
    with torch.no_grad():
        (modulation,) = model.modulations(torch.tensor([300.0]), 8, **kw)
        vectors = [v.clone() for block in modulation.blocks for v in block] + [v.clone() for v in modulation.head]
        model(x, t, **kw)
        model(x, t, return_intermediates=True, **kw)
        model(x, None, modulation=modulation, **kw)
        model(xs, ts, **kw)
    assert all(torch.equal(a, b) for a, b in zip(inputs, before, strict=True))
    after = [v for block in modulation.blocks for v in block] + list(modulation.head)
    assert all(torch.equal(a, b) for a, b in zip(after, vectors, strict=True))


def test_kept_intermediates_are_each_blocks_output():
    """With return_intermediates every kept tensor is still its block's output: recomputed block by block from the
    one kept before it, bit for bit."""
    model = random_model("Test/2")
    x, t, kw = torch.randn(2, 3, 16, 16), torch.tensor([5.0, 500.0]), conditions(model, 2)
    with torch.no_grad():
        out, inter = model(x, t, return_intermediates=True, **kw)
        assert torch.equal(model(x, t, **kw), out)
        assert torch.equal(inter["tokens_in"], cpu_inference.patch_embed(model.patch_embed, x))
        rope = rope_pairs(8, model.head_dim, model.rope_theta)
        previous = inter["tokens_in"]
        for block, kept in zip(model.transformer_blocks, inter["blocks"], strict=True):
            assert torch.equal(cpu_inference.block(block, previous.clone(), inter["cond"], rope, own_stream=True), kept)
            previous = kept
