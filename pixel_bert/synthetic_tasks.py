"""Synthetic VQA, NLVR2 and retrieval data on the shapes world (pixel_bert.synthetic), written in
the OFFICIAL file formats of docs/paper.md#data-formats, so that the real loaders (pixel_bert.vqa,
pixel_bert.nlvr2, pixel_bert.retrieval) read them and finetune.py / evaluate.py run end to end on
a CPU in minutes.

    python -m pixel_bert.synthetic_tasks --out DIR --task vqa        # DIR/vqa/...
    python -m pixel_bert.synthetic_tasks --out DIR --task nlvr2      # DIR/nlvr2/...
    python -m pixel_bert.synthetic_tasks --out DIR --task retrieval  # DIR/retrieval/...

* **VQA 2.0**: ``v2_OpenEnded_mscoco_{split}_questions.json``, ``v2_mscoco_{split}_annotations.json``
  (train2014, val2014; test-dev2015 has questions only, as the real one) and JPEG images
  ``{train2014,val2014,test2015}/COCO_{dir}_{image_id:012d}.jpg``. Questions: "what colour is the
  circle ?" (answer type other), "which shape is red ?" (other), "how many shapes are there ?"
  (number, answered with digits as VQA annotators mostly do), "is there a red square ?" and "is
  the red shape above the blue shape ?" (yes/no, half of them yes). Each question gets 10 human
  answers; each is, with probability ``answer_noise``, replaced by a wrong answer of the same type
  (annotator disagreement), so the soft scores 0.3/0.6/0.9/1 all occur.
* **NLVR2**: JSON lines ``train.json`` / ``dev.json`` / ``test1.json`` with identifier
  ``split-setid-pairid-sentid``, sentence, label "True"/"False" (and ``directory`` in train);
  PNG images ``images/train/{directory}/{split-setid-pairid}-img0.png`` / ``-img1.png``,
  ``images/dev/...``, ``images/test1/...``. Each sentence ("both images contain a red circle",
  "the left image has more shapes than the right image", ...) is paired with several image pairs,
  half true and half false, so consistency is meaningful.
* **Retrieval**: Karpathy format ``dataset_synthetic.json`` (images with split train/val/test,
  sentids, 5 sentences each with raw/tokens/imgid/sentid) and ``images/{imgid:06d}.png``.
  The first caption of an image lists all its shapes; the others are random caption templates.

Every word is in the synthetic vocabulary (synthetic.SYNTHETIC_WORDS), so the tiny model reads
every sentence without [UNK]. Everything is a pure function of the seed.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from . import synthetic
from .cli import add_debug_argument, int_at_least, run_cli
from .files import write_json, write_text
from .synthetic import (COLOURS, KINDS, RELATIONS, Scene, make_caption, make_scene, relations, render,
                        rng_stream)

# Random streams of synthetic.rng_stream: 0 = scene, 1 = pre-training captions; the tasks use 2+.
_VQA_STREAM, _NLVR2_STREAM, _RETRIEVAL_STREAM = 2, 3, 4


def _check_words(texts: Sequence[str]):
    """Every word of ``texts`` must be in the synthetic vocabulary (a template bug otherwise)."""
    vocab = set(synthetic.SYNTHETIC_WORDS)
    unknown = sorted({w for t in texts for w in t.replace(",", " , ").replace(":", " : ").split()} - vocab)
    if unknown:
        raise AssertionError(f"words outside the synthetic vocabulary: {unknown}")


# -------------------------------------------------------------------------------------------------
#                                            VQA
# -------------------------------------------------------------------------------------------------

VQA_SPLITS = (("train2014", "train2014"), ("val2014", "val2014"), ("test-dev2015", "test2015"))
COUNT_ANSWERS = tuple(str(n) for n in range(1, synthetic.MAX_SHAPES + 1))


def vqa_question(scene: Scene, rng: np.random.Generator) -> Tuple[str, str, str, str, Tuple[str, ...]]:
    """(question, answer, question_type, answer_type, wrong answers of the same type) about ``scene``."""
    kinds = ["colour", "kind", "count", "exists"] + (["relation"] if len(scene.shapes) >= 2 else [])
    kind = kinds[int(rng.integers(len(kinds)))]
    shape = scene.shapes[int(rng.integers(len(scene.shapes)))]
    if kind == "colour":
        return (f"what colour is the {shape.kind} ?", shape.colour, "what color is the", "other",
                tuple(c for c in COLOURS if c != shape.colour))
    if kind == "kind":
        return (f"which shape is {shape.colour} ?", shape.kind, "which", "other",
                tuple(k for k in KINDS if k != shape.kind))
    if kind == "count":
        n = str(len(scene.shapes))
        return "how many shapes are there ?", n, "how many", "number", tuple(a for a in COUNT_ANSWERS if a != n)
    if kind == "exists":
        if rng.integers(2):  # yes: a shape of the scene
            colour, k, answer = shape.colour, shape.kind, "yes"
        else:  # no: a colour/kind pair absent from the scene (often one of the two is present)
            absent = [(c, k) for c in COLOURS for k in KINDS if scene.find(c, k) is None]
            colour, k = absent[int(rng.integers(len(absent)))]
            answer = "no"
        return f"is there a {colour} {k} ?", answer, "is there a", "yes/no", ("no",) if answer == "yes" else ("yes",)
    i, j = rng.choice(len(scene.shapes), size=2, replace=False)
    a, b = scene.shapes[int(i)], scene.shapes[int(j)]
    true = relations(a, b)
    if rng.integers(2):
        rel, answer = true[int(rng.integers(len(true)))], "yes"
    else:
        false = [r for r in RELATIONS if r not in true]
        rel, answer = false[int(rng.integers(len(false)))], "no"
    return (f"is the {a.colour} shape {rel} the {b.colour} shape ?", answer, "is the", "yes/no",
            ("no",) if answer == "yes" else ("yes",))


def human_answers(answer: str, wrong: Sequence[str], noise: float, rng: np.random.Generator) -> List[str]:
    """10 annotator answers: ``answer``, each replaced with probability ``noise`` by a wrong one."""
    flip = rng.random(10) < noise
    picks = rng.integers(len(wrong), size=10)
    return [wrong[int(p)] if f else answer for f, p in zip(flip, picks)]


def write_vqa(out_dir: str, n_train: int = 2000, n_val: int = 300, n_test: int = 100, seed: int = 0,
              image_size: int = 96, questions_per_image: int = 3, answer_noise: float = 0.1) -> str:
    """Write the synthetic VQA 2.0 copy under ``out_dir`` (module docstring); returns ``out_dir``.
    Split k uses world seed ``seed + k``: no image is shared between splits."""
    os.makedirs(out_dir, exist_ok=True)
    for k, ((split, image_dir), n) in enumerate(zip(VQA_SPLITS, (n_train, n_val, n_test))):
        world = seed + k
        os.makedirs(os.path.join(out_dir, image_dir), exist_ok=True)
        questions, annotations = [], []
        for image_id in range(n):
            scene = synthetic.scene_for(world, image_id, image_size)
            render(scene).save(os.path.join(out_dir, image_dir, f"COCO_{image_dir}_{image_id:012d}.jpg"), quality=95)
            for q in range(questions_per_image):
                rng = rng_stream(world, image_id, _VQA_STREAM, q)
                text, answer, qtype, atype, wrong = vqa_question(scene, rng)
                qid = image_id * 100 + q
                questions.append(dict(image_id=image_id, question=text, question_id=qid))
                answers = human_answers(answer, wrong, answer_noise, rng)
                majority = Counter(answers).most_common(1)[0][0]
                annotations.append(dict(question_id=qid, image_id=image_id, question_type=qtype, answer_type=atype,
                                        multiple_choice_answer=majority,
                                        answers=[dict(answer=a, answer_confidence="yes", answer_id=i + 1)
                                                 for i, a in enumerate(answers)]))
        _check_words([q["question"] for q in questions])
        info = dict(description=f"pixel_bert synthetic VQA, seed {world}", version="2.0")
        common = dict(info=info, task_type="Open-Ended", data_type="mscoco", license={}, data_subtype=split)
        write_json(os.path.join(out_dir, f"v2_OpenEnded_mscoco_{split}_questions.json"),
                   dict(common, questions=questions), indent=None)
        if not split.startswith("test"):  # the real test splits have no public annotations
            write_json(os.path.join(out_dir, f"v2_mscoco_{split}_annotations.json"),
                       dict(common, annotations=annotations), indent=None)
    return out_dir


# -------------------------------------------------------------------------------------------------
#                                           NLVR2
# -------------------------------------------------------------------------------------------------

ScenePred = Callable[[Scene], bool]


def _has(colour: Optional[str], kind: Optional[str]) -> ScenePred:
    return lambda s: s.find(colour, kind) is not None


def nlvr2_statement(rng: np.random.Generator):
    """A statement and its truth as per-image requirements: (sentence, kind, args). ``kind`` is
    "both" (true iff both images satisfy pred), "left"/"right" (one image), or "compare"."""
    c, k = list(COLOURS)[int(rng.integers(len(COLOURS)))], KINDS[int(rng.integers(len(KINDS)))]
    t = int(rng.integers(7))
    if t == 0:
        return f"both images contain a {c} {k}", "both", _has(c, k)
    if t == 1:
        return f"each image contains a {k}", "both", _has(None, k)
    if t == 2:
        return f"there is a {c} shape in each image", "both", _has(c, None)
    if t == 3:
        side = ("left", "right")[int(rng.integers(2))]
        return f"the {side} image contains a {c} {k}", side, _has(c, k)
    if t == 4:
        side = ("left", "right")[int(rng.integers(2))]
        return f"there is a {c} shape in the {side} image", side, _has(c, None)
    if t == 5:
        return "the left image has more shapes than the right image", "compare", (lambda a, b: a > b)
    return "the left image has fewer shapes than the right image", "compare", (lambda a, b: a < b)


def _sample_scene(rng: np.random.Generator, size: int, pred: Optional[ScenePred], want: bool,
                  tries: int = 500) -> Scene:
    """A random scene for which ``pred`` is ``want`` (rejection sampling; pred None: any scene)."""
    for _ in range(tries):
        scene = make_scene(rng, size)
        if pred is None or pred(scene) == want:
            return scene
    raise RuntimeError("could not sample a scene satisfying the statement; this is a generator bug")


def nlvr2_pair(rng: np.random.Generator, size: int, kind: str, pred, label: bool) -> Tuple[Scene, Scene]:
    """Two scenes making the statement ``label``."""
    if kind == "both":
        if label:
            return _sample_scene(rng, size, pred, True), _sample_scene(rng, size, pred, True)
        left_ok, right_ok = [(True, False), (False, True), (False, False)][int(rng.integers(3))]
        return _sample_scene(rng, size, pred, left_ok), _sample_scene(rng, size, pred, right_ok)
    if kind in ("left", "right"):
        one, other = _sample_scene(rng, size, pred, label), _sample_scene(rng, size, None, True)
        return (one, other) if kind == "left" else (other, one)
    for _ in range(500):
        a, b = make_scene(rng, size), make_scene(rng, size)
        if pred(len(a.shapes), len(b.shapes)) == label:
            return a, b
    raise RuntimeError("could not sample a scene pair for a comparison statement")


NLVR2_SPLITS = (("train", "train"), ("dev", "dev"), ("test1", "test1"))


def write_nlvr2(out_dir: str, n_train: int = 600, n_dev: int = 100, n_test: int = 50, seed: int = 0,
                image_size: int = 96, pairs_per_sentence: int = 4) -> str:
    """Write the synthetic NLVR2 copy under ``out_dir`` (``n_*`` sentences per split, each with
    ``pairs_per_sentence`` image pairs, half of them true); returns ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    for k, ((split, folder), n) in enumerate(zip(NLVR2_SPLITS, (n_train, n_dev, n_test))):
        world = seed + 10 + k
        lines = []
        for setid in range(n):
            rng = rng_stream(world, setid, _NLVR2_STREAM)
            sentence, kind, pred = nlvr2_statement(rng)
            labels = rng.permutation([p % 2 == 0 for p in range(pairs_per_sentence)])
            directory = setid % 100 if split == "train" else None
            image_dir = os.path.join(out_dir, "images", folder, *([str(directory)] if directory is not None else []))
            os.makedirs(image_dir, exist_ok=True)
            for pairid, label in enumerate(labels):
                left, right = nlvr2_pair(rng, image_size, kind, pred, bool(label))
                stem = f"{split}-{setid}-{pairid}"
                render(left).save(os.path.join(image_dir, f"{stem}-img0.png"))
                render(right).save(os.path.join(image_dir, f"{stem}-img1.png"))
                entry = dict(identifier=f"{stem}-0", sentence=sentence, label=str(bool(label)))
                if directory is not None:
                    entry["directory"] = directory
                lines.append(entry)
        _check_words([e["sentence"] for e in lines])
        write_text(os.path.join(out_dir, f"{split}.json"), "".join(json.dumps(e) + "\n" for e in lines))
    return out_dir


# -------------------------------------------------------------------------------------------------
#                                         Retrieval
# -------------------------------------------------------------------------------------------------

def write_retrieval(out_dir: str, n_train: int = 1500, n_val: int = 100, n_test: int = 100, seed: int = 0,
                    image_size: int = 96, captions_per_image: int = 5) -> str:
    """Write ``out_dir/dataset_synthetic.json`` (Karpathy format) and ``out_dir/images/``; returns
    the json path. Images 0..n_train-1 are train, then val, then test."""
    image_dir = os.path.join(out_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    images, sentid = [], 0
    for imgid, split in enumerate(splits):
        scene = synthetic.scene_for(seed + 20, imgid, image_size)
        filename = f"{imgid:06d}.png"
        render(scene).save(os.path.join(image_dir, filename))
        sentences = []
        for j in range(captions_per_image):
            # The first caption lists the whole scene (the most specific); the others are random.
            raw = make_caption(scene, rng_stream(seed + 20, imgid, _RETRIEVAL_STREAM, j), "list" if j == 0 else None)
            tokens = raw.replace(",", " ,").replace(":", " :").split()
            sentences.append(dict(tokens=tokens, raw=raw, imgid=imgid, sentid=sentid))
            sentid += 1
        images.append(dict(filepath="images", filename=filename, imgid=imgid, split=split,
                           sentids=[s["sentid"] for s in sentences], sentences=sentences))
    _check_words([s["raw"] for im in images for s in im["sentences"]])
    path = os.path.join(out_dir, "dataset_synthetic.json")
    return write_json(path, dict(images=images, dataset="synthetic"), indent=None)


# -------------------------------------------------------------------------------------------------
#                                            CLI
# -------------------------------------------------------------------------------------------------

DEFAULT_SIZES = {"vqa": (2000, 300, 100), "nlvr2": (600, 100, 50), "retrieval": (1500, 100, 100)}


def task_location(task: str, out_dir: str) -> str:
    """Where `write_task` puts a task's data, as its loader takes it: the VQA root, the NLVR2 root, or
    the Karpathy json path."""
    root = os.path.join(out_dir, task)
    return os.path.join(root, "dataset_synthetic.json") if task == "retrieval" else root


def write_task(task: str, out_dir: str, n_train: Optional[int] = None, n_val: Optional[int] = None,
               n_test: Optional[int] = None, seed: int = 0, image_size: int = 96, **kwargs) -> str:
    """Write one task's data under ``out_dir/{task}``; returns `task_location`."""
    d = DEFAULT_SIZES[task]
    sizes = [d[i] if v is None else v for i, v in enumerate((n_train, n_val, n_test))]
    writer = {"vqa": write_vqa, "nlvr2": write_nlvr2, "retrieval": write_retrieval}[task]
    return writer(os.path.join(out_dir, task), *sizes, seed=seed, image_size=image_size, **kwargs)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pixel_bert.synthetic_tasks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder; the task's files go to OUT/<task>/")
    p.add_argument("--task", required=True, choices=["vqa", "nlvr2", "retrieval", "all"],
                   help="which task's data to write (all: the three)")
    p.add_argument("--train", type=int_at_least(1), default=None, help="training size: images (vqa, retrieval) or "
                   "sentences (nlvr2); default vqa 2000, nlvr2 600, retrieval 1500")
    p.add_argument("--val", type=int_at_least(1), default=None, help="val/dev size, same units; default 300 / 100 / 100")
    p.add_argument("--test", type=int_at_least(1), default=None, help="test size (VQA test-dev, NLVR2 test1, Karpathy test), "
                   "same units; default 100 / 50 / 100")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="world seed: same seed, same files (default 0)")
    p.add_argument("--image-size", type=int_at_least(16), default=96, help="image side in pixels (default 96)")
    p.add_argument("--questions-per-image", type=int_at_least(1), default=3, help="VQA questions per image (default 3)")
    p.add_argument("--answer-noise", type=float, default=0.1, help="VQA: probability that an annotator's answer "
                   "is replaced by a wrong one (default 0.1)")
    p.add_argument("--pairs-per-sentence", type=int_at_least(2), default=4, help="NLVR2 image pairs per sentence, half "
                   "true (default 4)")
    p.add_argument("--captions-per-image", type=int_at_least(1), default=5, help="retrieval captions per image (default 5)")
    add_debug_argument(p)
    return p


def main(argv: Optional[Sequence[str]] = None):
    args = get_args_parser().parse_args(argv)
    extra = {"vqa": dict(questions_per_image=args.questions_per_image, answer_noise=args.answer_noise),
             "nlvr2": dict(pairs_per_sentence=args.pairs_per_sentence),
             "retrieval": dict(captions_per_image=args.captions_per_image)}
    for task in (["vqa", "nlvr2", "retrieval"] if args.task == "all" else [args.task]):
        path = write_task(task, args.out, args.train, args.val, args.test, args.seed, args.image_size, **extra[task])
        print(f"{task}: wrote {path}")


if __name__ == "__main__":
    run_cli(main)
