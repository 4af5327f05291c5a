"""A damaged saved model is refused naming the file and the tensor or token, and small input mistakes
get a message instead of a traceback from deep inside torch or Pillow."""
import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from pixel_bert import evaluate, export, finetune, synthetic, visualize
from pixel_bert.config import make_model_config
from pixel_bert.errors import UserError
from pixel_bert.heads import PixelBertForPreTraining
from pixel_bert.images import ImageLoadError, ImageTransform, load_image
from pixel_bert.inference import PixelBertPredictor
from pixel_bert.saved_model import load_saved_model, save_model
from pixel_bert.tokenizer import WordPieceTokenizer


@pytest.fixture
def folder(tmp_path):
    """A pre-training model saved as model.pt and exported as a model folder: (model.pt, folder)."""
    config = make_model_config("tiny", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    pt = str(tmp_path / "model.pt")
    save_model(PixelBertForPreTraining(config), pt, extra={"task": "pretrain", "vocab": synthetic.vocab_tokens()})
    export.main([pt, str(tmp_path / "model")])
    return pt, str(tmp_path / "model")


def rewrite_tensor(folder, name, change):
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    tensors[name] = change(tensors[name])
    save_file(tensors, path, metadata={"format": "pt"})


# ---- damaged model folders -----------------------------------------------------------------------

def test_a_vocabulary_with_a_repeated_token_is_refused_naming_both_lines(folder):
    _, path = folder
    vocab_file = os.path.join(path, "vocab.txt")
    lines = open(vocab_file).read().split("\n")
    lines[10] = lines[12]  # one word twice: the tokenizer would keep one of the two ids
    open(vocab_file, "w").write("\n".join(lines))
    with pytest.raises(UserError, match=rf"{vocab_file}: token '{lines[12]}' is listed twice \(lines 11 and 13\)"):
        load_saved_model(path)


def test_a_vocabulary_with_a_byte_order_mark_is_refused_naming_the_folders_file(folder):
    _, path = folder
    vocab_file = os.path.join(path, "vocab.txt")
    text = open(vocab_file, encoding="utf-8").read()
    open(vocab_file, "w", encoding="utf-8").write("\ufeff" + text)
    with pytest.raises(UserError, match=rf"{vocab_file}: the vocabulary starts with a byte-order mark"):
        PixelBertPredictor.from_pretrained(path)


def test_integer_weights_are_refused_naming_the_tensor(folder):
    _, path = folder
    rewrite_tensor(path, "bert.layers.0.ffn_in.weight", lambda t: t.round().to(torch.int32))
    with pytest.raises(UserError, match=r"tensor 'bert.layers.0.ffn_in.weight' is torch.int32, but the model's is "
                                        r"floating point"):
        PixelBertPredictor.from_pretrained(path)


def test_non_finite_weights_are_refused_naming_the_tensor(folder):
    _, path = folder

    def poison(t):
        t = t.clone()
        t.view(-1)[3] = float("nan")
        return t
    rewrite_tensor(path, "itm.classifier.weight", poison)
    with pytest.raises(UserError, match=r"tensor 'itm.classifier.weight' holds 1 NaN or infinite values"):
        load_saved_model(path)


def test_missing_model_config_keys_are_named_with_the_defaults_taken(folder):
    _, path = folder
    config_file = os.path.join(path, "config.json")
    meta = json.load(open(config_file))
    del meta["model_config"]["hidden_dropout"]
    json.dump(meta, open(config_file, "w"))
    with pytest.warns(UserWarning, match=r"its model config has no hidden_dropout .* taking the defaults "
                                         r"hidden_dropout=0.1"):
        saved = load_saved_model(path)
    assert saved.config.hidden_dropout == 0.1


# ---- small input mistakes ------------------------------------------------------------------------

def test_a_folder_given_as_an_image_is_named_as_a_folder(tmp_path):
    with pytest.raises(ImageLoadError, match=rf"{tmp_path}: is a folder, not an image file"):
        load_image(str(tmp_path))


def test_an_image_without_pixels_is_refused():
    transform = ImageTransform(32, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with pytest.raises(ImageLoadError, match="the image is 0x0: it has no pixels"):
        transform(Image.new("RGB", (0, 0)))


def test_the_predictor_refuses_an_empty_text_and_a_top_k_below_one(folder):
    pt, _ = folder
    p = PixelBertPredictor.from_checkpoint(pt)
    image = synthetic.SyntheticCaptions(1, 3, p.config.image_short_side).image(0)
    with pytest.raises(UserError, match="an empty text"):
        p.match(image, "  ")
    with pytest.raises(UserError, match="top_k must be at least 1, got -1"):
        p.fill_mask(image, "a [MASK] circle", top_k=-1)
    assert 0.0 <= p.match(image, "a red circle") <= 1.0


@pytest.mark.parametrize("out, message", [("v5", "give a file name ending in .png"), (".", "is a folder")])
def test_visualize_refuses_an_out_path_it_cannot_write_a_picture_to(out, message, folder, tmp_path, capsys):
    pt, _ = folder
    image = tmp_path / "scene.png"
    synthetic.SyntheticCaptions(1, 3, 32).image(0).save(image)
    with pytest.raises(SystemExit) as exit_info:
        visualize.main(["--checkpoint", pt, "--image", str(image), "--text", "a red circle",
                        "--out", str(tmp_path / out) if out != "." else str(tmp_path)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("main, flags, message", [
    (evaluate.main, ["--task", "vqa", "--max-examples", "-5"], "--max-examples/--max-images: must be >= 1, got '-5'"),
    (evaluate.main, ["--task", "retrieval", "--max-captions", "-1"], "--max-captions: must be >= 1, got '-1'"),
    (evaluate.main, ["--task", "vqa", "--batch-size", "0"], "--batch-size: must be >= 1, got '0'"),
    (evaluate.main, ["--task", "vqa", "--num-workers", "-1"], "--num-workers: must be >= 0, got '-1'"),
    (finetune.main, ["--task", "vqa", "--max-eval", "-10"], "--max-eval: must be >= 1, got '-10'"),
    (finetune.main, ["--task", "vqa", "--synthetic-train", "0"], "--synthetic-train: must be >= 1, got '0'"),
])
def test_count_flags_are_checked_when_parsed(main, flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_tokenizer_file_with_a_repeated_token_is_refused(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "red"]))
    with pytest.raises(UserError, match=r"token 'red' is listed twice \(lines 6 and 7\)"):
        WordPieceTokenizer(str(path))
