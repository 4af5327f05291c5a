"""The fast paths give the same results as the plain ones: attention without a mask tensor when
nothing is padded, channels_last CNN, CNN activation checkpointing, bf16 CNN under autocast, JPEG
draft decoding and the sorted, tiled retrieval scoring."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pixel_bert import retrieval_scoring
from pixel_bert.config import IMAGENET_MEAN, IMAGENET_STD
from pixel_bert.heads import PixelBertForPreTraining, PixelBertForRetrieval
from pixel_bert.images import ImageTransform, jpeg_draft_scale, load_image, pad_images
from pixel_bert.model import FrozenBatchNorm2d, PixelBert, VisualEmbedding


def _text(B=3, T=7, vocab=64, padded=True):
    ids = torch.randint(5, vocab, (B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    if padded:
        mask[1, 4:] = False
    return ids, mask


def _spy_sdpa(monkeypatch):
    """Record the attn_mask of every F.scaled_dot_product_attention call."""
    seen, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        seen.append(attn_mask)
        return real(q, k, v, attn_mask=attn_mask, **kwargs)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return seen


def _layers(model, x, key_mask, manual):
    for layer in model.layers:
        x, _ = layer(x, key_mask, manual)
    return x


def test_unpadded_batch_attends_without_a_mask_tensor(tiny_config, monkeypatch):
    model = PixelBert(tiny_config).eval()
    seen = _spy_sdpa(monkeypatch)
    ids, mask = _text(padded=False)
    images = torch.randn(3, 3, 64, 64)
    out = model(ids, mask, images)
    assert len(seen) == tiny_config.num_layers and all(m is None for m in seen)
    seen.clear()
    ids_p, mask_p = _text(padded=True)
    model(ids_p, mask_p, images)
    assert len(seen) == tiny_config.num_layers and all(m is not None for m in seen)
    # the mask-free result equals the masked computation with an all-True mask
    x = torch.cat([model.text_embedding(ids), model.encode_image(images).embeddings], 1)
    full_mask = torch.ones(x.shape[:2], dtype=torch.bool)
    assert torch.allclose(out.hidden, _layers(model, x, full_mask, False), atol=1e-5)
    # the manual path is identical in numbers with and without the mask tensor
    assert torch.equal(_layers(model, x, None, True), _layers(model, x, full_mask, True))


def test_channels_last_cnn_same_outputs_and_gradients(tiny_config):
    """The NHWC CNN gives the NCHW one's loss and gradients. Each model has its own config (the flag is
    also read at forward time, so a shared one would feed the "plain" model NHWC input too), and the
    layout that reaches the first convolution is recorded for each."""
    plain = PixelBertForPreTraining(dataclasses.replace(tiny_config, channels_last=False)).train()
    nhwc = PixelBertForPreTraining(dataclasses.replace(tiny_config, channels_last=True)).train()
    nhwc.load_state_dict(plain.state_dict())
    conv = nhwc.bert.visual_embedding.backbone.stem[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert plain.bert.visual_embedding.backbone.stem[0].weight.is_contiguous()
    layouts = {}
    for key, m in (("plain", plain), ("nhwc", nhwc)):
        m.bert.visual_embedding.backbone.stem[0].register_forward_pre_hook(
            lambda _, inputs, key=key: layouts.__setitem__(key, (
                inputs[0].is_contiguous(), inputs[0].is_contiguous(memory_format=torch.channels_last))))
    ids, mask = _text()
    images = torch.randn(3, 3, 64, 80)
    losses = []
    for m in (plain, nhwc):
        _, mlm, itm = m(ids, mask, images)
        loss = mlm.square().mean() + itm.sum()
        loss.backward()
        losses.append(loss.detach())
    assert layouts == {"plain": (True, False), "nhwc": (False, True)}, layouts  # both paths really ran
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)
    grads = dict(plain.named_parameters())
    for name, p in nhwc.named_parameters():  # every gradient, the CNN's and the transformer's
        assert torch.allclose(grads[name].grad, p.grad, rtol=1e-4, atol=1e-6), name


def test_backbone_checkpointing_same_gradients(tiny_config):
    tiny_config.freeze_backbone_bn = True
    plain = PixelBertForPreTraining(tiny_config).train()
    tiny_config.backbone_checkpointing = True
    ckpt = PixelBertForPreTraining(tiny_config).train()
    ckpt.load_state_dict(plain.state_dict())
    ids, mask = _text()
    images = torch.randn(3, 3, 64, 64)
    calls = {}
    for m in (plain, ckpt):
        block = m.bert.visual_embedding.backbone.stages[0][0]
        block.register_forward_pre_hook(lambda *_, m=m: calls.__setitem__(id(m), calls.get(id(m), 0) + 1))
        _, mlm, itm = m(ids, mask, images)
        (mlm.square().mean() + itm.sum()).backward()
    assert calls[id(plain)] == 1 and calls[id(ckpt)] == 2  # recomputed in backward
    for name in ("bert.visual_embedding.backbone.stem.0.weight",
                 "bert.visual_embedding.backbone.stages.1.0.conv1.weight", "bert.layers.0.ffn_in.weight"):
        g1, g2 = dict(plain.named_parameters())[name].grad, dict(ckpt.named_parameters())[name].grad
        assert torch.allclose(g1, g2, rtol=1e-5, atol=1e-7), name
    # trainable BatchNorm statistics would be updated twice by the recomputation: refused
    tiny_config.freeze_backbone_bn = False
    with pytest.raises(ValueError, match="freeze_backbone_bn"):
        VisualEmbedding(tiny_config)


def test_frozen_batchnorm_keeps_the_autocast_dtype():
    bn = torch.nn.BatchNorm2d(8)
    bn.running_mean.normal_()
    frozen = FrozenBatchNorm2d(bn.eval())
    x = torch.randn(2, 8, 5, 5)
    assert frozen(x.bfloat16()).dtype == torch.bfloat16
    assert torch.allclose(frozen(x), bn(x), atol=1e-6)  # fp32 unchanged


def _photo(path, width, height, seed=0):
    """A smooth, photo-like JPEG (gradients plus mild noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([np.sin(6 * x + 1) * 0.5 + 0.5, np.cos(4 * y) * 0.5 + 0.5, x * y], -1) * 200
    rgb += rng.normal(0, 6, rgb.shape)
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(path, quality=90)
    return str(path)


def test_jpeg_draft_same_size_and_nearly_the_same_pixels(tmp_path):
    plain = ImageTransform(24, 40, IMAGENET_MEAN, IMAGENET_STD)
    draft = ImageTransform(24, 40, IMAGENET_MEAN, IMAGENET_STD, jpeg_draft=True)
    used = 0
    for i, (w, h) in enumerate([(133, 101), (67, 50), (129, 97), (97, 130), (211, 45), (40, 24), (401, 17),
                                (1330, 1010)]):
        path = _photo(tmp_path / f"{i}.jpg", w, h, seed=i)
        a, b = plain.load(path), draft.load(path)
        assert a.shape == b.shape, (w, h)
        used += jpeg_draft_scale(w, h, plain.output_size) > 1
        grey_levels = ((a - b) * plain.std * 255).abs().mean()
        # libjpeg's 1/s scaling filters differently from the bilinear antialiased resize: a few
        # grey levels on these tiny noisy outputs (measured up to 3.4), under one for a large photo
        assert grey_levels < (1 if w > 1000 else 4), (w, h, grey_levels)
    assert used >= 5  # the sizes above exercise the reduced decoding
    # a reduced decode that would fall below the target (or change the output size) is not used
    assert jpeg_draft_scale(47, 30, plain.output_size) == 1  # output 38x24; 1/2 would give 24x15
    # PNG: no draft mode, identical pixels
    Image.open(_photo(tmp_path / "p.jpg", 133, 101)).save(tmp_path / "p.png")
    assert torch.equal(draft.load(str(tmp_path / "p.png")), plain(load_image(str(tmp_path / "p.png"))))


def test_jpeg_draft_respects_exif_rotation(tmp_path):
    path = _photo(tmp_path / "r.jpg", 200, 120)
    img = Image.open(path)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees: displayed 120 wide, 200 high
    img.save(tmp_path / "rot.jpg", exif=exif, quality=90)
    draft = ImageTransform(24, 40, IMAGENET_MEAN, IMAGENET_STD, jpeg_draft=True)
    plain = ImageTransform(24, 40, IMAGENET_MEAN, IMAGENET_STD)
    assert jpeg_draft_scale(200, 120, plain.output_size) == 4
    out, ref = draft.load(str(tmp_path / "rot.jpg")), plain.load(str(tmp_path / "rot.jpg"))
    assert out.shape == ref.shape == (3, 40, 24)  # upright: portrait
    assert (out - ref).abs().mean() < 2 / 255 / 0.225


def test_sorted_tiled_retrieval_scores_equal_per_pair_scores(tiny_config, tmp_path):
    """Images of different shapes (different counts of valid visual tokens) and captions of
    different lengths: the tiled scoring of the feature cache gives every pair's own score."""
    torch.manual_seed(3)
    model = PixelBertForRetrieval(tiny_config).eval()
    torch.nn.init.normal_(model.retrieval.score.weight, std=0.5)
    transform = ImageTransform(32, 64, IMAGENET_MEAN, IMAGENET_STD)
    sizes = [(64, 32), (32, 32), (40, 64), (64, 48), (32, 32)]
    paths = [_photo(tmp_path / f"{i}.jpg", w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    cache = retrieval_scoring.encode_images(model, paths, range(len(paths)), transform, torch.device("cpu"),
                                    batch_size=5, log=lambda *_: None)  # padded as the reference
    assert len(set(cache.lengths)) >= 3
    n_cap, T = 7, 9
    ids = torch.randint(5, tiny_config.vocab_size, (n_cap, T))
    lengths = torch.tensor([9, 3, 5, 9, 4, 6, 3])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    ids = ids.masked_fill(~mask, 0)
    tiled = retrieval_scoring.score_rows(model, cache, ids, mask, torch.device("cpu"), pairs_per_batch=6)
    # padded as encode_images pads (to a multiple of the feature stride): padding changes the CNN's
    # output at an image's border (its max-pool windows see padded pixels there, not -inf)
    images, pixel_mask = pad_images([transform.load(p) for p in paths], size_divisor=tiny_config.feature_stride)
    naive = retrieval_scoring.score_pairs_uncached(model, images, pixel_mask, ids, mask, torch.device("cpu"))
    assert tiled.shape == (5, 7) and torch.allclose(tiled, naive, atol=1e-5)
    assert naive.std() > 1e-3
