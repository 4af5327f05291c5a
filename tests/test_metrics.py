"""Tests for pixel_bert.metrics (docs/paper.md#evaluation-protocols).

Expected values are computed by hand from the rules of the official evaluators
(GT-Vision-Lab/VQA vqaEval.py, lil-lab/nlvr nlvr2/eval/metrics.py); the comments show the working.
`make_nasty_vqa` builds adversarial VQA files in the official formats; the official script's figures on
them are stored below (OFFICIAL_NASTY_FIGURES, with how they were obtained), so the tests need no
copy of it.
"""
import hashlib
import json
import os
import random

import numpy as np
import pytest
import torch

from pixel_bert.metrics import (ScoreMatrix, build_answer_vocab, coco_1k_recall, load_score_matrix,
                                nlvr2_metrics, nlvr2_sentence_key, normalize_vqa_answer,
                                retrieval_ranks, retrieval_recall, save_score_matrix, vqa_accuracy,
                                vqa_question_accuracy, vqa_soft_score, vqa_targets,
                                write_vqa_submission)


# =================================================================================================
# Generator of nasty VQA data in the official file formats
# =================================================================================================

# Groups of answers that the normaliser should (or, through its quirks, should not) merge.
NASTY_GROUPS = [
    ["yes", "Yes", "YES", "yes.", "yes!", " yes\n", "\tyes", "yes ", "yes?", "yess"],
    ["no", "No", "no.", "nope", "no!", "NO", "not"],
    ["2", "two", "Two", "2.", " 2", "2 ", "two.", "too", "II"],
    ["1000", "1,000", "1 000", "1.000", "1,000.", "one thousand", "10,00"],
    ["0", "zero", "none", "None", "0.", "nothing", "zero."],
    ["10", "ten", "Ten", "10.", "1 0", "10!"],
    ["dog", "a dog", "the dog", "The Dog", "an dog", "dog.", "dogs", "A dog!", "the  dog"],
    ["don't know", "dont know", "Dont know", "don't know.", "dont-know", "do not know"],
    ["t-shirt", "t shirt", "tshirt", "T-Shirt", "t - shirt", "t_shirt", "t-shirt."],
    ["red, white", "red white", "red,white", "red and white", "red/white", "red / white",
     "red,white,blue", "(red)"],
    ["1.5", "1.5.", "1 .5", "1,5", "one and a half", "1/2", "1 / 2"],
    ["mr. smith", "mr smith", "Mr. Smith", "mr.smith", "mr . smith"],
    ["i'm", "im", "Im", "I'm", "i am"],
    ["somebody'd", "somebodyd", "somebody'd've", "somebodydve", "somebodyd've"],
    ["it's", "its", "it is", "its.", "it's."],
    ["50%", "50 %", "50", "fifty", "50%.", "$50", "50$"],
    ["3:30", "3.30", "330", "3 30", "half past three"],
    ["...", ".", "", " ", "a", "the", "an", "?", "!"],
    ["e.g.", "eg", "e.g", "e g"],
    ["x-ray", "x ray", "xray", "x - ray", "x-ray!", "X-Ray"],
    ["caf\u00e9", "cafe", "CAF\u00c9", "caf\u00e9."],
    ["\u0663,\u0665", "\u0663\u0665", "\u0663 \u0665", "3,5", "35"],
    ["a.b.c." * 12, "abc" * 12, "a b c" * 12],
    ["ow's'at", "'ows'at", "'ow's'at"],
    ["left", "(left)", "[left]", "left side", "<left>", "left."],
]
QUESTION_TYPES = [("is the", "yes/no"), ("are there", "yes/no"), ("how many", "number"),
                  ("what number is", "number"), ("what color is the", "other"),
                  ("what is the", "other"), ("none of the above", "other")]


def make_nasty_vqa(seed=0, n_questions=300):
    """Questions, annotations and results files (as dicts / list) in the official VQA 2.0 formats,
    full of normalisation traps. Seeded, so every run gives the same files."""
    rng = random.Random(seed)
    questions, annotations, results = [], [], []
    for k in range(n_questions):
        qid, image_id = 1000 + 7 * k, 50 + k // 3
        qtype, atype = rng.choice(QUESTION_TYPES)
        group = rng.choice(NASTY_GROUPS)
        mode = rng.random()
        if mode < 0.25:    # all 10 identical: no normalisation at all, not even of the prediction
            answers = [rng.choice(group)] * 10
        elif mode < 0.35:  # identical up to surrounding whitespace: still "all identical"
            base = rng.choice(group)
            answers = [rng.choice([base, " " + base, base + "\n", "\t" + base]) for _ in range(10)]
        else:
            answers = [rng.choice(group) for _ in range(10)]
        answers = [{"answer": a, "answer_confidence": rng.choice(["yes", "maybe", "no"]),
                    "answer_id": i + 1} for i, a in enumerate(answers)]
        if rng.random() < 0.05:  # a duplicated answer dict (same answer_id): official quirk
            answers[3] = dict(answers[2])
        pred = rng.choice(group) if rng.random() < 0.85 else rng.choice(rng.choice(NASTY_GROUPS))
        questions.append({"image_id": image_id, "question": f"q{k}?", "question_id": qid})
        annotations.append({"question_id": qid, "image_id": image_id, "question_type": qtype,
                            "answer_type": atype, "multiple_choice_answer": answers[0]["answer"],
                            "answers": answers})
        results.append({"question_id": qid, "answer": pred})
    rng.shuffle(results)  # the official loader must not depend on the result order
    meta = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
            "data_subtype": "val2014", "license": {}}
    return (dict(meta, questions=questions), dict(meta, annotations=annotations), results)


# The official evaluator's figures on the files `write_nasty_vqa_files(dir, seed, 300)` writes, for
# seeds 0 and 1. Obtained by running GT-Vision-Lab/VQA's own code, unchanged (commit a013f00: its
# vqaEval.py and the VQA class of its helper tools), under Python 2.7.18, the language it is written
# in, as its vqaEvalDemo.py does:
#     vqa = VQA(annotations.json, questions.json); res = vqa.loadRes(results.json, questions.json)
#     ev = VQAEval(vqa, res, n=2); ev.evaluate()
# then ev.accuracy["overall"], ["perAnswerType"], ["perQuestionType"] and ev.evalQA[question_id] in
# the annotations' order. "files" is the start of the sha256 of json.dumps(make_nasty_vqa(seed, 300),
# sort_keys=True): if the generator changes, these figures are stale and must be obtained again.
OFFICIAL_NASTY_FIGURES = {
    0: dict(
        files="15941b366a0de3bb",
        overall=52.8,
        per_answer_type={"number": 51.83, "other": 52.81, "yes/no": 53.8},
        per_question_type={"are there": 50.79, "how many": 47.74, "is the": 56.59, "none of the above": 47.35,
                           "what color is the": 57.23, "what is the": 54.19, "what number is": 59.31},
        per_question=[
        0, 100, 60, 60, 90, 0, 0, 100, 60, 100, 60, 0, 0, 100, 0, 0, 0, 100, 100, 100, 0, 30, 100,
        30, 100, 0, 0, 0, 100, 100, 0, 100, 0, 100, 100, 100, 100, 100, 100, 0, 0, 100, 100, 30,
        100, 100, 30, 100, 100, 0, 100, 100, 0, 100, 60, 100, 100, 100, 100, 0, 0, 0, 0, 0, 60, 100,
        100, 0, 0, 100, 100, 0, 100, 30, 100, 0, 60, 60, 100, 100, 0, 100, 0, 100, 0, 0, 0, 100,
        100, 0, 0, 30, 100, 100, 100, 0, 0, 100, 90, 100, 90, 0, 100, 0, 0, 30, 0, 90, 0, 100, 100,
        100, 0, 30, 0, 0, 0, 0, 0, 0, 90, 90, 0, 0, 0, 100, 100, 100, 100, 90, 100, 30, 0, 30, 100,
        100, 0, 100, 30, 100, 100, 100, 0, 0, 0, 0, 0, 100, 100, 30, 100, 0, 100, 0, 100, 0, 100,
        60, 30, 0, 100, 0, 100, 100, 30, 100, 100, 100, 100, 0, 0, 0, 30, 100, 30, 0, 100, 0, 100,
        100, 0, 100, 100, 90, 100, 100, 100, 60, 100, 90, 100, 0, 100, 100, 0, 0, 0, 0, 0, 0, 0,
        100, 100, 0, 100, 100, 100, 100, 100, 90, 100, 0, 30, 30, 0, 0, 0, 0, 0, 0, 0, 100, 0, 0,
        100, 0, 100, 60, 0, 100, 100, 0, 100, 100, 30, 100, 60, 100, 60, 100, 0, 0, 0, 0, 0, 90, 30,
        0, 100, 0, 0, 100, 90, 30, 0, 100, 60, 30, 100, 0, 100, 0, 0, 100, 0, 100, 100, 100, 0, 100,
        0, 60, 0, 0, 100, 0, 100, 0, 90, 100, 0, 100, 100, 0, 0, 0, 0, 60, 0, 100, 100, 0, 60, 100,
        0, 100, 100, 100, 90, 100]),
    1: dict(
        files="e66c4f9c67502b45",
        overall=52.63,
        per_answer_type={"number": 48.93, "other": 54.32, "yes/no": 53.64},
        per_question_type={"are there": 50.26, "how many": 47.32, "is the": 57.11, "none of the above": 55.0,
                           "what color is the": 53.0, "what is the": 55.13, "what number is": 50.47},
        per_question=[
        100, 0, 0, 90, 0, 100, 30, 100, 0, 90, 0, 0, 100, 0, 100, 0, 0, 100, 0, 0, 0, 0, 100, 100,
        100, 100, 100, 0, 0, 100, 0, 0, 0, 60, 100, 100, 0, 0, 0, 0, 60, 0, 0, 60, 100, 0, 100, 100,
        100, 100, 100, 100, 0, 0, 0, 0, 0, 100, 100, 100, 0, 0, 100, 0, 0, 0, 90, 100, 100, 100, 90,
        100, 0, 0, 0, 0, 100, 100, 0, 60, 100, 30, 0, 100, 0, 100, 0, 100, 100, 100, 0, 100, 0, 100,
        0, 0, 0, 100, 100, 100, 0, 100, 60, 0, 100, 100, 0, 100, 30, 30, 90, 0, 0, 0, 0, 60, 100,
        60, 0, 0, 0, 0, 100, 100, 0, 0, 100, 0, 0, 0, 0, 100, 100, 100, 0, 0, 0, 90, 60, 100, 30,
        100, 100, 100, 100, 100, 100, 90, 100, 100, 0, 0, 0, 100, 100, 100, 100, 100, 100, 0, 100,
        100, 100, 100, 100, 0, 100, 100, 0, 100, 0, 100, 0, 100, 100, 100, 60, 100, 100, 100, 60,
        60, 0, 100, 30, 0, 90, 60, 100, 60, 30, 0, 30, 0, 100, 100, 100, 0, 0, 0, 30, 0, 0, 0, 100,
        100, 0, 60, 100, 100, 0, 100, 100, 0, 100, 100, 100, 0, 100, 0, 100, 0, 100, 0, 100, 100, 0,
        0, 90, 0, 90, 100, 0, 0, 0, 100, 0, 90, 0, 100, 30, 90, 100, 30, 100, 100, 0, 0, 0, 100, 90,
        100, 100, 0, 0, 0, 90, 90, 30, 0, 100, 100, 100, 0, 100, 100, 0, 0, 30, 100, 0, 0, 100, 60,
        0, 100, 0, 100, 100, 100, 90, 0, 0, 100, 100, 100, 60, 0, 0, 0, 0, 100, 100, 100, 0, 0, 100,
        0, 100, 0]),

}


def write_nasty_vqa_files(directory, seed=0, n_questions=300):
    """Write the generator's output as questions.json / annotations.json / results.json."""
    q, a, r = make_nasty_vqa(seed, n_questions)
    paths = {}
    for name, obj in (("questions", q), ("annotations", a), ("results", r)):
        paths[name] = os.path.join(directory, name + ".json")
        with open(paths[name], "w", encoding="utf-8") as f:
            json.dump(obj, f)
    return paths


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def ann(qid, answers, qtype="what is the", atype="other"):
    return {"question_id": qid, "image_id": 1, "question_type": qtype, "answer_type": atype,
            "multiple_choice_answer": answers[0],
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                        for i, a in enumerate(answers)]}


# =================================================================================================
# VQA answer normalisation: one test per rule / quirk
# =================================================================================================

@pytest.mark.parametrize("raw, expected", [
    # whitespace: newline / tab -> space, strip; inner runs collapse through split()
    (" yes\n", "yes"), ("\tno \t", "no"), ("red\nwhite", "red white"), ("a  b", "b"),
    # punctuation touching a space is deleted, otherwise it becomes a space
    ("t-shirt", "t shirt"), ("t - shirt", "t shirt"), ("red, white", "red white"),
    ("red,white", "red white"), ("(left)", "left"), ("left ?", "left"), ("what?!", "what"),
    # the decision is per character, on the original text: '-' touches a space here, '/' doesn't
    ("a-b c -d/e", "ab c d e"),
    # a comma between digits deletes *every* listed punctuation character
    ("1,000", "1000"), ("1,000-2", "10002"), ("x-ray 1,2", "xray 12"),
    # periods: deleted unless followed by a digit (the look-behind in the official regex is a no-op)
    ("yes.", "yes"), ("1.5", "1.5"), ("a.5", "a.5"), ("a .5", ".5"), ("mr. smith", "mr smith"),
    ("e.g.", "eg"),
    ("...", ""), ("3.", "3"),
    # characters the official list leaves alone
    ("50%", "50%"), ("$5", "$5"), ("3:30", "3:30"), ("it's", "it's"), ("a*b", "a*b"),
    # number words -> digits (word by word), including "none" -> "0"; "eleven" is not in the map
    ("two", "2"), ("Ten", "10"), ("none", "0"), ("zero dogs", "0 dogs"), ("eleven", "eleven"),
    ("twenty two", "twenty 2"),
    # articles dropped anywhere, after lower-casing
    ("a dog", "dog"), ("The Dog", "dog"), ("an apple and a pear", "apple and pear"), ("the", ""),
    # contractions, on lower-cased words; the table's capitalised keys ("Im", "Ive") never match
    ("dont", "don't"), ("Dont know", "don't know"), ("isnt", "isn't"), ("im", "im"),
    ("Ive", "ive"), ("somebody'd", "somebodyd"), ("'ows'at", "'ow's'at"), ("yall'll", "y'all'll"),
])
def test_normalize_vqa_answer_rules(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_normalize_period_strip_stops_after_32():
    # periodStrip.sub("", text, re.UNICODE): re.UNICODE (32) is the positional count argument.
    assert normalize_vqa_answer("." * 40) == "." * 8
    assert normalize_vqa_answer("a." * 33) == "a" * 32 + "a."


def test_normalize_digit_comma_is_ascii_only():
    # Python 2's \d (the official code) is ASCII-only: Arabic-Indic digits do not trigger the
    # comma rule, so the comma becomes a space instead of disappearing.
    assert normalize_vqa_answer("\u0663,\u0665") == "\u0663 \u0665"
    assert normalize_vqa_answer("3,5") == "35"


def test_normalize_rejects_non_string():
    with pytest.raises(TypeError, match="str"):
        normalize_vqa_answer(3)


# =================================================================================================
# VQA accuracy
# =================================================================================================

def loo(n_matching, n_answers=10):
    """Official leave-one-out accuracy, written out literally."""
    accs = []
    for left_out in range(n_answers):
        others = n_matching - (1 if left_out < n_matching else 0)
        accs.append(min(1, others / 3))
    return sum(accs) / n_answers


def test_soft_score_values_and_min_n_over_3_is_wrong():
    assert [vqa_soft_score(n) for n in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    for n in range(11):
        assert vqa_soft_score(n) == pytest.approx(loo(n), abs=1e-12)
        # and it also equals the full evaluator on such a question
        answers = ["cat"] * n + [f"other{i}" for i in range(10 - n)]
        assert vqa_question_accuracy("cat", answers) == pytest.approx(vqa_soft_score(n), abs=1e-12)
    # the popular min(n/3, 1) overstates for n = 1, 2, 3
    for n in (1, 2, 3):
        assert min(n / 3, 1) > loo(n) + 0.03
    with pytest.raises(ValueError):
        vqa_soft_score(-1)
    with pytest.raises(TypeError):
        vqa_soft_score(1.0)


def test_question_accuracy_normalises_only_when_answers_differ():
    # All 10 identical: nothing is normalised, the prediction neither.
    assert vqa_question_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_question_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_question_accuracy("yes.", ["yes"] * 10) == 0.0
    # Whitespace is always cleaned, before the "identical" test: still identical, still raw.
    assert vqa_question_accuracy(" yes\n", ["yes"] * 10) == 1.0
    assert vqa_question_accuracy("Yes", [" yes"] * 5 + ["yes\t"] * 5) == 0.0
    # One different answer switches normalisation on for all: "Yes" matches the 9 "yes".
    assert vqa_question_accuracy("Yes", ["yes"] * 9 + ["no"]) == 1.0
    # Numbers: "two" vs "2" match once normalised.
    assert vqa_question_accuracy("two", ["2", "2", "3", "4", "5", "6", "7", "8", "9", "10"]) == \
        pytest.approx(0.6)  # "2" given by 2 annotators
    # Raw "two" vs all-"2": no normalisation -> 0.
    assert vqa_question_accuracy("two", ["2"] * 10) == 0.0


def test_question_accuracy_duplicate_answer_dicts_quirk():
    # The official "other answers" are the dicts != the left-out one; identical dicts (same
    # answer_id) leave together. 10 copies of one dict: every leave-one-out removes all 10.
    same = [{"answer": "yes", "answer_id": 1}] * 10
    assert vqa_question_accuracy("yes", same) == 0.0
    # 4 distinct "yes" + 2 identical "yes" dicts + 4 "no": n = 6 matches; leaving out one of the
    # identical pair removes 2 -> 4 others -> 1.0; all other leave-outs still see >= 5 -> 1.0.
    answers = [{"answer": "yes", "answer_id": i} for i in range(4)]
    answers += [{"answer": "yes", "answer_id": 9}] * 2
    answers += [{"answer": "no", "answer_id": 10 + i} for i in range(4)]
    assert vqa_question_accuracy("yes", answers) == 1.0
    # 2 identical "yes" dicts + 8 "no": leave-out of either yes -> 0 others; else 2 -> 2/3.
    answers = [{"answer": "yes", "answer_id": 1}] * 2 + [
        {"answer": "no", "answer_id": i} for i in range(2, 10)]
    assert vqa_question_accuracy("yes", answers) == pytest.approx(8 * (2 / 3) / 10)


def test_vqa_accuracy_hand_computed():
    anns = [
        ann(1, ["yes"] * 10, "is the", "yes/no"),                       # pred "yes" -> 1
        ann(2, ["no"] * 7 + ["yes"] * 3, "is the", "yes/no"),           # pred "Yes." -> 0.9
        ann(3, ["2"] * 2 + ["3"] * 8, "how many", "number"),            # pred "two" -> 0.6
        ann(4, ["red"] * 10, "what color is the", "other"),             # pred "Red" -> 0 (raw)
    ]
    preds = {1: "yes", 2: "Yes.", 3: "two", 4: "Red"}
    res = vqa_accuracy(preds, anns)
    assert res["per_question"] == {1: 100.0, 2: 90.0, 3: 60.0, 4: 0.0}
    assert res["overall"] == 62.5                     # 100 * 2.5 / 4
    assert res["per_answer_type"] == {"yes/no": 95.0, "number": 60.0, "other": 0.0}
    assert res["per_question_type"] == {"is the": 95.0, "how many": 60.0,
                                        "what color is the": 0.0}
    assert res["n_questions"] == 4
    # the submission-list form gives the same result; input annotations are not modified
    before = json.dumps(anns)
    res2 = vqa_accuracy([{"question_id": q, "answer": a} for q, a in preds.items()],
                        {"annotations": anns})
    assert res2 == res and json.dumps(anns) == before


def test_vqa_accuracy_rounds_like_python2():
    # One question at accuracy 0.3 (1 matching annotator) and 47 at 0: the official figure is
    # round(100 * 0.3 / 48, 2) with 100 * 0.3 / 48 == 0.625 exactly in binary. vqaEval.py is
    # Python 2, whose round() sends the tie away from zero (0.63); Python 3's round() gives 0.62.
    anns = [ann(1, ["cat"] + [f"x{i}" for i in range(9)])]
    anns += [ann(q, ["dog"] * 10) for q in range(2, 49)]
    preds = {1: "cat", **{q: "bird" for q in range(2, 49)}}
    assert 100 * float(0.3 + 0.0) / 48 == 0.625
    res = vqa_accuracy(preds, anns)
    assert res["overall"] == 0.63
    assert round(100 * 0.3 / 48, 2) == 0.62  # what a Python 3 port of vqaEval would print


def test_vqa_accuracy_bad_input_errors():
    anns = [ann(1, ["yes"] * 10), ann(2, ["no"] * 10)]
    with pytest.raises(ValueError, match="not in the annotations.*\\[3\\]"):
        vqa_accuracy({1: "yes", 2: "no", 3: "x"}, anns)
    with pytest.raises(ValueError, match="without a prediction.*\\[2\\]"):
        vqa_accuracy({1: "yes"}, anns)
    with pytest.raises(ValueError, match="id types differ"):
        vqa_accuracy({"1": "yes", "2": "no"}, anns)
    with pytest.raises(ValueError, match="more than once"):
        vqa_accuracy([{"question_id": 1, "answer": "a"}, {"question_id": 1, "answer": "b"},
                      {"question_id": 2, "answer": "c"}], anns)
    with pytest.raises(TypeError, match="question 1"):
        vqa_accuracy({1: None, 2: "no"}, anns)
    with pytest.raises(ValueError, match="no 'answer_type'"):
        vqa_accuracy({1: "yes"}, [{"question_id": 1, "question_type": "x", "answers": []}])
    with pytest.raises(ValueError, match="absent from questions"):
        vqa_accuracy({1: "yes", 2: "no"}, anns, questions=[{"question_id": 1, "image_id": 1}])
    with pytest.raises(ValueError, match="different image_id"):
        vqa_accuracy({1: "yes", 2: "no"}, anns,
                     questions={"questions": [{"question_id": 1, "image_id": 1},
                                              {"question_id": 2, "image_id": 7}]})


@pytest.mark.parametrize("seed", sorted(OFFICIAL_NASTY_FIGURES))
def test_vqa_accuracy_on_nasty_generated_files_equals_the_official_evaluator(tmp_path, seed):
    """Figure by figure the official vqaEval.py's (OFFICIAL_NASTY_FIGURES, run under Python 2.7):
    overall, per answer type, per question type and every question's accuracy."""
    official = OFFICIAL_NASTY_FIGURES[seed]
    files = json.dumps(make_nasty_vqa(seed, 300), sort_keys=True).encode()
    assert hashlib.sha256(files).hexdigest()[:16] == official["files"], \
        "make_nasty_vqa changed: run the official evaluator on its new files and update OFFICIAL_NASTY_FIGURES"
    paths = write_nasty_vqa_files(str(tmp_path), seed=seed, n_questions=300)
    q, a, r = (read_json(paths[k]) for k in ("questions", "annotations", "results"))
    res = vqa_accuracy(r, a, q)
    assert res["n_questions"] == 300
    assert res["overall"] == official["overall"]
    assert res["per_answer_type"] == official["per_answer_type"]
    assert res["per_question_type"] == official["per_question_type"]
    ours = [res["per_question"][x["question_id"]] for x in a["annotations"]]
    wrong = [(x["question_id"], got, want) for x, got, want in zip(a["annotations"], ours, official["per_question"])
             if got != want]
    assert not wrong, f"{len(wrong)} questions differ from the official evaluator (id, ours, official): {wrong[:5]}"
    # the traps are exercised: figures of every level occur
    assert {0, 30, 60, 90, 100} <= set(official["per_question"])
    assert vqa_accuracy(r, a) == res  # deterministic, input untouched


def test_build_answer_vocab_threshold_and_order():
    mc = ["yes"] * 5 + ["Yes."] * 5 + ["two"] * 3 + ["2"] * 7 + ["cat"] * 10 + ["dog"] * 9 + \
        ["fish"] * 8
    anns = [{"multiple_choice_answer": m} for m in mc]
    # normalised counts: yes 10, 2 10, cat 10, dog 9, fish 8 -> fish dropped; ties alphabetical
    assert build_answer_vocab(anns, min_count=9) == ["2", "cat", "yes", "dog"]
    assert build_answer_vocab(list(reversed(anns)), min_count=9) == ["2", "cat", "yes", "dog"]
    assert build_answer_vocab({"annotations": anns}, min_count=10) == ["2", "cat", "yes"]
    assert build_answer_vocab(anns, min_count=1)[-1] == "fish"
    with pytest.raises(ValueError, match="multiple_choice_answer"):
        build_answer_vocab([{"answer": "x"}])


def test_vqa_targets():
    vocab = {"2": 0, "yes": 1, "red": 2}
    answers = ["two", "2", "2.", "Yes", "yes", "yes", "yes", "no", "blue", "red"]
    # "2" x3 -> 0.9, "yes" x4 -> 1.0, "red" x1 -> 0.3; "no" / "blue" not in the vocabulary
    labels, scores = vqa_targets(answers, vocab)
    assert labels == [0, 1, 2] and scores == [0.9, 1.0, 0.3]
    labels2, scores2 = vqa_targets([{"answer": x, "answer_id": i} for i, x in enumerate(answers)],
                                   vocab)
    assert (labels2, scores2) == (labels, scores)
    assert vqa_targets(["no"] * 10, vocab) == ([], [])


def test_write_vqa_submission(tmp_path):
    path = write_vqa_submission(tmp_path / "res.json", {5: "yes", np.int64(2): "two"})
    assert read_json(path) == [{"question_id": 2, "answer": "two"},
                                     {"question_id": 5, "answer": "yes"}]
    with pytest.raises(TypeError, match="int"):
        write_vqa_submission(tmp_path / "bad.json", {"5": "yes"})


# =================================================================================================
# NLVR2
# =================================================================================================

def test_nlvr2_sentence_key():
    assert nlvr2_sentence_key("dev-850-1-0") == "dev-850--0"
    assert nlvr2_sentence_key("test1-3-0-2") == nlvr2_sentence_key("test1-3-3-2")
    assert nlvr2_sentence_key("dev-850-1-0") != nlvr2_sentence_key("dev-850-1-1")
    with pytest.raises(ValueError, match="split-setid-pairid-sentid"):
        nlvr2_sentence_key("dev-850-1")


def test_nlvr2_metrics_consistency():
    labels = {
        # sentence dev-1--0: 4 pairs, one predicted wrong -> inconsistent
        "dev-1-0-0": True, "dev-1-1-0": False, "dev-1-2-0": True, "dev-1-3-0": "False",
        # sentence dev-1--1: 2 pairs, both right -> consistent
        "dev-1-0-1": "True", "dev-1-1-1": False,
        # sentence dev-2--0: 2 pairs, one predicted wrong -> inconsistent
        "dev-2-0-0": True, "dev-2-1-0": True,
    }
    preds = {"dev-1-0-0": True, "dev-1-1-0": True, "dev-1-2-0": True, "dev-1-3-0": False,
             "dev-1-0-1": True, "dev-1-1-1": "false", "dev-2-0-0": True, "dev-2-1-0": False}
    m = nlvr2_metrics(preds, labels)
    assert m == {"accuracy": 6 / 8, "consistency": 1 / 3, "n": 8, "n_sentences": 3}
    with pytest.raises(ValueError, match="without a label.*dev-9-0-0"):
        nlvr2_metrics({**preds, "dev-9-0-0": True}, labels)
    # like the official script, an incomplete predictions file is not scored
    with pytest.raises(ValueError, match=r"1 of the 8 labelled examples have no prediction, e.g. \['dev-2-1-0'\]"):
        nlvr2_metrics({k: v for k, v in preds.items() if k != "dev-2-1-0"}, labels)
    with pytest.raises(ValueError, match="'yes'"):
        nlvr2_metrics({"dev-1-0-0": "yes"}, {"dev-1-0-0": True})


# =================================================================================================
# Retrieval
# =================================================================================================

def test_recall_known_matrix_several_captions_per_image():
    # 3 images, 6 captions; captions 0,1 -> image 0; 2,3 -> image 1; 4,5 -> image 2.
    s = np.array([
        [0.9, 0.1, 0.8, 0.0, 0.0, 0.0],   # img 0: best true caption 0 at rank 0
        [0.5, 0.0, 0.1, 0.6, 0.7, 0.0],   # img 1: best true (c3, 0.6) behind c4 -> rank 1
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.1],   # img 2: best true (c4, 0.5) behind 4 -> rank 4
    ])
    ci = np.array([0, 0, 1, 1, 2, 2])
    tr, ir = retrieval_ranks(s, ci)
    assert tr.tolist() == [0, 1, 4]
    # columns: c0 img0 0.9 vs 0.5, 0.9(tie, counts against) -> 1; c1: 0.1 vs 0.0, 0.8 -> 1;
    # c2: img1 0.1 vs 0.8, 0.7 -> 2; c3: 0.6 vs 0.0, 0.6(tie) -> 1; c4: img2 0.5 vs 0.0, 0.7 -> 1;
    # c5: 0.1 vs 0.0, 0.0 -> 0
    assert ir.tolist() == [1, 1, 2, 1, 1, 0]
    r = retrieval_recall(s, ci, ks=(1, 2, 5))
    assert r["tr_r1"] == pytest.approx(100 / 3) and r["tr_r2"] == pytest.approx(200 / 3)
    assert r["tr_r5"] == 100.0
    assert r["ir_r1"] == pytest.approx(100 / 6) and r["ir_r2"] == pytest.approx(500 / 6)
    assert r["ir_r5"] == 100.0
    assert r["rsum"] == pytest.approx(100 / 3 + 200 / 3 + 100 + 100 / 6 + 500 / 6 + 100)
    assert r["r_mean"] == pytest.approx(r["rsum"] / 6)
    assert r["tr_mean"] == pytest.approx((100 / 3 + 200 / 3 + 100) / 3)
    # torch input, float16, shuffled columns: same ranks (the rule does not depend on order)
    perm = np.array([5, 2, 0, 4, 1, 3])
    tr2, ir2 = retrieval_ranks(torch.tensor(s[:, perm]).half(), torch.tensor(ci[perm]))
    assert tr2.tolist() == tr.tolist() and ir2.tolist() == ir[perm].tolist()


def test_recall_ties_are_pessimistic():
    # Constant scores: every ground truth ties with every wrong candidate and loses.
    s = np.zeros((4, 8))
    ci = np.repeat(np.arange(4), 2)
    tr, ir = retrieval_ranks(s, ci)
    assert tr.tolist() == [6, 6, 6, 6]   # 6 wrong captions tie with the best true one
    assert ir.tolist() == [3] * 8        # 3 wrong images tie with the true one
    r = retrieval_recall(s, ci)
    # text ranks 6: only R@10 hits; image ranks 3: R@5 and R@10 hit
    assert [r[k] for k in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10")] == \
        [0.0, 0.0, 100.0, 0.0, 100.0, 100.0]
    # Ties among an image's own captions do not hurt: both true captions top, tied.
    s = np.array([[1.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    tr, _ = retrieval_ranks(s, np.array([0, 0, 1]))
    assert tr.tolist() == [0, 0]
    # A wrong caption tied with the best true one puts it at rank 1.
    s = np.array([[1.0, 0.2, 1.0], [0.0, 0.0, 1.0]])
    tr, _ = retrieval_ranks(s, np.array([0, 0, 1]))
    assert tr.tolist() == [1, 0]


def test_recall_bad_input():
    s = np.random.rand(3, 6)
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        retrieval_recall(s, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="no caption"):
        retrieval_recall(s, np.array([0, 0, 0, 1, 1, 1]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        retrieval_recall(s, np.array([0, 1, 2, 3, 0, 1]))
    with pytest.raises(TypeError, match="integer"):
        retrieval_recall(s, np.array([0.0, 1, 2, 0, 1, 2]))
    with pytest.raises(ValueError, match="2-D"):
        retrieval_recall(np.zeros(6), np.arange(6))
    s[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        retrieval_recall(s, np.array([0, 1, 2, 0, 1, 2]))
    with pytest.raises(ValueError, match="ks"):
        retrieval_recall(np.eye(2), np.arange(2), ks=(0,))


def loop_ranks(s, ci):
    """Reference ranks with Python loops, for the vectorised code."""
    n_img, n_cap = s.shape
    tr = []
    for i in range(n_img):
        pos = ci == i
        best = s[i, pos].max()
        tr.append(int(((s[i] >= best) & ~pos).sum()))
    ir = [int((s[:, c] >= s[ci[c], c]).sum()) - 1 for c in range(n_cap)]
    return tr, ir


def test_ranks_match_loop_reference_with_chunking():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 4, size=(37, 90)).astype(np.float32)  # many ties
    ci = np.concatenate([np.arange(37), rng.integers(0, 37, 53)])
    rng.shuffle(ci)
    tr_ref, ir_ref = loop_ranks(s, ci)
    for chunk in (1, 5, 64):
        tr, ir = retrieval_ranks(s, ci, chunk_rows=chunk)
        assert tr.tolist() == tr_ref and ir.tolist() == ir_ref


def test_coco_1k_folds():
    # 3 folds of 2 images, 2 captions each, captions stored out of image order.
    rng = np.random.default_rng(1)
    n_img = 6
    ci = rng.permutation(np.repeat(np.arange(n_img), 2))
    s = rng.random((n_img, 12))
    res = coco_1k_recall(s, ci, n_folds=3, fold_size=2, ks=(1,))
    folds = []
    for f in range(3):
        cols = np.nonzero((ci >= 2 * f) & (ci < 2 * f + 2))[0]
        folds.append(retrieval_recall(s[2 * f:2 * f + 2][:, cols], ci[cols] - 2 * f, ks=(1,)))
    for key in res:
        assert res[key] == pytest.approx(np.mean([fr[key] for fr in folds]))
    # the fold matters: scores that are perfect within each fold but confuse across folds
    s = np.zeros((4, 4))
    ci = np.arange(4)
    s[np.arange(4), np.arange(4)] = 1.0
    s[0, 2] = s[2, 0] = 5.0   # image 0 / caption 2 belong to different folds
    assert retrieval_recall(s, ci, ks=(1,))["tr_r1"] == 50.0
    assert coco_1k_recall(s, ci, n_folds=2, fold_size=2, ks=(1,))["tr_r1"] == 100.0
    with pytest.raises(ValueError, match="expected n_folds"):
        coco_1k_recall(np.zeros((5, 5)), np.arange(5), n_folds=5)


def test_recall_at_coco_5k_scale():
    """The full 5,000 x 25,000 matrix in one call (its time: benchmarks/recall_speed.py)."""
    n_img, n_cap = 5000, 25000
    g = torch.Generator().manual_seed(0)
    s = torch.rand(n_img, n_cap, generator=g)
    ci = torch.arange(n_cap) // 5
    s[ci, torch.arange(n_cap)] += 0.999  # true pairs mostly on top
    r = retrieval_recall(s, ci)
    assert 90 < r["ir_r1"] < 100 and r["tr_r1"] > 99


def test_score_matrix_round_trip_and_bad_files(tmp_path):
    s = np.random.default_rng(0).random((3, 6)).astype(np.float32)
    path = tmp_path / "scores.bin"  # exactly this name, no ".npz" appended
    save_score_matrix(path, torch.tensor(s), [11, 12, 13], np.arange(100, 106),
                      [0, 0, 1, 1, 2, 2])
    assert os.listdir(tmp_path) == ["scores.bin"]
    sm = load_score_matrix(path)
    assert isinstance(sm, ScoreMatrix)
    np.testing.assert_array_equal(sm.scores, s)
    assert sm.image_ids.tolist() == [11, 12, 13]
    assert sm.caption_ids.tolist() == list(range(100, 106))
    assert sm.caption_image.tolist() == [0, 0, 1, 1, 2, 2] and sm.caption_image.dtype == np.int64
    # string ids are allowed
    save_score_matrix(tmp_path / "str.npz", s, ["a.jpg", "b.jpg", "c.jpg"], list("uvwxyz"),
                      [0, 0, 1, 1, 2, 2])
    assert load_score_matrix(tmp_path / "str.npz").image_ids.tolist() == ["a.jpg", "b.jpg", "c.jpg"]

    # garbage file
    bad = tmp_path / "garbage.npz"
    bad.write_bytes(b"this is not numpy")
    with pytest.raises(ValueError, match="garbage.npz.*not a valid score matrix"):
        load_score_matrix(bad)
    # a missing array
    np.savez(tmp_path / "missing.npz", scores=s, image_ids=np.arange(3))
    with pytest.raises(ValueError, match=r"missing.npz.*missing arrays \['caption_ids', "
                                         r"'caption_image'\]"):
        load_score_matrix(tmp_path / "missing.npz")
    # pickled object arrays are refused, not executed
    np.savez(tmp_path / "pickled.npz", scores=s, image_ids=np.array([{}, {}, {}], dtype=object),
             caption_ids=np.arange(6), caption_image=np.arange(6) // 2)
    with pytest.raises(ValueError, match="pickled.npz.*pickle"):
        load_score_matrix(tmp_path / "pickled.npz")
    # wrong shape / out-of-range indices
    np.savez(tmp_path / "shape.npz", scores=s, image_ids=np.arange(4), caption_ids=np.arange(6),
             caption_image=np.arange(6) // 2)
    with pytest.raises(ValueError, match=r"shape.npz.*'image_ids' must have shape \(3,\)"):
        load_score_matrix(tmp_path / "shape.npz")
    np.savez(tmp_path / "range.npz", scores=s, image_ids=np.arange(3), caption_ids=np.arange(6),
             caption_image=np.arange(6))
    with pytest.raises(ValueError, match=r"range.npz.*caption_image.*\[0, 3\)"):
        load_score_matrix(tmp_path / "range.npz")
    # a single .npy array
    np.save(tmp_path / "single.npy", s)
    with pytest.raises(ValueError, match="single.npy.*not an .npz"):
        load_score_matrix(tmp_path / "single.npy")
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_score_matrix(tmp_path / "nope.npz")
    with pytest.raises(ValueError, match="caption_image"):
        save_score_matrix(tmp_path / "x.npz", s, [1, 2, 3], np.arange(6), [0, 1, 2])
