"""Pre-train Pixel-BERT with MLM (eq. 7) + ITM (eq. 8) and random pixel sampling (Sec. 3.3 of the paper).

    python train.py                                   # the synthetic CPU demo (tiny model, minutes)
    python train.py --init runs/demo/model.pt --synthetic-max-shapes 3 --itm_start_step 0 \\
        --output-dir runs/demo-scenes                 # its second stage: scenes of 1-3 shapes
    torchrun --nproc_per_node=2 train.py              # the same demo in 2 processes
    torchrun --nnodes=8 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        train.py --config pretrain-r50 --coco-karpathy dataset_coco.json --coco-images COCO/ \\
        --vg-regions region_descriptions.json --vg-image-data image_data.json --vg-images VG/

Every ModelConfig / TrainConfig field is also a flag (``--lr 5e-5``); ``--help`` lists them all.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
from typing import Dict, List, Optional, Sequence

import torch
from torch.utils.data import DistributedSampler

from pixel_bert import synthetic
from pixel_bert.annotations import (KARPATHY_SPLITS, AnnotationError, CaptionRecord, karpathy_coco_ids,
                                    karpathy_images, read_coco_captions, read_karpathy, read_visual_genome)
from pixel_bert.batches import CaptionCollator, CaptionDataset, aspect_ratio_group_ids
from pixel_bert.cli import (add_config_arguments, add_debug_argument, apply_overrides,
                            flag_without_companion, int_at_least, run_cli)
from pixel_bert.config import (PRETRAIN_RECIPES, ModelConfig, TrainConfig, config_to_dict, make_model_config,
                               make_train_config)
from pixel_bert.device_decode import EncodedCaptionCollator, EncodedCaptionDataset, decode_batch
from pixel_bert.distributed import all_reduce_mean, distributed, exit_after_distributed_run, unwrap
from pixel_bert.errors import UserError
from pixel_bert.factory import create_model, model_from_state
from pixel_bert.images import ImageTransform
from pixel_bert.losses import IGNORE_INDEX, make_itm_pairs, mask_tokens, pretrain_losses
from pixel_bert.runs import TrainingData, fit_run, run_folder, tokenizer_for_run
from pixel_bert.saved_model import SavedModel, load_saved_model


def add_pretrain_data_arguments(parser, title: str = "pre-training data (the official layouts)"):
    """The flags of the pre-training readers (`pixel_bert.annotations`): train.py's, and
    `python -m pixel_bert.datasets verify`'s."""
    g = parser.add_argument_group(title)
    g.add_argument("--coco-karpathy", help="Karpathy dataset_coco.json: COCO train + restval captions")
    g.add_argument("--coco-images", help="COCO image root holding train2014/ and val2014/")
    g.add_argument("--coco-captions", help="a COCO captions_*.json (e.g. one written by python -m "
                   "pixel_bert.synthetic); images under --coco-captions-images")
    g.add_argument("--coco-captions-images", help="image folder of --coco-captions (default: images/ next to it)")
    g.add_argument("--vg-regions", help="Visual Genome region_descriptions.json")
    g.add_argument("--vg-image-data", help="Visual Genome image_data.json (maps VG ids to COCO ids)")
    g.add_argument("--vg-images", help="Visual Genome root holding VG_100K/ and VG_100K_2/")
    return g


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo", choices=sorted(PRETRAIN_RECIPES),
                        help="recipe preset: demo (tiny model, synthetic data, CPU), pretrain-r50 / "
                             "pretrain-x152 (the paper's). Field flags below override it.")
    parser.add_argument("--output-dir", default=None, help="run folder: config, checkpoints, metrics "
                        "(default runs/<config>)")
    parser.add_argument("--init", default="none", help="start from this checkpoint's weights (a model.pt of "
                        "train.py, or its model folder RUN/model/): its model config and vocabulary are kept, the optimizers, schedule and step "
                        "start afresh (e.g. continue pre-training on other data; the demo's second stage). "
                        "'none': the preset's BERT / ImageNet initialisation")
    parser.add_argument("--resume", default="auto", help="'auto': continue from the newest valid checkpoint "
                        "in the run folder if any; a path: that checkpoint; 'none': start afresh")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    parser.add_argument("--max-steps", type=int_at_least(0), default=None, help="stop after this many optimizer steps "
                        "(for quick checks; the schedule still spans all epochs)")
    add_pretrain_data_arguments(parser, "data (default, when none is given: the synthetic shapes world)")
    data = parser.add_argument_group("the synthetic shapes world")
    data.add_argument("--synthetic-images", type=int_at_least(1), default=32000, help="synthetic training images (default "
                      "32000: the demo recipe's one epoch of 1,000 steps of 32)")
    data.add_argument("--synthetic-eval-images", type=int_at_least(0), default=1000, help="held-out synthetic images "
                      "for the final ITM / MLM evaluation (0 = none)")
    data.add_argument("--synthetic-seed", type=int_at_least(0), default=0, help="seed of the synthetic world "
                      "(held-out images use seed+1)")
    data.add_argument("--synthetic-max-shapes", type=int_at_least(1, 3), default=1, help="shapes per synthetic image, 1 to 3 "
                      "(default 1: one-shape scenes are what the tiny CPU demo learns from scratch in minutes; "
                      "from scratch on 1-3 shapes it had not started after 2,100 steps. The demo's second "
                      "stage, --init from the one-shape model, learns 1-3 shapes)")
    add_config_arguments(parser, ModelConfig)
    add_config_arguments(parser, TrainConfig)
    add_debug_argument(parser)
    return parser


def build_configs(args, init: Optional[SavedModel] = None):
    """(ModelConfig, TrainConfig): the preset's (the model's from the ``--init`` checkpoint when
    given), then the field flags."""
    model_preset, train_preset, train_overrides = PRETRAIN_RECIPES[args.config]
    model_cfg = init.config_for_init() if init is not None else make_model_config(model_preset)
    train_cfg = make_train_config(train_preset, **train_overrides)
    apply_overrides(model_cfg, args)
    apply_overrides(train_cfg, args)
    return model_cfg, train_cfg


# An image folder flag is read only together with its annotation flag: alone it would be ignored.
IMAGE_FLAG_NEEDS = {"coco_images": "coco_karpathy", "coco_captions_images": "coco_captions",
                    "vg_images": "vg_regions", "vg_image_data": "vg_regions"}


def require_records(records: List[CaptionRecord], flag: str, path: str, what: str) -> List[CaptionRecord]:
    """``records``, or an AnnotationError naming the file: a data flag that yields no pair is an error,
    never a silent fall-back to the synthetic world."""
    if not records:
        raise AnnotationError(f"{flag} {path}: {what}, so it gives no training pair. Check that this is the "
                                "intended file (python -m pixel_bert.datasets verify checks a layout)")
    return records


def karpathy_split_counts(path: str) -> str:
    """How many images each split of a Karpathy file has, for the error message of an empty split."""
    _, _, images = karpathy_images(path, KARPATHY_SPLITS)
    counts = collections.Counter(image["split"] for _, image in images)
    return ", ".join(f"{split} {counts[split]}" for split in KARPATHY_SPLITS)


def read_caption_records(args) -> List[CaptionRecord]:
    """The (image, caption) records of the real-data flags (empty when none is given)."""
    records: List[CaptionRecord] = []
    if args.coco_karpathy:
        if not args.coco_images:
            raise ValueError("--coco-karpathy needs --coco-images (the folder holding train2014/ and val2014/)")
        records += require_records(
            read_karpathy(args.coco_karpathy, args.coco_images, splits=("train", "restval")), "--coco-karpathy",
            args.coco_karpathy, f"no caption in the train and restval splits (images per split: "
                                f"{karpathy_split_counts(args.coco_karpathy)})")
    if args.coco_captions:
        coco = require_records(
            read_coco_captions(args.coco_captions, args.coco_captions_images or
                                 os.path.join(os.path.dirname(args.coco_captions), "images")),
            "--coco-captions", args.coco_captions, "'annotations' lists no caption")
        if any("val2014" in r.image_path for r in coco):
            print(f"warning: {args.coco_captions} holds COCO val2014 images, among them the Karpathy val/test "
                  "images that retrieval is evaluated on: pre-training on them leaks. For the paper's setup use "
                  "--coco-karpathy (train + restval only)", file=sys.stderr)
        records += coco
    if args.vg_regions:
        if not (args.vg_image_data and args.vg_images):
            raise ValueError("--vg-regions needs --vg-image-data and --vg-images")
        exclude = karpathy_coco_ids(args.coco_karpathy, ("val", "test")) if args.coco_karpathy else set()
        if not exclude:
            print("warning: no --coco-karpathy given, so Visual Genome images of the COCO Karpathy val/test "
                  "splits cannot be excluded (retrieval evaluation would leak)", file=sys.stderr)
        records += require_records(
            read_visual_genome(args.vg_regions, args.vg_image_data, args.vg_images, exclude), "--vg-regions",
            args.vg_regions, "no region description (every image's 'regions' list is empty, or every image is a "
                             "COCO Karpathy val/test image, left out of pre-training)")
    return records


def build_datasets(args, model_cfg: ModelConfig, train_cfg: TrainConfig):
    """(train dataset, group ids or None, held-out dataset or None, uses synthetic data): the real
    data the flags name, or the synthetic world when no data flag is given."""
    transform = ImageTransform.from_config(model_cfg)
    records = read_caption_records(args)
    if records:
        # with decode_images_on_device the samples carry the JPEGs' bytes, decoded in pretrain_step
        dataset_class = EncodedCaptionDataset if train_cfg.decode_images_on_device else CaptionDataset
        dataset = dataset_class(records, transform, fatal_bad_samples=train_cfg.fatal_bad_samples)
        groups = aspect_ratio_group_ids(records) if train_cfg.group_by_aspect_ratio else None
        return dataset, groups, None, False
    size = model_cfg.image_short_side
    shapes = args.synthetic_max_shapes
    train = synthetic.SyntheticCaptions(args.synthetic_images, args.synthetic_seed, size, transform=transform,
                                        max_shapes=shapes)
    held_out = (synthetic.SyntheticCaptions(args.synthetic_eval_images, args.synthetic_seed + 1, size,
                                            transform=transform, max_shapes=shapes)
                if args.synthetic_eval_images else None)
    return train, None, held_out, True


# -------------------------------------------------------------------------------------------------
#                       The pre-training step: MLM, eq. (7), and ITM, eq. (8)
# -------------------------------------------------------------------------------------------------

def masking_rates(ids: torch.Tensor, tokenizer, train_cfg: TrainConfig, itm: bool):
    """Each token's MLM masking rate: mlm_probability, or while MLM runs alone (before
    itm_start_step) mlm_probability_before_itm, for the words in mlm_words_before_itm if any are
    named (the others keep mlm_probability). Returns a float or a (B, T) tensor."""
    if itm or train_cfg.mlm_probability_before_itm is None:
        return train_cfg.mlm_probability
    if not train_cfg.mlm_words_before_itm:
        return train_cfg.mlm_probability_before_itm
    focus_ids = [tokenizer.token_to_id(w) for w in train_cfg.mlm_words_before_itm]
    if None in focus_ids:
        unknown = [w for w, i in zip(train_cfg.mlm_words_before_itm, focus_ids) if i is None]
        raise UserError(f"--mlm-words-before-itm names words the vocabulary does not hold: {unknown}")
    focus = torch.isin(ids, torch.tensor(focus_ids))
    return torch.where(focus, train_cfg.mlm_probability_before_itm, train_cfg.mlm_probability)


def prepare_pretrain_batch(batch: dict, tokenizer, train_cfg: TrainConfig, vocab_size: int, itm: bool = True):
    """Caption batch (pixel_bert.batches.CaptionCollator) -> model inputs with ITM pairs and MLM labels,
    plus the effective masking rate (predicted tokens / maskable tokens of the labelled captions).
    ``itm=False``: no mismatched pairs (MLM alone, see TrainConfig.itm_start_step)."""
    ids, mask, itm_labels = make_itm_pairs(batch["input_ids"], batch["attention_mask"], batch["image_keys"],
                                           train_cfg.itm_negative_ratio if itm else 0.0)
    probability = masking_rates(ids, tokenizer, train_cfg, itm)
    never = [tokenizer.token_to_id(t) for t in train_cfg.mlm_never_mask]
    predict = itm_labels.bool() if train_cfg.mlm_on_matched_only else torch.ones_like(itm_labels, dtype=torch.bool)
    masked_ids, mlm_labels = mask_tokens(ids, mask, never, vocab_size, tokenizer.mask_id, probability,
                                         train_cfg.mlm_replace_probs, predict=predict,
                                         min_one=train_cfg.mlm_min_one_mask)
    maskable = (mask.bool() & ~torch.isin(ids, torch.tensor(never)))[predict].sum()
    mask_rate = (mlm_labels != IGNORE_INDEX).sum() / maskable.clamp_min(1)
    return masked_ids, mask, mlm_labels, itm_labels, mask_rate


def pretrain_step(model, batch: dict, tokenizer, train_cfg: TrainConfig, device, step: int = 0) -> Dict[str, torch.Tensor]:
    """One micro-batch of pre-training: ITM pairs, MLM masking, one forward pass, both losses.
    ``step`` (optimizer steps so far) switches ITM on at ``train_cfg.itm_start_step``; before that
    the returned dict has no ``itm_loss`` / ``itm_acc`` (they would mean nothing)."""
    bert_config = unwrap(model).config
    if "encoded_images" in batch:  # TrainConfig.decode_images_on_device: the JPEGs are decoded here, on the GPU
        decode_batch(batch, ImageTransform.from_config(bert_config), bert_config.feature_stride, device)
    itm = step >= train_cfg.itm_start_step
    ids, mask, mlm_labels, itm_labels, mask_rate = prepare_pretrain_batch(batch, tokenizer, train_cfg,
                                                                          bert_config.vocab_size, itm)
    sampled = bert_config.num_sampled_pixels if train_cfg.sample_pixels else 0
    _, mlm_logits, itm_logits = model(ids.to(device), mask.to(device), batch["images"].to(device, non_blocking=True),
                                      batch["pixel_mask"].to(device, non_blocking=True), num_sampled_pixels=sampled)
    # before itm_start_step all pairs are matched: the ITM head stays in the graph (DDP needs every
    # parameter used) with weight 0, and its loss and accuracy are not reported
    out = pretrain_losses(mlm_logits, mlm_labels.to(device), itm_logits, itm_labels.to(device),
                          itm_weight=train_cfg.itm_weight if itm else 0.0)
    if not itm:
        del out["itm_loss"], out["itm_acc"]
    return {**out, "mask_rate": mask_rate}


@torch.no_grad()
def evaluate_pretraining(model, loader, tokenizer, probe_groups: Sequence[Sequence[int]], device,
                         seed: int = 1234) -> Dict[str, float]:
    """Held-out evidence that the model looks at the pixels.

    - ITM accuracy on pairs of which half are mismatched (eq. 8);
    - MLM accuracy on probe words (e.g. colour words, then shape words: one group masked at a time,
      so "the [MASK] shape is a triangle" can still be read off the triangle), predicted with the
      caption's own image and with another image of the batch. Learning from pixels shows as the
      first well above the second.
    Returns counts summed over every batch (the caller sums them over ranks when distributed).
    """
    model.eval()
    g = torch.Generator().manual_seed(seed)
    size = max(tokenizer.vocab_size, 1 + max(max(group) for group in probe_groups))
    groups = []
    for group in probe_groups:
        member = torch.zeros(size, dtype=torch.bool)
        member[list(group)] = True
        groups.append(member)
    totals = dict(itm_correct=0.0, itm_total=0.0, mlm_true=0.0, mlm_shuffled=0.0, mlm_total=0.0)
    for batch in loader:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if len(ids) < 2:
            continue
        images, pixel_mask = batch["images"].to(device), batch["pixel_mask"].to(device)
        visual = model.bert.encode_image(images, pixel_mask)  # the CNN once per batch
        shift = torch.roll(torch.arange(len(ids)), 1)  # each caption meets its neighbour's image
        visuals = {"mlm_true": visual, "mlm_shuffled": visual[shift.to(device)]}
        pair_ids, pair_mask, itm_labels = make_itm_pairs(ids, mask, batch["image_keys"], 0.5, generator=g)
        _, _, itm_logits = model(pair_ids.to(device), pair_mask.to(device), visual=visual)
        totals["itm_correct"] += ((itm_logits.float().cpu() > 0).float() == itm_labels).sum().item()
        totals["itm_total"] += len(itm_labels)
        for member in groups:
            target = member[ids] & mask.bool()
            masked = torch.where(target, torch.full_like(ids, tokenizer.mask_id), ids).to(device)
            for key, vis in visuals.items():
                _, logits, _ = model(masked, mask.to(device), visual=vis)
                totals[key] += (logits.argmax(-1).cpu()[target] == ids[target]).sum().item()
            totals["mlm_total"] += target.sum().item()
    return totals


def summarise_pretraining_eval(totals: Dict[str, float]) -> Dict[str, float]:
    return dict(itm_acc=totals["itm_correct"] / max(totals["itm_total"], 1),
                mlm_acc_true_image=totals["mlm_true"] / max(totals["mlm_total"], 1),
                mlm_acc_shuffled_image=totals["mlm_shuffled"] / max(totals["mlm_total"], 1),
                pairs=totals["itm_total"], probe_words=totals["mlm_total"])


# -------------------------------------------------------------------------------------------------
#                                             Run
# -------------------------------------------------------------------------------------------------

def main(argv: Optional[List[str]] = None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if flag_without_companion(args, IMAGE_FLAG_NEEDS):
        parser.error(flag_without_companion(args, IMAGE_FLAG_NEEDS))
    init = load_saved_model(args.init, build=False) if args.init != "none" else None
    try:  # cross-field checks (e.g. max_text_len within the position table) as argparse errors
        configs = build_configs(args, init)
    except ValueError as e:
        parser.error(str(e))
    with distributed(args.device) as info, \
            run_folder(args.output_dir or os.path.join("runs", args.config), info) as out_dir:
        return run(args, info, init, *configs, out_dir)


def run(args, info, init, model_cfg: ModelConfig, train_cfg: TrainConfig, out_dir: str):
    torch.manual_seed(train_cfg.seed)  # identical initial weights on every rank
    log = print if info.is_main else (lambda *_: None)

    dataset, groups, held_out, synthetic_data = build_datasets(args, model_cfg, train_cfg)
    tokenizer = tokenizer_for_run(model_cfg, out_dir, synthetic_data, init.vocab if init else None)
    run_config = {"task": "pretrain", "preset": args.config, "init": args.init, "model": config_to_dict(model_cfg),
                  "train": config_to_dict(train_cfg), "world_size": info.world_size,
                  "data": {k: v for k, v in vars(args).items() if k.startswith(("coco", "vg", "synthetic"))},
                  "model_extra": {"vocab": tokenizer.vocab}}
    log(f"run folder {out_dir}: {len(dataset)} training pairs, model {model_cfg.backbone} + "
        f"{model_cfg.num_layers}x{model_cfg.hidden_size} transformer, device {info.device}, "
        f"{info.world_size} process(es)")
    if init is not None:
        model = model_from_state("pretrain", model_cfg, init.state, args.init, log=log)
    else:
        model = create_model(model_cfg, "pretrain", verbose=info.is_main)

    collate = CaptionCollator(tokenizer, model_cfg.max_text_len, model_cfg.feature_stride)
    train_collate = (EncodedCaptionCollator(tokenizer, model_cfg.max_text_len, model_cfg.feature_stride)
                     if train_cfg.decode_images_on_device else collate)
    data = TrainingData(dataset, train_collate,
                        lambda m, batch, step: pretrain_step(m, batch, tokenizer, train_cfg, info.device, step), groups, {})

    def announce_itm(trainer):
        if trainer.step < train_cfg.itm_start_step:
            early = train_cfg.mlm_probability_before_itm or train_cfg.mlm_probability
            which = (f"{early:.0%} of the {len(train_cfg.mlm_words_before_itm)} words of --mlm-words-before-itm "
                     f"masked, {train_cfg.mlm_probability:.0%} of the others" if train_cfg.mlm_words_before_itm
                     else f"{early:.0%} of the words masked")
            trainer.log(f"itm: starts at step {train_cfg.itm_start_step} (MLM alone until then, {which}; "
                        f"no ITM figures are logged before it)")

    def evaluate(trainer):
        return {} if held_out is None else evaluate_held_out(trainer, held_out, tokenizer, collate, train_cfg, info)
    return fit_run(model, train_cfg, out_dir, data, run_config, info, None if args.resume == "none" else args.resume,
                   args.max_steps, evaluate, announce_itm)


def evaluate_held_out(trainer, held_out, tokenizer, collate, train_cfg, info) -> dict:
    """The demo's proof of learning: ITM accuracy, and MLM accuracy on colour/shape words with the
    true image versus a shuffled one, on images never seen in training."""
    sampler = DistributedSampler(held_out, num_replicas=info.world_size, rank=info.rank, shuffle=False)
    loader = torch.utils.data.DataLoader(held_out, batch_size=64, sampler=sampler, collate_fn=collate,
                                         num_workers=train_cfg.num_workers)
    probe_groups = [[tokenizer.token_to_id(w) for w in words]
                    for words in (synthetic.colour_words(), synthetic.shape_words())]
    totals = evaluate_pretraining(unwrap(trainer.model), loader, tokenizer, probe_groups, info.device)
    totals = {k: v * info.world_size for k, v in all_reduce_mean(totals, info).items()}
    result = summarise_pretraining_eval(totals)
    trainer.log(f"held-out ({int(result['pairs'])} pairs): ITM accuracy {result['itm_acc']:.3f} (chance 0.5); "
                f"MLM accuracy on colour/shape words ({int(result['probe_words'])} words): "
                f"true image {result['mlm_acc_true_image']:.3f}, shuffled image "
                f"{result['mlm_acc_shuffled_image']:.3f}")
    return result


def cli():
    """The command-line entry point (pixel-bert-train, python -m pixel_bert.train, train.py)."""
    run_cli(main)
    exit_after_distributed_run()


if __name__ == "__main__":
    cli()
