"""The benchmark scripts run end to end at their smallest settings and write complete JSON
(they assert nothing about time; these tests check only that every figure is there and sane)."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *flags, timeout=300):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc.stdout


def _positive(value, what):
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, f"{what} = {value!r}"


def test_gpu_benchmark_smoke_run_writes_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    stdout = _run("gpu.py", "--smoke", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["smoke"]
    assert {"step", "breakdown", "rows", "encoder", "data_loading", "retrieval", "card", "machine"} <= set(result)
    assert len(result["step"]) == 2  # sampled and all pixels
    for row in result["step"]:
        for key in ("rate", "ms", "mfu", "peak_mem_gb"):
            _positive(row[key], f"step {row['setting']} {key}")
        assert row["peak_source"] == "measured matmul"  # no nominal peak for a CPU
    breakdown = result["breakdown"]
    assert set(breakdown["section_shares"]) == {"data", "h2d", "cnn", "transformer", "heads", "optimizer"}
    assert math.isclose(sum(breakdown["section_shares"].values()), 1.0, rel_tol=1e-6)
    ops = breakdown["operators"]["shares"]
    assert math.isclose(sum(v for kinds in ops.values() for v in kinds.values()), 1.0, rel_tol=1e-6)
    assert ops["cnn"]["conv"] > 0 and ops["transformer"]["matmul"] > 0
    assert 0 < breakdown["operators"]["outside_cnn_attention_matmul"] < 1
    parts = {row["part"] for row in result["rows"]}
    assert parts == {"amp auto", "paper step", "step share", "encoder", "data", "retrieval"}
    checks = [row for row in result["rows"] if row["part"] == "paper step"]
    assert [row["setting"].split()[-1] for row in checks] == ["fp16", "bf16"]
    for row in checks:  # a finite loss and finite weights after one fp16 and one bf16 step
        assert math.isfinite(row["rate"]) and row["rate"] > 0 and row["note"].endswith("finite after the step: True")
    for row in result["rows"]:
        if row["part"] in ("amp auto", "paper step"):
            continue
        if row["unit"] not in ("padded share", "of step time"):
            _positive(row["rate"], row["setting"])
    enc = result["encoder"]
    assert {r["impl"] for r in enc["rows"]} == {"ours", "hf-sdpa"}
    for r in enc["rows"]:
        _positive(r["vs_hf_sdpa"], "encoder ratio")
        _positive(r["gflop"], "encoder FLOPs")
    padding = {r["batching"]: r["padded_pixels"] for r in result["data_loading"]["padding"]}
    assert 0 <= padding["aspect-ratio groups"] < padding["random batches"] < 1  # grouping cuts padding
    ret = result["retrieval"]
    for key in ("speedup_measured", "speedup_predicted", "gflop_cnn_per_image", "gflop_per_pair"):
        _positive(ret[key], key)
    assert [p["pairs"] for p in ret["projections"]] == [5_000_000, 125_000_000]
    assert "step" in stdout and "retrieval" in stdout  # the one table


def test_step_benchmark_rows(tmp_path):
    out = tmp_path / "step.json"
    _run("step.py", "--presets", "tiny", "--repeat", "1", "--batch", "2", "--no-breakdown", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["pixels"] for r in rows] == ["sampled", "all"]
    for row in rows:
        for key in ("samples_s", "tflops", "of_matmul", "peak_mem_gb"):
            _positive(row[key], key)


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun demo run")
def test_scaling_benchmark_reads_the_demo_rate(tmp_path):
    out = tmp_path / "scaling.json"
    _run("scaling.py", "--device", "cpu", "--nprocs", "1", "--max-steps", "4", "--warmup-steps", "2",
         "--batch-size", "4", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1 and rows[0]["processes"] == 1 and rows[0]["efficiency"] == 1.0
    _positive(rows[0]["samples_s"], "samples/s")


def _scaling_module():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import scaling
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    return scaling


def test_scaling_rate_is_measured_between_the_first_and_last_progress_lines(tmp_path):
    """steady_rate: each progress line's samples_per_s is the mean rate since the loop started. Two
    processes of batch 4: 80 samples by 10 s (step 10), 240 by 20 s (step 30), so the steady rate
    between them is 160 samples / 10 s = 16 samples/s, whatever the start-up cost before step 10."""
    scaling = _scaling_module()
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"kind": "train", "step": 10, "samples_per_s": 80 / 10}, {"kind": "epoch", "step": 20},
        {"kind": "train", "step": 30, "samples_per_s": 240 / 20}]) + "\n")
    assert scaling.steady_rate(str(path), 4, 2) == pytest.approx(16.0)


def test_scaling_efficiency_is_the_rate_over_n_times_the_one_process_rate(monkeypatch, tmp_path):
    """With one process the efficiency is 1 by definition; at N it is rate(N) / (N x rate(1)): 150
    samples/s on 2 processes against 100 on one is 0.75 (and 0.5 on 4 at 200)."""
    scaling = _scaling_module()
    rates = {1: 100.0, 2: 150.0, 4: 200.0}
    monkeypatch.setattr(scaling, "run_demo", lambda n, args, device, folder: {
        "processes": n, "samples_s": rates[n], "per_process": rates[n] / n, "wall_s": 1.0})
    result = scaling.main(["--device", "cpu", "--nprocs", "4,1,2", "--json", str(tmp_path / "s.json")])
    assert [r["processes"] for r in result["rows"]] == [1, 2, 4]
    assert [r["efficiency"] for r in result["rows"]] == pytest.approx([1.0, 0.75, 0.5])
    assert json.loads((tmp_path / "s.json").read_text())["rows"] == result["rows"]


def test_demo_seeds_runs_its_grid_with_a_world_per_seed_from_own_world_from(tmp_path):
    """benchmarks/demo_seeds.py (the README's 16-run table), at its smallest: two seeds, the second
    past --own-world-from, so it trains on a world of its own; each run is train.py as a user types it."""
    out = tmp_path / "grid"
    stdout = _run("demo_seeds.py", "--seeds", "0", "9", "--own-world-from", "8", "--threads", "1", "--out-dir",
                  str(out), "--train-args", "--max-steps 2 --synthetic-images 64 --synthetic-eval-images 16 "
                  "--itm-start-step 1 --log_every 1", timeout=600)
    report = json.loads((out / "demo_seeds.json").read_text())
    assert [(r["seed"], r["world"]) for r in report["stage1"]] == [(0, 0), (9, 9)]
    for run in report["stage1"]:
        result = run["result"]
        assert result["steps"] == 2 and 0 <= result["itm_acc"] <= 1 and result["pairs"] == 16
        config = json.loads((out / f"stage1-s{run['seed']}-w{run['world']}-t1" / "config.json").read_text())
        assert config["train"]["seed"] == run["seed"] and config["data"]["synthetic_seed"] == run["world"]
    assert "min" in stdout and "median" in stdout and "max" in stdout


def test_itm_switch_probes_every_summary_of_a_trained_model(trained_checkpoint, tmp_path):
    """benchmarks/itm_switch.py on the grounded test model: every probe's accuracy is written, and the
    words' summaries tell a mismatch (a model that reads the pixels) better than chance."""
    model, _ = trained_checkpoint
    out = tmp_path / "switch.json"
    stdout = _run("itm_switch.py", "--model", model, "--synthetic-seed", "17", "--pairs", "512", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["pairs"] == 512
    for name in ("cls", "mean_words", "colour_word"):
        for kind in ("linear", "mlp"):
            assert 0.0 <= result[f"match_{name}_{kind}"] <= 1.0
    # trained to the end, the words carry the comparison of caption and pixels
    assert result["match_colour_word_linear"] > 0.65, result
    assert result["image_colour_from_mismatched_colour_word"] > 0.8, result
    assert "[CLS] (what eq. (8) reads)" in stdout
