"""Smoke runs of the benchmarks at tiny sizes: they start from a fresh process, time real steps and print the table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_step_benchmark_against_the_torch_reference(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "results.jsonl"
    backend = keras.backend.backend()
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "train_step.py"), "--suite", "smoke",
                           "--backends", backend, "--out", str(out)],
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = [json.loads(line) for line in out.read_text().splitlines()]
    reference, ours = results
    assert reference["implementation"] == "torch reference" and ours["implementation"] == f"keras-carp ({backend})"
    for result in results:
        assert result["steps"] == 3 and 0 < result["p10_ms"] <= result["median_ms"] <= result["p90_ms"]
        assert result["images_per_s"] == pytest.approx(result["batch"] / (result["median_ms"] / 1e3))
        assert 0 < result["mfu"] < 1 and result["step_tflop"] > 0
    assert ours["vs_reference"] == pytest.approx(ours["images_per_s"] / reference["images_per_s"])
    assert "keras-carp" in done.stdout and "x ref" in done.stdout  # the side-by-side table


@pytest.mark.slow
def test_cost_growth_benchmark_prints_the_loss_share():
    if keras.backend.backend() not in ("jax", "tensorflow"):
        pytest.skip("bench/cost_growth.py runs on the jax or tensorflow backend")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "cost_growth.py"), "--suite", "smoke"],
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("k ")]
    assert [row[1] for row in rows] == ["64", "128"]
    for row in rows:
        step_ms, loss_ms, share = float(row[2]), float(row[4]), float(row[5])
        assert 0 < loss_ms and 0 < share == pytest.approx(100 * loss_ms / step_ms, abs=0.1)


@pytest.mark.slow
def test_loss_formulations_benchmark_agree_and_are_timed():
    if keras.backend.backend() not in ("jax", "tensorflow"):
        pytest.skip("bench/loss_formulations.py runs on the jax or tensorflow backend")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "loss_formulations.py"), "--batch", "4",
                           "--crops", "4", "--k", "64", "--block-size", "16", "--steps", "3"],
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines() if " loss " in line]
    assert [row[:3] for row in rows] == [["per", "crop", "(library)"], ["fused", "(tried)", "loss"]]
    losses = [float(line.split(" loss ")[1].split()[0]) for line in done.stdout.splitlines() if " loss " in line]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)  # the two formulations are the same loss
    difference = float(done.stdout.rsplit("max gradient difference ", 1)[1].split(")")[0])
    assert difference < 1e-5


@pytest.mark.slow
def test_fit_pipeline_benchmark_reports_fit_pipeline_and_step(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "fit_pipeline.py"), "--backbone", "resnet_tiny",
                           "--global-size", "16", "--local-size", "8", "--local-crops", "2", "--k", "64",
                           "--block-size", "16", "--hidden", "32", "--bottleneck", "16", "--batch", "4",
                           "--steps", "3", "--warmup", "1", "--num-images", "12", "--jpeg-dir", str(tmp_path),
                           "--json"],
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert len(list(tmp_path.glob("*.jpg"))) == 12
    figures = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    fit, pipeline, step = (figures[f"{name}_images_per_s"] for name in ("fit", "pipeline", "step"))
    assert fit > 0 and pipeline > 0 and step > 0
    assert figures["cores_to_keep_step_busy"] == pytest.approx(step / (pipeline / figures["cores"]))
    assert f"{fit / min(pipeline, step):9.2f}" in done.stdout  # the printed table
