import pytest
import torch

from pixelflow.text import TextCondition, TextEncoder, load_t5, tiny_random_t5


def test_text_condition_halves_and_validation():
    cond = TextCondition(torch.arange(24.0).reshape(4, 3, 2), torch.ones(4, 3))
    assert cond.batch == 2 and torch.equal(cond.cond()[0], cond.states[2:])
    with pytest.raises(ValueError, match=r"\(2B, L, D\) with a \(2B, L\) mask"):
        TextCondition(torch.zeros(4, 3, 2), torch.ones(4, 5))
    with pytest.raises(ValueError, match="even count"):
        TextCondition(torch.zeros(3, 3, 2), torch.ones(3, 3))


@pytest.fixture
def encoder():
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    torch.manual_seed(0)
    tokenizer = ByT5Tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=24, d_kv=8, d_ff=32, num_layers=1, num_heads=3)
    return TextEncoder(T5EncoderModel(config), tokenizer, max_length=16, cache_size=3)


def test_encode_pads_masks_and_gives_distinct_states(encoder):
    states, mask = encoder.encode(["a red fox", "", "the digit 7 " * 5])
    assert encoder.width == 24 and states.shape == (3, 16, 24) and mask.shape == (3, 16)
    assert mask.sum(1).tolist() == [10, 1, 16]  # 9 bytes + EOS; the empty prompt keeps its EOS; truncated
    other, _ = encoder.encode(["a red cat"])
    assert (other[0, :10] - states[0, :10]).abs().max() > 1e-3


def test_condition_rows_are_uncond_then_cond(encoder):
    cond = encoder.condition(["a red fox", "two cats"])
    empty, empty_mask = encoder.encode([""])
    assert cond.batch == 2 and torch.equal(cond.states[:2], empty.expand(2, -1, -1))
    assert torch.equal(cond.mask[:2], empty_mask.expand(2, -1))
    assert torch.equal(cond.states[3], encoder.encode(["two cats"])[0][0])
    negative = encoder.condition(["a red fox"], negative_prompt="blurry")
    assert torch.equal(negative.states[0], encoder.encode(["blurry"])[0][0])


def test_cache_reuses_encodings_and_evicts_the_oldest(encoder):
    calls = []
    encoder.model.register_forward_hook(lambda module, args, out: calls.append(1))
    first, _ = encoder.encode(["a", "b", "a"])
    assert len(calls) == 1 and torch.equal(first[0], first[2])
    again, _ = encoder.encode(["b", "a"])
    assert len(calls) == 1 and torch.equal(again[1], first[0])
    encoder.encode(["c", "d"])  # cache_size 3: "b" (least recently used) drops out
    assert list(encoder._cache) == ["a", "c", "d"]
    encoder.encode(["b"])
    assert len(calls) == 3


def test_bad_prompts_are_clear_errors(encoder):
    with pytest.raises(TypeError, match="sequence of strings"):
        encoder.encode("a red fox")
    with pytest.raises(TypeError, match="sequence of strings"):
        encoder.encode(["a", 3])


def test_load_t5_reads_a_local_folder_and_never_downloads(encoder, tmp_path):
    encoder.model.save_pretrained(tmp_path / "t5")
    encoder.tokenizer.save_pretrained(tmp_path / "t5")
    loaded = load_t5(tmp_path / "t5", max_length=16)
    assert torch.equal(loaded.encode(["a red fox"])[0], encoder.encode(["a red fox"])[0])
    assert loaded.spec == {"source": str(tmp_path / "t5"), "max_length": 16}  # what a training checkpoint records
    with pytest.raises(FileNotFoundError, match="google/flan-t5-xl.*in a folder"):
        load_t5(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not available locally"):
        load_t5("pixelflow-tests/not-a-model")


def test_a_tiny_random_t5_is_built_again_from_its_spec():
    original = tiny_random_t5(16, 1, 2, 32, seed=3, neighbour_offsets=(-1, 1))
    arguments = original.spec["tiny_random_t5"]
    assert arguments["seed"] == 3 and arguments["neighbour_offsets"] == [-1, 1] and arguments["max_length"] == 32
    again = tiny_random_t5(**arguments)
    prompts = ["the digit four", ""]
    assert torch.equal(again.encode(prompts)[0], original.encode(prompts)[0])
    assert not torch.equal(tiny_random_t5(**{**arguments, "seed": 4}).encode(prompts)[0], original.encode(prompts)[0])


def test_device_bytes_counts_weights_and_a_full_cache(encoder):
    weights = sum(p.numel() * 4 for p in encoder.model.parameters())
    assert encoder.device_bytes() == weights + 3 * 16 * (24 * 4 + 8)  # cache_size 3, max_length 16, fp32 states
