"""Detectron (Caffe2) ImageNet weights for the CNN: the paper's ResNeXt-152 32x8d backbone.

torchvision has no ResNeXt-152. Its public ImageNet weights are Detectron's model-zoo file
``X-152-32x8d-IN5k.pkl`` (trained on ImageNet-5k with Caffe2 at FAIR), published at
`DETECTRON_X152_URL`. This module reads that file safely and maps it onto our torchvision-built
`pixel_bert.model.BackboneTrunk`.

The file. A Python-2 pickle of ``{blob name: numpy array}``, optionally under ``"blobs"`` (next to a
``"cfg"`` YAML string). Blob names follow facebookresearch/Detectron's ``detectron/modeling/ResNet.py``:

    conv1_w                          stem 7x7/2 conv (no bias)      -> stem.0.weight
    res_conv1_bn_{s,b}               its folded BatchNorm           -> stem.1
    res{2..5}_{i}_branch2{a,b,c}_w   block i: 1x1, 3x3 (grouped), 1x1 convs -> stages.{0..3}.{i}.conv{1,2,3}
    res{2..5}_{i}_branch2{a,b,c}_bn_{s,b}                           -> ...bn{1,2,3}
    res{2..5}_0_branch1_w, _bn_{s,b} projection shortcut            -> ...downsample.{0,1}
    pred_w, pred_b                   the ImageNet classifier        -> unused (and *_momentum blobs)

The network. Detectron's ResNeXt-152 32x8d (``configs/12_2017_baselines/
e2e_mask_rcnn_X-152-32x8d-FPN-IN5k_1.44x.yaml``) is [3, 8, 36, 3] bottleneck blocks, 32 groups of
width 8 (inner widths 256, 512, 1024, 2048), a 7x7/2 stem then a 3x3/2 max-pool, and the stride of
a stage's first block on the 3x3 conv (``STRIDE_1X1: False``) and on the 1x1 shortcut. That is
exactly torchvision's ``ResNet(Bottleneck, [3, 8, 36, 3], groups=32, width_per_group=8)``, so no
layer differs. (MSRA's original ResNet-50/101 ``.pkl`` files put the stride on the first 1x1 conv
instead; their tensors have the same shapes, so such a file would load into a different network:
use torchvision's weights for those backbones.)

BatchNorm. Caffe2 folded each BatchNorm into a per-channel affine ``y = x * s + b`` (AffineChannel).
A `FrozenBatchNorm2d` computes ``y = (x - mean) * rsqrt(var + eps) * weight + bias``; with
weight = s, bias = b, mean = 0 and var = 1 - eps the scale is rsqrt(1) = 1 exactly in float32, so
the loaded affine is the file's. The trunk must keep its BatchNorm frozen (``freeze_backbone_bn``):
batch statistics would replace the ones the file folded away.

The input. Caffe2 models were trained on BGR images in 0-255 minus Detectron's ``PIXEL_MEANS``
(102.9801, 115.9465, 122.7717), with no division by a std. Loading sets the model config's
``image_format="bgr255"``, ``image_mean`` and ``image_std`` accordingly; checkpoints save them, and
`pixel_bert.images.ImageTransform.from_config` (training, evaluation, inference) follows them.

Security. A pickle can run any code while it loads. `Caffe2Unpickler` resolves only numpy's array
reconstruction globals and plain containers; any other global (``os.system``, ``subprocess``,
``builtins.eval`` ...) is refused before it can be called.
"""
from __future__ import annotations

import codecs
import os
import pickle
import re
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from .config import DETECTRON_INPUT
from .errors import UserError
from .tensor_files import LoadReport, assign_tensors

DETECTRON_X152_URL = ("https://dl.fbaipublicfiles.com/detectron/ImageNetPretrained/25093814/"
                      "X-152-32x8d-IN5k.pkl")


# -------------------------------------------------------------------------------------------------
#                                   Reading the pickle safely
# -------------------------------------------------------------------------------------------------

def _numpy_core():
    """numpy's ``_core`` package (named ``core`` before numpy 2)."""
    return np._core if hasattr(np, "_core") else np.core


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle asked for a global that a weights file has no business loading."""


class Caffe2Unpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays, dtypes and scalars, dicts, lists and tuples, and
    nothing else: a global outside `ALLOWED` raises `ForbiddenGlobal` instead of being imported."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes in protocol 2 (a re-saved file)
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise ForbiddenGlobal(
                f"global '{module}.{name}' is not allowed: a Caffe2 weights file holds only numpy arrays")
        if module == "_codecs":
            return codecs.encode
        if module == "collections":
            return OrderedDict
        if module == "numpy":
            return getattr(np, name)
        return getattr(_numpy_core().multiarray, name)


def read_caffe2_blobs(path: str) -> Dict[str, np.ndarray]:
    """The numeric arrays of a Detectron ``.pkl`` weights file, by blob name.

    Accepts ``{"blobs": {...}, "cfg": ...}`` and a bare ``{name: array}``; Python-2 strings are read
    as latin-1 (numpy's own convention for Python-2 pickles). Entries that are not numeric arrays
    (a config string, an iteration counter) are skipped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"backbone weights file not found: {path!r}. The ImageNet weights of the x152 preset's "
            f"ResNeXt-152 32x8d are Detectron's X-152-32x8d-IN5k.pkl, published at {DETECTRON_X152_URL}: "
            "download it and pass --backbone_weights /path/to/X-152-32x8d-IN5k.pkl (backbone_weights= in a "
            "ModelConfig).")
    try:
        with open(path, "rb") as f:
            obj = Caffe2Unpickler(f, encoding="latin1").load()
    except ForbiddenGlobal as e:
        raise UserError(f"{path}: refused to load: {e}. Nothing from the file was run.") from e
    except Exception as e:  # truncated or not a pickle at all
        raise UserError(f"{path}: not a readable Caffe2 weights pickle ({type(e).__name__}: {e})") from e
    if isinstance(obj, dict) and isinstance(obj.get("blobs"), dict):
        obj = obj["blobs"]
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a dict of blobs (optionally under 'blobs'), got {type(obj).__name__}")
    blobs = {str(k): v for k, v in obj.items()
             if isinstance(v, np.ndarray) and v.dtype.kind in "fiu"}
    if not blobs:
        raise UserError(f"{path}: holds no numeric arrays; is this a Detectron weights file?")
    return blobs


# -------------------------------------------------------------------------------------------------
#                                 Blob names -> trunk tensors
# -------------------------------------------------------------------------------------------------

_BRANCH = {"conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c",
           "bn1": "branch2a_bn", "bn2": "branch2b_bn", "bn3": "branch2c_bn",
           "downsample.0": "branch1", "downsample.1": "branch1_bn"}
_SUFFIX = {("conv", "weight"): "_w", ("bn", "weight"): "_s", ("bn", "bias"): "_b"}


def caffe2_blob_name(trunk_name: str) -> Optional[str]:
    """The Detectron blob of a `BackboneTrunk` tensor (``stages.0.1.bn2.weight`` ->
    ``res2_1_branch2b_bn_s``); None for tensors no blob holds (BatchNorm running statistics)."""
    m = re.fullmatch(r"stem\.(0|1)\.(\w+)", trunk_name)
    if m:
        layer, kind = ("conv1", "conv") if m.group(1) == "0" else ("res_conv1_bn", "bn")
        suffix = _SUFFIX.get((kind, m.group(2)))
        return layer + suffix if suffix else None
    m = re.fullmatch(r"stages\.(\d+)\.(\d+)\.(conv\d|bn\d|downsample\.[01])\.(\w+)", trunk_name)
    if not m or m.group(3) not in _BRANCH:
        return None
    stage, block, layer, param = int(m.group(1)) + 2, m.group(2), m.group(3), m.group(4)
    kind = "conv" if layer.startswith("conv") or layer == "downsample.0" else "bn"
    suffix = _SUFFIX.get((kind, param))
    return f"res{stage}_{block}_{_BRANCH[layer]}{suffix}" if suffix else None


def trunk_tensors_from_blobs(trunk: nn.Module, blobs: Dict[str, np.ndarray], source: str
                             ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """(trunk name -> tensor, blob names used). Every shape is checked, naming the blob, the trunk
    tensor and both shapes. A folded BatchNorm's running statistics become mean 0 and var 1 - eps,
    so the frozen BatchNorm computes exactly ``x * s + b``."""
    state = trunk.state_dict()
    tensors: Dict[str, torch.Tensor] = {}
    used: List[str] = []
    for name, target in state.items():
        blob = caffe2_blob_name(name)
        if blob is None or blob not in blobs:
            continue
        array = blobs[blob]
        if tuple(array.shape) != tuple(target.shape):
            raise UserError(f"{source}: shape mismatch: blob {blob!r} has {tuple(array.shape)}, the model's "
                             f"{name!r} expects {tuple(target.shape)}; is this the backbone the config builds?")
        tensors[name] = torch.from_numpy(np.asarray(array, dtype=np.float32))
        used.append(blob)
    for name, module in trunk.named_modules():
        if hasattr(module, "running_var") and f"{name}.weight" in tensors:
            tensors[f"{name}.running_mean"] = torch.zeros_like(state[f"{name}.running_mean"])
            tensors[f"{name}.running_var"] = torch.full_like(state[f"{name}.running_var"], 1.0 - module.eps)
    return tensors, used


def load_caffe2_backbone(trunk: nn.Module, path: str, config) -> LoadReport:
    """Load a Detectron ``.pkl`` into ``trunk`` (a `BackboneTrunk`) and set ``config``'s input
    convention to the file's (`use_detectron_input`). Reports loaded trunk tensors, trunk tensors
    left as initialised and blobs not used (the ImageNet classifier ``pred_*``, momenta)."""
    if any(isinstance(m, nn.BatchNorm2d) for m in trunk.modules()):
        raise UserError(f"{path}: Caffe2 weights fold BatchNorm into a fixed per-channel affine, so the "
                         "trunk's BatchNorm must stay frozen: set freeze_backbone_bn=True")
    blobs = read_caffe2_blobs(path)
    statistics = sorted(b for b in blobs if b.endswith(("_bn_rm", "_bn_riv")))
    if statistics:
        raise UserError(f"{path}: holds BatchNorm running statistics ({', '.join(statistics[:2])} ...); this "
                         "loader reads Detectron's folded AffineChannel blobs (*_bn_s, *_bn_b) only")
    tensors, used = trunk_tensors_from_blobs(trunk, blobs, path)
    if not tensors:
        raise UserError(f"{path}: no blob has a Detectron ResNet name (conv1_w, res_conv1_bn_s, "
                         f"res2_0_branch2a_w, ...); found e.g. {sorted(blobs)[:5]}")
    report = LoadReport(path, assign_tensors(trunk, tensors, path))
    report.missing = sorted(set(trunk.state_dict()) - set(tensors))
    report.unused = sorted(set(blobs) - set(used))
    use_detectron_input(config)
    return report


def use_detectron_input(config) -> None:
    """Set the input convention of Caffe2 weights on a model config: BGR in 0-255 minus Detectron's
    ``PIXEL_MEANS``, std 1 (Detectron never divides by a std)."""
    for key, value in DETECTRON_INPUT.items():
        setattr(config, key, value)
