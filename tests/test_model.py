"""The model's modules: shapes, masking, pixel sampling, attention paths, gradients (Sec. 3.2 of the paper)."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pixel_bert.config import make_model_config
from pixel_bert.heads import (ITMHead, PixelBertForNLVR2, PixelBertForPreTraining, PixelBertForRetrieval,
                              PixelBertForVQA)
from pixel_bert.model import PixelBert, TextEmbedding, VisualEmbedding
from pixel_bert.model import TransformerBlock


def _text(config, B=3, T=7):
    ids = torch.randint(5, config.vocab_size, (B, T))
    ids[:, 0] = 2
    mask = torch.ones(B, T, dtype=torch.bool)
    if B > 1:  # the second sentence is shorter: padded
        mask[1, 4:] = False
        ids[1, 4:] = 0
    return ids, mask


def test_visual_embedding_shapes_and_grid(tiny_config):
    emb = VisualEmbedding(tiny_config).eval()
    images = torch.randn(2, 3, 96, 128)
    v = emb(images)
    assert tiny_config.feature_stride == 16
    assert v.grid == (6, 8)
    assert v.embeddings.shape == (2, 48, tiny_config.hidden_size)
    assert v.mask.all() and v.positions.shape == (2, 48)


def test_feature_mask_follows_padding(tiny_config):
    emb = VisualEmbedding(tiny_config).eval()
    images = torch.randn(2, 3, 96, 96)
    pixel_mask = torch.ones(2, 96, 96, dtype=torch.bool)
    pixel_mask[1, 50:, :] = False   # 50 valid rows -> ceil(50/16) = 4 feature rows
    pixel_mask[1, :, 33:] = False   # 33 valid columns -> ceil(33/16) = 3 feature columns
    v = emb(images, pixel_mask)
    grid = v.mask.view(2, 6, 6)
    assert grid[0].all()
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[:4, :3] = True
    assert torch.equal(grid[1], expected)


def test_pixel_sampling_k_valid_random_and_off_in_eval(tiny_config):
    emb = VisualEmbedding(tiny_config).train()
    images = torch.randn(2, 3, 96, 96)
    pixel_mask = torch.ones(2, 96, 96, dtype=torch.bool)
    pixel_mask[1, 48:, :] = False  # image 1: 3x6 = 18 valid pixels
    a = emb(images, pixel_mask, num_sampled_pixels=10)
    b = emb(images, pixel_mask, num_sampled_pixels=10)
    assert a.embeddings.shape == (2, 10, tiny_config.hidden_size)
    assert a.mask.all()  # 10 <= valid count: every sampled pixel is a valid one
    assert (a.positions[1] < 18).all()  # valid pixels of image 1 are the first 3 rows
    assert len(set(a.positions[0].tolist())) == 10  # without replacement
    assert not torch.equal(a.positions, b.positions)  # a fresh sample each call
    # fewer valid pixels than k: all of them are kept, the rest masked
    c = emb(images, pixel_mask, num_sampled_pixels=30)
    assert c.mask[0].all() and c.mask[1].sum() == 18
    assert set(c.positions[1][c.mask[1]].tolist()) == set(range(18))
    # sampled tokens are exactly the full grid's tokens at those positions (BatchNorm held fixed)
    emb.backbone.eval()
    a = emb(images, pixel_mask, num_sampled_pixels=10)
    full = emb.eval()(images, pixel_mask)
    picked = full.embeddings.gather(1, a.positions[..., None].expand(-1, -1, full.embeddings.shape[-1]))
    assert torch.allclose(picked, a.embeddings, atol=1e-6)
    # in eval mode sampling is off: fine-tuning and testing use all pixels
    emb.eval()
    d = emb(images, pixel_mask, num_sampled_pixels=10)
    assert d.embeddings.shape[1] == 36


def test_text_embedding_shape_and_too_long(tiny_config):
    emb = TextEmbedding(tiny_config)
    ids, _ = _text(tiny_config)
    assert emb(ids).shape == (3, 7, tiny_config.hidden_size)
    too_long = torch.zeros(1, tiny_config.max_position_embeddings + 1, dtype=torch.long)
    try:
        emb(too_long)
    except ValueError as e:
        assert "max_position_embeddings" in str(e)
    else:
        raise AssertionError("an over-long text must be refused")


def test_pixel_bert_sequence_layout(tiny_config):
    model = PixelBert(tiny_config).eval()
    ids, mask = _text(tiny_config)
    out = model(ids, mask, torch.randn(3, 3, 96, 96))
    assert out.hidden.shape == (3, 7 + 36, tiny_config.hidden_size)
    assert out.text_len == 7 and out.mask.shape == (3, 43)
    assert torch.equal(out.mask[:, :7], mask)
    text_only = model(ids, mask)
    assert text_only.hidden.shape == (3, 7, tiny_config.hidden_size) and text_only.visual is None


def test_padded_text_does_not_change_valid_outputs(tiny_config):
    model = PixelBert(tiny_config).eval()
    images = torch.randn(2, 3, 96, 96)
    ids = torch.randint(5, 64, (2, 9))
    alone = model(ids[:1, :5], None, images[:1])
    padded_ids = ids.clone()
    padded_ids[0, 5:] = 0
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 5:] = False
    batched = model(padded_ids, mask, images)
    assert torch.allclose(batched.hidden[0, :5], alone.hidden[0, :5], atol=1e-5)
    assert torch.allclose(batched.hidden[0, 9:], alone.hidden[0, 5:], atol=1e-5)  # visual tokens


def test_padded_pixels_do_not_change_valid_outputs(tiny_config):
    """Masked feature pixels (padding) are invisible: adding them changes no valid output."""
    model = PixelBert(tiny_config).eval()
    ids, mask = _text(tiny_config, B=1)
    visual = model.encode_image(torch.randn(1, 3, 96, 96))
    ref = model(ids, mask, visual=visual)
    padded = type(visual)(torch.cat([visual.embeddings, torch.randn(1, 5, tiny_config.hidden_size) * 9], 1),
                          torch.cat([visual.mask, torch.zeros(1, 5, dtype=torch.bool)], 1),
                          torch.cat([visual.positions, torch.zeros(1, 5, dtype=torch.long)], 1), visual.grid)
    out = model(ids, mask, visual=padded)
    assert torch.allclose(out.hidden[:, : ref.hidden.shape[1]], ref.hidden, atol=1e-5)


def test_sdpa_equals_manual_attention(tiny_config):
    model = PixelBert(tiny_config).eval()
    ids, mask = _text(tiny_config)
    images = torch.randn(3, 3, 96, 96)
    pixel_mask = torch.ones(3, 96, 96, dtype=torch.bool)
    pixel_mask[2, :, 40:] = False
    sdpa = model(ids, mask, images, pixel_mask)
    manual = model(ids, mask, images, pixel_mask, output_attentions=True)
    assert torch.allclose(sdpa.hidden, manual.hidden, atol=1e-5)
    assert len(manual.attentions) == tiny_config.num_layers
    probs = manual.attentions[0]
    assert probs.shape == (3, tiny_config.num_heads, 43, 43)
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
    # no attention on padding, in every layer and head: sample 1 has padded words, sample 2 padded
    # pixels (sample 0 has none, so it alone would check nothing)
    padded = ~manual.mask
    assert padded[1, :7].sum() == 3 and padded[2, 7:].sum() > 0 and not padded[0].any()
    for layer_probs in manual.attentions:
        for b in range(3):
            assert (layer_probs[b][..., padded[b]] == 0).all(), f"sample {b} attends to padding"
            assert (layer_probs[b][..., ~padded[b]] > 0).all()  # and to every real token


def test_every_parameter_gets_a_gradient_in_pretraining(tiny_config):
    model = PixelBertForPreTraining(tiny_config).train()
    ids, mask = _text(tiny_config)
    out, mlm_logits, itm_logits = model(ids, mask, torch.randn(3, 3, 96, 96), num_sampled_pixels=12)
    assert mlm_logits.shape == (3, 7, 64) and itm_logits.shape == (3,)
    loss = mlm_logits.logsumexp(-1).mean() + itm_logits.sum()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        # a parameter the loss reaches only through a zeroed path (say the visual tokens multiplied by
        # 0) gets an all-zero gradient: that is no gradient either
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"
    # row by row where the rows are known: the 7 text positions get gradients, the unused ones none;
    # only token type 0 (s_w of eq. 4) is used
    position = model.bert.text_embedding.position.weight.grad
    assert (position[:7].abs().sum(1) > 0).all() and not position[7:].any()
    token_type = model.bert.text_embedding.token_type.weight.grad
    assert token_type[0].abs().sum() > 0 and not token_type[1:].any()
    assert model.mlm.decoder_weight is model.bert.text_embedding.word.weight  # tied


def test_gradient_checkpointing_same_gradients(tiny_config, monkeypatch):
    """Recomputing the transformer blocks in backward changes no gradient. Each model has its own
    config (the flag is read at forward time, so one shared config would switch both models), and
    the checkpoint calls are counted: none for the plain model, one per layer for the other."""
    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(function, *args, **kwargs):
        calls.append(function)
        return real_checkpoint(function, *args, **kwargs)
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    torch.manual_seed(1)
    plain = PixelBertForPreTraining(dataclasses.replace(tiny_config, gradient_checkpointing=False)).train()
    ckpt = PixelBertForPreTraining(dataclasses.replace(tiny_config, gradient_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    assert not plain.config.gradient_checkpointing and ckpt.config.gradient_checkpointing
    ids, mask = _text(tiny_config)
    images = torch.randn(3, 3, 96, 96)
    counts = []
    for m in (plain, ckpt):
        before = len(calls)
        _, mlm_logits, itm = m(ids, mask, images)
        (mlm_logits.square().mean() + itm.sum()).backward()
        counts.append(len(calls) - before)
    assert counts == [0, tiny_config.num_layers], counts
    assert all(isinstance(f, TransformerBlock) for f in calls)
    grads = dict(plain.named_parameters())
    for name, p in ckpt.named_parameters():  # every gradient, not one weight's
        assert p.grad is not None and grads[name].grad is not None, name
        assert torch.allclose(grads[name].grad, p.grad, rtol=1e-5, atol=1e-7), name


def test_task_heads_shapes(tiny_config):
    ids, mask = _text(tiny_config, B=2)
    images = torch.randn(2, 3, 96, 96)
    vqa = PixelBertForVQA(tiny_config).eval()
    assert vqa(ids, mask, images).shape == (2, tiny_config.num_answers)
    nlvr2 = PixelBertForNLVR2(tiny_config).eval()
    right = torch.randn(2, 3, 80, 112)
    logits = nlvr2(ids, mask, images, None, right, None)
    assert logits.shape == (2, 2)
    retrieval = PixelBertForRetrieval(tiny_config).eval()
    visual = retrieval.bert.encode_image(images)
    # one image's features reused for several captions give the same score as running the CNN
    rows = torch.tensor([0, 0])
    cached = retrieval(ids, mask, visual=visual[rows])
    direct = retrieval(ids, mask, images[rows])
    assert cached.shape == (2,) and torch.allclose(cached, direct, atol=1e-5)


def brute_force_cell_validity(pixel_mask: torch.Tensor, stride: int, grid) -> torch.Tensor:
    """(B, gh*gw): a cell is valid exactly when its stride x stride block holds a real pixel."""
    gh, gw = grid
    out = torch.zeros(pixel_mask.shape[0], gh, gw, dtype=torch.bool)
    for r in range(gh):
        for c in range(gw):
            out[:, r, c] = pixel_mask[:, r * stride:(r + 1) * stride, c * stride:(c + 1) * stride].flatten(1).any(1)
    return out.flatten(1)


@pytest.mark.parametrize("preset", ["tiny", "r50"])
def test_feature_mask_is_exact_over_a_sweep_of_sizes(preset):
    """Batches padded to the feature stride (as every collator pads them): each cell that covers a real
    pixel is valid and every other cell is masked, for r50's stride 64 and the tiny config's 16."""
    from pixel_bert.images import pad_images
    cfg = make_model_config(preset, backbone_weights=None, bert_weights=None)
    emb = VisualEmbedding.__new__(VisualEmbedding)  # feature_mask needs only the config: no 25M-weight trunk
    emb.config = cfg
    s = cfg.feature_stride
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        sizes = torch.randint(1, 6 * s, (3, 2), generator=g).tolist()
        _, pixel_mask = pad_images([torch.zeros(3, h, w) for h, w in sizes], size_divisor=s)
        grid = (pixel_mask.shape[1] // s, pixel_mask.shape[2] // s)
        expected = brute_force_cell_validity(pixel_mask, s, grid)
        assert torch.equal(emb.feature_mask(pixel_mask, 3, grid, "cpu"), expected), sizes


def test_the_feature_grid_covers_every_input_pixel():
    """ceil(H / stride) feature rows for any input size (a floor would leave the bottom band of an
    800-row image, 32 pixels at stride 64, with no token): 800x1333 gives the paper's 13 x 21 = 273."""
    cfg = make_model_config("tiny", backbone_stages=4, hidden_size=16, num_heads=2)  # stride 64 like r50
    emb = VisualEmbedding(cfg).eval()
    with torch.no_grad():
        for h, w in [(64, 64), (65, 130), (100, 167), (127, 129)]:
            grid = emb(torch.zeros(1, 3, h, w)).grid
            assert grid == (math.ceil(h / 64), math.ceil(w / 64)), (h, w, grid)
    assert make_model_config("r50").feature_stride == 64


def test_r50_trunk_gives_the_papers_13_by_21_grid_at_800_by_1333():
    """The paper's R50 input size through the real ResNet-50 trunk, 1x1 projection and 2x2 ceil-mode
    pool (random weights, one forward without gradients, a few seconds): 800x1333 -> 25x42 -> 13x21 =
    273 feature pixels of width 768."""
    cfg = make_model_config("r50", backbone_weights=None, bert_weights=None)
    emb = VisualEmbedding(cfg).eval()
    with torch.no_grad():
        v = emb(torch.zeros(1, 3, 800, 1333))
    assert v.grid == (13, 21)
    assert v.embeddings.shape == (1, 273, 768) and v.mask.all()


@pytest.mark.parametrize("backbone, stages, channels", [("resnet18", 2, 128), ("resnet50", 4, 2048)])
def test_visual_projection_starts_at_fan_in_scale(backbone, stages, channels):
    """The 1x1 projection's initial std is 1/sqrt(fan-in) (visual_proj_init_std=None): 0.088 for the
    demo's 128-channel trunk, 0.022 for ResNet-50's 2048; a given std overrides it."""
    cfg = make_model_config("tiny", backbone=backbone, backbone_stages=stages)
    weight = PixelBert(cfg).visual_embedding.proj.weight
    assert weight.shape[1] == channels
    assert abs(weight.std().item() * channels ** 0.5 - 1) < 0.05
    fixed = PixelBert(make_model_config("tiny", backbone=backbone, backbone_stages=stages, visual_proj_init_std=0.02))
    assert abs(fixed.visual_embedding.proj.weight.std().item() - 0.02) < 0.002


@pytest.mark.parametrize("hidden", [128, 768])
def test_itm_classifier_starts_at_unit_logit_scale(hidden):
    """The ITM classifier of eq. (8) starts at std 1/sqrt(H) (itm_init_std=None), so the logit of a
    unit-scale [CLS] state has std about 1; a given std overrides it; its bias starts at 0."""
    torch.manual_seed(0)
    cfg = make_model_config("tiny", hidden_size=hidden, num_heads=4, intermediate_size=2 * hidden)
    head = ITMHead(cfg)
    assert abs(head.classifier.weight.std().item() * hidden ** 0.5 - 1) < 0.25  # BERT's 0.02 would be 0.77 off at H=128
    assert (head.classifier.bias == 0).all()
    cls = F.layer_norm(torch.randn(4096, hidden), (hidden,))
    assert 0.7 < head(cls).std().item() < 1.3
    fixed = ITMHead(make_model_config("tiny", hidden_size=hidden, num_heads=4, itm_init_std=0.02))
    assert abs(fixed.classifier.weight.std().item() - 0.02) < 0.004
