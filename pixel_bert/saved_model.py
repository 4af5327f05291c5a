"""pixel-bert's own saved models: a ``model.pt`` (read with weights_only=True) or a model folder
(config.json, model.safetensors, vocab.txt, answers.json: no pickle at all).

    load_saved_model    the one way back: the model with its tokenizer and answers, every part checked
                        (the predictor, evaluate.py, and the --init of train.py and finetune.py use it)
    read_checkpoint     the raw dict of either format (export.py copies it)
    save_model, write_model_folder, save_model_folder   the two formats, written atomically
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from safetensors.torch import save as safetensors_bytes

from .config import ModelConfig, config_from_dict, config_to_dict
from .errors import UserError
from .factory import load_checkpoint_weights
from .files import atomic_folder, save_torch, write_bytes, write_json
from .heads import TASK_MODELS
from .tensor_files import load_weights_only, read_safetensors
from .tokenizer import WordPieceTokenizer, check_vocab, write_vocab_file


# -------------------------------------------------------------------------------------------------
#                                     model.pt files
# -------------------------------------------------------------------------------------------------

def save_model(model: nn.Module, path: str, extra: Optional[dict] = None):
    """Weights + model config (+ ``extra``, e.g. an answer vocabulary), written atomically."""
    bert = model.bert if hasattr(model, "bert") else model
    payload = {"model": model.state_dict(), "model_config": config_to_dict(bert.config), **(extra or {})}
    save_torch(payload, path)


def read_checkpoint(path: str) -> dict:
    """A pixel-bert checkpoint as a dict with ``model`` (the state dict), ``model_config``, ``task``,
    ``vocab`` and, for VQA, ``answers``: from a ``model.pt`` (weights_only=True: tensors and plain
    Python values only) or from a model folder (`read_model_folder`: no pickle at all)."""
    if os.path.isdir(path):
        return read_model_folder(path)
    if os.path.basename(path) in (FOLDER_CONFIG, FOLDER_WEIGHTS):  # a file of a model folder: the folder
        return read_model_folder(os.path.dirname(path) or ".")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r}")
    ckpt = load_weights_only(path, "checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise UserError(f"{path}: not a pixel-bert checkpoint (expected keys 'model' and 'model_config')")
    if "run_config" in ckpt and "task" not in ckpt:  # a training checkpoint (ckpt_*.pt) of a run folder
        run_config = ckpt["run_config"]
        ckpt = {"model": ckpt["model"], "model_config": ckpt["model_config"],
                "task": run_config.get("task", "pretrain"), **run_config.get("model_extra", {})}
    return ckpt


def check_weights(state: Dict[str, torch.Tensor], task: str, config: ModelConfig, source: str) -> None:
    """Every tensor has the kind of dtype the model's own has (floating weights stay floating: an
    integer table would give nonsense that looks fine) and no NaN or infinity."""
    with torch.device("meta"):
        expected = {name: t.dtype for name, t in TASK_MODELS[task](config).state_dict().items()}
    for name, tensor in state.items():
        want = expected.get(name)
        if want is not None and want.is_floating_point and not tensor.dtype.is_floating_point:
            raise UserError(f"{source}: tensor {name!r} is {tensor.dtype}, but the model's is floating point ({want})")
        if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise UserError(f"{source}: tensor {name!r} holds {bad} NaN or infinite values")


@dataclass
class SavedModel:
    """A saved model as `load_saved_model` reads it back: its task, its configuration, its weights,
    its vocabulary and (VQA) its answer list, checked against each other; ``model`` is the task model
    with every tensor loaded (None when not built)."""
    source: str
    task: str
    config: ModelConfig
    state: Dict[str, torch.Tensor]
    vocab: Optional[List[str]]
    answers: Optional[List[str]]
    model: Optional[nn.Module] = None

    def tokenizer(self) -> WordPieceTokenizer:
        """The model's WordPiece tokenizer: its own vocabulary, else its config's ``vocab_file``."""
        if self.vocab:
            with tempfile.TemporaryDirectory(prefix="pixel_bert_vocab_") as folder:  # read once, at construction
                return WordPieceTokenizer.from_tokens(self.vocab, os.path.join(folder, "vocab.txt"))
        if self.config.vocab_file:
            return WordPieceTokenizer(self.config.vocab_file)
        raise UserError(f"{self.source}: the checkpoint stores no 'vocab' list and its config names no "
                         "vocab_file, so its text cannot be tokenised")

    def config_for_init(self) -> ModelConfig:
        """The configuration of a new run started from these weights (``--init``): the same sizes, with
        the BERT / ImageNet initial-weight paths cleared, since the checkpoint holds both."""
        config = config_from_dict(ModelConfig, config_to_dict(self.config))
        config.backbone_weights, config.bert_weights = None, None
        return config


def warn_missing_config_keys(model_config: Dict[str, Any], source: str) -> None:
    """Warn about each ModelConfig field a saved config lacks (an older pixel-bert wrote it), naming the
    default that is taken instead: a missing key must not change the model unnoticed."""
    missing = sorted({f.name for f in fields(ModelConfig)} - set(model_config))
    if missing:
        defaults = ModelConfig()
        warnings.warn(f"{source}: its model config has no {', '.join(missing)} (written by an older pixel-bert); "
                      "taking the defaults " + ", ".join(f"{name}={getattr(defaults, name)!r}" for name in missing),
                      stacklevel=3)


def load_saved_model(path: str, task: Optional[str] = None, build: bool = True) -> SavedModel:
    """Read a saved model (a ``model.pt`` or a model folder) and check that its parts belong together:
    the vocabulary fits the embedding table, a VQA model names one answer per output, and ``task``
    (when given) is the model's own. With ``build`` the task model is built and every one of its
    tensors loaded from the file (a head left at random init would give confident nonsense)."""
    ckpt = read_checkpoint(path)
    saved_task = ckpt.get("task", "pretrain")
    warn_missing_config_keys(ckpt["model_config"], path)
    if task is not None and saved_task != task:
        raise UserError(f"{path} is a {saved_task!r} model, not {task!r}")
    if saved_task not in TASK_MODELS:
        raise UserError(f"{path}: unknown task {saved_task!r}; choose from {sorted(TASK_MODELS)}")
    try:
        config = config_from_dict(ModelConfig, dict(ckpt["model_config"]))
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: 'model_config' is not a valid ModelConfig ({e})") from e
    config.backbone_weights = None  # the checkpoint holds the CNN
    vocab, answers = ckpt.get("vocab"), ckpt.get("answers")
    if vocab is not None:
        check_vocab(vocab, f"{path} (its vocabulary)")
    check_weights(ckpt["model"], saved_task, config, path)
    if vocab is not None and len(vocab) != config.vocab_size:
        raise UserError(f"{path}: vocabulary of {len(vocab)} tokens for a model with vocab_size {config.vocab_size}")
    if saved_task == "vqa" and not answers:
        raise UserError(f"{path}: a 'vqa' checkpoint without its 'answers' list cannot name answers")
    if saved_task == "vqa" and len(answers) != config.num_answers:
        raise UserError(f"{path} lists {len(answers)} answers but its VQA head scores {config.num_answers}: "
                         "the answer list belongs to another model")
    saved = SavedModel(path, saved_task, config, ckpt["model"], vocab, answers)
    if build:
        saved.model = TASK_MODELS[saved_task](config)
        absent = sorted(set(saved.model.state_dict()) - set(saved.state))
        if absent:
            raise UserError(f"{path}: checkpoint of task {saved_task!r} lacks {len(absent)} tensors of its own "
                             f"model, e.g. {absent[:3]}")
        load_checkpoint_weights(saved.model, saved.state, path, verbose=False)
    return saved


# -------------------------------------------------------------------------------------------------
#                           Model folders: a checkpoint without pickle
# -------------------------------------------------------------------------------------------------
# The layout the ecosystem shares models in: config.json, model.safetensors, vocab.txt (+ answers.json
# for VQA). Nothing in it is unpickled: tensors are safetensors, everything else is JSON or text.

FOLDER_FORMAT, FOLDER_FORMAT_VERSION = "pixel-bert", 1


FOLDER_CONFIG, FOLDER_WEIGHTS, FOLDER_VOCAB, FOLDER_ANSWERS = (
    "config.json", "model.safetensors", "vocab.txt", "answers.json")


# Paths on the machine that trained the model mean nothing where the folder is shared, and the folder
# holds what they pointed at (the weights, the vocabulary): they are written as null.
LOCAL_PATH_FIELDS = ("backbone_weights", "bert_weights", "vocab_file")


# How an image and a text are prepared for the model (pixel_bert.images.ImageTransform, the tokenizer).
PREPROCESSING_FIELDS = ("image_short_side", "image_long_side", "image_format", "image_mean", "image_std",
                        "max_text_len")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def save_answers(path: str, answers: Sequence[str]) -> str:
    return write_json(path, list(answers), indent=0)


def load_answers(path: str) -> List[str]:
    with open(path, encoding="utf-8") as f:
        answers = json.load(f)
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise UserError(f"{path}: expected a JSON list of answer strings (as finetune.py writes answers.json)")
    return answers


def tensor_layout(task: str, config: ModelConfig) -> Tuple[Dict[str, Tuple[int, ...]], Dict[str, str]]:
    """(name -> shape of every tensor in the ``task`` model's state dict, tied name -> the name whose
    Parameter it shares), read off a model built on the meta device: no memory, no initialisation."""
    if task not in TASK_MODELS:
        raise UserError(f"unknown task {task!r}; choose from {sorted(TASK_MODELS)}")
    with torch.device("meta"):
        model = TASK_MODELS[task](config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    first_name: Dict[int, str] = {}
    tied = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owner = first_name.setdefault(id(param), name)
        if owner != name:  # e.g. mlm.decoder_weight is the word embedding table (tie_mlm_decoder)
            tied[name] = owner
    return shapes, tied


def check_tensors(tensors: Dict[str, torch.Tensor], shapes: Dict[str, Tuple[int, ...]], tied: Dict[str, str],
                  weights_file: str, config_file: str, task: str):
    """``tensors`` (tied names stored once) must be exactly the model's that ``config_file`` describes."""
    expected = {name: shape for name, shape in shapes.items() if name not in tied}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise UserError(f"{weights_file} does not hold the tensors of the {task!r} model that {config_file} "
                         f"describes: {len(missing)} missing {missing[:3]}, {len(unexpected)} unexpected "
                         f"{unexpected[:3]}. The two files belong to different models; export the folder again")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise UserError(f"{weights_file}: tensor {name!r} has shape {tuple(tensors[name].shape)}, but the "
                             f"model {config_file} describes needs {shape}. The two files belong to different "
                             "models; export the folder again")


def check_vocab_and_answers(task: str, config: ModelConfig, vocab, answers, vocab_source: str,
                            answers_source: str):
    """The vocabulary fits the embedding table; a VQA model has one answer string per output."""
    if not vocab:
        raise UserError(f"{vocab_source}: no vocabulary; a model folder carries its vocab.txt (finetune.py and "
                         "train.py store it in model.pt as 'vocab')")
    if len(vocab) != config.vocab_size:
        raise UserError(f"{vocab_source}: {len(vocab)} tokens for a model with vocab_size {config.vocab_size}")
    if task == "vqa" and not answers:
        raise UserError(f"{answers_source}: a 'vqa' model needs its answer list to name its answers")
    if task == "vqa" and len(answers) != config.num_answers:
        raise UserError(f"{answers_source}: {len(answers)} answers for a VQA head of {config.num_answers}")


def folder_config(task: str, config: ModelConfig, tied: Dict[str, str], files: List[str]) -> dict:
    """The contents of config.json: the model config, the task, how inputs are prepared, the files."""
    model_config = {**config_to_dict(config), **{name: None for name in LOCAL_PATH_FIELDS}}
    preprocessing = {name: model_config[name] for name in PREPROCESSING_FIELDS}
    preprocessing.update(
        pad_to_multiple_of=config.feature_stride,
        resize="keep aspect ratio: shorter side image_short_side, longer side at most image_long_side; "
               "bilinear, antialiased",
        normalize="(pixels - image_mean) / image_std, pixels as image_format says: rgb = RGB in [0, 1], "
                  "bgr255 = BGR in [0, 255]",
        text="BERT WordPiece over vocab.txt (lowercased), [CLS] text [SEP], at most max_text_len tokens")
    return {"format": FOLDER_FORMAT, "format_version": FOLDER_FORMAT_VERSION, "task": task,
            "model_config": model_config, "preprocessing": preprocessing, "tied_weights": tied, "files": files}


def write_model_folder(ckpt: dict, folder: str) -> Dict[str, int]:
    """Write a checkpoint dict (as `read_checkpoint` returns it) as a model folder, atomically
    (`files.atomic_folder`; config.json last). Tied tensors are stored once and tied again on load.
    Returns {file name: size in bytes}."""
    task = ckpt.get("task", "pretrain")
    config = config_from_dict(ModelConfig, {**ckpt["model_config"], **{k: None for k in LOCAL_PATH_FIELDS}})
    vocab, answers = ckpt.get("vocab"), ckpt.get("answers")
    check_vocab_and_answers(task, config, vocab, answers, "the checkpoint's 'vocab'", "the checkpoint's 'answers'")
    shapes, tied = tensor_layout(task, config)
    state = ckpt["model"]
    for name, owner in tied.items():
        if name in state and owner in state and not torch.equal(state[name], state[owner]):
            raise UserError(f"the checkpoint's {name!r} differs from {owner!r}, which the model ties it to")
    tensors = {name: t.detach().cpu().contiguous() for name, t in state.items() if name not in tied}
    check_tensors(tensors, shapes, tied, "the checkpoint", "its model_config", task)
    files = [FOLDER_WEIGHTS, FOLDER_VOCAB] + ([FOLDER_ANSWERS] if answers is not None else [])
    with atomic_folder(folder) as tmp:
        write_bytes(os.path.join(tmp, FOLDER_WEIGHTS), safetensors_bytes(tensors, metadata={"format": "pt"}))
        write_vocab_file(vocab, os.path.join(tmp, FOLDER_VOCAB))
        if answers is not None:
            save_answers(os.path.join(tmp, FOLDER_ANSWERS), answers)
        write_json(os.path.join(tmp, FOLDER_CONFIG), folder_config(task, config, tied, files))
    return {name: os.path.getsize(os.path.join(folder, name)) for name in [FOLDER_CONFIG] + files}


def save_model_folder(model: nn.Module, folder: str, extra: Optional[dict] = None) -> Dict[str, int]:
    """`save_model`'s contents (weights, model config, ``extra``: task, vocab, answers) as a model folder."""
    bert = model.bert if hasattr(model, "bert") else model
    return write_model_folder({"model": model.state_dict(), "model_config": config_to_dict(bert.config),
                               **(extra or {})}, folder)


def _folder_error(folder: str, problem: str) -> FileNotFoundError:
    """A missing file, with the pickle files the folder holds instead named and refused."""
    pickles = sorted(n for n in os.listdir(folder) if n.lower().endswith(PICKLE_SUFFIXES))
    refused = (f"; the folder holds {', '.join(pickles)} instead: pickle files are never opened here "
               "(unpickling can run code)" if pickles else "")
    return FileNotFoundError(f"{folder}: {problem}{refused}. A model folder holds config.json, model.safetensors "
                             "and vocab.txt (+ answers.json for VQA): write it with python -m pixel_bert.export "
                             "RUN/model.pt OUT/")


def read_folder_config(folder: str) -> dict:
    """config.json of a model folder, checked: the format, the task, the files it lists are there."""
    config_file = os.path.join(folder, FOLDER_CONFIG)
    if not os.path.isfile(config_file):
        raise _folder_error(folder, "no config.json (it is written last: the folder is incomplete or is "
                                    "not a pixel-bert model folder)")
    try:
        with open(config_file, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{config_file}: not readable JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FOLDER_FORMAT:
        raise UserError(f"{config_file}: not a pixel-bert model config (no \"format\": \"{FOLDER_FORMAT}\"). "
                         "A Hugging Face BERT folder initialises a new model with --bert_weights instead")
    if meta.get("format_version") != FOLDER_FORMAT_VERSION:
        raise UserError(f"{config_file}: format_version {meta.get('format_version')!r}; this pixel-bert reads "
                         f"version {FOLDER_FORMAT_VERSION} (update pixel-bert for a newer folder)")
    for key, kind in (("task", str), ("model_config", dict), ("preprocessing", dict), ("tied_weights", dict),
                      ("files", list)):
        if not isinstance(meta.get(key), kind):
            raise UserError(f"{config_file}: {key!r} missing or not a {kind.__name__}")
    required = {FOLDER_WEIGHTS, FOLDER_VOCAB} | ({FOLDER_ANSWERS} if meta["task"] == "vqa" else set())
    for name in sorted(required | set(meta["files"])):
        if name not in meta["files"]:
            raise UserError(f"{config_file}: 'files' does not list {name}, which a {meta['task']!r} model needs")
        if not os.path.isfile(os.path.join(folder, name)):
            raise _folder_error(folder, f"{name} is missing (config.json lists it)")
    return meta


def read_model_folder(folder: str) -> dict:
    """A model folder (`write_model_folder`) as the dict `read_checkpoint` returns for a model.pt:
    ``model`` (every state-dict name, tied names again sharing one tensor), ``model_config``, ``task``,
    ``vocab`` and ``answers`` (VQA). Reads JSON, text and safetensors only: nothing is unpickled."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder not found: {folder!r}")
    meta = read_folder_config(folder)
    config_file, task = os.path.join(folder, FOLDER_CONFIG), meta["task"]
    warn_missing_config_keys(meta["model_config"], config_file)
    try:
        config = config_from_dict(ModelConfig, dict(meta["model_config"]))
    except (TypeError, ValueError) as e:
        raise UserError(f"{config_file}: 'model_config' is not a valid ModelConfig ({e})") from e
    implied = folder_config(task, config, {}, [])["preprocessing"]
    for name in PREPROCESSING_FIELDS + ("pad_to_multiple_of",):
        own, stored = json.loads(json.dumps(implied[name])), meta["preprocessing"].get(name)
        if stored != own:
            raise UserError(f"{config_file}: preprocessing {name} = {stored!r} disagrees with the model config, "
                             f"which gives {own!r}; edit both or neither")
    with open(os.path.join(folder, FOLDER_VOCAB), encoding="utf-8") as f:
        vocab = [line.rstrip("\n") for line in f]
    check_vocab(vocab, os.path.join(folder, FOLDER_VOCAB))
    answers = None
    if FOLDER_ANSWERS in meta["files"]:
        answers = load_answers(os.path.join(folder, FOLDER_ANSWERS))
    check_vocab_and_answers(task, config, vocab, answers, os.path.join(folder, FOLDER_VOCAB),
                            os.path.join(folder, FOLDER_ANSWERS))
    weights_file = os.path.join(folder, FOLDER_WEIGHTS)
    tensors = read_safetensors(weights_file)
    shapes, tied = tensor_layout(task, config)
    if meta["tied_weights"] != tied:
        raise UserError(f"{config_file}: tied_weights {meta['tied_weights']} disagree with the model config's "
                         f"ties {tied} (tie_mlm_decoder)")
    check_tensors(tensors, shapes, tied, weights_file, config_file, task)
    state = {name: tensors[tied.get(name, name)] for name in shapes}  # the model's order, ties shared
    ckpt = {"model": state, "model_config": config_to_dict(config), "task": task, "vocab": vocab}
    if answers is not None:
        ckpt["answers"] = answers
    return ckpt
