"""Data-parallel scaling of the training loop: samples/s of the demo (train.py) at 1..N processes.

    python benchmarks/scaling.py                          # CPU: 1 and 2 processes (torchrun, gloo)
    python benchmarks/scaling.py --device cuda            # GPU: 1 and all GPUs of this machine (NCCL)

Each setting runs ``torchrun --standalone --nproc_per_node=N train.py --config demo`` for
--max-steps optimizer steps in a fresh folder and reads the run's metrics.jsonl. The rate is taken
between the first progress line (after --warmup-steps, so start-up, worker launch and the first
steps are left out) and the last: samples/s = (steps between them) x batch x N / seconds between them.
Efficiency = rate at N / (N x rate at 1). On CPU the processes share the machine's cores (train.py
splits them unless --threads sets OMP_NUM_THREADS), so CPU figures show the loop's overhead, not
speed-up; GPUs each bring their own compute.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from common import csv_list, machine, print_table, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default auto)")
    p.add_argument("--nprocs", default=None, help="process counts (default: 1,2 on CPU; 1 and every GPU on CUDA)")
    p.add_argument("--max-steps", type=int, default=30, help="optimizer steps per run (default 30)")
    p.add_argument("--warmup-steps", type=int, default=10, help="steps before the timed window (default 10)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per process per step (default: the demo's 32)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each process (default: train.py "
                   "splits the cores)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return p


def steady_rate(metrics_file: str, batch: int, nprocs: int) -> float:
    """samples/s between the first and the last progress line. Each line's samples_per_s is the mean
    rate since the loop started, so its elapsed time is samples so far / that rate."""
    lines = [json.loads(x) for x in open(metrics_file) if x.strip()]
    train = [r for r in lines if r.get("kind") == "train"]
    if len(train) < 2:
        raise SystemExit(f"{metrics_file}: fewer than two progress lines; raise --max-steps above --warmup-steps")
    elapsed = [r["step"] * batch * nprocs / r["samples_per_s"] for r in (train[0], train[-1])]
    return (train[-1]["step"] - train[0]["step"]) * batch * nprocs / (elapsed[1] - elapsed[0])


def run_demo(nprocs: int, args, device: str, folder: str) -> dict:
    out = os.path.join(folder, f"n{nprocs}")
    batch = args.batch_size or 32
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nprocs}",
           os.path.join(ROOT, "train.py"), "--config", "demo", "--device", device, "--output-dir", out,
           "--resume", "none", "--max-steps", str(args.max_steps), "--log_every", str(args.warmup_steps),
           "--ckpt_every", "1000000", "--synthetic-eval-images", "0", "--batch_size", str(batch)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rate = steady_rate(os.path.join(out, "metrics.jsonl"), batch, nprocs)
    return {"processes": nprocs, "samples_s": rate, "per_process": rate / nprocs, "wall_s": time.time() - start}


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    default = f"1,{torch.cuda.device_count()}" if device == "cuda" else "1,2"
    counts = sorted(set(csv_list(args.nprocs or default, int)))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for n in counts:
            print(f"demo on {n} process(es), {device}: {args.max_steps} steps ...", flush=True)
            rows.append(run_demo(n, args, device, folder))
    base = rows[0]["samples_s"] / rows[0]["processes"]
    for r in rows:
        r["efficiency"] = r["samples_s"] / (r["processes"] * base)
    print_table(rows, ["processes", "samples_s", "per_process", "efficiency", "wall_s"],
                f"\ndemo training, steady samples/s (steps {args.warmup_steps}..{args.max_steps})")
    result = {"benchmark": "scaling", "machine": machine(torch.device(device)), "rows": rows,
              "max_steps": args.max_steps, "warmup_steps": args.warmup_steps}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
