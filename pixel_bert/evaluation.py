"""Running a fine-tuned model on one split of VQA 2.0, NLVR2 or retrieval and scoring it with the
official metrics (Sec. 4.2 of the paper; protocols in docs/paper.md). What finetune.py (its final
val/dev evaluation) and evaluate.py (any split, test included) share: the data-path flags and
`evaluate_split`.

Rank 0 writes the predictions / scores and ``metrics_{task}_{split}.json`` into the output folder;
every rank returns the same metrics dict.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from . import metrics, nlvr2, retrieval, vqa
from .distributed import DistInfo, broadcast_from_main
from .files import write_json
from .images import ImageTransform


def add_data_arguments(parser: argparse.ArgumentParser, title: str = "data (the official layouts, "
                       "docs/paper.md#data-formats)"):
    """Data-path flags for the real (and synthetic, same formats) layouts of the three tasks."""
    g = parser.add_argument_group(title)
    g.add_argument("--vqa-root", help="folder with v2_OpenEnded_mscoco_<split>_questions.json and "
                   "v2_mscoco_<split>_annotations.json")
    g.add_argument("--vqa-images", help="COCO image root holding train2014/ val2014/ test2015/ (default: --vqa-root)")
    g.add_argument("--nlvr2-root", help="folder with the NLVR2 JSON-lines files train.json, dev.json, test1.json")
    g.add_argument("--nlvr2-images", help="NLVR2 image root holding train/<directory>/, dev/, test1/ "
                   "(default: <nlvr2-root>/images, else the images/ folder beside <nlvr2-root>)")
    g.add_argument("--karpathy-json", help="Karpathy dataset_coco.json or dataset_flickr30k.json")
    g.add_argument("--retrieval-images", help="image root: COCO's (holding train2014/ val2014/) or Flickr30K's "
                   "flickr30k-images/ folder (default: the json's folder)")
    return g


def vqa_images(args) -> str:
    return args.vqa_images or args.vqa_root


def nlvr2_images(args) -> str:
    return args.nlvr2_images or default_nlvr2_images(args.nlvr2_root)


def default_nlvr2_images(root: str) -> str:
    """``<root>/images`` when that folder exists, else the ``images`` folder beside ``root``: the
    layout of NLVR2's own repository (nlvr2/data/*.json next to nlvr2/images/)."""
    inside = os.path.join(root, "images")
    beside = os.path.join(os.path.dirname(os.path.normpath(root)), "images")
    return beside if not os.path.isdir(inside) and os.path.isdir(beside) else inside


def retrieval_images(args) -> str:
    return args.retrieval_images or os.path.dirname(os.path.abspath(args.karpathy_json))


def require_flags(args, *flags: str):
    missing = [f for f in flags if not getattr(args, f.lstrip("-").replace("-", "_"))]
    if missing:
        raise SystemExit(f"error: {' '.join(missing)} required for this task (see --help)")


@dataclass
class EvalSettings:
    """How to run an evaluation: batch sizes, workers, subsets, the retrieval feature cache."""
    batch_size: int = 64
    pairs_per_batch: int = 1024
    num_workers: int = 0
    max_examples: Optional[int] = None
    max_captions: Optional[int] = None
    feature_cache: Optional[str] = None
    checkpoint: Optional[str] = None
    fold_size: int = 1000


def evaluate_split(task: str, model, tokenizer, args, split: str, info: DistInfo, out_dir: str,
                   answers: Optional[List[str]] = None, settings: EvalSettings = EvalSettings(),
                   log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run ``model`` on ``split`` of ``task`` (module docstring). Returns the metrics on every rank."""
    if task not in EVALUATORS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(EVALUATORS)}")
    if info.is_main:
        os.makedirs(out_dir, exist_ok=True)
    result: Dict[str, Any] = {"task": task, "split": split}
    result.update(EVALUATORS[task](model, tokenizer, args, split, info, out_dir, answers, settings, log) or {})
    if info.is_main:
        write_json(os.path.join(out_dir, f"metrics_{task}_{split}.json"), result)
    return broadcast_from_main(result, info)


def _evaluate_vqa(model, tokenizer, args, split, info, out_dir, answers, settings, log) -> Dict[str, Any]:
    require_flags(args, "--vqa-root")
    cfg = model.config
    data = vqa.read_vqa(args.vqa_root, split, vqa_images(args), settings.max_examples)
    dataset = vqa.VQADataset(data.questions, answers, ImageTransform.from_config(cfg))
    collate = vqa.VQACollator(tokenizer, cfg.max_text_len, len(answers), cfg.feature_stride)
    preds = vqa.predict_vqa(model, dataset, collate, answers, info, settings.batch_size, settings.num_workers)
    if not info.is_main:
        return {}
    name = "submission" if data.annotations is None else "results"
    result: Dict[str, Any] = {"predictions_file": metrics.write_vqa_submission(
        os.path.join(out_dir, f"vqa_{split}_{name}.json"), preds)}
    if data.annotations is not None:
        result.update(vqa.score_vqa(preds, data))
        # reference: always answering the most frequent training answer
        result["prior_baseline"] = vqa.score_vqa({q: answers[0] for q in preds}, data)["overall"]
        log(f"vqa {split}: accuracy {result['overall']:.2f} (per type {result['per_answer_type']}; "
            f"most-frequent-answer baseline {result['prior_baseline']:.2f})")
    log(f"vqa {split}: wrote {result['predictions_file']}")
    return result


def _evaluate_nlvr2(model, tokenizer, args, split, info, out_dir, answers, settings, log) -> Dict[str, Any]:
    require_flags(args, "--nlvr2-root")
    cfg = model.config
    examples = nlvr2.read_nlvr2(os.path.join(args.nlvr2_root, f"{split}.json"), nlvr2_images(args),
                                settings.max_examples)
    dataset = nlvr2.NLVR2Dataset(examples, ImageTransform.from_config(cfg))
    collate = nlvr2.NLVR2Collator(tokenizer, cfg.max_text_len, cfg.feature_stride)
    preds = nlvr2.predict_nlvr2(model, dataset, collate, info, settings.batch_size, settings.num_workers)
    if not info.is_main:
        return {}
    result: Dict[str, Any] = {"predictions_file": nlvr2.write_predictions(
        os.path.join(out_dir, f"nlvr2_{split}_predictions.csv"), preds)}
    if all(ex.label is not None for ex in examples):
        result.update(nlvr2.score_nlvr2(preds, examples))
        majority = sum(ex.label for ex in examples) >= len(examples) / 2
        result["majority_baseline"] = nlvr2.score_nlvr2({e.identifier: majority for e in examples},
                                                        examples)["accuracy"]
        log(f"nlvr2 {split}: accuracy {result['accuracy']:.4f} consistency {result['consistency']:.4f} "
            f"(majority-class baseline {result['majority_baseline']:.4f})")
    log(f"nlvr2 {split}: wrote {result['predictions_file']}")
    return result


def _evaluate_retrieval(model, tokenizer, args, split, info, out_dir, answers, settings, log) -> Dict[str, Any]:
    require_flags(args, "--karpathy-json")
    cfg = model.config
    data = retrieval.read_karpathy_eval(args.karpathy_json, retrieval_images(args), split, settings.max_examples,
                                        settings.max_captions)
    out = retrieval.evaluate_retrieval(model, data, tokenizer, ImageTransform.from_config(cfg), cfg.max_text_len,
                                       info, settings.batch_size, settings.pairs_per_batch, settings.num_workers,
                                       settings.feature_cache, settings.checkpoint,
                                       log=log if info.is_main else (lambda *_: None))
    if not info.is_main:
        return {}
    path = metrics.save_score_matrix(os.path.join(out_dir, f"retrieval_{split}_scores.npz"), out["scores"],
                                     data.image_ids, data.caption_ids, data.caption_image)
    result = retrieval.retrieval_metrics(out["scores"], data.caption_image, settings.fold_size)
    result.update(out["stats"], scores_file=path, chance_r1=100.0 / len(data.image_paths))
    r = result["recall"]
    log(f"retrieval {split} ({len(data.image_paths)} images x {len(data.captions)} captions, "
        f"{out['stats']['pairs_per_second']:.0f} pairs/s): TR R@1/5/10 {r['tr_r1']:.1f}/{r['tr_r5']:.1f}/"
        f"{r['tr_r10']:.1f}  IR R@1/5/10 {r['ir_r1']:.1f}/{r['ir_r5']:.1f}/{r['ir_r10']:.1f}  "
        f"(chance R@1 {result['chance_r1']:.1f}), wrote {path}")
    return result


EVALUATORS = {"vqa": _evaluate_vqa, "nlvr2": _evaluate_nlvr2, "retrieval": _evaluate_retrieval}
