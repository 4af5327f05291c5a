"""A retrieval evaluation that survives being killed (pixel_bert.score_blocks), the COCO 1K protocol
from its 5 diagonal fold blocks alone (evaluate.py --protocol 1k), and finetune.py's evaluation of a
subset of the val images (--retrieval-val-images). Synthetic split: 10 test images x 3 captions,
5 folds of 2 images, two of them twice as wide (a CNN batch that holds one pads the others, which
changes their visual tokens at the border); score blocks of 2 images, CNN batches of 4."""
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from pixel_bert import evaluate, finetune, metrics, retrieval_scoring, synthetic, synthetic_tasks
from pixel_bert.config import make_model_config
from pixel_bert.errors import UserError
from pixel_bert.heads import PixelBertForPreTraining, PixelBertForRetrieval
from pixel_bert.saved_model import save_model
from test_faults import one_thread  # in-process runs on one thread, as the subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE = 32
N_TEST = 10  # 5 folds of 2 images


def tiny_cfg():
    return make_model_config("tiny", num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64,
                             image_short_side=IMAGE_SIZE, image_long_side=2 * IMAGE_SIZE, hidden_dropout=0.0,
                             attention_dropout=0.0)


def retrieval_checkpoint(path, seed):
    torch.manual_seed(seed)
    model = PixelBertForRetrieval(tiny_cfg())
    torch.nn.init.normal_(model.retrieval.score.weight, std=0.5)
    save_model(model, str(path), extra={"task": "retrieval", "vocab": synthetic.vocab_tokens()})
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(checkpoint, another checkpoint, Karpathy json, the uninterrupted 1-process run's folder)."""
    root = tmp_path_factory.mktemp("resume")
    data = synthetic_tasks.write_retrieval(str(root / "data"), n_train=2, n_val=4, n_test=N_TEST,
                                           image_size=IMAGE_SIZE, captions_per_image=3)
    for imgid in (10, 14):  # test rows 4 and 8 (images 6-15) twice as wide: a CNN batch with one pads the others
        path = root / "data" / "images" / f"{imgid:06d}.png"
        Image.open(path).resize((2 * IMAGE_SIZE, IMAGE_SIZE)).save(path)
    ckpt = retrieval_checkpoint(root / "a.pt", 1)
    other = retrieval_checkpoint(root / "b.pt", 2)
    with one_thread():
        evaluate.main(eval_args(ckpt, data, root / "full") + ["--fold-size", "2"])
    return ckpt, other, data, root / "full"


def eval_args(ckpt, data, out, protocol="5k"):
    return ["--task", "retrieval", "--checkpoint", ckpt, "--karpathy-json", data, "--split", "test",
            "--output-dir", str(out), "--pairs-per-batch", "4", "--batch-size", "4", "--num-workers", "0",
            "--images-per-block", "2", "--protocol", protocol, "--device", "cpu"]


def scores_of(out, split="test"):
    return metrics.load_score_matrix(str(out / f"retrieval_{split}_scores.npz")).scores


def block_files(out):
    return sorted(glob.glob(str(out / "retrieval_blocks" / "test" / "*" / "rows_*.pt")))


# The child: evaluate.py, waiting for the test's SIGKILL once rank FAULT_RANK has written FAULT_BLOCKS
# score blocks, so that the kill lands in the middle of the scoring loop.
CHILD = """
import os, sys, time
sys.path.insert(0, {root!r})
from pixel_bert import evaluate, score_blocks

save, written = score_blocks.BlockStore.save, []


def save_then_wait(self, block, scores):
    path = save(self, block, scores)
    written.append(path)
    if len(written) == int(os.environ["FAULT_BLOCKS"]) and os.environ.get("RANK", "0") == os.environ["FAULT_RANK"]:
        ready = os.environ["FAULT_READY"]
        with open(ready + ".part", "w") as f:
            f.write(str(os.getpid()))
        os.replace(ready + ".part", ready)
        time.sleep(3600)
    return path


score_blocks.BlockStore.save = save_then_wait
evaluate.cli()
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script, args, ranks, env):
    runner = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={ranks}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    return subprocess.Popen(runner + [script] + args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **env))


def run_and_kill(tmp_path, args, ranks, fault_rank, fault_blocks):
    """Run ``args`` under ``ranks`` processes and SIGKILL rank ``fault_rank`` after its
    ``fault_blocks``-th score block is written; returns the dead job's stderr."""
    script, ready = tmp_path / "child.py", tmp_path / "ready"
    script.write_text(CHILD.format(root=ROOT))
    proc = launch(str(script), args, ranks, {"FAULT_READY": str(ready), "FAULT_RANK": str(fault_rank),
                                              "FAULT_BLOCKS": str(fault_blocks)})
    deadline = time.time() + 240
    while not ready.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the child never reached its fault point: {proc.communicate()[1][-3000:]}")
        time.sleep(0.05)
    os.kill(int(ready.read_text()), signal.SIGKILL)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode != 0
    return err


def test_sigkill_mid_scoring_then_the_same_command_ends_with_the_identical_matrix(setup, tmp_path):
    """One process, SIGKILLed after 1 of its 5 score blocks: the same command scores only the 4 left
    (the CNN only for their images, in the uninterrupted run's CNN batches: none crosses a block)
    and writes the uninterrupted run's matrix, bit for bit."""
    ckpt, _, data, full = setup
    part = tmp_path / "part"
    run_and_kill(tmp_path, eval_args(ckpt, data, part), ranks=1, fault_rank=0, fault_blocks=1)
    assert len(block_files(part)) == 1 and not (part / "retrieval_test_scores.npz").exists()
    with one_thread():
        result = evaluate.main(eval_args(ckpt, data, part))
    assert (result["blocks"], result["blocks_reused"]) == (5, 1)
    assert result["pairs_scored"] == 4 * 2 * 30 and result["pairs"] == N_TEST * 30
    assert np.array_equal(scores_of(part), scores_of(full))


@pytest.mark.parametrize("protocol", ["5k", "1k"])
def test_sigkill_of_one_of_two_ranks_then_resume_with_two_or_one_rank(setup, tmp_path, protocol):
    """Two processes under torchrun; rank 1 (blocks 3-4 of 5) is SIGKILLed after its first block.
    The same torchrun command and a run with one process both reuse every block written (blocks are
    numbered over the split, not over the ranks) and end with the uninterrupted run's scores."""
    ckpt, _, data, full = setup
    part, single = tmp_path / "part", tmp_path / "single"
    run_and_kill(tmp_path, eval_args(ckpt, data, part, protocol), ranks=2, fault_rank=1, fault_blocks=1)
    written = len(block_files(part))
    assert 1 <= written < 5
    shutil.copytree(part, single)
    resumed = launch(os.path.join(ROOT, "evaluate.py"), eval_args(ckpt, data, part, protocol), 2, {})
    out, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-3000:]
    assert json.load(open(part / "metrics_retrieval_test.json"))["blocks_reused"] == written
    with one_thread():
        one = evaluate.main(eval_args(ckpt, data, single, protocol))
    assert one["blocks_reused"] == written and one["world_size"] == 1
    if protocol == "5k":
        assert np.array_equal(scores_of(part), scores_of(full)) and np.array_equal(scores_of(single), scores_of(full))
    else:
        for f in range(5):
            rows = slice(2 * f, 2 * f + 2)
            for out_dir in (part, single):
                fold = metrics.load_score_matrix(str(out_dir / f"retrieval_test_fold{f}_scores.npz")).scores
                assert np.array_equal(fold, scores_of(full)[rows, 3 * 2 * f:3 * 2 * f + 6])


def test_the_1k_protocol_scores_only_the_fold_blocks_and_equals_the_folds_of_the_full_matrix(setup, tmp_path):
    """--protocol 1k (fold size n_images / 5 = 2) scores a fifth of the pairs and reports the R@K
    that metrics.coco_1k_recall computes from the full 5K matrix."""
    ckpt, _, data, full = setup
    with one_thread():
        one_k = evaluate.main(eval_args(ckpt, data, tmp_path / "1k", "1k"))
    whole = metrics.load_score_matrix(str(full / "retrieval_test_scores.npz"))
    assert one_k["pairs"] == one_k["pairs_scored"] == whole.scores.size // 5 and one_k["fold_size"] == 2
    assert one_k["recall_1k_folds"] == metrics.coco_1k_recall(whole.scores, whole.caption_image, fold_size=2)
    five_k = evaluate.main(["--task", "retrieval", "--scores", str(full / "retrieval_test_scores.npz"),
                            "--fold-size", "2"])
    assert one_k["recall_1k_folds"] == five_k["recall_1k_folds"] and "recall" in five_k
    for f in range(5):  # each fold's file is a score matrix of its own
        fold = metrics.load_score_matrix(str(tmp_path / "1k" / f"retrieval_test_fold{f}_scores.npz"))
        assert np.allclose(fold.scores, whole.scores[2 * f:2 * f + 2, 6 * f:6 * f + 6], atol=1e-6)
        assert fold.caption_image.tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(UserError, match="10 images, not 5 x 3: give --fold-size 2"):
        evaluate.main(eval_args(ckpt, data, tmp_path / "bad", "1k") + ["--fold-size", "3"])


def test_blocks_of_another_checkpoint_or_a_damaged_block_are_never_used(setup, tmp_path, capsys):
    """In one output folder: the blocks of checkpoint A are another folder to checkpoint B's run (a
    message says they are for another model); A's block copied over one of B's, and a truncated
    block, are refused by their headers and scored again; a kill's leftover temporary file goes."""
    ckpt, other, data, full = setup
    out = tmp_path / "out"
    shutil.copytree(full, out)
    with one_thread():
        evaluate.main(eval_args(other, data, out))
    assert "are for another model" in capsys.readouterr().out
    b_scores = scores_of(out)
    assert not np.allclose(b_scores, scores_of(full))
    a_folder, b_folder = (os.path.dirname(p) for p in sorted(glob.glob(str(out / "retrieval_blocks/test/*/about.json")),
                                                              key=lambda p: "b.pt" in open(p).read()))
    shutil.copy(os.path.join(a_folder, "rows_000000-000002.pt"), os.path.join(b_folder, "rows_000000-000002.pt"))
    damaged = os.path.join(b_folder, "rows_000004-000006.pt")
    with open(damaged, "r+b") as f:
        f.truncate(os.path.getsize(damaged) // 2)
    leftover = os.path.join(b_folder, ".rows_000008-000010.pt.abc.tmp")
    open(leftover, "w").close()
    os.remove(os.path.join(b_folder, "rows_000008-000010.pt"))
    with one_thread():
        again = evaluate.main(eval_args(other, data, out))
    err = capsys.readouterr().err
    assert "rows_000000-000002.pt was written for another checkpoint" in err
    assert "rows_000004-000006.pt cannot be read" in err
    assert again["blocks_reused"] == 2 and not os.path.exists(leftover)
    assert np.array_equal(scores_of(out), b_scores)


def test_the_progress_of_a_resumed_run_counts_only_the_pairs_left(setup, tmp_path, monkeypatch):
    """The progress line of a run that finds 3 of 5 blocks done starts at their pairs: its rate and
    ETA count only the pairs scored since (progress.RateClock)."""
    ckpt, _, data, full = setup
    out = tmp_path / "out"
    shutil.copytree(full, out)
    for path in block_files(out)[3:]:
        os.remove(path)
    seen = []

    class Recorded(retrieval_scoring.Progress):
        def __init__(self, total, *args, done=0, **kwargs):
            super().__init__(total, *args, done=done, **kwargs)
            seen.append((total, done, self.clock.start_done))
    monkeypatch.setattr(retrieval_scoring, "Progress", Recorded)
    with one_thread():
        result = evaluate.main(eval_args(ckpt, data, out))
    assert seen == [(300, 180, 180)] and result["pairs_scored"] == 120
    assert np.array_equal(scores_of(out), scores_of(full))


def test_finetune_scores_the_first_retrieval_val_images(setup, tmp_path):
    """finetune.py --task retrieval: --retrieval-val-images N scores the first N val images x their
    captions (default 1000, documented in --help; 0: every val image)."""
    help_text = finetune.get_args_parser().format_help()
    assert "--retrieval-val-images" in help_text and "(default 1000)" in help_text.split("--retrieval-val-images")[1]
    init = str(tmp_path / "pre.pt")
    save_model(PixelBertForPreTraining(tiny_cfg()), init, extra={"task": "pretrain", "vocab": synthetic.vocab_tokens()})
    with one_thread():
        result = finetune.main(["--task", "retrieval", "--init", init, "--output-dir", str(tmp_path / "run"),
                                "--synthetic-train", "8", "--synthetic-val", "4", "--max-steps", "0",
                                "--num-workers", "0", "--device", "cpu", "--retrieval-val-images", "2"])
    assert result["eval"]["n_images"] == 2 and result["eval"]["n_captions"] == 10
