"""Weights: parity with transformers' BERT on a real checkpoint, HF pre-training heads, backbone
weights, our own checkpoints, and clear errors on bad files (Sec. 3.2 of the paper; docs/paper.md)."""
import os

import pytest
import torch
import torchvision

transformers = pytest.importorskip("transformers")

from pixel_bert.config import make_model_config, model_config_from_bert
from pixel_bert.heads import PixelBertForPreTraining, PixelBertForVQA
from pixel_bert.model import PixelBert
from pixel_bert.pretrained import load_backbone_weights, load_bert_weights
from pixel_bert.factory import model_from_state
from pixel_bert.saved_model import load_saved_model, read_checkpoint, save_model
from pixel_bert.tokenizer import WordPieceTokenizer

SENTENCES = ["a dog catches a frisbee on the grass",
             "Two men are cutting a cake in the room, while a child watches.",
             "hi",
             "Ångström measured 12,345 supercalifragilistic [MASK] things!"]


def _cnn_free(config_json, **kw):
    return model_config_from_bert(config_json, backbone="resnet18", backbone_weights=None, backbone_stages=1, **kw)


def test_minilm_matches_transformers_bert(minilm_dir):
    config = _cnn_free(os.path.join(minilm_dir, "config.json"))
    model = PixelBert(config).eval()
    report = load_bert_weights(model, minilm_dir, verbose=False)
    assert len(report.loaded) == 5 + 6 * 12  # embeddings + 12 per layer (q, k, v fused into qkv)
    assert "pooler.dense.weight" in report.unused
    tok = WordPieceTokenizer(os.path.join(minilm_dir, "vocab.txt"))
    batch = tok(SENTENCES, max_length=64)
    assert not batch.attention_mask.all()  # the batch really is padded
    reference = transformers.BertModel.from_pretrained(minilm_dir).eval()
    with torch.no_grad():
        ours = model(batch.input_ids, batch.attention_mask).hidden
        ref = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).last_hidden_state
    err = (ours - ref)[batch.attention_mask].abs().max().item()
    print(f"MiniLM-L6 parity: max |ours - transformers| = {err:.2e}")
    assert err < 1e-4


def test_tokenizer_matches_transformers(minilm_dir):
    vocab = os.path.join(minilm_dir, "vocab.txt")
    ours = WordPieceTokenizer(vocab)
    ref = transformers.BertTokenizer(vocab, do_lower_case=True)
    hard = SENTENCES + ["Héllo Wörld! café naïve", "東京タワー 中文字符 한국어", "3.14159 and 1,000,000 42nd",
                        "antidisestablishmentarianism", "e-mail: foo@bar.com (yes)?", "don't won't",
                        "the [MASK] sat on the [MASK].", "tabs\tand\nnewlines", "emoji 🙂 ok", ""]
    assert ours.vocab_size == 30522
    for text in hard:
        assert ours.encode(text) == ref(text)["input_ids"], text
    assert ours.mask_id == ref.mask_token_id and ours.cls_id == ref.cls_token_id


def _tiny_hf_config():
    return transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=40)


@pytest.mark.parametrize("safe", [True, False])
def test_hf_pretraining_heads_load_and_mlm_logits_match(tmp_path, safe):
    torch.manual_seed(0)
    hf = transformers.BertForPreTraining(_tiny_hf_config()).eval()
    with torch.no_grad():  # non-trivial biases so a missed tensor shows
        hf.cls.predictions.bias.normal_()
    hf.save_pretrained(tmp_path, safe_serialization=safe)
    config = _cnn_free(str(tmp_path / "config.json"), hidden_dropout=0.0, attention_dropout=0.0)
    model = PixelBertForPreTraining(config).eval()
    report = load_bert_weights(model, str(tmp_path), verbose=False)
    assert "mlm.bias" in report.loaded and "mlm.dense.weight" in report.loaded
    assert "cls.seq_relationship.weight" in report.unused
    ids = torch.randint(5, 99, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 6:] = False
    with torch.no_grad():
        out, logits, _ = model(ids, mask)
        ref = hf(input_ids=ids, attention_mask=mask.long()).prediction_logits
    assert torch.allclose(logits[mask], ref[mask], atol=1e-4)


def test_bert_state_dict_without_prefix(tmp_path):
    hf = transformers.BertModel(_tiny_hf_config(), add_pooling_layer=False)
    torch.save(hf.state_dict(), tmp_path / "plain.bin")
    config = make_model_config("tiny", vocab_size=99, hidden_size=32, num_layers=2, num_heads=4,
                               intermediate_size=64, max_position_embeddings=40)
    model = PixelBert(config)
    load_bert_weights(model, str(tmp_path / "plain.bin"), verbose=False)
    assert torch.equal(model.text_embedding.word.weight, hf.embeddings.word_embeddings.weight)
    q = hf.encoder.layer[1].attention.self.query.weight
    assert torch.equal(model.layers[1].attention.qkv.weight[:32], q)


def test_bad_weights_give_clear_errors(tmp_path, tiny_config):
    model = PixelBert(tiny_config)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_bert_weights(model, str(tmp_path / "nope"))
    # a checkpoint of another width: the error names the tensor and both shapes
    hf = transformers.BertModel(_tiny_hf_config())
    hf.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"text_embedding.word.weight.*\(99, 32\).*\(64, 64\)"):
        load_bert_weights(model, str(tmp_path / "other"))
    # a pickle that would run code on loading is refused
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))
    torch.save({"model": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(ValueError, match="refused"):
        load_bert_weights(model, str(tmp_path / "evil.bin"))
    with pytest.raises(ValueError, match="refused"):
        read_checkpoint(str(tmp_path / "evil.bin"))
    assert not (tmp_path / "pwned").exists()
    # not a weights file at all
    (tmp_path / "junk.safetensors").write_bytes(b"not tensors")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_bert_weights(model, str(tmp_path / "junk.safetensors"))


def test_backbone_weights_from_torchvision_file(tmp_path):
    config = make_model_config("tiny", backbone_stages=4, freeze_backbone_bn=True)
    resnet = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        resnet.bn1.running_mean.uniform_()
    torch.save(resnet.state_dict(), tmp_path / "r18.pth")
    model = PixelBert(config)
    report = load_backbone_weights(model, str(tmp_path / "r18.pth"), verbose=False)
    trunk = model.visual_embedding.backbone
    assert torch.equal(trunk.stem[0].weight, resnet.conv1.weight)
    assert torch.equal(trunk.stem[1].running_mean, resnet.bn1.running_mean)  # frozen BN keeps statistics
    assert torch.equal(trunk.stages[3][1].conv2.weight, resnet.layer4[1].conv2.weight)
    assert report.missing == [] and "fc.weight" in report.unused
    wrong = torchvision.models.resnet50(weights=None)
    torch.save(wrong.state_dict(), tmp_path / "r50.pth")
    with pytest.raises(ValueError, match="shape mismatch"):
        load_backbone_weights(model, str(tmp_path / "r50.pth"), verbose=False)


def test_backbone_imagenet_offline_error(monkeypatch, tiny_config):
    from torchvision.models import ResNet18_Weights
    def offline(self, *a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(type(ResNet18_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="backbone_weights=/path/to/file.pth"):
        load_backbone_weights(PixelBert(tiny_config), "imagenet", verbose=False)
    resnext = make_model_config("x152", backbone_weights=None, num_layers=1, hidden_size=64, num_heads=4)
    with pytest.raises(ValueError, match="no ImageNet weights"):
        load_backbone_weights(PixelBert(resnext), "imagenet", verbose=False)


def test_own_checkpoint_round_trip_into_another_task(tmp_path, tiny_config):
    pre = PixelBertForPreTraining(tiny_config)
    save_model(pre, str(tmp_path / "pre.pt"), extra={"task": "pretrain"})
    same = load_saved_model(str(tmp_path / "pre.pt")).model
    assert isinstance(same, PixelBertForPreTraining)
    for k, v in pre.state_dict().items():
        assert torch.equal(v, same.state_dict()[k]), k
    saved = load_saved_model(str(tmp_path / "pre.pt"), build=False)
    vqa = model_from_state("vqa", saved.config, saved.state, saved.source)
    assert isinstance(vqa, PixelBertForVQA)
    assert torch.equal(vqa.bert.layers[1].ffn_in.weight, pre.bert.layers[1].ffn_in.weight)
    # a checkpoint of a different size is refused loudly, naming the tensor
    bigger = PixelBertForPreTraining(make_model_config("tiny", hidden_size=128, num_heads=4))
    save_model(bigger, str(tmp_path / "big.pt"))
    ckpt = read_checkpoint(str(tmp_path / "big.pt"))
    with pytest.raises(ValueError, match="shape mismatch"):
        from pixel_bert.factory import load_checkpoint_weights
        load_checkpoint_weights(pre, ckpt["model"], "big.pt")
