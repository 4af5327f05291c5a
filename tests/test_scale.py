"""benchmarks/scale.py's counting and arithmetic, the frozen CNN stages it projects with, and the GPU
JPEG decode's data path on the CPU (docs/costs.md)."""
import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pixel_bert import device_decode, synthetic
from pixel_bert.annotations import CaptionRecord
from pixel_bert.batches import CaptionCollator, CaptionDataset
from pixel_bert.config import IMAGENET_MEAN, IMAGENET_STD, TrainConfig, make_model_config
from pixel_bert.heads import PixelBertForPreTraining
from pixel_bert.images import ImageTransform
from pixel_bert.model import PixelBert, VisualEmbedding, VisualTokens
from pixel_bert.optim import build_optimizers
from pixel_bert.tokenizer import WordPieceTokenizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import scale  # noqa: E402


# ---- counting ---------------------------------------------------------------------------------------

def test_flops_of_a_linear_are_the_hand_count():
    lin = torch.nn.Linear(6, 5)
    x = torch.randn(4, 6, requires_grad=True)
    out = scale.count_pass(lambda: lin(x).sum(), list(lin.parameters()))
    assert out["forward"] == 2 * 4 * 6 * 5
    assert out["backward"] == 2 * out["forward"]  # the gradients of the input and of the weight
    frozen_input = scale.count_pass(lambda: lin(x.detach()).sum(), list(lin.parameters()))
    assert frozen_input["backward"] == out["forward"]  # the weight's only


def test_saved_tensors_of_an_mlp_are_the_hand_count():
    """Linear -> ReLU -> Linear on an input without gradient: the first layer keeps its input (for its
    weight's gradient), ReLU its output, the second layer the same output (one storage, counted once);
    the weights are parameters and do not count. Units: each layer's input and its own saved tensors."""
    first, second = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)
    mlp = torch.nn.Sequential(first, torch.nn.ReLU(), second)
    x = torch.randn(3, 8)
    saved = scale.SavedTensors(list(mlp.parameters())).watch({"first": first, "second": second})
    with saved:
        mlp(x).sum()
    assert saved.total == (3 * 8 + 3 * 16) * 4
    assert saved.by_unit() == {"first": 3 * 8 * 4, None: 3 * 16 * 4}  # ReLU saved the hidden first
    # checkpointed: the two inputs, nothing outside them but ReLU's output, plus the larger unit's own
    assert saved.checkpointed() == (3 * 8 + 3 * 16) * 4 + 3 * 16 * 4 + 3 * 8 * 4


def test_meta_counts_are_those_of_real_tensors(tiny_config):
    """The meta device's saved bytes and FLOPs are those of the same pass on real CPU tensors."""
    tiny_config.freeze_backbone_bn = True
    counts = scale.cnn_counts(tiny_config, (64, 96), 2, torch.float32)
    torch.manual_seed(0)
    visual = VisualEmbedding(tiny_config).train()
    images = torch.randn(2, 3, 64, 96)
    real = scale.count_pass(lambda: visual(images, None, tiny_config.num_sampled_pixels).embeddings.float().sum(),
                            list(visual.parameters()))
    assert (counts["forward"], counts["backward"], counts["saved"]) == (real["forward"], real["backward"], real["saved"])
    assert counts["saved"] > 0 and counts["backward"] > counts["forward"]


def test_the_transformer_pass_counts_the_model_forward(tiny_config):
    """scale.joint_sequence + the heads count the FLOPs of PixelBertForPreTraining's own forward and
    losses (nothing padded, k predicted tokens per caption)."""
    B, T, P, k = 2, 9, 5, scale.MLM_PREDICTED_PER_SAMPLE
    expected = scale.transformer_counts(tiny_config, T, P, B, torch.float32)
    model = PixelBertForPreTraining(tiny_config).train()
    ids = torch.randint(5, tiny_config.vocab_size, (B, T))
    labels = torch.full((B, T), -100)
    labels[:, 1:1 + k] = 3
    emb = torch.randn(B, P, tiny_config.hidden_size, requires_grad=True)
    visual = VisualTokens(emb, torch.ones(B, P, dtype=torch.bool), torch.arange(P).expand(B, -1), (1, P))

    def run():
        _, mlm, itm = model(ids, torch.ones(B, T, dtype=torch.bool), visual=visual)
        return F.cross_entropy(mlm[labels != -100].float(), labels[labels != -100]) + \
            F.binary_cross_entropy_with_logits(itm.float(), torch.zeros(B))
    with sdpa_kernel(SDPBackend.MATH):  # the meta device's attention is the math one
        real = scale.count_pass(run, list(model.parameters()))
    assert (expected["forward"], expected["backward"]) == (real["forward"], real["backward"])


# ---- the script's arithmetic ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    path = tmp_path_factory.mktemp("scale") / "scale.json"
    scale.main(["--smoke", "--repeat", "1", "--warmup", "0", "--json", str(path)])
    return json.loads(path.read_text())


def test_smoke_memory_arithmetic(smoke):
    usable32 = 32 * 2 ** 30 * (1 - smoke["headroom"])
    counts = smoke["counts"]["tiny 64x64"]
    for row in smoke["memory"]:
        per_sample, static = row["per_sample_mib"] * 2 ** 20, row["static_gib"] * 2 ** 30
        fixed = max(counts["cnn"][row["setting"]]["fixed"], 0)
        assert row["at_64_gib"] * 2 ** 30 == pytest.approx(static + fixed + 64 * per_sample)
        n = row["max_batch_32gb"]
        assert static + fixed + n * per_sample <= usable32 < static + fixed + (n + 1) * per_sample
    by_setting = {r["setting"]: r["per_sample_mib"] for r in smoke["memory"]}
    plain, ckpt, frozen, both = (by_setting[s] for s, _, _ in scale.MEMORY_SETTINGS)
    assert ckpt < plain and frozen < plain and both < min(ckpt, frozen)


def test_smoke_flops_and_projections_are_consistent(smoke, tiny_config):
    cnn = smoke["counts"]["tiny 64x64"]["cnn"]
    plain, ckpt, frozen, _ = (cnn[s]["flops"] for s, _, _ in scale.MEMORY_SETTINGS)
    # recomputation costs one more forward of the trunk (without the stem's maxpool, no FLOPs)
    config = make_model_config("tiny", backbone_weights=None)
    trunk = VisualEmbedding(config).backbone
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        trunk(torch.zeros(1, 3, 64, 64))
    assert ckpt - plain == counter.get_total_flops()
    assert frozen < plain
    samples = scale.pretrain_samples()
    assert samples["sentences"] == 40 * (533_000 + 5_060_000) and samples["images"] == 40 * (106_000 + 101_000)
    gpus = dict((name, n) for name, _, n in scale.SETUPS)
    for row in smoke["steps"]:
        card = scale.CARDS["V100" if "V100" in row["setup"] else "H100"]
        assert row["compute_step_s"] == pytest.approx(64 * row["gflop_per_sample"] * 1e9
                                                      / (card["peak_tflops"] * 1e12 * row["mfu"]))
        assert row["images_s_per_gpu"] * row["compute_step_s"] == pytest.approx(64)
        assert row["step_s"] >= row["compute_step_s"]
        assert (row["bound"] == "image decoding") == (row["cores_needed"] > row["workers_per_gpu"])
        steps = samples["sentences"] / (64 * gpus[row["setup"]])
        assert row["days_sentence_epochs"] == pytest.approx(steps * row["step_s"] / 86400)
    for row in smoke["evaluations"]:
        assert row["pairs_s_total"] == pytest.approx(row["pairs_s_per_gpu"] * gpus[row["setup"]])
        assert row["hours"] * 3600 * row["pairs_s_total"] >= row["pairs"]  # plus the CNN's time
    assert {r["evaluation"]: r["pairs"] for r in smoke["evaluations"]} == {
        "COCO 5K": 5000 * 25000, "COCO 1K": 5 * 1000 * 5000, "Flickr30K 1K": 1000 * 5000}


# ---- frozen CNN stages ------------------------------------------------------------------------------

def test_frozen_stages_keep_nothing_for_backward_and_get_no_gradient(tiny_config):
    tiny_config.freeze_backbone_bn = True
    plain = PixelBertForPreTraining(tiny_config).train()
    tiny_config.backbone_frozen_stages = 2  # the stem and res2
    frozen = PixelBertForPreTraining(tiny_config).train()
    frozen.load_state_dict(plain.state_dict())
    ids, mask = torch.randint(5, 64, (3, 6)), torch.ones(3, 6, dtype=torch.bool)
    images = torch.randn(3, 3, 64, 64)
    inside, res3_input = {}, {}
    for name, m in (("plain", plain), ("frozen", frozen)):
        trunk = m.bert.visual_embedding.backbone
        saved = scale.SavedTensors(list(m.parameters())).watch({"stem": trunk.stem, "res2": trunk.stages[0],
                                                                "res3": trunk.stages[1]})
        with saved:
            _, mlm, itm = m(ids, mask, images)
        (mlm.square().mean() + itm.sum()).backward()
        inside[name], res3_input[name] = saved.by_unit(), sum(saved.unit_inputs["res3"].values())
    assert inside["plain"]["stem"] > 0 and inside["plain"]["res2"] > 0
    assert "stem" not in inside["frozen"] and "res2" not in inside["frozen"]  # nothing kept for backward
    # res3 keeps what it kept, and its input (unfrozen, res2 had saved that storage first)
    assert inside["frozen"]["res3"] == inside["plain"]["res3"] + res3_input["plain"]
    trunk = frozen.bert.visual_embedding.backbone
    for p in list(trunk.stem.parameters()) + list(trunk.stages[0].parameters()):
        assert not p.requires_grad and p.grad is None
    named = dict(plain.named_parameters())
    for name, p in frozen.named_parameters():  # everything else: the gradient it gets unfrozen
        if p.requires_grad:
            torch.testing.assert_close(p.grad, named[name].grad, rtol=1e-5, atol=1e-7)
    trained = {id(p) for opt in build_optimizers(frozen, TrainConfig()) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in trained for p in trunk.stem.parameters())
    assert id(trunk.stages[1][0].conv1.weight) in trained


def test_frozen_stages_need_frozen_batchnorm_and_a_stage_to_freeze(tiny_config):
    tiny_config.backbone_frozen_stages = 1
    tiny_config.freeze_backbone_bn = False
    with pytest.raises(ValueError, match="freeze_backbone_bn"):
        PixelBert(tiny_config)
    with pytest.raises(ValueError, match="backbone_frozen_stages must be 0..3"):
        make_model_config("tiny", backbone_frozen_stages=4)  # 2 residual stages + the stem


# ---- decoding on the device (its CPU path) ------------------------------------------------------------

def _photo(path, size=(160, 120), exif_orientation=None):
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size[1], 0:size[0]] / max(size)
    rgb = np.stack([np.sin(7 * x) * 0.5 + 0.5, np.cos(5 * y) * 0.5 + 0.5, x * y + 0.2 * (x > 0.5)], -1) * 220
    img = Image.fromarray(np.clip(rgb + rng.normal(0, 5, rgb.shape), 0, 255).astype(np.uint8))
    kwargs = {}
    if exif_orientation:
        exif = Image.Exif()
        exif[device_decode.EXIF_ORIENTATION] = exif_orientation
        kwargs["exif"] = exif
    img.save(path, quality=90, **kwargs)
    return str(path)


@pytest.mark.parametrize("image_format", ["rgb", "bgr255"])
def test_device_decode_on_cpu_matches_the_pillow_path(tmp_path, image_format):
    transform = ImageTransform(200, 333, IMAGENET_MEAN if image_format == "rgb" else (100.0, 110.0, 120.0),
                               IMAGENET_STD if image_format == "rgb" else (1.0, 1.0, 1.0), image_format)
    decoder = device_decode.DeviceDecoder(transform, "cpu")
    scale_to_grey_levels = transform.std * (255.0 if image_format == "rgb" else 1.0)
    for i, size in enumerate([(160, 120), (120, 160), (640, 480), (97, 61)]):  # up- and down-scaling
        path = _photo(tmp_path / f"{i}.jpg", size)
        pillow = transform.load(path)
        encoded = device_decode.read_encoded(path, transform)
        assert isinstance(encoded, device_decode.EncodedImage)
        (ours,) = decoder([encoded])
        assert ours.shape == pillow.shape
        grey_levels = ((ours - pillow) * scale_to_grey_levels).abs()
        assert grey_levels.mean() < 1.0, size  # libjpeg and libjpeg-turbo, float and uint8 resizing
        assert grey_levels.max() < 24, size


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_as_pillow(tmp_path, orientation):
    path = _photo(tmp_path / "o.jpg", (48, 32), exif_orientation=orientation)
    raw = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    upright = torch.from_numpy(np.array(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))).permute(2, 0, 1)
    encoded = device_decode.read_encoded(path)
    assert encoded.orientation == orientation
    assert torch.equal(device_decode.apply_orientation(raw, orientation), upright)


def test_encoded_batches_decode_to_the_collators_batch(tmp_path):
    """The data path end to end: EncodedCaptionDataset + EncodedCaptionCollator + decode_batch give the
    batch CaptionDataset + CaptionCollator give (a PNG decoded in the worker; a truncated JPEG dropped
    and counted as a bad sample)."""
    transform = ImageTransform(64, 96, IMAGENET_MEAN, IMAGENET_STD)
    paths = [_photo(tmp_path / "a.jpg", (160, 120)), _photo(tmp_path / "b.jpg", (90, 120))]
    Image.open(paths[0]).save(tmp_path / "c.png")
    paths.append(str(tmp_path / "c.png"))
    records = [CaptionRecord(p, f"a red circle {i}", f"k{i}") for i, p in enumerate(paths)]
    tokenizer = WordPieceTokenizer(synthetic.write_vocab(str(tmp_path / "vocab.txt")))
    reference = CaptionCollator(tokenizer, 16, 32)([CaptionDataset(records, transform)[i] for i in range(3)])
    encoded = device_decode.EncodedCaptionDataset(records, transform)
    samples = [encoded[i] for i in range(3)]
    assert [type(s["image"]).__name__ for s in samples] == ["EncodedImage", "EncodedImage", "Tensor"]
    batch = device_decode.decode_batch(device_decode.EncodedCaptionCollator(tokenizer, 16, 32)(samples), transform,
                                       32, "cpu")
    assert batch["images"].shape == reference["images"].shape
    assert torch.equal(batch["pixel_mask"], reference["pixel_mask"])
    assert (batch["images"] - reference["images"]).abs().mean() < 0.02
    assert torch.equal(batch["input_ids"], reference["input_ids"])
    # a JPEG cut short passes the header check in the worker and fails on the device: dropped and counted
    data = open(paths[1], "rb").read()
    open(tmp_path / "cut.jpg", "wb").write(data[: len(data) // 3])
    records[1] = CaptionRecord(str(tmp_path / "cut.jpg"), "a cut one", "cut")
    samples = [device_decode.EncodedCaptionDataset(records, transform)[i] for i in range(3)]
    batch = device_decode.decode_batch(device_decode.EncodedCaptionCollator(tokenizer, 16, 32)(samples), transform,
                                       32, "cpu")
    assert batch["num_samples"] == 2 and batch["num_bad"] == 1 and batch["image_keys"] == ["k0", "k2"]
    assert batch["bad_samples"][0].path.endswith("cut.jpg") and len(batch["images"]) == 2


def test_train_with_decode_images_on_device(tmp_path, monkeypatch):
    """train.py with --decode-images-on-device true on JPEGs in the COCO captions layout: the workers
    hand over the bytes, the step decodes them (on the CPU here) and training runs."""
    import json as json_module
    from pixel_bert import train
    folder = tmp_path / "coco"
    synthetic.main(["--out", str(folder), "--num-images", "8", "--image-size", "48"])
    captions = json_module.loads((folder / "captions_train2014.json").read_text())
    for image in captions["images"]:  # the same world as JPEGs
        png = folder / "images" / image["file_name"]
        image["file_name"] = png.with_suffix(".jpg").name
        Image.open(png).convert("RGB").save(png.with_suffix(".jpg"), quality=95)
    (folder / "captions_train2014.json").write_text(json_module.dumps(captions))
    decoded = []
    real = device_decode.DeviceDecoder._decode
    monkeypatch.setattr(device_decode.DeviceDecoder, "_decode",
                        lambda self, encoded: decoded.append(len(encoded)) or real(self, encoded))
    result = train.main(["--config", "demo", "--vocab-file", str(folder / "vocab.txt"), "--hidden-size", "32",
                         "--num-layers", "1", "--num-heads", "2", "--intermediate-size", "64",
                         "--num-workers", "0", "--device", "cpu", "--batch-size", "4", "--max-steps", "2",
                         "--coco-captions", str(folder / "captions_train2014.json"),
                         "--decode-images-on-device", "true", "--output-dir", str(tmp_path / "run"), "--resume", "none"])
    assert result["steps"] == 2
    assert decoded == [4, 4]  # every batch's JPEGs decoded in one call by the step
