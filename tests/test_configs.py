from dataclasses import fields
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from pixelflow.sampling.samplers import SamplerConfig
from tests.hydra_utils import CONF, compose_config, tiny_train_overrides

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
PRESETS = sorted(p.stem for p in (CONF / "sampler").glob("*.yaml"))


def test_there_are_experiments():
    assert {"mnist_quickstart", "imagenet256_xl4"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_resolves(experiment, tmp_path):
    cfg = compose_config("train", [f"experiment={experiment}", f"paths.root_dir={tmp_path}"])
    assert cfg.run_name == experiment
    assert Path(cfg.paths.run_dir) == tmp_path / "runs" / experiment
    assert cfg.cascade.image_size == cfg.data.image_size
    instantiate(cfg.cascade)  # the schedule is valid for the data size


@pytest.mark.parametrize("group", ["model", "data", "trainer", "logger", "callbacks"])
def test_every_group_option_composes(group, tmp_path):
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        cfg = compose_config("train", [f"{group}={option}", f"paths.root_dir={tmp_path}"])
        assert group in cfg


def test_model_configs_build_on_meta(tmp_path):
    import torch

    for option in sorted(p.stem for p in (CONF / "model").glob("*.yaml")):
        cfg = compose_config("train", [f"model={option}", f"paths.root_dir={tmp_path}"])
        with torch.device("meta"):
            model = instantiate(cfg.model, num_classes=10)
        assert model.num_classes == 10


def test_quickstart_is_the_default_and_paper_recipe_matches_the_paper(tmp_path):
    default = compose_config("train", [f"paths.root_dir={tmp_path}"])
    assert default.run_name == "mnist_quickstart" and default.model.name == "Tiny/4"
    paper = compose_config("train", ["experiment=imagenet256_xl4", f"paths.root_dir={tmp_path}"])
    assert paper.model.name == "XL/4" and paper.module.lr == 1e-4 and paper.module.weight_decay == 0
    assert list(paper.module.ema_decays) == [0.9999] and paper.trainer.gradient_clip_val == 1.0
    assert paper.module.lr_warmup_steps == 0 and paper.module.lr_decay_fraction == 0  # constant lr
    assert paper.trainer.precision == "bf16-mixed" and paper.global_batch_size == 256


def test_sampler_presets_are_exactly_sampler_configs():
    assert {"paper_dopri5", "euler30", "quickstart"} <= set(PRESETS)
    names = [f.name for f in fields(SamplerConfig)]
    for preset in PRESETS:
        values = OmegaConf.to_container(OmegaConf.load(CONF / "sampler" / f"{preset}.yaml"))
        assert list(values) == names, preset  # every field, in the dataclass's order
        SamplerConfig.from_mapping(values, preset)
    load = lambda name: SamplerConfig.from_mapping(OmegaConf.load(CONF / "sampler" / f"{name}.yaml"))  # noqa: E731
    assert load("paper_dopri5") == SamplerConfig(method="dopri5", guidance_scale=2.4, atol=1e-6, rtol=1e-3)
    assert load("euler30") == SamplerConfig(method="euler", steps=30, guidance_scale=4.0)
    assert load("quickstart") == SamplerConfig(method="euler", steps=10, guidance_scale=5.0)


def _sampler(node) -> SamplerConfig:
    return SamplerConfig.from_mapping(OmegaConf.to_container(node))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_sampling_entrypoint_takes_every_preset(preset, tmp_path):
    expected = _sampler(OmegaConf.load(CONF / "sampler" / f"{preset}.yaml"))
    assert _sampler(compose_config("sample", [f"out_dir={tmp_path}", f"sampler={preset}"]).sampler) == expected
    assert _sampler(compose_config("sweep_sampler", [f"sampler={preset}"]).sampler) == expected
    assert _sampler(compose_config("demo", [f"sampler={preset}"]).sampler) == expected
    train = compose_config("train", [f"paths.root_dir={tmp_path}", f"sampler@callbacks.sample_grid.sampler={preset}",
                                     "callbacks/evaluate=mnist_classifier", f"sampler@callbacks.evaluate.sampler={preset}"])
    assert _sampler(train.callbacks.sample_grid.sampler) == _sampler(train.callbacks.evaluate.sampler) == expected


def test_entrypoints_default_to_the_published_and_quickstart_presets(tmp_path):
    euler30 = SamplerConfig(method="euler", steps=30, guidance_scale=4.0)
    quickstart = SamplerConfig(method="euler", steps=10, guidance_scale=5.0)
    assert _sampler(compose_config("sample", [f"out_dir={tmp_path}"]).sampler) == euler30
    assert _sampler(compose_config("sweep_sampler").sampler) == euler30
    assert _sampler(compose_config("demo").sampler) == quickstart
    quick = compose_config("train", [f"paths.root_dir={tmp_path}"]).callbacks
    assert _sampler(quick.sample_grid.sampler) == _sampler(quick.evaluate.sampler) == quickstart
    paper = compose_config("train", [f"paths.root_dir={tmp_path}", "experiment=imagenet256_xl4", "callbacks/evaluate=fid10k"])
    assert _sampler(paper.callbacks.sample_grid.sampler) == euler30
    assert _sampler(paper.callbacks.evaluate.sampler) == SamplerConfig(method="euler", steps=30, guidance_scale=2.4)
    t2i = compose_config("train", [f"paths.root_dir={tmp_path}", "experiment=mnist_t2i_quickstart"])
    assert _sampler(t2i.callbacks.sample_grid.sampler) == quickstart


def test_debug_fast_is_the_tiny_cpu_run_on_top_of_the_mnist_experiments(tmp_path):
    for experiment in ("mnist_quickstart", "mnist_t2i_quickstart"):
        cfg = compose_config("train", [f"paths.root_dir={tmp_path}", f"experiment={experiment}", "debug=fast"])
        assert cfg.model.name == "Test/2" and cfg.trainer.accelerator == "cpu" and cfg.trainer.devices == 1
        assert cfg.trainer.max_steps == 4 and cfg.data.batch_size == 8 and not cfg.logger
        assert "evaluate" not in cfg.callbacks and cfg.callbacks.sample_grid.sampler.steps == 1
        assert Path(cfg.paths.run_dir) == tmp_path / "runs" / "debug_fast"  # never the experiment's own run directory
    ddp = compose_config("train", [f"paths.root_dir={tmp_path}", "debug=fast", "trainer=ddp_cpu"])
    assert ddp.trainer.devices == 2 and ddp.model.name == "Test/2"  # a trainer choice still applies
    tests = compose_config("train", tiny_train_overrides(tmp_path / "run", 6, ["callbacks/evaluate=mnist_classifier"]))
    assert tests.trainer.max_steps == 6 and Path(tests.paths.run_dir) == tmp_path / "run" and "evaluate" in tests.callbacks


@pytest.mark.parametrize("option", ["mnist_classifier", "fid10k"])
def test_evaluation_options_build_their_callback(option, tmp_path):
    cfg = compose_config("train", ["experiment=imagenet256_xl4", f"callbacks/evaluate={option}", f"paths.root_dir={tmp_path}"])
    callback = instantiate(cfg.callbacks.evaluate)
    assert callback.metrics_file == tmp_path / "runs" / "imagenet256_xl4" / "metrics.jsonl"
    if option == "fid10k":
        assert callback.num_samples == 10_000 and callback.options.inception and not callback.options.classifier
        assert callback.ref_spec == str(tmp_path / "data" / "VIRTUAL_imagenet256_labeled.npz")
    assert "evaluate" not in compose_config("train", ["experiment=imagenet256_xl4"]).callbacks  # off unless selected


def test_quickstart_evaluates_itself_cheaply_at_the_end(tmp_path):
    evaluate = compose_config("train", [f"paths.root_dir={tmp_path}"]).callbacks.evaluate
    assert evaluate.every_n_steps == 0 and evaluate.num_samples == 500 and evaluate.ref == "mnist_test"
    assert evaluate.classifier is True and evaluate.inception is False


@pytest.mark.parametrize("launcher", ["slurm", "submitit_slurm"])
def test_slurm_launcher_composes(launcher):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}", "module.lr=1e-3"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert cfg.hydra.sweep.subdir == "module.lr=1e-3"  # each job its own directory, named after its overrides
    if launcher == "slurm":
        assert cfg.hydra.launcher.gpus_per_node == cfg.hydra.launcher.tasks_per_node == 8
