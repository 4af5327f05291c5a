"""A run folder belongs to one run, and an error the user caused is one line.

- `checkpoints.RunLock`: a second run in a folder is refused naming the first (host, process, start);
  a lock left by a dead process, or one whose heartbeat stopped (a dead node), is taken over.
- Resuming refuses checkpoints of another task or model configuration, naming each difference and the
  ways out, and warns when a data flag changed.
- The scripts end a user's error with ``error: <message>`` and exit status 1, without a traceback
  (``--debug`` shows it); a bug keeps its traceback; Ctrl-C says what was saved.
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from pixel_bert import finetune, train
from pixel_bert.checkpoints import LOCK_FILE, RunLock, check_plain_data
from pixel_bert.cli import NOT_GIVEN, run_cli
from pixel_bert.config import make_model_config, make_train_config
from pixel_bert.distributed import DistInfo
from pixel_bert.errors import RunFolderError, RunInterrupted, UserError
from pixel_bert.heads import PixelBertForPreTraining
from pixel_bert.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--hidden-size", "32", "--num-layers", "1", "--num-heads", "2", "--intermediate-size", "64",
        "--image-short-side", "32", "--image-long-side", "32", "--num-sampled-pixels", "2",
        "--num-workers", "0", "--synthetic-eval-images", "0", "--device", "cpu", "--log-every", "1",
        "--synthetic-images", "32", "--batch-size", "8", "--epochs", "1"]


def write_lock(folder, **holder):
    path = os.path.join(folder, LOCK_FILE)
    with open(path, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": "2026-01-01T00:00:00",
                   "command": "python train.py", **holder}, f)
    return path


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---- the lock ------------------------------------------------------------------------------------

def test_a_held_lock_refuses_a_second_run_naming_the_first(tmp_path):
    first = RunLock(str(tmp_path))
    assert first.acquire() is None
    with pytest.raises(RunFolderError, match=rf"in use by another run: host {socket.gethostname()}, process "
                                             rf"{os.getpid()}, started {first.me['started']}"):
        RunLock(str(tmp_path)).acquire()
    first.release()
    assert not os.path.exists(tmp_path / LOCK_FILE)
    again = RunLock(str(tmp_path))
    assert again.acquire() is None  # released: free again
    again.release()


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over(tmp_path):
    pid = dead_pid()
    write_lock(tmp_path, pid=pid)
    lock = RunLock(str(tmp_path))
    note = lock.acquire()
    assert f"process {pid}" in note and "is gone" in note
    assert json.load(open(tmp_path / LOCK_FILE))["pid"] == os.getpid()
    lock.release()


def test_another_hosts_lock_is_refused_while_its_heartbeat_is_fresh_and_taken_over_once_stale(tmp_path):
    path = write_lock(tmp_path, host="node-7", pid=4242)
    with pytest.raises(RunFolderError, match="host node-7, process 4242"):
        RunLock(str(tmp_path), stale_after=60).acquire()
    old = time.time() - 120
    os.utime(path, (old, old))  # its node died two minutes ago
    lock = RunLock(str(tmp_path), stale_after=60)
    note = lock.acquire()
    assert "node-7" in note and "heartbeat" in note
    lock.release()


def test_the_holder_keeps_its_lock_fresh(tmp_path):
    lock = RunLock(str(tmp_path), heartbeat=0.05)
    lock.acquire()
    path = tmp_path / LOCK_FILE
    old = time.time() - 100
    os.utime(path, (old, old))
    time.sleep(0.5)
    assert time.time() - os.stat(path).st_mtime < 5
    lock.release()


# The first run: train.py, held after its first optimizer step until the test lets it go on.
FIRST_RUN = """
import os, sys, time
sys.path.insert(0, {root!r})
from pixel_bert import train, trainer
after_step = trainer.Trainer.after_step


def after_step_then_wait(self, stats, total_steps):
    after_step(self, stats, total_steps)
    if self.step == 1:
        open(os.environ["HELD"], "w").close()
        while not os.path.exists(os.environ["GO_ON"]):
            time.sleep(0.05)


trainer.Trainer.after_step = after_step_then_wait
train.cli()
"""


def test_two_runs_started_in_one_folder_the_second_is_refused(tmp_path):
    """Two `python train.py` in the same folder at once: the second ends with one error line naming the
    first run's host and process, and the first trains to the end alone (each step logged once)."""
    out = str(tmp_path / "run")
    script = tmp_path / "first.py"
    script.write_text(FIRST_RUN.format(root=ROOT))
    held, go_on = tmp_path / "held", tmp_path / "go_on"
    env = dict(os.environ, OMP_NUM_THREADS="1", HELD=str(held), GO_ON=str(go_on))
    args = TINY + ["--output-dir", out, "--resume", "none"]
    first = subprocess.Popen([sys.executable, str(script)] + args, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while not held.exists():
        assert first.poll() is None and time.time() < deadline, first.communicate()[1][-2000:]
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "train.py"] + args, cwd=ROOT, capture_output=True, text=True,
                            env=env, timeout=300)
    go_on.touch()
    _, err_first = first.communicate(timeout=300)
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert second.stderr.strip().splitlines()[-1].startswith(f"error: {out} is in use by another run: host "
                                                             f"{socket.gethostname()}, process {first.pid}, started ")
    assert first.returncode == 0, err_first[-2000:]
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl")) if '"train"' in line]
    assert steps == [1, 2, 3, 4]
    assert not os.path.exists(os.path.join(out, LOCK_FILE))


# ---- resuming another run ------------------------------------------------------------------------

def test_resume_with_another_model_configuration_is_refused_naming_each_field(tmp_path):
    out = str(tmp_path / "run")
    train.main(TINY + ["--output-dir", out, "--max-steps", "2", "--ckpt-every", "2"])
    bigger = list(TINY)
    bigger[bigger.index("--hidden-size") + 1] = "64"
    bigger[bigger.index("--intermediate-size") + 1] = "128"
    with pytest.raises(RunFolderError) as err:
        train.main(bigger + ["--output-dir", out])
    message = str(err.value)
    assert "hidden_size 32 -> 64" in message and "intermediate_size 64 -> 128" in message
    assert "--output-dir" in message and "--resume none" in message and "--init" in message
    assert "size mismatch" not in message


def test_resume_on_other_data_warns_naming_the_flag(tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(TINY + ["--output-dir", out, "--max-steps", "2", "--ckpt-every", "2"])
    capsys.readouterr()
    train.main(TINY + ["--output-dir", out, "--max-steps", "3", "--synthetic-seed", "7"])
    printed = capsys.readouterr().out
    assert "warning: resuming" in printed and "another --synthetic-seed: 0 -> 7" in printed
    assert json.load(open(os.path.join(out, "result.json")))["steps"] == 3  # and went on, on the new data


def test_finetune_in_a_pretraining_run_folder_is_refused_naming_both_tasks(tmp_path):
    out = str(tmp_path / "run")
    train.main(TINY + ["--output-dir", out, "--max-steps", "2", "--ckpt-every", "2"])
    with pytest.raises(RunFolderError, match=r"checkpoint of a 'pretrain' run; this is a 'vqa' run.*--output-dir"):
        finetune.main(["--task", "vqa", "--init", os.path.join(out, "model.pt"), "--output-dir", out,
                       "--synthetic-train", "8", "--synthetic-val", "4", "--max-steps", "1", "--num-workers", "0",
                       "--batch-size", "8"])


# ---- what a checkpoint holds ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def pretrained_tiny(tmp_path_factory):
    """A tiny pre-training model (no step taken), what fine-tuning starts from."""
    out = tmp_path_factory.mktemp("pre") / "run"
    train.main(TINY + ["--output-dir", str(out), "--max-steps", "0"])
    return str(out / "model.pt")


def test_a_checkpoint_holds_plain_data_only():
    check_plain_data({"a": [1, 2.5, ("x", None, True)], "b": {"c": "d"}})
    with pytest.raises(TypeError, match=r"run_config\['data'\]\['vqa_min_answer_count'\] is a _NotGiven"):
        check_plain_data({"data": {"vqa_min_answer_count": NOT_GIVEN}})


@pytest.mark.parametrize("task", ["vqa", "nlvr2", "retrieval"])
def test_finetune_checkpoints_load_with_weights_only_with_every_flag_set(task, tmp_path, pretrained_tiny):
    flags = {"vqa": ["--vqa-min-answer-count", "1", "--vqa-drop-unanswerable", "true",
                     "--vqa-train-splits", "train2014"],
             "nlvr2": [],
             "retrieval": ["--retrieval-negatives", "4", "--retrieval-hard-negatives", "2", "--retrieval-negative-kind",
                           "captions", "--retrieval-loss", "all21", "--retrieval-head-from-itm", "false",
                           "--retrieval-eval-pairs", "64"]}[task]
    for label, extra in (("defaults", []), ("flags", flags + ["--eval-batch-size", "4", "--lr", "3e-4"])):
        out = str(tmp_path / label)
        finetune.main(["--task", task, "--init", pretrained_tiny, "--output-dir", out, "--synthetic-train", "8",
                       "--synthetic-val", "4", "--max-steps", "1", "--num-workers", "0", "--no-eval",
                       "--batch-size", "8"] + extra)
        ckpts = sorted(f for f in os.listdir(out) if f.startswith("ckpt_"))
        ckpt = torch.load(os.path.join(out, ckpts[-1]), map_location="cpu", weights_only=True)
        assert ckpt["run_config"]["task"] == task and ckpt["step"] == 1


# ---- errors the user caused ----------------------------------------------------------------------

def test_a_user_error_is_one_line_without_a_traceback_and_debug_shows_it(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    cmd = [sys.executable, "train.py", "--output-dir", str(a_file), "--max-steps", "1"]
    plain = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines() == [f"error: cannot create the output folder {a_file} (File exists); "
                                                 "choose another --output-dir"]
    debug = subprocess.run(cmd + ["--debug"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "UnwritableError" in debug.stderr


def test_run_cli_keeps_a_bugs_traceback_and_reports_ctrl_c(capsys):
    with pytest.raises(ZeroDivisionError):
        run_cli(lambda: 1 / 0, argv=[])

    def user_error():
        raise UserError("bad flag")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(user_error, argv=[])
    assert exit_info.value.code == 1 and capsys.readouterr().err == "error: bad flag\n"

    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as exit_info:
        run_cli(interrupted, argv=[])
    assert exit_info.value.code == 130 and "interrupted" in capsys.readouterr().err


def test_ctrl_c_during_training_names_the_checkpoint_to_resume_from(tmp_path):
    cfg = make_model_config("tiny", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    model = PixelBertForPreTraining(cfg)
    calls = []

    def step_fn(model, batch, step):
        calls.append(step)
        if step == 3:
            raise KeyboardInterrupt
        return {"loss": model.bert.text_embedding.word.weight.pow(2).mean()}
    data = [{"num_samples": 1}] * 16
    trainer = Trainer(model, make_train_config("pretrain", batch_size=1, ckpt_every=2, num_workers=0, epochs=1),
                      str(tmp_path), data, lambda b: b[0], lambda epoch: [[i] for i in range(16)], step_fn,
                      DistInfo(), {"task": "pretrain"})
    with pytest.raises(RunInterrupted, match=r"interrupted at step 3: the newest checkpoint is .*ckpt_00000002\.pt; "
                                             r"run the same command again"):
        trainer.fit()
