"""Downstream task files as a hostile but realistic user gives them: finetune.py reads and checks its
training and evaluation files whole before the first step; no score comes out where the files cannot
give one; each bad file gets one message naming the file, the line or entry and what is wrong.

docs/failures.md lists every case with the test that shows it. The files are tiny synthetic copies
in the official formats (pixel_bert.synthetic_tasks), damaged one way per test.
"""
import argparse
import json
import os
import re
import shutil

import pytest
import torch
from PIL import Image

from pixel_bert import evaluate, finetune, metrics, synthetic, synthetic_tasks
from pixel_bert.annotations import AnnotationError, read_karpathy
from pixel_bert.bad_samples import BadDataError, BadSample, BadSampleError, BadSampleWarning
from pixel_bert.batches import CaptionDataset
from pixel_bert.config import IMAGENET_MEAN, IMAGENET_STD, make_model_config, make_train_config
from pixel_bert.distributed import DistInfo
from pixel_bert.downstream import EvalSettings, evaluate_split
from pixel_bert.images import ImageTransform
from pixel_bert.nlvr2 import NLVR2Dataset, read_nlvr2
from pixel_bert.tasks import TASKS
from pixel_bert.tokenizer import WordPieceTokenizer
from pixel_bert.vqa import VQADataset, read_vqa

IMAGE = 32
VQA_VAL_Q, VQA_VAL_A = "v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json"
VQA_TRAIN_A = "v2_mscoco_train2014_annotations.json"
TRANSFORM = ImageTransform(IMAGE, IMAGE, IMAGENET_MEAN, IMAGENET_STD)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The three tasks' synthetic files (images shared by every test; each test edits copies of the
    annotation files) and the synthetic vocabulary."""
    root = tmp_path_factory.mktemp("task_data")
    synthetic_tasks.write_vqa(str(root / "vqa"), 2, 2, 1, image_size=IMAGE, questions_per_image=1)
    synthetic_tasks.write_nlvr2(str(root / "nlvr2"), 2, 1, 1, image_size=IMAGE, pairs_per_sentence=2)
    synthetic_tasks.write_retrieval(str(root / "retrieval"), 4, 2, 2, image_size=IMAGE, captions_per_image=2)
    synthetic.write_vocab(str(root / "vocab.txt"))
    return root


def copy_annotations(data, task, folder):
    """The task's annotation files (not its images) copied into ``folder``; returns ``folder``."""
    folder.mkdir()
    for name in os.listdir(data / task):
        if name.endswith(".json"):
            shutil.copy(data / task / name, folder / name)
    return folder


def read_lines(path):
    return [json.loads(line) for line in open(path)]


def write_lines(path, objects):
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objects))


def edit_json(path, edit):
    obj = json.load(open(path))
    edit(obj)
    path.write_text(json.dumps(obj))


class TrainingStarted(Exception):
    pass


@pytest.fixture
def no_training(monkeypatch):
    """finetune.py's training loop replaced by an error: a refusal must come before it."""
    def fit_run(*args, **kwargs):
        raise TrainingStarted
    monkeypatch.setattr(finetune, "fit_run", fit_run)


def run_finetune(data, tmp_path, task, flags):
    finetune.main(["--task", task, "--init", "none", "--model-preset", "tiny", "--vocab-file",
                   str(data / "vocab.txt"), "--device", "cpu", "--num-workers", "0",
                   "--output-dir", str(tmp_path / "run")] + flags)


def nlvr2_flags(data, root):
    return ["--nlvr2-root", str(root), "--nlvr2-images", str(data / "nlvr2" / "images")]


def vqa_flags(data, root):
    return ["--vqa-root", str(root), "--vqa-images", str(data / "vqa")]


def retrieval_flags(data, json_path):
    return ["--karpathy-json", str(json_path), "--retrieval-images", str(data / "retrieval")]


# -------------------------------------------------------------------------------------------------
#                 finetune.py: task files read and checked whole before the first step
# -------------------------------------------------------------------------------------------------

def drop_dev(root):
    os.remove(root / "dev.json")


def broken_dev_line(root):
    lines = read_lines(root / "dev.json")
    write_lines(root / "dev.json", [lines[0], '{"identifier": "dev-0-1-0", "sentence": "x", "label": ', *lines[1:]])


def duplicate_dev_identifier(root):
    lines = read_lines(root / "dev.json")
    write_lines(root / "dev.json", lines + [lines[0]])


def unlabelled_line(name, keep_first=True):
    def edit(root):
        lines = read_lines(root / name)
        for line in lines[1 if keep_first else 0:]:
            del line["label"]
        write_lines(root / name, lines)
    return edit


def empty_dev_sentence(root):
    lines = read_lines(root / "dev.json")
    lines[1]["sentence"] = "  "
    write_lines(root / "dev.json", lines)


def vqa_answers(name, count):
    def edit(root):
        def cut(obj):
            obj["annotations"][0]["answers"] = obj["annotations"][0]["answers"][:count]
        edit_json(root / name, cut)
    return edit


def drop_vqa_val_annotations(root):
    os.remove(root / VQA_VAL_A)


def empty_vqa_val_question(root):
    edit_json(root / VQA_VAL_Q, lambda obj: obj["questions"][1].update(question=""))


def karpathy_val_image(**changes):
    def edit(path):
        def change(obj):
            image = next(im for im in obj["images"] if im["split"] == "val")
            for key, value in changes.items():
                value(image) if callable(value) else image.update({key: value})
        edit_json(path, change)
    return edit


# case -> (task, damage of the copied files, expected error, message pattern)
BEFORE_THE_FIRST_STEP = {
    "nlvr2 dev.json missing": ("nlvr2", drop_dev, FileNotFoundError, r"dev.json: NLVR2 file not found"),
    "nlvr2 broken dev.json line": ("nlvr2", broken_dev_line, AnnotationError, r"dev.json: line 2: not valid JSON"),
    "nlvr2 duplicate dev identifier": ("nlvr2", duplicate_dev_identifier, AnnotationError,
                                       r"dev.json: line 3: identifier 'dev-0-0-0' is on line 1 too"),
    "nlvr2 train line without label": ("nlvr2", unlabelled_line("train.json"), AnnotationError,
                                       r"train.json: line 2 has no 'label' \(3 of the 4 lines read have none\); "
                                       r"training needs the label .* not on an unlabelled test file"),
    "nlvr2 dev line without label": ("nlvr2", unlabelled_line("dev.json"), AnnotationError,
                                     r"dev.json: line 2 has no 'label' \(1 of the 2 lines read have none\); "
                                     r"finetune.py scores .* evaluate.py --task nlvr2 --split dev predicts"),
    "nlvr2 dev without labels": ("nlvr2", unlabelled_line("dev.json", keep_first=False), AnnotationError,
                                 r"dev.json: line 1 has no 'label' \(2 of the 2 .*evaluate.py --task nlvr2"),
    "nlvr2 empty dev sentence": ("nlvr2", empty_dev_sentence, AnnotationError,
                                 r"dev.json: example dev-0-1-0 has an empty sentence \(1 of 2 have\)"),
    "vqa val answers []": ("vqa", vqa_answers(VQA_VAL_A, 0), AnnotationError,
                           re.escape(VQA_VAL_A) + r": 1 annotations do not hold 10 answers \(question_id 0: 0\)"),
    "vqa train 3 answers": ("vqa", vqa_answers(VQA_TRAIN_A, 3), AnnotationError,
                            re.escape(VQA_TRAIN_A) + r": 1 annotations do not hold 10 answers \(question_id 0: 3\)"),
    "vqa val annotations absent": ("vqa", drop_vqa_val_annotations, AnnotationError,
                                   re.escape(VQA_VAL_A) + r": not found, so finetune.py's evaluation of val2014 would "
                                   r"give no accuracy.* evaluate.py --task vqa --split val2014"),
    "vqa empty val question": ("vqa", empty_vqa_val_question, AnnotationError,
                               re.escape(VQA_VAL_Q) + r": questions\[1\] \(question_id 100\) is an empty question"),
    "karpathy val image sentences []": ("retrieval", karpathy_val_image(sentences=[]), AnnotationError,
                                        r"dataset_synthetic.json: images\[4\] has no sentences"),
    "karpathy val empty caption": ("retrieval", karpathy_val_image(
        sentences=lambda image: image["sentences"][1].update(raw=" ")), AnnotationError,
        r"dataset_synthetic.json: images\[4\]\['sentences'\]\[1\] is an empty caption"),
}


@pytest.mark.parametrize("case", sorted(BEFORE_THE_FIRST_STEP))
def test_finetune_refuses_bad_task_files_before_the_first_step(data, tmp_path, no_training, case):
    task, damage, error, message = BEFORE_THE_FIRST_STEP[case]
    if task == "retrieval":
        root = tmp_path / "dataset_synthetic.json"
        shutil.copy(data / "retrieval" / "dataset_synthetic.json", root)
        flags = retrieval_flags(data, root)
    else:
        root = copy_annotations(data, task, tmp_path / task)
        flags = (nlvr2_flags if task == "nlvr2" else vqa_flags)(data, root)
    damage(root)
    with pytest.raises(error, match=message) as err:
        run_finetune(data, tmp_path, task, flags)
    assert str(tmp_path) in str(err.value)  # the message names the file


def test_finetune_checks_only_the_evaluation_it_will_run(data, tmp_path, no_training):
    """--no-eval, or VQA training on val2014 (no evaluation of val2014 then), reads no evaluation file."""
    nlvr2_root = copy_annotations(data, "nlvr2", tmp_path / "nlvr2")
    drop_dev(nlvr2_root)
    with pytest.raises(TrainingStarted):
        run_finetune(data, tmp_path, "nlvr2", nlvr2_flags(data, nlvr2_root) + ["--no-eval"])
    vqa_root = copy_annotations(data, "vqa", tmp_path / "vqa")
    empty_vqa_val_question(vqa_root)  # a bad sample of training now: counted, not refused
    with pytest.raises(TrainingStarted):
        run_finetune(data, tmp_path, "vqa", vqa_flags(data, vqa_root) + ["--vqa-train-splits", "train2014,val2014",
                                                                  "--vqa-min-answer-count", "1"])


def test_finetune_refuses_a_vqa_training_split_given_twice(data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_finetune(data, tmp_path, "vqa", vqa_flags(data, data / "vqa") + ["--vqa-train-splits", "train2014,train2014"])
    assert exit_info.value.code == 2
    assert "--vqa-train-splits train2014,train2014 lists train2014 more than once" in capsys.readouterr().err


def test_retrieval_recipe_follows_the_files_dataset_field_not_its_name(data, tmp_path):
    """A COCO Karpathy file named karpathy.json gets the COCO recipe (train + restval), and a log line
    says why; a Flickr30K file named dataset_coco.json gets Flickr30K's."""
    images = [{"filepath": "images", "filename": f"{i:06d}.png", "imgid": i, "split": split,
               "sentences": [{"raw": "a red circle", "sentid": i}]}
              for i, split in enumerate(["train", "restval", "restval", "val"])]
    task, logged = TASKS["retrieval"], []
    model_cfg = make_model_config("tiny")
    tokenizer = WordPieceTokenizer(str(data / "vocab.txt"))
    for name, dataset, preset, pairs in [("karpathy.json", "coco", "retrieval-coco", 3),
                                         ("dataset_coco.json", "flickr30k", "retrieval-f30k", 1)]:
        path = tmp_path / name
        path.write_text(json.dumps({"images": images, "dataset": dataset}))
        args = argparse.Namespace(karpathy_json=str(path), retrieval_images=str(data / "retrieval"))
        assert task.preset(args) == preset
        training = task.training_data(args, task.config_class(), model_cfg, make_train_config("pretrain"),
                                      tokenizer, torch.device("cpu"), str(tmp_path), logged.append)
        assert len(training.dataset) == pairs
        assert f'{path} says "dataset": "{dataset}", so the {"COCO" if dataset == "coco" else "Flickr30K"} ' \
               f'recipe (--preset auto: {preset})' in logged[-2]


# -------------------------------------------------------------------------------------------------
#                          No score where the files cannot give one
# -------------------------------------------------------------------------------------------------

def vqa_result_files(tmp_path, answer_count, predictions=None):
    """(results, annotations) files: two questions, each annotated with ``answer_count`` answers 'red',
    and predicted perfectly unless ``predictions`` are given."""
    anns = [{"question_id": q, "image_id": 1, "question_type": "what", "answer_type": "other",
             "multiple_choice_answer": "red",
             "answers": [{"answer": "red", "answer_id": i + 1} for i in range(answer_count)]} for q in (1, 2)]
    results = predictions or [{"question_id": q, "answer": "red"} for q in (1, 2)]
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "annotations.json").write_text(json.dumps({"annotations": anns}))
    return ["--task", "vqa", "--predictions", str(tmp_path / "results.json"),
            "--annotations", str(tmp_path / "annotations.json")]


@pytest.mark.parametrize("answer_count", [1, 3, 11])
def test_vqa_scoring_refuses_annotations_without_10_answers(tmp_path, answer_count):
    """The official formula with 1 answer scores a perfect prediction 0, with 3 at most 66.67."""
    assert evaluate.main(vqa_result_files(tmp_path, 10))["overall"] == 100.0
    with pytest.raises(AnnotationError, match=rf"results.json scored on .*annotations.json: vqa_accuracy: 2 of the 2 "
                                              rf"annotations do not hold 10 answers \(question_id 1: {answer_count}, "
                                              rf"question_id 2: {answer_count}\)"):
        evaluate.main(vqa_result_files(tmp_path, answer_count))
    # the documented mode for other datasets: the same formula on any count
    anns = json.load(open(tmp_path / "annotations.json"))
    loose = metrics.vqa_accuracy({1: "red", 2: "red"}, anns, answers_per_question=None)["overall"]
    assert loose == {1: 0.0, 3: 66.67, 11: 100.0}[answer_count]


def test_vqa_scoring_refuses_a_bool_question_id(tmp_path):
    flags = vqa_result_files(tmp_path, 10, [{"question_id": 1, "answer": "red"}, {"question_id": True, "answer": "red"}])
    with pytest.raises(AnnotationError, match=r"results.json scored on .*: predictions: question_id true is a bool, "
                                              "expected an int"):
        evaluate.main(flags)
    with pytest.raises(TypeError, match=r"annotations\[1\] has question_id true, a bool"):
        metrics.vqa_accuracy({1: "red"}, [{"question_id": 1, "question_type": "x", "answer_type": "y",
                                           "answers": ["red"] * 10},
                                          {"question_id": True, "question_type": "x", "answer_type": "y",
                                           "answers": ["red"] * 10}])


@pytest.mark.parametrize("kept, missing", [(0, 2), (1, 1)])
def test_nlvr2_scoring_refuses_an_empty_or_partial_predictions_file(data, tmp_path, kept, missing):
    labels = str(data / "nlvr2" / "dev.json")
    identifiers = [line["identifier"] for line in read_lines(labels)]
    (tmp_path / "preds.csv").write_text("".join(f"{i},True\n" for i in identifiers[:kept]))
    with pytest.raises(AnnotationError, match=rf"preds.csv scored on .*dev.json: nlvr2_metrics: {missing} of the 2 "
                                              rf"labelled examples have no prediction, e.g. "
                                              rf"{re.escape(repr(identifiers[kept:]))}"):
        evaluate.main(["--task", "nlvr2", "--predictions", str(tmp_path / "preds.csv"), "--labels", labels])


def test_nlvr2_predictions_with_a_broken_json_line_name_the_file_and_line(data, tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_text('{"identifier": "dev-0-0-0", "prediction": true}\n{"identifier": "dev-0-1-0", "predic\n')
    with pytest.raises(AnnotationError, match=rf"{re.escape(str(path))}: line 2 is not valid JSON"):
        evaluate.main(["--task", "nlvr2", "--predictions", str(path), "--labels", str(data / "nlvr2" / "dev.json")])


class AnswerRed(torch.nn.Module):
    """A VQA model that answers the first answer to every question (what the files do matters here)."""

    def __init__(self, num_answers):
        super().__init__()
        self.config, self.num_answers = make_model_config("tiny"), num_answers

    def forward(self, input_ids, attention_mask, images, pixel_mask):
        return torch.zeros(len(input_ids), self.num_answers)


def vqa_val_with_images(tmp_path, n_questions, n_images):
    """A val2014 split of ``n_questions`` questions on as many images, of which the first ``n_images`` exist."""
    root = tmp_path / "vqa"
    (root / "val2014").mkdir(parents=True)
    questions = [{"question_id": q, "image_id": q, "question": "what colour is the circle ?"} for q in range(n_questions)]
    anns = [{"question_id": q, "image_id": q, "question_type": "what colour", "answer_type": "other",
             "multiple_choice_answer": "red", "answers": [{"answer": "red", "answer_id": i + 1} for i in range(10)]}
            for q in range(n_questions)]
    (root / VQA_VAL_Q).write_text(json.dumps({"questions": questions}))
    (root / VQA_VAL_A).write_text(json.dumps({"annotations": anns}))
    for q in range(n_images):
        Image.new("RGB", (IMAGE, IMAGE), (200, 30, 30)).save(root / "val2014" / f"COCO_val2014_{q:012d}.jpg")
    return argparse.Namespace(vqa_root=str(root), vqa_images=None)


def test_vqa_evaluation_with_unreadable_images_gives_no_score_and_counts_what_it_scored(data, tmp_path):
    tokenizer, model, answers = WordPieceTokenizer(str(data / "vocab.txt")), AnswerRed(2), ["red", "blue"]
    out = tmp_path / "eval"
    args = vqa_val_with_images(tmp_path, 30, 1)
    with pytest.warns(BadSampleWarning), pytest.raises(BadDataError, match=r"no score: 29 of the 30 questions were bad"
                                                       r".* first bad files: .*COCO_val2014_000000000001.jpg"):
        evaluate_split(TASKS["vqa"], model, tokenizer, args, "val2014", DistInfo(), str(out), answers,
                       EvalSettings(batch_size=8), log=lambda *_: None)
    assert not os.path.exists(out / "metrics_vqa_val2014.json")
    # allowed by EvalSettings.max_bad_fraction: scored, and the questions answered blind are counted
    with pytest.warns(BadSampleWarning):
        result = evaluate_split(TASKS["vqa"], model, tokenizer, args, "val2014", DistInfo(), str(out), answers,
                                EvalSettings(batch_size=8, max_bad_fraction=1.0), log=lambda *_: None)
    assert (result["n_questions"], result["n_bad_samples"], result["overall"]) == (30, 29, 100.0)
    clean = evaluate_split(TASKS["vqa"], model, tokenizer, vqa_val_with_images(tmp_path / "clean", 3, 3), "val2014",
                           DistInfo(), str(out), answers, EvalSettings(batch_size=8), log=lambda *_: None)
    assert (clean["n_questions"], clean["n_bad_samples"]) == (3, 0)
    assert json.load(open(out / "metrics_vqa_val2014.json"))["n_bad_samples"] == 0


# -------------------------------------------------------------------------------------------------
#                 Empty texts: a counted bad sample in training, refused in evaluation
# -------------------------------------------------------------------------------------------------

def test_an_empty_question_sentence_or_caption_is_a_bad_sample_of_training(data):
    """As pre-training's empty captions: skipped and counted (BadSample), or an error with fatal_bad_samples.
    (Evaluation files refuse them at read time: the cases above.)"""
    question = read_vqa(str(data / "vqa"), "train2014").questions[0]._replace(question=" ")
    example = read_nlvr2(str(data / "nlvr2" / "train.json"), str(data / "nlvr2" / "images"))[0]._replace(sentence="")
    caption = read_karpathy(str(data / "retrieval" / "dataset_synthetic.json"), str(data / "retrieval"),
                            splits=("train",))[0]._replace(caption="")  # retrieval trains on these records
    for what, reason, make in [("question", "empty_text", lambda fatal: VQADataset([question], ["red"], TRANSFORM,
                                                                                 fatal_bad_samples=fatal)),
                               ("sentence", "empty_text", lambda fatal: NLVR2Dataset([example], TRANSFORM, fatal)),
                               ("caption", "empty_caption", lambda fatal: CaptionDataset([caption], TRANSFORM, fatal))]:
        bad = make(False)[0]
        assert isinstance(bad, BadSample) and bad.reason == reason and f"empty {what}" in bad.message
        with pytest.raises(BadSampleError, match=f"empty {what}"):
            make(True)[0]
