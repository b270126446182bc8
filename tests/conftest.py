"""Shared fixtures: paths to the in-repo reference data and a tiny model."""

from pathlib import Path

import pytest
import torch

from pixelflow.cascade import CascadeSchedule
from pixelflow.model import build_model

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden"
GOLDEN_T2I = DATA / "golden_t2i"
MANIFEST = DATA / "pixelflow_c2i_state_dict_manifest.json"


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
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


@pytest.fixture
def tiny_schedule():
    return CascadeSchedule(image_size=32, num_stages=4)


@pytest.fixture(scope="session")
def eval_cache(tmp_path_factory):
    """A cache folder for evaluation during training, shared by the session: the MNIST classifier is trained into it
    once (~35 s on 2 cores)."""
    return tmp_path_factory.mktemp("pixelflow-eval-cache")
