"""Each recipe choice trains from the command-line config, is recorded in the checkpoint and the export, and the
export samples without extra settings."""

import pytest
import torch
from omegaconf import OmegaConf

from pixelflow.checkpoint import load_pixelflow, model_kwargs
from pixelflow.model import build_model
from pixelflow.sampling.samplers import CascadeSampler, SamplerConfig
from pixelflow.training.launch import run_training
from tests.hydra_utils import compose_config, tiny_train_overrides


@pytest.mark.parametrize(("overrides", "prediction", "stages", "bottleneck"), [
    (["objective=x_pred"], "x", 4, None),
    (["objective=eps_pred", "objective.time_sampling={name: logit_normal, mean: -0.5, std: 1.0}"], "eps", 4, None),
    (["cascade.num_stages=1"], "v", 1, None),
    (["model.patch_bottleneck=4", "objective=finest_heavy"], "v", 4, 4),
])
def test_a_recipe_choice_trains_and_its_export_samples(tmp_path, overrides, prediction, stages, bottleneck):
    run = tmp_path / "run"
    run_training(compose_config("train", tiny_train_overrides(run, 2, overrides)))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["pixelflow"]["objective"]["prediction"] == prediction
    recorded = OmegaConf.load(run / "export" / "config.yaml")
    assert recorded.objective.prediction == prediction and recorded.scheduler.num_stages == stages
    for source in (run / "export" / "model.pt", run / "checkpoints" / "last.ckpt"):
        loaded = load_pixelflow(source)
        assert loaded.model.prediction == prediction and loaded.model.patch_bottleneck == bottleneck
        assert loaded.schedule.num_stages == stages
        out = CascadeSampler(loaded.model, loaded.schedule, SamplerConfig(steps=2, guidance_scale=2.0)).sample(
            torch.tensor([1, 2]), seeds=[0, 1])
        assert out.images.shape == (2, 3, 32, 32) and torch.isfinite(out.images).all() and len(out.nfe) == stages


def test_published_layout_is_unchanged_by_the_new_options():
    """null bottleneck and v-prediction keep the released state_dict keys and config keys."""
    model = build_model("Test/2", num_classes=10)
    assert "patch_embed.reduce.weight" not in model.state_dict()
    assert not {"prediction", "patch_bottleneck"} & set(model_kwargs(model))
    low_rank = build_model("Test/2", num_classes=10, patch_bottleneck=3)
    assert low_rank.state_dict()["patch_embed.reduce.weight"].shape == (3, 3, 2, 2)
    with pytest.raises(ValueError, match=r"patch_bottleneck must be null or a rank in \[1, hidden size 32\)"):
        build_model("Test/2", num_classes=10, patch_bottleneck=32)


def test_per_stage_lists_of_the_wrong_length_stop_the_run_at_start_up(tmp_path):
    with pytest.raises(ValueError, match="stage_weights has 4 entries but the cascade has 1 stage"):
        run_training(compose_config("train", tiny_train_overrides(tmp_path / "run", 2, [
            "cascade.num_stages=1", "objective.stage_weights=[1,1,1,2]"])))
