"""Image loading per DataLoader worker, the workers a GPU needs, and the padding a batch carries.

    python benchmarks/data_loading.py                                   # CPU decoders, padding shares
    python benchmarks/data_loading.py --step-json step.json             # + workers per GPU from a step
    python benchmarks/data_loading.py --step-seconds 1.2 --device cuda  # + GPU JPEG decoding

Images/s of decode + keep-ratio resize (--short/--long, the paper's 800/1333) + normalise, in one
process with one thread (what a DataLoader worker gets), for photo-like JPEGs of COCO's size
(640x480 and 480x640) and of a phone camera's (4032x3024):

    pillow            load_image + ImageTransform: Pillow decode, bilinear antialiased resize
    pillow-draft      the same with JPEG draft decoding (ModelConfig.image_jpeg_draft): libjpeg decodes
                      at 1/2, 1/4 or 1/8 scale when that still covers the target (never for COCO at 800)
    torchvision       torchvision.io.decode_jpeg, then F.interpolate (bilinear, antialias) + normalise
    torchvision-cuda  decode_jpeg(device="cuda") on a batch, resize on the GPU (when a GPU is present)

Workers per GPU = (64 images per step / step seconds) / (images/s of one worker); the step time is
--step-seconds (for 64 images) or the first r50 row of a step.py / gpu.py JSON, scaled to 64.

Padding: the share of padded input pixels and of padded stride-64 feature pixels in batches of 64,
with random batches and with aspect-ratio grouping (data.GroupedBatchSampler), on a COCO-like mix
of image shapes (an approximation: mostly 4:3 and 3:2 landscape, a quarter portrait, a few square
and wide ones).
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

from common import add_common_args, csv_list, machine, print_table, setup, time_runs, write_json, write_photos
from pixel_bert.batches import GroupedBatchSampler, aspect_ratio_group_ids
from pixel_bert.config import IMAGENET_MEAN, IMAGENET_STD
from pixel_bert.images import ImageTransform

# (width, height, share) of the COCO-like shape mix
COCO_LIKE_SHAPES = [(640, 480, 0.45), (640, 427, 0.20), (480, 640, 0.15), (427, 640, 0.08), (640, 640, 0.04),
                    (640, 360, 0.05), (640, 320, 0.03)]


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--short", type=int, default=800, help="resize: shorter side (default 800)")
    p.add_argument("--long", type=int, default=1333, help="resize: longer-side cap (default 1333)")
    p.add_argument("--photos", default="640x480,480x640,4032x3024", help="JPEG sizes WxH (default "
                   "640x480,480x640,4032x3024)")
    p.add_argument("--images", type=int, default=8, help="JPEGs per size (default 8)")
    p.add_argument("--batch", type=int, default=64, help="images per GPU per step (default 64, the paper's)")
    p.add_argument("--step-seconds", type=float, default=None, help="seconds of one training step of --batch "
                   "images on the GPU, for the workers-per-GPU figure")
    p.add_argument("--step-json", default=None, help="or: a step.py / gpu.py JSON to take the step time from")
    return add_common_args(p, repeat=3)


def torchvision_loader(transform: ImageTransform, device):
    import torchvision.io as tio
    mean, std = transform.mean.to(device), transform.std.to(device)

    def finish(pixels):  # (3, h, w) uint8 -> normalised (3, H, W) at the transform's size
        w, h = transform.output_size(pixels.shape[2], pixels.shape[1])
        x = F.interpolate(pixels[None].float(), size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        return (x[0] / 255.0 - mean) / std

    def load(paths):
        data = [tio.read_file(p) for p in paths]
        if device.type == "cuda":
            return [finish(x) for x in tio.decode_jpeg(data, device=device)]
        return [finish(tio.decode_jpeg(d)) for d in data]
    return load


def decoder_rates(args, device, folder):
    """images/s of each loading path for each photo size (one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    plain = ImageTransform(args.short, args.long, IMAGENET_MEAN, IMAGENET_STD)
    draft = ImageTransform(args.short, args.long, IMAGENET_MEAN, IMAGENET_STD, jpeg_draft=True)
    loaders = {"pillow": lambda ps: [plain.load(p) for p in ps], "pillow-draft": lambda ps: [draft.load(p) for p in ps],
               "torchvision": torchvision_loader(plain, torch.device("cpu"))}
    if device.type == "cuda":
        loaders["torchvision-cuda"] = torchvision_loader(plain, device)
    rows = []
    for size in csv_list(args.photos):
        w, h = map(int, size.split("x"))
        paths = write_photos(f"{folder}/{size}", [(w, h)] * args.images)
        ref = loaders["pillow"](paths[:1])[0]
        for name, load in loaders.items():
            dev = device if name.endswith("cuda") else torch.device("cpu")
            t = time_runs(lambda: load(paths), dev, args.warmup, args.repeat)["median"]
            diff = (load(paths[:1])[0].cpu() - ref).mul(plain.std).abs().mean().item() * 255
            rows.append({"photo": size, "loader": name, "images_s": len(paths) / t,
                         "ms_per_image": 1000 * t / len(paths), "out": "x".join(map(str, ref.shape[1:][::-1])),
                         "grey_levels_vs_pillow": diff})
    torch.set_num_threads(threads)
    return rows


def step_seconds(args):
    """Seconds per step of ``args.batch`` images: from the flag, or the first r50 row of a JSON."""
    if args.step_seconds:
        return args.step_seconds, "--step-seconds"
    if not args.step_json:
        return None, None
    with open(args.step_json) as f:
        result = json.load(f)
    rows = result.get("step_rows", result.get("rows", []))
    for r in rows:
        if r.get("preset") != "tiny" and r.get("ms"):
            source = f"{args.step_json}: {r['preset']} {r['size']} batch {r['batch']}"
            return r["ms"] / 1000 * args.batch / r["batch"], source
    return None, None


def padding_shares(args, batches: int = 200, seed: int = 0):
    """Padded share of input pixels and of stride-64 feature pixels per batch, random vs grouped."""
    rng = np.random.default_rng(seed)
    n = args.batch * batches
    shapes = rng.choice(len(COCO_LIKE_SHAPES), size=n, p=[s[2] for s in COCO_LIKE_SHAPES])
    sizes = [COCO_LIKE_SHAPES[i][:2] for i in shapes]
    transform = ImageTransform(args.short, args.long, IMAGENET_MEAN, IMAGENET_STD)
    out = np.array([transform.output_size(w, h) for w, h in sizes])              # (n, 2) w, h
    sampler = torch.utils.data.RandomSampler(range(n), generator=torch.Generator().manual_seed(seed))
    plans = {"random batches": torch.utils.data.BatchSampler(sampler, args.batch, drop_last=True),
             "aspect-ratio groups": GroupedBatchSampler(sampler, aspect_ratio_group_ids(sizes), args.batch)}
    rows = []
    for name, plan in plans.items():
        pix, feat = [], []
        for batch in plan:
            w, h = out[batch, 0], out[batch, 1]
            pix.append(1 - (w * h).sum() / (len(batch) * w.max() * h.max()))
            gw, gh = np.ceil(w / 64), np.ceil(h / 64)
            feat.append(1 - (gw * gh).sum() / (len(batch) * gw.max() * gh.max()))
        rows.append({"batching": name, "padded_pixels": float(np.mean(pix)),
                     "padded_feature_pixels": float(np.mean(feat))})
    return rows


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    device = setup(args)
    with tempfile.TemporaryDirectory() as folder:
        rows = decoder_rates(args, device, folder)
    print(f"resize to {args.short}/{args.long}; one process, one thread (a DataLoader worker)")
    print_table(rows, ["photo", "loader", "images_s", "ms_per_image", "out", "grey_levels_vs_pillow"])
    seconds, source = step_seconds(args)
    workers = {}
    if seconds:
        need = args.batch / seconds
        for r in rows:
            if not r["loader"].endswith("cuda"):
                workers[f"{r['photo']} {r['loader']}"] = math.ceil(need / r["images_s"])
        print(f"\nstep of {args.batch} images in {seconds:.3g} s ({source}) needs {need:.3g} images/s per GPU; "
              "workers per GPU: " + ", ".join(f"{k} {v}" for k, v in workers.items()))
    padding = padding_shares(args)
    print_table(padding, ["batching", "padded_pixels", "padded_feature_pixels"],
                f"\npadding per batch of {args.batch} (COCO-like shapes, resized to {args.short}/{args.long})")
    result = {"benchmark": "data_loading", "machine": machine(device), "resize": [args.short, args.long],
              "rows": rows, "step_seconds": seconds, "step_source": source, "workers_per_gpu": workers,
              "padding": padding}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
