"""NLVR2 fine-tuning and evaluation (Sec. 4.2 of the paper; docs/paper.md).

Each example is a sentence, two images and a True/False label. Sec. 4.2: each (image, sentence)
pair goes through the model on its own, the two [CLS] outputs are concatenated into a
true/false classifier (heads.PixelBertForNLVR2), trained with cross-entropy.

Files as distributed (see docs/paper.md): JSON lines ``{split}.json`` (train.json, dev.json, test1.json),
one object a line with ``identifier`` ("split-setid-pairid-sentid"), ``sentence``, ``label``
("True"/"False") and, in train only, ``directory``; the images of example
``train-10171-0-0`` are ``{image_root}/train/{directory}/train-10171-0-img0.png`` (left) and
``-img1.png`` (right); dev and test1 images sit directly under ``{image_root}/dev/`` and
``{image_root}/test1/``. The image name is the identifier without its sentence id.

Predictions file (what evaluate.py --predictions reads and what this module writes): CSV lines
``identifier,True`` / ``identifier,False``, one per example, no header, as the lil-lab/nlvr
evaluation script reads them. Metrics: accuracy and consistency (metrics.nlvr2_metrics).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import metrics
from .annotations import AnnotationError
from .bad_samples import BadSample, BadSampleError, drop_bad_samples
from .distributed import DistInfo
from .downstream import DownstreamTask, EvalSettings, predict_sharded, require_flags
from .files import write_text
from .images import ImageLoadError, ImageTransform, pad_images
from .runs import TrainingData


class NLVR2Example(NamedTuple):
    identifier: str
    sentence: str
    label: Optional[bool]  # None when the file has no labels
    left_path: str
    right_path: str


def _label(value: Any, where: str) -> bool:
    try:
        return metrics.parse_nlvr2_label(value, f"{where}: label")
    except ValueError as e:
        raise AnnotationError(str(e)) from None


def nlvr2_image_paths(image_root: str, identifier: str, directory: Optional[Any] = None):
    """(left, right) image paths of an example (module docstring). The split folder is the first
    part of the identifier: ``train``, ``dev``, ``test1``."""
    parts = identifier.split("-")
    if len(parts) != 4:
        raise AnnotationError(f"NLVR2 identifier {identifier!r} is not 'split-setid-pairid-sentid'")
    stem = "-".join(parts[:3])
    folder = os.path.join(image_root, parts[0], str(directory)) if directory is not None \
        else os.path.join(image_root, parts[0])
    return os.path.join(folder, f"{stem}-img0.png"), os.path.join(folder, f"{stem}-img1.png")


def read_nlvr2(jsonl_path: str, image_root: str, max_examples: Optional[int] = None,
               require_labels: Optional[str] = None) -> List[NLVR2Example]:
    """Examples of an NLVR2 JSON-lines file (module docstring), in file order. A file is labelled on
    every line or on none (a hidden test set): some lines without a label are refused, naming the
    first. ``require_labels`` (why every line needs one, said in the error) refuses a file with none."""
    if not os.path.isfile(jsonl_path):
        raise FileNotFoundError(
            f"{jsonl_path}: NLVR2 file not found. --nlvr2-root must hold the official train.json / dev.json / "
            "test1.json (JSON lines) or use `python -m pixel_bert.synthetic_tasks --task nlvr2 --out DIR`")
    examples, first_line, unlabelled = [], {}, []
    for line_no, line in _numbered_lines(jsonl_path):
        where = f"{jsonl_path}: line {line_no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise AnnotationError(f"{where}: not valid JSON ({e}); the file must hold one JSON object a line")
        if not isinstance(obj, dict) or not isinstance(obj.get("identifier"), str) \
                or not isinstance(obj.get("sentence"), str):
            raise AnnotationError(f"{where}: expected an object with string 'identifier' and 'sentence'")
        identifier = obj["identifier"]
        if identifier in first_line:
            raise AnnotationError(f"{where}: identifier {identifier!r} is on line {first_line[identifier]} too")
        first_line[identifier] = line_no
        label = _label(obj["label"], where) if "label" in obj else None
        if label is None:
            unlabelled.append(line_no)
        try:
            left, right = nlvr2_image_paths(image_root, identifier, obj.get("directory"))
        except AnnotationError as e:
            raise AnnotationError(f"{where}: {e}") from None
        examples.append(NLVR2Example(identifier, obj["sentence"], label, left, right))
        if max_examples is not None and len(examples) >= max_examples:
            break
    if not examples:
        raise AnnotationError(f"{jsonl_path}: no examples")
    if unlabelled and (require_labels or len(unlabelled) < len(examples)):
        why = require_labels or "a file is labelled on every line or, a hidden test set, on none"
        raise AnnotationError(f"{jsonl_path}: line {unlabelled[0]} has no 'label' ({len(unlabelled)} of the "
                              f"{len(examples)} lines read have none); {why}")
    return examples


def _numbered_lines(path: str):
    """(line number, line) of the non-blank lines of a UTF-8 text file; other bytes raise AnnotationError."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise AnnotationError(f"{path}: line {line_no} is not UTF-8 text ({e})") from None
            if line.strip():
                yield line_no, line


class NLVR2Dataset(torch.utils.data.Dataset):
    """Items ``dict(left, right, sentence, label, identifier)``; a `pixel_bert.bad_samples.BadSample` naming
    the first bad image of the pair when one is missing or unreadable, or the example when its sentence
    is empty, as pre-training's empty captions (unless ``fatal_bad_samples``)."""

    def __init__(self, examples: Sequence[NLVR2Example], transform, fatal_bad_samples: bool = False):
        self.examples, self.transform, self.fatal_bad_samples = list(examples), transform, fatal_bad_samples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int):
        ex = self.examples[index]
        if not ex.sentence.strip():
            message = f"example {ex.identifier} (image {ex.left_path}) has an empty sentence; fix or drop it"
            if self.fatal_bad_samples:
                raise BadSampleError(message + " (fatal_bad_samples=True; set it False to skip bad samples)")
            return BadSample(ex.left_path, "empty_text", message)
        try:
            left, right = self.transform.load(ex.left_path), self.transform.load(ex.right_path)
        except ImageLoadError as err:
            if self.fatal_bad_samples:
                raise
            return BadSample.from_error(err)
        return dict(left=left, right=right, sentence=ex.sentence,
                    label=-1 if ex.label is None else int(ex.label), identifier=ex.identifier)


class NLVR2Collator:
    """Pads the left and the right images separately (the model pads them to a common size)."""

    def __init__(self, tokenizer, max_text_len: int, size_divisor: int = 1):
        self.tokenizer, self.max_text_len, self.size_divisor = tokenizer, max_text_len, size_divisor

    def __call__(self, samples):
        good, bad = drop_bad_samples(samples)
        if not good:
            return dict(input_ids=torch.zeros((0, 0), dtype=torch.long), num_samples=0, identifiers=[], **bad)
        left, left_mask = pad_images([s["left"] for s in good], self.size_divisor)
        right, right_mask = pad_images([s["right"] for s in good], self.size_divisor)
        text = self.tokenizer([s["sentence"] for s in good], max_length=self.max_text_len)
        return dict(images_left=left, pixel_mask_left=left_mask, images_right=right, pixel_mask_right=right_mask,
                    input_ids=text.input_ids, attention_mask=text.attention_mask,
                    labels=torch.tensor([s["label"] for s in good]),
                    identifiers=[s["identifier"] for s in good], num_samples=len(good), **bad)


def _forward(model, batch, device):
    return model(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                 batch["images_left"].to(device, non_blocking=True), batch["pixel_mask_left"].to(device),
                 batch["images_right"].to(device, non_blocking=True), batch["pixel_mask_right"].to(device))


def nlvr2_step(model, batch: dict, device) -> Dict[str, torch.Tensor]:
    """One micro-batch: cross-entropy over (false, true) (Sec. 4.2), and the batch accuracy."""
    labels = batch["labels"].to(device)
    if (labels < 0).any():
        raise ValueError("NLVR2 training data without labels: train on train.json, not on test files")
    logits = _forward(model, batch, device)
    loss = F.cross_entropy(logits.float(), labels)
    return dict(loss=loss, acc=(logits.argmax(1) == labels).float().mean().detach())


def predict_nlvr2(model, dataset: NLVR2Dataset, collate: NLVR2Collator, info: DistInfo,
                  batch_size: int = 64, num_workers: int = 0,
                  max_bad_fraction: float = 0.0) -> Tuple[Dict[str, bool], int]:
    """({identifier: prediction} for every example, how many were bad samples) on rank 0
    (`predict_sharded`; ``({}, 0)`` elsewhere). More than ``max_bad_fraction`` examples whose images
    fail to load stop the evaluation; those allowed are predicted False (so scored, not dropped)."""
    def predict_batch(model, batch, device):
        return dict(zip(batch["identifiers"], (_forward(model, batch, device).float().argmax(1) == 1).tolist()))

    merged = predict_sharded(model, dataset, collate, info, predict_batch, batch_size, num_workers,
                             "examples", "nlvr2 eval: ", max_bad_fraction)
    if merged is None:
        return {}, 0
    blind = [ex.identifier for ex in dataset.examples if ex.identifier not in merged]  # images that failed
    merged.update((ident, False) for ident in blind)
    return merged, len(blind)


def score_nlvr2(predictions: Dict[str, bool], examples: Sequence[NLVR2Example]) -> Dict[str, Any]:
    labels = {ex.identifier: ex.label for ex in examples}
    if any(v is None for v in labels.values()):
        raise ValueError("these NLVR2 examples have no labels; only predictions can be written")
    return metrics.nlvr2_metrics(predictions, labels)


def write_predictions(path: str, predictions: Dict[str, bool]) -> str:
    """CSV ``identifier,True|False`` lines (module docstring), sorted by identifier."""
    return write_text(path, "".join(f"{ident},{bool(predictions[ident])}\n" for ident in sorted(predictions)))


def read_predictions(path: str) -> Dict[str, bool]:
    """Read a predictions CSV (``identifier,True|False`` a line); JSON lines with ``identifier`` and
    ``prediction`` (or ``label``) are accepted too."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: NLVR2 predictions file not found")
    out: Dict[str, bool] = {}
    for line_no, line in _numbered_lines(path):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise AnnotationError(f"{path}: line {line_no} is not valid JSON ({e}); expected "
                                      '{"identifier": ..., "prediction": true|false} or identifier,True') from None
            ident, value = obj.get("identifier"), obj.get("prediction", obj.get("label"))
        else:
            ident, _, value = line.partition(",")
        if not isinstance(ident, str) or not ident or value is None \
                or str(value).strip().lower() not in ("true", "false"):
            raise AnnotationError(f"{path}: line {line_no} is {line!r:.80}; expected 'identifier,True' or "
                                  "'identifier,False' (the lil-lab NLVR2 predictions format)")
        if ident in out:
            raise AnnotationError(f"{path}: identifier {ident!r} predicted twice (line {line_no})")
        out[ident] = str(value).strip().lower() == "true"
    return out


# -------------------------------------------------------------------------------------------------
#                             The task, as finetune.py and evaluate.py run it
# -------------------------------------------------------------------------------------------------

def default_image_root(root: str) -> str:
    """``<root>/images`` when that folder exists, else the ``images`` folder beside ``root``: the
    layout of NLVR2's own repository (nlvr2/data/*.json next to nlvr2/images/)."""
    inside = os.path.join(root, "images")
    beside = os.path.join(os.path.dirname(os.path.normpath(root)), "images")
    return beside if not os.path.isdir(inside) and os.path.isdir(beside) else inside


class NLVR2(DownstreamTask):
    """NLVR2 (Sec. 4.2): each (image, sentence) pair on its own, the two [CLS] outputs concatenated
    into a true/false classifier; accuracy and consistency."""
    name = "nlvr2"
    data_flags = ("nlvr2_root", "nlvr2_images")
    presets = {"nlvr2": dict(epochs=18, decay_epochs=(12, 16), batch_size=8)}  # 128 over 16 GPUs [paper]
    # the paper's lr: the higher lr of the other demos collapses this one to chance (docs/demo.md)
    demo_overrides = dict(epochs=4, decay_epochs=(3,), batch_size=16, lr=1e-4, cnn_lr=0.02, warmup_steps=30)
    synthetic_sizes = (400, 100, 25)  # sentences, each with 4 image pairs
    val_split = default_split = "dev"

    def add_data_arguments(self, group) -> None:
        group.add_argument("--nlvr2-root", help="folder with the NLVR2 JSON-lines files train.json, dev.json, test1.json")
        group.add_argument("--nlvr2-images", help="NLVR2 image root holding train/<directory>/, dev/, test1/ "
                           "(default: <nlvr2-root>/images, else the images/ folder beside <nlvr2-root>)")

    def image_root(self, args) -> str:
        return args.nlvr2_images or default_image_root(args.nlvr2_root)

    def training_data(self, args, task_cfg, model_cfg, train_cfg, tokenizer, device, out_dir, log) -> TrainingData:
        examples = read_nlvr2(os.path.join(args.nlvr2_root, "train.json"), self.image_root(args),
                              require_labels="training needs the label of every example: train on train.json, "
                              "not on an unlabelled test file")
        dataset = NLVR2Dataset(examples, ImageTransform.from_config(model_cfg), train_cfg.fatal_bad_samples)
        log(f"nlvr2: {len(dataset)} training examples")
        collate = NLVR2Collator(tokenizer, model_cfg.max_text_len, model_cfg.feature_stride)
        # two images per example: no aspect-ratio grouping
        return TrainingData(dataset, collate, lambda model, batch, _: nlvr2_step(model, batch, device), None, {})

    def read_evaluation_split(self, args, split: str, max_examples: Optional[int] = None,
                              require_labels: Optional[str] = None) -> List[NLVR2Example]:
        """``split`` as the evaluation reads it: `read_nlvr2`, and no empty sentence. An evaluation
        predicts every example, so an empty one is refused here, while training skips and counts it."""
        require_flags(args, "--nlvr2-root")
        path = os.path.join(args.nlvr2_root, f"{split}.json")
        examples = read_nlvr2(path, self.image_root(args), max_examples, require_labels)
        empty = [ex.identifier for ex in examples if not ex.sentence.strip()]
        if empty:
            raise AnnotationError(f"{path}: example {empty[0]} has an empty sentence ({len(empty)} of "
                                  f"{len(examples)} have): an evaluation predicts every example, so it takes no "
                                  "empty one")
        return examples

    def check_evaluation_files(self, args, split: str) -> None:
        self.read_evaluation_split(args, split, require_labels=(
            f"finetune.py scores its evaluation of {split}, so every line needs its label. Train with --no-eval "
            f"to skip it; evaluate.py --task nlvr2 --split {split} predicts an unlabelled file"))

    def evaluate(self, model, tokenizer, args, split, info, out_dir, answers, settings: EvalSettings,
                 log) -> Dict[str, Any]:
        cfg = model.config
        examples = self.read_evaluation_split(args, split, settings.max_examples)
        dataset = NLVR2Dataset(examples, ImageTransform.from_config(cfg))
        collate = NLVR2Collator(tokenizer, cfg.max_text_len, cfg.feature_stride)
        preds, n_blind = predict_nlvr2(model, dataset, collate, info, settings.batch_size, settings.num_workers,
                                       settings.max_bad_fraction)
        if not info.is_main:
            return {}
        result: Dict[str, Any] = {"predictions_file": write_predictions(
            os.path.join(out_dir, f"nlvr2_{split}_predictions.csv"), preds), "n": len(preds),
            "n_bad_samples": n_blind}
        blind = f", {n_blind} of them predicted False without their images (unreadable)" if n_blind else ""
        if examples[0].label is not None:  # read_nlvr2: labelled on every line or on none
            result.update(score_nlvr2(preds, examples))
            majority = sum(ex.label for ex in examples) >= len(examples) / 2
            result["majority_baseline"] = score_nlvr2({e.identifier: majority for e in examples},
                                                      examples)["accuracy"]
            log(f"nlvr2 {split}: accuracy {result['accuracy']:.4f} consistency {result['consistency']:.4f} on "
                f"{result['n']} examples{blind} (majority-class baseline {result['majority_baseline']:.4f})")
        else:
            log(f"nlvr2 {split}: the file has no labels, so no accuracy: {len(preds)} examples predicted{blind}")
        log(f"nlvr2 {split}: wrote {result['predictions_file']}")
        return result
