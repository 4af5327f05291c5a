"""Reading tensor files and copying tensors into a module, with a report of what was loaded.

Every loader of this package (BERT, ImageNet, Detectron, pixel-bert's own files) goes through these:
PyTorch files are read with ``weights_only=True`` (a file that would run code when unpickled is
refused), safetensors files are recognised by their first bytes, and `assign_tensors` checks every
shape before it copies anything, so a mismatch changes nothing and names the tensor.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Dict, List

import torch
import torch.nn as nn
from safetensors.torch import load_file

from .errors import UserError


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
            raise UserError(f"{path}: refused to load: it holds Python objects other than tensors and plain "
                             f"values, which could run code when unpickled; nothing from it was run. Re-save it "
                             f"as a plain state dict (or .safetensors). ({detail})") from e
        raise UserError(f"{path}: not a readable {what}: the file is truncated or damaged ({detail})") from e
    except Exception as e:  # zero bytes (EOFError), a cut zip archive (RuntimeError), ...
        raise UserError(f"{path}: not a readable {what}: the file is truncated or damaged "
                         f"({type(e).__name__}: {e})") from e


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a PyTorch file, the latter loaded with
    ``weights_only=True`` so a file that would run code on unpickling is refused."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path!r}")
    if path.endswith(".safetensors"):
        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise UserError(f"{path}: not a readable safetensors file ({e})") from e
    obj = load_weights_only(path, "PyTorch weights file")
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # a pixel-bert or training checkpoint
    elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
    return obj


def read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """Tensors of a .safetensors file; a file in another format (a renamed torch.save / pickle file)
    is refused from its first bytes, before anything parses it."""
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header
    if len(head) < 9 or head[8:9] != b"{":
        kind = ("a zip file (torch.save)" if head.startswith(b"PK") else
                "a pickle" if head.startswith(b"\x80") else f"it starts with {head[:9]!r}")
        raise UserError(f"{path}: not a safetensors file ({kind}); refused, since only safetensors are read "
                         "from a model folder. Re-export the folder with python -m pixel_bert.export")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise UserError(f"{path}: not a readable safetensors file ({e})") from e


def assign_tensors(module: nn.Module, tensors: Dict[str, torch.Tensor], source: str) -> List[str]:
    """Copy ``tensors`` (target-name -> tensor) into ``module``; every shape is checked first so a
    mismatch changes nothing. Returns the names loaded."""
    targets = dict(module.state_dict(keep_vars=True))
    for name, tensor in tensors.items():
        if name not in targets:
            raise KeyError(f"{source}: no parameter {name!r} in {type(module).__name__}")
        if tuple(targets[name].shape) != tuple(tensor.shape):
            raise UserError(f"{source}: shape mismatch for {name!r}: checkpoint has "
                             f"{tuple(tensor.shape)}, the model expects {tuple(targets[name].shape)}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            targets[name].copy_(tensor.to(targets[name].dtype))
    return sorted(tensors)
