"""scripts/slurm_pretrain.sh without SLURM: fake `srun` / `scontrol` on PATH, two "nodes" as two local
torchrun launchers of one CPU process each, meeting at a c10d rendezvous on 127.0.0.1."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "slurm_pretrain.sh")
TINY = ["--hidden_size", "64", "--num_layers", "2", "--num_heads", "4", "--intermediate_size", "128",
        "--image_short_side", "64", "--image_long_side", "64", "--num_sampled_pixels", "8",
        "--num_workers", "0", "--log_every", "1", "--device", "cpu"]

# srun with one task per node: the command once per node, all at once; the job fails if one fails.
FAKE_SRUN = """#!/bin/bash
echo "srun $*" >> "$FAKE_SLURM_LOG"
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
# srun whose training runs until the job is requeued (the fake scontrol ends it, as SLURM would)
WAITING_SRUN = """#!/bin/bash
touch "$FAKE_SLURM_STARTED"
while [[ ! -f "$FAKE_SLURM_DONE" ]]; do sleep 0.1; done
"""
FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$FAKE_SLURM_LOG"
case "$1 $2" in
    "show hostnames") printf '127.0.0.1\\n127.0.0.2\\n' ;;
    "requeue "*) touch "$FAKE_SLURM_DONE" ;;
esac
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_slurm(tmp_path, srun: str) -> dict:
    """A PATH with the fake commands and the environment of a 2-node allocation, 1 GPU per node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", srun), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OMP_NUM_THREADS="1",
                SLURM_JOB_ID="4242", SLURM_JOB_NAME="pixelbert-pretrain", SLURM_JOB_NODELIST="node[1-2]",
                SLURM_NNODES="2", SLURM_GPUS_PER_NODE="1", SLURM_CPUS_ON_NODE="1", SLURM_SUBMIT_DIR=ROOT,
                RUN_DIR=str(tmp_path / "run"), RDZV_PORT=str(_free_port()),
                TORCHRUN=f"{sys.executable} -m torch.distributed.run",
                FAKE_SLURM_LOG=str(tmp_path / "slurm.log"), FAKE_SLURM_DONE=str(tmp_path / "done"),
                FAKE_SLURM_STARTED=str(tmp_path / "started"))


def test_two_nodes_train_to_identical_weights(tmp_path):
    env = _fake_slurm(tmp_path, FAKE_SRUN)
    cmd = ["bash", SCRIPT] + TINY + ["--synthetic-images", "64", "--batch_size", "8", "--max-steps", "3",
                                     "--synthetic-eval-images", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "weights identical on all 2 ranks: True" in proc.stdout, proc.stdout[-2000:]
    assert "2 process(es)" in proc.stdout and "2 nodes x 1 processes, rendezvous 127.0.0.1:" in proc.stdout
    # identical weights alone would also hold if both nodes trained on the same samples: each node's
    # share is half the 64 images (4 steps of 8, not 8), and tests/test_train.py's
    # test_two_processes_with_half_the_batch_train_the_one_process_model checks that the shares are
    # disjoint and together train the one-process model
    assert "1 epochs x 4 steps, 8 per process x 1 accumulation x 2 processes = 16 samples per step" in proc.stdout
    log = (tmp_path / "slurm.log").read_text()
    assert "scontrol show hostnames node[1-2]" in log and "--kill-on-bad-exit=1" in log
    assert f"--rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:{env['RDZV_PORT']} --rdzv-id=4242" in log
    run = tmp_path / "run"
    assert json.load(open(run / "result.json"))["steps"] == 3
    model = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    assert model["model_config"]["hidden_size"] == 64
    assert "--resume auto" in log  # a requeued job continues from the run folder's newest checkpoint
    assert any(p.startswith("ckpt_00000003") for p in os.listdir(run))


def test_sigusr1_requeues_the_job(tmp_path):
    env = _fake_slurm(tmp_path, WAITING_SRUN)
    proc = subprocess.Popen(["bash", SCRIPT, "--config", "pretrain-x152"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=str(tmp_path))
    deadline = time.time() + 60
    while not (tmp_path / "started").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends before the time limit
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "SIGUSR1: requeueing job 4242" in out
    assert "scontrol requeue 4242" in (tmp_path / "slurm.log").read_text()
