"""Model folders (config.json, model.safetensors, vocab.txt, answers.json): a model.pt exports to a
folder that loads to the same weights and outputs, every script that takes a checkpoint takes the
folder, train.py and finetune.py write it, and nothing on the folder's path unpickles anything."""
import json
import os
import pickle

import pytest
import torch
from safetensors import safe_open

from pixel_bert import evaluate, export, finetune, synthetic, train, visualize
from pixel_bert.files import atomic_folder
from pixel_bert.heads import TASK_MODELS
from pixel_bert.inference import PixelBertPredictor
from pixel_bert.saved_model import load_saved_model, read_checkpoint, save_model, write_model_folder

TASKS = ["pretrain", "vqa", "nlvr2", "retrieval"]
SMALL_RUN = ["--max-steps", "1", "--batch_size", "4", "--num_workers", "0", "--epochs", "1", "--warmup_steps", "1"]


def _model_pt(task, config, path):
    """A task model with every tensor non-trivial (biases, BatchNorm statistics) saved as model.pt."""
    model = TASK_MODELS[task](config)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and name != "mlm.decoder_weight":
                tensor.add_(torch.randn_like(tensor) * 0.1)
    extra = {"task": task, "vocab": synthetic.vocab_tokens()}
    if task == "vqa":
        extra["answers"] = [f"answer {i}" for i in range(config.num_answers)]
    save_model(model, str(path), extra=extra)
    return str(path)


def _outputs(model, task):
    """The task model's outputs on fixed inputs (eval mode: every pixel, no dropout)."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(5, model.config.vocab_size, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    images = torch.randn(2, 3, 64, 48, generator=g)
    model.eval()
    with torch.no_grad():
        if task == "pretrain":
            out, mlm, itm = model(ids, mask, images)
            return [out.hidden, mlm, itm]
        if task == "nlvr2":
            return [model(ids, mask, images, None, images.flip(0), None)]
        return [model(ids, mask, images)]


@pytest.fixture
def config(tiny_config):
    tiny_config.image_short_side = tiny_config.image_long_side = 64
    return tiny_config


@pytest.fixture
def pretrain_folder(config, tmp_path):
    """(model.pt, its exported folder) of a pre-training model."""
    pt = _model_pt("pretrain", config, tmp_path / "model.pt")
    export.main([pt, str(tmp_path / "folder")])
    return pt, str(tmp_path / "folder")


# ---- round trip ----------------------------------------------------------------------------------

@pytest.mark.parametrize("task", TASKS)
def test_round_trip_gives_identical_weights_and_outputs(task, config, tmp_path, capsys):
    pt = _model_pt(task, config, tmp_path / "model.pt")
    folder = str(tmp_path / "out")
    sizes = export.main([pt, folder])
    printed = capsys.readouterr().out
    expected_files = {"config.json", "model.safetensors", "vocab.txt"} | ({"answers.json"} if task == "vqa" else set())
    assert set(os.listdir(folder)) == expected_files == set(sizes)
    for name, size in sizes.items():
        assert os.path.getsize(os.path.join(folder, name)) == size and name in printed
    from_pt, from_folder = read_checkpoint(pt), read_checkpoint(folder)
    assert set(from_folder) == {"model", "model_config", "task", "vocab"} | ({"answers"} if task == "vqa" else set())
    assert list(from_folder["model"]) == list(from_pt["model"])
    for name, tensor in from_pt["model"].items():
        assert from_folder["model"][name].dtype == tensor.dtype and torch.equal(from_folder["model"][name], tensor), name
    for key in ("task", "vocab", "answers"):
        assert from_folder.get(key) == from_pt.get(key)
    model_pt, model_folder = load_saved_model(pt).model, load_saved_model(folder).model
    for (name, a), (_, b) in zip(model_pt.state_dict().items(), model_folder.state_dict().items()):
        assert torch.equal(a, b), name
    for a, b in zip(_outputs(model_pt, task), _outputs(model_folder, task)):
        assert torch.equal(a, b)
    config_json = json.load(open(os.path.join(folder, "config.json")))
    assert config_json["task"] == task and config_json["preprocessing"]["image_format"] == config.image_format
    assert config_json["preprocessing"]["image_mean"] == list(config.image_mean)


def test_tied_decoder_is_stored_once_and_tied_again(pretrain_folder):
    _, folder = pretrain_folder
    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
        stored = set(f.keys())
    assert "bert.text_embedding.word.weight" in stored and "mlm.decoder_weight" not in stored
    model = load_saved_model(folder).model
    assert model.mlm.decoder_weight is model.bert.text_embedding.word.weight  # the same Parameter object
    with torch.no_grad():
        model.bert.text_embedding.word.weight[3, 0] += 1.0
    assert model.mlm.decoder_weight[3, 0] == model.bert.text_embedding.word.weight[3, 0]


def test_untied_decoder_is_stored_and_stays_untied(config, tmp_path):
    config.tie_mlm_decoder = False
    export.main([_model_pt("pretrain", config, tmp_path / "model.pt"), str(tmp_path / "untied")])
    with safe_open(str(tmp_path / "untied" / "model.safetensors"), framework="pt") as f:
        assert "mlm.decoder_weight" in set(f.keys())
    model = load_saved_model(str(tmp_path / "untied")).model
    assert model.mlm.decoder_weight is not model.bert.text_embedding.word.weight
    assert not torch.equal(model.mlm.decoder_weight, model.bert.text_embedding.word.weight)


def test_detectron_input_convention_travels_with_the_folder(tmp_path):
    """A model whose CNN came from Detectron's .pkl reads BGR 0-255 pixels minus Detectron's means;
    the folder keeps that convention although it drops the local weight paths."""
    from pixel_bert.config import DETECTRON_PIXEL_MEANS, make_model_config
    config = make_model_config("tiny", backbone_weights="/data/X-152-32x8d-IN5k.pkl")
    assert config.image_format == "bgr255"
    export.main([_model_pt("pretrain", config, tmp_path / "model.pt"), str(tmp_path / "bgr")])
    stored = json.load(open(tmp_path / "bgr" / "config.json"))
    assert stored["model_config"]["backbone_weights"] is None
    assert stored["preprocessing"]["image_format"] == "bgr255"
    assert stored["preprocessing"]["image_mean"] == list(DETECTRON_PIXEL_MEANS)
    transform = PixelBertPredictor.from_pretrained(str(tmp_path / "bgr")).transform
    assert transform.image_format == "bgr255" and transform.mean.flatten().tolist() == pytest.approx(DETECTRON_PIXEL_MEANS)


# ---- every consumer takes the folder ------------------------------------------------------------

def test_predictor_and_visualize_take_the_folder(pretrain_folder, tmp_path):
    pt, folder = pretrain_folder
    image = synthetic.SyntheticCaptions(1, 5, 64).image(0)
    a, b = PixelBertPredictor.from_checkpoint(pt), PixelBertPredictor.from_pretrained(folder)
    assert a.match(image, "a red circle") == b.match(image, "a red circle")
    assert a.fill_mask(image, "a red [MASK]") == b.fill_mask(image, "a red [MASK]")
    assert b.transform.image_format == a.transform.image_format and torch.equal(b.transform.mean, a.transform.mean)
    image.save(tmp_path / "scene.png")
    out = visualize.main(["--checkpoint", folder, "--image", str(tmp_path / "scene.png"), "--text", "a red circle",
                          "--tokens", "red", "--panel-size", "64", "--out", str(tmp_path / "attention.png")])
    assert os.path.getsize(out) > 0


def test_finetune_init_from_folder_writes_a_folder_that_evaluate_reads(pretrain_folder, tmp_path):
    _, folder = pretrain_folder
    run = str(tmp_path / "run")
    finetune.main(["--task", "vqa", "--init", folder, "--output-dir", run, "--synthetic-train", "8",
                   "--synthetic-val", "4", "--no-eval"] + SMALL_RUN)
    written = read_checkpoint(os.path.join(run, "model"))
    saved = read_checkpoint(os.path.join(run, "model.pt"))
    assert written["answers"] == saved["answers"] == json.load(open(os.path.join(run, "answers.json")))
    assert all(torch.equal(written["model"][k], v) for k, v in saved["model"].items())
    flags = ["--task", "vqa", "--split", "val2014", "--vqa-root", os.path.join(run, "data", "vqa"),
             "--num-workers", "0", "--max-examples", "4"]
    by_folder = evaluate.main(flags + ["--checkpoint", os.path.join(run, "model"), "--output-dir", str(tmp_path / "a")])
    by_pt = evaluate.main(flags + ["--checkpoint", os.path.join(run, "model.pt"), "--output-dir", str(tmp_path / "b")])
    assert by_folder["n_questions"] == 4 and by_folder["overall"] == by_pt["overall"]
    assert json.load(open(by_folder["predictions_file"])) == json.load(open(by_pt["predictions_file"]))


def test_train_init_from_folder_writes_the_folder(pretrain_folder, tmp_path):
    _, folder = pretrain_folder
    run = str(tmp_path / "run")
    threads = torch.get_num_threads()
    train.main(["--init", folder, "--output-dir", run, "--resume", "none", "--synthetic-images", "8",
                "--synthetic-eval-images", "0"] + SMALL_RUN)
    torch.set_num_threads(threads)  # train.py claims every core; give the other tests theirs back
    written, saved = read_checkpoint(os.path.join(run, "model")), read_checkpoint(os.path.join(run, "model.pt"))
    assert written["task"] == "pretrain" and written["vocab"] == saved["vocab"] == synthetic.vocab_tokens()
    assert all(torch.equal(written["model"][k], v) for k, v in saved["model"].items())
    assert not any(name.startswith(".") for name in os.listdir(run))  # no temporary folder left behind


# ---- no pickle -------------------------------------------------------------------------------------

def test_folder_path_never_unpickles(pretrain_folder, monkeypatch):
    _, folder = pretrain_folder

    def refuse(*args, **kwargs):
        raise AssertionError("the folder path unpickled something")
    for module, name in ((torch, "load"), (torch.serialization, "load"), (pickle, "load"), (pickle, "loads"),
                         (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, refuse)
    saved = load_saved_model(folder)
    assert saved.task == "pretrain"
    predictor = PixelBertPredictor.from_pretrained(folder)
    assert 0.0 <= predictor.match(synthetic.SyntheticCaptions(1, 5, 64).image(0), "a red circle") <= 1.0


class _RunsCode:
    """Unpickling this makes a folder: proof that a pickle was executed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("crafted", ["pickle beside config.json", "pickle named model.safetensors",
                                     "torch.save named model.safetensors"])
def test_pickle_in_a_folder_is_refused_unopened(crafted, pretrain_folder, tmp_path):
    _, folder = pretrain_folder
    marker = str(tmp_path / "code_ran")
    payload = pickle.dumps({"model": _RunsCode(marker)})
    weights = os.path.join(folder, "model.safetensors")
    os.remove(weights)
    if crafted == "pickle beside config.json":
        open(os.path.join(folder, "pytorch_model.bin"), "wb").write(payload)
        match = "model.safetensors is missing.*pytorch_model.bin instead: pickle files are never opened"
    elif crafted == "pickle named model.safetensors":
        open(weights, "wb").write(payload)
        match = "not a safetensors file \\(a pickle\\)"
    else:
        torch.save({"model": {}}, weights)
        match = "not a safetensors file \\(a zip file"
    with pytest.raises((FileNotFoundError, ValueError), match=match):
        read_checkpoint(folder)
    with pytest.raises(SystemExit, match=match):
        export.main([folder, str(tmp_path / "x")])
    assert not os.path.exists(marker)


# ---- clear errors on a broken folder -------------------------------------------------------------

def _edit_config(folder, edit):
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    edit(config)
    json.dump(config, open(path, "w"))


BROKEN = {
    "no vocab.txt": (lambda f: os.remove(os.path.join(f, "vocab.txt")), "vocab.txt is missing"),
    "no config.json": (lambda f: os.remove(os.path.join(f, "config.json")), "no config.json"),
    "wider model in config.json": (
        lambda f: _edit_config(f, lambda c: c["model_config"].update(hidden_size=128)),
        "model.safetensors: tensor '.*' has shape .* but the model .*config.json describes needs"),
    "deeper model in config.json": (
        lambda f: _edit_config(f, lambda c: c["model_config"].update(num_layers=3)),
        "model.safetensors does not hold the tensors of the 'pretrain' model that .*config.json describes: 12 missing"),
    "a Hugging Face config.json": (
        lambda f: json.dump({"model_type": "bert", "hidden_size": 64}, open(os.path.join(f, "config.json"), "w")),
        "not a pixel-bert model config"),
    "preprocessing edited alone": (
        lambda f: _edit_config(f, lambda c: c["preprocessing"].update(image_format="bgr255")),
        "preprocessing image_format = 'bgr255' disagrees with the model config"),
    "short vocab.txt": (lambda f: open(os.path.join(f, "vocab.txt"), "w").write("[PAD]\n[UNK]\n"),
                        "vocab.txt: 2 tokens for a model with vocab_size 64"),
    "an unknown config field": (lambda f: _edit_config(f, lambda c: c["model_config"].update(hiden_size=1)),
                                "config.json: 'model_config' is not a valid ModelConfig .*hiden_size"),
}


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_broken_folder_names_the_file_and_the_problem(broken, pretrain_folder):
    _, folder = pretrain_folder
    damage, message = BROKEN[broken]
    damage(folder)
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        read_checkpoint(folder)


def test_vqa_folder_without_answers_is_refused(config, tmp_path):
    export.main([_model_pt("vqa", config, tmp_path / "model.pt"), str(tmp_path / "vqa")])
    os.remove(tmp_path / "vqa" / "answers.json")
    with pytest.raises(FileNotFoundError, match="answers.json is missing"):
        PixelBertPredictor.from_pretrained(str(tmp_path / "vqa"))


# ---- atomic writing and the export command -------------------------------------------------------

def test_failed_write_leaves_the_old_folder_whole(pretrain_folder, monkeypatch, tmp_path):
    pt, folder = pretrain_folder
    before = {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}
    import pixel_bert.saved_model

    def disk_full(path, *args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(pixel_bert.saved_model, "write_json", disk_full)  # config.json, written last, fails
    ckpt = read_checkpoint(pt)
    ckpt["vocab"] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(59)]
    with pytest.raises(OSError, match="No space"):
        write_model_folder(ckpt, folder)
    assert {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)} == before
    assert sorted(os.listdir(tmp_path)) == ["folder", "model.pt"]  # no temporary folder left behind
    with pytest.raises(RuntimeError):
        with atomic_folder(str(tmp_path / "new")) as tmp:
            open(os.path.join(tmp, "half"), "w").write("x")
            raise RuntimeError("crash")
    assert not os.path.exists(tmp_path / "new") and sorted(os.listdir(tmp_path)) == ["folder", "model.pt"]


def test_export_refuses_to_overwrite_unless_forced(pretrain_folder, tmp_path):
    pt, folder = pretrain_folder
    with pytest.raises(SystemExit, match="is not empty.*--force"):
        export.main([pt, folder])
    assert export.main([pt, folder, "--force"])["model.safetensors"] > 0
    other = tmp_path / "notes"
    other.mkdir()
    (other / "README.txt").write_text("mine")
    for flags in ([], ["--force"]):
        with pytest.raises(SystemExit, match="README.txt"):
            export.main([pt, str(other)] + flags)
    assert (other / "README.txt").read_text() == "mine"
    with pytest.raises(SystemExit, match="checkpoint not found"):
        export.main([str(tmp_path / "missing.pt"), str(tmp_path / "new")])
    for action in export.get_args_parser()._actions:
        assert action.help, f"--help says nothing about {action.option_strings}"
