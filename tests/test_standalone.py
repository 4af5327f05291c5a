"""model.py (and heads.py and losses.py beside it) copy out of the repository and work with only torch
and torchvision: nanoGPT's promise for its model.py, kept here for the reference's readers."""
import os
import shutil
import subprocess
import sys
import textwrap

import pixel_bert

PACKAGE_DIR = os.path.dirname(pixel_bert.__file__)

# Run first in the child: any attempt to import this repository's package fails, so the copy must
# stand on its own (the venv's editable install would otherwise find pixel_bert).
BLOCK_PACKAGE = textwrap.dedent("""
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "pixel_bert" or name.startswith("pixel_bert."):
                raise ImportError("pixel_bert must not be needed by the copied file")
    sys.meta_path.insert(0, _Block())
""")


def run_child(code: str, cwd: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", BLOCK_PACKAGE + textwrap.dedent(code)], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_model_py_copies_out_alone(tmp_path):
    shutil.copy(os.path.join(PACKAGE_DIR, "model.py"), tmp_path / "model.py")
    stdout = run_child("""
        import torch
        from model import PixelBert, PixelBertConfig
        cfg = PixelBertConfig(backbone="resnet18", backbone_stages=2, freeze_backbone_bn=False, vocab_size=50,
                              hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
        model = PixelBert(cfg).eval()
        ids = torch.randint(1, 50, (2, 7))
        out = model(ids, torch.ones_like(ids), images=torch.randn(2, 3, 64, 64))
        print(tuple(out.hidden.shape), out.visual.grid)
    """, str(tmp_path))
    # 7 text tokens + a 4x4 grid of feature pixels (64 px at stride 16)
    assert stdout.split() == ["(2,", "23,", "32)", "(4,", "4)"]


def test_heads_py_copies_out_with_model_py(tmp_path):
    lib = tmp_path / "mylib"
    lib.mkdir()
    (lib / "__init__.py").write_text("")
    for name in ("model.py", "heads.py"):
        shutil.copy(os.path.join(PACKAGE_DIR, name), lib / name)
    stdout = run_child("""
        import torch
        from mylib.heads import PixelBertForPreTraining, PixelBertForVQA
        from mylib.model import PixelBertConfig
        cfg = PixelBertConfig(backbone="resnet18", backbone_stages=2, freeze_backbone_bn=False, vocab_size=50,
                              hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, num_answers=9)
        ids = torch.randint(1, 50, (3, 6))
        images = torch.randn(3, 3, 64, 64)
        _, mlm, itm = PixelBertForPreTraining(cfg)(ids, torch.ones_like(ids), images)
        vqa = PixelBertForVQA(cfg)(ids, torch.ones_like(ids), images)
        print(tuple(mlm.shape), tuple(itm.shape), tuple(vqa.shape))
    """, str(tmp_path))
    assert stdout.split() == ["(3,", "6,", "50)", "(3,)", "(3,", "9)"]



def test_losses_py_copies_out_with_model_py_and_heads_py(tmp_path):
    """A pre-training step and a retrieval loss from the three copied files and a plain PixelBertConfig:
    the number of sampled pixels is the network's own field, so nothing of the run's configuration is needed."""
    lib = tmp_path / "mylib"
    lib.mkdir()
    (lib / "__init__.py").write_text("")
    for name in ("model.py", "heads.py", "losses.py"):
        shutil.copy(os.path.join(PACKAGE_DIR, name), lib / name)
    stdout = run_child("""
        import torch
        from mylib.heads import PixelBertForPreTraining, PixelBertForRetrieval
        from mylib.losses import IGNORE_INDEX, hard_negative_loss, make_itm_pairs, mask_tokens, pretrain_losses
        from mylib.model import PixelBertConfig
        cfg = PixelBertConfig(backbone="resnet18", backbone_stages=2, freeze_backbone_bn=False, vocab_size=50,
                              hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, num_sampled_pixels=5)
        torch.manual_seed(0)
        ids, mask = torch.randint(5, 50, (4, 6)), torch.ones(4, 6, dtype=torch.bool)
        images = torch.randn(4, 3, 64, 64)
        pair_ids, pair_mask, itm_labels = make_itm_pairs(ids, mask, ["a", "b", "c", "d"], generator=torch.Generator().manual_seed(0))
        masked, mlm_labels = mask_tokens(pair_ids, pair_mask, [0, 1, 2, 3, 4], 50, 4, probability=0.5,
                                         predict=itm_labels.bool(), generator=torch.Generator().manual_seed(1))
        model = PixelBertForPreTraining(cfg).train()
        out, mlm, itm = model(masked, pair_mask, images, num_sampled_pixels=cfg.num_sampled_pixels)
        losses = pretrain_losses(mlm, mlm_labels, itm, itm_labels)
        losses["loss"].backward()
        scores = PixelBertForRetrieval(cfg)(ids, mask, images)
        rank_loss, hard = hard_negative_loss(scores[:2], torch.stack([scores[2:], scores[2:]]), num_hard=1)
        print(out.visual.embeddings.shape[1], bool(torch.isfinite(losses["loss"])), (mlm_labels != IGNORE_INDEX).any().item(),
              model.bert.visual_embedding.proj.weight.grad.abs().sum().item() > 0, tuple(hard.shape),
              bool(torch.isfinite(rank_loss)))
    """, str(tmp_path))
    # 5 sampled feature pixels of the 4x4 grid; a finite loss whose gradient reaches the visual projection
    assert stdout.split() == ["5", "True", "True", "True", "(2,", "1)", "True"]

def test_blocks_do_not_share_activation_modules():
    from pixel_bert.config import make_model_config
    from pixel_bert.heads import PixelBertForPreTraining
    model = PixelBertForPreTraining(make_model_config("tiny"))
    acts = [m.act for m in model.bert.layers] + [model.mlm.act]
    assert len({id(a) for a in acts}) == len(acts)


def test_installing_adds_no_top_level_module_besides_pixel_bert(tmp_path):
    """The scripts install as pixel_bert.train / .finetune / .evaluate (and pixel-bert-* commands), never
    as top-level modules: a top-level `evaluate` would shadow the widely used package of that name."""
    import glob
    import zipfile
    root = os.path.dirname(PACKAGE_DIR)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), root], check=True, capture_output=True, timeout=300)
    (wheel,) = glob.glob(str(tmp_path / "*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"pixel_bert"}
    for script in ("train", "finetune", "evaluate", "export"):
        assert f"pixel-bert-{script} = pixel_bert.{script}:cli" in entry_points
    # the attention explorer's page ships inside the package (setup.py package_data)
    static = sorted(os.listdir(os.path.join(PACKAGE_DIR, "explore_static")))
    assert static and all(f"pixel_bert/explore_static/{name}" in names for name in static), (static, names)
