"""Faults and bad input: each test injects the fault for real (a SIGKILL, a damaged or hostile file,
a full or unwritable folder, a broken image or annotation file, a wrong flag) on CPU and checks that
the run either recovers exactly or stops with an error naming the file or flag. Nothing may end in a
run that looks fine and is not.

docs/failures.md lists every case with the test that shows it.
"""
import contextlib
import errno
import io
import json
import os
import re
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
import warnings
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from pixel_bert import evaluate, export, finetune, nlvr2, synthetic, train, trainer, visualize, vqa
from pixel_bert.annotations import (AnnotationError, CaptionRecord, read_coco_captions, read_karpathy,
                                    read_visual_genome)
from pixel_bert.bad_samples import BadDataError, BadSample, BadSampleWarning
from pixel_bert.batches import CaptionCollator, CaptionDataset, epoch_batch_sampler
from pixel_bert.caffe2_weights import read_caffe2_blobs
from pixel_bert.checkpoints import newest_valid_checkpoint, read_training_checkpoint
from pixel_bert.config import IMAGENET_MEAN, IMAGENET_STD, make_model_config, make_train_config
from pixel_bert.distributed import DistInfo
from pixel_bert.downstream import predict_sharded
from pixel_bert.files import DiskFullError, UnwritableError
from pixel_bert.heads import PixelBertForPreTraining
from pixel_bert.images import ImageLoadError, ImageTransform, load_image
from pixel_bert.inference import PixelBertPredictor
from pixel_bert.pretrained import load_backbone_weights, load_bert_weights
from pixel_bert.tensor_files import read_state_dict
from pixel_bert.tokenizer import WordPieceTokenizer
from pixel_bert.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--hidden-size", "32", "--num-layers", "1", "--num-heads", "2", "--intermediate-size", "64",
        "--image-short-side", "32", "--image-long-side", "32", "--num-sampled-pixels", "2",
        "--num-workers", "0", "--synthetic-eval-images", "0", "--device", "cpu", "--log-every", "1"]
# 48 images in batches of 8: 6 steps an epoch, 12 in all, a checkpoint every 2 steps.
KILL_RUN = TINY + ["--synthetic-images", "48", "--batch-size", "8", "--epochs", "2", "--ckpt-every", "2",
                   "--warmup-steps", "3"]


@contextlib.contextmanager
def one_thread():
    """In-process runs on one thread, as the subprocesses (OMP_NUM_THREADS=1): the same float sums,
    so an in-process run and a subprocess's checkpoint agree bit for bit."""
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # share_cpu_threads leaves the count alone
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if env is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = env


def run_train(argv):
    with one_thread():
        return train.main(argv)


def model_weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a_path, b_path):
    a, b = model_weights(a_path), model_weights(b_path)
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


def logged_steps(run_dir):
    return [json.loads(line)["step"] for line in open(os.path.join(run_dir, "metrics.jsonl"))
            if '"kind": "train"' in line]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, args, **kwargs):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", script] + args
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", **kwargs.pop("env", {})), **kwargs)


def finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


# -------------------------------------------------------------------------------------------------
#                       A killed process resumes to the same weights
# -------------------------------------------------------------------------------------------------

# The child: train.py, plus two places where it reports where it stands and waits for the test's
# SIGKILL, so the kill lands at a known point: half way through writing a checkpoint
# (FAULT_HALF_WRITE names it), or after an optimizer step of one rank (FAULT_PAUSE_STEP/_RANK).
CHILD = """
import io, os, sys, time
sys.path.insert(0, {root!r})
import torch
from pixel_bert import files, finetune, train, trainer


def wait_for_the_kill():
    ready = os.environ["FAULT_READY"]
    with open(ready + ".part", "w") as f:
        f.write(str(os.getpid()))
    os.replace(ready + ".part", ready)
    time.sleep(3600)


def save_torch(obj, path):
    if os.path.basename(path) == os.environ.get("FAULT_HALF_WRITE"):
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        with files.atomic_write(path) as f:
            f.write(buffer.getvalue()[: buffer.tell() // 2])
            f.flush()
            wait_for_the_kill()
    return files.save_torch(obj, path)


after_step = trainer.Trainer.after_step


def after_step_then_pause(self, stats, total_steps):
    after_step(self, stats, total_steps)
    if self.step == int(os.environ.get("FAULT_PAUSE_STEP", -1)) and \\
            self.info.rank == int(os.environ.get("FAULT_PAUSE_RANK", 0)):
        wait_for_the_kill()


trainer.save_torch = save_torch
trainer.Trainer.after_step = after_step_then_pause
(finetune if os.environ.get("FAULT_SCRIPT") == "finetune" else train).cli()
"""


def start_child(tmp_path, launch, env):
    """Start ``launch(script, env)`` and wait until the child process is at its fault point; returns
    (process, pid of the process to kill)."""
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=ROOT))
    ready = tmp_path / "ready"
    proc = launch(str(script), {**env, "FAULT_READY": str(ready)})
    deadline = time.time() + 300
    while not ready.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the child never reached its fault point: {proc.communicate()[1][-3000:]}")
        time.sleep(0.05)
    return proc, int(ready.read_text())


def test_sigkill_while_writing_a_checkpoint_then_resume_is_bit_identical(tmp_path):
    """SIGKILL of `python train.py` half way through writing ckpt_00000004.pt (steps 3 and 4 are
    logged, ckpt_00000002.pt is the last whole checkpoint): --resume auto continues from step 2,
    removes the half-written temporary file, logs every step once and ends with the weights of an
    uninterrupted run, bit for bit."""
    full, part = tmp_path / "full", tmp_path / "part"
    run_train(KILL_RUN + ["--output-dir", str(full), "--resume", "none"])

    def launch(script, env):
        return subprocess.Popen([sys.executable, script] + KILL_RUN + ["--output-dir", str(part)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1", **env))
    proc, pid = start_child(tmp_path, launch, {"FAULT_HALF_WRITE": "ckpt_00000004.pt"})
    assert pid == proc.pid
    os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    leftovers = sorted(os.listdir(part))
    assert "ckpt_00000002.pt" in leftovers and "ckpt_00000004.pt" not in leftovers
    assert [f for f in leftovers if f.startswith(".ckpt_00000004.pt.") and f.endswith(".tmp")]  # killed mid-write
    assert logged_steps(part) == [1, 2, 3, 4]

    result = run_train(KILL_RUN + ["--output-dir", str(part)])
    assert result["resumed_from"].endswith("ckpt_00000002.pt") and result["steps"] == 12
    assert not [f for f in os.listdir(part) if f.endswith(".tmp")]
    assert logged_steps(part) == list(range(1, 13))
    assert_same_weights(full / "model.pt", part / "model.pt")


def test_sigkill_of_one_torchrun_rank_then_resume_is_bit_identical(tmp_path):
    """Two processes under torchrun (static rendezvous on a free port); rank 1 is SIGKILLed after
    step 3 (checkpoint at step 2) while rank 0 waits for it in the gradient all-reduce: torchrun
    stops the job with an error, and a torchrun --resume auto ends with the weights of an
    uninterrupted 2-process run, bit for bit."""
    args = TINY + ["--synthetic-images", "64", "--batch-size", "4", "--epochs", "1", "--ckpt-every", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    reference = torchrun(os.path.join(ROOT, "train.py"), args + ["--output-dir", str(full), "--resume", "none"])
    finish(reference)

    def launch(script, env):
        return torchrun(script, args + ["--output-dir", str(part)], env=env)
    proc, pid = start_child(tmp_path, launch, {"FAULT_PAUSE_STEP": "3", "FAULT_PAUSE_RANK": "1"})
    os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, "torchrun must fail the job when a rank is killed"
    assert "ckpt_00000002.pt" in os.listdir(part) and "model.pt" not in os.listdir(part)
    assert logged_steps(part) == [1, 2, 3]

    out = finish(torchrun(os.path.join(ROOT, "train.py"), args + ["--output-dir", str(part)]))
    assert "resumed from" in out and "ckpt_00000002.pt" in out
    assert "weights identical on all 2 ranks: True" in out
    assert logged_steps(part) == logged_steps(full) == list(range(1, 9))
    assert_same_weights(full / "model.pt", part / "model.pt")



@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory):
    """A tiny pre-training model, what the fine-tuning runs below start from."""
    out = tmp_path_factory.mktemp("tiny_pretrained") / "run"
    run_train(TINY + ["--synthetic-images", "16", "--batch-size", "8", "--max-steps", "0", "--output-dir", str(out)])
    return str(out / "model.pt")


def finetune_run(task, init):
    """A fine-tuning run of 6 optimizer steps with a checkpoint every 2, on tiny synthetic data."""
    sizes = {"vqa": ["--synthetic-train", "16"], "nlvr2": ["--synthetic-train", "12"], "retrieval": ["--synthetic-train", "16"]}
    return ["--task", task, "--init", init, "--synthetic-val", "4", "--batch-size", "8", "--max-steps", "6",
            "--ckpt-every", "2", "--num-workers", "0", "--log-every", "1", "--device", "cpu"] + sizes[task]


@pytest.mark.parametrize("task", ["vqa", "nlvr2", "retrieval"])
def test_sigkill_mid_finetune_then_the_same_command_resumes_bit_identically(task, tmp_path, tiny_pretrained):
    """`python finetune.py` SIGKILLed after step 3 (checkpoint at step 2), then the same command: it
    resumes from step 2 and ends with the weights of an uninterrupted fine-tuning run, bit for bit."""
    args = finetune_run(task, tiny_pretrained)
    full, part = tmp_path / "full", tmp_path / "part"
    with one_thread():
        finetune.main(args + ["--output-dir", str(full), "--no-eval"])

    def launch(script, env):
        return subprocess.Popen([sys.executable, script] + args + ["--output-dir", str(part), "--no-eval"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1", FAULT_SCRIPT="finetune", **env))
    proc, pid = start_child(tmp_path, launch, {"FAULT_PAUSE_STEP": "3"})
    os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert "ckpt_00000002.pt" in os.listdir(part) and "model.pt" not in os.listdir(part)
    with one_thread():
        result = finetune.main(args + ["--output-dir", str(part), "--no-eval"])
    assert result["resumed_from"].endswith("ckpt_00000002.pt") and result["steps"] == 6
    assert logged_steps(part) == logged_steps(full) == list(range(1, 7))
    assert_same_weights(full / "model.pt", part / "model.pt")


def test_a_finetuning_checkpoint_exports_and_evaluates(tmp_path, tiny_pretrained):
    """A ckpt_*.pt of a fine-tuning run is a saved model too: export writes its folder, and evaluate.py
    scores it as it scores the run's own model.pt."""
    run = tmp_path / "run"
    with one_thread():
        finetune.main(["--task", "vqa", "--init", tiny_pretrained, "--synthetic-train", "16", "--synthetic-val", "4",
                       "--batch-size", "8", "--max-steps", "2", "--ckpt-every", "2", "--num-workers", "0",
                       "--device", "cpu", "--output-dir", str(run), "--no-eval"])
    export.main([str(run / "ckpt_00000002.pt"), str(tmp_path / "exported")])
    data = ["--vqa-root", str(run / "data" / "vqa"), "--split", "val2014", "--num-workers", "0"]
    from_ckpt = evaluate.main(["--task", "vqa", "--checkpoint", str(tmp_path / "exported"),
                               "--output-dir", str(tmp_path / "e1")] + data)
    from_model = evaluate.main(["--task", "vqa", "--checkpoint", str(run / "model.pt"),
                                "--output-dir", str(tmp_path / "e2")] + data)
    assert from_ckpt["overall"] == from_model["overall"] and from_ckpt["n_questions"] > 0

# -------------------------------------------------------------------------------------------------
#                      Damaged, foreign and hostile checkpoint files
# -------------------------------------------------------------------------------------------------

class CodeOnLoad:
    """Unpickling this runs a shell command: the payload of a hostile checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny pre-training run: ckpt_00000002.pt, ckpt_00000004.pt and model.pt."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run_train(TINY + ["--synthetic-images", "32", "--batch-size", "8", "--epochs", "1", "--ckpt-every", "2",
                      "--output-dir", str(out), "--resume", "none"])
    return out


def damaged_copies(folder, original: bytes, name: str, marker):
    """{kind: path} of five bad versions of a file whose good bytes are ``original``."""
    folder.mkdir(parents=True, exist_ok=True)
    contents = {"truncated": original[: len(original) // 2], "zero-byte": b"",
                "random-bytes": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()}
    wrong, crafted = io.BytesIO(), io.BytesIO()
    torch.save({"weights": torch.zeros(3)}, wrong)             # loads, but is no checkpoint
    torch.save(CodeOnLoad(marker), crafted)                    # would run `touch marker` if unpickled
    contents.update({"wrong-content": wrong.getvalue(), "crafted-pickle": crafted.getvalue()})
    paths = {}
    for kind, data in contents.items():
        (folder / kind).mkdir()
        paths[kind] = folder / kind / name
        paths[kind].write_bytes(data)
    return paths


@pytest.fixture
def marker(tmp_path):
    """The file a hostile pickle would create, and proof that the payload is live: plain pickle runs it."""
    import pickle
    probe = tmp_path / "payload-is-live"
    pickle.loads(pickle.dumps(CodeOnLoad(probe)))
    assert probe.exists()
    path = tmp_path / "code-ran"
    yield path
    assert not path.exists(), "a checkpoint loader ran code from a pickle"


@pytest.fixture
def bad_checkpoints(tmp_path, finished_run, marker):
    return damaged_copies(tmp_path / "bad", (finished_run / "ckpt_00000004.pt").read_bytes(), "ckpt_00000004.pt",
                          marker)


@pytest.fixture
def bad_models(tmp_path, finished_run, marker):
    return damaged_copies(tmp_path / "bad-models", (finished_run / "model.pt").read_bytes(), "model.pt", marker)


def tiny_trainer(out_dir):
    cfg = make_model_config("tiny", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                            image_short_side=32, image_long_side=32, num_sampled_pixels=2)
    data = list(range(16))
    train_cfg = make_train_config("pretrain", batch_size=8, epochs=1, num_workers=0)
    return Trainer(PixelBertForPreTraining(cfg), train_cfg, str(out_dir), data, lambda idx: {"num_samples": len(idx)},
                   epoch_batch_sampler(data, 8, 0), lambda *a: {}, DistInfo(), {})


REASONS = {"truncated": "truncated or damaged", "zero-byte": "truncated or damaged",
           "random-bytes": "truncated or damaged", "wrong-content": "not a training checkpoint",
           "crafted-pickle": "refused to load"}


def test_resume_auto_passes_over_every_kind_of_bad_newest_checkpoint(tmp_path, finished_run, bad_checkpoints,
                                                                       capsys):
    good = (finished_run / "ckpt_00000002.pt").read_bytes()
    for kind, path in bad_checkpoints.items():
        (path.parent / "ckpt_00000002.pt").write_bytes(good)
        found, _ = newest_valid_checkpoint(str(path.parent))
        assert found.endswith("ckpt_00000002.pt"), kind
        err = capsys.readouterr().err
        assert f"skipping {path}" in err and REASONS[kind] in err, (kind, err)


def test_resume_auto_refuses_a_folder_whose_every_checkpoint_is_bad(tmp_path, bad_checkpoints):
    for kind, path in bad_checkpoints.items():
        with pytest.raises(ValueError, match=f"no readable checkpoint in {path.parent}.*--resume none"):
            tiny_trainer(path.parent).resume("auto")


def test_resume_auto_end_to_end_skips_a_hostile_newest_checkpoint(tmp_path, finished_run, marker):
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt_00000002.pt").write_bytes((finished_run / "ckpt_00000002.pt").read_bytes())
    torch.save(CodeOnLoad(marker), run / "ckpt_00000003.pt")
    result = run_train(TINY + ["--synthetic-images", "32", "--batch-size", "8", "--epochs", "1",
                               "--output-dir", str(run)])
    assert result["resumed_from"].endswith("ckpt_00000002.pt") and result["steps"] == 4


def test_resume_path_refuses_every_kind_of_bad_checkpoint(tmp_path, bad_checkpoints):
    trainer = tiny_trainer(tmp_path / "run")
    for kind, path in bad_checkpoints.items():
        with pytest.raises(ValueError, match=REASONS[kind]) as err:
            trainer.resume(str(path))
        assert str(path) in str(err.value), kind
    with pytest.raises(FileNotFoundError, match="no-such.pt"):
        trainer.resume(str(tmp_path / "no-such.pt"))


MODEL_REASONS = {**REASONS, "wrong-content": "not a pixel-bert checkpoint"}


@pytest.mark.parametrize("entry", ["train --init", "finetune --init", "evaluate --checkpoint",
                                   "PixelBertPredictor.from_checkpoint"])
def test_model_checkpoint_loaders_refuse_every_kind_of_bad_file(tmp_path, bad_models, entry):
    for kind, path in bad_models.items():
        out = tmp_path / kind
        load = {"train --init": lambda: run_train(TINY + ["--init", str(path), "--output-dir", str(out)]),
                "finetune --init": lambda: finetune.main(["--task", "vqa", "--init", str(path), "--device", "cpu",
                                                          "--output-dir", str(out)]),
                "evaluate --checkpoint": lambda: evaluate.main(["--task", "vqa", "--checkpoint", str(path)]),
                "PixelBertPredictor.from_checkpoint": lambda: PixelBertPredictor.from_checkpoint(str(path))}[entry]
        with pytest.raises(ValueError, match=MODEL_REASONS[kind]) as err:
            load()
        assert str(path) in str(err.value), (kind, str(err.value))
        assert not out.exists() or not os.listdir(out), f"{entry} wrote files for a refused {kind} checkpoint"


def test_bert_and_backbone_weight_files_refuse_every_kind_of_bad_file(tmp_path, bad_models, marker):
    model = PixelBertForPreTraining(make_model_config("tiny", hidden_size=32, num_layers=1, num_heads=2,
                                                      intermediate_size=64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for kind, path in bad_models.items():
        weights_file = path.with_name("pytorch_model.bin")  # a Hugging Face BERT folder ...
        path.rename(weights_file)
        backbone_file = path.with_name("resnet18.pth")      # ... and a torchvision backbone file
        backbone_file.write_bytes(weights_file.read_bytes())
        reason = {"wrong-content": "no BERT embedding weights"}.get(kind, REASONS[kind])
        with pytest.raises(ValueError, match=reason) as err:
            load_bert_weights(model, str(weights_file.parent), verbose=False)
        assert str(weights_file) in str(err.value), kind
        reason = {"wrong-content": "no tensor matches a torchvision ResNet name"}.get(kind, reason)
        with pytest.raises(ValueError, match=reason) as err:
            load_backbone_weights(model, str(backbone_file), verbose=False)
        assert str(backbone_file) in str(err.value), kind
        if kind != "wrong-content":  # a dict of tensors is a state dict; the loaders above refuse its names
            with pytest.raises(ValueError, match=str(backbone_file)):
                read_state_dict(str(backbone_file))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded


def test_detectron_pkl_loader_refuses_every_kind_of_bad_file(tmp_path, marker):
    import pickle
    good = pickle.dumps({"blobs": {"conv1_w": np.zeros((64, 3, 7, 7), np.float32)}}, protocol=2)
    cases = {"truncated": (good[: len(good) // 2], "not a readable Caffe2 weights pickle"),
             "zero-byte": (b"", "not a readable Caffe2 weights pickle"),
             "random-bytes": (np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
                              "not a readable Caffe2 weights pickle"),
             "wrong-content": (pickle.dumps({"note": "no arrays here"}, protocol=2), "holds no numeric arrays"),
             "crafted-pickle": (pickle.dumps(CodeOnLoad(marker), protocol=2), "refused to load")}
    for kind, (data, reason) in cases.items():
        path = tmp_path / f"{kind}.pkl"
        path.write_bytes(data)
        with pytest.raises(ValueError, match=reason) as err:
            read_caffe2_blobs(str(path))
        assert str(path) in str(err.value), kind


# -------------------------------------------------------------------------------------------------
#                          An unwritable or full output folder
# -------------------------------------------------------------------------------------------------

FOLDER_RUN = TINY + ["--synthetic-images", "48", "--batch-size", "8", "--epochs", "1", "--ckpt-every", "2"]


def test_an_output_folder_that_cannot_be_created_stops_before_any_work(tmp_path):
    """A real fault for any user, root included: the output folder's parent is a regular file."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    expected = f"cannot create the output folder {re.escape(str(blocker))}/run.*--output-dir"
    with pytest.raises(UnwritableError, match=expected):
        run_train(FOLDER_RUN + ["--output-dir", str(blocker / "run")])
    assert os.listdir(tmp_path) == ["a-file"]


def fail_checkpoint_write(monkeypatch, out, step, fault):
    """Make the checkpoint write of ``step`` fail, through files.atomic_write, the way ``fault`` does:

    - "full": the disk fills half way through the write (the write raises ENOSPC);
    - "unwritable": the folder stops being writable. As a normal user the folder is chmod'ed to
      0o500 just before that write and the OS refuses it; root ignores permissions (as in CI
      containers), so for root the rename into place raises EACCES instead (os.replace patched).
    """
    name = f"ckpt_{step:08d}.pt"
    if fault == "full":
        real_save = torch.save

        def save_until_the_disk_is_full(obj, f, *args, **kwargs):
            if f"/.{name}." in os.readlink(f"/proc/self/fd/{f.fileno()}"):
                f.write(b"\0" * 1000)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_save(obj, f, *args, **kwargs)
        monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    elif os.geteuid() != 0:
        real_save_checkpoint = trainer.Trainer.save_checkpoint

        def lock_then_save(self):
            if self.step == step:
                os.chmod(out, 0o500)
            real_save_checkpoint(self)
        monkeypatch.setattr(trainer.Trainer, "save_checkpoint", lock_then_save)
    else:
        real_replace = os.replace

        def replace_refused(src, dst):
            if os.path.basename(dst) == name:
                raise PermissionError(errno.EACCES, "Permission denied", src)
            return real_replace(src, dst)
        monkeypatch.setattr(os, "replace", replace_refused)


@pytest.mark.parametrize("fault, error, message", [
    ("full", DiskFullError, "no space left on device while writing"),
    ("unwritable", UnwritableError, "cannot write")])
def test_a_checkpoint_write_that_fails_keeps_the_last_checkpoint_and_resumes(tmp_path, monkeypatch, fault, error,
                                                                             message):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        fail_checkpoint_write(patch, out, 4, fault)
        folder = re.escape(str(out))
        with pytest.raises(error, match=f"{message} {folder}/ckpt_00000004.pt.*folder {folder}.*intact"):
            run_train(FOLDER_RUN + ["--output-dir", str(out), "--resume", "none"])
    os.chmod(out, 0o755)
    assert sorted(f for f in os.listdir(out) if "ckpt" in f) == ["ckpt_00000002.pt"]  # no temporary file left
    assert read_training_checkpoint(str(out / "ckpt_00000002.pt"))["step"] == 2
    assert "model.pt" not in os.listdir(out) and "result.json" not in os.listdir(out)
    result = run_train(FOLDER_RUN + ["--output-dir", str(out)])
    assert result["resumed_from"].endswith("ckpt_00000002.pt") and result["steps"] == 6
    assert logged_steps(out) == list(range(1, 7))


# -------------------------------------------------------------------------------------------------
#                      The image matrix: load_image and the datasets
# -------------------------------------------------------------------------------------------------

def png_declaring(path, width, height):
    """A valid 1x1 PNG whose header claims width x height (a decompression bomb's header)."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


def make_image(kind, folder):
    """Write one image of ``kind``; returns its path."""
    path = folder / {"cmyk": "cmyk.jpg", "exif-rotated": "rotated.jpg", "truncated": "truncated.jpg"}.get(
        kind, f"{kind}.png")
    if kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "truncated":
        pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        path.write_bytes(path.read_bytes()[:700])
    elif kind == "random-bytes":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + np.random.default_rng(2).integers(0, 256, 2000, np.uint8).tobytes())
    elif kind == "rgba":
        pixels = np.zeros((8, 8, 4), np.uint8)
        pixels[:, :4] = (0, 0, 255, 255)   # opaque blue on the left, transparent on the right
        Image.fromarray(pixels, "RGBA").save(path)
    elif kind == "16-bit":
        Image.fromarray(np.full((6, 10), 65535 // 2, np.uint16)).save(path)
    elif kind == "palette":
        img = Image.new("P", (10, 6), 1)
        img.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
        img.save(path)
    elif kind == "cmyk":
        Image.new("CMYK", (10, 6), (0, 255, 255, 0)).save(path, quality=95)   # red ink
    elif kind == "exif-rotated":
        pixels = np.zeros((20, 40, 3), np.uint8)                             # stored 40 wide, 20 high
        pixels[:, :20], pixels[:, 20:] = (255, 0, 0), (0, 0, 255)            # red left, blue right
        exif = Image.Exif()
        exif[0x0112] = 6                                                     # "rotate 90 clockwise to show"
        Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)
    elif kind == "1x1":
        Image.new("RGB", (1, 1), (10, 20, 30)).save(path)
    elif kind == "1x5000":
        Image.new("RGB", (1, 5000), (10, 20, 30)).save(path)
    elif kind == "decompression-bomb":
        png_declaring(path, 20_000, 20_000)
    return path


def near(rgb, expected, tolerance=3):
    return all(abs(a - b) <= tolerance for a, b in zip(rgb, expected))


# kind -> ("bad", reason) or ("ok", displayed (width, height), check of the loaded RGB image)
IMAGE_CASES = {
    "zero-byte": ("bad", "corrupt_image"),
    "truncated": ("bad", "corrupt_image"),
    "random-bytes": ("bad", "corrupt_image"),
    "decompression-bomb": ("bad", "too_large"),
    "missing": ("bad", "missing_file"),
    "rgba": ("ok", (8, 8), lambda im: im.getpixel((1, 1)) == (0, 0, 255) and im.getpixel((6, 1)) == (255, 255, 255)),
    "16-bit": ("ok", (10, 6), lambda im: near(im.getpixel((0, 0)), (127, 127, 127), 1)),   # scaled, not clipped
    "palette": ("ok", (10, 6), lambda im: im.getpixel((3, 3)) == (0, 200, 0)),
    "cmyk": ("ok", (10, 6), lambda im: near(im.getpixel((5, 3)), (255, 0, 0), 12)),
    "exif-rotated": ("ok", (20, 40), lambda im: im.getpixel((10, 5))[0] > 200 and im.getpixel((10, 35))[2] > 200),
    "1x1": ("ok", (1, 1), lambda im: im.getpixel((0, 0)) == (10, 20, 30)),
    "1x5000": ("ok", (1, 5000), lambda im: im.getpixel((0, 4999)) == (10, 20, 30)),
}


@pytest.mark.parametrize("kind", sorted(IMAGE_CASES))
def test_image_matrix_loads_correctly_or_is_a_named_bad_sample(tmp_path, kind):
    expected = IMAGE_CASES[kind]
    path = str(make_image(kind, tmp_path))
    transform = ImageTransform(32, 32, IMAGENET_MEAN, IMAGENET_STD)
    train_set = CaptionDataset([CaptionRecord(path, "a red circle", "k:0")], transform)
    eval_set = vqa.VQADataset([vqa.VQAQuestion(1, 1, "what colour ?", path, ("red",) * 10)], ["red"], transform)
    pair_set = nlvr2.NLVR2Dataset([nlvr2.NLVR2Example("dev-1-0-0", "a red circle", True, path, path)], transform)
    items = [train_set[0], eval_set[0], pair_set[0]]
    if expected[0] == "bad":
        with pytest.raises(ImageLoadError) as err:
            load_image(path)
        assert err.value.reason == expected[1] and path in str(err.value)
        for item in items:
            assert isinstance(item, BadSample) and (item.path, item.reason) == (path, expected[1])
            assert path in item.message
        return
    _, size, looks_right = expected
    image = load_image(path)
    assert image.mode == "RGB" and image.size == size and looks_right(image)
    width, height = transform.output_size(*size)
    assert items[0]["image"].shape == items[1]["image"].shape == items[2]["left"].shape == (3, height, width)
    assert all(torch.isfinite(item["image" if "image" in item else "left"]).all() for item in items)


# -------------------------------------------------------------------------------------------------
#                   The annotation matrix: every reader, every kind of damage
# -------------------------------------------------------------------------------------------------

def coco_files():
    return {"captions.json": {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
                              "annotations": [{"id": 1, "image_id": 1, "caption": "a dog"},
                                              {"id": 2, "image_id": 2, "caption": "a cat"}]}}


def karpathy_files():
    image = lambda i, split: {"filepath": "train2014", "filename": f"{i}.jpg", "cocoid": i, "split": split,  # noqa
                              "sentences": [{"raw": f"caption {i}"}]}
    return {"dataset_coco.json": {"dataset": "coco", "images": [image(1, "train"), image(2, "restval")]}}


def vg_files():
    return {"image_data.json": [{"image_id": 1, "coco_id": None}, {"image_id": 2, "coco_id": 7}],
            "regions.json": [{"id": 1, "regions": [{"image_id": 1, "phrase": "a man"}]},
                             {"id": 2, "regions": [{"image_id": 2, "phrase": "a hat"}]}]}


def vqa_files():
    answers = [{"answer": "red", "answer_id": i + 1} for i in range(10)]
    ann = lambda q: {"question_id": q, "image_id": 1, "question_type": "what", "answer_type": "other",  # noqa
                     "multiple_choice_answer": "red", "answers": answers}
    return {"v2_OpenEnded_mscoco_train2014_questions.json": {"questions": [
                {"question_id": 10, "image_id": 1, "question": "what colour ?"},
                {"question_id": 11, "image_id": 1, "question": "what shape ?"}]},
            "v2_mscoco_train2014_annotations.json": {"annotations": [ann(10), ann(11)]}}


def nlvr2_lines():
    return [{"identifier": "dev-1-0-0", "sentence": "two dogs", "label": "True"},
            {"identifier": "dev-1-1-0", "sentence": "two dogs", "label": "False"}]


VQA_Q, VQA_A = "v2_OpenEnded_mscoco_train2014_questions.json", "v2_mscoco_train2014_annotations.json"
READERS = {  # name -> (files, file the damage goes into, read(folder))
    "coco captions": (coco_files, "captions.json",
                      lambda d: read_coco_captions(str(d / "captions.json"), str(d / "images"))),
    "karpathy": (karpathy_files, "dataset_coco.json", lambda d: read_karpathy(str(d / "dataset_coco.json"), str(d))),
    "vg regions": (vg_files, "regions.json",
                   lambda d: read_visual_genome(str(d / "regions.json"), str(d / "image_data.json"), str(d))),
    "vg image_data": (vg_files, "image_data.json",
                      lambda d: read_visual_genome(str(d / "regions.json"), str(d / "image_data.json"), str(d))),
    "vqa questions": (vqa_files, VQA_Q, lambda d: vqa.read_vqa(str(d), "train2014").questions),
    "vqa annotations": (vqa_files, VQA_A, lambda d: vqa.read_vqa(str(d), "train2014").questions),
    "nlvr2": (lambda: {"dev.json": nlvr2_lines()}, "dev.json",
              lambda d: nlvr2.read_nlvr2(str(d / "dev.json"), str(d / "images"))),
}
RETURNS_NOTHING = "returns an empty list (train.py / finetune.py refuse it: see the tests below)"


def drop(key, *where):
    def edit(obj):
        for step in where:
            obj = obj[step]
        del obj[key]
    return edit


def entry(*where, **changes):
    def edit(obj):
        for step in where:
            obj = obj[step]
        obj.update(changes)
    return edit


def repeat_first(*where):
    def edit(obj):
        for step in where:
            obj = obj[step]
        obj.append(json.loads(json.dumps(obj[0])))
    return edit


def empty(key):
    def edit(obj):
        obj[key] = []
    return edit


def clear(obj):
    """A file that is an empty list (JSON lines: a file with no line)."""
    obj.clear()


# (reader, damage) -> (edit of the parsed file, expected error pattern or RETURNS_NOTHING). Non-UTF-8
# bytes and truncated JSON need no edit and apply to every reader (test below).
ANNOTATION_CASES = {
    ("coco captions", "missing key"): (drop("caption", "annotations", 1), r"annotations\[1\] has no 'caption'"),
    ("coco captions", "id pointing nowhere"): (entry("annotations", 1, image_id=9), "image_id 9, which is not in"),
    ("coco captions", "duplicate id"): (repeat_first("images"), r"images\[2\] has id 1, which images\[0\] has too"),
    ("coco captions", "empty list"): (empty("annotations"), RETURNS_NOTHING),
    ("karpathy", "missing key"): (drop("split", "images", 0), r"images\[0\] has no 'split'"),
    ("karpathy", "duplicate id"): (repeat_first("images"), r"images\[2\] is image train2014/1.jpg, which images\[0\]"),
    ("karpathy", "empty list"): (empty("images"), RETURNS_NOTHING),
    ("vg regions", "missing key"): (drop("phrase", 0, "regions", 0), r"\[0\]\['regions'\]\[0\] has no 'phrase'"),
    ("vg regions", "id pointing nowhere"): (entry(1, id=5), "image 5, which .*image_data.json does not list"),
    ("vg regions", "duplicate id"): (repeat_first(), r"\[2\] is image 1, listed earlier"),
    ("vg regions", "empty list"): (clear, RETURNS_NOTHING),
    ("vg image_data", "missing key"): (drop("image_id", 1), r"\[1\] has no 'id'"),
    ("vg image_data", "id pointing nowhere"): (entry(1, image_id=3), "image 2, which .*image_data.json does not list"),
    ("vg image_data", "duplicate id"): (repeat_first(), r"\[2\] is image 1, listed earlier"),
    ("vg image_data", "empty list"): (clear, "image 1, which .*image_data.json does not list"),
    ("vqa questions", "missing key"): (drop("question", "questions", 1), r"questions\[1\] has no 'question'"),
    ("vqa questions", "id pointing nowhere"): (entry("questions", 1, question_id=99),
                                               "no annotation for question_id 99"),
    ("vqa questions", "duplicate id"): (repeat_first("questions"), r"questions\[2\] has question_id 10, asked earlier"),
    ("vqa questions", "empty list"): (empty("questions"), "2 annotations are of questions .* does not have"),
    ("vqa annotations", "missing key"): (drop("answers", "annotations", 0), "question_id 10 has no 'answers'"),
    ("vqa annotations", "id pointing nowhere"): (entry("annotations", 1, question_id=99),
                                                 "no annotation for question_id 11"),
    ("vqa annotations", "duplicate id"): (repeat_first("annotations"),
                                          r"annotations\[2\] has question_id 10, annotated earlier"),
    ("vqa annotations", "empty list"): (empty("annotations"), "no annotation for question_id 10"),
    ("nlvr2", "missing key"): (drop("sentence", 1),
                               "line 2: expected an object with string 'identifier' and 'sentence'"),
    ("nlvr2", "id pointing nowhere"): (entry(1, identifier="dev-1-1"), "line 2: NLVR2 identifier 'dev-1-1' is not"),
    ("nlvr2", "duplicate id"): (repeat_first(), "line 3: identifier 'dev-1-0-0' is on line 1 too"),
    ("nlvr2", "empty list"): (clear, "no examples"),
}


def write_reader_files(folder, reader, edit=None):
    make_files, target, _ = READERS[reader]
    contents = make_files()
    if edit is not None:
        edit(contents[target])
    for name, obj in contents.items():
        text = "".join(json.dumps(o) + "\n" for o in obj) if name.endswith("dev.json") else json.dumps(obj)
        (folder / name).write_text(text, encoding="utf-8")
    return folder / target


@pytest.mark.parametrize("reader, damage", sorted(ANNOTATION_CASES))
def test_annotation_matrix_names_the_file_and_the_problem(tmp_path, reader, damage):
    edit, expected = ANNOTATION_CASES[reader, damage]
    damaged = write_reader_files(tmp_path, reader, edit)
    read = READERS[reader][2]
    if expected == RETURNS_NOTHING:
        assert read(tmp_path) == []
        return
    with pytest.raises(AnnotationError, match=expected) as err:
        read(tmp_path)
    named = str(damaged) if reader != "vg image_data" or damage != "id pointing nowhere" else str(tmp_path)
    assert named in str(err.value)


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("damage", ["non-UTF-8 bytes", "truncated JSON"])
def test_every_reader_refuses_undecodable_files_naming_them(tmp_path, reader, damage):
    target = write_reader_files(tmp_path, reader)
    data = target.read_bytes()
    # (The cut is inside a line: a JSON-lines file cut exactly at a line end is a valid shorter file.)
    target.write_bytes(data[:1] + b"\xff\xfe" + data[1:] if damage == "non-UTF-8 bytes" else data[: len(data) // 2 + 7])
    with pytest.raises(AnnotationError, match="utf-8" if damage == "non-UTF-8 bytes" else "not valid JSON") as err:
        READERS[reader][2](tmp_path)
    assert str(target) in str(err.value)


def test_readers_match_their_clean_files(tmp_path):
    """The matrix's base files are valid: every reader reads them without error."""
    for reader in READERS:
        folder = tmp_path / reader.replace(" ", "_")
        folder.mkdir()
        write_reader_files(folder, reader)
        assert len(READERS[reader][2](folder)) == 2, reader


def test_an_nlvr2_identifier_without_images_is_a_counted_bad_sample(tmp_path):
    """Documented skip: an identifier whose image files do not exist reads fine and becomes a bad sample."""
    write_reader_files(tmp_path, "nlvr2")
    examples = READERS["nlvr2"][2](tmp_path)
    dataset = nlvr2.NLVR2Dataset(examples, ImageTransform(32, 32, IMAGENET_MEAN, IMAGENET_STD))
    assert dataset[0] == BadSample(examples[0].left_path, "missing_file", dataset[0].message)
    assert examples[0].left_path.endswith(os.path.join("images", "dev", "dev-1-0-img0.png"))


# -------------------------------------------------------------------------------------------------
#              Data flags that give nothing, or every sample bad: clear errors
# -------------------------------------------------------------------------------------------------

@pytest.fixture
def coco_world(tmp_path):
    """8 synthetic images as a COCO captions file (captions_train2014.json, images/, vocab.txt)."""
    folder = tmp_path / "coco"
    synthetic.main(["--out", str(folder), "--num-images", "8", "--image-size", "32"])
    return folder


def write(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


def assert_nothing_written(out):
    assert not out.exists() or os.listdir(out) == [], sorted(os.listdir(out))


def test_train_refuses_data_flags_that_yield_nothing(tmp_path, coco_world):
    vocab = ["--vocab-file", str(coco_world / "vocab.txt")]
    out = tmp_path / "run"
    empty_coco = write(tmp_path / "captions.json", {"images": [], "annotations": []})
    val_only = write(tmp_path / "dataset_coco.json", {"images": [
        {"filepath": "val2014", "filename": "1.jpg", "cocoid": 1, "split": "val", "sentences": [{"raw": "x"}]}]})
    info = write(tmp_path / "image_data.json", [{"image_id": 1, "coco_id": None}])
    no_regions = write(tmp_path / "regions.json", [{"id": 1, "regions": []}])
    cases = [(["--coco-captions", empty_coco], "--coco-captions .*captions.json: 'annotations' lists no caption"),
             (["--coco-karpathy", val_only, "--coco-images", str(tmp_path)],
              r"dataset_coco.json: no caption in the train and restval splits \(images per split: train 0, "
              "restval 0, val 1, test 0"),
             (["--vg-regions", no_regions, "--vg-image-data", info, "--vg-images", str(tmp_path)],
              "regions.json: no region description")]
    for flags, message in cases:
        with pytest.raises(AnnotationError, match=message):
            run_train(TINY + vocab + flags + ["--output-dir", str(out)])
        assert_nothing_written(out)


@pytest.mark.parametrize("flags, message", [
    (["--coco-images", "/data/coco"], "--coco-images is given without --coco-karpathy"),
    (["--coco-captions-images", "/data/x"], "--coco-captions-images is given without --coco-captions"),
    (["--vg-images", "/data/vg"], "--vg-images is given without --vg-regions")])
def test_train_refuses_an_image_folder_without_its_annotations(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + flags + ["--output-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert_nothing_written(tmp_path / "run")


def test_finetune_refuses_task_files_that_yield_nothing_and_foreign_flags(tmp_path, coco_world, capsys):
    common = ["--model-preset", "tiny", "--vocab-file", str(coco_world / "vocab.txt"), "--device", "cpu",
              "--output-dir", str(tmp_path / "run"), "--no-eval"]  # the training files alone (no val/dev here)
    vqa_root = tmp_path / "vqa"
    vqa_root.mkdir()
    write(vqa_root / VQA_Q, {"questions": []})
    write(vqa_root / VQA_A, {"annotations": []})
    with pytest.raises(AnnotationError, match=f"{re.escape(str(vqa_root / VQA_Q))}: 'questions' is an empty list"):
        finetune.main(["--task", "vqa", "--vqa-root", str(vqa_root)] + common)
    test_only = write(tmp_path / "dataset_flickr30k.json", {"images": [
        {"filename": "1.jpg", "split": "test", "sentences": [{"raw": "x"}]}]})
    with pytest.raises(AnnotationError, match="dataset_flickr30k.json: no caption in the train split"):
        finetune.main(["--task", "retrieval", "--karpathy-json", test_only] + common)
    (tmp_path / "nlvr2").mkdir()
    (tmp_path / "nlvr2" / "train.json").write_text("\n")
    with pytest.raises(AnnotationError, match="train.json: no examples"):
        finetune.main(["--task", "nlvr2", "--nlvr2-root", str(tmp_path / "nlvr2")] + common)
    for flags, message in [
            (["--task", "vqa", "--nlvr2-root", "x"], "--nlvr2-root is a data flag of --task nlvr2"),
            (["--task", "nlvr2", "--nlvr2-images", "x"], "--nlvr2-images is given without --nlvr2-root")]:
        with pytest.raises(SystemExit) as exit_info:
            finetune.main(flags + common)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert_nothing_written(tmp_path / "run")


def test_every_sample_bad_stops_the_run_naming_the_files_and_the_wrong_root(tmp_path, coco_world):
    out = tmp_path / "run"
    wrong_root = tmp_path / "coco" / "imgs"   # the images are in coco/images
    with pytest.raises(BadDataError) as err, pytest.warns(BadSampleWarning, match="image file not found"):
        run_train(TINY + ["--vocab-file", str(coco_world / "vocab.txt"), "--batch-size", "4",
                          "--coco-captions", str(coco_world / "captions_train2014.json"),
                          "--coco-captions-images", str(wrong_root), "--output-dir", str(out)])
    message = str(err.value)
    assert "8 of the 8 samples seen in epoch 0 were bad" in message
    assert f"first bad files: {wrong_root}{os.sep}" in message and "(missing_file)" in message
    assert f"{wrong_root} does not exist (the nearest folder that does is {coco_world})" in message
    assert "model.pt" not in os.listdir(out) and "result.json" not in os.listdir(out)
    assert not [f for f in os.listdir(out) if f.startswith("ckpt_")]


def test_an_evaluation_whose_every_image_is_missing_stops(tmp_path, coco_world):
    tokenizer = WordPieceTokenizer(str(coco_world / "vocab.txt"))
    questions = [vqa.VQAQuestion(i, i, "what colour ?", str(tmp_path / "nowhere" / f"{i}.jpg")) for i in range(3)]
    dataset = vqa.VQADataset(questions, ["red"], ImageTransform(32, 32, IMAGENET_MEAN, IMAGENET_STD))
    with pytest.warns(BadSampleWarning), pytest.raises(BadDataError, match=r"every one of the 3 questions .*"
                                                       rf"{re.escape(str(tmp_path / 'nowhere'))} does not exist"):
        predict_sharded(torch.nn.Linear(1, 1), dataset, vqa.VQACollator(tokenizer, 8, 1), DistInfo(),
                        lambda *a: {}, unit="questions")


def test_a_bad_file_is_warned_about_once_per_run_across_workers_and_epochs(tmp_path, coco_world):
    """Two DataLoader workers, two epochs, each bad file read by both workers in each epoch: one
    warning per file for the whole run, while every occurrence is still counted."""
    images = coco_world / "images"
    good = sorted(str(p) for p in images.iterdir())
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    bad = [str(tmp_path / "missing-1.png"), str(tmp_path / "missing-2.png"), str(broken)]
    records = [CaptionRecord(p, "a red circle", f"k:{i}") for i, p in enumerate(good + bad * 4)]  # 8 good, 12 bad
    tokenizer = WordPieceTokenizer(str(coco_world / "vocab.txt"))
    cfg = make_model_config("tiny", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    model = PixelBertForPreTraining(cfg)
    train_cfg = make_train_config("pretrain", batch_size=4, epochs=2, num_workers=2, max_bad_sample_fraction=0.9,
                                  log_every=1)
    dataset = CaptionDataset(records, ImageTransform(32, 32, IMAGENET_MEAN, IMAGENET_STD))
    step_fn = lambda m, batch, step: {"loss": m.bert.text_embedding.word.weight.pow(2).mean()}  # noqa: E731
    trainer = Trainer(model, train_cfg, str(tmp_path / "run"), dataset, CaptionCollator(tokenizer, 8),
                      epoch_batch_sampler(dataset, 4, 0), step_fn, DistInfo(), {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit()
    warned = Counter(path for w in caught if issubclass(w.category, BadSampleWarning)
                     for path in bad if f"skipping bad sample: {path}:" in str(w.message))
    assert warned == {path: 1 for path in bad}
    assert len([w for w in caught if issubclass(w.category, BadSampleWarning)]) == 3
    epochs = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"kind": "epoch"' in line]
    assert [e["bad_samples"] for e in epochs] == [12, 12]
    assert sum(trainer.bad_sample_reporter.counts.values()) == 24


# -------------------------------------------------------------------------------------------------
#                          The inference API and the visualiser's flags
# -------------------------------------------------------------------------------------------------

def test_inference_image_errors_speak_of_the_file(tmp_path, coco_world):
    cfg = make_model_config("tiny", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    predictor = PixelBertPredictor(PixelBertForPreTraining(cfg), WordPieceTokenizer(str(coco_world / "vocab.txt")),
                                   "pretrain")
    broken = make_image("truncated", tmp_path)
    missing = tmp_path / "missing.png"
    for path, words in [(missing, "image file not found"), (broken, "cannot decode image")]:
        for call in (predictor.match, predictor.attention_maps):
            with pytest.raises(ImageLoadError) as err:
                call(str(path), "a red circle")
            assert str(err.value).startswith(f"{path}: {words}") and "annotation" not in str(err.value)
    assert 0.0 <= predictor.match(str(next((coco_world / "images").iterdir())), "a red circle") <= 1.0


@pytest.mark.parametrize("flag, value", [("--panel-size", "0"), ("--panel-size", "-3"), ("--columns", "0")])
def test_visualize_refuses_a_panel_size_or_column_count_below_one(capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        visualize.get_args_parser().parse_args(["--checkpoint", "m.pt", "--image", "i.png", "--text", "a",
                                                flag, value])
    assert exit_info.value.code == 2 and f"{flag}: must be >= 1, got '{value}'" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------
#        Refusals that keep a run honest: wrong flags, another batch layout, too many bad samples
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value, message", [
    ("--ckpt-every", "0", "must be >= 1"), ("--keep-checkpoints", "0", "must be >= 1"),
    ("--mlm-probability", "1.5", "must be between 0 and 1"), ("--hidden-size", "0", "must be >= 1"),
    ("--batch-size", "eight", "expected an integer"), ("--max-text-len", "1", "must be >= 3"),
    ("--max-text-len", "65", "exceeds the 64 text positions")])
def test_a_wrong_field_flag_is_an_argparse_error_naming_it(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + [flag, value, "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and (flag.lstrip("-").replace("-", "_") in err or flag in err)
    assert_nothing_written(tmp_path / "run")


@pytest.mark.parametrize("flags, differs", [(["--grad-accum-steps", "2"], "grad_accum_steps 1 -> 2"),
                                            (["--batch-size", "4"], "batch_size 8 -> 4")])
def test_resume_with_another_batch_layout_is_refused(tmp_path, finished_run, flags, differs):
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt_00000004.pt").write_bytes((finished_run / "ckpt_00000004.pt").read_bytes())
    with pytest.raises(ValueError, match=f"this run has {differs}.*--init"):
        run_train(TINY + ["--synthetic-images", "32", "--batch-size", "8", "--epochs", "1", "--output-dir", str(run)]
                  + flags)
    assert "config.json" not in os.listdir(run) and "model.pt" not in os.listdir(run)  # nothing trained
    assert (run / "ckpt_00000004.pt").read_bytes() == (finished_run / "ckpt_00000004.pt").read_bytes()


def test_resume_with_another_number_of_processes_is_refused(tmp_path, finished_run):
    trainer = tiny_trainer(tmp_path / "run")
    trainer.info = DistInfo(world_size=2)  # only the layout check reads it: a 1-process checkpoint on 2
    path = str(finished_run / "ckpt_00000004.pt")
    with pytest.raises(ValueError, match="this run has world_size 1 -> 2"):
        trainer.check_layout(path, read_training_checkpoint(path))


def test_too_many_bad_samples_stop_the_run_mid_epoch(tmp_path, coco_world):
    """Half the images missing: the run stops as soon as bad_sample_check_after samples are seen."""
    good = sorted(str(p) for p in (coco_world / "images").iterdir())
    records = [CaptionRecord(p, "a red circle", "k") for pair in zip(good, [str(tmp_path / "gone.png")] * 8)
               for p in pair] * 2
    cfg = make_model_config("tiny", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    train_cfg = make_train_config("pretrain", batch_size=4, num_workers=0, bad_sample_check_after=8)
    dataset = CaptionDataset(records, ImageTransform(32, 32, IMAGENET_MEAN, IMAGENET_STD))
    steps = []

    def step_fn(model, batch, step):
        steps.append(step)
        return {"loss": model.bert.text_embedding.word.weight.pow(2).mean()}
    trainer = Trainer(PixelBertForPreTraining(cfg), train_cfg, str(tmp_path / "run"), dataset,
                      CaptionCollator(WordPieceTokenizer(str(coco_world / "vocab.txt")), 8),
                      epoch_batch_sampler(dataset, 4, 0), step_fn, DistInfo(), {})
    with pytest.raises(BadDataError, match=r"of the 8 samples seen in epoch 0 were bad.*--max-bad-sample-fraction "
                                           rf"0.05.*{re.escape(str(tmp_path / 'gone.png'))} \(missing_file\)"), \
            pytest.warns(BadSampleWarning):
        trainer.fit()
    assert len(steps) == 2  # two batches of the 8 in the epoch, then the stop


def test_evaluate_refuses_a_vqa_checkpoint_whose_answers_do_not_fit_its_head(tmp_path, coco_world):
    from pixel_bert.heads import PixelBertForVQA
    from pixel_bert.saved_model import save_model
    model = PixelBertForVQA(make_model_config("tiny", hidden_size=32, num_layers=1, num_heads=2,
                                              intermediate_size=64, num_answers=3))
    path = str(tmp_path / "model.pt")
    vocab = (coco_world / "vocab.txt").read_text().splitlines()
    save_model(model, path, extra={"task": "vqa", "vocab": vocab, "answers": ["red", "blue"]})
    with pytest.raises(ValueError, match="lists 2 answers but its VQA head scores 3"):
        evaluate.main(["--task", "vqa", "--checkpoint", path])


def test_retrieval_evaluation_names_every_unreadable_image_before_scoring(tmp_path):
    from pixel_bert import retrieval_scoring
    from pixel_bert.heads import PixelBertForRetrieval
    cfg = make_model_config("tiny", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    model = PixelBertForRetrieval(cfg).eval()
    paths = []
    for i in range(7):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (40, 32), (30 * i, 90, 200)).save(paths[-1])
    os.remove(paths[1])                                      # missing
    open(paths[4], "wb").write(b"\x89PNG\r\n\x1a\n garbage")  # corrupt
    open(paths[6], "wb").close()                             # empty
    transform = ImageTransform(32, 64, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ImageLoadError, match=r"^3 of 7 evaluation images cannot be read") as err:
        retrieval_scoring.encode_images(model, paths, range(7), transform, torch.device("cpu"), batch_size=2,
                                log=lambda *_: None)  # the first bad one is in the first batch
    for bad in (paths[1], paths[4], paths[6]):
        assert bad in str(err.value)
    for good in (paths[0], paths[2], paths[3], paths[5]):
        assert good not in str(err.value)
    cache = retrieval_scoring.encode_images(model, paths[::2][:2] + [paths[5]], range(3), transform,
                                    torch.device("cpu"), batch_size=2, log=lambda *_: None)
    assert cache.embeddings.shape[0] == 3  # readable images alone go through
