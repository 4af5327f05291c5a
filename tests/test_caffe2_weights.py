"""Detectron (Caffe2) backbone weights: the Python-2 pickle read safely, blob names mapped onto the
trunk with folded BatchNorm, the BGR/0-255 input convention carried by the config, and train.py
starting the x152 preset from such a file."""
import os
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torchvision.models.resnet import Bottleneck, ResNet, resnet18, resnet50

from pixel_bert import train
from pixel_bert.caffe2_weights import DETECTRON_X152_URL, caffe2_blob_name, trunk_tensors_from_blobs
from pixel_bert.config import DETECTRON_PIXEL_MEANS, IMAGENET_MEAN, IMAGENET_STD, make_model_config
from pixel_bert.heads import PixelBertForPreTraining
from pixel_bert.images import ImageTransform
from pixel_bert.inference import PixelBertPredictor
from pixel_bert.model import BackboneTrunk, PixelBert, build_resnet, freeze_batchnorm
from pixel_bert.pretrained import load_backbone_weights
from pixel_bert.saved_model import load_saved_model, save_model

SMALL = dict(vocab_size=64, hidden_size=64, num_layers=1, num_heads=4, intermediate_size=64,
             image_short_side=64, image_long_side=64, bert_weights=None)


class Python2Pickler(pickle._Pickler):
    """Writes what Detectron's Python-2 cPickle wrote: every string as a Python-2 ``str`` (BINSTRING
    opcodes) and numpy's globals under their Python-2-era module ``numpy.core``."""
    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        head = (pickle.SHORT_BINSTRING + bytes([len(data)]) if len(data) < 256
                else pickle.BINSTRING + struct.pack("<i", len(data)))
        self.write(head + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def write_pkl(path, blobs, wrapped=True):
    payload = {"blobs": blobs, "cfg": "MODEL:\n  TYPE: generalized_rcnn\n"} if wrapped else blobs
    with open(path, "wb") as f:
        Python2Pickler(f, protocol=2).dump(payload)
    return str(path)


def detectron_blobs(resnet: ResNet, stages: int = 4) -> dict:
    """A torchvision ResNet as Detectron stores it (detectron/modeling/ResNet.py): each BatchNorm
    folded into an AffineChannel scale ``_s`` and bias ``_b``, float32 numpy arrays, Caffe2 names."""
    blobs = {}

    def put(conv_name, conv, bn_name, bn):
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        blobs[conv_name + "_w"] = conv.weight.detach().numpy().copy()
        blobs[bn_name + "_s"] = scale.detach().numpy().copy()
        blobs[bn_name + "_b"] = (bn.bias - bn.running_mean * scale).detach().numpy().copy()

    put("conv1", resnet.conv1, "res_conv1_bn", resnet.bn1)
    for stage in range(stages):
        for i, block in enumerate(getattr(resnet, f"layer{stage + 1}")):
            prefix = f"res{stage + 2}_{i}"
            for conv, bn, branch in (("conv1", "bn1", "branch2a"), ("conv2", "bn2", "branch2b"),
                                     ("conv3", "bn3", "branch2c")):
                put(f"{prefix}_{branch}", getattr(block, conv), f"{prefix}_{branch}_bn", getattr(block, bn))
            if block.downsample is not None:
                put(f"{prefix}_branch1", block.downsample[0], f"{prefix}_branch1_bn", block.downsample[1])
    blobs["pred_w"] = np.zeros((5, 2048), np.float32)  # the ImageNet-5k classifier, not ours to load
    blobs["pred_b"] = np.zeros(5, np.float32)
    blobs["conv1_w_momentum"] = np.zeros_like(blobs["conv1_w"])
    return blobs


def randomise_batchnorm(resnet: ResNet) -> ResNet:
    """Non-trivial statistics and affines, so a fold or a mapping that is off shows in the output."""
    with torch.no_grad():
        for m in resnet.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return resnet.eval()


def solid_image(rgb=(200, 100, 50), size=(64, 64)):
    return Image.new("RGB", size, rgb)


@pytest.mark.parametrize("wrapped", [True, False])
def test_detectron_pkl_gives_the_source_network_features(tmp_path, wrapped):
    source = randomise_batchnorm(resnet50(weights=None))
    path = write_pkl(tmp_path / "r50.pkl", detectron_blobs(source), wrapped)
    config = make_model_config("tiny", backbone="resnet50", backbone_stages=2, freeze_backbone_bn=True,
                               backbone_weights=path, **SMALL)
    assert config.image_format == "bgr255"  # the .pkl sets the input convention before any transform
    model = PixelBert(config)
    report = load_backbone_weights(model, path, verbose=False)
    trunk = model.visual_embedding.backbone
    assert report.missing == []
    assert {"pred_w", "pred_b", "conv1_w_momentum", "res4_0_branch2a_w", "res5_2_branch2c_bn_b"} <= set(report.unused)
    assert "stages.1.3.bn3.running_var" in report.loaded
    image = ImageTransform.from_config(model.config)(solid_image())[None]  # (1, 3, 64, 64)
    image = image + 20 * torch.randn_like(image)  # texture, so every channel and position matters
    with torch.no_grad():
        ours = trunk.eval()(image)
        ref = source.layer2(source.layer1(source.maxpool(source.relu(source.bn1(source.conv1(image))))))
    assert ours.shape == ref.shape == (1, 512, 8, 8)
    err = (ours - ref).abs().max().item() / ref.abs().max().item()
    print(f"Detectron pkl vs source network: max relative error {err:.2e}")
    assert err < 1e-5


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")
def test_full_x152_name_map_matches_detectron_layout():
    """Every tensor of the ResNeXt-152 32x8d trunk has the Detectron blob of the same shape, built here
    from detectron/modeling/ResNet.py's layout (names + shapes only; the trunk lives on the meta device)."""
    expected = {"conv1_w": (64, 3, 7, 7), "res_conv1_bn_s": (64,), "res_conv1_bn_b": (64,)}
    dim_in = 64
    for k, blocks in enumerate((3, 8, 36, 3)):
        stage, dim_out, inner = k + 2, (256, 512, 1024, 2048)[k], 32 * 8 * 2 ** k  # NUM_GROUPS x WIDTH_PER_GROUP
        for i in range(blocks):
            p = f"res{stage}_{i}"
            shapes = {"branch2a": (inner, dim_in, 1, 1), "branch2b": (inner, inner // 32, 3, 3),
                      "branch2c": (dim_out, inner, 1, 1)}
            if i == 0:
                shapes["branch1"] = (dim_out, dim_in, 1, 1)
            for branch, shape in shapes.items():
                expected[f"{p}_{branch}_w"] = shape
                expected[f"{p}_{branch}_bn_s"] = expected[f"{p}_{branch}_bn_b"] = (shape[0],)
            dim_in = dim_out
    assert len(expected) == 3 + 9 * (3 + 8 + 36 + 3) + 3 * 4
    with torch.device("meta"):
        trunk = freeze_batchnorm(BackboneTrunk(build_resnet("resnext152_32x8d")))
    mapped = {caffe2_blob_name(n): tuple(t.shape) for n, t in trunk.state_dict().items() if caffe2_blob_name(n)}
    assert mapped == expected
    unmapped = [n for n in trunk.state_dict() if caffe2_blob_name(n) is None]
    assert unmapped and all(n.endswith(("running_mean", "running_var")) for n in unmapped)
    # the loader's own pass over the full layout: zero-stride arrays cost no memory
    blobs = {k: np.broadcast_to(np.float32(0.5), v) for k, v in expected.items()}
    tensors, used = trunk_tensors_from_blobs(trunk, blobs, "X-152-32x8d-IN5k.pkl")
    assert set(tensors) == set(trunk.state_dict()) and sorted(used) == sorted(expected)


def test_crafted_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"blobs": {"conv1_w": Evil()}}, protocol=2))
    model = PixelBert(make_model_config("tiny", freeze_backbone_bn=True, **SMALL))
    with pytest.raises(ValueError, match=r"evil.pkl: refused to load: global '\w+\.system' is not allowed"):
        load_backbone_weights(model, str(path), verbose=False)
    assert not marker.exists()
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="junk.pkl: not a readable Caffe2 weights pickle"):
        load_backbone_weights(model, str(tmp_path / "junk.pkl"), verbose=False)
    # folded BatchNorm cannot go into a BatchNorm that trains its statistics
    unfrozen = PixelBert(make_model_config("tiny", freeze_backbone_bn=False, **SMALL))
    with pytest.raises(ValueError, match="freeze_backbone_bn=True"):
        load_backbone_weights(unfrozen, str(path), verbose=False)


def test_shape_mismatch_names_the_blob_and_both_shapes(tmp_path):
    config = make_model_config("tiny", freeze_backbone_bn=True, **SMALL)  # resnet18 trunk to stage 2
    blobs = detectron_blobs(randomise_batchnorm(ResNet(Bottleneck, [1, 1, 1, 1])), stages=2)
    blobs = {k: v for k, v in blobs.items() if k.startswith(("conv1", "res_conv1", "res2_0_branch2a"))}
    path = write_pkl(tmp_path / "wrong.pkl", blobs)
    model = PixelBert(config)
    before = model.visual_embedding.backbone.stem[0].weight.clone()
    with pytest.raises(ValueError, match=r"blob 'res2_0_branch2a_w' has \(64, 64, 1, 1\), the model's "
                                         r"'stages.0.0.conv1.weight' expects \(64, 64, 3, 3\)"):
        load_backbone_weights(model, path, verbose=False)
    assert torch.equal(model.visual_embedding.backbone.stem[0].weight, before)  # nothing half-loaded
    assert model.config.image_format == "rgb"


def test_image_format_round_trips_and_transform_gives_bgr255_minus_means(tmp_path):
    config = make_model_config("tiny", backbone_weights=str(tmp_path / "X.pkl"), **SMALL)
    assert (config.image_format, config.image_mean, config.image_std) == ("bgr255", DETECTRON_PIXEL_MEANS,
                                                                          (1.0, 1.0, 1.0))
    config.backbone_weights = None  # as load_saved_model does: the checkpoint holds the CNN
    save_model(PixelBertForPreTraining(config), str(tmp_path / "model.pt"), extra={"task": "pretrain"})
    loaded = load_saved_model(str(tmp_path / "model.pt")).model
    assert loaded.config.image_format == "bgr255" and loaded.config.image_mean == DETECTRON_PIXEL_MEANS
    predictor = PixelBertPredictor(loaded, tokenizer=None, task="pretrain")
    r, g, b = 200, 100, 50
    x = predictor.transform(solid_image((r, g, b)))
    expected = torch.tensor([b, g, r], dtype=torch.float32) - torch.tensor(DETECTRON_PIXEL_MEANS)
    assert torch.allclose(x[:, 10, 10], expected, atol=1e-4)
    # torchvision's convention is unchanged: RGB in [0, 1], ImageNet mean / std
    plain = ImageTransform.from_config(make_model_config("tiny", **SMALL))(solid_image((r, g, b)))
    expected = (torch.tensor([r, g, b]) / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(plain[:, 10, 10], expected, atol=1e-6)
    with pytest.raises(ValueError, match="image_format"):
        make_model_config("tiny", image_format="bgr", **SMALL)
    # torchvision weights loaded into a bgr255 model bring their own convention back
    torch.save(resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    model = PixelBert(make_model_config("tiny", backbone_weights=str(tmp_path / "X.pkl"), **SMALL))
    load_backbone_weights(model, str(tmp_path / "r18.pth"), verbose=False)
    assert (model.config.image_format, model.config.image_mean) == ("rgb", IMAGENET_MEAN)


def test_x152_preset_names_the_file_flag_and_url_when_missing(tmp_path, monkeypatch):
    config = make_model_config("x152")
    assert config.backbone_weights == "X-152-32x8d-IN5k.pkl" and config.image_format == "bgr255"
    monkeypatch.chdir(tmp_path)
    model = PixelBert(make_model_config("tiny", freeze_backbone_bn=True, **SMALL))
    with pytest.raises(FileNotFoundError, match="--backbone_weights") as e:
        load_backbone_weights(model, config.backbone_weights, verbose=False)
    assert DETECTRON_X152_URL in str(e.value)


def test_train_starts_the_x152_preset_from_a_detectron_file(tmp_path):
    """train.py --config pretrain-x152 with the Detectron file: the x152 trunk cut after res2 (the
    shapes of X-152-32x8d-IN5k.pkl's stem and res2 blobs), a small transformer, no step taken."""
    source = randomise_batchnorm(ResNet(Bottleneck, [3, 1, 1, 1], groups=32, width_per_group=8))
    blobs = detectron_blobs(source, stages=1)
    path = write_pkl(tmp_path / "X-152-32x8d-IN5k.pkl", blobs)
    out = tmp_path / "run"
    result = train.main([
        "--config", "pretrain-x152", "--backbone_weights", path, "--backbone_stages", "1",
        "--bert_weights", "none", "--vocab_size", "64", "--hidden_size", "48", "--num_layers", "1",
        "--intermediate_size", "64", "--image_short_side", "64", "--image_long_side", "64",
        "--num_sampled_pixels", "8", "--num_workers", "0", "--device", "cpu", "--synthetic-images", "16",
        "--synthetic-eval-images", "0", "--batch_size", "8", "--max-steps", "0", "--resume", "none",
        "--output-dir", str(out)])
    assert result["steps"] == 0
    model = load_saved_model(str(out / "model.pt")).model
    assert model.config.backbone == "resnext152_32x8d" and model.config.image_format == "bgr255"
    trunk = model.bert.visual_embedding.backbone
    assert torch.equal(trunk.stem[0].weight, torch.from_numpy(blobs["conv1_w"]))
    assert torch.equal(trunk.stages[0][2].conv2.weight, torch.from_numpy(blobs["res2_2_branch2b_w"]))
    assert trunk.stages[0][2].conv2.weight.shape == (256, 8, 3, 3)  # 32 groups of width 8
