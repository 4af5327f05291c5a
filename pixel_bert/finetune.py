"""Fine-tune Pixel-BERT on VQA 2.0, NLVR2 or image-text retrieval (Sec. 4.2 of the paper), then
evaluate on the val/dev split (docs/paper.md#evaluation-protocols).

    # synthetic demo (default when no data path is given): the task's data are generated in the
    # official formats into RUN/data/ and read by the same loaders as the real files
    # (runs/demo-scenes/model.pt: the two-stage demo pre-training of train.py, see the README)
    python finetune.py --task vqa --init runs/demo-scenes/model.pt --output-dir runs/ft-vqa
    python finetune.py --task nlvr2 --init runs/demo-scenes/model.pt --output-dir runs/ft-nlvr2 --synthetic-train 2000
    python finetune.py --task retrieval --init runs/demo-scenes/model.pt --output-dir runs/ft-ret

    # the paper's recipes on the real data (16 GPUs for VQA/NLVR2, 8 for retrieval)
    torchrun --nproc_per_node=8 --nnodes=2 ... finetune.py --task vqa --init runs/pretrain-r50/model.pt \\
        --vqa-root VQA/ --vqa-images COCO/
    torchrun ... finetune.py --task nlvr2 --init ... --nlvr2-root nlvr2/data --nlvr2-images nlvr2/images
    torchrun --nproc_per_node=8 finetune.py --task retrieval --init ... --karpathy-json dataset_flickr30k.json \\
        --retrieval-images flickr30k-images/

``--init`` is a pre-training checkpoint (its bert.* weights are loaded, the report says which
heads start new) or ``none``: BERT + ImageNet weights as the model config asks. Every
ModelConfig / TrainConfig / TaskConfig field is a flag. Checkpoints, resume, AMP, DDP and logging
are trainer.Trainer's. The final model.pt carries "task", "vocab" and, for VQA, "answers"; the
same model is also written without pickle as the folder RUN/model/ (pixel_bert.saved_model.write_model_folder).
Model selection and the reported figures use the val/dev split only, never a test split.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import List, Optional

import torch
import torch.distributed as dist

from pixel_bert import nlvr2, retrieval, synthetic_tasks, vqa
from pixel_bert.annotations import AnnotationError, CaptionRecord, read_karpathy
from pixel_bert.batches import CaptionCollator, CaptionDataset, aspect_ratio_group_ids, epoch_batch_sampler
from pixel_bert.cli import add_config_arguments, apply_overrides
from pixel_bert.config import (DEMO_TASK_COMMON, DEMO_TASK_OVERRIDES, ModelConfig, TrainConfig,
                               config_to_dict, make_model_config, make_train_config)
from pixel_bert.distributed import distributed, exit_after_distributed_run, share_cpu_threads, unwrap
from pixel_bert.downstream import TaskConfig, check_splits
from pixel_bert.evaluation import (EvalSettings, add_data_arguments, evaluate_split, nlvr2_images,
                                   retrieval_images, vqa_images)
from pixel_bert.factory import create_model, model_from_state
from pixel_bert.files import make_output_folder, write_json, write_text
from pixel_bert.images import ImageTransform
from pixel_bert.runs import tokenizer_for_run
from pixel_bert.saved_model import config_for_init, read_checkpoint, save_answers
from pixel_bert.trainer import Trainer

# Synthetic data sizes (train, val, test): images for VQA / retrieval, sentences for NLVR2.
SYNTHETIC_SIZES = {"vqa": (1500, 200, 50), "nlvr2": (400, 100, 25), "retrieval": (1000, 100, 50)}
VAL_SPLITS = {"vqa": "val2014", "nlvr2": "dev", "retrieval": "val"}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=["vqa", "nlvr2", "retrieval"], help="downstream task")
    p.add_argument("--init", default="none", help="pre-training checkpoint (model.pt of train.py, or its model folder "
                   "RUN/model/) whose shared "
                   "bert.* weights start the model, or 'none': BERT + ImageNet weights per the model config")
    p.add_argument("--output-dir", default=None, help="run folder (default runs/finetune-<task>)")
    p.add_argument("--resume", default="auto", help="'auto': newest valid checkpoint of the run folder if any; "
                   "a path; or 'none'")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (quick checks)")
    p.add_argument("--preset", default="auto", help="train preset: vqa, nlvr2, retrieval-f30k, retrieval-coco "
                   "(pixel_bert.config.TRAIN_PRESETS); auto = the task's (retrieval: coco when the Karpathy json "
                   "is COCO's), plus the demo overrides on synthetic data")
    p.add_argument("--model-preset", default=None, help="with --init none: model preset (tiny, r50, x152); "
                   "default tiny on synthetic data, r50 otherwise")
    add_data_arguments(p)
    s = p.add_argument_group("synthetic data (used when no data path above is given)")
    s.add_argument("--synthetic-train", type=int, default=None, help="synthetic training size: images (vqa, "
                   "retrieval) or sentences x 4 pairs (nlvr2); defaults " + str({k: v[0] for k, v in SYNTHETIC_SIZES.items()}))
    s.add_argument("--synthetic-val", type=int, default=None, help="synthetic val/dev size, same units; defaults "
                   + str({k: v[1] for k, v in SYNTHETIC_SIZES.items()}))
    s.add_argument("--synthetic-seed", type=int, default=0, help="seed of the synthetic task data")
    p.add_argument("--vqa-train-splits", default="train2014", help="VQA splits to train on, comma-separated "
                   "(e.g. train2014,val2014 for a test-dev submission; the val evaluation is then skipped)")
    e = p.add_argument_group("final evaluation")
    e.add_argument("--eval-split", default=None, help="val/dev split for the final evaluation (default val2014 / "
                   "dev / val); test splits are refused")
    e.add_argument("--max-eval", type=int, default=None, help="evaluate only the first N questions / examples / "
                   "images (quick runs)")
    e.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    add_config_arguments(p, ModelConfig)
    add_config_arguments(p, TrainConfig)
    add_config_arguments(p, TaskConfig)
    return p


# Each task's data flags: (annotations, images). The images flag is read only with the annotations flag.
TASK_DATA_FLAGS = {"vqa": ("vqa_root", "vqa_images"), "nlvr2": ("nlvr2_root", "nlvr2_images"),
                   "retrieval": ("karpathy_json", "retrieval_images")}


def has_real_data(args) -> bool:
    return bool(getattr(args, TASK_DATA_FLAGS[args.task][0]))


def unused_data_flags(args) -> Optional[str]:
    """Why the data flags cannot be used as given (another task's flag, or an image folder without its
    annotations, would be ignored and the run would fall back to synthetic data), or None."""
    flag = lambda name: f"--{name.replace('_', '-')}"  # noqa: E731
    for task, names in TASK_DATA_FLAGS.items():
        given = [flag(n) for n in names if getattr(args, n)]
        if task != args.task and given:
            return f"{given[0]} is a data flag of --task {task}, but this is --task {args.task}"
    annotations, images = TASK_DATA_FLAGS[args.task]
    if getattr(args, images) and not getattr(args, annotations):
        return f"{flag(images)} is given without {flag(annotations)}, which names the annotations to read"
    return None


def prepare_synthetic(args, out_dir: str, image_size: int, info) -> None:
    """Generate the task's synthetic data (official formats) into out_dir/data once (rank 0), and
    point the data flags at it."""
    root = os.path.join(out_dir, "data")
    done = os.path.join(root, f"{args.task}.done")
    n_train, n_val, n_test = SYNTHETIC_SIZES[args.task]
    n_train = args.synthetic_train or n_train
    n_val = args.synthetic_val or n_val
    stamp = json.dumps([n_train, n_val, n_test, args.synthetic_seed, image_size])
    if info.is_main and not (os.path.isfile(done) and open(done).read() == stamp):
        print(f"writing synthetic {args.task} data ({n_train}/{n_val}/{n_test}) to {root}/{args.task}")
        synthetic_tasks.write_task(args.task, root, n_train, n_val, n_test, args.synthetic_seed, image_size)
        write_text(done, stamp)
    if info.world_size > 1:
        dist.barrier()
    if args.task == "vqa":
        args.vqa_root = os.path.join(root, "vqa")
    elif args.task == "nlvr2":
        args.nlvr2_root = os.path.join(root, "nlvr2")
    else:
        args.karpathy_json = os.path.join(root, "retrieval", "dataset_synthetic.json")


def build_model_config(args, synthetic_data: bool):
    """(ModelConfig, init checkpoint dict or None, fields the flags changed): the checkpoint's own
    sizes, or a preset's, then the flags."""
    ckpt = read_checkpoint(args.init) if args.init and args.init != "none" else None
    cfg = config_for_init(ckpt) if ckpt is not None else make_model_config(
        args.model_preset or ("tiny" if synthetic_data else "r50"))
    try:
        return cfg, ckpt, apply_overrides(cfg, args)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def build_train_data(args, task_cfg: TaskConfig, model_cfg: ModelConfig, train_cfg: TrainConfig, out_dir, log):
    """(dataset, collate_fn factory, group ids or None, extra for model.pt, step_fn factory)."""
    transform = ImageTransform.from_config(model_cfg)
    if args.task == "vqa":
        images = vqa_images(args)
        splits = [s for s in args.vqa_train_splits.split(",") if s]
        train = [vqa.read_vqa(args.vqa_root, s, images) for s in splits]
        for s, t in zip(splits, train):
            if not t.questions:
                raise AnnotationError(f"{vqa.vqa_files(args.vqa_root, s)[0]}: 'questions' is an empty list, so "
                                        f"--vqa-train-splits {s} gives no training question")
        if any(t.annotations is None for t in train):
            raise ValueError(f"--vqa-train-splits {args.vqa_train_splits}: a split without annotations cannot train")
        vocab_splits = {s: t for s, t in zip(splits, train)}
        for s in ("train2014", "val2014"):  # the vocabulary always counts train + val
            if s not in vocab_splits and os.path.isfile(os.path.join(args.vqa_root, f"v2_mscoco_{s}_annotations.json")):
                vocab_splits[s] = vqa.read_vqa(args.vqa_root, s, images)
        # The answer classes come from train + val together (the community standard, docs/paper.md).
        answers = vqa.answer_vocabulary([t.annotations for t in vocab_splits.values()], task_cfg.vqa_min_answer_count)
        save_answers(os.path.join(out_dir, "answers.json"), answers)
        model_cfg.num_answers = len(answers)
        dataset = vqa.VQADataset([q for t in train for q in t.questions], answers, transform,
                                 task_cfg.vqa_drop_unanswerable, train_cfg.fatal_bad_samples)
        log(f"vqa: {len(dataset)} training questions, {len(answers)} answers (min count "
            f"{task_cfg.vqa_min_answer_count}), {dataset.num_unanswerable} with no answer in the vocabulary "
            f"({'dropped' if task_cfg.vqa_drop_unanswerable else 'kept with all-zero targets'})")
        groups = (aspect_ratio_group_ids([CaptionRecord(q[0].image_path, "", "") for q in dataset.items])
                  if train_cfg.group_by_aspect_ratio else None)
        collate = lambda tok: vqa.VQACollator(tok, model_cfg.max_text_len, len(answers), model_cfg.feature_stride)  # noqa: E731
        step = lambda device: (lambda m, b, _: vqa.vqa_step(m, b, device))  # noqa: E731
        return dataset, collate, groups, {"answers": answers}, step
    if args.task == "nlvr2":
        examples = nlvr2.read_nlvr2(os.path.join(args.nlvr2_root, "train.json"), nlvr2_images(args))
        dataset = nlvr2.NLVR2Dataset(examples, transform, train_cfg.fatal_bad_samples)
        log(f"nlvr2: {len(dataset)} training examples")
        collate = lambda tok: nlvr2.NLVR2Collator(tok, model_cfg.max_text_len, model_cfg.feature_stride)  # noqa: E731
        step = lambda device: (lambda m, b, _: nlvr2.nlvr2_step(m, b, device))  # noqa: E731
        return dataset, collate, None, {}, step  # two images per example: no aspect grouping
    coco = "coco" in os.path.basename(args.karpathy_json)
    splits = ("train", "restval") if coco else ("train",)
    records = read_karpathy(args.karpathy_json, retrieval_images(args), splits=splits)
    if not records:
        raise AnnotationError(f"--karpathy-json {args.karpathy_json}: no caption in the {'/'.join(splits)} "
                                "split(s), so it gives no training pair")
    dataset = CaptionDataset(records, transform, fatal_bad_samples=train_cfg.fatal_bad_samples)
    log(f"retrieval: {len(dataset)} training pairs from splits {splits}; {task_cfg.retrieval_negatives} negatives "
        f"({task_cfg.retrieval_negative_kind}), {task_cfg.retrieval_hard_negatives} hard; CNN frozen: "
        f"{train_cfg.freeze_backbone}")
    groups = aspect_ratio_group_ids(records) if train_cfg.group_by_aspect_ratio else None
    collate = lambda tok: CaptionCollator(tok, model_cfg.max_text_len, model_cfg.feature_stride)  # noqa: E731
    step = lambda device: (lambda m, b, _: retrieval.retrieval_step(  # noqa: E731
        m, b, device, task_cfg.retrieval_negatives, task_cfg.retrieval_hard_negatives,
        task_cfg.retrieval_negative_kind, task_cfg.retrieval_loss))
    return dataset, collate, groups, {}, step


def main(argv: Optional[List[str]] = None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if unused_data_flags(args):
        parser.error(unused_data_flags(args))
    with distributed(args.device) as info:
        try:
            return run(args, info)
        except ConfigError as e:  # cross-field checks of the flags, reported as argparse does
            parser.error(str(e))


class ConfigError(ValueError):
    pass


def build_train_config(args, synthetic_data: bool):
    """(train preset name, TrainConfig, TaskConfig, demo overrides applied): the task's paper recipe
    (retrieval: COCO's when the Karpathy file is COCO's), the demo overrides on synthetic data, then
    the flags."""
    preset = args.preset
    if preset == "auto":
        preset = args.task if args.task != "retrieval" else (
            "retrieval-coco" if "coco" in os.path.basename(args.karpathy_json) else "retrieval-f30k")
    demo = {**DEMO_TASK_OVERRIDES[args.task], **DEMO_TASK_COMMON} if synthetic_data else {}
    try:
        train_cfg = make_train_config(preset, **demo)
        apply_overrides(train_cfg, args)
        task_cfg = TaskConfig()
        apply_overrides(task_cfg, args)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return preset, train_cfg, task_cfg, bool(demo)


def build_task_model(args, ckpt, model_cfg: ModelConfig, train_cfg: TrainConfig, task_cfg: TaskConfig, info, log):
    """The task model from the --init checkpoint's shared weights (its load report logged), or from
    BERT + ImageNet; the CNN frozen when the recipe says so (retrieval)."""
    if ckpt is not None:
        state = ckpt["model"]
        if args.task == "retrieval" and task_cfg.retrieval_head_from_itm:
            state = retrieval.itm_as_retrieval_head(state, log)
        model = model_from_state(args.task, model_cfg, state, args.init, log)
    else:
        model = create_model(model_cfg, args.task, verbose=info.is_main)
    if train_cfg.freeze_backbone:
        model.bert.freeze_backbone(include_projection=train_cfg.freeze_visual_proj)
    return model


def run(args, info):
    log = print if info.is_main else (lambda *_: None)
    out_dir = args.output_dir or os.path.join("runs", f"finetune-{args.task}")
    make_output_folder(out_dir)
    share_cpu_threads(info)
    synthetic_data = not has_real_data(args)
    eval_split = args.eval_split or VAL_SPLITS[args.task]
    check_splits(eval_split)  # before any work: a test split is never used here
    model_cfg, ckpt, model_changed = build_model_config(args, synthetic_data)
    if synthetic_data:
        prepare_synthetic(args, out_dir, model_cfg.image_short_side, info)
    preset, train_cfg, task_cfg, demo = build_train_config(args, synthetic_data)
    torch.manual_seed(train_cfg.seed)

    tokenizer = tokenizer_for_run(model_cfg, out_dir, synthetic_data, ckpt and ckpt.get("vocab"))
    dataset, make_collate, groups, extra, make_step = build_train_data(args, task_cfg, model_cfg, train_cfg,
                                                                       out_dir, log)
    model = build_task_model(args, ckpt, model_cfg, train_cfg, task_cfg, info, log)
    log(f"run folder {out_dir}: task {args.task}, preset {preset}{' + demo overrides' if demo else ''}, "
        f"{'synthetic' if synthetic_data else 'real'} data, model {model_cfg.backbone} + "
        f"{model_cfg.num_layers}x{model_cfg.hidden_size}, device {info.device}, {info.world_size} process(es)"
        + (f"; model flags changed: {model_changed}" if model_changed else ""))
    run_config = {"task": args.task, "preset": preset, "init": args.init, "model": config_to_dict(model_cfg),
                  "train": config_to_dict(train_cfg), "task_config": config_to_dict(task_cfg),
                  "world_size": info.world_size, "synthetic": synthetic_data,
                  "data": {k: v for k, v in vars(args).items() if k.startswith(("vqa", "nlvr2", "karpathy",
                                                                                 "retrieval_images", "synthetic"))},
                  "model_extra": {"vocab": tokenizer.vocab, **extra}}
    make_batch_sampler = epoch_batch_sampler(dataset, train_cfg.batch_size, train_cfg.seed, info.world_size,
                                               info.rank, groups)
    trainer = Trainer(model, train_cfg, out_dir, dataset, make_collate(tokenizer), make_batch_sampler,
                      make_step(info.device), info, run_config)
    trainer.resume(None if args.resume == "none" else args.resume)
    if info.is_main:  # only once the resume is accepted: a refused resume leaves the run's files alone
        write_json(os.path.join(out_dir, "config.json"),
                   {**run_config, "model_extra": {"vocab_size": tokenizer.vocab_size,
                                                  **({"num_answers": len(extra["answers"])} if extra else {})}})
    started = time.time()
    trainer.fit(max_steps=args.max_steps)
    result = {"task": args.task, "train_seconds": time.time() - started, "steps": trainer.step}
    result.update(final_evaluation(args, trainer, tokenizer, eval_split, task_cfg, train_cfg, extra, info,
                                   out_dir, log))
    if info.is_main:
        write_json(os.path.join(out_dir, "result.json"), result)
    return result


def final_evaluation(args, trainer, tokenizer, eval_split, task_cfg, train_cfg, extra, info, out_dir, log) -> dict:
    """{"eval": metrics} on the val/dev split, unless --no-eval or VQA trained on that split."""
    if args.task == "vqa" and eval_split in args.vqa_train_splits.split(","):
        log(f"no final evaluation: {eval_split} is one of the training splits")
        return {}
    if args.no_eval:
        return {}
    settings = EvalSettings(task_cfg.eval_batch_size, task_cfg.retrieval_eval_pairs, train_cfg.num_workers,
                            args.max_eval)
    return {"eval": evaluate_split(args.task, unwrap(trainer.model), tokenizer, args, eval_split, info, out_dir,
                                   extra.get("answers"), settings, log)}


def cli():
    """The command-line entry point (pixel-bert-finetune, python -m pixel_bert.finetune, finetune.py)."""
    main()
    exit_after_distributed_run()


if __name__ == "__main__":
    cli()
