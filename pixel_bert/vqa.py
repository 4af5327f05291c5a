"""VQA 2.0 fine-tuning and evaluation (Sec. 4.2 of the paper; docs/paper.md).

    read_vqa            the official files of one split -> VQASplit (questions, raw annotations)
    answer_vocabulary   normalised multiple_choice_answer strings in >= 9 train+val questions
    VQADataset          (image, question, soft-score target) items; VQACollator batches them
    vqa_loss / vqa_step binary cross-entropy on soft scores (Sec. 4.2)
    evaluate_vqa        predictions (sharded across torchrun ranks) + the official accuracy
    write_vqa_submission (pixel_bert.metrics) writes the test-dev result file

Files, exactly as distributed (docs/paper.md#data-formats), under one annotation root::

    v2_OpenEnded_mscoco_{split}_questions.json   questions[{image_id, question, question_id}]
    v2_mscoco_{split}_annotations.json           annotations[{question_id, image_id, question_type,
                                                 answer_type, multiple_choice_answer, answers[10]}]

with split train2014 / val2014 / test-dev2015 / test2015 (the test splits have no annotations),
and the COCO images under an image root: ``{dir}/COCO_{dir}_{image_id:012d}.jpg`` where dir is
train2014, val2014 or test2015 (test-dev questions use test2015 images).

Targets: an answer given by n of the 10 annotators scores 0 / 0.3 / 0.6 / 0.9 / 1 for n = 0 / 1 /
2 / 3 / >=4 (metrics.vqa_soft_score, exactly the official accuracy). A training question none of
whose answers is in the vocabulary is kept with an all-zero target by default (the common
practice: it still teaches the model to lower every score it cannot earn);
``drop_unanswerable=True`` removes such questions instead.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from . import metrics
from .annotations import AnnotationError, CaptionRecord, json_field, json_list, read_json
from .bad_samples import BadSample, BadSampleError, drop_bad_samples
from .batches import aspect_ratio_group_ids
from .config import check_fields
from .distributed import DistInfo
from .downstream import DownstreamTask, EvalSettings, predict_sharded, require_flags
from .images import ImageLoadError, ImageTransform, pad_images
from .losses import vqa_loss
from .runs import TrainingData
from .saved_model import save_answers

# The COCO image folder of each VQA split: test-dev is a subset of the test2015 images.
SPLIT_IMAGE_DIRS = {"train2014": "train2014", "val2014": "val2014", "test2015": "test2015",
                    "test-dev2015": "test2015"}


def vqa_files(root: str, split: str) -> Tuple[str, Optional[str]]:
    """(questions json, annotations json or None when the split has none) of a split under ``root``."""
    questions = os.path.join(root, f"v2_OpenEnded_mscoco_{split}_questions.json")
    annotations = annotations_file(root, split)
    if not os.path.isfile(questions):
        raise FileNotFoundError(
            f"{questions}: VQA questions file not found. --vqa-root must be the folder holding the official "
            f"v2_OpenEnded_mscoco_<split>_questions.json files (splits: {sorted(SPLIT_IMAGE_DIRS)}), or use "
            "`python -m pixel_bert.synthetic_tasks --task vqa --out DIR` for a synthetic copy")
    return questions, (annotations if os.path.isfile(annotations) else None)


def annotations_file(root: str, split: str) -> str:
    """Where the official annotations of ``split`` are under ``root`` (whether or not they exist)."""
    return os.path.join(root, f"v2_mscoco_{split}_annotations.json")


def vqa_image_path(image_root: str, split: str, image_id: int) -> str:
    """``image_root/{dir}/COCO_{dir}_{image_id:012d}.jpg`` (the COCO 2014/2015 file names)."""
    folder = SPLIT_IMAGE_DIRS.get(split, split)
    return os.path.join(image_root, folder, f"COCO_{folder}_{image_id:012d}.jpg")


class VQAQuestion(NamedTuple):
    """One question. ``answers``: the 10 human answers (empty on test splits)."""
    question_id: int
    image_id: int
    question: str
    image_path: str
    answers: Tuple[str, ...] = ()
    answer_type: str = ""
    question_type: str = ""


@dataclass
class VQASplit:
    """A split as read: questions in file order, and the raw annotation / question lists that the
    official evaluation wants (``annotations`` is None on test splits)."""
    split: str
    questions: List[VQAQuestion]
    annotations: Optional[List[dict]]
    raw_questions: List[dict]


def read_vqa(root: str, split: str, image_root: Optional[str] = None,
             max_questions: Optional[int] = None) -> VQASplit:
    """Read the official files of ``split`` (see the module docstring). ``image_root`` defaults to
    ``root``. Every question of an annotated split must have its annotation (and vice versa), with
    the same image and the 10 answers of VQA 2.0 (the soft scores and the official accuracy are
    defined over 10 annotators); a malformed entry raises AnnotationError naming the file and the
    entry. ``max_questions`` keeps the first N questions (quick runs)."""
    q_path, a_path = vqa_files(root, split)
    image_root = root if image_root is None else image_root
    q_data = read_json(q_path, "a VQA questions file with 'questions'")
    raw_questions = json_list(q_data, "questions", "the top-level object", q_path)
    if max_questions is not None:
        raw_questions = raw_questions[:max_questions]
    annotations = None
    by_qid: Dict[int, dict] = {}
    if a_path is not None:
        a_data = read_json(a_path, "a VQA annotations file with 'annotations'")
        annotations = json_list(a_data, "annotations", "the top-level object", a_path)
        for i, ann in enumerate(annotations):
            qid = json_field(ann, "question_id", int, f"annotations[{i}]", a_path)
            if qid in by_qid:
                raise AnnotationError(f"{a_path}: annotations[{i}] has question_id {qid}, annotated earlier too")
            by_qid[qid] = ann
    questions = []
    seen = set()
    other_counts = []  # (question_id, number of answers) of annotations without 10 answers
    for i, q in enumerate(raw_questions):
        where = f"questions[{i}]"
        qid = json_field(q, "question_id", int, where, q_path)
        if qid in seen:
            raise AnnotationError(f"{q_path}: {where} has question_id {qid}, asked earlier in the file too")
        seen.add(qid)
        image_id = json_field(q, "image_id", int, where, q_path)
        text = json_field(q, "question", str, where, q_path)
        answers, answer_type, question_type = (), "", ""
        if annotations is not None:
            if qid not in by_qid:
                raise AnnotationError(f"{a_path}: no annotation for question_id {qid} of {q_path}; are the two "
                                      "files of the same split?")
            ann = by_qid[qid]
            where_a = f"annotation of question_id {qid}"
            if ann.get("image_id", image_id) != image_id:
                raise AnnotationError(f"{a_path}: {where_a} has image_id {ann.get('image_id')}, the question "
                                      f"file says {image_id}")
            raw = json_list(ann, "answers", where_a, a_path)
            if len(raw) != metrics.VQA_ANSWERS_PER_QUESTION:
                other_counts.append((qid, len(raw)))
            answers = tuple(json_field(a, "answer", str, f"{where_a}['answers'][{j}]", a_path)
                            for j, a in enumerate(raw))
            answer_type = json_field(ann, "answer_type", str, where_a, a_path)
            question_type = json_field(ann, "question_type", str, where_a, a_path)
        questions.append(VQAQuestion(qid, image_id, text, vqa_image_path(image_root, split, image_id),
                                     answers, answer_type, question_type))
    if other_counts:
        first = ", ".join(f"question_id {q}: {n}" for q, n in other_counts[:5])
        raise AnnotationError(
            f"{a_path}: {len(other_counts)} annotations do not hold {metrics.VQA_ANSWERS_PER_QUESTION} answers "
            f"({first}{', ...' if len(other_counts) > 5 else ''}); VQA 2.0 has 10 per question, and the soft-score "
            "targets and the official accuracy are defined over 10 annotators (with 1 answer a perfect prediction "
            "scores 0)")
    if annotations is not None:
        orphans = sorted(set(by_qid) - seen)
        if orphans and max_questions is None:
            raise AnnotationError(f"{a_path}: {len(orphans)} annotations are of questions {q_path} does not have "
                                  f"(question_id {orphans[0]}, ...); are the two files of the same split?")
        annotations = [a for a in annotations if a["question_id"] in seen]
    return VQASplit(split, questions, annotations, raw_questions)


# -------------------------------------------------------------------------------------------------
#                                     Answer vocabulary
# -------------------------------------------------------------------------------------------------

def answer_vocabulary(annotation_lists: Sequence[Sequence[dict]], min_count: int = 9) -> List[str]:
    """The answer classes (Sec. 4.2): normalised ``multiple_choice_answer`` strings occurring in at
    least ``min_count`` questions of all the given splits together (train + val: 3,129 answers)."""
    merged = [a for anns in annotation_lists for a in anns]
    answers = metrics.build_answer_vocab(merged, min_count)
    if not answers:
        raise ValueError(f"no answer occurs in {min_count} or more questions of {len(merged)}; lower "
                         "--vqa_min_answer_count or give more data")
    return answers


# -------------------------------------------------------------------------------------------------
#                                     Dataset and batches
# -------------------------------------------------------------------------------------------------

class VQADataset(torch.utils.data.Dataset):
    """Items ``dict(image, question, question_id, labels, scores, index)``: the resized, normalised
    image, the question text, and the soft-score target as (answer indices, scores) from
    metrics.vqa_targets. A missing or corrupt image, or an empty question, gives a
    `pixel_bert.bad_samples.BadSample` (dropped and carried in the batch by the collator, as pre-training's
    empty captions) unless ``fatal_bad_samples``."""

    def __init__(self, questions: Sequence[VQAQuestion], answers: Sequence[str], transform,
                 drop_unanswerable: bool = False, fatal_bad_samples: bool = False):
        self.answer_to_index = {a: i for i, a in enumerate(answers)}
        self.transform = transform
        self.fatal_bad_samples = fatal_bad_samples
        items = []
        for q in questions:
            labels, scores = metrics.vqa_targets(q.answers, self.answer_to_index) if q.answers else ([], [])
            if drop_unanswerable and not labels:
                continue
            items.append((q, labels, scores))
        self.items = items
        self.num_unanswerable = sum(1 for q, labels, _ in items if q.answers and not labels)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Union[Dict[str, Any], BadSample]:
        q, labels, scores = self.items[index]
        if not q.question.strip():
            message = (f"question_id {q.question_id} (image {q.image_path}) has an empty question; fix or drop "
                       "it in the questions file")
            if self.fatal_bad_samples:
                raise BadSampleError(message + " (fatal_bad_samples=True; set it False to skip bad samples)")
            return BadSample(q.image_path, "empty_text", message)
        try:
            image = self.transform.load(q.image_path)
        except ImageLoadError as err:
            if self.fatal_bad_samples:
                raise
            return BadSample.from_error(err)
        return dict(image=image, question=q.question, question_id=q.question_id,
                    labels=labels, scores=scores, index=index)


class VQACollator:
    """Pads images, tokenises questions and builds the dense (B, num_answers) soft-score targets."""

    def __init__(self, tokenizer, max_text_len: int, num_answers: int, size_divisor: int = 1):
        self.tokenizer, self.max_text_len, self.num_answers = tokenizer, max_text_len, num_answers
        self.size_divisor = size_divisor

    def __call__(self, samples):
        good, bad = drop_bad_samples(samples)
        if not good:
            return dict(input_ids=torch.zeros((0, 0), dtype=torch.long), num_samples=0, **bad)
        images, pixel_mask = pad_images([s["image"] for s in good], self.size_divisor)
        text = self.tokenizer([s["question"] for s in good], max_length=self.max_text_len)
        # Scatter every (row, answer, score) triple at once: no loop over answers.
        rows = torch.repeat_interleave(torch.arange(len(good)), torch.tensor([len(s["labels"]) for s in good]))
        cols = torch.tensor([a for s in good for a in s["labels"]], dtype=torch.long)
        vals = torch.tensor([v for s in good for v in s["scores"]], dtype=torch.float32)
        targets = torch.zeros(len(good), self.num_answers)
        targets[rows, cols] = vals
        return dict(images=images, pixel_mask=pixel_mask, input_ids=text.input_ids,
                    attention_mask=text.attention_mask, targets=targets,
                    question_ids=[s["question_id"] for s in good], num_samples=len(good), **bad)


# -------------------------------------------------------------------------------------------------
#                                        Loss and step
# -------------------------------------------------------------------------------------------------


def vqa_step(model, batch: dict, device) -> Dict[str, torch.Tensor]:
    """One micro-batch: loss, and the training VQA score (soft score of the argmax answer)."""
    targets = batch["targets"].to(device)
    logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                   batch["images"].to(device, non_blocking=True), batch["pixel_mask"].to(device, non_blocking=True))
    loss = vqa_loss(logits, targets)
    score = targets.gather(1, logits.argmax(1, keepdim=True)).mean()
    return dict(loss=loss, vqa_score=score.detach())


# -------------------------------------------------------------------------------------------------
#                                        Evaluation
# -------------------------------------------------------------------------------------------------

def predict_vqa(model, dataset: VQADataset, collate: VQACollator, answers: Sequence[str], info: DistInfo,
                batch_size: int = 64, num_workers: int = 0,
                max_bad_fraction: float = 0.0) -> Tuple[Dict[int, str], int]:
    """({question_id: answer string} for every question of ``dataset``, how many were bad samples) on
    rank 0 (`predict_sharded`; other ranks get ``({}, 0)``). More than ``max_bad_fraction`` unreadable
    images stop the evaluation; those allowed get the most frequent answer so the result file stays
    complete (the official evaluation requires one answer per question), and are counted."""
    def predict_batch(model, batch, device):
        logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                       batch["images"].to(device, non_blocking=True), batch["pixel_mask"].to(device))
        return {qid: answers[i] for qid, i in zip(batch["question_ids"], logits.float().argmax(1).tolist())}

    merged = predict_sharded(model, dataset, collate, info, predict_batch, batch_size, num_workers,
                             "questions", "vqa eval: ", max_bad_fraction)
    if merged is None:
        return {}, 0
    blind = [q.question_id for q, _, _ in dataset.items if q.question_id not in merged]  # images that failed
    merged.update((qid, answers[0]) for qid in blind)
    return merged, len(blind)


def score_vqa(predictions: Dict[int, str], split: VQASplit) -> Dict[str, Any]:
    """The official accuracy (metrics.vqa_accuracy) of ``predictions`` on an annotated split;
    the per-question accuracies are left out of the summary."""
    if split.annotations is None:
        raise ValueError(f"split {split.split!r} has no annotations: write a submission file instead")
    result = metrics.vqa_accuracy(predictions, split.annotations, split.raw_questions)
    return {k: v for k, v in result.items() if k != "per_question"}


# -------------------------------------------------------------------------------------------------
#                             The task, as finetune.py and evaluate.py run it
# -------------------------------------------------------------------------------------------------

@dataclass
class VQAConfig:
    """VQA's fine-tuning fields beyond `pixel_bert.config.TrainConfig` (Sec. 4.2; docs/paper.md)."""
    vqa_min_answer_count: int = 9         # answers in >= this many train+val questions form the
                                          # vocabulary: 3,129 answers on VQA 2.0 [choice: community standard]
    vqa_drop_unanswerable: bool = False   # drop training questions with no answer in the vocabulary;
                                          # default keeps them with an all-zero target [choice: common practice]
    vqa_train_splits: Tuple[str, ...] = ("train2014",)  # splits to train on, comma-separated (train2014,val2014
                                          # for a test-dev submission: the val evaluation is then skipped)

    ALLOWED: ClassVar[Dict[str, Any]] = {"vqa_min_answer_count": (1, None)}  # see pixel_bert.model.allowed_values

    def __post_init__(self):
        self.vqa_train_splits = tuple(self.vqa_train_splits)
        repeated = sorted({s for s in self.vqa_train_splits if self.vqa_train_splits.count(s) > 1})
        if repeated:
            raise ValueError(f"--vqa-train-splits {','.join(self.vqa_train_splits)} lists {', '.join(repeated)} more "
                             "than once: each of its questions would be trained on that many times an epoch; "
                             "list each split once")
        check_fields(self)


class VQA(DownstreamTask):
    """VQA 2.0 (Sec. 4.2): an MLP on [CLS] over the answer vocabulary, BCE on soft scores."""
    name = "vqa"
    config_class = VQAConfig
    data_flags = ("vqa_root", "vqa_images")
    presets = {"vqa": dict(epochs=18, decay_epochs=(12, 16), batch_size=16)}  # 256 over 16 GPUs [paper]
    demo_overrides = dict(epochs=3, decay_epochs=(2,), batch_size=32, lr=5e-4, cnn_lr=0.02, warmup_steps=30)
    synthetic_sizes = (1500, 200, 50)  # images
    val_split = default_split = "val2014"

    def add_data_arguments(self, group) -> None:
        group.add_argument("--vqa-root", help="folder with v2_OpenEnded_mscoco_<split>_questions.json and "
                           "v2_mscoco_<split>_annotations.json")
        group.add_argument("--vqa-images", help="COCO image root holding train2014/ val2014/ test2015/ "
                           "(default: --vqa-root)")

    def image_root(self, args) -> str:
        return args.vqa_images or args.vqa_root

    def skip_evaluation(self, split: str, task_cfg: VQAConfig) -> Optional[str]:
        return f"{split} is one of the training splits" if split in task_cfg.vqa_train_splits else None

    def read_evaluation_split(self, args, split: str, max_questions: Optional[int] = None) -> VQASplit:
        """``split`` as the evaluation reads it: `read_vqa`, and no empty question. An evaluation answers
        every question, so an empty one is refused here, while training skips and counts it."""
        require_flags(args, "--vqa-root")
        data = read_vqa(args.vqa_root, split, self.image_root(args), max_questions)
        empty = [i for i, q in enumerate(data.questions) if not q.question.strip()]
        if empty:
            raise AnnotationError(
                f"{vqa_files(args.vqa_root, split)[0]}: questions[{empty[0]}] (question_id "
                f"{data.questions[empty[0]].question_id}) is an empty question ({len(empty)} of "
                f"{len(data.questions)} are): an evaluation answers every question, so it takes no empty one")
        return data

    def check_evaluation_files(self, args, split: str) -> None:
        if self.read_evaluation_split(args, split).annotations is None:
            raise AnnotationError(
                f"{annotations_file(args.vqa_root, split)}: not found, so finetune.py's evaluation of {split} "
                "would give no accuracy. Give the annotations file, or --no-eval; evaluate.py --task vqa --split "
                f"{split} predicts a split without annotations (the submission file of the test splits)")

    def training_data(self, args, task_cfg: VQAConfig, model_cfg, train_cfg, tokenizer, device, out_dir,
                      log) -> TrainingData:
        """The training questions, and the answer vocabulary from train + val (saved as answers.json;
        the VQA head gets one output per answer)."""
        images = self.image_root(args)
        splits = list(task_cfg.vqa_train_splits)
        train = [read_vqa(args.vqa_root, s, images) for s in splits]
        for s, t in zip(splits, train):
            if not t.questions:
                raise AnnotationError(f"{vqa_files(args.vqa_root, s)[0]}: 'questions' is an empty list, so "
                                      f"--vqa-train-splits {s} gives no training question")
        if any(t.annotations is None for t in train):
            raise ValueError(f"--vqa-train-splits {','.join(splits)}: a split without annotations cannot train")
        vocab_splits = {s: t for s, t in zip(splits, train)}
        for s in ("train2014", "val2014"):  # the vocabulary always counts train + val
            if s not in vocab_splits and os.path.isfile(os.path.join(args.vqa_root, f"v2_mscoco_{s}_annotations.json")):
                vocab_splits[s] = read_vqa(args.vqa_root, s, images)
        # The answer classes come from train + val together (the community standard, docs/paper.md).
        answers = answer_vocabulary([t.annotations for t in vocab_splits.values()], task_cfg.vqa_min_answer_count)
        save_answers(os.path.join(out_dir, "answers.json"), answers)
        model_cfg.num_answers = len(answers)
        dataset = VQADataset([q for t in train for q in t.questions], answers, ImageTransform.from_config(model_cfg),
                             task_cfg.vqa_drop_unanswerable, train_cfg.fatal_bad_samples)
        log(f"vqa: {len(dataset)} training questions, {len(answers)} answers (min count "
            f"{task_cfg.vqa_min_answer_count}), {dataset.num_unanswerable} with no answer in the vocabulary "
            f"({'dropped' if task_cfg.vqa_drop_unanswerable else 'kept with all-zero targets'})")
        groups = (aspect_ratio_group_ids([CaptionRecord(q[0].image_path, "", "") for q in dataset.items])
                  if train_cfg.group_by_aspect_ratio else None)
        collate = VQACollator(tokenizer, model_cfg.max_text_len, len(answers), model_cfg.feature_stride)
        return TrainingData(dataset, collate, lambda model, batch, _: vqa_step(model, batch, device), groups,
                            {"answers": answers})

    def evaluate(self, model, tokenizer, args, split, info, out_dir, answers, settings: EvalSettings,
                 log) -> Dict[str, Any]:
        cfg = model.config
        data = self.read_evaluation_split(args, split, settings.max_examples)
        dataset = VQADataset(data.questions, answers, ImageTransform.from_config(cfg))
        collate = VQACollator(tokenizer, cfg.max_text_len, len(answers), cfg.feature_stride)
        preds, n_blind = predict_vqa(model, dataset, collate, answers, info, settings.batch_size,
                                     settings.num_workers, settings.max_bad_fraction)
        if not info.is_main:
            return {}
        name = "submission" if data.annotations is None else "results"
        result: Dict[str, Any] = {"predictions_file": metrics.write_vqa_submission(
            os.path.join(out_dir, f"vqa_{split}_{name}.json"), preds), "n_questions": len(preds),
            "n_bad_samples": n_blind}
        blind = f", {n_blind} of them answered without their image (unreadable)" if n_blind else ""
        if data.annotations is not None:
            result.update(score_vqa(preds, data))
            # reference: always answering the most frequent training answer
            result["prior_baseline"] = score_vqa({q: answers[0] for q in preds}, data)["overall"]
            log(f"vqa {split}: accuracy {result['overall']:.2f} on {result['n_questions']} questions{blind} (per "
                f"type {result['per_answer_type']}; most-frequent-answer baseline {result['prior_baseline']:.2f})")
        else:
            log(f"vqa {split}: {annotations_file(args.vqa_root, split)} does not exist, so no accuracy: "
                f"{len(preds)} questions predicted{blind}")
        log(f"vqa {split}: wrote {result['predictions_file']}")
        return result
