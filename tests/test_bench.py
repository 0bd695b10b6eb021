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
@pytest.mark.parametrize("backend", ["session", "torch"])
def test_cost_growth_benchmark_prints_the_loss_share(backend):
    """On the session's backend (XLA on JAX / TensorFlow) and on PyTorch, whose eager step is Keras' fastest on a
    CPU and gives the README's CPU table."""
    if backend == "torch":
        pytest.importorskip("torch")
    else:
        backend = keras.backend.backend()
        if backend == "torch":
            pytest.skip("the torch case runs it")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "cost_growth.py"), "--suite", "smoke"],
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND=backend),
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"backend {backend}," in done.stdout
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


def _profile_step_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("profile_step", ROOT / "bench" / "profile_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GPU_TRACE = """
planes {
  id: 1
  name: "/device:GPU:0"
  lines {
    id: 1
    name: "Stream #14(Compute,MemcpyD2D,Memset)"
    events { metadata_id: 1 offset_ps: 0 duration_ps: 3000000000
             stats { metadata_id: 1 str_value: "fusion.7" } }
    events { metadata_id: 2 offset_ps: 4000000000 duration_ps: 1000000000
             stats { metadata_id: 1 str_value: "cc.2" } }
    events { metadata_id: 1 offset_ps: 6000000000 duration_ps: 3000000000
             stats { metadata_id: 1 str_value: "fusion.7" } }
  }
  lines { id: 2 name: "Stream #16(MemcpyD2H)"
    events { metadata_id: 3 offset_ps: 9000000000 duration_ps: 1000000000 } }
  event_metadata { key: 1 value { id: 1 name: "input_reduce_fusion" } }
  event_metadata { key: 2 value { id: 2 name: "sm90_xmma_wgrad_implicit_gemm" } }
  event_metadata { key: 3 value { id: 3 name: "MemcpyD2H" } }
  stat_metadata { key: 1 value { id: 1 name: "hlo_op" } }
}
planes { id: 2 name: "/host:CPU" lines { id: 1 name: "python"
  events { metadata_id: 1 offset_ps: 0 duration_ps: 90000000000 } }
  event_metadata { key: 1 value { id: 1 name: "PjitFunction(train_step)" } } }
"""
HLO = (  # two instructions of an optimized module, as `compiled.as_text()` prints them
    "  %fusion.7 = (f32[64]{0}, f32[64]{0}) fusion(bf16[8,4,4,64]{3,2,1,0} %p), kind=kInput, "
    'calls=%fused_computation.7, metadata={op_name="jit(train_step)/jvp(encoder)/conv2_block1_1_bn/'
    'batch_normalization/reduce_sum" source_file="x.py"}\n'
    '  %cc.2 = (bf16[3,3,64,64]{3,2,1,0}, s8[0]{0}) custom-call(%a, %b), custom_call_target="__cudnn$convBackward'
    'Filter", metadata={op_name="jit(train_step)/transpose(jvp(encoder))/conv2_block1_2_conv/conv_general_dilated"}\n'
)


def test_profile_summary_groups_gpu_kernels_by_what_they_compute(capsys):
    from jax.profiler import ProfileData

    profile_step = _profile_step_module()
    profile = ProfileData.from_text_proto(GPU_TRACE)
    rows, busy, span = profile_step.kernel_rows(profile, profile_step.op_names_from_hlo(HLO))
    assert busy == pytest.approx(8.0) and span == pytest.approx(10.0)  # every stream line, host events left out
    assert rows[0][0][:2] == ("input_reduce_fusion", "fusion.7") and rows[0][1] == [6.0, 2]
    figures = profile_step.summarize_profile(profile, HLO, steps=2, top=5)
    assert figures["categories"] == pytest.approx({"batch norm": 3.0, "convolution": 0.5, "other elementwise": 0.5})
    assert figures["busy_ms"] == pytest.approx(4.0) and figures["backward_ms"] == pytest.approx(0.5)
    assert "conv2_block1_2_conv/conv_general_dilated" in capsys.readouterr().out


@pytest.mark.slow
def test_profile_step_times_the_library_step_against_keras_batch_norm_statistics(tmp_path):
    pytest.importorskip("jax")
    out = tmp_path / "profile.jsonl"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "profile_step.py"), "--backbone", "resnet_tiny",
                           "--global-size", "16", "--local-size", "8", "--local-crops", "2", "--batch", "4",
                           "--k", "64", "--block-size", "16", "--hidden", "32", "--bottleneck", "16",
                           "--precision", "float32", "--steps", "3", "--warmup", "1", "--breakdown",
                           "--variants", "library,keras_moments", "--profile", "library", "--out", str(out)],
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="jax"), capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    library, keras_moments = (json.loads(line) for line in out.read_text().splitlines())
    assert (library["variant"], keras_moments["variant"]) == ("library", "keras_moments")
    assert library["loss"] == pytest.approx(keras_moments["loss"], rel=1e-5)  # same step, other BN statistics
    for result in (library, keras_moments):
        assert 0 < result["min_ms"] <= result["median_ms"] and result["pipelined_ms"] > 0
        # Both parts were timed (no order between them is asserted: timings are noisy on a shared machine).
        assert set(result["breakdown_ms"]) >= {"forward", "forward+backward"}
        assert all(ms > 0 for ms in result["breakdown_ms"].values())
    assert "x first" in done.stdout
    # The library step was traced with jax.profiler and the trace read back: its GPU kernels, or on a CPU a note.
    assert "profile" in library and "profile" not in keras_moments
    assert ("GPU kernel time per step" in done.stdout) == (library["profile"]["busy_ms"] > 0)
    assert "GPU kernel time per step" in done.stdout or "No GPU kernels in the trace" in done.stdout
