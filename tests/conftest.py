"""Shared fixtures: paths to the in-repo reference data, tiny models and a tiny T5 text encoder."""

import shutil
from pathlib import Path

import pytest
import torch

from pixelflow.cascade import CascadeSchedule
from pixelflow.checkpoint import export_released_format
from pixelflow.model import build_model

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden"
GOLDEN_T2I = DATA / "golden_t2i"
MANIFEST = DATA / "pixelflow_c2i_state_dict_manifest.json"


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if item.get_closest_marker("gpu"):  # not keywords: they hold folder names (a checkout in gpu/)
                item.add_marker(skip)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    model = build_model("Test/2", num_classes=10).eval()
    # The published init zeroes the output layers; randomise so outputs are informative.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


@pytest.fixture
def t2i_model():
    """The golden text-to-image layout (T2I-Test/2) with randomised weights, as ``tiny_model``."""
    torch.manual_seed(0)
    model = build_model("T2I-Test/2").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


TINY_T5_WIDTH = 32  # d_model of the tiny_t5_dir encoder


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> Path:
    """A folder holding a tiny random T5 encoder (d_model 32) and a ByT5 tokenizer (needs no files), as
    ``save_pretrained`` writes them: loadable with :func:`pixelflow.text.load_t5`."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    folder = tmp_path_factory.mktemp("tiny-t5")
    torch.manual_seed(0)
    config = T5Config(d_model=TINY_T5_WIDTH, num_layers=1, num_heads=2, d_kv=16, d_ff=64, vocab_size=384)
    T5EncoderModel(config).save_pretrained(folder)
    ByT5Tokenizer().save_pretrained(folder)
    return folder


def make_t2i_export(out_dir: Path, t5_dir: Path) -> Path:
    """A random T2I-Test/2 model (text width 32, 32 px, 4 stages) exported with the tiny T5 copied beside it as
    ``text_encoder/`` (config.yaml ``text_encoder: {source: text_encoder, max_length: 32}``); returns model.pt."""
    torch.manual_seed(0)
    model = build_model("T2I-Test/2", cross_attention_dim=TINY_T5_WIDTH).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    shutil.copytree(t5_dir, out_dir / "text_encoder")
    return export_released_format(model, CascadeSchedule(image_size=32), out_dir,
                                  text_encoder={"source": "text_encoder", "max_length": 32})


@pytest.fixture
def t2i_export(tmp_path, tiny_t5_dir) -> Path:
    """model.pt of a tiny T2I export whose text encoder (the tiny T5) lies beside it."""
    return make_t2i_export(tmp_path / "t2i_export", tiny_t5_dir)


@pytest.fixture
def tiny_schedule():
    return CascadeSchedule(image_size=32, num_stages=4)


@pytest.fixture(scope="session")
def eval_cache(tmp_path_factory):
    """A cache folder for evaluation during training, shared by every test of the run: the MNIST classifier is
    trained into it once."""
    return tmp_path_factory.mktemp("pixelflow-eval-cache")
