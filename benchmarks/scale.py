"""The cost of the paper's setup, projected from measurements (docs/costs.md has the method and the table).

    python benchmarks/scale.py                    # 1-2 minutes of CPU time
    python benchmarks/scale.py --json scale.json  # the same, and every figure as JSON
    python benchmarks/scale.py --smoke            # tiny shapes, ~10 s of CPU time (tests/test_scale.py runs it)

Counted, on the real shapes, on the meta device (no memory, no arithmetic: exact and instant):
- FLOPs per sample (torch.utils.flop_counter.FlopCounterMode) of the CNN forward + backward and of the
  transformer + MLM/ITM heads forward + backward in pre-training (40 text tokens, 100 sampled pixels),
  of the transformer forward per pair in retrieval evaluation (20 and 40 tokens, all pixels) and of the
  CNN forward per evaluation image;
- activation memory per sample: every tensor autograd saves for backward
  (torch.autograd.graph.saved_tensors_hooks), each storage once, parameters excluded, with the model
  in 16-bit as autocast runs it on a GPU; per sample = batch 2 minus batch 1. Activation
  checkpointing keeps the input of each recomputed unit (the CNN's stem and residual blocks, the
  transformer's layers) plus, while backward recomputes one unit, that unit's own saved tensors.

Timed on this machine: decode + keep-ratio resize to 800/1333 + normalise of COCO-sized JPEGs, one
thread (a DataLoader worker), min / median / max over --repeat runs: photo-like synthetic JPEGs and,
when scikit-image is installed, its real photos (astronaut, coffee, chelsea, rocket) cropped and
resized to 640x480, saved as JPEG quality 90; plus the data path of
`pixel_bert.device_decode` (the worker reads the file's bytes, the GPU decodes).

Assumed, and printed: the cards' datasheet peaks (V100 SXM2 fp16 tensor 125 TFLOP/s, H100 SXM
bf16 dense 989 TFLOP/s), a model FLOP utilisation (--mfu, default 0.35 and 0.40), the host cores
(DGX-1: 40 for 8 V100; DGX H100: 112 for 8 H100), memory headroom (--headroom, 10% of the card).
Nothing here is a GPU measurement: every time is a projection.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import tempfile
import time
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.utils.flop_counter import FlopCounterMode

from common import machine, print_table, write_json, write_photos
from pixel_bert import device_decode
from pixel_bert.config import PAPER_MEMORY_SETTINGS, make_model_config
from pixel_bert.heads import PixelBertForPreTraining, PixelBertForRetrieval
from pixel_bert.images import ImageTransform
from pixel_bert.model import VisualEmbedding

# ---- the setups: the paper's (Sec. 4.1) and a current node -----------------------------------------
CARDS = {
    # datasheet dense tensor-core peaks; host cores of the vendor's 8-GPU server (physical cores)
    "V100": dict(card="V100 SXM2 32 GB", dtype="fp16", peak_tflops=125.0, memory_gib=32, node_cores=40,
                 node="DGX-1"),
    "H100": dict(card="H100 SXM 80 GB", dtype="bf16", peak_tflops=989.0, memory_gib=80, node_cores=112,
                 node="DGX H100"),
}
GPUS_PER_NODE = 8
SETUPS = [("64 x V100 (the paper)", "V100", 64), ("8 x H100", "H100", 8)]
BATCH_PER_GPU = 64                      # [paper: 4096 over 64 GPUs]
EPOCHS = 40                             # [paper]
# the paper's pre-training data: COCO captions and Visual Genome region descriptions
SENTENCES = {"COCO": 533_000, "VG": 5_060_000}
IMAGES = {"COCO": 106_000, "VG": 101_000}
# retrieval evaluation: (name, images, captions, folds) scored every image x every caption per fold
EVALUATIONS = [("COCO 5K", 5000, 25000, 1), ("COCO 1K", 1000, 5000, 5), ("Flickr30K 1K", 1000, 5000, 1)]
PRETRAIN_TEXT_TOKENS = 40               # max_text_len: a batch of 64 captions is padded to its longest
EVAL_TEXT_TOKENS = (20, 40)             # score_rows cuts each tile to its longest caption
MLM_PREDICTED_PER_SAMPLE = 3            # 15% of ~40 tokens on the matched half of the pairs
# (name, preset, (short, long) side of the image, the paper's resize)
MODELS = [("R50 800x1333", "r50", (800, 1333)), ("X152 600x1000", "x152", (600, 1000))]
# memory settings: (name, backbone_frozen_stages, checkpointing of the CNN blocks and transformer layers);
# the last is the presets' (what the projections use), the others show what each part of it buys
MEMORY_SETTINGS = [("plain", 0, False), ("checkpointing", 0, True), ("stem+res2 frozen", 2, False),
                   ("checkpointing + stem+res2 frozen (the presets)", PAPER_MEMORY_SETTINGS["backbone_frozen_stages"],
                    PAPER_MEMORY_SETTINGS["backbone_checkpointing"])]
PRESET_SETTING = MEMORY_SETTINGS[-1][0]  # config.PAPER_MEMORY_SETTINGS, what pretrain-r50 / -x152 run with
# static bytes per parameter: fp32 weight, fp32 gradient, DDP's gradient bucket (gradient_as_bucket_view
# is off), the 16-bit copy autocast makes for the matmuls and convolutions; optimiser state on top
BYTES_PER_TRAINED_PARAM = 4 + 4 + 4 + 2
BYTES_SGD_STATE, BYTES_ADAMW_STATE = 4, 8          # momentum; m and v
REAL_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")  # scikit-image's data folder

GiB = 2 ** 30


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes and one small photo: checks the arithmetic")
    p.add_argument("--mfu", default="0.35,0.40", help="assumed model FLOP utilisation(s), comma-separated "
                   "(default 0.35,0.40)")
    p.add_argument("--headroom", type=float, default=0.10, help="share of a card's memory kept free for the "
                   "CUDA context, cuDNN workspaces, allocator fragmentation and gradients in flight (default 0.10)")
    p.add_argument("--images", type=int, default=8, help="synthetic JPEGs per shape for the decode timing (default 8)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes over the photos (default 1)")
    p.add_argument("--repeat", type=int, default=5, help="timed passes; min / median / max reported (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for the counting (the timing "
                   "always runs on one)")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    return p


# -------------------------------------------------------------------------------------------------
#                          Counting: FLOPs and saved tensors on the meta device
# -------------------------------------------------------------------------------------------------

class SavedTensors:
    """Bytes autograd keeps for backward while active (``with SavedTensors(params) as saved:``): each
    storage counted once (views of one tensor share it), parameters left out (they exist anyway),
    each storage attributed to the unit (a module registered with `watch`) that saved it first, or to
    None outside every unit; `unit_inputs` holds the bytes of each unit's input storage."""

    def __init__(self, parameters: Sequence[torch.Tensor] = ()):
        self.skip = {p.untyped_storage()._cdata for p in parameters}
        self.storages: Dict[int, tuple] = {}             # storage id -> (bytes, unit)
        self.unit_inputs: Dict[str, Dict[int, int]] = {}  # unit -> {storage id: bytes}
        self.current = None
        self.handles = []

    def watch(self, units: Dict[str, torch.nn.Module]) -> "SavedTensors":
        for name, module in units.items():
            self.handles.append(module.register_forward_pre_hook(lambda m, args, name=name: self._enter(name, args)))
            self.handles.append(module.register_forward_hook(lambda *_: setattr(self, "current", None)))
        return self

    def _enter(self, name, args):
        self.current = name
        x = args[0]
        self.unit_inputs[name] = {x.untyped_storage()._cdata: x.untyped_storage().nbytes()}

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self.skip and key not in self.storages:
            self.storages[key] = (storage.nbytes(), self.current)
        return tensor

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)
        for h in self.handles:
            h.remove()

    @property
    def total(self) -> int:
        return sum(n for n, _ in self.storages.values())

    def by_unit(self) -> Dict[object, int]:
        out: Dict[object, int] = {}
        for n, unit in self.storages.values():
            out[unit] = out.get(unit, 0) + n
        return out

    def checkpointed(self) -> int:
        """What the same pass keeps with every unit checkpointed: the units' inputs (each storage once)
        and the saved tensors outside the units, plus the largest unit's own, recomputed in backward."""
        inputs = {k: n for unit in self.unit_inputs.values() for k, n in unit.items()}
        per_unit = self.by_unit()
        outside = per_unit.pop(None, 0)
        return sum(inputs.values()) + outside + max(per_unit.values(), default=0)


def count_pass(run: Callable[[], torch.Tensor], parameters, units=None, backward: bool = True) -> dict:
    """FLOPs of ``run()`` (forward) and of backward from the loss it returns, and its saved tensors."""
    counter = FlopCounterMode(display=False)
    saved = SavedTensors(parameters).watch(units or {})
    with saved, counter:
        loss = run()
    forward = counter.get_total_flops()
    backward_flops = 0
    if backward:
        counter = FlopCounterMode(display=False)
        with counter:
            loss.backward()
        backward_flops = counter.get_total_flops()
    return dict(forward=forward, backward=backward_flops, saved=saved.total, checkpointed=saved.checkpointed())


ACTIVATION_DTYPE = torch.float16  # autocast's 16 bits on a GPU (fp16 on a V100, bf16 on an H100: 2 bytes alike)


def padded_size(cfg, short_long) -> tuple:
    """The batch's (height, width) for a landscape image at the resize's longest shape: the keep-ratio
    resize gives (short, long), the collator pads to a multiple of the feature stride."""
    s = cfg.feature_stride
    return tuple(math.ceil(side / s) * s for side in short_long)


def cnn_counts(cfg, size, batch: int, dtype, train: bool = True) -> dict:
    """The visual embedding (CNN trunk, 1x1 conv, pool, pixel sampling) on ``batch`` images of ``size``."""
    with torch.device("meta"):
        visual = VisualEmbedding(cfg).to(dtype).train(train)
        images = torch.empty(batch, 3, *size, dtype=dtype)
    backbone = visual.backbone
    units = {"stem": backbone.stem} if not backbone.frozen_stages else {}
    for i, stage in enumerate(backbone.stages[max(backbone.frozen_stages - 1, 0):]):
        units.update({f"stage{i}.{j}": block for j, block in enumerate(stage)})
    sample = cfg.num_sampled_pixels if train else 0

    def run():
        tokens = visual(images, None, sample)
        return tokens.embeddings.float().sum()
    if not train:
        with torch.no_grad():
            out = count_pass(run, list(visual.parameters()), backward=False)
    else:
        out = count_pass(run, list(visual.parameters()), units)
    with torch.no_grad():
        out["grid"] = visual(images[:1]).grid
    out["params"] = {"backbone": sum(p.numel() for p in backbone.parameters() if p.requires_grad),
                     "backbone_frozen": sum(p.numel() for p in backbone.parameters() if not p.requires_grad),
                     "projection": sum(p.numel() for p in visual.parameters()) - sum(p.numel() for p in backbone.parameters())}
    return out


def joint_sequence(model, input_ids, visual_embeddings, checkpointing: bool = False):
    """PixelBert.forward's transformer with nothing padded: [CLS] w [SEP] then the visual tokens,
    through the model's own layers. Written out because forward asks the device whether anything is
    padded, which a meta tensor cannot answer; tests/test_scale.py checks the FLOPs against the real
    forward on CPU."""
    bert = model.bert
    text = bert.text_embedding(input_ids)
    x = torch.cat([text, visual_embeddings.to(text.dtype)], dim=1)
    for layer in bert.layers:
        if checkpointing:
            x, _ = torch.utils.checkpoint.checkpoint(layer, x, None, False, use_reentrant=False)
        else:
            x, _ = layer(x, None)
    return x


def transformer_counts(cfg, text_tokens: int, pixels: int, batch: int, dtype, train: bool = True,
                       checkpointing: bool = False) -> dict:
    """Pre-training (train): the transformer and the MLM/ITM heads forward + backward, the losses as
    pretrain_losses computes them (MLM over the predicted tokens only, in fp32). Evaluation: the
    transformer and the retrieval score forward only."""
    with torch.device("meta"):
        model = (PixelBertForPreTraining if train else PixelBertForRetrieval)(cfg).to(dtype).train(train)
        ids = torch.zeros(batch, text_tokens, dtype=torch.long)
        visual = torch.empty(batch, pixels, cfg.hidden_size, dtype=dtype, requires_grad=train)
        mlm_labels = torch.zeros(batch * MLM_PREDICTED_PER_SAMPLE, dtype=torch.long)
        itm_labels = torch.zeros(batch)
    units = {f"layer{i}": layer for i, layer in enumerate(model.bert.layers)}

    def run():
        x = joint_sequence(model, ids, visual, checkpointing)
        if not train:
            return model.retrieval(x[:, 0]).float().sum()
        logits = model.mlm(x[:, :text_tokens])  # every text position, as PixelBertForPreTraining's forward
        predicted = logits[:, 1:1 + MLM_PREDICTED_PER_SAMPLE].flatten(0, 1)  # (B * k, vocab)
        mlm_loss = F.cross_entropy(predicted.float(), mlm_labels)
        return mlm_loss + F.binary_cross_entropy_with_logits(model.itm(x[:, 0]).float(), itm_labels)
    if not train:
        with torch.no_grad():
            return count_pass(run, list(model.parameters()), backward=False)
    out = count_pass(run, list(model.parameters()), units)
    out["params"] = sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for p in model.bert.visual_embedding.parameters())
    return out


# -------------------------------------------------------------------------------------------------
#                                  Timing: image loading per core
# -------------------------------------------------------------------------------------------------

def real_photos(folder: str) -> List[str]:
    """scikit-image's colour photos, centre-cropped to 4:3 and resized to COCO's 640x480, as JPEG
    quality 90; [] when scikit-image is not installed."""
    from PIL import Image
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return []
    data = os.path.join(list(spec.submodule_search_locations)[0], "data")
    paths = []
    for name in REAL_PHOTOS:
        source = os.path.join(data, name)
        if not os.path.isfile(source):
            continue
        img = Image.open(source).convert("RGB")
        w, h = img.size
        out = (640, 480)
        ratio = out[0] / out[1]
        cw, ch = (min(w, round(h * ratio)), min(h, round(w / ratio)))
        box = ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)
        path = os.path.join(folder, os.path.splitext(name)[0] + ".jpg")
        img.crop(box).resize(out, Image.Resampling.LANCZOS).save(path, quality=90)
        paths.append(path)
    return paths


def per_image_ms(load: Callable[[str], object], paths: Sequence[str], warmup: int, repeat: int) -> dict:
    """ms per image of ``load`` over ``paths``, min / median / max over ``repeat`` passes: the process's CPU
    time (what a core spends; on a shared machine it leaves out the time other jobs held the core) and the
    wall time next to it."""
    for _ in range(warmup):
        for p in paths:
            load(p)
    cpu, wall = [], []
    for _ in range(max(repeat, 1)):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        for p in paths:
            load(p)
        cpu.append(1000 * (time.process_time() - start_cpu) / len(paths))
        wall.append(1000 * (time.perf_counter() - start_wall) / len(paths))
    return {"min": min(cpu), "median": statistics.median(cpu), "max": max(cpu), "wall_median": statistics.median(wall)}


def loading_rates(args, short_long, folder) -> List[dict]:
    """Per-image ms of each loading path on one thread: what a DataLoader worker spends per image."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    transform = ImageTransform(*short_long, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    sets = {"synthetic": write_photos(os.path.join(folder, "synthetic"),
                                      [(64, 48)] if args.smoke else [(640, 480)] * args.images + [(480, 640)] * 2)}
    if not args.smoke:
        photos = real_photos(folder)
        if photos:
            sets["real (scikit-image)"] = photos
    loaders = {"Pillow decode + resize + normalise": transform.load,
               "read bytes for the GPU decode": device_decode.read_encoded}
    rows = []
    for photos, paths in sets.items():
        for name, load in loaders.items():
            rows.append({"photos": f"{photos}, {len(paths)}", "path": name,
                         **per_image_ms(load, paths, args.warmup, args.repeat)})
    torch.set_num_threads(threads)
    return rows


# -------------------------------------------------------------------------------------------------
#                                           Projections
# -------------------------------------------------------------------------------------------------

def measure(args) -> dict:
    """Every count at the real shapes (or the tiny preset's with --smoke)."""
    models = [("tiny 64x64", "tiny", (64, 64))] if args.smoke else MODELS
    result = {}
    for name, preset, short_long in models:
        base = make_model_config(preset, backbone_weights=None, bert_weights=None)
        dtype = ACTIVATION_DTYPE
        size = padded_size(base, short_long)
        per_setting, plain = {}, {}
        for setting, frozen, ckpt in MEMORY_SETTINGS:
            cfg = make_model_config(preset, backbone_weights=None, bert_weights=None, freeze_backbone_bn=True,
                                    backbone_frozen_stages=frozen, backbone_checkpointing=ckpt)
            one, two = cnn_counts(cfg, size, 1, dtype), cnn_counts(cfg, size, 2, dtype)
            if not ckpt:
                plain[frozen] = (one, two)
            # memory: the same pass without checkpointing, counted as checkpointing keeps it (the saved
            # tensors of a checkpointed block are not autograd's but torch.utils.checkpoint's)
            key = "checkpointed" if ckpt else "saved"
            m1, m2 = (x[key] for x in plain[frozen])
            per_setting[setting] = dict(flops=two["forward"] + two["backward"] - one["forward"] - one["backward"],
                                        saved=m2 - m1, fixed=2 * m1 - m2, params=one["params"])
        sampled, text = base.num_sampled_pixels, min(PRETRAIN_TEXT_TOKENS, base.max_text_len)
        t1, t2 = (transformer_counts(base, text, sampled, b, dtype) for b in (1, 2))
        c1, c2 = (transformer_counts(base, text, sampled, b, dtype, checkpointing=True) for b in (1, 2))
        transformer = dict(flops=t2["forward"] + t2["backward"] - t1["forward"] - t1["backward"],
                           flops_checkpointed=c2["forward"] + c2["backward"] - c1["forward"] - c1["backward"],
                           saved=t2["saved"] - t1["saved"], saved_checkpointed=t2["checkpointed"] - t1["checkpointed"],
                           params=t1["params"], text_tokens=text, pixels=sampled)
        grid = cnn_counts(base, size, 1, dtype, train=False)
        pixels = grid["grid"][0] * grid["grid"][1]
        evaluation = {t: transformer_counts(base, t, pixels, 1, dtype, train=False)["forward"]
                      for t in ((12,) if args.smoke else EVAL_TEXT_TOKENS)}
        result[name] = dict(preset=preset, image=short_long, padded=size, grid=grid["grid"], pixels=pixels,
                            cnn=per_setting, transformer=transformer, eval_pair_flops=evaluation,
                            eval_image_flops=grid["forward"])
    return result


def pretrain_samples() -> Dict[str, int]:
    """Samples of 40 epochs: an epoch over the sentences (what CaptionDataset does: one sample per
    caption) or over the images."""
    return {"sentences": EPOCHS * sum(SENTENCES.values()), "images": EPOCHS * sum(IMAGES.values())}


def memory_rows(counts: dict, headroom: float) -> List[dict]:
    """Memory per GPU at 64 per GPU and the largest batch that fits a 32 GB and an 80 GB card."""
    rows = []
    for name, c in counts.items():
        for setting, frozen, ckpt in MEMORY_SETTINGS:
            cnn = c["cnn"][setting]
            t = c["transformer"]
            trained_cnn = cnn["params"]["backbone"]
            adamw = cnn["params"]["projection"] + t["params"]
            static = ((trained_cnn + adamw) * BYTES_PER_TRAINED_PARAM + cnn["params"]["backbone_frozen"] * (4 + 2)
                      + trained_cnn * BYTES_SGD_STATE + adamw * BYTES_ADAMW_STATE)
            image = 3 * c["padded"][0] * c["padded"][1] * 4  # the fp32 batch the loader hands over
            per_sample = cnn["saved"] + (t["saved_checkpointed"] if ckpt else t["saved"]) + image
            fixed = max(cnn["fixed"], 0)
            row = {"model": name, "setting": setting, "static_gib": static / GiB, "per_sample_mib": per_sample / 2**20,
                   "at_64_gib": (static + fixed + BATCH_PER_GPU * per_sample) / GiB}
            for card in ("V100", "H100"):
                usable = CARDS[card]["memory_gib"] * GiB * (1 - headroom)
                row[f"max_batch_{CARDS[card]['memory_gib']}gb"] = max(0, int((usable - static - fixed) // per_sample))
            rows.append(row)
    return rows


def chosen_setting(memory: List[dict], model: str, card: dict) -> tuple:
    """(setting, micro-batch, accumulation steps) of the presets for 64 per GPU on ``card``: their memory
    setting, as one batch of 64 where it fits, else the largest power-of-two micro-batch that does."""
    row = next(r for r in memory if r["model"] == model and r["setting"] == PRESET_SETTING)
    micro = BATCH_PER_GPU
    while micro > 1 and micro > row[f"max_batch_{card['memory_gib']}gb"]:
        micro //= 2
    return PRESET_SETTING, micro, BATCH_PER_GPU // micro


def projection_rows(counts: dict, mfus: Sequence[float], memory: List[dict], decode_ms: float,
                    read_ms: float) -> dict:
    """Step time, pre-training time, host cores per GPU (Pillow decode, and the GPU decode's file reads)
    and evaluation hours for each setup, model and MFU."""
    samples = pretrain_samples()
    steps, evals = [], []
    for name, c in counts.items():
        for setup, card_name, gpus in SETUPS:
            card = CARDS[card_name]
            setting, micro, accumulation = chosen_setting(memory, name, card)
            ckpt = dict((m[0], m[2]) for m in MEMORY_SETTINGS)[setting]
            flops = c["cnn"][setting]["flops"] + c["transformer"]["flops_checkpointed" if ckpt else "flops"]
            workers = card["node_cores"] / GPUS_PER_NODE - 1   # one core per GPU runs the training process
            for mfu in mfus:
                compute_s = BATCH_PER_GPU * flops / (card["peak_tflops"] * 1e12 * mfu)
                need = BATCH_PER_GPU / compute_s                # images/s per GPU at the compute pace
                cores = need * decode_ms / 1000
                step_s = max(compute_s, BATCH_PER_GPU * decode_ms / 1000 / workers)  # the slower of the two
                row = {"setup": setup, "model": name, "setting": setting + (f", {accumulation} x {micro}"
                                                                              if accumulation > 1 else ""),
                       "mfu": mfu, "gflop_per_sample": flops / 1e9, "compute_step_s": compute_s,
                       "images_s_per_gpu": need, "cores_needed": cores, "workers_per_gpu": workers,
                       "bound": "image decoding" if cores > workers else "GPU compute", "step_s": step_s}
                for kind, label in (("sentences", "days_sentence_epochs"), ("images", "days_image_epochs")):
                    total_steps = samples[kind] / (BATCH_PER_GPU * gpus)
                    row[label] = total_steps * step_s / 86400
                    row[label.replace("days", "gpu_decode_days")] = total_steps * compute_s / 86400
                row["gpu_decode_cores_needed"] = need * read_ms / 1000
                steps.append(row)
                for text, pair_flops in c["eval_pair_flops"].items():
                    rate = card["peak_tflops"] * 1e12 * mfu / pair_flops  # pairs/s per GPU
                    for ev, n_img, n_cap, folds in EVALUATIONS:
                        pairs = folds * n_img * n_cap
                        cnn_s = folds * n_img * c["eval_image_flops"] / (card["peak_tflops"] * 1e12 * mfu)
                        evals.append({"setup": setup, "model": name, "mfu": mfu, "text_tokens": text,
                                      "pixels": c["pixels"], "evaluation": ev, "pairs": pairs,
                                      "gflop_per_pair": pair_flops / 1e9, "pairs_s_per_gpu": rate,
                                      "pairs_s_total": rate * gpus, "hours": (pairs / rate + cnn_s) / gpus / 3600})
    return {"steps": steps, "evaluations": evals}


def flop_rows(counts: dict) -> List[dict]:
    rows = []
    for name, c in counts.items():
        for setting, cnn in c["cnn"].items():
            rows.append({"model": name, "part": f"CNN fwd+bwd, {setting}", "gflop_per_sample": cnn["flops"] / 1e9,
                         "shape": f"{c['padded'][0]}x{c['padded'][1]} padded, grid {c['grid'][0]}x{c['grid'][1]}"})
        rows.append({"model": name, "part": "transformer + heads fwd+bwd", "gflop_per_sample":
                     c["transformer"]["flops"] / 1e9,
                     "shape": f"{c['transformer']['text_tokens']} tokens + {c['transformer']['pixels']} pixels"})
        rows.append({"model": name, "part": "CNN fwd (evaluation, per image)", "gflop_per_sample":
                     c["eval_image_flops"] / 1e9, "shape": f"{c['padded'][0]}x{c['padded'][1]}"})
        for text, f in c["eval_pair_flops"].items():
            rows.append({"model": name, "part": "transformer fwd (evaluation, per pair)", "gflop_per_sample": f / 1e9,
                         "shape": f"{text} tokens + {c['pixels']} pixels"})
    return rows


def over_mfus(rows: List[dict], keys: Sequence[str], ranged: Sequence[str]) -> List[dict]:
    """Rows that differ only in their MFU merged into one, the ``ranged`` columns as "low-high" text."""
    merged: Dict[tuple, dict] = {}
    for r in rows:
        key = tuple(r[k] for k in keys)
        if key not in merged:
            merged[key] = dict(r, **{c: [] for c in ranged})
        for c in ranged:
            merged[key][c].append(r[c])

    def fmt(v):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return [dict(r, **{c: "-".join(fmt(v) for v in sorted({min(r[c]), max(r[c])})) for c in ranged})
            for r in merged.values()]


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    mfus = [float(x) for x in args.mfu.split(",") if x.strip()]
    counts = measure(args)
    with tempfile.TemporaryDirectory() as folder:
        loading = loading_rates(args, (64, 64) if args.smoke else (800, 1333), folder)
    pillow = [r for r in loading if r["path"].startswith("Pillow")]
    decode_ms = max(r["median"] for r in pillow)  # the slower photo set's median
    encoded = [r for r in loading if r["path"].startswith("read bytes")]
    read_ms = max(r["median"] for r in encoded)
    memory = memory_rows(counts, args.headroom)
    projections = projection_rows(counts, mfus, memory, decode_ms, read_ms)

    print("Projections, not measurements: FLOPs and saved tensors counted on the meta device at the real shapes; "
          "image loading timed on this machine (one thread); times from the datasheet peaks at the assumed MFU.")
    print("Peaks: " + "; ".join(f"{c['card']} {c['dtype']} {c['peak_tflops']:g} TFLOP/s, {c['node']} "
                                f"{c['node_cores']} cores for {GPUS_PER_NODE} GPUs" for c in CARDS.values())
          + f". MFU assumed {', '.join(f'{m:.0%}' for m in mfus)}.")
    print_table(flop_rows(counts), ["model", "part", "gflop_per_sample", "shape"], "\nFLOPs (counted)")
    print_table(memory, ["model", "setting", "static_gib", "per_sample_mib", "at_64_gib", "max_batch_32gb",
                         "max_batch_80gb"],
                f"\nMemory per GPU, 16-bit activations (counted); usable = card x {1 - args.headroom:.0%}")
    print_table(loading, ["photos", "path", "min", "median", "max", "wall_median"],
                f"\nImage loading, CPU ms per image on one thread of this machine (min / median / max of "
                f"{args.repeat} passes; wall time beside), resize to {'64/64' if args.smoke else '800/1333'}")
    samples = pretrain_samples()
    print_table(projections["steps"], ["setup", "model", "setting", "mfu", "gflop_per_sample", "compute_step_s",
                                       "images_s_per_gpu", "cores_needed", "workers_per_gpu", "bound", "step_s",
                                       "days_sentence_epochs", "days_image_epochs"],
                f"\nPre-training, 64 per GPU, 40 epochs ({samples['sentences']:,} samples over sentences, "
                f"{samples['images']:,} over images); Pillow loading at {decode_ms:.1f} CPU ms per image; "
                "step_s = the slower of the GPU and the workers")
    print_table(projections["steps"], ["setup", "model", "mfu", "images_s_per_gpu", "gpu_decode_cores_needed",
                                       "workers_per_gpu", "compute_step_s", "gpu_decode_days_sentence_epochs",
                                       "gpu_decode_days_image_epochs"],
                f"\nWith decode_images_on_device (pixel_bert.device_decode): the workers read {read_ms:.2f} CPU ms "
                "per image; the decode's own GPU time is not in these figures (not measured here)")
    print_table(over_mfus(projections["evaluations"], ("setup", "model", "evaluation", "text_tokens"),
                          ("pairs_s_per_gpu", "pairs_s_total", "hours")),
                ["setup", "model", "evaluation", "text_tokens", "pixels", "pairs", "gflop_per_pair", "pairs_s_per_gpu",
                 "pairs_s_total", "hours"],
                f"\nRetrieval evaluation: every image x every caption, the CNN once per image; ranges over MFU "
                f"{'-'.join(f'{m:.0%}' for m in (min(mfus), max(mfus)))}")
    result = {"benchmark": "scale", "machine": machine(torch.device("cpu")), "smoke": args.smoke, "cards": CARDS,
              "mfu": mfus, "headroom": args.headroom, "counts": counts, "memory": memory, "loading": loading,
              "decode_ms": decode_ms, "read_ms": read_ms, **projections}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
