"""Start-up checks (global batch invariant, group/experiment conflicts) and config composition of the recipes."""

import itertools
import logging

import lightning as L
import pytest
from hydra.utils import get_class, instantiate

from pixelflow.training.launch import build_training, check_global_batch, group_entries
from tests.hydra_utils import CONF, compose_config
from tests.imagefolder import make_image_folder


def compose_train(*overrides: str):
    return compose_config("train", list(overrides))


def test_24gb_recipe_is_the_paper_batch_on_one_gpu():
    cfg = compose_train("experiment=imagenet256_xl4_24gb")
    micro, accumulation = cfg.data.batch_size, cfg.trainer.accumulate_grad_batches
    assert cfg.trainer.devices == 1 and cfg.trainer.num_nodes == 1
    assert micro * accumulation * 1 == cfg.global_batch_size == 256
    assert check_global_batch(cfg.global_batch_size, micro, accumulation, 1) == 256
    assert cfg.model.name == "XL/4" and cfg.model.gradient_checkpointing is True
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.gradient_clip_val == 1.0
    assert cfg.module.lr == 1e-4 and cfg.module.weight_decay == 0.0 and list(cfg.module.ema_decays) == [0.9999]
    assert cfg.run_name == "imagenet256_xl4_24gb"


def test_mismatching_batch_fails_at_start_up_with_a_clear_error(tmp_path):
    folder = make_image_folder(tmp_path / "train")
    cheap = ["experiment=imagenet256_xl4_24gb", "model.name=Test/2", f"data.root={folder}", "data.num_workers=0",
             "trainer.accelerator=cpu", "logger=none", f"paths.root_dir={tmp_path}"]
    trainer, module, data = build_training(compose_train(*cheap))  # the recipe itself passes the check
    assert trainer.accumulate_grad_batches * data.batch_size == 256 and module.model.gradient_checkpointing
    with pytest.raises(ValueError, match=r"global_batch_size=256 but data.batch_size \(16\) x trainer.accumulate_grad_batches "
                                         r"\(8\) x world size \(1\) = 128"):
        build_training(compose_train(*cheap, "data.batch_size=16"))
    with pytest.raises(ValueError, match=r"world size \(1\) = 512\. Change one of them, e\.g\. trainer\.accumulate_grad_batches=8"):
        build_training(compose_train(*cheap, "trainer.accumulate_grad_batches=16"))


def test_multi_gpu_layouts_keep_the_invariant():
    cfg = compose_train("experiment=imagenet256_xl4")
    assert cfg.data.batch_size * cfg.trainer.accumulate_grad_batches * cfg.trainer.devices * cfg.trainer.num_nodes == 256
    assert not cfg.model.gradient_checkpointing and cfg.data.batch_size % 4 == 0  # whole stage mixes per micro-batch
    with pytest.raises(ValueError, match=r"world size \(16\) = 512\. .*accumulate_grad_batches=1"):
        check_global_batch(256, cfg.data.batch_size, cfg.trainer.accumulate_grad_batches, 16)  # two nodes: no accumulation


@pytest.mark.parametrize("data, target", [("imagenet_shards", "ShardDataModule"), ("imagenet_adm", "ImageNetDataModule")])
def test_data_variants_and_fsdp_compose_with_the_recipes(data, target):
    cfg = compose_train("experiment=imagenet256_xl4_24gb", f"data={data}", "trainer=fsdp")
    assert cfg.data._target_.endswith(target) and cfg.data.batch_size * cfg.trainer.accumulate_grad_batches == 256
    strategy = instantiate(cfg.trainer.strategy)
    assert type(strategy).__name__ == "FSDPStrategy" and strategy.kwargs["use_orig_params"] is True


EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
OPTIONS = {group: sorted(p.stem for p in (CONF / group).glob("*.yaml")) for group in ("callbacks", "logger", "trainer")}


@pytest.mark.slow  # 18 compositions each, ~3 s
@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("callbacks", OPTIONS["callbacks"])
def test_every_experiment_composes_with_every_callbacks_logger_trainer_choice(experiment, callbacks, tmp_path):
    for logger, trainer in itertools.product(OPTIONS["logger"], OPTIONS["trainer"]):
        cfg = compose_train(f"experiment={experiment}", f"callbacks={callbacks}", f"logger={logger}",
                            f"trainer={trainer}", f"paths.root_dir={tmp_path}")
        assert get_class(cfg.trainer._target_) is L.Trainer
        for name, conf in group_entries(cfg, "logger").items():
            assert isinstance(get_class(conf._target_), type), name
        built = [instantiate(conf) for conf in group_entries(cfg, "callbacks").values()]
        assert all(isinstance(c, L.Callback) for c in built)
        assert len(built) == (0 if callbacks == "none" else len(cfg.callbacks))


def test_quickstart_without_callbacks_builds_a_trainer_without_them(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pixelflow")
    cfg = compose_train("experiment=mnist_quickstart", "callbacks=none", "logger=none", "model=test",
                        f"paths.root_dir={tmp_path}")
    trainer, _, _ = build_training(cfg)
    assert not [c for c in trainer.callbacks
                if type(c).__module__.startswith(("pixelflow.training.callbacks", "pixelflow.training.eval_callback",
                                                  "pixelflow.training.posthoc_ema"))]
    assert ("callbacks=none: ignoring callbacks.checkpoint, callbacks.evaluate, callbacks.posthoc_ema, "
            "callbacks.sample_grid") in caplog.text


def test_settings_for_a_callback_the_option_does_not_define_fail_at_start_up_naming_it(tmp_path):
    cfg = compose_train("+callbacks.sampel_grid.steps=3", f"paths.root_dir={tmp_path}")
    with pytest.raises(ValueError, match=r"callbacks\.sampel_grid has no _target_: .* the callbacks option 'default' "
                                         r"does not define it.*~callbacks\.sampel_grid"):
        build_training(cfg)
    with pytest.raises(ValueError, match=r"logger\.wandb has no _target_"):
        group_entries(compose_train("+logger.wandb.offline=true", f"paths.root_dir={tmp_path}"), "logger")
