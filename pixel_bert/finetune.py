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
ModelConfig / TrainConfig / DownstreamConfig field and every field of a task's config (VQAConfig,
RetrievalConfig) is a flag. Checkpoints, resume, AMP, DDP and logging
are trainer.Trainer's. The final model.pt carries "task", "vocab" and, for VQA, "answers"; the
same model is also written without pickle as the folder RUN/model/ (pixel_bert.saved_model.write_model_folder).
Model selection and the reported figures use the val/dev split only, never a test split.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import fields
from typing import List, Optional

import torch
import torch.distributed as dist

from pixel_bert import synthetic_tasks
from pixel_bert.cli import (NOT_GIVEN, add_config_arguments, add_debug_argument, apply_overrides, flag_name,
                            flag_without_companion, int_at_least, run_cli)
from pixel_bert.config import ModelConfig, TrainConfig, config_to_dict, make_model_config
from pixel_bert.distributed import distributed, exit_after_distributed_run, unwrap
from pixel_bert.downstream import (DEMO_COMMON, DownstreamConfig, DownstreamTask, EvalSettings, check_splits,
                                   evaluate_split)
from pixel_bert.factory import create_model, model_from_state
from pixel_bert.files import write_text
from pixel_bert.runs import fit_run, run_folder, tokenizer_for_run
from pixel_bert.saved_model import load_saved_model
from pixel_bert.tasks import TASKS


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=sorted(TASKS), help="downstream task")
    p.add_argument("--init", default="none", help="pre-training checkpoint (model.pt of train.py, or its model folder "
                   "RUN/model/) whose shared "
                   "bert.* weights start the model, or 'none': BERT + ImageNet weights per the model config")
    p.add_argument("--output-dir", default=None, help="run folder (default runs/finetune-<task>)")
    p.add_argument("--resume", default="auto", help="'auto': newest valid checkpoint of the run folder if any; "
                   "a path; or 'none'")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--max-steps", type=int_at_least(0), default=None, help="stop after this many optimizer steps (quick checks)")
    presets = ", ".join(name for task in TASKS.values() for name in task.presets)
    p.add_argument("--preset", default="auto", help=f"train preset: {presets} (each task module's presets); auto = "
                   "the task's (retrieval: coco when the Karpathy json is COCO's), plus the demo overrides on "
                   "synthetic data")
    p.add_argument("--model-preset", default=None, help="with --init none: model preset (tiny, r50, x152); "
                   "default tiny on synthetic data, r50 otherwise")
    data = p.add_argument_group("data (the official layouts, docs/paper.md#data-formats)")
    for task in TASKS.values():
        task.add_data_arguments(data)
    sizes = {name: task.synthetic_sizes for name, task in TASKS.items()}
    s = p.add_argument_group("synthetic data (used when no data path above is given)")
    s.add_argument("--synthetic-train", type=int_at_least(1), default=None, help="synthetic training size: images (vqa, "
                   "retrieval) or sentences x 4 pairs (nlvr2); defaults " + str({k: v[0] for k, v in sizes.items()}))
    s.add_argument("--synthetic-val", type=int_at_least(1), default=None, help="synthetic val/dev size, same units; defaults "
                   + str({k: v[1] for k, v in sizes.items()}))
    s.add_argument("--synthetic-seed", type=int_at_least(0), default=0, help="seed of the synthetic task data")
    e = p.add_argument_group("final evaluation")
    e.add_argument("--eval-split", default=None, help="val/dev split for the final evaluation (default "
                   + " / ".join(task.val_split for task in TASKS.values()) + "); test splits are refused")
    e.add_argument("--max-eval", type=int_at_least(1), default=None, help="evaluate only the first N questions / examples / "
                   "images (quick runs)")
    e.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    add_config_arguments(p, ModelConfig)
    add_config_arguments(p, TrainConfig)
    add_config_arguments(p, DownstreamConfig)
    for task in TASKS.values():
        if task.config_class is not None:
            add_config_arguments(p, task.config_class, f" (--task {task.name})")
    add_debug_argument(p)
    return p


def has_real_data(args, task: DownstreamTask) -> bool:
    return bool(getattr(args, task.data_flags[0]))


def task_flags(task: DownstreamTask) -> List[str]:
    """The argparse dests that belong to one task: its data flags and its config fields."""
    return list(task.data_flags) + ([f.name for f in fields(task.config_class)] if task.config_class else [])


def unused_flags(args) -> Optional[str]:
    """Why the flags cannot be used as given (another task's data or config flag, or an image folder
    without its annotations, would be ignored and the run would fall back to synthetic data), or None."""
    for name, task in TASKS.items():
        given = [n for n in task_flags(task) if getattr(args, n) not in (None, NOT_GIVEN)]
        if name != args.task and given:
            kind = "data flag" if given[0] in task.data_flags else "flag"
            return f"{flag_name(given[0])} is a {kind} of --task {name}, but this is --task {args.task}"
    annotations, images = TASKS[args.task].data_flags
    return flag_without_companion(args, {images: annotations})


def prepare_synthetic(args, task: DownstreamTask, out_dir: str, image_size: int, info) -> None:
    """Generate the task's synthetic data (official formats) into out_dir/data once (rank 0), and
    point the task's annotations flag at it."""
    root = os.path.join(out_dir, "data")
    done = os.path.join(root, f"{task.name}.done")
    n_train, n_val, n_test = task.synthetic_sizes
    n_train = args.synthetic_train or n_train
    n_val = args.synthetic_val or n_val
    stamp = json.dumps([n_train, n_val, n_test, args.synthetic_seed, image_size])
    location = synthetic_tasks.task_location(task.name, root)
    if info.is_main and not (os.path.isfile(done) and open(done).read() == stamp):
        print(f"writing synthetic {task.name} data ({n_train}/{n_val}/{n_test}) to {root}/{task.name}")
        synthetic_tasks.write_task(task.name, root, n_train, n_val, n_test, args.synthetic_seed, image_size)
        write_text(done, stamp)
    if info.world_size > 1:
        dist.barrier()
    setattr(args, task.data_flags[0], location)


def build_model_config(args, synthetic_data: bool):
    """(ModelConfig, the --init `SavedModel` or None, fields the flags changed): the checkpoint's own
    sizes, or a preset's, then the flags."""
    init = load_saved_model(args.init, build=False) if args.init and args.init != "none" else None
    cfg = init.config_for_init() if init is not None else make_model_config(
        args.model_preset or ("tiny" if synthetic_data else "r50"))
    try:
        return cfg, init, apply_overrides(cfg, args)
    except ValueError as e:
        raise ConfigError(str(e)) from e



def main(argv: Optional[List[str]] = None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if unused_flags(args):
        parser.error(unused_flags(args))
    with distributed(args.device) as info, \
            run_folder(args.output_dir or os.path.join("runs", f"finetune-{args.task}"), info) as out_dir:
        try:
            return run(args, info, out_dir)
        except ConfigError as e:  # cross-field checks of the flags, reported as argparse does
            parser.error(str(e))


class ConfigError(ValueError):
    pass


def build_train_config(args, task: DownstreamTask, synthetic_data: bool):
    """(train preset name, TrainConfig, DownstreamConfig, the task's config or None, demo overrides applied):
    the task's paper recipe (retrieval: COCO's when the Karpathy file is COCO's), the demo overrides on
    synthetic data, then the flags."""
    preset = task.preset(args) if args.preset == "auto" else args.preset
    if preset not in task.presets:
        raise ConfigError(f"--preset {preset}: --task {task.name} has the presets {', '.join(task.presets)}")
    demo = {**task.demo_overrides, **DEMO_COMMON} if synthetic_data else {}
    try:
        train_cfg = TrainConfig(**{**task.presets[preset], **demo})
        apply_overrides(train_cfg, args)
        eval_cfg = DownstreamConfig()
        apply_overrides(eval_cfg, args)
        task_cfg = task.config_class() if task.config_class is not None else None
        if task_cfg is not None:
            apply_overrides(task_cfg, args)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return preset, train_cfg, eval_cfg, task_cfg, bool(demo)


def build_task_model(args, task: DownstreamTask, init, model_cfg: ModelConfig, train_cfg: TrainConfig, task_cfg,
                     info, log):
    """The task model from the --init checkpoint's shared weights (its load report logged), or from
    BERT + ImageNet; the CNN frozen when the recipe says so (retrieval)."""
    if init is not None:
        model = model_from_state(task.name, model_cfg, task.init_state(init.state, task_cfg, log), args.init, log)
    else:
        model = create_model(model_cfg, task.name, verbose=info.is_main)
    if train_cfg.freeze_backbone:
        model.bert.freeze_backbone(include_projection=train_cfg.freeze_visual_proj)
    return model


def run(args, info, out_dir: str):
    task = TASKS[args.task]
    log = print if info.is_main else (lambda *_: None)
    synthetic_data = not has_real_data(args, task)
    eval_split = args.eval_split or task.val_split
    check_splits(eval_split)  # before any work: a test split is never used here
    model_cfg, init, model_changed = build_model_config(args, synthetic_data)
    if synthetic_data:
        prepare_synthetic(args, task, out_dir, model_cfg.image_short_side, info)
    preset, train_cfg, eval_cfg, task_cfg, demo = build_train_config(args, task, synthetic_data)
    task.check_files(args, task_cfg, None if args.no_eval else eval_split)  # before any step, not after training
    torch.manual_seed(train_cfg.seed)

    tokenizer = tokenizer_for_run(model_cfg, out_dir, synthetic_data, init.vocab if init else None)
    data = task.training_data(args, task_cfg, model_cfg, train_cfg, tokenizer, info.device, out_dir, log)
    model = build_task_model(args, task, init, model_cfg, train_cfg, task_cfg, info, log)
    log(f"run folder {out_dir}: task {task.name}, preset {preset}{' + demo overrides' if demo else ''}, "
        f"{'synthetic' if synthetic_data else 'real'} data, model {model_cfg.backbone} + "
        f"{model_cfg.num_layers}x{model_cfg.hidden_size}, device {info.device}, {info.world_size} process(es)"
        + (f"; model flags changed: {model_changed}" if model_changed else ""))
    run_config = {"task": task.name, "preset": preset, "init": args.init, "model": config_to_dict(model_cfg),
                  "train": config_to_dict(train_cfg), "downstream": config_to_dict(eval_cfg),
                  "task_config": config_to_dict(task_cfg) if task_cfg is not None else {},
                  "world_size": info.world_size, "synthetic": synthetic_data,
                  "data": {name: getattr(args, name) for name in task.data_flags}
                  | {k: v for k, v in vars(args).items() if k.startswith("synthetic_")},
                  "model_extra": {"vocab": tokenizer.vocab, **data.extra}}
    return fit_run(model, train_cfg, out_dir, data, run_config, info, None if args.resume == "none" else args.resume,
                   args.max_steps, lambda trainer: final_evaluation(args, task, trainer, tokenizer, eval_split, eval_cfg,
                                                                     task_cfg, train_cfg, data.extra, info, out_dir, log))


def final_evaluation(args, task: DownstreamTask, trainer, tokenizer, eval_split, eval_cfg, task_cfg, train_cfg,
                     extra, info, out_dir, log) -> dict:
    """{"eval": metrics} on the val/dev split, unless --no-eval or the task trained on that split."""
    skip = task.skip_evaluation(eval_split, task_cfg)
    if skip:
        log(f"no final evaluation: {skip}")
        return {}
    if args.no_eval:
        return {}
    pairs = getattr(task_cfg, "retrieval_eval_pairs", 1024)
    settings = EvalSettings(eval_cfg.eval_batch_size, pairs, train_cfg.num_workers,
                            evaluated_items(args, task_cfg, log))
    return {"eval": evaluate_split(task, unwrap(trainer.model), tokenizer, args, eval_split, info, out_dir,
                                   extra.get("answers"), settings, log)}


def evaluated_items(args, task_cfg, log) -> Optional[int]:
    """How many items the final evaluation takes: --max-eval, and for retrieval at most
    RetrievalConfig.retrieval_val_images images (0: all), so that scoring every val image against
    every val caption does not follow a COCO epoch with hours of scoring."""
    val_images = getattr(task_cfg, "retrieval_val_images", 0)
    limits = [n for n in (args.max_eval, val_images) if n]
    if val_images:
        log(f"final evaluation: at most the first {min(limits)} val images x their captions "
            f"(--retrieval-val-images {val_images}; 0 scores every val image)")
    return min(limits, default=None)


def cli():
    """The command-line entry point (pixel-bert-finetune, python -m pixel_bert.finetune, finetune.py)."""
    run_cli(main)
    exit_after_distributed_run()


if __name__ == "__main__":
    cli()
