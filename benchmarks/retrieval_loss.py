"""Which reading of the paper's retrieval loss trains best? Fine-tunes the synthetic retrieval task
with each form of `pixel_bert.losses.hard_negative_loss` over several seeds and prints R@1/5/10
on the val split (min / median / max over the seeds).

    python benchmarks/retrieval_loss.py --init runs/demo-scenes/model.pt --seeds 0 1 2 --jobs 2

The paper: softmax cross-entropy over the positive and its 20 negatives, back-propagating only
through the 5 negatives with the highest loss (Sec. 4.2). The forms (RetrievalConfig.retrieval_loss):
"hard6" (softmax over the positive and the 5 hardest), "all21" (over all 21, the 15 easy scores
constant), "all21_offsets" (over all 21, the easy ones as offsets from the positive). Each run is
`finetune.py --task retrieval` with the demo's defaults, in its own process with
``--threads`` CPU threads, ``--jobs`` runs at a time. Writes every run's figures to ``--json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMS = ("hard6", "all21", "all21_offsets")
KEYS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rsum")


def run_one(form: str, seed: int, args) -> dict:
    """One fine-tuning run in a subprocess; its val recall (percent) and wall time. A run folder that
    already holds its result.json (a grid cut short and started again) is read, not run again,
    unless --rerun."""
    out = os.path.join(args.out_dir, f"{form}-seed{seed}")
    result_file = os.path.join(out, "result.json")
    if os.path.isfile(result_file) and not args.rerun:
        with open(result_file) as f:
            recall = json.load(f)["eval"]["recall"]
        print(f"  {form} seed {seed}: TR R@1 {recall['tr_r1']:.1f}, IR R@1 {recall['ir_r1']:.1f}, "
              f"rsum {recall['rsum']:.1f} (finished earlier, {result_file})", flush=True)
        return {"form": form, "seed": seed, "seconds": None, **{k: recall[k] for k in KEYS}}
    cmd = [sys.executable, os.path.join(ROOT, "finetune.py"), "--task", "retrieval", "--init", args.init,
           "--output-dir", out, "--retrieval-loss", form, "--seed", str(seed), "--resume", "none"] + args.extra
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    started = time.time()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    with open(result_file) as f:
        recall = json.load(f)["eval"]["recall"]
    print(f"  {form} seed {seed}: TR R@1 {recall['tr_r1']:.1f}, IR R@1 {recall['ir_r1']:.1f}, "
          f"rsum {recall['rsum']:.1f} ({time.time() - started:.0f} s)", flush=True)
    return {"form": form, "seed": seed, "seconds": time.time() - started, **{k: recall[k] for k in KEYS}}


def summary_table(runs) -> str:
    """One row per form: min / median / max over the seeds of every recall figure."""
    lines = ["| loss form | " + " | ".join(f"{k} min / med / max" for k in KEYS) + " |",
             "|---|" + "---|" * len(KEYS)]
    for form in dict.fromkeys(r["form"] for r in runs):
        cells = []
        for k in KEYS:
            v = sorted(r[k] for r in runs if r["form"] == form)
            cells.append(f"{v[0]:.1f} / {statistics.median(v):.1f} / {v[-1]:.1f}")
        lines.append(f"| {form} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", required=True, help="pre-training checkpoint to fine-tune from (model.pt or folder)")
    p.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS, help="loss forms (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default 0 1 2)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run (default 1)")
    p.add_argument("--out-dir", default="runs/retrieval-loss", help="run folders go here")
    p.add_argument("--json", default=None, help="write every run's figures here")
    p.add_argument("--rerun", action="store_true", help="run again even where a run folder holds its result.json")
    p.add_argument("extra", nargs="*", help="more finetune.py flags, after `--`")
    args = p.parse_args(argv)
    grid = [(form, seed) for form in args.forms for seed in args.seeds]
    print(f"{len(grid)} runs, {args.jobs} at a time, {args.threads} thread(s) each")
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda job: run_one(*job, args), grid))
    print(summary_table(runs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"init": args.init, "runs": runs}, f, indent=2)
    return runs


if __name__ == "__main__":
    main()
