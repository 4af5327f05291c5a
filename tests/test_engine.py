"""The training loop's guarantees: every optimiser steps or none does, the precision the paper's GPUs
get, refusing a resume that would silently change the schedule, and files that survive faults."""
import errno
import json
import os

import pytest
import torch

from pixel_bert import train
from pixel_bert.batches import epoch_batch_sampler
from pixel_bert.checkpoints import newest_valid_checkpoint
from pixel_bert.config import make_model_config, make_train_config
from pixel_bert.distributed import DistInfo
from pixel_bert.files import DiskFullError, atomic_write, save_torch
from pixel_bert.heads import PixelBertForPreTraining
from pixel_bert.optim import make_optimizer
from pixel_bert.precision import amp_settings
from pixel_bert.trainer import EpochStats, NonFiniteLossError, Trainer

TINY = ["--hidden-size", "32", "--num-layers", "1", "--num-heads", "2", "--intermediate-size", "64",
        "--image-short-side", "32", "--image-long-side", "32", "--num-sampled-pixels", "2",
        "--num-workers", "0", "--log-every", "1", "--device", "cpu", "--synthetic-eval-images", "0"]


def tiny_trainer(tmp_path, **train_overrides):
    cfg = make_model_config("tiny", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                            hidden_dropout=0.0, attention_dropout=0.0)
    model = PixelBertForPreTraining(cfg)
    ids = torch.randint(5, 64, (4, 6))
    images = torch.randn(4, 3, 32, 32)

    def step_fn(m, batch, step):
        _, mlm, itm = m(ids, torch.ones_like(ids), images)
        return {"loss": mlm.float().logsumexp(-1).mean() + itm.float().pow(2).mean()}

    data = list(range(8))
    train_cfg = make_train_config("pretrain", batch_size=4, epochs=1, warmup_steps=0, num_workers=0,
                                  lr=1e-3, **train_overrides)
    trainer = Trainer(model, train_cfg, str(tmp_path), data, lambda idx: {"num_samples": len(idx)},
                      epoch_batch_sampler(data, 4, 0), step_fn, DistInfo(), {})
    return trainer, model


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("poisoned", ["bert.visual_embedding.backbone.stem.0.weight",  # the CNN's SGD
                                      "bert.layers.0.attention.qkv.weight"])          # the transformer's AdamW
def test_one_nonfinite_gradient_stops_every_optimizer_under_fp16(tmp_path, poisoned):
    trainer, model = tiny_trainer(tmp_path, amp="fp16")
    assert trainer.amp.dtype == torch.float16 and trainer.scaler.is_enabled()
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=64.0)  # small: the clean step must not overflow
    stats, batch = EpochStats(), {"num_samples": 4}
    before = snapshot(model)
    trainer.micro_batch(batch, stats)
    grad = dict(model.named_parameters())[poisoned].grad
    grad[(0,) * grad.dim()] = float("inf")  # (the CNN's gradients are channels_last: no .view)
    assert trainer.optimizer_step(stats) is None  # skipped ...
    after = snapshot(model)
    for name in before:  # ... by both optimisers: every weight finite and unchanged
        assert torch.isfinite(after[name]).all() and torch.equal(after[name], before[name]), name
    assert trainer.scaler.get_scale() < 64.0 and trainer.step == 0 and stats.skipped_steps == 1
    trainer.micro_batch(batch, stats)  # the next clean step trains
    grad_norm = trainer.optimizer_step(stats)
    assert grad_norm is not None and torch.isfinite(grad_norm) and trainer.step == 1
    assert not torch.equal(snapshot(model)[poisoned], before[poisoned])


def test_a_streak_of_nonfinite_losses_stops_the_run(tmp_path):
    trainer, model = tiny_trainer(tmp_path, amp="none", max_nonfinite_steps=2)
    ids = torch.ones(2, 3, dtype=torch.long)
    trainer.step_fn = lambda m, batch, step: {"loss": m(ids, torch.ones_like(ids))[1].sum() * float("nan")}
    stats = EpochStats()
    for _ in range(2):  # tolerated
        trainer.micro_batch({"num_samples": 4}, stats)
        assert trainer.optimizer_step(stats) is None
    trainer.micro_batch({"num_samples": 4}, stats)
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite steps"):
        trainer.optimizer_step(stats)


def test_amp_auto_uses_fp16_with_loss_scaling_below_compute_capability_8(monkeypatch):
    cfg = make_train_config("pretrain")
    for capability, name, dtype, scaling in [((7, 0), "Tesla V100-SXM2-32GB", torch.float16, True),
                                             ((8, 0), "NVIDIA A100-SXM4-40GB", torch.bfloat16, False),
                                             ((9, 0), "NVIDIA H100 80GB HBM3", torch.bfloat16, False)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        amp = amp_settings(cfg.amp, torch.device("cuda", 0))
        assert (amp.dtype, amp.loss_scaling) == (dtype, scaling)
        assert name in amp.reason and f"{capability[0]}.{capability[1]}" in amp.reason
    cpu = amp_settings(cfg.amp, torch.device("cpu"))
    assert cpu.dtype is None and not cpu.loss_scaling


def test_resume_with_another_batch_layout_is_refused(tmp_path):
    out = str(tmp_path / "run")
    common = TINY + ["--synthetic-images", "32", "--output-dir", out]
    train.main(common + ["--batch-size", "8", "--max-steps", "2", "--resume", "none"])
    config_before = open(os.path.join(out, "config.json")).read()
    with pytest.raises(ValueError, match=r"batch_size 8 -> 4.*--init"):
        train.main(common + ["--batch-size", "4"])
    assert open(os.path.join(out, "config.json")).read() == config_before  # not overwritten


def test_metrics_hold_each_step_once_after_a_crash_and_resume(tmp_path):
    out = tmp_path / "run"
    common = TINY + ["--synthetic-images", "64", "--batch-size", "8", "--ckpt-every", "2",
                     "--output-dir", str(out), "--epochs", "1"]
    train.main(common + ["--max-steps", "5", "--resume", "none"])
    os.remove(out / "ckpt_00000005.pt")  # died after logging step 5, before its checkpoint
    result = train.main(common)
    assert result["resumed_from"].endswith("ckpt_00000004.pt") and result["steps"] == 8
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl") if '"kind": "train"' in line]
    assert steps == list(range(1, 9))


def test_a_fresh_start_in_a_used_folder_sets_the_earlier_run_aside(tmp_path, capsys):
    out = tmp_path / "run"
    common = TINY + ["--synthetic-images", "64", "--batch-size", "8", "--ckpt-every", "2",
                     "--output-dir", str(out), "--epochs", "1", "--keep-checkpoints", "2"]
    train.main(common + ["--max-steps", "6", "--resume", "none"])  # ckpt 4 and 6 kept
    train.main(common + ["--max-steps", "2", "--resume", "none"])  # a new run in the same folder
    (previous,) = [p for p in os.listdir(out) if p.startswith("previous-")]
    assert f"was moved to {out / previous}" in capsys.readouterr().out
    assert sorted(p for p in os.listdir(out / previous) if p.startswith("ckpt_")) == \
        ["ckpt_00000004.pt", "ckpt_00000006.pt"]
    assert {"metrics.jsonl", "model.pt", "result.json"} <= set(os.listdir(out / previous))
    assert sorted(p for p in os.listdir(out) if p.startswith("ckpt_")) == ["ckpt_00000002.pt"]  # not pruned
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl") if '"kind": "train"' in line]
    assert steps == [1, 2]  # this run's steps only
    result = train.main(common + ["--max-steps", "3"])  # auto: this run's checkpoint, not the earlier step 6
    assert result["resumed_from"].endswith(os.path.join("run", "ckpt_00000002.pt")) and result["steps"] == 3


def test_a_file_that_loads_but_is_no_checkpoint_is_passed_over(tmp_path, capsys):
    good = {"model": {}, "optimizers": [], "schedulers": [], "scaler": {}, "step": 1, "epoch": 0,
            "batch_in_epoch": 1, "rng": []}
    save_torch(good, str(tmp_path / "ckpt_00000001.pt"))
    save_torch({"weights": torch.zeros(2)}, str(tmp_path / "ckpt_00000002.pt"))
    path, ckpt = newest_valid_checkpoint(str(tmp_path))
    assert path.endswith("ckpt_00000001.pt") and ckpt["step"] == 1
    assert "not a training checkpoint" in capsys.readouterr().err


def test_a_full_disk_keeps_the_previous_file_and_names_the_folder(tmp_path):
    path = tmp_path / "ckpt_00000001.pt"
    path.write_bytes(b"previous checkpoint")
    with pytest.raises(DiskFullError, match=f"no space left on device.*{tmp_path}"):
        with atomic_write(str(path)) as f:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert path.read_bytes() == b"previous checkpoint"
    assert os.listdir(tmp_path) == [path.name]  # the temporary file is gone


def test_written_files_get_the_usual_permissions(tmp_path):
    """Outputs (checkpoints, model folders) get the mode plain open() / mkdir would give them under the
    process's umask, not mkstemp's owner-only 0600: a model shared on a cluster must be readable."""
    import pixel_bert.files as files
    path = files.write_text(str(tmp_path / "a.txt"), "x")
    with files.atomic_folder(str(tmp_path / "model")) as folder:
        files.write_text(os.path.join(folder, "config.json"), "{}")
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~files._UMASK
    assert os.stat(tmp_path / "model").st_mode & 0o777 == 0o777 & ~files._UMASK


def test_fused_optimizers_take_the_plain_loops_steps_and_resume_keeps_this_runs_choice(tmp_path):
    torch.manual_seed(0)  # the same weights and inputs for both
    fused, fused_model = tiny_trainer(tmp_path / "fused", fused_optimizers=True)
    torch.manual_seed(0)
    plain, plain_model = tiny_trainer(tmp_path / "plain", fused_optimizers=False)
    assert [g["fused"] for o in fused.optimizers for g in o.param_groups] == [True, True, True]  # AdamW x2, SGD
    assert not any(g["fused"] for o in plain.optimizers for g in o.param_groups)
    before, stats = snapshot(fused_model), EpochStats()
    for _ in range(3):
        for trainer in (fused, plain):
            trainer.micro_batch({"num_samples": 4}, stats)
            trainer.optimizer_step(stats)
    for (name, a), b in zip(fused_model.named_parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    moved = max((p - before[n]).abs().max().item() for n, p in fused_model.named_parameters())
    assert moved > 1e-3  # the steps changed the weights: not a comparison of two untouched models
    fused.save_checkpoint()  # a fused run's checkpoint resumed by a run that asks for the plain loop
    plain.load_checkpoint(os.path.join(str(tmp_path / "fused"), "ckpt_00000003.pt"))
    assert not any(g["fused"] for o in plain.optimizers for g in o.param_groups)


def test_an_optimizer_without_a_fused_kernel_falls_back_to_the_plain_one():
    calls = []

    class NoFusedSGD(torch.optim.SGD):  # a torch without `fused` for this optimiser
        def __init__(self, params, fused=None, **settings):
            calls.append(fused)
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be on a supported device")
            super().__init__(params, **settings)

    params = (p for p in [torch.nn.Parameter(torch.ones(3))])  # a generator: read once only
    opt = make_optimizer(NoFusedSGD, params, True, lr=0.1)
    assert calls == [True, None] and len(opt.param_groups[0]["params"]) == 1
