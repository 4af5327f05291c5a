"""Loading weights: BERT checkpoints, ImageNet backbones, and pixel-bert's own checkpoints, which
are a ``model.pt`` (read with weights_only=True) or a model folder (config.json, model.safetensors,
vocab.txt, answers.json: no pickle at all); `read_checkpoint` reads both into the same dict.

Every loader reports what it loaded and what it left new, and refuses a shape mismatch with an
error naming the tensor and both shapes: a fine-tuning run must never sit at chance because
pre-trained weights silently failed to load (docs/paper.md#pitfalls-of-peer-systems).
"""
from __future__ import annotations

import json
import os
import pickle
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig, config_from_dict, config_to_dict
from .files import save_torch

HF_BERT_URL = "https://huggingface.co/{name}/resolve/main/{file}"
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "pixel_bert")


@dataclass
class LoadReport:
    """What a loader did: ``loaded`` target names, ``missing`` target names left as initialised,
    ``unused`` source names that had no place in the model."""
    source: str
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unused: List[str] = field(default_factory=list)

    def summary(self) -> str:
        def grouped(names):
            # "bert.visual_embedding.backbone.stem.0.weight" -> counted under "bert.visual_embedding"
            groups: Dict[str, int] = {}
            for n in names:
                key = ".".join(n.split(".")[:2]) if n.startswith("bert.") else n.split(".")[0]
                groups[key] = groups.get(key, 0) + 1
            return ", ".join(f"{k} ({v})" for k, v in sorted(groups.items()))
        lines = [f"loaded {len(self.loaded)} tensors from {self.source}"]
        if self.missing:
            lines.append(f"  left as initialised ({len(self.missing)}): {grouped(self.missing)}")
        if self.unused:
            lines.append(f"  unused in the checkpoint ({len(self.unused)}): {', '.join(self.unused[:10])}"
                         + (" ..." if len(self.unused) > 10 else ""))
        return "\n".join(lines)


# -------------------------------------------------------------------------------------------------
#                                    Reading tensor files
# -------------------------------------------------------------------------------------------------

def load_weights_only(path: str, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU. A file that is no torch file (empty,
    truncated, random bytes) raises ValueError "not a readable {what}"; one that asks for a Python
    class or function beyond tensors and plain values (which could run code when unpickled) is
    refused with ValueError "refused to load". Both name the file; nothing from it is run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e.__context__ or e).strip()
        if "GLOBAL" in str(e):  # the weights-only unpickler met a class or function it does not allow
            raise ValueError(f"{path}: refused to load: it holds Python objects other than tensors and plain "
                             f"values, which could run code when unpickled; nothing from it was run. Re-save it "
                             f"as a plain state dict (or .safetensors). ({detail})") from e
        raise ValueError(f"{path}: not a readable {what}: the file is truncated or damaged ({detail})") from e
    except Exception as e:  # zero bytes (EOFError), a cut zip archive (RuntimeError), ...
        raise ValueError(f"{path}: not a readable {what}: the file is truncated or damaged "
                         f"({type(e).__name__}: {e})") from e


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a PyTorch file, the latter loaded with
    ``weights_only=True`` so a file that would run code on unpickling is refused."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    obj = load_weights_only(path, "PyTorch weights file")
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # a pixel-bert or training checkpoint
    elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
    return obj


def assign_tensors(module: nn.Module, tensors: Dict[str, torch.Tensor], source: str) -> List[str]:
    """Copy ``tensors`` (target-name -> tensor) into ``module``; every shape is checked first so a
    mismatch changes nothing. Returns the names loaded."""
    targets = dict(module.state_dict(keep_vars=True))
    for name, tensor in tensors.items():
        if name not in targets:
            raise KeyError(f"{source}: no parameter {name!r} in {type(module).__name__}")
        if tuple(targets[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{source}: shape mismatch for {name!r}: checkpoint has "
                             f"{tuple(tensor.shape)}, the model expects {tuple(targets[name].shape)}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            targets[name].copy_(tensor.to(targets[name].dtype))
    return sorted(tensors)


# -------------------------------------------------------------------------------------------------
#                                     BERT checkpoints
# -------------------------------------------------------------------------------------------------

def _bert_files(path: str) -> Tuple[str, Optional[str]]:
    """(weights file, config.json or None) for a HF directory or a single file."""
    if os.path.isdir(path):
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(path, name)):
                config = os.path.join(path, "config.json")
                return os.path.join(path, name), config if os.path.isfile(config) else None
        raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin in this directory")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"BERT weights not found: {path!r}. Give a Hugging Face BERT directory (config.json + "
            "model.safetensors or pytorch_model.bin), a weights file, or call "
            "pixel_bert.weights.download_bert('bert-base-uncased') where you have internet.")
    config = os.path.join(os.path.dirname(path), "config.json")
    return path, config if os.path.isfile(config) else None


def bert_name_map(num_layers: int) -> Dict[str, str]:
    """HF BERT name (without the ``bert.`` prefix) -> PixelBert name, for all but Q/K/V."""
    m = {
        "embeddings.word_embeddings.weight": "text_embedding.word.weight",
        "embeddings.position_embeddings.weight": "text_embedding.position.weight",
        "embeddings.token_type_embeddings.weight": "text_embedding.token_type.weight",
        "embeddings.LayerNorm.weight": "text_embedding.norm.weight",
        "embeddings.LayerNorm.bias": "text_embedding.norm.bias",
    }
    for i in range(num_layers):
        hf, ours = f"encoder.layer.{i}.", f"layers.{i}."
        for a, b in [("attention.output.dense", "attention.out"), ("attention.output.LayerNorm", "attention_norm"),
                     ("intermediate.dense", "ffn_in"), ("output.dense", "ffn_out"), ("output.LayerNorm", "ffn_norm")]:
            for p in ("weight", "bias"):
                m[f"{hf}{a}.{p}"] = f"{ours}{b}.{p}"
    return m


MLM_NAME_MAP = {
    "cls.predictions.transform.dense.weight": "mlm.dense.weight",
    "cls.predictions.transform.dense.bias": "mlm.dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "mlm.norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "mlm.norm.bias",
    "cls.predictions.bias": "mlm.bias",
}


def _normalise_hf_names(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Strip the ``bert.`` prefix and rename old TF-style LayerNorm gamma/beta."""
    out = {}
    for k, v in state.items():
        k = k[len("bert."):] if k.startswith("bert.") else k
        k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out[k] = v
    return out


def load_bert_weights(model: nn.Module, path: str, verbose: bool = True) -> LoadReport:
    """Initialise ``model`` (a PixelBert, or a task model with ``.bert``) from a Hugging Face BERT
    checkpoint: a directory or a weights file, with or without the ``bert.`` prefix, with or without
    the pre-training heads ``cls.predictions.*`` (loaded into ``.mlm`` when the model has one).

    Query, key and value are concatenated into our fused ``qkv`` projection. The CNN and the visual
    embedding are left as they are (reported under ``missing``). Shape mismatches raise ValueError.
    """
    weights_file, _ = _bert_files(path)
    state = _normalise_hf_names(read_state_dict(weights_file))
    bert = model.bert if hasattr(model, "bert") else model
    prefix = "bert." if bert is not model else ""
    names = bert_name_map(bert.config.num_layers)
    mapped: Dict[str, torch.Tensor] = {}
    used = set()
    for hf_name, our_name in names.items():
        if hf_name in state:
            mapped[prefix + our_name] = state[hf_name]
            used.add(hf_name)
    for i in range(bert.config.num_layers):
        base = f"encoder.layer.{i}.attention.self."
        for p in ("weight", "bias"):
            parts = [f"{base}{n}.{p}" for n in ("query", "key", "value")]
            if all(n in state for n in parts):
                mapped[f"{prefix}layers.{i}.attention.qkv.{p}"] = torch.cat([state[n] for n in parts], dim=0)
                used.update(parts)
    if hasattr(model, "mlm"):
        for hf_name, our_name in MLM_NAME_MAP.items():
            if hf_name in state:
                mapped[our_name] = state[hf_name]
                used.add(hf_name)
        decoder = "cls.predictions.decoder.weight"
        if decoder in state:
            used.add(decoder)
            if not bert.config.tie_mlm_decoder:
                mapped["mlm.decoder_weight"] = state[decoder]
    if not any(k.endswith("text_embedding.word.weight") for k in mapped):
        raise ValueError(f"{weights_file}: no BERT embedding weights found (expected "
                         "'embeddings.word_embeddings.weight', optionally under 'bert.'); is this a BERT checkpoint?")
    # A checkpoint with fewer layers than the model would leave transformer layers at random init.
    for i in range(bert.config.num_layers):
        if f"{prefix}layers.{i}.attention.qkv.weight" not in mapped:
            raise ValueError(f"{weights_file}: has no weights for transformer layer {i}, but the model has "
                             f"{bert.config.num_layers} layers; build the config with "
                             "pixel_bert.config.model_config_from_bert(config.json)")
    report = LoadReport(weights_file, assign_tensors(model, mapped, weights_file))
    own = set(model.state_dict())
    report.missing = sorted(own - set(mapped) - {"mlm.decoder_weight"}
                            if bert.config.tie_mlm_decoder else own - set(mapped))
    report.unused = sorted(set(state) - used)
    if verbose:
        print(report.summary())
    return report


def download_bert(name: str = "bert-base-uncased", cache_dir: str = CACHE_DIR) -> str:
    """Download config.json, vocab.txt and model.safetensors of a Hugging Face BERT (needs internet);
    returns the local directory, reused on later calls."""
    target = os.path.join(cache_dir, name.replace("/", "--"))
    os.makedirs(target, exist_ok=True)
    for file in ("config.json", "vocab.txt", "model.safetensors"):
        dest = os.path.join(target, file)
        if os.path.isfile(dest):
            continue
        url = HF_BERT_URL.format(name=name, file=file)
        try:
            urllib.request.urlretrieve(url, dest + ".part")
        except OSError as e:
            raise RuntimeError(f"could not download {url} ({e}). Without internet, download {name} "
                               f"elsewhere and pass its directory instead of the name.") from e
        os.replace(dest + ".part", dest)
    return target


def resolve_bert(name_or_path: str) -> str:
    """A local BERT directory for a path, or for a hub name (downloaded once)."""
    if os.path.exists(name_or_path):
        return name_or_path
    return download_bert(name_or_path)


# -------------------------------------------------------------------------------------------------
#                                     Backbone weights
# -------------------------------------------------------------------------------------------------

def torchvision_to_trunk_name(name: str) -> Optional[str]:
    """torchvision ResNet name -> BackboneTrunk name (None for fc.* and other unused tensors)."""
    for tv, ours in (("conv1.", "stem.0."), ("bn1.", "stem.1.")):
        if name.startswith(tv):
            return ours + name[len(tv):]
    if name.startswith("layer"):
        stage, rest = name[len("layer"):].split(".", 1)
        return f"stages.{int(stage) - 1}.{rest}"
    return None


def load_backbone_weights(model: nn.Module, spec: str, verbose: bool = True) -> LoadReport:
    """Initialise the CNN of ``model`` (PixelBert or a task model) from ImageNet weights.

    ``spec`` is "imagenet" (torchvision's weights enum for the configured ResNet, downloaded to the
    torch hub cache where there is internet), a local state-dict file in torchvision's ResNet names,
    or a Detectron (Caffe2) ``.pkl`` such as the ResNeXt-152 32x8d weights
    (`pixel_bert.caffe2_weights`), which also sets the model config's input convention to the file's.
    """
    bert = model.bert if hasattr(model, "bert") else model
    trunk = bert.visual_embedding.backbone
    name = bert.config.backbone
    if spec.endswith(".pkl"):
        from .caffe2_weights import load_caffe2_backbone
        report = load_caffe2_backbone(trunk, spec, bert.config)
        if verbose:
            print(f"backbone: {report.summary()}\n  input: {bert.config.image_format}, mean "
                  f"{bert.config.image_mean}, std {bert.config.image_std} (Detectron's convention)")
        return report
    if spec == "imagenet":
        from .model import _TORCHVISION_RESNETS
        import torchvision.models as tvm
        if name == "resnext152_32x8d":
            from .caffe2_weights import DETECTRON_X152_URL
            raise ValueError(f"torchvision ships no ImageNet weights for {name!r}: they are Detectron's "
                             f"X-152-32x8d-IN5k.pkl, published at {DETECTRON_X152_URL}; download it and pass "
                             "--backbone_weights /path/to/X-152-32x8d-IN5k.pkl")
        if name not in _TORCHVISION_RESNETS:
            raise ValueError(f"torchvision ships no ImageNet weights for {name!r}; pass a state-dict file in "
                             "torchvision's ResNet names as backbone_weights=/path/to/weights.pth")
        weights = getattr(tvm, _TORCHVISION_RESNETS[name][1]).IMAGENET1K_V1
        source = f"torchvision {weights}"
        try:
            state = weights.get_state_dict(progress=verbose)
        except Exception as e:  # offline: URLError / OSError
            raise RuntimeError(
                f"could not download {source} ({e}). Offline, download it elsewhere "
                f"({weights.url}) and pass the file as backbone_weights=/path/to/file.pth, or "
                "backbone_weights=none to start the CNN from scratch.") from e
    else:
        source = spec
        state = read_state_dict(spec)
    mapped, unused = {}, []
    trunk_names = set(trunk.state_dict())
    for k, v in state.items():
        ours = torchvision_to_trunk_name(k)
        if ours is None or ours not in trunk_names:
            unused.append(k)
        else:
            mapped[ours] = v
    if not mapped:
        raise ValueError(f"{source}: no tensor matches a torchvision ResNet name (conv1.*, layer1.*, ...)")
    report = LoadReport(source, assign_tensors(trunk, mapped, source))
    report.missing = sorted(trunk_names - set(mapped))
    report.unused = sorted(k for k in unused if not k.endswith("num_batches_tracked"))
    if bert.config.image_format != "rgb":  # torchvision's weights saw RGB in [0, 1], ImageNet mean/std
        bert.config.image_format, bert.config.image_mean, bert.config.image_std = "rgb", IMAGENET_MEAN, IMAGENET_STD
    if verbose:
        print("backbone: " + report.summary())
    return report


# -------------------------------------------------------------------------------------------------
#                                pixel-bert's own checkpoints
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
        raise ValueError(f"{path}: not a pixel-bert checkpoint (expected keys 'model' and 'model_config')")
    return ckpt


def config_for_init(ckpt: dict) -> ModelConfig:
    """The model config of a checkpoint that starts a new run (``--init``): its own sizes, with the
    BERT / ImageNet initial-weight paths cleared, since the checkpoint holds both."""
    config = config_from_dict(ModelConfig, dict(ckpt["model_config"]))
    config.backbone_weights, config.bert_weights = None, None
    return config


def load_checkpoint_weights(model: nn.Module, state: Dict[str, torch.Tensor], source: str,
                            strict_bert: bool = True, verbose: bool = True) -> LoadReport:
    """Load a pixel-bert state dict into a task model. Tensors are matched by name; the shared
    ``bert.*`` part must be complete (``strict_bert``), heads absent from the checkpoint stay new
    (e.g. a VQA head on a pre-training checkpoint) and heads absent from the model are reported."""
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own}
    report = LoadReport(source, assign_tensors(model, usable, source))
    report.missing = sorted(set(own) - set(usable))
    report.unused = sorted(set(state) - set(own))
    missing_bert = [k for k in report.missing if k.startswith("bert.")]
    if strict_bert and missing_bert:
        raise ValueError(f"{source}: the checkpoint lacks {len(missing_bert)} tensors of the shared network, "
                         f"e.g. {missing_bert[:3]}; it does not match this model's configuration")
    if verbose:
        print(report.summary())
    return report


def model_from_state(task: str, config: ModelConfig, state: Dict[str, torch.Tensor], source: str,
                     log=print) -> nn.Module:
    """The ``task`` model (pixel_bert.heads.TASK_MODELS) started from a checkpoint's state dict
    (``--init`` of train.py and finetune.py): the shared bert.* part must load completely, heads of
    the same name load too, the others start new; the load report is logged."""
    from .heads import TASK_MODELS
    model = TASK_MODELS[task](config)
    log(f"init: {load_checkpoint_weights(model, state, source, verbose=False).summary()}")
    return model


def load_model(path: str, task: Optional[str] = None, **config_overrides):
    """Build the task model stored in (or asked of) a checkpoint and load its weights.

    ``task`` None builds the checkpoint's own task (``ckpt['task']``, default "pretrain")."""
    from .heads import TASK_MODELS
    ckpt = read_checkpoint(path)
    config = config_from_dict(ModelConfig, {**ckpt["model_config"], **config_overrides})
    config.backbone_weights = None  # the checkpoint holds the CNN
    task = task or ckpt.get("task", "pretrain")
    if task not in TASK_MODELS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASK_MODELS)}")
    model = TASK_MODELS[task](config)
    load_checkpoint_weights(model, ckpt["model"], path, verbose=False)
    return model, ckpt


def create_model(config: ModelConfig, task: str = "pretrain", verbose: bool = True) -> nn.Module:
    """A task model with the initialisation its config asks for: ImageNet weights for the CNN
    (``backbone_weights``) and a BERT checkpoint for the transformer (``bert_weights``)."""
    from .heads import TASK_MODELS
    if task not in TASK_MODELS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASK_MODELS)}")
    model = TASK_MODELS[task](config)
    if config.backbone_weights not in (None, "", "none"):
        load_backbone_weights(model, config.backbone_weights, verbose)
    if config.bert_weights not in (None, "", "none"):
        load_bert_weights(model, resolve_bert(config.bert_weights), verbose)
    return model


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
# How an image and a text are prepared for the model (pixel_bert.data.ImageTransform, the tokenizer).
PREPROCESSING_FIELDS = ("image_short_side", "image_long_side", "image_format", "image_mean", "image_std",
                        "max_text_len")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def tensor_layout(task: str, config: ModelConfig) -> Tuple[Dict[str, Tuple[int, ...]], Dict[str, str]]:
    """(name -> shape of every tensor in the ``task`` model's state dict, tied name -> the name whose
    Parameter it shares), read off a model built on the meta device: no memory, no initialisation."""
    from .heads import TASK_MODELS
    if task not in TASK_MODELS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASK_MODELS)}")
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
        raise ValueError(f"{weights_file} does not hold the tensors of the {task!r} model that {config_file} "
                         f"describes: {len(missing)} missing {missing[:3]}, {len(unexpected)} unexpected "
                         f"{unexpected[:3]}. The two files belong to different models; export the folder again")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{weights_file}: tensor {name!r} has shape {tuple(tensors[name].shape)}, but the "
                             f"model {config_file} describes needs {shape}. The two files belong to different "
                             "models; export the folder again")


def check_vocab_and_answers(task: str, config: ModelConfig, vocab, answers, vocab_source: str,
                            answers_source: str):
    """The vocabulary fits the embedding table; a VQA model has one answer string per output."""
    if not vocab:
        raise ValueError(f"{vocab_source}: no vocabulary; a model folder carries its vocab.txt (finetune.py and "
                         "train.py store it in model.pt as 'vocab')")
    if len(vocab) != config.vocab_size:
        raise ValueError(f"{vocab_source}: {len(vocab)} tokens for a model with vocab_size {config.vocab_size}")
    if task == "vqa" and not answers:
        raise ValueError(f"{answers_source}: a 'vqa' model needs its answer list to name its answers")
    if task == "vqa" and len(answers) != config.num_answers:
        raise ValueError(f"{answers_source}: {len(answers)} answers for a VQA head of {config.num_answers}")


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
    from safetensors.torch import save as safetensors_bytes
    from .files import atomic_folder, write_bytes, write_json
    from .tokenizer import write_vocab_file
    from .vqa import save_answers
    task = ckpt.get("task", "pretrain")
    config = config_from_dict(ModelConfig, {**ckpt["model_config"], **{k: None for k in LOCAL_PATH_FIELDS}})
    vocab, answers = ckpt.get("vocab"), ckpt.get("answers")
    check_vocab_and_answers(task, config, vocab, answers, "the checkpoint's 'vocab'", "the checkpoint's 'answers'")
    shapes, tied = tensor_layout(task, config)
    state = ckpt["model"]
    for name, owner in tied.items():
        if name in state and owner in state and not torch.equal(state[name], state[owner]):
            raise ValueError(f"the checkpoint's {name!r} differs from {owner!r}, which the model ties it to")
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
        raise ValueError(f"{config_file}: not readable JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FOLDER_FORMAT:
        raise ValueError(f"{config_file}: not a pixel-bert model config (no \"format\": \"{FOLDER_FORMAT}\"). "
                         "A Hugging Face BERT folder initialises a new model with --bert_weights instead")
    if meta.get("format_version") != FOLDER_FORMAT_VERSION:
        raise ValueError(f"{config_file}: format_version {meta.get('format_version')!r}; this pixel-bert reads "
                         f"version {FOLDER_FORMAT_VERSION} (update pixel-bert for a newer folder)")
    for key, kind in (("task", str), ("model_config", dict), ("preprocessing", dict), ("tied_weights", dict),
                      ("files", list)):
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{config_file}: {key!r} missing or not a {kind.__name__}")
    required = {FOLDER_WEIGHTS, FOLDER_VOCAB} | ({FOLDER_ANSWERS} if meta["task"] == "vqa" else set())
    for name in sorted(required | set(meta["files"])):
        if name not in meta["files"]:
            raise ValueError(f"{config_file}: 'files' does not list {name}, which a {meta['task']!r} model needs")
        if not os.path.isfile(os.path.join(folder, name)):
            raise _folder_error(folder, f"{name} is missing (config.json lists it)")
    return meta


def read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """Tensors of a .safetensors file; a file in another format (a renamed torch.save / pickle file)
    is refused from its first bytes, before anything parses it."""
    from safetensors.torch import load_file
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header
    if len(head) < 9 or head[8:9] != b"{":
        kind = ("a zip file (torch.save)" if head.startswith(b"PK") else
                "a pickle" if head.startswith(b"\x80") else f"it starts with {head[:9]!r}")
        raise ValueError(f"{path}: not a safetensors file ({kind}); refused, since only safetensors are read "
                         "from a model folder. Re-export the folder with python -m pixel_bert.export")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


def read_model_folder(folder: str) -> dict:
    """A model folder (`write_model_folder`) as the dict `read_checkpoint` returns for a model.pt:
    ``model`` (every state-dict name, tied names again sharing one tensor), ``model_config``, ``task``,
    ``vocab`` and ``answers`` (VQA). Reads JSON, text and safetensors only: nothing is unpickled."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder not found: {folder!r}")
    meta = read_folder_config(folder)
    config_file, task = os.path.join(folder, FOLDER_CONFIG), meta["task"]
    try:
        config = config_from_dict(ModelConfig, dict(meta["model_config"]))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_file}: 'model_config' is not a valid ModelConfig ({e})") from e
    implied = folder_config(task, config, {}, [])["preprocessing"]
    for name in PREPROCESSING_FIELDS + ("pad_to_multiple_of",):
        own, stored = json.loads(json.dumps(implied[name])), meta["preprocessing"].get(name)
        if stored != own:
            raise ValueError(f"{config_file}: preprocessing {name} = {stored!r} disagrees with the model config, "
                             f"which gives {own!r}; edit both or neither")
    with open(os.path.join(folder, FOLDER_VOCAB), encoding="utf-8") as f:
        vocab = [line.rstrip("\n") for line in f]
    answers = None
    if FOLDER_ANSWERS in meta["files"]:
        from .vqa import load_answers
        answers = load_answers(os.path.join(folder, FOLDER_ANSWERS))
    check_vocab_and_answers(task, config, vocab, answers, os.path.join(folder, FOLDER_VOCAB),
                            os.path.join(folder, FOLDER_ANSWERS))
    weights_file = os.path.join(folder, FOLDER_WEIGHTS)
    tensors = read_safetensors(weights_file)
    shapes, tied = tensor_layout(task, config)
    if meta["tied_weights"] != tied:
        raise ValueError(f"{config_file}: tied_weights {meta['tied_weights']} disagree with the model config's "
                         f"ties {tied} (tie_mlm_decoder)")
    check_tensors(tensors, shapes, tied, weights_file, config_file, task)
    state = {name: tensors[tied.get(name, name)] for name in shapes}  # the model's order, ties shared
    ckpt = {"model": state, "model_config": config_to_dict(config), "task": task, "vocab": vocab}
    if answers is not None:
        ckpt["answers"] = answers
    return ckpt
