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


# -------------------------------------------------------------------------------------------------
#                The paper's optimisers, clipping and schedule, as the README states them
# -------------------------------------------------------------------------------------------------

def _optimizer_groups(model, cfg):
    """{param id: (optimizer class name, its group's settings)} of build_optimizers(model, cfg)."""
    from pixel_bert.optim import build_optimizers
    groups = {}
    for o in build_optimizers(model, cfg):
        for g in o.param_groups:
            for p in g["params"]:
                assert id(p) not in groups, "a parameter in two groups"
                groups[id(p)] = (type(o).__name__, g)
    return groups


def test_the_papers_optimizers_sgd_on_the_cnn_adamw_elsewhere_no_decay_on_1d():
    """SGD for the ResNet trunk (lr 1e-2, weight decay 5e-4 on every CNN parameter, momentum 0.9);
    AdamW for the rest (lr 1e-4, decay 1e-2, betas (0.9, 0.999), eps 1e-6), with no decay on 1-D
    parameters; the projection and s_v with AdamW unless --visual-embedding-optimizer sgd; the tied
    MLM decoder once; a frozen CNN gets no optimiser."""
    model = PixelBertForPreTraining(make_model_config("tiny", hidden_size=32, num_layers=1, num_heads=2,
                                                      intermediate_size=64))
    named = dict(model.named_parameters())  # named_parameters lists the tied decoder weight once
    groups = _optimizer_groups(model, make_train_config("pretrain"))
    assert set(groups) == {id(p) for p in named.values()}  # every parameter, once
    for name, p in named.items():
        kind, g = groups[id(p)]
        if name.startswith("bert.visual_embedding.backbone."):
            assert kind == "SGD" and (g["lr"], g["weight_decay"], g["momentum"]) == (1e-2, 5e-4, 0.9), name
        else:
            assert kind == "AdamW" and (g["lr"], g["betas"], g["eps"]) == (1e-4, (0.9, 0.999), 1e-6), name
            assert g["weight_decay"] == (0.0 if p.ndim < 2 else 1e-2), name
    cnn_1d = [n for n, p in named.items() if n.startswith("bert.visual_embedding.backbone.") and p.ndim == 1]
    assert cnn_1d and all(groups[id(named[n])][1]["weight_decay"] == 5e-4 for n in cnn_1d)  # SGD decays all
    assert groups[id(named["bert.visual_embedding.semantic"])][1]["weight_decay"] == 0.0  # s_v: 1-D
    sgd = _optimizer_groups(model, make_train_config("pretrain", visual_embedding_optimizer="sgd"))
    for name in ("bert.visual_embedding.proj.weight", "bert.visual_embedding.proj.bias",
                 "bert.visual_embedding.semantic"):
        assert sgd[id(named[name])][0] == "SGD", name
    decay_all = _optimizer_groups(model, make_train_config("pretrain", no_decay_1d=False))
    assert all(g["weight_decay"] == 1e-2 for kind, g in decay_all.values() if kind == "AdamW")
    model.bert.freeze_backbone()
    frozen = _optimizer_groups(model, make_train_config("pretrain"))
    assert {kind for kind, _ in frozen.values()} == {"AdamW"}
    assert not any(id(p) in frozen for n, p in named.items() if n.startswith("bert.visual_embedding.backbone."))


def test_weight_decay_acts_as_configured_in_a_step():
    """With every gradient zero, one step moves only by weight decay: a decayed AdamW weight shrinks by
    lr x 1e-2, an AdamW 1-D parameter stays, and every CNN parameter, 1-D too, shrinks by lr x 5e-4
    (SGD). At lr 1 for both, so that the shrink stands far above float rounding."""
    from pixel_bert.optim import build_optimizers
    model = PixelBertForPreTraining(make_model_config("tiny", hidden_size=32, num_layers=1, num_heads=2,
                                                      intermediate_size=64))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # no zero entries (LayerNorm biases, s_v start at 0)
    before = snapshot(model)
    optimizers = build_optimizers(model, make_train_config("pretrain", lr=1.0, cnn_lr=1.0))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for o in optimizers:
        o.step()
    for name, p in model.named_parameters():
        if name.startswith("bert.visual_embedding.backbone."):
            factor = 1 - 5e-4
        else:
            factor = 1.0 if p.ndim < 2 else 1 - 1e-2
        torch.testing.assert_close(p.detach(), before[name] * factor, rtol=2e-6, atol=0.0, msg=name)


def step_recorder(optimizers):
    """[(optimizer class, lr of its first group, global gradient norm over all its parameters)] at each
    step, recorded by a pre-step hook."""
    seen = []

    def hook(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        seen.append((type(optimizer).__name__, optimizer.param_groups[0]["lr"], norm))
    for o in optimizers:
        o.register_step_pre_hook(hook)
    return seen


def test_gradients_are_clipped_at_a_global_norm_of_10_over_both_optimizers(tmp_path):
    """One norm over the CNN's and the transformer's gradients together: scaled down to 10 when above,
    left alone below; the step returns the norm before clipping."""
    trainer, model = tiny_trainer(tmp_path, amp="none")
    assert trainer.cfg.grad_clip == 10.0
    seen = step_recorder(trainer.optimizers)
    stats = EpochStats()
    for scale in (1000.0, 0.01):
        trainer.micro_batch({"num_samples": 4}, stats)
        with torch.no_grad():
            for p in trainer.params:
                p.grad.mul_(scale)
        raw = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in trainer.params]))
        seen.clear()
        grad_norm = trainer.optimizer_step(stats)
        assert grad_norm.item() == pytest.approx(raw.item(), rel=1e-5)
        assert [kind for kind, _, _ in seen] == ["AdamW", "SGD"]  # both step, on the clipped gradients
        together = torch.linalg.vector_norm(torch.stack([norm for _, _, norm in seen])).item()
        if scale > 1:
            assert raw.item() > 10 and together == pytest.approx(10.0, rel=1e-4), (raw, seen)
        else:
            assert raw.item() < 10 and together == pytest.approx(raw.item(), rel=1e-4), (raw, seen)


def test_the_lr_follows_warm_up_and_the_decay_epochs_in_optimizer_steps(tmp_path):
    """A 4-epoch run of 2 optimizer steps an epoch (of 2 micro-batches each), warm-up over 2 steps from
    lr/3, x0.1 at epochs 2 and 3: the lr each optimiser steps with, step by step."""
    cfg = make_model_config("tiny", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    model = PixelBertForPreTraining(cfg)
    ids, images = torch.randint(5, 64, (2, 6)), torch.randn(2, 3, 32, 32)
    step_fn = lambda m, batch, step: {"loss": m(ids, torch.ones_like(ids), images)[2].pow(2).mean()}  # noqa: E731
    data = list(range(4))
    train_cfg = make_train_config("pretrain", batch_size=1, grad_accum_steps=2, epochs=4, decay_epochs=(2, 3),
                                  warmup_steps=2, lr=1e-3, num_workers=0, log_every=1, ckpt_every=1000)
    trainer = Trainer(model, train_cfg, str(tmp_path), data, lambda idx: {"num_samples": len(idx)},
                      epoch_batch_sampler(data, 1, 0), step_fn, DistInfo(), {})
    seen = step_recorder(trainer.optimizers)
    trainer.fit()
    factors = [1 / 3, 2 / 3, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01]  # steps 0..7; epoch = step // 2
    assert [lr for kind, lr, _ in seen if kind == "AdamW"] == pytest.approx([1e-3 * f for f in factors])
    assert [lr for kind, lr, _ in seen if kind == "SGD"] == pytest.approx([1e-2 * f for f in factors])
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"kind": "train"' in line]
    assert [r["step"] for r in logged] == list(range(1, 9))


def test_fp16_loss_scale_calibration_never_stops_a_run(tmp_path):
    """A loss scale far too high for fp16 overflows the gradients step after step while it backs off:
    more overflows in a row than --max-nonfinite-steps allows for real non-finite steps, and the run
    still finishes, logs them as calibration, and trains once the scale fits."""
    cfg = make_model_config("tiny", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                            hidden_dropout=0.0, attention_dropout=0.0)
    model = PixelBertForPreTraining(cfg)
    ids = torch.randint(5, 64, (4, 6))

    def step_fn(m, batch, step):  # text only: the CNN's fp16 convolutions are slow on a CPU
        _, mlm, itm = m(ids, torch.ones_like(ids))
        return {"loss": mlm.float().logsumexp(-1).mean() + itm.float().pow(2).mean()}
    data = list(range(4 * 16))
    train_cfg = make_train_config("pretrain", batch_size=4, epochs=1, warmup_steps=0, num_workers=0, lr=1e-3,
                                  amp="fp16", max_nonfinite_steps=1, log_every=1, ckpt_every=1000)
    logs = []
    trainer = Trainer(model, train_cfg, str(tmp_path), data, lambda idx: {"num_samples": len(idx)},
                      epoch_batch_sampler(data, 4, 0), step_fn, DistInfo(), {}, log=logs.append)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 24)  # fp16's largest value is 65504
    trainer.fit()
    overflows = [line for line in logs if line.startswith("fp16 gradient overflow")]
    assert len(overflows) > train_cfg.max_nonfinite_steps + 1, logs[:5]
    assert trainer.step == 16 - len(overflows) > 0  # every other micro-batch took a step
    assert not any("non-finite" in line for line in logs)
    epoch = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"kind": "epoch"' in line][-1]
    assert epoch["skipped_steps"] == len(overflows)
