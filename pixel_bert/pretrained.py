"""Initial weights from other projects: a Hugging Face BERT for the transformer (Sec. 3.2 of the
paper: initialised from bert-base-uncased) and ImageNet weights for the CNN (torchvision's, or
Detectron's Caffe2 pickle for ResNeXt-152, `pixel_bert.caffe2_weights`).

Every loader reports what it loaded, what it left new and what it did not use, and refuses a shape
mismatch with an error naming the tensor and both shapes: a fine-tuning run must never sit at chance
because pre-trained weights silently failed to load (docs/paper.md#pitfalls-of-peer-systems).
"""
from __future__ import annotations

import os
import urllib.request
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torchvision.models as tvm

from .caffe2_weights import DETECTRON_X152_URL, load_caffe2_backbone
from .config import IMAGENET_MEAN, IMAGENET_STD
from .errors import UserError
from .model import _TORCHVISION_RESNETS
from .tensor_files import LoadReport, assign_tensors, read_state_dict

HF_BERT_URL = "https://huggingface.co/{name}/resolve/main/{file}"
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "pixel_bert")


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
            "pixel_bert.pretrained.download_bert('bert-base-uncased') where you have internet.")
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
        raise UserError(f"{weights_file}: no BERT embedding weights found (expected "
                         "'embeddings.word_embeddings.weight', optionally under 'bert.'); is this a BERT checkpoint?")
    # A checkpoint with fewer layers than the model would leave transformer layers at random init.
    for i in range(bert.config.num_layers):
        if f"{prefix}layers.{i}.attention.qkv.weight" not in mapped:
            raise UserError(f"{weights_file}: has no weights for transformer layer {i}, but the model has "
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
        report = load_caffe2_backbone(trunk, spec, bert.config)
        if verbose:
            print(f"backbone: {report.summary()}\n  input: {bert.config.image_format}, mean "
                  f"{bert.config.image_mean}, std {bert.config.image_std} (Detectron's convention)")
        return report
    if spec == "imagenet":
        if name == "resnext152_32x8d":
            raise UserError(f"torchvision ships no ImageNet weights for {name!r}: they are Detectron's "
                             f"X-152-32x8d-IN5k.pkl, published at {DETECTRON_X152_URL}; download it and pass "
                             "--backbone_weights /path/to/X-152-32x8d-IN5k.pkl")
        if name not in _TORCHVISION_RESNETS:
            raise UserError(f"torchvision ships no ImageNet weights for {name!r}; pass a state-dict file in "
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
        raise UserError(f"{source}: no tensor matches a torchvision ResNet name (conv1.*, layer1.*, ...)")
    report = LoadReport(source, assign_tensors(trunk, mapped, source))
    report.missing = sorted(trunk_names - set(mapped))
    report.unused = sorted(k for k in unused if not k.endswith("num_batches_tracked"))
    if bert.config.image_format != "rgb":  # torchvision's weights saw RGB in [0, 1], ImageNet mean/std
        bert.config.image_format, bert.config.image_mean, bert.config.image_std = "rgb", IMAGENET_MEAN, IMAGENET_STD
    if verbose:
        print("backbone: " + report.summary())
    return report
