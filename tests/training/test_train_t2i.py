"""Text-to-image training: caption dropout, the frozen text encoder, exact resume, the export's text_encoder/."""

import pytest
import torch

from pixelflow.cascade import CascadeSchedule
from pixelflow.checkpoint import load_pixelflow
from pixelflow.model import build_model
from pixelflow.sampling.prompts import load_text_encoder
from pixelflow.text import load_t5, tiny_random_t5
from pixelflow.training.launch import build_training, run_training
from pixelflow.training.objective import cascade_loss, drop_captions
from tests.hydra_utils import compose_config, tiny_train_overrides

TINY_T5 = ["text_encoder.d_model=16", "text_encoder.num_heads=2", "text_encoder.d_ff=32", "text_encoder.num_layers=1",
           "callbacks.sample_grid.prompts=[a handwritten seven,the digit 1]"]


def t2i_overrides(run_dir, steps, extra=()):
    return tiny_train_overrides(run_dir, steps, ["experiment=mnist_t2i_quickstart", *TINY_T5, *extra])


def test_tiny_random_t5_is_fixed_by_its_seed_and_tells_prompts_apart():
    a, b, c = tiny_random_t5(d_model=16, num_heads=2, seed=0), tiny_random_t5(d_model=16, num_heads=2, seed=0), \
        tiny_random_t5(d_model=16, num_heads=2, seed=1)
    states, mask = a.encode(["a handwritten seven", "a handwritten eight"])
    assert states.shape == (2, 32, 16) and mask[0].sum() == len("a handwritten seven") + 1  # bytes + end token
    assert not torch.allclose(states[0], states[1])
    assert torch.equal(states, b.encode(["a handwritten seven", "a handwritten eight"])[0])
    assert not torch.equal(states, c.encode(["a handwritten seven", "a handwritten eight"])[0])
    with pytest.raises(ValueError, match="divisible"):
        tiny_random_t5(d_model=10, num_heads=4)


def test_neighbour_attention_makes_a_word_s_states_independent_of_the_rest_of_the_prompt():
    """'v' of "seven" sees 4 bytes each side after 2 layers: the same in both prompts, so the same state, which the
    random (near uniform) attention would mix with the whole prompt."""
    def v_state(encoder, prompt):
        return encoder.encode([prompt])[0][0, prompt.index("seven") + 2]

    for offsets, close in (((-2, -1, 1, 2), True), (None, False)):
        encoder = tiny_random_t5(neighbour_offsets=offsets)
        a, b = v_state(encoder, "one seven"), v_state(encoder, "a big, bold one seven")
        assert (torch.cosine_similarity(a, b, dim=0) > 0.999) == close


def test_caption_dropout_uses_the_empty_prompt_and_the_seeded_generator():
    model, schedule = build_model("T2I-Test/2", cross_attention_dim=16), CascadeSchedule(image_size=32, num_stages=4)
    encoder, seen = tiny_random_t5(d_model=16, num_heads=2), []

    def encode(captions):
        seen.append(list(captions))
        return encoder.encode(captions)

    images, captions = torch.randn(16, 3, 32, 32), [f"the digit {i % 10}" for i in range(16)]
    losses = [cascade_loss(model, schedule, images, captions, torch.Generator().manual_seed(s), 0.5, encode)[0]
              for s in (0, 0, 1)]
    assert seen[0] == seen[1] != seen[2] and torch.equal(losses[0], losses[1])
    dropped = [i for i, c in enumerate(seen[0]) if c == ""]
    assert 0 < len(dropped) < 16 and all(seen[0][i] == captions[i] for i in range(16) if i not in dropped)
    cascade_loss(model, schedule, images, captions, torch.Generator().manual_seed(0), 0.0, encode)
    assert seen[-1] == captions  # no dropout
    assert drop_captions(["a", "b"], torch.tensor([True, False])) == ["", "b"]
    with pytest.raises(TypeError, match="caption strings"):
        cascade_loss(model, schedule, images, torch.arange(16), encode_text=encode)
    with pytest.raises(TypeError, match="class labels"):
        cascade_loss(build_model("Test/2", num_classes=10), schedule, images, captions)


def test_t2i_run_trains_only_the_model_and_exports_the_text_encoder(tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_config("train", t2i_overrides(run_dir, 2))
    trainer, module, _ = build_training(cfg)
    assert module.model.cross_attention_dim == 16 and module.model.num_classes == 0
    optimized = {id(p) for g in module.configure_optimizers().param_groups for p in g["params"]}
    assert optimized == {id(p) for p in module.model.parameters()}
    assert not any(p.requires_grad for p in module.text_encoder.model.parameters())
    run_training(cfg)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert all(k.startswith(("model.", "emas.")) for k in ckpt["state_dict"])  # no text encoder weights
    export = run_dir / "export"
    loaded = load_pixelflow(export / "model.pt")
    assert loaded.text_encoder == {"source": "text_encoder", "max_length": 32} and loaded.class_names is None
    assert loaded.model.cross_attention_dim == 16
    reloaded, original = load_t5(export / "text_encoder", max_length=32), tiny_random_t5(16, 1, 2, 32)
    prompts = ["a scan of the digit seven", ""]
    assert torch.equal(reloaded.encode(prompts)[0], original.encode(prompts)[0])
    from_ckpt = load_pixelflow(run_dir / "checkpoints" / "last.ckpt")  # records how to build the encoder again
    assert from_ckpt.text_encoder == {"tiny_random_t5": original.spec["tiny_random_t5"]}
    assert torch.equal(load_text_encoder(from_ckpt).encode(prompts)[0], original.encode(prompts)[0])
    assert (run_dir / "samples" / "final.png").is_file()  # the prompt grid


def test_t2i_resume_is_exact(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    keep = ["module.label_dropout=0.5", "module.lr_decay_fraction=0"]  # stopping at max_steps=2 would move a decay
    run_training(compose_config("train", t2i_overrides(straight, 4, keep)))
    run_training(compose_config("train", t2i_overrides(resumed, 4, [*keep, "trainer.max_steps=2"])))
    run_training(compose_config("train", t2i_overrides(resumed, 4, keep)))
    a = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 4
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key


@pytest.mark.parametrize(("extra", "message"), [(["text_encoder=null"], "no text_encoder is configured"),
                                                (["data=mnist"], "yields class labels, not captions")])
def test_text_encoder_and_data_must_agree(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        build_training(compose_config("train", t2i_overrides(tmp_path / "run", 2, extra)))


def test_evaluation_callback_refuses_a_t2i_model(tmp_path):
    overrides = [o for o in t2i_overrides(tmp_path / "run", 2) if o != "~callbacks/evaluate"]
    cfg = compose_config("train", [*overrides, "callbacks/evaluate=mnist_classifier"])
    trainer, module, _ = build_training(cfg)
    callback = next(c for c in trainer.callbacks if type(c).__name__ == "EvaluateSamples")
    with pytest.raises(ValueError, match="cannot drive a text-to-image model"):
        callback.on_fit_start(trainer, module)
