"""Evaluate a fine-tuned Pixel-BERT on VQA 2.0, NLVR2 or image-text retrieval (protocols: docs/paper.md),
or score result files without a model.

With a model (``--checkpoint``, a model.pt written by finetune.py)::

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
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Any, Dict, List, Optional

from pixel_bert import metrics, nlvr2, retrieval, vqa
from pixel_bert.data import ImageTransform, read_json
from pixel_bert.downstream import broadcast_from_main
from pixel_bert.engine import (DistInfo, cleanup_distributed, exit_after_distributed_run, setup_distributed,
                               share_cpu_threads)
from pixel_bert.tokenizer import WordPieceTokenizer
from pixel_bert.weights import load_model

DEFAULT_SPLITS = {"vqa": "val2014", "nlvr2": "dev", "retrieval": "test"}


def add_data_arguments(parser: argparse.ArgumentParser):
    """Data-path flags for the real (and synthetic, same formats) layouts; shared with finetune.py."""
    g = parser.add_argument_group("data (official layouts, docs/paper.md#data-formats)")
    g.add_argument("--vqa-root", help="folder with v2_OpenEnded_mscoco_<split>_questions.json and "
                   "v2_mscoco_<split>_annotations.json")
    g.add_argument("--vqa-images", help="COCO image root holding train2014/ val2014/ test2015/ (default: --vqa-root)")
    g.add_argument("--nlvr2-root", help="folder with the NLVR2 JSON-lines files train.json, dev.json, test1.json")
    g.add_argument("--nlvr2-images", help="NLVR2 image root holding train/<directory>/, dev/, test1/ "
                   "(default: <nlvr2-root>/images)")
    g.add_argument("--karpathy-json", help="Karpathy dataset_coco.json or dataset_flickr30k.json")
    g.add_argument("--retrieval-images", help="image root: COCO's (holding train2014/ val2014/) or Flickr30K's "
                   "flickr30k-images/ folder (default: the json's folder)")
    return g


def vqa_images(args) -> str:
    return args.vqa_images or args.vqa_root


def nlvr2_images(args) -> str:
    return args.nlvr2_images or os.path.join(args.nlvr2_root, "images")


def retrieval_images(args) -> str:
    return args.retrieval_images or os.path.dirname(os.path.abspath(args.karpathy_json))


def _need(args, *names):
    missing = [n for n in names if not getattr(args, n.lstrip("-").replace("-", "_"))]
    if missing:
        raise SystemExit(f"error: {' '.join(missing)} required for this task (see --help)")


# -------------------------------------------------------------------------------------------------
#                                 Running a model on one split
# -------------------------------------------------------------------------------------------------

def evaluate_split(task: str, model, tokenizer: WordPieceTokenizer, args, split: str, info: DistInfo,
                   out_dir: str, answers: Optional[List[str]] = None, batch_size: int = 64,
                   pairs_per_batch: int = 1024, num_workers: int = 0, max_examples: Optional[int] = None,
                   max_captions: Optional[int] = None, feature_cache: Optional[str] = None,
                   checkpoint: Optional[str] = None, fold_size: int = 1000, log=print) -> Dict[str, Any]:
    """Run ``model`` on ``split`` of ``task``; rank 0 writes predictions / scores and
    ``metrics_{task}_{split}.json`` into ``out_dir``. Returns the metrics on every rank."""
    cfg = model.config
    transform = ImageTransform.from_config(cfg)
    result: Dict[str, Any] = {"task": task, "split": split}
    if info.is_main:
        os.makedirs(out_dir, exist_ok=True)
    if task == "vqa":
        _need(args, "--vqa-root")
        data = vqa.read_vqa(args.vqa_root, split, vqa_images(args), max_examples)
        dataset = vqa.VQADataset(data.questions, answers, transform)
        collate = vqa.VQACollator(tokenizer, cfg.max_text_len, len(answers), cfg.feature_stride)
        preds = vqa.predict_vqa(model, dataset, collate, answers, info, batch_size, num_workers)
        if info.is_main:
            name = "submission" if data.annotations is None else "results"
            path = metrics.write_vqa_submission(os.path.join(out_dir, f"vqa_{split}_{name}.json"), preds)
            result["predictions_file"] = path
            if data.annotations is not None:
                result.update(vqa.score_vqa(preds, data))
                # reference: always answering the most frequent training answer
                result["prior_baseline"] = vqa.score_vqa({q: answers[0] for q in preds}, data)["overall"]
            log(f"vqa {split}: " + (f"accuracy {result['overall']:.2f} (per type {result['per_answer_type']}; "
                                    f"most-frequent-answer baseline {result['prior_baseline']:.2f}), "
                                    if "overall" in result else "") + f"wrote {path}")
    elif task == "nlvr2":
        _need(args, "--nlvr2-root")
        examples = nlvr2.read_nlvr2(os.path.join(args.nlvr2_root, f"{split}.json"), nlvr2_images(args), max_examples)
        dataset = nlvr2.NLVR2Dataset(examples, transform)
        preds = nlvr2.predict_nlvr2(model, dataset, nlvr2.NLVR2Collator(tokenizer, cfg.max_text_len, cfg.feature_stride), info,
                                    batch_size, num_workers)
        if info.is_main:
            path = nlvr2.write_predictions(os.path.join(out_dir, f"nlvr2_{split}_predictions.csv"), preds)
            result["predictions_file"] = path
            if all(ex.label is not None for ex in examples):
                result.update(nlvr2.score_nlvr2(preds, examples))
                majority = sum(ex.label for ex in examples) >= len(examples) / 2
                result["majority_baseline"] = nlvr2.score_nlvr2({e.identifier: majority for e in examples},
                                                                examples)["accuracy"]
                log(f"nlvr2 {split}: accuracy {result['accuracy']:.4f} consistency {result['consistency']:.4f} "
                    f"(majority-class baseline {result['majority_baseline']:.4f}), wrote {path}")
    elif task == "retrieval":
        _need(args, "--karpathy-json")
        data = retrieval.read_karpathy_eval(args.karpathy_json, retrieval_images(args), split, max_examples,
                                            max_captions)
        out = retrieval.evaluate_retrieval(model, data, tokenizer, transform, cfg.max_text_len, info, batch_size,
                                           pairs_per_batch, num_workers, feature_cache, checkpoint,
                                           log=log if info.is_main else (lambda *_: None))
        if info.is_main:
            path = metrics.save_score_matrix(os.path.join(out_dir, f"retrieval_{split}_scores.npz"), out["scores"],
                                             data.image_ids, data.caption_ids, data.caption_image)
            result.update(retrieval.retrieval_metrics(out["scores"], data.caption_image, fold_size))
            result.update(out["stats"], scores_file=path,
                          chance_r1=100.0 / len(data.image_paths))
            r = result["recall"]
            log(f"retrieval {split} ({len(data.image_paths)} images x {len(data.captions)} captions, "
                f"{out['stats']['pairs_per_second']:.0f} pairs/s): TR R@1/5/10 {r['tr_r1']:.1f}/{r['tr_r5']:.1f}/"
                f"{r['tr_r10']:.1f}  IR R@1/5/10 {r['ir_r1']:.1f}/{r['ir_r5']:.1f}/{r['ir_r10']:.1f}  "
                f"(chance R@1 {result['chance_r1']:.1f}), wrote {path}")
    else:
        raise ValueError(f"unknown task {task!r}")
    if info.is_main:
        with open(os.path.join(out_dir, f"metrics_{task}_{split}.json"), "w") as f:
            json.dump(result, f, indent=2, default=str)
    return broadcast_from_main(result, info)


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
        result = metrics.vqa_accuracy(preds, anns, questions)
        return {k: v for k, v in result.items() if k != "per_question"}
    if args.task == "nlvr2":
        if not args.labels:
            raise SystemExit("error: --predictions for nlvr2 needs --labels <split>.json (the official JSON lines)")
        preds = nlvr2.read_predictions(args.predictions)
        examples = nlvr2.read_nlvr2(args.labels, image_root="")
        return nlvr2.score_nlvr2(preds, examples)
    raise SystemExit("error: --predictions is for --task vqa or nlvr2; retrieval takes --scores")


# -------------------------------------------------------------------------------------------------
#                                             CLI
# -------------------------------------------------------------------------------------------------

def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=["vqa", "nlvr2", "retrieval"], help="downstream task")
    p.add_argument("--checkpoint", help="a fine-tuned model.pt (from finetune.py) to run")
    p.add_argument("--split", help="split to evaluate: VQA val2014 / test-dev2015 / test2015, NLVR2 dev / "
                   "test1, retrieval val / test (Karpathy). Default: val2014, dev, test")
    p.add_argument("--output-dir", help="where predictions, scores and metrics go (default: the checkpoint's folder)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--batch-size", type=int, default=64, help="images / questions / examples per batch (per process)")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes per process")
    p.add_argument("--max-examples", "--max-images", dest="max_examples", type=int, default=None,
                   help="evaluate only the first N questions (VQA), examples (NLVR2) or images (retrieval)")
    p.add_argument("--max-captions", type=int, default=None, help="retrieval: at most N captions per image")
    p.add_argument("--pairs-per-batch", type=int, default=1024, help="retrieval: image-caption pairs per forward pass")
    p.add_argument("--feature-cache", help="retrieval: folder where each rank saves its images' visual tokens "
                   "and reuses them on the next run of the same checkpoint")
    p.add_argument("--fold-size", type=int, default=1000, help="retrieval: COCO 1K protocol fold size (the 1K "
                   "figures are reported when the split has exactly 5 folds of images)")
    add_data_arguments(p)
    free = p.add_argument_group("model-free scoring")
    free.add_argument("--predictions", help="VQA results JSON ([{question_id, answer}]) or NLVR2 predictions "
                      "CSV (identifier,True|False) to score")
    free.add_argument("--annotations", help="VQA: the official v2_mscoco_<split>_annotations.json")
    free.add_argument("--questions", help="VQA (optional): the questions file, to check image ids")
    free.add_argument("--labels", help="NLVR2: the official JSON-lines file of the split (e.g. dev.json)")
    free.add_argument("--scores", help="retrieval: a score matrix .npz (pixel_bert.metrics.save_score_matrix)")
    return p


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    if args.predictions or args.scores:
        result = score_files(args)
        print(json.dumps(result, indent=2, default=str))
        if args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, f"metrics_{args.task}_files.json"), "w") as f:
                json.dump(result, f, indent=2, default=str)
        return result
    if not args.checkpoint:
        raise SystemExit("error: give --checkpoint (run a model) or --predictions / --scores (score files)")
    info = setup_distributed(args.device)
    try:
        share_cpu_threads(info)
        model, ckpt = load_model(args.checkpoint)
        task = ckpt.get("task")
        if task != args.task:
            raise SystemExit(f"error: {args.checkpoint} is a {task!r} model, not {args.task!r}")
        if "vocab" not in ckpt:
            raise SystemExit(f"error: {args.checkpoint} carries no 'vocab'; re-save it with finetune.py")
        out_dir = args.output_dir or os.path.dirname(os.path.abspath(args.checkpoint))
        with tempfile.TemporaryDirectory() as tmp:  # the tokenizer reads its vocab.txt once, here
            tokenizer = WordPieceTokenizer.from_tokens(ckpt["vocab"], os.path.join(tmp, "vocab.txt"))
        answers = ckpt.get("answers")
        if args.task == "vqa" and not answers:
            raise SystemExit(f"error: {args.checkpoint} carries no 'answers' list; it was not written by finetune.py")
        model.to(info.device)
        result = evaluate_split(args.task, model, tokenizer, args, args.split or DEFAULT_SPLITS[args.task], info,
                                out_dir, answers, args.batch_size, args.pairs_per_batch, args.num_workers,
                                args.max_examples, args.max_captions, args.feature_cache, args.checkpoint,
                                args.fold_size)
        if info.is_main:
            print(json.dumps({k: v for k, v in result.items() if k != "per_question_type"}, indent=2, default=str))
        return result
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main()
    exit_after_distributed_run()
