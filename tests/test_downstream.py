"""Downstream tasks (Sec. 4.2 of the paper; docs/paper.md): loaders on small files in the official formats,
synthetic task data, the hard-negative ranking loss, retrieval evaluation (feature cache, sharding
over 2 processes), and finetune.py / evaluate.py end to end on tiny synthetic tasks."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pixel_bert import (evaluate, finetune, losses, metrics, nlvr2, retrieval, retrieval_scoring, synthetic,
                        synthetic_tasks, vqa)
from pixel_bert.annotations import AnnotationError
from pixel_bert.config import make_model_config
from pixel_bert.distributed import DistInfo
from pixel_bert.heads import PixelBertForPreTraining, PixelBertForRetrieval
from pixel_bert.images import ImageTransform, load_image, pad_images
from pixel_bert.saved_model import load_saved_model, save_model
from pixel_bert.tasks import TASKS
from pixel_bert.tokenizer import WordPieceTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE = 64


def tiny_cfg(**kw):
    return make_model_config("tiny", num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128,
                             image_short_side=IMAGE_SIZE, image_long_side=IMAGE_SIZE, hidden_dropout=0.0,
                             attention_dropout=0.0, **kw)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return WordPieceTokenizer(synthetic.write_vocab(str(tmp_path_factory.mktemp("vocab") / "vocab.txt")))


@pytest.fixture(scope="module")
def pre_ckpt(tmp_path_factory):
    """A pre-training checkpoint as train.py writes it (weights, config, task, vocab)."""
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("pre") / "model.pt")
    save_model(PixelBertForPreTraining(tiny_cfg()), path,
               extra={"task": "pretrain", "vocab": synthetic.vocab_tokens()})
    return path


@pytest.fixture(scope="module")
def ret_ckpt(tmp_path_factory):
    """A retrieval model checkpoint (as finetune.py writes it) with a non-trivial score head."""
    torch.manual_seed(1)
    model = PixelBertForRetrieval(tiny_cfg())
    torch.nn.init.normal_(model.retrieval.score.weight, std=0.5)
    path = str(tmp_path_factory.mktemp("ret") / "model.pt")
    save_model(model, path, extra={"task": "retrieval", "vocab": synthetic.vocab_tokens()})
    return path


@pytest.fixture(scope="module")
def retrieval_json(tmp_path_factory):
    return synthetic_tasks.write_retrieval(str(tmp_path_factory.mktemp("ret_data")), n_train=4, n_val=4,
                                           n_test=6, image_size=IMAGE_SIZE, captions_per_image=3)


def _save_image(path, size=(40, 30), colour=(200, 30, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)


# -------------------------------------------------------------------------------------------------
#                                 Loaders on official-format files
# -------------------------------------------------------------------------------------------------

def _vqa_annotation(qid, image_id, answers, atype="other"):
    return dict(question_id=qid, image_id=image_id, question_type="what color is the", answer_type=atype,
                multiple_choice_answer=answers[0],
                answers=[dict(answer=a, answer_confidence="yes", answer_id=i + 1) for i, a in enumerate(answers)])


def _write_vqa_files(root):
    qs = [dict(image_id=42, question="what colour is the circle?", question_id=420),
          dict(image_id=42, question="how many?", question_id=421),
          dict(image_id=7, question="is it odd?", question_id=70)]
    anns = [_vqa_annotation(420, 42, ["red"] * 6 + ["Red."] + ["blue"] * 2 + ["green"]),
            _vqa_annotation(421, 42, ["two"] * 3 + ["2"] * 2 + ["3"] * 5, "number"),
            _vqa_annotation(70, 7, ["unicorn"] * 10)]
    for split, a in (("train2014", anns), ("val2014", anns[:2])):
        json.dump(dict(questions=qs if split == "train2014" else qs[:2]),
                  open(os.path.join(root, f"v2_OpenEnded_mscoco_{split}_questions.json"), "w"))
        json.dump(dict(annotations=a), open(os.path.join(root, f"v2_mscoco_{split}_annotations.json"), "w"))
    json.dump(dict(questions=[dict(image_id=9, question="what?", question_id=90)]),
              open(os.path.join(root, "v2_OpenEnded_mscoco_test-dev2015_questions.json"), "w"))
    for folder, image_id in (("train2014", 42), ("train2014", 7), ("val2014", 42), ("test2015", 9)):
        _save_image(os.path.join(root, "images", folder, f"COCO_{folder}_{image_id:012d}.jpg"))


def test_vqa_loader_targets_and_collator(tmp_path, tokenizer):
    root = str(tmp_path)
    _write_vqa_files(root)
    train = vqa.read_vqa(root, "train2014", os.path.join(root, "images"))
    assert [q.question_id for q in train.questions] == [420, 421, 70]
    assert train.questions[0].image_path.endswith(os.path.join("train2014", "COCO_train2014_000000000042.jpg"))
    assert len(train.questions[0].answers) == 10 and train.questions[1].answer_type == "number"
    test = vqa.read_vqa(root, "test-dev2015", os.path.join(root, "images"))
    assert test.annotations is None and test.questions[0].answers == ()
    assert test.questions[0].image_path.endswith(os.path.join("test2015", "COCO_test2015_000000000009.jpg"))

    val = vqa.read_vqa(root, "val2014")
    # "red" is the multiple-choice answer of 2 questions (train + val), "two" -> "2" of 2, "unicorn" of 1
    answers = vqa.answer_vocabulary([train.annotations, val.annotations], min_count=2)
    assert sorted(answers) == ["2", "red"]
    ds = vqa.VQADataset(train.questions, answers, ImageTransform(32, 32, (0.5,) * 3, (0.5,) * 3))
    assert ds.num_unanswerable == 1  # "unicorn" kept with an all-zero target (the default)
    assert len(vqa.VQADataset(train.questions, answers, ds.transform, drop_unanswerable=True)) == 2
    batch = vqa.VQACollator(tokenizer, 16, len(answers))([ds[i] for i in range(3)])
    red, two = answers.index("red"), answers.index("2")
    # red: 7 of 10 annotators after normalisation ("Red." -> "red"): 1.0; "2": "two" x3 + "2" x2 = 5: 1.0
    assert batch["targets"][0, red] == 1.0 and batch["targets"][1, two] == 1.0
    assert batch["targets"][2].abs().sum() == 0 and batch["question_ids"] == [420, 421, 70]
    two_of_ten = vqa.VQADataset([train.questions[0]._replace(answers=("blue",) * 2 + ("x",) * 8)],
                                ["blue"], ds.transform)
    assert two_of_ten.items[0][2] == [0.6]  # soft score of 2 annotators (metrics.vqa_soft_score)

    os.remove(os.path.join(root, "v2_OpenEnded_mscoco_val2014_questions.json"))
    with pytest.raises(FileNotFoundError, match="--vqa-root"):
        vqa.read_vqa(root, "val2014")
    json.dump(dict(annotations=[]), open(os.path.join(root, "v2_mscoco_train2014_annotations.json"), "w"))
    with pytest.raises(AnnotationError, match="no annotation for question_id 420"):
        vqa.read_vqa(root, "train2014")


def test_vqa_loss_is_sum_over_answers_mean_over_questions():
    logits, targets = torch.randn(4, 7), torch.rand(4, 7)
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert torch.allclose(losses.vqa_loss(logits, targets), plain * 7)


def test_nlvr2_loader_and_predictions_file(tmp_path):
    root = str(tmp_path)
    lines = [dict(identifier="train-10-0-1", sentence="both images contain a red circle", label="True", directory=3),
             dict(identifier="train-10-1-1", sentence="both images contain a red circle", label="False", directory=3)]
    with open(os.path.join(root, "train.json"), "w") as f:
        f.write("\n".join(json.dumps(x) for x in lines) + "\n")
    with open(os.path.join(root, "dev.json"), "w") as f:
        f.write(json.dumps(dict(identifier="dev-5-2-0", sentence="s", label="false")) + "\n")
    ex = nlvr2.read_nlvr2(os.path.join(root, "train.json"), os.path.join(root, "images"))
    assert [e.label for e in ex] == [True, False]
    assert ex[0].left_path == os.path.join(root, "images", "train", "3", "train-10-0-img0.png")
    assert ex[1].right_path == os.path.join(root, "images", "train", "3", "train-10-1-img1.png")
    dev = nlvr2.read_nlvr2(os.path.join(root, "dev.json"), os.path.join(root, "images"))
    assert dev[0].left_path == os.path.join(root, "images", "dev", "dev-5-2-img0.png") and dev[0].label is False
    with open(os.path.join(root, "bad.json"), "w") as f:
        f.write(json.dumps(dict(identifier="dev-1-0-0", sentence="s", label="maybe")) + "\n")
    with pytest.raises(AnnotationError, match="bad.json: line 1.*'maybe'"):
        nlvr2.read_nlvr2(os.path.join(root, "bad.json"), root)
    path = nlvr2.write_predictions(os.path.join(root, "p.csv"), {"train-10-0-1": True, "train-10-1-1": True})
    assert open(path).read() == "train-10-0-1,True\ntrain-10-1-1,True\n"
    preds = nlvr2.read_predictions(path)
    m = nlvr2.score_nlvr2(preds, ex)
    assert m["accuracy"] == 0.5 and m["consistency"] == 0.0  # the sentence's second pair is wrong
    with open(os.path.join(root, "bad.csv"), "w") as f:
        f.write("train-10-0-1;True\n")
    with pytest.raises(ValueError, match="bad.csv: line 1"):
        nlvr2.read_predictions(os.path.join(root, "bad.csv"))


def test_karpathy_eval_loader(tmp_path):
    images = [dict(filename=f"{i}.jpg", imgid=i, split=s, sentids=[10 * i, 10 * i + 1],
                   sentences=[dict(raw=f" cap {i} {j}", sentid=10 * i + j, imgid=i, tokens=[]) for j in range(2)])
              for i, s in enumerate(["train", "test", "test", "val", "test"])]
    path = str(tmp_path / "dataset_flickr30k.json")
    json.dump(dict(images=images, dataset="flickr30k"), open(path, "w"))
    split = retrieval.read_karpathy_eval(path, "/imgs", "test")
    assert split.image_ids == ["1", "2", "4"] and split.image_paths[0] == os.path.join("/imgs", "1.jpg")
    assert split.captions[:2] == ["cap 1 0", "cap 1 1"] and split.caption_ids == [10, 11, 20, 21, 40, 41]
    assert split.caption_image.tolist() == [0, 0, 1, 1, 2, 2]
    small = retrieval.read_karpathy_eval(path, "/imgs", "test", max_images=2, max_captions=1)
    assert small.caption_image.tolist() == [0, 1] and small.caption_ids == [10, 20]


# -------------------------------------------------------------------------------------------------
#                                      Synthetic task data
# -------------------------------------------------------------------------------------------------

def test_synthetic_tasks_in_official_formats(tmp_path):
    out = str(tmp_path)
    root = synthetic_tasks.write_vqa(os.path.join(out, "vqa"), 8, 4, 2, image_size=IMAGE_SIZE, answer_noise=0.0)
    train = vqa.read_vqa(root, "train2014")
    assert len(train.questions) == 24 and os.path.isfile(train.questions[0].image_path)
    assert vqa.read_vqa(root, "test-dev2015").annotations is None
    for q in train.questions:  # without annotator noise every answer is the scene's truth
        scene = synthetic.scene_for(0, q.image_id, IMAGE_SIZE)
        assert len(set(q.answers)) == 1
        if q.question.startswith("how many"):
            assert q.answers[0] == str(len(scene.shapes))
        if q.question.startswith("what colour is the"):
            assert scene.find(q.answers[0], q.question.split()[4]) is not None
    noisy = synthetic_tasks.human_answers("red", ["blue", "green"], 0.5, np.random.default_rng(0))
    assert len(noisy) == 10 and 0 < noisy.count("red") < 10

    root = synthetic_tasks.write_nlvr2(os.path.join(out, "nlvr2"), 6, 3, 2, image_size=IMAGE_SIZE)
    ex = nlvr2.read_nlvr2(os.path.join(root, "train.json"), os.path.join(root, "images"))
    assert len(ex) == 24 and sum(e.label for e in ex) == 12  # half true, per sentence too
    assert all(os.path.isfile(e.left_path) and os.path.isfile(e.right_path) for e in ex)
    assert nlvr2.read_nlvr2(os.path.join(root, "test1.json"), os.path.join(root, "images"))[0].left_path.startswith(
        os.path.join(root, "images", "test1"))

    path = synthetic_tasks.write_retrieval(os.path.join(out, "ret"), 3, 2, 2, image_size=IMAGE_SIZE)
    test = retrieval.read_karpathy_eval(path, os.path.dirname(path), "test")
    assert len(test.image_paths) == 2 and len(test.captions) == 10 and os.path.isfile(test.image_paths[1])
    tok = WordPieceTokenizer(synthetic.write_vocab(os.path.join(out, "vocab.txt")))
    texts = [q.question for q in train.questions] + [e.sentence for e in ex] + test.captions
    assert tok.unk_id not in tok(texts, max_length=40).input_ids  # every word is in the vocabulary


def test_synthetic_tasks_cli_help_names_every_flag(capsys):
    with pytest.raises(SystemExit):
        synthetic_tasks.main(["--help"])
    text = capsys.readouterr().out
    for action in synthetic_tasks.get_args_parser()._actions:
        assert action.help, action.dest
        assert all(opt in text for opt in action.option_strings)


# -------------------------------------------------------------------------------------------------
#                                 Retrieval: hard negatives
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", losses.RETRIEVAL_LOSSES)
def test_hard_negative_loss_forms_match_hand_computed_gradients(form):
    torch.manual_seed(0)
    pos = torch.randn(4, requires_grad=True)
    neg = torch.randn(4, 20, requires_grad=True)
    loss, hard = losses.hard_negative_loss(pos, neg, 5, form)
    loss.backward()
    top5 = neg.detach().topk(5, dim=1).indices
    assert torch.equal(hard.sort(1).values, top5.sort(1).values)
    is_hard = torch.zeros(4, 20, dtype=torch.bool).scatter(1, top5, True)
    # the value: cross-entropy with the positive first, over 6 scores or over all 21
    scores = torch.cat([pos[:, None], neg.gather(1, top5) if form == "hard6" else neg], 1).detach()
    assert torch.allclose(loss, F.cross_entropy(scores, torch.zeros(4, dtype=torch.long)))
    # the gradients, by hand (mean over the 4 rows): p = softmax of those scores
    p = scores.softmax(1) / 4
    p_neg = torch.zeros(4, 20).scatter(1, top5, p[:, 1:]) if form == "hard6" else p[:, 1:]
    expected_neg = torch.where(is_hard, p_neg, torch.zeros(()))  # only the 5 hard negatives get gradients
    expected_pos = p[:, 0] - 0.25
    if form == "all21_offsets":  # the easy negatives move with the positive
        expected_pos = expected_pos + torch.where(is_hard, torch.zeros(()), p[:, 1:]).sum(1)
    assert torch.allclose(neg.grad, expected_neg, atol=1e-7)
    assert torch.allclose(pos.grad, expected_pos, atol=1e-7)



def test_hard_negative_loss_takes_given_hard_negatives_and_refuses_unknown_forms():
    """Training picks the hard negatives in a gradient-free pass and passes them in: those are the ones
    graded, whatever the scores are now (here the 3 lowest, not the top 3); an unknown form is refused."""
    torch.manual_seed(1)
    pos = torch.randn(4, requires_grad=True)
    neg = torch.randn(4, 10, requires_grad=True)
    given = neg.detach().topk(3, dim=1, largest=False).indices
    for form in losses.RETRIEVAL_LOSSES:
        neg.grad = None
        loss, hard = losses.hard_negative_loss(pos, neg, 3, form, hard_idx=given)
        assert hard is given
        loss.backward()
        graded = torch.zeros(4, 10, dtype=torch.bool).scatter(1, given, True)
        assert (neg.grad[graded] > 0).all() and not neg.grad[~graded].any(), form
        if form == "hard6":
            scores = torch.cat([pos[:, None], neg.gather(1, given)], 1).detach()
            assert torch.allclose(loss, F.cross_entropy(scores, torch.zeros(4, dtype=torch.long)))
    with pytest.raises(ValueError, match="retrieval loss 'hard5'"):
        losses.hard_negative_loss(pos, neg, 3, "hard5")

def test_negatives_never_share_the_positive_image():
    keys = ["a", "a", "b", "c", "d", "d"]
    img, cap = retrieval.negative_pairs(keys, 20, "both", torch.Generator().manual_seed(0))
    assert img.shape == cap.shape == (6, 21)
    assert torch.equal(img[:, 0], torch.arange(6)) and torch.equal(cap[:, 0], torch.arange(6))
    codes = torch.tensor([0, 0, 1, 2, 3, 3])
    assert (codes[img[:, 1:]] != codes[cap[:, 1:]]).all()  # every negative pairs two different images
    assert (img[:, 1:11] == torch.arange(6)[:, None]).all() and (cap[:, 11:] == torch.arange(6)[:, None]).all()


def test_retrieval_step_backprops_through_positive_and_5_hard(tokenizer):
    torch.manual_seed(0)
    model = PixelBertForRetrieval(tiny_cfg(freeze_backbone_bn=False))
    model.bert.freeze_backbone()  # as finetune.py does for the retrieval presets
    seen, modes = [], []
    model.bert.register_forward_pre_hook(lambda m, args: modes.append((torch.is_grad_enabled(), m.training)))

    class Spy(torch.nn.Module):  # stands for the DDP wrapper: records the forward passes with gradients
        def __init__(self, m):
            super().__init__()
            self.module = m

        def forward(self, *a, **kw):
            seen.append(a[0].shape[0])
            return self.module(*a, **kw)

    images = [torch.randn(3, IMAGE_SIZE, IMAGE_SIZE) for _ in range(8)]
    imgs, mask = pad_images(images)
    text = tokenizer(["a red circle", "a blue square", "two shapes", "a green cross"] * 2, max_length=16)
    batch = dict(images=imgs, pixel_mask=mask, input_ids=text.input_ids, attention_mask=text.attention_mask,
                 image_keys=[f"k{i}" for i in range(8)])
    bn = model.bert.visual_embedding.backbone.stem[1]  # a live BatchNorm (the tiny preset's)
    before = bn.running_mean.clone()
    model.train()  # the frozen trunk stays in eval mode all the same
    assert not model.bert.visual_embedding.backbone.training and model.bert.layers[0].training
    out = retrieval.retrieval_step(Spy(model), batch, torch.device("cpu"), num_negatives=20, num_hard=5)
    out["loss"].backward()
    assert torch.equal(bn.running_mean, before)  # a frozen CNN keeps its statistics too
    assert seen == [8 * 6]  # the positive and 5 hard negatives per pair, not 21
    # the gradient-free pass that picks the hard negatives runs in the same (training) mode as the graded one
    assert modes == [(False, True), (True, True)]
    assert torch.isfinite(out["loss"]) and model.retrieval.score.weight.grad.abs().sum() > 0
    assert model.bert.visual_embedding.proj.weight.grad.abs().sum() > 0  # the projection still trains
    assert all(p.grad is None for n, p in model.named_parameters() if ".backbone." in n)


# -------------------------------------------------------------------------------------------------
#                                 Retrieval: scalable evaluation
# -------------------------------------------------------------------------------------------------

def _load_ret(path):
    return load_saved_model(path).model.eval()


def test_cached_features_give_the_per_pair_cnn_scores(ret_ckpt, retrieval_json, tokenizer, tmp_path):
    model = _load_ret(ret_ckpt)
    split = retrieval.read_karpathy_eval(retrieval_json, os.path.dirname(retrieval_json), "test")
    transform = ImageTransform.from_config(model.config)
    info = DistInfo()
    out = retrieval_scoring.evaluate_retrieval(model, split, tokenizer, transform, 24, info, image_batch_size=4,
                                       pairs_per_batch=7)
    images, mask = pad_images([transform(load_image(p)) for p in split.image_paths])
    text = tokenizer(split.captions, max_length=24)
    naive = retrieval_scoring.score_pairs_uncached(model, images, mask, text.input_ids, text.attention_mask,
                                           torch.device("cpu"), pairs_per_batch=5)
    assert out["scores"].shape == (6, 18) and np.allclose(out["scores"], naive.numpy(), atol=1e-5)
    assert out["scores"].std() > 1e-3  # the scores really differ between pairs
    # the on-disk cache: written on the first run, read (same scores) on the second
    cache = str(tmp_path / "feats")
    first = retrieval_scoring.evaluate_retrieval(model, split, tokenizer, transform, 24, info, feature_cache=cache,
                                         checkpoint=ret_ckpt)
    assert len(os.listdir(cache)) == 1
    logs = []
    second = retrieval_scoring.evaluate_retrieval(model, split, tokenizer, transform, 24, info, feature_cache=cache,
                                          checkpoint=ret_ckpt, log=logs.append)
    assert any("from cache" in line for line in logs)
    assert np.array_equal(first["scores"], second["scores"])


def test_two_process_retrieval_evaluation_equals_one_process(ret_ckpt, retrieval_json, tmp_path):
    common = ["--task", "retrieval", "--checkpoint", ret_ckpt, "--karpathy-json", retrieval_json,
              "--split", "test", "--pairs-per-batch", "16", "--batch-size", "2", "--num-workers", "0"]
    one = evaluate.main(common + ["--output-dir", str(tmp_path / "one")])
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(REPO, "evaluate.py")] + common + ["--output-dir", str(tmp_path / "two"),
                                                                          "--device", "cpu"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = metrics.load_score_matrix(str(tmp_path / "one" / "retrieval_test_scores.npz"))
    b = metrics.load_score_matrix(str(tmp_path / "two" / "retrieval_test_scores.npz"))
    assert np.allclose(a.scores, b.scores, atol=1e-5) and np.array_equal(a.caption_image, b.caption_image)
    two = json.load(open(tmp_path / "two" / "metrics_retrieval_test.json"))
    assert two["world_size"] == 2 and two["recall"] == one["recall"]


# -------------------------------------------------------------------------------------------------
#                            finetune.py and evaluate.py end to end
# -------------------------------------------------------------------------------------------------

TASK_FLAGS = {
    "vqa": ["--synthetic-train", "12", "--synthetic-val", "4"],
    "nlvr2": ["--synthetic-train", "4", "--synthetic-val", "2"],
    "retrieval": ["--synthetic-train", "12", "--synthetic-val", "4", "--retrieval_negatives", "6",
                  "--retrieval_hard_negatives", "2"],
}


@pytest.mark.parametrize("task", ["vqa", "nlvr2", "retrieval"])
def test_finetune_then_evaluate_end_to_end(task, pre_ckpt, tmp_path):
    run = str(tmp_path / "run")
    result = finetune.main(["--task", task, "--init", pre_ckpt, "--output-dir", run, "--max-steps", "3",
                            "--batch_size", "4", "--num_workers", "0", "--epochs", "1", "--warmup_steps", "1"]
                           + TASK_FLAGS[task])
    assert result["steps"] == 3
    ckpt = torch.load(os.path.join(run, "model.pt"), map_location="cpu", weights_only=True)
    assert ckpt["task"] == task and ckpt["vocab"] == synthetic.vocab_tokens()
    if task == "vqa":
        assert ckpt["answers"] == json.load(open(os.path.join(run, "answers.json")))
        assert ckpt["model_config"]["num_answers"] == len(ckpt["answers"])
    data = os.path.join(run, "data", task)
    flags = {"vqa": ["--vqa-root", data], "nlvr2": ["--nlvr2-root", data],
             "retrieval": ["--karpathy-json", os.path.join(data, "dataset_synthetic.json")]}[task]
    split = TASKS[task].val_split
    again = evaluate.main(["--task", task, "--checkpoint", os.path.join(run, "model.pt"), "--split", split,
                           "--output-dir", str(tmp_path / "eval"), "--num-workers", "0"] + flags)
    final = result["eval"]
    # the figures recomputed from the written files by the brute-force references of test_properties.py,
    # not by the code that wrote them
    from test_properties import brute_force_recall, brute_force_vqa_accuracy
    if task == "vqa":
        predicted = {r["question_id"]: r["answer"] for r in json.load(open(final["predictions_file"]))}
        anns = json.load(open(os.path.join(data, "v2_mscoco_val2014_annotations.json")))["annotations"]
        by_hand = 100 * sum(brute_force_vqa_accuracy(predicted[a["question_id"]], [x["answer"] for x in a["answers"]])
                            for a in anns) / len(anns)
        assert final["overall"] == pytest.approx(by_hand, abs=0.005)
    elif task == "nlvr2":
        labels = {e["identifier"]: e["label"] == "True" for e in map(json.loads, open(os.path.join(data, "dev.json")))}
        predicted = dict(line.strip().split(",") for line in open(final["predictions_file"]))
        right = {k: (predicted[k] == "True") == v for k, v in labels.items()}
        sentences = {}
        for k, ok in right.items():
            key = k.split("-")
            sentences.setdefault((key[0], key[1], key[3]), []).append(ok)
        assert final["accuracy"] == pytest.approx(sum(right.values()) / len(right))
        assert final["consistency"] == pytest.approx(sum(map(all, sentences.values())) / len(sentences))
    else:
        saved = metrics.load_score_matrix(final["scores_file"])
        for k in (1, 5, 10):
            tr, ir = brute_force_recall(torch.as_tensor(saved.scores), saved.caption_image.tolist(), k)
            assert (final["recall"][f"tr_r{k}"], final["recall"][f"ir_r{k}"]) == pytest.approx((tr, ir)), k
    if task == "vqa":
        assert final["n_questions"] == 12 and again["overall"] == final["overall"]
        files = evaluate.main(["--task", "vqa", "--predictions", final["predictions_file"], "--annotations",
                               os.path.join(data, "v2_mscoco_val2014_annotations.json")])
        assert files["overall"] == final["overall"]
        sub = evaluate.main(["--task", task, "--checkpoint", os.path.join(run, "model.pt"), "--split",
                             "test-dev2015", "--output-dir", str(tmp_path / "eval"), "--num-workers", "0"] + flags)
        rows = json.load(open(sub["predictions_file"]))
        assert len(rows) == 3 * 50 and set(rows[0]) == {"question_id", "answer"}  # 50 test images x 3
    elif task == "nlvr2":
        assert final["n"] == 8 and again["accuracy"] == final["accuracy"]
        files = evaluate.main(["--task", "nlvr2", "--predictions", final["predictions_file"], "--labels",
                               os.path.join(data, "dev.json")])
        assert files["accuracy"] == final["accuracy"] and files["consistency"] == final["consistency"]
    else:
        assert final["n_images"] == 4 and final["n_captions"] == 20 and again["recall"] == final["recall"]
        files = evaluate.main(["--task", "retrieval", "--scores", final["scores_file"]])
        assert files["recall"] == final["recall"]



# Short fine-tuning runs from the demo's pre-trained model (tests/conftest.py, trained_checkpoint) and what
# each must beat: its no-learning baseline plus a margin, half the smallest seen over three seeds (these
# runs from the demo models of seeds 0-2, fine-tuned with --seed S --synthetic-seed S on the 2-core
# machine): VQA 34.7 / 42.6 / 43.1 against 24.7 / 22.9 / 21.5 (most frequent answer; +10.1 at least),
# NLVR2 0.68 / 0.59 / 0.63 against 0.5 (+0.09), retrieval min(TR, IR) R@1 15 / 25 / 18 against chance 5
# (20 images; +10). NLVR2 is not among the tests yet: on the test model (seed 17) the same short run
# reached only 0.52, so this run is too short to tell learning from luck on every model.
VQA_MARGIN, RETRIEVAL_MARGIN = 5.0, 5.0
LEARNING_RUNS = {
    "vqa": ["--synthetic-train", "150", "--synthetic-val", "50", "--epochs", "3", "--warmup_steps", "5"],
    "retrieval": ["--synthetic-train", "100", "--synthetic-val", "20", "--epochs", "2", "--warmup_steps", "5",
                  "--retrieval_negatives", "6", "--retrieval_hard_negatives", "2"],
}


@pytest.mark.parametrize("task", sorted(LEARNING_RUNS))
def test_finetuning_learns_the_task(task, trained_checkpoint, tmp_path):
    """A few dozen steps of finetune.py beat what needs no learning: VQA the accuracy of always giving
    the most frequent answer (finetune.py's prior_baseline, computed here by hand too), retrieval the
    R@1 of a random order (1 / images)."""
    init, _ = trained_checkpoint
    run = str(tmp_path / "run")
    result = finetune.main(["--task", task, "--init", init, "--output-dir", run, "--num_workers", "0", "--seed", "0",
                            "--synthetic-seed", "0"] + LEARNING_RUNS[task])
    final = result["eval"]
    if task == "vqa":
        data = os.path.join(run, "data", "vqa")
        anns = {split: json.load(open(os.path.join(data, f"v2_mscoco_{split}_annotations.json")))["annotations"]
                for split in ("train2014", "val2014")}
        # the most frequent (normalised) answer of train + val, as the answer vocabulary counts them
        counted = [metrics.normalize_vqa_answer(a["multiple_choice_answer"]) for split in anns.values() for a in split]
        top = max(sorted(set(counted)), key=counted.count)
        val = anns["val2014"]
        baseline = 100 * sum(metrics.vqa_question_accuracy(top, q["answers"]) for q in val) / len(val)
        assert final["prior_baseline"] == pytest.approx(baseline, abs=0.01)
        assert final["overall"] > baseline + VQA_MARGIN, (final["overall"], baseline)
    else:  # a score that ignores the pairs ranks the right image (or one of its 5 captions) first by chance
        saved = metrics.load_score_matrix(final["scores_file"])
        n_images = saved.scores.shape[0]
        assert n_images == 20 and saved.scores.shape[1] == 5 * n_images
        chance = 100.0 / n_images  # R@1 of a random order, text and image retrieval alike
        recall = final["recall"]
        assert min(recall["tr_r1"], recall["ir_r1"]) > chance + RETRIEVAL_MARGIN, (recall, chance)


def test_retrieval_head_starts_as_the_itm_classifier(pre_ckpt, ret_ckpt, tokenizer):
    """retrieval_head_from_itm: a pre-training checkpoint's ITM logit becomes the first ranking
    score (same pairs, same numbers); a retrieval checkpoint keeps its own trained head."""
    from pixel_bert.factory import load_checkpoint_weights
    from pixel_bert.saved_model import read_checkpoint
    pre = read_checkpoint(pre_ckpt)
    pre_model = PixelBertForPreTraining(tiny_cfg()).eval()
    load_checkpoint_weights(pre_model, pre["model"], pre_ckpt, verbose=False)
    ret_model = PixelBertForRetrieval(tiny_cfg()).eval()
    load_checkpoint_weights(ret_model, retrieval.itm_as_retrieval_head(pre["model"], log=lambda *_: None),
                            pre_ckpt, verbose=False)
    torch.manual_seed(3)
    images = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    text = tokenizer(["a red circle", "the square is blue", "two shapes"], max_length=16)
    with torch.no_grad():
        itm_logit = pre_model(text.input_ids, text.attention_mask, images)[2]
        score = ret_model(text.input_ids, text.attention_mask, images)
    torch.testing.assert_close(score, itm_logit)
    own = read_checkpoint(ret_ckpt)["model"]
    kept = retrieval.itm_as_retrieval_head({**own, "itm.classifier.weight": torch.zeros(1, 64),
                                            "itm.classifier.bias": torch.zeros(1)}, log=lambda *_: None)
    assert torch.equal(kept["retrieval.score.weight"], own["retrieval.score.weight"])
    assert retrieval.itm_as_retrieval_head(own, log=lambda *_: None) is own  # no ITM head: unchanged


def _real_layout(task, root):
    """Synthetic task files moved into the folder layouts of the real downloads (docs/downstream.md "Real
    data"); returns the data flags a user would pass for them."""
    import shutil
    made = synthetic_tasks.write_task(task, str(root / "gen"), 12, 4, 4, image_size=IMAGE_SIZE)
    if task == "vqa":  # VQA/ holds the json files, COCO/ the image folders
        for folder in ("train2014", "val2014", "test2015"):
            shutil.move(os.path.join(made, folder), root / "COCO" / folder)
        shutil.move(made, root / "VQA")
        return ["--vqa-root", str(root / "VQA"), "--vqa-images", str(root / "COCO")]
    if task == "nlvr2":  # nlvr2/data/*.json and nlvr2/images/{train/<directory>,dev,test1}/
        os.makedirs(root / "nlvr2" / "data")
        for split in ("train", "dev", "test1"):
            shutil.move(os.path.join(made, f"{split}.json"), root / "nlvr2" / "data" / f"{split}.json")
        shutil.move(os.path.join(made, "images"), root / "nlvr2" / "images")
        return ["--nlvr2-root", str(root / "nlvr2" / "data"), "--nlvr2-images", str(root / "nlvr2" / "images")]
    # Flickr30K: dataset_flickr30k.json (no "filepath") and every image in flickr30k-images/
    data = json.load(open(made))
    for image in data["images"]:
        del image["filepath"]
    data["dataset"] = "flickr30k"
    json.dump(data, open(root / "dataset_flickr30k.json", "w"))
    shutil.move(os.path.join(os.path.dirname(made), "images"), root / "flickr30k-images")
    return ["--karpathy-json", str(root / "dataset_flickr30k.json"), "--retrieval-images", str(root / "flickr30k-images")]


@pytest.mark.parametrize("task", ["vqa", "nlvr2", "retrieval"])
def test_finetune_and_evaluate_read_the_real_layouts(task, pre_ckpt, tmp_path):
    flags = _real_layout(task, tmp_path)
    run = str(tmp_path / "run")
    small = ["--max-steps", "2", "--batch_size", "4", "--num_workers", "0", "--epochs", "1", "--warmup_steps", "1"]
    if task == "retrieval":
        small += ["--retrieval_negatives", "6", "--retrieval_hard_negatives", "2"]
    result = finetune.main(["--task", task, "--init", pre_ckpt, "--output-dir", run] + small + flags)
    config = json.load(open(os.path.join(run, "config.json")))
    assert config["synthetic"] is False and not os.path.exists(os.path.join(run, "data"))
    assert config["preset"] == {"vqa": "vqa", "nlvr2": "nlvr2", "retrieval": "retrieval-f30k"}[task]
    test_split = {"vqa": "test-dev2015", "nlvr2": "test1", "retrieval": "test"}[task]
    scored = evaluate.main(["--task", task, "--checkpoint", os.path.join(run, "model.pt"), "--split", test_split,
                            "--output-dir", str(tmp_path / "eval"), "--num-workers", "0"] + flags)
    if task == "vqa":
        assert result["eval"]["n_questions"] == 12
        assert {r["question_id"] for r in json.load(open(scored["predictions_file"]))} == {
            q["question_id"] for q in json.load(open(tmp_path / "VQA" / "v2_OpenEnded_mscoco_test-dev2015_questions.json"))["questions"]}
    elif task == "nlvr2":
        assert result["eval"]["n"] == 16 and scored["n"] == 16
    else:
        assert result["eval"]["n_images"] == 4 and scored["n_images"] == 4 and scored["n_captions"] == 20


def test_finetune_refuses_to_evaluate_on_a_test_split(pre_ckpt, tmp_path):
    with pytest.raises(ValueError, match="test split"):
        finetune.main(["--task", "nlvr2", "--init", pre_ckpt, "--output-dir", str(tmp_path), "--eval-split", "test1"])


def test_evaluate_scores_files_without_a_model(tmp_path):
    scores = np.full((3, 6), -1.0, dtype=np.float32)
    caption_image = np.array([0, 0, 1, 1, 2, 2])
    scores[caption_image, np.arange(6)] = 1.0
    scores[2, 4] = -2.0  # caption 4 now ranks its image last, but image 2's other caption still ranks first
    path = metrics.save_score_matrix(str(tmp_path / "s.npz"), scores, [1, 2, 3], list(range(6)), caption_image)
    result = evaluate.main(["--task", "retrieval", "--scores", path])
    assert result["recall"]["tr_r1"] == 100.0 and result["recall"]["ir_r1"] == pytest.approx(500 / 6)
    anns = [_vqa_annotation(1, 1, ["red"] * 10), _vqa_annotation(2, 1, ["blue"] * 2 + ["x"] * 8)]
    json.dump(dict(annotations=anns), open(tmp_path / "a.json", "w"))
    json.dump([dict(question_id=1, answer="red"), dict(question_id=2, answer="blue")], open(tmp_path / "p.json", "w"))
    result = evaluate.main(["--task", "vqa", "--predictions", str(tmp_path / "p.json"),
                            "--annotations", str(tmp_path / "a.json")])
    assert result["overall"] == 80.0  # (100 + 60) / 2
    with pytest.raises(SystemExit, match="--annotations"):
        evaluate.main(["--task", "vqa", "--predictions", str(tmp_path / "p.json")])


def test_compiled_evaluation_gives_the_same_metrics(ret_ckpt, retrieval_json, tmp_path, monkeypatch):
    """evaluate.py --compile runs the torch.compile wrapper itself (not the module inside it) and
    reports what the plain model reports. The "eager" backend keeps the test quick."""
    real_compile, calls, wrapper_forwards = torch.compile, [], []

    def eager_compile(model, **kwargs):
        compiled = real_compile(model, backend="eager", **kwargs)
        calls.append(compiled)
        # a hook on the wrapper runs only when the wrapper itself is called, not the module inside
        compiled.register_forward_pre_hook(lambda *_: wrapper_forwards.append(1))
        return compiled
    monkeypatch.setattr(torch, "compile", eager_compile)
    common = ["--task", "retrieval", "--checkpoint", ret_ckpt, "--karpathy-json", retrieval_json,
              "--split", "test", "--pairs-per-batch", "16", "--batch-size", "2", "--num-workers", "0"]
    plain = evaluate.main(common + ["--output-dir", str(tmp_path / "plain")])
    compiled = evaluate.main(common + ["--output-dir", str(tmp_path / "compiled"), "--compile"])
    assert len(calls) == 1 and wrapper_forwards and compiled["recall"] == plain["recall"]
    a = metrics.load_score_matrix(str(tmp_path / "plain" / "retrieval_test_scores.npz"))
    b = metrics.load_score_matrix(str(tmp_path / "compiled" / "retrieval_test_scores.npz"))
    assert np.allclose(a.scores, b.scores, atol=1e-5)
