"""The paper-scale figures on one GPU, in one command and one table (about 8 minutes on an H100-class card).

    python benchmarks/gpu.py --json gpu.json        # on a machine with a GPU
    python benchmarks/gpu.py --smoke --json s.json  # CPU, tiny sizes, well under a minute (a test runs it)

Runs, at the paper's settings (r50 at 800x1333, BERT-base, 64 samples per GPU):
0. the paper's step: what --amp auto picks on this card and why; one r50 step at 800x1333 in fp16
   (loss scaling) and in bf16 with its feature grid and loss (`paper_step_rows`);
1. step.py: the whole pre-training step in bf16 and fp16, eager and torch.compile; plus bf16 with
   CNN activation checkpointing, bf16 with all pixels kept, and x152 at 600x1000 with and without
   checkpointing (does it fit a 32 GB card?). images/s, model FLOP utilisation
   (FlopCounterMode's model FLOPs / time / the card's dense peak for that dtype, from
   common.GPU_PEAK_TFLOPS matched on torch.cuda.get_device_name; on CPU the measured matmul's
   FLOP/s stands in), peak memory (max_memory_allocated); for the first setting, each section's
   share of the step and the share outside the CNN, attention and matmuls;
2. encoder.py: our BERT-base layers vs Hugging Face's at 140 and 313 positions, bf16;
3. data_loading.py: images/s per worker and the workers one GPU needs at the measured step time;
4. retrieval_throughput.py: pairs/s with the feature cache and without, hours for Flickr30K and
   COCO 5K on 8 GPUs.
The sub-benchmarks' own output goes into the JSON ("logs"); the screen gets one table.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time

import torch

import data_loading
import encoder
import retrieval_throughput
from common import DTYPES, autocast, device_peak_tflops, machine, matmul_flops, print_table, setup, write_json
from step import Setup, breakdown, measure

from pixel_bert.precision import amp_settings
from pixel_bert.train import pretrain_step


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, to check the script end to end")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default auto)")
    p.add_argument("--batch", type=int, default=64, help="samples per GPU (default 64, the paper's)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile settings")
    p.add_argument("--repeat", type=int, default=3, help="timed steps per setting (default 3)")
    p.add_argument("--json", default=None, help="also write everything to this JSON file")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def step_settings(args, compiled: bool):
    """(preset, (short, long), dtype, compile, pixels, CNN checkpointing) of each whole-step setting,
    eager or compiled."""
    if args.smoke:
        return [] if compiled else [("tiny", (64, 64), "fp32", False, p, False) for p in ("sampled", "all")]
    r50, x152 = ("r50", (800, 1333)), ("x152", (600, 1000))
    dtypes = ["bf16", "fp16"] if torch.cuda.is_bf16_supported() else ["fp16"]
    if compiled:
        return [] if args.no_compile else [(*r50, t, True, "sampled", False) for t in dtypes]
    d = dtypes[0]
    return [(*r50, t, False, "sampled", False) for t in dtypes] + [
        (*r50, d, False, "sampled", True), (*r50, d, False, "all", False),
        (*x152, d, False, "sampled", False), (*x152, d, False, "sampled", True)]


def paper_step_rows(args, device, folder):
    """The paper's step as it ran (Sec. 4.1): what ``--amp auto`` picks on this card and why, then one
    r50 pre-training step at 800x1333 in fp16 (with loss scaling, as on the paper's V100s) and in bf16:
    the feature grid of the batch's images, the loss, and whether every weight is finite after the
    optimizer step. --smoke: the tiny preset on the CPU."""
    choice = amp_settings("auto", device)
    rows = [{"part": "amp auto", "setting": choice.reason, "note": f"loss scaling {choice.loss_scaling}"}]
    preset, size = ("tiny", (64, 64)) if args.smoke else ("r50", (800, 1333))
    options = argparse.Namespace(layers=None, batch=2, compile=False)
    for dtype in ("fp16", "bf16"):
        progress(f"paper step {preset} {dtype}")
        s = Setup(preset, size, "sampled", False, options, device, dtype, folder)
        images = s.batch["images"]
        with autocast(device, dtype):
            grid = s.model.bert.encode_image(images[:1], s.batch["pixel_mask"][:1]).grid
            loss = pretrain_step(s.forward_model, s.batch, s.tokenizer, s.train_cfg, device)["loss"]
        s.scaler.scale(loss).backward()
        s.optimizer_step()
        finite = all(bool(torch.isfinite(p).all()) for p in s.model.parameters())
        rows.append({"part": "paper step", "setting": f"{preset} {size[0]}x{size[1]} {dtype}", "rate": float(loss.detach()),
                     "unit": "loss", "note": f"images {images.shape[2]}x{images.shape[3]} -> grid {grid[0]}x"
                                             f"{grid[1]}; weights finite after the step: {finite}"})
    return rows


def step_rows(args, device, folder, settings, flops):
    """One row per setting; the first setting also gets its section and operator breakdown. ``flops``
    keeps each (preset, pixels)'s model FLOPs for the compiled settings, which cannot count them."""
    options = argparse.Namespace(layers=None, batch=2 if args.smoke else args.batch, compile=False,
                                 warmup=1, repeat=args.repeat)
    rows, first, matmul = [], None, {}
    for preset, size, dtype, compiled, pixels, ckpt in settings:
        options.compile = compiled
        label = f"{preset} {size[0]}x{size[1]} {dtype} {'compile' if compiled else 'eager'} pixels={pixels}" + \
                (" ckpt" if ckpt else "")
        row = {"part": "step", "setting": label, "unit": "images/s", "note": ""}
        progress(f"step {label}")
        try:
            s = Setup(preset, size, pixels, ckpt, options, device, dtype, folder)
            m = measure(s, options, device, flops.get((preset, pixels)))
            flops[preset, pixels] = m["flops"]
            card = device_peak_tflops(device, dtype)
            if card["tflops"]:
                peak, row["peak_source"] = card["tflops"] * 1e12, f"{card['matched']} dense {dtype}"
            else:
                peak = matmul.setdefault(dtype, matmul_flops(device, DTYPES[dtype]))
                row["peak_source"] = "measured matmul"
            row.update(rate=m["samples_s"], ms=m["ms"], batch=m["batch"], peak_mem_gb=m["peak_mem_gb"],
                       mfu=m["flops"] / m["ms"] * 1e3 / peak)
            first = first or breakdown(s, argparse.Namespace(warmup=1, repeat=2), label)
        except torch.cuda.OutOfMemoryError:
            row["note"] = "out of memory"
        except Exception as err:  # noqa: BLE001 - e.g. torch.compile failing on this machine: report, go on
            if not compiled:
                raise
            row["note"] = f"compile failed: {type(err).__name__}: {str(err)[:80]}"
        rows.append(row)
        s = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, first


def breakdown_rows(breakdown):
    """The breakdown as table rows: each section's share of the step, then the share outside the CNN,
    attention and matmuls."""
    rows = [{"part": "step share", "setting": f"{section} ({breakdown['setting'].split(' pixels')[0]})",
             "rate": share, "unit": "of step time", "note": "one process, no workers" if section == "data" else ""}
            for section, share in breakdown["section_shares"].items()]
    return rows + [{"part": "step share", "setting": "outside CNN, attention, matmuls", "unit": "of step time",
                    "rate": breakdown["operators"]["outside_cnn_attention_matmul"], "note": "operator self time"}]


def progress(message: str, started=time.time()):
    print(f"[gpu.py {time.time() - started:5.0f} s] {message}", file=sys.stderr, flush=True)


def quietly(fn, argv, logs, name):
    progress(name)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        result = fn(argv)
    logs[name] = buffer.getvalue()
    return result


# flags of the sub-benchmarks: the paper's scale on a GPU, and the smallest settings for --smoke
PAPER_FLAGS = {"encoder": ["--layers", "12", "--dtype", "bf16", "--repeat", "5"],
               "data_loading": ["--images", "4", "--repeat", "2"],
               "retrieval": ["--images", "64", "--captions", "320", "--uncached-pairs", "128", "--warmup", "1"]}
SMOKE_FLAGS = {"encoder": ["--layers", "1", "--hidden", "64", "--batch", "2", "--pixels", "12", "--repeat", "1",
                           "--impls", "ours,hf-sdpa"],
               "data_loading": ["--photos", "64x48", "--images", "2", "--short", "32", "--long", "48", "--repeat", "1"],
               "retrieval": ["--preset", "tiny", "--images", "2", "--captions", "4", "--uncached-pairs", "2"]}


def other_rows(args, steps, logs):
    flags = SMOKE_FLAGS if args.smoke else PAPER_FLAGS
    device = ["--device", "cpu" if args.smoke else "cuda"]
    enc = quietly(encoder.main, device + (["--batch", str(args.batch)] if not args.smoke else []) + flags["encoder"],
                  logs, "encoder")
    card = device_peak_tflops(torch.device(device[1]), enc["dtype"])["tflops"]  # MFU as the step rows have it
    rows = [{"part": "encoder", "setting": f"{r['positions']} positions, padding {r['padding']}, {r['impl']}",
             "rate": 1000 / r["ms"] * enc["batch"], "unit": "sequences/s", "ms": r["ms"],
             "mfu": r["tflops"] / card if card else r["of_matmul"], "note": f"{r['vs_hf_sdpa']:.2f}x HF-SDPA time"}
            for r in enc["rows"] if r["impl"] != "hf-eager"]
    # the first measured step, scaled to --batch images: the pace the data workers must keep
    step_s = next((r["ms"] / 1000 * args.batch / r["batch"] for r in steps if r.get("ms")), None)
    pace = ["--step-seconds", str(step_s)] if step_s else []
    data = quietly(data_loading.main, device + ["--batch", str(args.batch)] + pace + flags["data_loading"],
                   logs, "data_loading")
    for r in data["rows"]:
        key = f"{r['photo']} {r['loader']}"
        workers = data["workers_per_gpu"].get(key)
        rows.append({"part": "data", "setting": key, "rate": r["images_s"], "unit": "images/s per worker",
                     "note": f"{workers} workers per GPU" if workers else ""})
    rows += [{"part": "data", "setting": f"padding, {r['batching']}", "rate": r["padded_pixels"],
              "unit": "padded share", "note": ""} for r in data["padding"]]
    ret = quietly(retrieval_throughput.main, device + flags["retrieval"], logs, "retrieval")
    rows += [{"part": "retrieval", "setting": r["path"], "rate": r["pairs_s"], "unit": "pairs/s", "note": ""}
             for r in ret["rows"]]
    where = "CPUs like this" if args.smoke else "GPUs"
    rows += [{"part": "retrieval", "setting": f"{p['dataset']} on 8 {where}", "rate": p["hours_cache"],
              "unit": "hours", "note": f"{p['hours_cnn_per_pair']:.1f} h with the CNN per pair"}
             for p in ret["projections"]]
    return rows, {"encoder": enc, "data_loading": data, "retrieval": ret}


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.smoke and args.device == "auto":
        args.device = "cpu"
    args.warmup, args.repeat = 1, 1 if args.smoke else args.repeat
    device = setup(args)
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("gpu.py measures the paper's scale and needs a GPU; on CPU run it with --smoke")
    logs, flops = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        checks = paper_step_rows(args, device, folder)
        steps, breakdown = step_rows(args, device, folder, step_settings(args, compiled=False), flops)
        others, details = other_rows(args, steps, logs)
        # compiling takes minutes: last, so that every other figure is in should the run be cut short
        steps += step_rows(args, device, folder, step_settings(args, compiled=True), flops)[0]
    others = checks + (breakdown_rows(breakdown) if breakdown else []) + others  # none if every setting ran out of memory
    card = device_peak_tflops(device, "bf16")
    print(f"{card['name']} ({'peaks of ' + card['matched'] if card['matched'] else 'no nominal peak known'}), "
          f"torch {torch.__version__}{', smoke run' if args.smoke else ''}")
    print_table(steps + others, ["part", "setting", "rate", "unit", "ms", "mfu", "peak_mem_gb", "note"])
    result = {"benchmark": "gpu", "machine": machine(device), "smoke": args.smoke, "card": card, "step": steps,
              "breakdown": breakdown, "rows": others, **details, "logs": logs}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
