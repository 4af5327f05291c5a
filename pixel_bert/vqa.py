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
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from . import metrics
from .annotations import AnnotationError, json_field, json_list, read_json
from .bad_samples import BadSample, drop_bad_samples
from .distributed import DistInfo
from .downstream import predict_sharded
from .images import ImageLoadError, pad_images
from .losses import vqa_loss

# The COCO image folder of each VQA split: test-dev is a subset of the test2015 images.
SPLIT_IMAGE_DIRS = {"train2014": "train2014", "val2014": "val2014", "test2015": "test2015",
                    "test-dev2015": "test2015"}


def vqa_files(root: str, split: str) -> Tuple[str, Optional[str]]:
    """(questions json, annotations json or None when the split has none) of a split under ``root``."""
    questions = os.path.join(root, f"v2_OpenEnded_mscoco_{split}_questions.json")
    annotations = os.path.join(root, f"v2_mscoco_{split}_annotations.json")
    if not os.path.isfile(questions):
        raise FileNotFoundError(
            f"{questions}: VQA questions file not found. --vqa-root must be the folder holding the official "
            f"v2_OpenEnded_mscoco_<split>_questions.json files (splits: {sorted(SPLIT_IMAGE_DIRS)}), or use "
            "`python -m pixel_bert.synthetic_tasks --task vqa --out DIR` for a synthetic copy")
    return questions, (annotations if os.path.isfile(annotations) else None)


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
    the same image; a malformed entry raises AnnotationError naming the file and the entry.
    ``max_questions`` keeps the first N questions (quick runs)."""
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
            answers = tuple(json_field(a, "answer", str, f"{where_a}['answers'][{j}]", a_path)
                            for j, a in enumerate(raw))
            answer_type = json_field(ann, "answer_type", str, where_a, a_path)
            question_type = json_field(ann, "question_type", str, where_a, a_path)
        questions.append(VQAQuestion(qid, image_id, text, vqa_image_path(image_root, split, image_id),
                                     answers, answer_type, question_type))
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
    metrics.vqa_targets. A missing or corrupt image gives a `pixel_bert.bad_samples.BadSample` (dropped and
    carried in the batch by the collator) unless ``fatal_bad_samples``."""

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
                batch_size: int = 64, num_workers: int = 0) -> Dict[int, str]:
    """{question_id: answer string} for every question of ``dataset`` on rank 0 (`predict_sharded`;
    other ranks get an empty dict). Unreadable images get the most frequent answer so the result
    file stays complete (the official evaluation requires one answer per question)."""
    def predict_batch(model, batch, device):
        logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                       batch["images"].to(device, non_blocking=True), batch["pixel_mask"].to(device))
        return {qid: answers[i] for qid, i in zip(batch["question_ids"], logits.float().argmax(1).tolist())}

    merged = predict_sharded(model, dataset, collate, info, predict_batch, batch_size, num_workers,
                             "questions", "vqa eval: ")
    if merged is None:
        return {}
    for q, _, _ in dataset.items:  # questions whose image failed to load
        merged.setdefault(q.question_id, answers[0])
    return merged


def score_vqa(predictions: Dict[int, str], split: VQASplit) -> Dict[str, Any]:
    """The official accuracy (metrics.vqa_accuracy) of ``predictions`` on an annotated split;
    the per-question accuracies are left out of the summary."""
    if split.annotations is None:
        raise ValueError(f"split {split.split!r} has no annotations: write a submission file instead")
    result = metrics.vqa_accuracy(predictions, split.annotations, split.raw_questions)
    return {k: v for k, v in result.items() if k != "per_question"}
