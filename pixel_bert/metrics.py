"""Evaluation metrics for the three downstream tasks (docs/paper.md#evaluation-protocols).

Pure functions over plain Python / numpy / torch data; no model code lives here.

* **VQA 2.0** - the official GT-Vision-Lab/VQA ``vqaEval.py`` accuracy, reproduced exactly
  (answer normalisation quirks, leave-one-out averaging, rounding), plus what training needs from
  the same rules: the answer vocabulary, soft-score targets and the test-dev submission file.
* **NLVR2** - accuracy and consistency, as lil-lab/nlvr ``nlvr2/eval/metrics.py`` computes them.
* **Image-text retrieval** - R@K in both directions from a full (images x captions) score matrix,
  vectorised so that COCO 5K (5,000 x 25,000) takes seconds, the COCO 1K five-fold protocol,
  and a small ``.npz`` format to store score matrices.

Input data use the formats of docs/paper.md#data-formats as distributed (VQA ``questions`` /
``annotations`` lists, NLVR2 ``split-setid-pairid-sentid`` identifiers, Karpathy-split captions).
Bad input raises ``ValueError`` / ``TypeError`` with a message that names what is wrong.
"""
from __future__ import annotations

import collections
import decimal
import json
import math
import os
import re
import zipfile
from typing import (Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple,
                    Union)

import numpy as np
import torch

from .files import atomic_write

__all__ = [
    # VQA
    "normalize_vqa_answer", "vqa_question_accuracy", "vqa_accuracy", "vqa_soft_score",
    "build_answer_vocab", "vqa_targets", "write_vqa_submission",
    # NLVR2
    "nlvr2_sentence_key", "nlvr2_metrics",
    # retrieval
    "retrieval_ranks", "retrieval_recall", "coco_1k_recall", "mean_fold_recall",
    "ScoreMatrix", "save_score_matrix", "load_score_matrix",
]


# =================================================================================================
# VQA 2.0 (docs/paper.md#evaluation-protocols, "VQA accuracy")
# =================================================================================================
#
# The tables below are copied rule for rule from vqaEval.py (class VQAEval.__init__). They are
# data, not code, and must stay identical to the official ones - including the entries that can
# never match (keys with capitals such as "Im": the text is lower-cased before the lookup) and the
# one entry that goes "backwards" ("somebody'd" -> "somebodyd").

_CONTRACTIONS: Dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}

# Number words become digits; note that "none" also becomes "0" (official manualMap).
_NUMBER_WORDS: Dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

_ARTICLES = frozenset(["a", "an", "the"])

# Characters handled by processPunctuation. Not in the list (so left untouched): the apostrophe,
# ':', '*', '#', '$', '%', '&', '^', '~', '|', and '.' (periods have their own rule below).
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
                ">", "<", "@", "`", ",", "?", "!")

# commaStrip = "(\d)(\,)(\d)": a comma between two digits ("1,000"). When it occurs anywhere in
# the answer, *every* punctuation character of the list is deleted rather than turned into a
# space. re.ASCII: the official code is Python 2, where a str pattern matched against unicode
# text without re.UNICODE only knows the ASCII digits 0-9 (Python 3's default \d is Unicode).
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)", re.ASCII)

# periodStrip = "(?!<=\d)(\.)(?!\d)". The first group was meant as a look-behind "(?<=...)" but is
# written "(?!<=...)": a look-ahead for the two characters "<=" followed by a digit, which can
# never match at a '.', so it is a no-op. What remains deletes every '.' that is not followed by
# a digit: "yes." -> "yes", "3.5" stays, but "a.5" also stays.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)", re.ASCII)
# The official call is ``periodStrip.sub("", outText, re.UNICODE)``: re.UNICODE lands in the
# positional ``count`` argument, so at most re.UNICODE == 32 periods are deleted per answer.
_PERIOD_STRIP_MAX_COUNT = 32


def _clean_whitespace(text: str) -> str:
    """The step vqaEval always applies (to answers and predictions): newline and tab become a
    space, then surrounding whitespace is stripped."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(text: str) -> str:
    """vqaEval.processPunctuation, rule for rule.

    For each punctuation character p: if p touches a space anywhere in the *input* (``p + ' '``
    or ``' ' + p``), or if the input contains a comma between digits, every p is deleted;
    otherwise every p becomes a space ("t-shirt" -> "t shirt", "red, white" -> "red white").
    The decision looks at the original input, not at the text as it is being rewritten.
    """
    has_digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_PERIOD_STRIP_MAX_COUNT)


def _process_digit_article(text: str) -> str:
    """vqaEval.processDigitArticle: lower-case, split on whitespace (which also collapses the
    spaces left by the punctuation step), number words -> digits, drop articles, then expand
    contractions ("dont" -> "don't"), and join with single spaces.

    The order matters: the number map runs before the article test and the contraction table
    runs last, on the lower-cased words (so the table's capitalised keys never match).
    """
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(word)
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def normalize_vqa_answer(answer: str) -> str:
    """Normalise one answer string exactly as the official VQA evaluator does (see docs/paper.md).

    Steps, in vqaEval.py's order:

    1. newline / tab -> space, strip;
    2. punctuation (processPunctuation): each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``
       is deleted if it touches a space somewhere in the answer or if the answer has a comma
       between digits ("1,000" -> "1000"), else replaced by a space; then up to 32 periods that
       are not followed by a digit are deleted ("yes." -> "yes", "1.5" kept);
    3. digits / articles (processDigitArticle): lower-case, number words none/zero..ten -> digits,
       drop "a", "an", "the", contraction table ("dont" -> "don't", "im" -> "i'm" does *not*
       happen because the table's key is "Im").

    Note that the evaluator itself only applies steps 2-3 to a question whose 10 ground-truth
    answers are not all identical (see :func:`vqa_question_accuracy`); this function always
    applies them, which is what the answer vocabulary and the training targets want.
    """
    if not isinstance(answer, str):
        raise TypeError(f"VQA answer must be a str, got {type(answer).__name__}: {answer!r}")
    return _process_digit_article(_process_punctuation(_clean_whitespace(answer)))


def vqa_soft_score(count: int) -> float:
    """Soft target of an answer given by ``count`` of the 10 annotators: 0, 0.3, 0.6, 0.9, 1.0
    for count = 0, 1, 2, 3, >= 4 (docs/paper.md#downstream-tasks).

    This is the official accuracy a prediction equal to that answer would receive: vqaEval
    averages, over the 10 ways of leaving one annotator out, ``min(1, matches among the other 9
    / 3)``. With n matching annotators, the n leave-outs that remove a match see n - 1 matches
    and the 10 - n others see n:

        score(n) = (n * min(1, (n-1)/3) + (10-n) * min(1, n/3)) / 10

    n = 1: (0 + 9 * 1/3) / 10 = 0.3;  n = 2: (2/3 + 8 * 2/3) / 10 = 0.6;
    n = 3: (3 * 2/3 + 7) / 10 = 0.9;  n >= 4: 1.0.

    The popular shortcut ``min(n/3, 1)`` (0.33, 0.67, 1.0) overstates the targets for n = 1..3
    (see docs/paper.md): a single annotator is worth 0.3, not 1/3, and three are worth 0.9, not 1.
    """
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)):
        raise TypeError(f"vqa_soft_score: count must be an int, got {type(count).__name__}")
    if count < 0:
        raise ValueError(f"vqa_soft_score: count must be >= 0, got {count}")
    return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0


def _answer_dicts(answers: Sequence[Union[str, Mapping[str, Any]]], where: str) -> List[dict]:
    """Copies of the ground-truth answers as dicts (the caller's data are never modified; the
    official code rewrites them in place). Bare strings get a distinct ``answer_id`` each, so
    each counts as its own annotator."""
    if isinstance(answers, (str, bytes)) or not isinstance(answers, Sequence) or not answers:
        raise ValueError(f"{where}: ground-truth 'answers' must be a non-empty list, "
                         f"got {answers!r}")
    out = []
    for i, a in enumerate(answers):
        if isinstance(a, str):
            out.append({"answer": a, "answer_id": i + 1})
        elif isinstance(a, Mapping) and isinstance(a.get("answer"), str):
            out.append(dict(a))
        else:
            raise ValueError(f"{where}: answer {i} must be a str or a dict with a str 'answer', "
                             f"got {a!r}")
    return out


def _official_question_accuracy(prediction: str, answers: List[dict]) -> float:
    """The body of vqaEval.evaluate's loop for one question; ``answers`` are answer dicts (copies,
    modified here). Returns the unrounded accuracy in [0, 1]."""
    for a in answers:
        a["answer"] = _clean_whitespace(a["answer"])
    prediction = _clean_whitespace(prediction)
    # The official condition: normalise only when the (whitespace-cleaned) ground-truth answers are
    # not all identical. When they are, the prediction is compared raw as well: all-"yes" ground
    # truth gives "Yes" or "yes." an accuracy of 0.
    if len({a["answer"] for a in answers}) > 1:
        for a in answers:
            a["answer"] = _process_digit_article(_process_punctuation(a["answer"]))
        prediction = _process_digit_article(_process_punctuation(prediction))

    # Leave-one-out. The official code builds "the other answers" as the answer *dicts* that are
    # != the left-out one, so dicts that compare equal (same answer, answer_id, confidence) are
    # left out together. Real annotations have distinct answer_ids 1..10 and this is the plain
    # "other 9"; we reproduce the general rule rather than assume it. Identical dicts share the
    # same answer, so: matches among the others = all matches - (multiplicity of the left-out
    # dict if it matches itself).
    matches = [a["answer"] == prediction for a in answers]
    total = sum(matches)
    ids = [a.get("answer_id") for a in answers]
    distinct = None not in ids and len(set(map(repr, ids))) == len(ids)
    accs = []
    for i, a in enumerate(answers):
        if not matches[i]:
            others_matching = total
        elif distinct:
            others_matching = total - 1
        else:
            others_matching = total - sum(1 for b in answers if b == a)
        accs.append(min(1, float(others_matching) / 3))
    # Same operations, in the same order, as the official code, so the floats agree bit for bit.
    return float(sum(accs)) / len(accs)


def vqa_question_accuracy(prediction: str,
                          answers: Sequence[Union[str, Mapping[str, Any]]]) -> float:
    """Official VQA accuracy of one prediction against one question's ground-truth answers, in
    [0, 1] (docs/paper.md#evaluation-protocols): the mean over the 10 leave-one-out subsets of
    ``min(1, #other answers equal to the prediction / 3)``, with the conditional normalisation of
    :func:`normalize_vqa_answer` (applied only when the ground-truth answers are not all identical
    after whitespace cleaning).

    ``answers`` are the annotation's answer dicts (``{"answer", "answer_id", ...}``) or plain
    strings (each string one annotator).
    """
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a str, got {type(prediction).__name__}")
    return _official_question_accuracy(prediction, _answer_dicts(answers, "vqa_question_accuracy"))


def _py2_round(x: float, ndigits: int) -> float:
    """Python 2's round(): correctly rounded, ties away from zero.

    vqaEval.py is Python 2 code. Python 3's round() sends exact ties to the even digit, and exact
    ties do occur here: 10.0 / 16 == 0.625 exactly, which Python 2 prints as 0.63 and a Python 3
    port as 0.62 (e.g. 16 questions of one type, one of them at accuracy 0.1). Decimal(x) is the
    exact binary value, so this reproduces Python 2 exactly.
    """
    if not math.isfinite(x):
        return x
    q = decimal.Decimal(1).scaleb(-ndigits)
    return float(decimal.Decimal(x).quantize(q, rounding=decimal.ROUND_HALF_UP))


def _unwrap_list(obj: Any, key: str, what: str) -> list:
    """Accept either the list itself or the distributed JSON file's dict holding it under key."""
    if isinstance(obj, Mapping):
        if key not in obj:
            raise ValueError(f"{what}: expected a list or a dict with key {key!r}, got a dict with "
                             f"keys {sorted(obj)[:10]}")
        obj = obj[key]
    if not isinstance(obj, (list, tuple)):
        raise TypeError(f"{what}: expected a list of dicts, got {type(obj).__name__}")
    return list(obj)


def _predictions_dict(predictions: Any) -> Dict[Any, str]:
    """{question_id: answer} from a dict or from the submission-format list."""
    if isinstance(predictions, Mapping):
        items = list(predictions.items())
    elif isinstance(predictions, (list, tuple)):
        items = []
        for i, p in enumerate(predictions):
            if not isinstance(p, Mapping) or "question_id" not in p or "answer" not in p:
                raise ValueError(f"predictions[{i}] must be a dict with 'question_id' and "
                                 f"'answer', got {p!r}")
            items.append((p["question_id"], p["answer"]))
    else:
        raise TypeError("predictions must be a dict {question_id: answer} or a list of "
                        f"{{'question_id', 'answer'}} dicts, got {type(predictions).__name__}")
    out: Dict[Any, str] = {}
    for qid, ans in items:
        if isinstance(qid, np.integer):
            qid = int(qid)
        if isinstance(qid, bool):  # JSON true is no id: as a dict key it would be question 1
            raise TypeError(f"predictions: question_id {json.dumps(qid)} is a bool, expected an int")
        if not isinstance(ans, str):
            raise TypeError(f"prediction for question {qid!r} must be a str, got {ans!r}")
        if qid in out:
            # The official loader silently keeps the last one; two answers for one question are
            # almost certainly a bug upstream, so refuse.
            raise ValueError(f"predictions: question_id {qid!r} appears more than once")
        out[qid] = ans
    return out


def _id_mismatch_message(what: str, ids: Iterable, other: Iterable) -> str:
    ids = list(ids)
    msg = f"{len(ids)} {what}, e.g. {ids[:5]!r}"
    types_here = {type(i).__name__ for i in ids}
    types_there = {type(i).__name__ for i in other}
    if types_here and types_there and types_here.isdisjoint(types_there):
        msg += f" (id types differ: {sorted(types_here)} vs {sorted(types_there)})"
    return msg


# VQA 2.0 has 10 human answers per question; the leave-one-out accuracy is defined over them.
VQA_ANSWERS_PER_QUESTION = 10


def vqa_accuracy(predictions: Union[Mapping[int, str], Sequence[Mapping[str, Any]]],
                 annotations: Union[Sequence[Mapping[str, Any]], Mapping[str, Any]],
                 questions: Union[Sequence[Mapping[str, Any]], Mapping[str, Any], None] = None,
                 decimals: int = 2,
                 answers_per_question: Optional[int] = VQA_ANSWERS_PER_QUESTION) -> Dict[str, Any]:
    """The official VQA accuracy (GT-Vision-Lab/VQA vqaEval.py), docs/paper.md#evaluation-protocols.

    Args:
        predictions: ``{question_id: answer}`` or the submission list
            ``[{"question_id": int, "answer": str}, ...]``. Like the official ``loadRes``, there
            must be exactly one prediction for every annotated question and none for any other
            question; otherwise ``ValueError`` says which ids are missing / unknown.
        annotations: the ``annotations`` list of ``v2_mscoco_{split}_annotations.json`` (or the
            file's dict): ``question_id``, ``question_type``, ``answer_type``, ``answers`` (10
            dicts with ``answer`` and ``answer_id``). Not modified.
        questions: optional ``questions`` list (or file dict) of
            ``v2_OpenEnded_mscoco_{split}_questions.json``; when given, every annotated question
            must appear there with the same ``image_id`` (a guard against mixing splits). The
            official open-ended evaluation reads it but does not use it for the score.
        decimals: the official ``n`` (digits kept by the rounding), 2 as in vqaEvalDemo.py.
        answers_per_question: the number of answers every annotation must hold (10, VQA 2.0's);
            another count raises ``ValueError`` naming the first questions, since the formula then
            means nothing (1 answer: a perfect prediction scores 0; 3 identical answers: 66.67).
            None scores whatever count each annotation has by the same leave-one-out formula (for
            other datasets: the figure is then vqaEval's arithmetic, not a VQA 2.0 accuracy).

    Returns a dict, in percent, rounded like vqaEval (``round(100 * sum(acc) / len(acc), n)`` per
    group, with the questions summed in annotation order, and Python 2's round-half-away-from-zero
    on exact ties, see :func:`_py2_round`):

        overall            float, vqaEval.accuracy['overall']
        per_answer_type    {answer_type: float}, vqaEval.accuracy['perAnswerType']
        per_question_type  {question_type: float}, vqaEval.accuracy['perQuestionType']
        per_question       {question_id: float}, vqaEval.evalQA (round(100 * acc, n) each)
        n_questions        int

    Type dicts are in order of first appearance in the annotations.
    """
    anns = _unwrap_list(annotations, "annotations", "vqa_accuracy annotations")
    if not anns:
        raise ValueError("vqa_accuracy: annotations is empty")
    preds = _predictions_dict(predictions)
    _check_predictions_match(preds, _annotated_ids(anns))
    if answers_per_question is not None:
        _check_answer_counts(anns, answers_per_question)
    if questions is not None:
        _check_questions_match(anns, _unwrap_list(questions, "questions", "vqa_accuracy questions"))

    acc_all: List[float] = []
    acc_qtype: Dict[Any, List[float]] = {}
    acc_atype: Dict[Any, List[float]] = {}
    per_question: Dict[Any, float] = {}
    for ann in anns:
        qid = ann["question_id"]
        acc = _official_question_accuracy(preds[qid], _answer_dicts(
            ann["answers"], f"annotation of question_id {qid!r}"))
        acc_all.append(acc)
        acc_qtype.setdefault(ann["question_type"], []).append(acc)
        acc_atype.setdefault(ann["answer_type"], []).append(acc)
        per_question[qid] = _py2_round(100 * acc, decimals)

    def group(accs: List[float]) -> float:
        # Literally vqaEval.setAccuracy: 100 * float(sum) first, then / len, then round.
        return _py2_round(100 * float(sum(accs)) / len(accs), decimals)

    return {
        "overall": group(acc_all),
        "per_answer_type": {k: group(v) for k, v in acc_atype.items()},
        "per_question_type": {k: group(v) for k, v in acc_qtype.items()},
        "per_question": per_question,
        "n_questions": len(acc_all),
    }


def _annotated_ids(anns: Sequence[Mapping[str, Any]]) -> List[Any]:
    """The question ids of the annotations, in order; each annotation checked for the keys the
    evaluation reads and for a duplicate id."""
    ann_ids: List[Any] = []
    seen = set()
    for i, ann in enumerate(anns):
        if not isinstance(ann, Mapping):
            raise TypeError(f"annotations[{i}] must be a dict, got {type(ann).__name__}")
        for key in ("question_id", "question_type", "answer_type", "answers"):
            if key not in ann:
                raise ValueError(f"annotations[{i}] (question_id={ann.get('question_id')!r}) has "
                                 f"no {key!r}")
        qid = ann["question_id"]
        if isinstance(qid, bool):  # JSON true would pass as question 1
            raise TypeError(f"annotations[{i}] has question_id {json.dumps(qid)}, a bool, expected an int")
        if qid in seen:
            raise ValueError(f"annotations: question_id {qid!r} appears more than once")
        seen.add(qid)
        ann_ids.append(qid)
    return ann_ids


def _check_answer_counts(anns: Sequence[Mapping[str, Any]], expected: int) -> None:
    """Every annotation holds ``expected`` answers (see `vqa_accuracy`'s answers_per_question)."""
    wrong = [(a["question_id"], len(a["answers"]) if isinstance(a["answers"], (list, tuple)) else a["answers"])
             for a in anns if not isinstance(a["answers"], (list, tuple)) or len(a["answers"]) != expected]
    if wrong:
        first = ", ".join(f"question_id {q!r}: {n!r}" for q, n in wrong[:5])
        raise ValueError(f"vqa_accuracy: {len(wrong)} of the {len(anns)} annotations do not hold {expected} "
                         f"answers ({first}{', ...' if len(wrong) > 5 else ''}); the official accuracy is "
                         f"defined over {expected} annotators and means nothing with another count (1 answer: "
                         "a perfect prediction scores 0). answers_per_question=None scores any count by the "
                         "same formula")


def _check_predictions_match(preds: Mapping[Any, str], ann_ids: List[Any]) -> None:
    """Exactly one prediction per annotated question, as the official ``loadRes`` requires."""
    annotated = set(ann_ids)
    unknown = [q for q in preds if q not in annotated]
    missing = [q for q in ann_ids if q not in preds]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(_id_mismatch_message("predictions for question ids not in the annotations",
                                              unknown, ann_ids))
        if missing:
            parts.append(_id_mismatch_message("annotated questions without a prediction",
                                              missing, preds))
        raise ValueError("vqa_accuracy: predictions do not match the annotations: "
                         + "; ".join(parts))


def _check_questions_match(anns: Sequence[Mapping[str, Any]], qs: Sequence[Mapping[str, Any]]) -> None:
    """Every annotated question is in the questions file with the same image (no mixed splits)."""
    image_of = {q["question_id"]: q.get("image_id") for q in qs}
    no_q = [a["question_id"] for a in anns if a["question_id"] not in image_of]
    if no_q:
        raise ValueError("vqa_accuracy: " + _id_mismatch_message(
            "annotated question ids absent from questions", no_q, image_of))
    wrong_img = [a["question_id"] for a in anns
                 if "image_id" in a and a["image_id"] != image_of[a["question_id"]]]
    if wrong_img:
        raise ValueError(f"vqa_accuracy: {len(wrong_img)} questions have a different image_id "
                         f"in questions and annotations, e.g. question_id {wrong_img[0]!r}")


def build_answer_vocab(annotations: Union[Sequence[Mapping[str, Any]], Mapping[str, Any]],
                       min_count: int = 9) -> List[str]:
    """The VQA answer vocabulary (docs/paper.md#downstream-tasks, the community standard): normalised
    ``multiple_choice_answer`` strings that occur in at least ``min_count`` questions.

    Pass the train + val annotations together (VQA 2.0 then gives 3,129 answers with
    min_count=9). Each question counts once. The order is deterministic - by count, descending,
    then alphabetically - so the index of an answer does not depend on the input order.
    """
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"build_answer_vocab: min_count must be an int >= 1, got {min_count!r}")
    anns = _unwrap_list(annotations, "annotations", "build_answer_vocab annotations")
    counts: collections.Counter = collections.Counter()
    for i, ann in enumerate(anns):
        if not isinstance(ann, Mapping) or not isinstance(ann.get("multiple_choice_answer"), str):
            raise ValueError(f"build_answer_vocab: annotations[{i}] has no str "
                             "'multiple_choice_answer'")
        counts[normalize_vqa_answer(ann["multiple_choice_answer"])] += 1
    kept = [(a, c) for a, c in counts.items() if c >= min_count]
    kept.sort(key=lambda ac: (-ac[1], ac[0]))
    return [a for a, _ in kept]


def vqa_targets(answers: Sequence[Union[str, Mapping[str, Any]]],
                answer_to_index: Mapping[str, int]) -> Tuple[List[int], List[float]]:
    """Soft-score training targets for one question (Sec. 4.2 of the paper).

    ``answers`` are the question's (10) human answers, as strings or as the annotation's answer
    dicts. Each is normalised with :func:`normalize_vqa_answer`; an answer given by n annotators
    gets :func:`vqa_soft_score` (n). Answers outside the vocabulary are dropped (their score
    cannot be learnt). Returns ``(labels, scores)``, sorted by label index; both empty when no
    answer is in the vocabulary.
    """
    counts: collections.Counter = collections.Counter()
    for i, a in enumerate(answers):
        text = a.get("answer") if isinstance(a, Mapping) else a
        if not isinstance(text, str):
            raise ValueError(f"vqa_targets: answer {i} must be a str or a dict with a str "
                             f"'answer', got {a!r}")
        counts[normalize_vqa_answer(text)] += 1
    pairs = sorted((answer_to_index[a], vqa_soft_score(n))
                   for a, n in counts.items() if a in answer_to_index)
    return [i for i, _ in pairs], [s for _, s in pairs]


def write_vqa_submission(path: Union[str, os.PathLike],
                         predictions: Union[Mapping[int, str], Sequence[Mapping[str, Any]]]) -> str:
    """Write the test-dev / test-std result file (docs/paper.md#evaluation-protocols): a JSON list of
    ``{"question_id": int, "answer": str}``, sorted by question id. The answers are written as
    given (the server normalises them). Returns the path."""
    preds = _predictions_dict(predictions)
    rows = []
    for qid, ans in preds.items():
        if isinstance(qid, bool) or not isinstance(qid, int):
            raise TypeError(f"write_vqa_submission: question_id must be an int, got {qid!r}")
        rows.append({"question_id": qid, "answer": ans})
    rows.sort(key=lambda r: r["question_id"])
    path = os.fspath(path)
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(rows, f, ensure_ascii=False)
    return path


# =================================================================================================
# NLVR2 (docs/paper.md#evaluation-protocols, "NLVR2")
# =================================================================================================

def nlvr2_sentence_key(identifier: str) -> str:
    """The sentence an NLVR2 example belongs to, as lil-lab/nlvr ``nlvr2/eval/metrics.py``
    computes it: split the identifier ``split-setid-pairid-sentid`` on '-', blank the pair id and
    join again, so ``"dev-850-1-0"`` -> ``"dev-850--0"``. Examples sharing a key are the same
    sentence paired with different image pairs."""
    if not isinstance(identifier, str):
        raise TypeError(f"NLVR2 identifier must be a str, got {identifier!r}")
    parts = identifier.split("-")
    if len(parts) != 4 or not all(parts):
        raise ValueError(f"NLVR2 identifier {identifier!r} is not 'split-setid-pairid-sentid'")
    parts[2] = ""
    return "-".join(parts)


def parse_nlvr2_label(value: Any, what: str) -> bool:
    """An NLVR2 label or prediction as a bool. The distributed files store labels as the strings
    "True"/"False"; the official script compares case-insensitively."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"{what} must be a bool or 'True'/'False', got {value!r}")


def nlvr2_metrics(predictions: Mapping[str, Union[bool, str]],
                  labels: Mapping[str, Union[bool, str]]) -> Dict[str, Any]:
    """NLVR2 accuracy and consistency (docs/paper.md), as lil-lab/nlvr ``nlvr2/eval/metrics.py``.

    Args:
        predictions: ``{identifier: bool}`` ("True"/"False" strings accepted).
        labels: ``{identifier: bool}`` for every example of the split.

    accuracy = correct / number of labelled examples. consistency = fraction of sentences (see
    :func:`nlvr2_sentence_key`: identifier with the pair id removed) whose examples are *all*
    predicted correctly. Both are fractions in [0, 1], as the official script prints them.

    Like the official script, only a complete predictions file is scored: a labelled example
    without a prediction, or a prediction for an identifier that has no label, is an error
    naming how many and the first identifiers.

    Returns ``{"accuracy", "consistency", "n", "n_sentences"}``.
    """
    if not labels:
        raise ValueError("nlvr2_metrics: labels is empty")
    extra = [k for k in predictions if k not in labels]
    if extra:
        raise ValueError(f"nlvr2_metrics: {len(extra)} predictions for identifiers without a "
                         f"label, e.g. {extra[:5]!r}")
    missing = [k for k in labels if k not in predictions]
    if missing:
        raise ValueError(f"nlvr2_metrics: {len(missing)} of the {len(labels)} labelled examples have no "
                         f"prediction, e.g. {missing[:5]!r}; the official evaluation scores a complete "
                         "predictions file only")
    correct = 0
    consistent: Dict[str, bool] = {}
    for ident, label in labels.items():
        key = nlvr2_sentence_key(ident)
        truth = parse_nlvr2_label(label, f"label of {ident!r}")
        ok = parse_nlvr2_label(predictions[ident], f"prediction for {ident!r}") == truth
        correct += ok
        consistent[key] = consistent.get(key, True) and ok
    return {
        "accuracy": correct / len(labels),
        "consistency": sum(consistent.values()) / len(consistent),
        "n": len(labels),
        "n_sentences": len(consistent),
    }


# =================================================================================================
# Image-text retrieval (docs/paper.md#evaluation-protocols, "Retrieval")
# =================================================================================================
#
# Tie rule (pessimistic, order-independent): a ground-truth item is ranked *behind* every wrong
# candidate whose score equals it. Precisely, with 0-based ranks:
#   image retrieval, caption c of image g:  rank = #{images i != g : s[i, c] >= s[g, c]}
#   text retrieval, image i, its captions P: rank = #{captions c not in P : s[i, c] >= m_i}
#                                            where m_i = max over p in P of s[i, p]
# i.e. the position of the best ground truth in the worst ordering of ties. Ties among an image's
# own captions do not hurt it (any of them first is a hit). Why pessimistic rather than "stable"
# (ties broken by index): the result does not depend on how the data are ordered, and a degenerate
# model that gives every pair the same score gets R@K ~ 0 instead of a flattering number.

def _as_score_tensor(scores: Any) -> torch.Tensor:
    s = scores if isinstance(scores, torch.Tensor) else torch.as_tensor(np.asarray(scores))
    if s.dim() != 2:
        raise ValueError(f"scores must be 2-D (n_images, n_captions), got shape {tuple(s.shape)}")
    if not s.is_floating_point():
        s = s.to(torch.float64)
    elif s.dtype in (torch.float16, torch.bfloat16):
        s = s.float()  # exact; half-precision CPU kernels are slow
    if s.numel() and torch.isnan(s).any():
        n = int(torch.isnan(s).sum())
        raise ValueError(f"scores contain {n} NaN values; ranks would be meaningless")
    return s


def _as_caption_image(caption_image: Any, n_images: int, n_captions: int,
                      device: torch.device) -> torch.Tensor:
    ci = caption_image if isinstance(caption_image, torch.Tensor) else torch.as_tensor(
        np.asarray(caption_image))
    if ci.dim() != 1 or ci.numel() != n_captions:
        raise ValueError(f"caption_image must have shape ({n_captions},) to match scores' "
                         f"{n_captions} columns, got shape {tuple(ci.shape)}")
    if ci.is_floating_point() or ci.dtype == torch.bool or ci.is_complex():
        raise TypeError(f"caption_image must hold integer image indices, got dtype {ci.dtype}")
    ci = ci.to(device=device, dtype=torch.long)
    if n_captions and (int(ci.min()) < 0 or int(ci.max()) >= n_images):
        raise ValueError(f"caption_image values must be row indices in [0, {n_images}), got "
                         f"min {int(ci.min())}, max {int(ci.max())}")
    n_caps = torch.bincount(ci, minlength=n_images)
    if n_images and int(n_caps.min()) == 0:
        empty = torch.nonzero(n_caps == 0).flatten()[:5].tolist()
        raise ValueError(f"{int((n_caps == 0).sum())} images have no caption (e.g. rows {empty}); "
                         "text retrieval is undefined for them")
    return ci


def retrieval_ranks(scores: Any, caption_image: Any,
                    chunk_rows: int = 256) -> Tuple[np.ndarray, np.ndarray]:
    """0-based ranks of the ground truth in both retrieval directions.

    Args:
        scores: (n_images, n_captions), higher = better match (numpy or torch, any device).
        caption_image: (n_captions,) int, the row of each caption's image.
        chunk_rows: image rows compared at a time (bounds the temporary boolean block to
            chunk_rows x n_captions).

    Returns ``(text_ranks, image_ranks)``: int64 arrays of shape (n_images,) - the rank of each
    image's best-ranked ground-truth caption in its row - and (n_captions,) - the rank of each
    caption's image in its column. Ties count against the ground truth (see the tie rule above).
    """
    s = _as_score_tensor(scores)
    n_img, n_cap = s.shape
    if n_img == 0 or n_cap == 0:
        raise ValueError(f"scores is empty: shape {tuple(s.shape)}")
    ci = _as_caption_image(caption_image, n_img, n_cap, s.device)
    cols = torch.arange(n_cap, device=s.device)
    pos = s[ci, cols]                                            # (n_cap,) score of each true pair
    best = torch.full((n_img,), -math.inf, dtype=s.dtype, device=s.device)
    best = best.scatter_reduce(0, ci, pos, reduce="amax")        # best true caption per image
    n_pos_at_best = torch.bincount(ci[pos == best[ci]], minlength=n_img)

    text_ge = torch.empty(n_img, dtype=torch.long, device=s.device)
    image_ge = torch.zeros(n_cap, dtype=torch.long, device=s.device)
    for r0 in range(0, n_img, chunk_rows):
        block = s[r0:r0 + chunk_rows]
        text_ge[r0:r0 + chunk_rows] = (block >= best[r0:r0 + chunk_rows, None]).sum(1)
        image_ge += (block >= pos[None, :]).sum(0)
    # Each count includes ground truth: the true captions at the best score, the true image.
    text_ranks = text_ge - n_pos_at_best
    image_ranks = image_ge - 1
    return text_ranks.cpu().numpy(), image_ranks.cpu().numpy()


def _check_ks(ks: Sequence[int]) -> Tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1
                     for k in ks):
        raise ValueError(f"ks must be positive ints, got {ks!r}")
    return tuple(int(k) for k in ks)


def retrieval_recall(scores: Any, caption_image: Any,
                     ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """Recall@K for text and image retrieval from a full score matrix (docs/paper.md#evaluation-protocols).

    Args:
        scores: (n_images, n_captions), higher = better (every pair scored by the cross-encoder).
        caption_image: (n_captions,) int, row index of each caption's image; every image needs at
            least one caption.
        ks: the K values.

    Text retrieval (TR) R@K: percentage of images whose best-ranked ground-truth caption is in the
    top K of the image's row. Image retrieval (IR) R@K: percentage of captions whose image is in
    the top K of the caption's column. Ties count against the ground truth (module comment).

    Returns percentages: ``tr_r{k}``, ``ir_r{k}`` for each k, ``tr_mean`` / ``ir_mean`` (mean over
    ks), ``r_mean`` (mean of all), ``rsum`` (sum of all, the usual model-selection number).
    """
    ks = _check_ks(ks)
    text_ranks, image_ranks = retrieval_ranks(scores, caption_image)
    out: Dict[str, float] = {}
    for k in ks:
        out[f"tr_r{k}"] = 100.0 * int((text_ranks < k).sum()) / len(text_ranks)
    for k in ks:
        out[f"ir_r{k}"] = 100.0 * int((image_ranks < k).sum()) / len(image_ranks)
    tr = [out[f"tr_r{k}"] for k in ks]
    ir = [out[f"ir_r{k}"] for k in ks]
    out["tr_mean"] = sum(tr) / len(ks)
    out["ir_mean"] = sum(ir) / len(ks)
    out["rsum"] = sum(tr) + sum(ir)
    out["r_mean"] = out["rsum"] / (2 * len(ks))
    return out


def coco_1k_recall(scores: Any, caption_image: Any, n_folds: int = 5,
                   ks: Sequence[int] = (1, 5, 10), fold_size: int = 1000) -> Dict[str, float]:
    """The COCO 1K protocol (docs/paper.md): split the 5K test images into ``n_folds`` folds of
    ``fold_size`` consecutive images (0-999, 1000-1999, ...), each with its own captions, compute
    :func:`retrieval_recall` within each fold, and average every figure over the folds.

    Captions are assigned to a fold by their image, so they need not be stored in image order.
    ``n_images`` must equal ``n_folds * fold_size``.
    """
    s = _as_score_tensor(scores)
    n_img, n_cap = s.shape
    if n_folds < 1 or fold_size < 1 or n_img != n_folds * fold_size:
        raise ValueError(f"coco_1k_recall: scores has {n_img} images, expected n_folds * "
                         f"fold_size = {n_folds} * {fold_size} = {n_folds * fold_size}")
    ci = _as_caption_image(caption_image, n_img, n_cap, s.device)
    folds = []
    for f in range(n_folds):
        lo, hi = f * fold_size, (f + 1) * fold_size
        cols = torch.nonzero((ci >= lo) & (ci < hi)).flatten()
        folds.append((s[lo:hi][:, cols], ci[cols] - lo))
    return mean_fold_recall(folds, ks)


def mean_fold_recall(folds: Sequence[Tuple[Any, Any]], ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """Every figure of :func:`retrieval_recall` averaged over ``folds``, each a (scores, caption_image)
    pair of its own images and captions: the COCO 1K protocol from its diagonal blocks alone
    (what :func:`coco_1k_recall` computes from the whole 5K matrix; docs/paper.md)."""
    if not folds:
        raise ValueError("mean_fold_recall: no fold given")
    per_fold = [retrieval_recall(scores, caption_image, ks) for scores, caption_image in folds]
    return {k: sum(fr[k] for fr in per_fold) / len(per_fold) for k in per_fold[0]}


class ScoreMatrix(NamedTuple):
    """A stored retrieval score matrix (see :func:`save_score_matrix`)."""
    scores: np.ndarray         # (n_images, n_captions) float, higher = better
    image_ids: np.ndarray      # (n_images,) dataset ids of the rows (int or str)
    caption_ids: np.ndarray    # (n_captions,) dataset ids of the columns (int or str)
    caption_image: np.ndarray  # (n_captions,) int64, row index of each caption's image


_SCORE_KEYS = ("scores", "image_ids", "caption_ids", "caption_image")


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _validate_score_arrays(arrays: Dict[str, np.ndarray], where: str) -> ScoreMatrix:
    s, img, cap, ci = (arrays[k] for k in _SCORE_KEYS)
    if s.ndim != 2 or s.dtype.kind != "f":
        raise ValueError(f"{where}: 'scores' must be a 2-D float array, got shape {s.shape} "
                         f"dtype {s.dtype}")
    n_img, n_cap = s.shape
    for name, arr, n in (("image_ids", img, n_img), ("caption_ids", cap, n_cap),
                         ("caption_image", ci, n_cap)):
        if arr.shape != (n,):
            raise ValueError(f"{where}: {name!r} must have shape ({n},) to match scores "
                             f"{s.shape}, got {arr.shape}")
    for name, arr in (("image_ids", img), ("caption_ids", cap)):
        if arr.dtype.kind not in "iuU":
            raise ValueError(f"{where}: {name!r} must hold ints or strings, got dtype {arr.dtype}")
    if ci.dtype.kind not in "iu":
        raise ValueError(f"{where}: 'caption_image' must hold ints, got dtype {ci.dtype}")
    if n_cap and (ci.min() < 0 or ci.max() >= n_img):
        raise ValueError(f"{where}: 'caption_image' values must be in [0, {n_img}), got min "
                         f"{ci.min()}, max {ci.max()}")
    return ScoreMatrix(s, img, cap, ci.astype(np.int64))


def save_score_matrix(path: Union[str, os.PathLike], scores: Any, image_ids: Any,
                      caption_ids: Any, caption_image: Any) -> str:
    """Save a retrieval score matrix as an uncompressed ``.npz`` holding four arrays:

    * ``scores`` (n_images, n_captions) float - higher = better;
    * ``image_ids`` (n_images,) int or str - the dataset id of each row (e.g. COCO id);
    * ``caption_ids`` (n_captions,) int or str - the dataset id of each column (e.g. sentid);
    * ``caption_image`` (n_captions,) int64 - the row of each caption's image.

    Written to a temporary file and renamed, so an interrupted save never leaves a truncated
    file at ``path``. The file is written at exactly ``path`` (numpy would otherwise append
    ".npz"). Returns the path.
    """
    path = os.fspath(path)
    arrays = {k: _to_numpy(v) for k, v in zip(_SCORE_KEYS, (scores, image_ids, caption_ids,
                                                            caption_image))}
    sm = _validate_score_arrays(arrays, f"save_score_matrix({path!r})")
    with atomic_write(path) as f:
        np.savez(f, **sm._asdict())
    return path


def load_score_matrix(path: Union[str, os.PathLike]) -> ScoreMatrix:
    """Load a file written by :func:`save_score_matrix` and check it.

    Loading is safe: ``np.load(..., allow_pickle=False)`` never executes pickled objects. Any
    problem (not an .npz, a missing array, wrong shapes or dtypes, caption_image out of range)
    raises ``ValueError`` naming the file and what is wrong.
    """
    path = os.fspath(path)
    where = f"score matrix file {path!r}"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where} does not exist")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single .npy array, not an .npz archive")
        with data:
            absent = [k for k in _SCORE_KEYS if k not in data.files]
            if absent:
                raise ValueError(f"missing arrays {absent} (has {sorted(data.files)})")
            arrays = {k: data[k] for k in _SCORE_KEYS}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{where} is not a valid score matrix: {e}") from e
    return _validate_score_arrays(arrays, where)
