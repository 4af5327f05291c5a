"""How reliably does the synthetic demo learn? Runs it over seeds and CPU thread counts and prints
the spread (min / median / max). Prints figures; asserts nothing (benchmarks are not tests).

    python benchmarks/demo_seeds.py --parallel 2             # stage 1: the README's 16-run grid
    python benchmarks/demo_seeds.py --stage2                 # + the second stage (1-3 shapes) per seed
    python benchmarks/demo_seeds.py --stage2 --downstream vqa nlvr2 retrieval   # + the fine-tuning demos

The default grid is the README's: model seeds 0-7 on the README's synthetic world (``python train.py
--seed S``) and seeds 8-15 each on a world of its own (``python train.py --seed S --synthetic-seed S``,
from ``--own-world-from``), at the default 2 threads. Each run is a fresh subprocess, exactly what a
user types, with OMP_NUM_THREADS set to the thread count, in ``--out-dir``/stage1-sS-tT/ (stage 2: stage2-sS/, from
the stage-1 run of seed S at ``--later-threads`` threads; downstream: TASK-sS/, from stage2-sS). A
run folder that already holds a result.json is read, not run again (``--rerun`` runs it anyway).
The table and the JSON (``--json``) hold each run's held-out figures (its result.json) and wall time.
Run at most as many jobs at once (``--parallel``) as the machine has idle cores for their threads.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from pixel_bert.files import atomic_write, write_json, write_text  # noqa: E402  (the repository root is on the path first)

# (column name, how to read it from a result.json) per kind of run
STAGE_COLUMNS = [
    ("itm_acc", lambda r: r["itm_acc"]),
    ("mlm_true", lambda r: r["mlm_acc_true_image"]),
    ("mlm_shuffled", lambda r: r["mlm_acc_shuffled_image"]),
    ("mlm_gap", lambda r: r["mlm_acc_true_image"] - r["mlm_acc_shuffled_image"]),
    ("train_s", lambda r: r["train_seconds"]),
]
DOWNSTREAM_COLUMNS = {
    "vqa": [("vqa_acc", lambda r: r["eval"]["overall"]), ("train_s", lambda r: r["train_seconds"])],
    "nlvr2": [("accuracy", lambda r: r["eval"]["accuracy"]), ("consistency", lambda r: r["eval"]["consistency"]),
              ("train_s", lambda r: r["train_seconds"])],
    "retrieval": [(key, lambda r, key=key: r["eval"]["recall"][key])
                  for key in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10")]
                 + [("train_s", lambda r: r["train_seconds"])],
}
DOWNSTREAM_ARGS = {"nlvr2": ["--synthetic-train", "2000"]}  # the README's NLVR2 demo size


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(16)),
                   help="train.py --seed values (default 0-15)")
    p.add_argument("--own-world-from", type=int, default=8, help="seeds from this one on also get --synthetic-seed S, "
                   "a synthetic world of their own (default 8; the seeds below it share the README's world 0)")
    p.add_argument("--threads", type=int, nargs="+", default=[2],
                   help="OMP_NUM_THREADS values of the stage-1 grid (default 2, train.py's default on 2 cores)")
    p.add_argument("--out-dir", default=os.path.join("runs", "demo-seeds"), help="folder of all run folders "
                   "(default runs/demo-seeds)")
    p.add_argument("--json", default=None, help="where to write every figure (default OUT_DIR/demo_seeds.json)")
    p.add_argument("--parallel", type=int, default=1, help="runs at once (default 1: wall times then mean the "
                   "same thing as a user's single run)")
    p.add_argument("--train-args", default="", help="extra train.py flags for stage 1, one string "
                   "(e.g. \"--max-steps 600\")")
    p.add_argument("--stage2", action="store_true", help="also run the demo's second stage per seed: train.py "
                   "--init <stage 1>/model.pt --synthetic-max-shapes 3 --itm_start_step 0")
    p.add_argument("--downstream", nargs="*", default=[], choices=sorted(DOWNSTREAM_COLUMNS),
                   help="fine-tuning demos to run per seed from the stage-2 model (implies --stage2)")
    p.add_argument("--later-threads", type=int, default=1, help="OMP_NUM_THREADS of the stage-2 and downstream "
                   "runs, and the stage-1 thread count they start from (default 1)")
    p.add_argument("--rerun", action="store_true", help="run again even where a result.json exists")
    return p


def run_one(name: str, cmd: List[str], out_dir: str, threads: int, rerun: bool) -> Dict:
    """Run ``cmd`` (a script writing out_dir/result.json) with OMP_NUM_THREADS=threads; its output
    goes to out_dir/log.txt. Returns the result.json plus the wall time."""
    result_path = os.path.join(out_dir, "result.json")
    wall_path = os.path.join(out_dir, "wall_seconds.txt")
    if not rerun and os.path.isfile(result_path) and os.path.isfile(wall_path):
        print(f"{name}: reusing {result_path}", flush=True)
    else:
        os.makedirs(out_dir, exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        print(f"{name}: OMP_NUM_THREADS={threads} {' '.join(cmd[1:])}", flush=True)
        started = time.time()
        with atomic_write(os.path.join(out_dir, "log.txt"), "w", encoding="utf-8") as log:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        wall = time.time() - started
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed (exit {proc.returncode}); see {out_dir}/log.txt")
        write_text(wall_path, f"{wall:.1f}\n")
        print(f"{name}: done in {wall:.0f} s", flush=True)
    with open(result_path) as f:
        result = json.load(f)
    with open(wall_path) as f:
        result["wall_seconds"] = float(f.read())
    return result


def run_all(jobs: List[Dict], parallel: int, rerun: bool) -> List[Dict]:
    """jobs: dicts with name, cmd, out_dir, threads; returns them with "result" filled in. Prints a
    progress line with an ETA (from the mean time per finished job) as each one ends."""
    started = time.time()
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = {pool.submit(run_one, j["name"], j["cmd"], j["out_dir"], j["threads"], rerun): j for j in jobs}
        for done, future in enumerate(as_completed(futures), 1):
            futures[future]["result"] = future.result()
            elapsed = time.time() - started
            eta = elapsed / done * (len(jobs) - done)
            print(f"[{done}/{len(jobs)} runs, {elapsed:.0f} s elapsed, eta {eta:.0f} s]", flush=True)
    return jobs


def spread(values: List[float]) -> Dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def print_table(title: str, jobs: List[Dict], columns, keys=("seed", "world", "threads")) -> Dict[str, Dict[str, float]]:
    """One row per run, then min / median / max of each column; returns the spreads."""
    names = [c[0] for c in columns] + ["wall_s"]
    print(f"\n{title}")
    print(" ".join(f"{k:>7}" for k in keys) + " " + " ".join(f"{n:>12}" for n in names))
    rows = []
    for job in jobs:
        values = [read(job["result"]) for _, read in columns] + [job["result"]["wall_seconds"]]
        rows.append(values)
        print(" ".join(f"{job[k]:>7}" for k in keys) + " " + " ".join(f"{v:12.3f}" for v in values))
    spreads = {n: spread([row[i] for row in rows]) for i, n in enumerate(names)}
    for stat in ("min", "median", "max"):
        print(f"{stat:>{8 * len(keys) - 1}} " + " ".join(f"{spreads[n][stat]:12.3f}" for n in names))
    return spreads


def world_of(args, seed: int) -> int:
    """The synthetic world (--synthetic-seed) a grid seed trains on: 0, the README's, below --own-world-from."""
    return seed if seed >= args.own_world_from else 0


def world_args(args, seed: int) -> List[str]:
    return ["--synthetic-seed", str(seed)] if world_of(args, seed) != 0 else []


def stage1_jobs(args, out: str) -> List[Dict]:
    """python train.py --seed S, for every seed and thread count (plus the thread count stage 2 starts from)."""
    def job(seed: int, threads: int) -> Dict:
        world = world_of(args, seed)
        run_dir = os.path.join(out, f"stage1-s{seed}-w{world}-t{threads}")
        return dict(name=f"stage1 seed {seed} world {world} threads {threads}", seed=seed, world=world,
                    threads=threads, out_dir=run_dir,
                    cmd=[sys.executable, os.path.join(ROOT, "train.py"), "--seed", str(seed), "--resume", "none",
                         "--output-dir", run_dir] + world_args(args, seed) + args.train_args.split())

    jobs = [job(s, t) for t in args.threads for s in args.seeds]
    if (args.stage2 or args.downstream) and args.later_threads not in args.threads:
        jobs += [job(s, args.later_threads) for s in args.seeds]
    return jobs


def stage2_jobs(args, out: str) -> List[Dict]:
    """The demo's second stage per seed, from that seed's stage-1 model."""
    jobs = []
    for s in args.seeds:
        run_dir = os.path.join(out, f"stage2-s{s}")
        init = os.path.join(out, f"stage1-s{s}-w{world_of(args, s)}-t{args.later_threads}", "model.pt")
        jobs.append(dict(name=f"stage2 seed {s}", seed=s, world=world_of(args, s), threads=args.later_threads,
                         out_dir=run_dir,
                         cmd=[sys.executable, os.path.join(ROOT, "train.py"), "--init", init,
                              "--synthetic-max-shapes", "3", "--itm_start_step", "0", "--seed", str(s),
                              "--resume", "none", "--output-dir", run_dir] + world_args(args, s)))
    return jobs


def downstream_jobs(args, out: str, task: str) -> List[Dict]:
    """finetune.py --task TASK per seed, from that seed's stage-2 model."""
    jobs = []
    for s in args.seeds:
        run_dir = os.path.join(out, f"{task}-s{s}")
        init = os.path.join(out, f"stage2-s{s}", "model.pt")
        jobs.append(dict(name=f"{task} seed {s}", seed=s, world=world_of(args, s), threads=args.later_threads,
                         out_dir=run_dir,
                         cmd=[sys.executable, os.path.join(ROOT, "finetune.py"), "--task", task, "--init", init,
                              "--seed", str(s), "--resume", "none", "--output-dir", run_dir]
                         + DOWNSTREAM_ARGS.get(task, [])))
    return jobs


def main(argv: Optional[List[str]] = None):
    args = get_args_parser().parse_args(argv)
    out = os.path.abspath(args.out_dir)
    report = {"seeds": args.seeds, "own_world_from": args.own_world_from, "threads": args.threads, "later_threads": args.later_threads,
              "train_args": args.train_args, "cpu_count": os.cpu_count()}
    stages = [("stage1", "stage 1 (python train.py --seed S), held-out one-shape images",
               stage1_jobs(args, out), STAGE_COLUMNS)]
    if args.stage2 or args.downstream:
        stages.append(("stage2", "stage 2 (--init the stage-1 model, 1-3 shapes), held-out 1-3-shape images",
                       stage2_jobs(args, out), STAGE_COLUMNS))
    for task in args.downstream:
        stages.append((task, f"{task} fine-tuned from the stage-2 model (val/dev split)",
                       downstream_jobs(args, out, task), DOWNSTREAM_COLUMNS[task]))
    for key, title, jobs, columns in stages:  # in order: each stage starts from the previous one's models
        run_all(jobs, args.parallel, args.rerun)
        report[key] = [{k: j[k] for k in ("seed", "world", "threads", "result")} for j in jobs]
        report[f"{key}_spread"] = print_table(title, jobs, columns)

    path = args.json or os.path.join(out, "demo_seeds.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json(path, report)
    print(f"\nwrote {path}")
    return report


if __name__ == "__main__":
    main()
