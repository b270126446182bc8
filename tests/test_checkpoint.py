import shutil

import pytest
import torch
from huggingface_hub import constants as hf_constants

from pixelflow.cascade import CascadeSchedule
from pixelflow.checkpoint import RELEASED_HUB, CheckpointError, export_released_format, load_pixelflow
from pixelflow.model import build_model


@pytest.fixture
def exported(tmp_path, tiny_model):
    export_released_format(tiny_model, CascadeSchedule(image_size=32), tmp_path / "export", ["a"] * 10)
    return tmp_path / "export"


def test_released_layout_round_trip(exported, tiny_model):
    loaded = load_pixelflow(exported / "model.pt")
    assert loaded.schedule == CascadeSchedule(image_size=32)
    assert loaded.class_names == ["a"] * 10 and not loaded.model.training
    for (k, a), (k2, b) in zip(tiny_model.state_dict().items(), loaded.model.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_released_config_yaml_layout_is_read(tmp_path):
    """A config.yaml shaped like the released one (model.target/params, scheduler) loads strictly."""
    model = build_model("Test/2", num_classes=10)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "config.yaml").write_text(
        "model:\n  target: pixelflow.model.PixelFlowModel\n  params:\n    num_attention_heads: 2\n    attention_head_dim: 16\n"
        "    in_channels: 3\n    out_channels: 3\n    depth: 2\n    num_classes: 10\n    patch_size: 2\n    attention_bias: true\n"
        "scheduler:\n  num_train_timesteps: 1000\n  num_stages: 4\ndata:\n  resolution: 32\n")
    loaded = load_pixelflow(tmp_path / "model.pt")
    assert loaded.model.num_classes == 10 and loaded.schedule.image_size == 32


def test_missing_file_names_the_fix(tmp_path):
    with pytest.raises(CheckpointError, match="(?s)does not exist.*huggingface"):
        load_pixelflow(tmp_path / "nope" / "model.pt")


def test_missing_config_yaml(tmp_path, exported):
    (exported / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match="needs its config.yaml"):
        load_pixelflow(exported / "model.pt")


def test_truncated_file(exported):
    data = (exported / "model.pt").read_bytes()
    (exported / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt or not a PyTorch file"):
        load_pixelflow(exported / "model.pt")


def test_wrong_model_config(exported):
    text = (exported / "config.yaml").read_text().replace("depth: 2", "depth: 3")
    (exported / "config.yaml").write_text(text)
    with pytest.raises(CheckpointError, match="missing"):
        load_pixelflow(exported / "model.pt")


def test_wrong_shapes(exported):
    text = (exported / "config.yaml").read_text().replace("num_classes: 10", "num_classes: 1000")
    (exported / "config.yaml").write_text(text)
    with pytest.raises(CheckpointError, match="wrong shape.*class_embedder"):
        load_pixelflow(exported / "model.pt")


def test_pickled_objects_are_refused(tmp_path):
    """weights_only=True: a checkpoint that needs arbitrary code to unpickle is refused."""
    torch.save({"evil": object()}, tmp_path / "model.pt")
    (tmp_path / "config.yaml").write_text("model:\n  params: {}\n")
    with pytest.raises(CheckpointError, match="could not be read"):
        load_pixelflow(tmp_path / "model.pt")


def test_lightning_checkpoint_without_pixelflow_section(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "x.ckpt")
    with pytest.raises(CheckpointError, match="not a pixelflow training checkpoint"):
        load_pixelflow(tmp_path / "x.ckpt")


def test_project_checkpoint_without_its_ema_record_is_refused(tmp_path):
    """A 'pixelflow' section without ema_decays cannot say which weights are the EMA's: refused, not guessed."""
    torch.save({"state_dict": {}, "pixelflow": {"model": {}, "schedule": {}}}, tmp_path / "x.ckpt")
    with pytest.raises(CheckpointError, match=r"lacks \['ema_decays'\].*export it"):
        load_pixelflow(tmp_path / "x.ckpt")


def test_export_writes_safetensors_beside_model_pt_and_both_load(exported, tiny_model):
    from_pt, from_st = load_pixelflow(exported / "model.pt"), load_pixelflow(exported / "model.safetensors")
    assert from_st.schedule == from_pt.schedule and from_st.class_names == ["a"] * 10
    for (k, a), (k2, b) in zip(tiny_model.state_dict().items(), from_st.model.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_truncated_safetensors_file(exported):
    data = (exported / "model.safetensors").read_bytes()
    (exported / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt or not a safetensors file"):
        load_pixelflow(exported / "model.safetensors")


REV = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache(tmp_path, exported, monkeypatch, weights="model.pt"):
    """A huggingface_hub cache (HF_HUB_CACHE layout) holding owner/pixelflow-test at REV, refs/main -> REV."""
    repo = tmp_path / "hub" / "models--owner--pixelflow-test"
    snapshot = repo / "snapshots" / REV
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    for name in (weights, "config.yaml"):
        shutil.copyfile(exported / name, snapshot / name)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return snapshot


@pytest.mark.parametrize("weights", ["model.pt", "model.safetensors"])
@pytest.mark.parametrize("suffix", ["", f"@{REV}"])
def test_hub_spec_resolves_from_the_local_cache(tmp_path, exported, tiny_model, monkeypatch, weights, suffix):
    snapshot = _hub_cache(tmp_path, exported, monkeypatch, weights)
    loaded = load_pixelflow(f"hf://owner/pixelflow-test{suffix}")
    assert loaded.source == str(snapshot / weights) and loaded.class_names == ["a"] * 10
    for a, b in zip(tiny_model.state_dict().values(), loaded.model.state_dict().values()):
        assert torch.equal(a, b)


def test_hub_spec_not_in_cache_says_how_to_get_it_and_never_downloads(tmp_path, exported, monkeypatch):
    _hub_cache(tmp_path, exported, monkeypatch)
    with pytest.raises(CheckpointError, match=r"(?s)hf://ShoufaChen/PixelFlow-Class2Image: .* not in the Hugging Face cache "
                                              r".*allow_download=true.*`hf download ShoufaChen/PixelFlow-Class2Image model.pt "
                                              r"config.yaml`.*HF_HUB_CACHE"):
        load_pixelflow(RELEASED_HUB)
    (tmp_path / "hub" / "models--owner--pixelflow-test" / "snapshots" / REV / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        load_pixelflow("hf://owner/pixelflow-test")
    with pytest.raises(CheckpointError, match="expected hf://owner/name"):
        load_pixelflow("hf://pixelflow-test")


def test_t2i_export_round_trip_keeps_cross_attention_and_text_encoder(tmp_path, t2i_model):
    spec = {"source": "text_encoder", "max_length": 16}
    export_released_format(t2i_model, CascadeSchedule(image_size=32), tmp_path, text_encoder=spec)
    loaded = load_pixelflow(tmp_path / "model.pt")
    assert loaded.model.cross_attention_dim == t2i_model.cross_attention_dim and loaded.model.num_classes == 0
    assert loaded.text_encoder == spec and loaded.class_names is None
    for a, b in zip(t2i_model.state_dict().values(), loaded.model.state_dict().values()):
        assert torch.equal(a, b)
