"""Inference API, attention maps and their picture (Sec. 4.4 of the paper).

The API's plumbing is tested on the demo model before any training step (seconds). One model is
pre-trained once per session for the one test that needs grounding: the demo recipe of train.py
(tiny model, synthetic data) stopped at step 1,000. Its colour words already look at their shapes,
which `test_colour_words_look_at_their_shapes` asserts on a fixed held-out seed (docs/inference.md,
"Does a word look at its object?", has the measurements). The oracle and untrained-model tests show
that the measure detects localisation and is not biased.
"""
import os
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pixel_bert import synthetic
from pixel_bert.config import ModelConfig, config_from_dict
from pixel_bert.heads import PixelBertForPreTraining, PixelBertForVQA
from pixel_bert.images import ImageLoadError
from pixel_bert.inference import PixelBertPredictor, TextTruncatedWarning
from pixel_bert.saved_model import read_checkpoint, save_model
from pixel_bert.visualize import figure_size, get_args_parser, main as visualize_main, overlay

# The attention-in-box measure is the benchmark's (benchmarks/attention_in_boxes.py); tested here.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from attention_in_boxes import attention_in_box_ratio, box_cell_weights, colour_attention_in_boxes  # noqa: E402

HELD_OUT_SEED = 4242  # the model trains on world seed 0
# The untrained `checkpoint` and the `trained_checkpoint` fixtures are in conftest.py (test_explore.py uses them too).


@pytest.fixture(scope="session")
def predictor(checkpoint):
    return PixelBertPredictor.from_checkpoint(checkpoint)


@pytest.fixture(scope="session")
def world(predictor):
    return synthetic.SyntheticCaptions(8, HELD_OUT_SEED, predictor.config.image_short_side)


@pytest.fixture(scope="session")
def vqa_checkpoint(checkpoint, tmp_path_factory):
    """A VQA checkpoint with an untrained head (enough to test the API's plumbing)."""
    ckpt = read_checkpoint(checkpoint)
    config = config_from_dict(ModelConfig, ckpt["model_config"])
    model = PixelBertForVQA(config)
    answers = [f"answer{i}" for i in range(config.num_answers)]
    path = str(tmp_path_factory.mktemp("vqa") / "vqa.pt")
    save_model(model, path, extra={"task": "vqa", "answers": answers, "vocab": ckpt["vocab"]})
    return path


def inputs_by_hand(predictor, images, texts):
    """The model's inputs built without the predictor's `_images` / `_texts` (so a bug in its
    preprocessing cannot hide in the expected values): the keep-ratio resize and the normalisation
    written out, padding at the bottom and right to a multiple of the feature stride, and the
    synthetic vocabulary's whole words (every word of the synthetic texts is one) looked up in the
    checkpoint's own vocabulary list."""
    cfg = predictor.config
    mean, std = torch.tensor(cfg.image_mean).view(3, 1, 1), torch.tensor(cfg.image_std).view(3, 1, 1)
    tensors = []
    for img in images:
        w, h = img.size
        scale = min(cfg.image_short_side / min(w, h), cfg.image_long_side / max(w, h))
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        if size != img.size:
            img = img.resize(size, Image.Resampling.BILINEAR)
        rgb = torch.tensor(np.asarray(img.convert("RGB")), dtype=torch.float32).permute(2, 0, 1) / 255
        tensors.append((rgb - mean) / std)
    stride = cfg.feature_stride
    height = -(-max(t.shape[1] for t in tensors) // stride) * stride
    width = -(-max(t.shape[2] for t in tensors) // stride) * stride
    pixels = torch.zeros(len(tensors), 3, height, width)
    pixel_mask = torch.zeros(len(tensors), height, width, dtype=torch.bool)
    for i, t in enumerate(tensors):
        pixels[i, :, : t.shape[1], : t.shape[2]] = t
        pixel_mask[i, : t.shape[1], : t.shape[2]] = True
    index = {token: i for i, token in enumerate(read_checkpoint(predictor.source)["vocab"])}
    words = [re.findall(r"\[[A-Z]+\]|[a-z0-9]+|[^\sa-z0-9]", text.lower().replace("[mask]", "[MASK]"))
             for text in texts]  # BERT's split: words and single punctuation marks; [MASK] kept whole
    rows = [[index["[CLS]"]] + [index[w] for w in text_words] + [index["[SEP]"]] for text_words in words]
    longest = max(len(r) for r in rows)
    ids = torch.tensor([r + [index["[PAD]"]] * (longest - len(r)) for r in rows])
    mask = torch.tensor([[True] * len(r) + [False] * (longest - len(r)) for r in rows])
    return ids, mask, pixels, pixel_mask


def wide(image):
    """A copy of a world image at 96x64: resized to 64x43 and padded to 64x64 in a batch, where its
    bottom row of feature cells (rows 48-63) is padding only and masked."""
    return image.resize((96, 64), Image.Resampling.BICUBIC)


# ---- attention maps ------------------------------------------------------------------------------

def test_attention_maps_shape_and_normalisation(predictor, world):
    cfg = predictor.config
    maps = predictor.attention_maps(world.image(0), "a red circle", layer=0)
    side = cfg.image_short_side // cfg.feature_stride
    assert maps.grid == (side, side)
    assert maps.tokens == ["[CLS]", "a", "red", "circle", "[SEP]"]
    assert maps.maps.shape == (5, side, side)
    # renormalised over the pixels: every token's map sums to 1 over the grid
    torch.testing.assert_close(maps.maps.sum(dim=(1, 2)), torch.ones(5))
    assert ((maps.pixel_mass > 0) & (maps.pixel_mass < 1)).all()
    # raw probabilities: the pixel part of a softmax row, summing to the token's pixel mass
    raw = predictor.attention_maps(world.image(0), "a red circle", layer=0, renormalize=False)
    torch.testing.assert_close(raw.maps.sum(dim=(1, 2)), maps.pixel_mass)
    torch.testing.assert_close(raw.maps, maps.maps * maps.pixel_mass[:, None, None])
    # the mean over heads is the mean of the per-head probabilities
    heads = [predictor.attention_maps(world.image(0), "a red circle", layer=0, head=h, renormalize=False).maps
             for h in range(cfg.num_heads)]
    torch.testing.assert_close(torch.stack(heads).mean(0), raw.maps)
    assert not torch.allclose(heads[0], heads[1])  # the heads really differ
    last = predictor.attention_maps(world.image(0), "a red circle", layer=-1)
    assert last.layer == cfg.num_layers - 1 and not torch.allclose(last.maps, maps.maps)
    with pytest.raises(ValueError, match="layer"):
        predictor.attention_maps(world.image(0), "a red circle", layer=cfg.num_layers)
    with pytest.raises(ValueError, match="head"):
        predictor.attention_maps(world.image(0), "a red circle", head=cfg.num_heads)


def test_full_attention_rows_sum_to_one(predictor, world):
    """The maps are cut from full joint-softmax rows: text rows over words + pixels sum to 1."""
    ids, mask = predictor._texts(["there is a small green square"])
    pixels, pixel_mask, _ = predictor._images([world.image(1)])
    with torch.no_grad():
        out = predictor.model.bert(ids, mask, pixels, pixel_mask, output_attentions=True)
    assert len(out.attentions) == predictor.config.num_layers
    for probs in out.attentions:
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))


def test_batched_equals_one_by_one(predictor, world, tmp_path):
    """A padded batch (texts of different lengths; one image given as a path) gives each pair the
    maps it gets alone: padding is masked out of attention."""
    path = str(tmp_path / "img.png")
    world.image(2).save(path)
    texts = ["a red circle", "the green cross is left of the small white triangle"]
    batch = predictor.attention_maps([world.image(1), path], texts, layer=1)
    for image, text, got in zip([world.image(1), path], texts, batch):
        alone = predictor.attention_maps(image, text, layer=1)
        assert got.tokens == alone.tokens
        torch.testing.assert_close(got.maps, alone.maps, atol=1e-5, rtol=1e-4)
    assert len(batch[1].tokens) > len(batch[0].tokens)


# ---- matching, masked words, VQA -------------------------------------------------------------------

def test_match_probabilities(predictor, world):
    texts = [world.caption(i) for i in range(4)]
    images = [world.image(i) for i in range(3)] + [wide(world.image(3))]  # one resized and padded
    paired = predictor.match(images, texts)
    assert paired.shape == (4,)
    # the probabilities are the ITM logits of eq. (8) through a sigmoid, on inputs built by hand
    ids, mask, pixels, pixel_mask = inputs_by_hand(predictor, images, texts)
    assert not pixel_mask[3].all() and not mask.all()  # the batch really is padded, pixels and words
    with torch.no_grad():
        _, _, itm_logits = predictor.model(ids, mask, pixels, pixel_mask)
    # tight: an untrained model's outputs move little with its inputs (a lost pixel mask moves them 2e-5)
    torch.testing.assert_close(paired, torch.sigmoid(itm_logits), atol=1e-6, rtol=1e-6)
    single = predictor.match(images[0], texts[0])
    assert isinstance(single, float) and single == pytest.approx(paired[0].item(), abs=1e-5)
    # one image with many texts: the CNN runs once, the scores are those of the pairs
    one_image = predictor.match(images[0], texts)
    pairs = predictor.match([images[0]] * 4, texts)
    torch.testing.assert_close(one_image, pairs, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="2 images and 3 texts"):
        predictor.match(images[:2], texts[:3])


def test_fill_mask_top_k(predictor, world):
    result = predictor.fill_mask(world.image(0), "the red shape is a [MASK]", top_k=5)
    assert len(result) == 1 and len(result[0]) == 5
    words, probs = zip(*result[0])
    assert list(probs) == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-6
    # the top 5 of the MLM softmax at [MASK] (position 6: [CLS] the red shape is a [MASK]), inputs by hand
    ids, mask, pixels, pixel_mask = inputs_by_hand(predictor, [world.image(0)], ["the red shape is a [MASK]"])
    with torch.no_grad():
        _, mlm_logits, _ = predictor.model(ids, mask, pixels, pixel_mask)
    at_mask = mlm_logits[0, 6].softmax(-1).topk(5)
    assert probs == pytest.approx(at_mask.values.tolist(), abs=1e-6)
    vocab = read_checkpoint(predictor.source)["vocab"]
    assert list(words) == [vocab[i] for i in at_mask.indices.tolist()]
    # a padded pair of images and texts: each [MASK] of each text, in order
    pair = predictor.fill_mask([world.image(1), wide(world.image(2))], ["a [MASK] [MASK]", "the [MASK] is red"],
                               top_k=3)
    ids, mask, pixels, pixel_mask = inputs_by_hand(predictor, [world.image(1), wide(world.image(2))],
                                                   ["a [MASK] [MASK]", "the [MASK] is red"])
    with torch.no_grad():
        _, mlm_logits, _ = predictor.model(ids, mask, pixels, pixel_mask)
    for got, (row, position) in zip([c for r in pair for c in r], [(0, 2), (0, 3), (1, 2)]):
        top = mlm_logits[row, position].softmax(-1).topk(3)
        assert [w for w, _ in got] == [vocab[i] for i in top.indices.tolist()]
        assert [p for _, p in got] == pytest.approx(top.values.tolist(), abs=1e-6)
    two = predictor.fill_mask([world.image(0), world.image(1)], ["a [MASK] [MASK]", "the [MASK] is red"], top_k=3)
    assert [len(r) for r in two] == [2, 1] and all(len(c) == 3 for r in two for c in r)
    with pytest.raises(ValueError, match=r"no \[MASK\]"):
        predictor.fill_mask(world.image(0), "a red circle")


def test_answer_needs_a_vqa_head(predictor, checkpoint, world):
    with pytest.raises(ValueError, match="VQA head") as err:
        predictor.answer(world.image(0), "what colour is the circle ?")
    assert checkpoint in str(err.value) and "pretrain" in str(err.value)


def test_answer_with_vqa_checkpoint(vqa_checkpoint, world):
    vqa = PixelBertPredictor.from_checkpoint(vqa_checkpoint)
    answers = vqa.answer(world.image(0), "what colour is the circle ?", top_k=4)
    assert len(answers) == 4
    names, scores = zip(*answers)
    assert all(n in vqa.answers for n in names) and len(set(names)) == 4
    assert list(scores) == sorted(scores, reverse=True)
    # sigmoid scores (BCE training), not a softmax: they are the model's logits through a sigmoid
    ids, mask, pixels, pixel_mask = inputs_by_hand(vqa, [world.image(0)], ["what colour is the circle ?"])
    with torch.no_grad():
        logits = vqa.model(ids, mask, pixels, pixel_mask)[0]
    top = torch.sigmoid(logits).topk(4)
    assert list(scores) == pytest.approx(top.values.tolist(), abs=1e-6)
    assert list(names) == [vqa.answers[i] for i in top.indices.tolist()]
    # a resized, padded image in a batch of two gets its own answers
    batch = vqa.answer([world.image(1), wide(world.image(2))], ["which shape is red ?", "how many shapes are there ?"],
                       top_k=2)
    ids, mask, pixels, pixel_mask = inputs_by_hand(vqa, [world.image(1), wide(world.image(2))],
                                                   ["which shape is red ?", "how many shapes are there ?"])
    with torch.no_grad():
        top = torch.sigmoid(vqa.model(ids, mask, pixels, pixel_mask)).topk(2)
    assert [[a for a, _ in row] for row in batch] == [[vqa.answers[i] for i in r] for r in top.indices.tolist()]
    assert [p for row in batch for _, p in row] == pytest.approx(top.values.flatten().tolist(), abs=1e-6)
    with pytest.raises(ValueError, match="ITM"):
        vqa.match(world.image(0), "a red circle")
    with pytest.raises(ValueError, match="MLM"):
        vqa.fill_mask(world.image(0), "a [MASK] circle")
    assert vqa.attention_maps(world.image(0), "what colour ?").maps.ndim == 3  # any checkpoint has attention


# ---- errors ------------------------------------------------------------------------------------------

def test_unreadable_image(predictor, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(ImageLoadError, match="broken.png") as err:
        predictor.match(str(broken), "a red circle")
    assert err.value.reason == "corrupt_image"
    with pytest.raises(ImageLoadError, match="not found"):
        predictor.attention_maps(str(tmp_path / "missing.png"), "a red circle")


def test_long_text_warns_and_truncates(predictor, world):
    limit = predictor.config.max_text_len
    text = " ".join(["a red circle"] * limit)
    with pytest.warns(TextTruncatedWarning, match=f"truncated to the model's max_text_len {limit}"):
        maps = predictor.attention_maps(world.image(0), text)
    assert len(maps.tokens) == limit and maps.tokens[-1] == "[SEP]"
    with pytest.warns(TextTruncatedWarning):
        cut = predictor.match(world.image(0), text)
    assert cut == pytest.approx(predictor.match(world.image(0), " ".join(maps.tokens[1:-1])), abs=1e-6)


def test_checkpoint_without_vocab_is_refused(checkpoint, tmp_path):
    ckpt = read_checkpoint(checkpoint)
    model = PixelBertForPreTraining(config_from_dict(ModelConfig, ckpt["model_config"]))
    path = str(tmp_path / "novocab.pt")
    save_model(model, path, extra={"task": "pretrain"})
    with pytest.raises(ValueError, match="vocab"):
        PixelBertPredictor.from_checkpoint(path)


# ---- the picture ---------------------------------------------------------------------------------------

def test_visualize_writes_png(checkpoint, world, tmp_path):
    image_path, out = str(tmp_path / "scene.png"), str(tmp_path / "attention.png")
    world.image(0).save(image_path)
    visualize_main(["--checkpoint", checkpoint, "--image", image_path, "--text", "a red circle",
                    "--tokens", "red", "circle", "--panel-size", "120", "--out", out])
    with Image.open(out) as png:
        png.load()
        assert png.format == "PNG" and png.mode == "RGB"
        assert png.size == figure_size(world.image(0).size, 2, panel=120)
        pixels = np.asarray(png)
    assert pixels.std() > 20  # a picture, not a blank canvas
    with pytest.raises(SystemExit, match="not in the text's tokens"):
        visualize_main(["--checkpoint", checkpoint, "--image", image_path, "--text", "a red circle",
                        "--tokens", "square", "--out", out])
    for action in get_args_parser()._actions:
        assert action.help, f"--help says nothing about {action.option_strings}"


def test_overlay_puts_heat_where_attention_is():
    image = Image.new("RGB", (64, 64), (128, 128, 128))
    attention = torch.zeros(4, 4)
    attention[0, 3] = 1.0  # all attention on the top-right cell
    heat = np.asarray(overlay(image, attention), dtype=np.float32).sum(axis=2)
    assert heat[:16, 48:].mean() > 2 * heat[48:, :16].mean()


# ---- attention in boxes (evidence for Sec. 4.4 of the paper) ---------------------------------------

def test_box_ratio_arithmetic():
    weights = box_cell_weights((0, 0, 24, 16), (64, 64), (4, 4))  # cells of 16 px
    np.testing.assert_allclose(weights[0], [1.0, 0.5, 0.0, 0.0])
    assert weights[1:].sum() == 0
    assert weights.sum() * 16 * 16 == pytest.approx(24 * 16)  # cell-area fractions add up to the box area
    assert attention_in_box_ratio(np.ones((4, 4)), (5, 7, 40, 33), (64, 64)) == pytest.approx(1.0)
    peaked = np.zeros((4, 4))
    peaked[0, 0] = 1.0
    box = (0, 0, 16, 16)  # exactly that cell: 1/16 of the image holds all the attention
    assert attention_in_box_ratio(peaked, box, (64, 64)) == pytest.approx(16.0)
    assert attention_in_box_ratio(peaked, (32, 32, 64, 64), (64, 64)) == 0.0


def test_untrained_model_scores_about_one(predictor):
    """The same measure on a randomly initialised model is close to 1: the ratio is not biased."""
    result = colour_attention_in_boxes(predictor, num_images=100, seed=HELD_OUT_SEED)
    assert abs(result.per_layer[0] - 1.0) < 0.1


def test_demo_learns_both_objectives_on_a_seed_and_world_outside_the_readme_grid(trained_checkpoint):
    """The demo recipe on a model seed and a synthetic world the README's table does not show: the
    colour/shape words predicted at least 0.25 better with the caption's own image than with another's
    (the lowest of the README's 16 runs: 0.372), and held-out ITM far from chance (0.5). The ITM bar is
    the one every run of the README's table clears, not 0.85: on some seeds ITM leaves chance late
    (docs/demo.md)."""
    _, result = trained_checkpoint
    assert result["pairs"] == 300 and result["steps"] > 0
    assert result["itm_acc"] >= 0.75, result
    assert result["mlm_acc_true_image"] - result["mlm_acc_shuffled_image"] >= 0.25, result


def test_colour_words_look_at_their_shapes(trained_checkpoint):
    """Sec. 4.4's evidence: in held-out images, a caption's colour word puts more of its attention
    inside its shape's box than the box's share of the image (ratio > 1; 1 = uniform) in some layer
    (which layer localises differs between runs: seed 0 of the demo recipe 2.42 in layer 0, 0.99 in 1)."""
    path, _ = trained_checkpoint
    result = colour_attention_in_boxes(PixelBertPredictor.from_checkpoint(path), num_images=100,
                                       seed=HELD_OUT_SEED)
    print({layer: round(r, 2) for layer, r in result.per_layer.items()})
    assert max(result.per_layer.values()) > 1.3


def test_box_measure_detects_an_attention_that_localises():
    """The evidence pipeline (scenes, captions, boxes, grid orientation, paired control) run on an
    oracle whose "attention" for a colour word is where that colour is in the image: it must score
    far above 1 with a large paired t. A transposed grid or a box in the wrong units would fail."""
    from pixel_bert.inference import AttentionMaps

    class Oracle:
        config = ModelConfig(image_short_side=64, image_long_side=64, num_layers=1, num_heads=1,
                             hidden_size=8, backbone_weights=None)
        grid = (4, 4)

        def _forward_attentions(self, images, texts):
            return images, texts, None, None

        def _maps_from(self, images, texts, mask, sizes, layer, head, renormalize):
            result = []
            for image, text in zip(images, texts):
                rgb = np.asarray(image, dtype=np.float32)                       # (H, W, 3)
                tokens = ["[CLS]"] + text.split() + ["[SEP]"]
                maps = []
                for t in tokens:
                    if t in synthetic.COLOURS:
                        near = np.abs(rgb - np.array(synthetic.COLOURS[t])).max(-1) < 60
                        cells = near.reshape(4, 16, 4, 16).mean(axis=(1, 3)) + 1e-3
                    else:
                        cells = np.ones((4, 4))
                    maps.append(cells / cells.sum())
                result.append(AttentionMaps(tokens, torch.tensor(np.stack(maps)), torch.ones(len(tokens)),
                                            self.grid, image.size, 16, layer, head, renormalize))
            return result

    result = colour_attention_in_boxes(Oracle(), num_images=60, seed=HELD_OUT_SEED)
    assert result.per_layer[0] > 3.0 and result.per_layer_other[0] < 0.5
    assert result.paired_t[0] > 10


def test_attention_is_drawn_where_the_grid_cells_are_not_stretched_over_the_image():
    from pixel_bert.visualize import upsample
    second_row = torch.tensor([[0.0], [1.0]])  # a 2 x 1 grid, all attention on the second row
    # a 20-pixel-tall image at stride 16: the grid covers 32 rows, its second cell rows 16..31 (mostly padding)
    placed = upsample(second_row, (16, 20), extent=(16, 32))
    stretched = upsample(second_row, (16, 20))
    assert placed.shape == stretched.shape == (20, 16)
    assert placed[:8].max() < 0.01   # rows 0..7 lie in the first cell: no heat there
    assert stretched[:8].max() > 0.2  # stretching pulls the second cell's heat up over them
