"""Evaluate a fine-tuned Pixel-BERT on VQA 2.0, NLVR2 or image-text retrieval (protocols: docs/paper.md),
or score result files without a model.

With a model (``--checkpoint``, a model.pt written by finetune.py or its model folder RUN/model/)::

    python evaluate.py --task vqa --checkpoint runs/vqa/model.pt --vqa-root VQA/ --vqa-images COCO/ --split val2014
    python evaluate.py --task vqa --checkpoint runs/vqa/model.pt --vqa-root VQA/ --vqa-images COCO/ \\
        --split test-dev2015                                 # writes the submission file only
    python evaluate.py --task nlvr2 --checkpoint runs/nlvr2/model.pt --nlvr2-root nlvr2/data \\
        --nlvr2-images nlvr2/images --split test1
    torchrun --nproc_per_node=8 evaluate.py --task retrieval --checkpoint runs/ret/model.pt \\
        --karpathy-json dataset_coco.json --retrieval-images COCO/ --split test --feature-cache /tmp/feats

Without a model::

    python evaluate.py --task vqa --predictions results.json --annotations v2_mscoco_val2014_annotations.json
    python evaluate.py --task nlvr2 --predictions preds.csv --labels dev.json
    python evaluate.py --task retrieval --scores scores.npz

File formats. VQA results: the official JSON list ``[{"question_id": int, "answer": str}, ...]``, one
entry per annotated question. NLVR2 predictions: CSV lines ``identifier,True`` or
``identifier,False`` (lil-lab's format; JSON lines with identifier/prediction also accepted),
labels: the official JSON-lines file. Retrieval scores: the ``.npz`` of
pixel_bert.metrics.save_score_matrix (arrays scores (n_images, n_captions), image_ids,
caption_ids, caption_image).

Under torchrun the work is sharded across ranks (questions / examples / image rows) and gathered
on rank 0, which writes the files. Metrics go to stdout and to ``metrics_{task}_{split}.json``.
Retrieval writes its score blocks as they finish: a killed run resumes when the same command is run
again, and ``--protocol 1k`` scores only COCO 1K's five fold blocks (docs/retrieval.md).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List, Optional

import torch

from pixel_bert import metrics, nlvr2, retrieval
from pixel_bert.annotations import AnnotationError, read_json
from pixel_bert.cli import add_debug_argument, int_at_least, run_cli
from pixel_bert.distributed import distributed, exit_after_distributed_run, share_cpu_threads
from pixel_bert.downstream import EvalSettings, evaluate_split
from pixel_bert.files import write_json
from pixel_bert.retrieval_scoring import PROTOCOLS
from pixel_bert.saved_model import load_saved_model
from pixel_bert.tasks import TASKS

# -------------------------------------------------------------------------------------------------
#                                      Model-free scoring
# -------------------------------------------------------------------------------------------------

def score_files(args) -> Dict[str, Any]:
    """--predictions / --scores: score saved results against the official annotation files."""
    if args.scores:
        sm = metrics.load_score_matrix(args.scores)
        result = retrieval.retrieval_metrics(sm.scores, sm.caption_image, args.fold_size)
        result.update(n_images=int(sm.scores.shape[0]), n_captions=int(sm.scores.shape[1]), scores_file=args.scores)
        return result
    if args.task == "vqa":
        if not args.annotations:
            raise SystemExit("error: --predictions for vqa needs --annotations v2_mscoco_<split>_annotations.json")
        preds = read_json(args.predictions, 'a VQA results file: [{"question_id": int, "answer": str}, ...]')
        anns = read_json(args.annotations, "the official v2_mscoco_<split>_annotations.json")
        questions = read_json(args.questions, "the official questions file") if args.questions else None
        try:
            result = metrics.vqa_accuracy(preds, anns, questions)
        except (ValueError, TypeError) as e:  # metrics speaks of entries; say which files they are in
            raise AnnotationError(f"{args.predictions} scored on {args.annotations}: {e}") from None
        return {k: v for k, v in result.items() if k != "per_question"}
    if args.task == "nlvr2":
        if not args.labels:
            raise SystemExit("error: --predictions for nlvr2 needs --labels <split>.json (the official JSON lines)")
        preds = nlvr2.read_predictions(args.predictions)
        examples = nlvr2.read_nlvr2(args.labels, image_root="", require_labels="--labels must be a labelled file")
        try:
            return nlvr2.score_nlvr2(preds, examples)
        except ValueError as e:
            raise AnnotationError(f"{args.predictions} scored on {args.labels}: {e}") from None
    raise SystemExit("error: --predictions is for --task vqa or nlvr2; retrieval takes --scores")


# -------------------------------------------------------------------------------------------------
#                                             CLI
# -------------------------------------------------------------------------------------------------

def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=sorted(TASKS), help="downstream task")
    p.add_argument("--checkpoint", help="a fine-tuned model.pt (from finetune.py), or its model folder "
                   "(RUN/model/), to run")
    p.add_argument("--split", help="split to evaluate: VQA val2014 / test-dev2015 / test2015, NLVR2 dev / "
                   "test1, retrieval val / test (Karpathy). Default: "
                   + ", ".join(f"{name} {task.default_split}" for name, task in TASKS.items()))
    p.add_argument("--output-dir", help="where predictions, scores and metrics go (default: the checkpoint's folder)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--batch-size", type=int_at_least(1), default=64, help="images / questions / examples per batch (per process)")
    p.add_argument("--num-workers", type=int_at_least(0), default=2, help="DataLoader worker processes per process")
    p.add_argument("--max-examples", "--max-images", dest="max_examples", type=int_at_least(1), default=None,
                   help="evaluate only the first N questions (VQA), examples (NLVR2) or images (retrieval)")
    p.add_argument("--max-captions", type=int_at_least(1), default=None, help="retrieval: at most N captions per image")
    p.add_argument("--pairs-per-batch", type=int_at_least(1), default=1024, help="retrieval: image-caption pairs per forward pass")
    p.add_argument("--feature-cache", help="retrieval: folder where each rank saves its images' visual tokens "
                   "and reuses them on the next run of the same checkpoint")
    p.add_argument("--compile", action="store_true", help="torch.compile the model's forward pass "
                   "(worth it for a long evaluation: the first batches pay for the compilation)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="5k", help="retrieval: 5k scores the whole "
                   "matrix (COCO 5K; Flickr30K's 1K test is its whole matrix) and reports the COCO 1K folds from it "
                   "when the split has 5 folds; 1k scores only the 5 diagonal fold blocks of the COCO 1K protocol "
                   "(a fifth of the pairs) and reports their mean (default 5k)")
    p.add_argument("--fold-size", type=int_at_least(1), default=None, help="retrieval: COCO 1K protocol fold size "
                   "(default 1000, and n_images / 5 with --protocol 1k; with 5k the 1K figures are reported when "
                   "the split has exactly 5 folds of images)")
    p.add_argument("--score-blocks", default="auto", help="retrieval: folder where each rank writes its finished "
                   "score blocks, which the same command run again reuses (a killed evaluation resumes); auto: "
                   "FEATURE_CACHE/score_blocks with --feature-cache, else OUTPUT_DIR/retrieval_blocks; none: "
                   "keep them in memory only (default auto)")
    p.add_argument("--images-per-block", type=int_at_least(1), default=16, help="retrieval: image rows per score "
                   "block, the most a kill loses per rank (default 16)")
    data = p.add_argument_group("data (the official layouts, docs/paper.md#data-formats)")
    for task in TASKS.values():
        task.add_data_arguments(data)
    free = p.add_argument_group("model-free scoring")
    free.add_argument("--predictions", help="VQA results JSON ([{question_id, answer}]) or NLVR2 predictions "
                      "CSV (identifier,True|False) to score")
    free.add_argument("--annotations", help="VQA: the official v2_mscoco_<split>_annotations.json")
    free.add_argument("--questions", help="VQA (optional): the questions file, to check image ids")
    free.add_argument("--labels", help="NLVR2: the official JSON-lines file of the split (e.g. dev.json)")
    free.add_argument("--scores", help="retrieval: a score matrix .npz (pixel_bert.metrics.save_score_matrix)")
    add_debug_argument(p)
    return p


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    if args.predictions or args.scores:
        result = score_files(args)
        print(json.dumps(result, indent=2, default=str))
        if args.output_dir:
            write_json(os.path.join(args.output_dir, f"metrics_{args.task}_files.json"), result)
        return result
    if not args.checkpoint:
        raise SystemExit("error: give --checkpoint (run a model) or --predictions / --scores (score files)")
    saved = load_saved_model(args.checkpoint, task=args.task)
    tokenizer, model = saved.tokenizer(), saved.model
    settings = EvalSettings(args.batch_size, args.pairs_per_batch, args.num_workers, args.max_examples,
                            args.max_captions, args.feature_cache, args.checkpoint, args.fold_size, args.protocol,
                            args.score_blocks, args.images_per_block)
    out_dir = args.output_dir or os.path.dirname(os.path.abspath(args.checkpoint))
    with distributed(args.device) as info:
        share_cpu_threads(info)
        model.to(info.device)
        if args.compile:
            model = torch.compile(model)
        task = TASKS[args.task]
        result = evaluate_split(task, model, tokenizer, args, args.split or task.default_split, info, out_dir,
                                saved.answers, settings)
        if info.is_main:
            print(json.dumps({k: v for k, v in result.items() if k != "per_question_type"}, indent=2, default=str))
    return result


def cli():
    """The command-line entry point (pixel-bert-evaluate, python -m pixel_bert.evaluate, evaluate.py)."""
    run_cli(main)
    exit_after_distributed_run()


if __name__ == "__main__":
    cli()
