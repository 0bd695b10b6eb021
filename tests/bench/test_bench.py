"""The benchmarks: the package's shape, the stored records and the generated page (fast), and smoke runs of every
benchmark at tiny sizes as ``python -m bench.<name>`` (slow). No test asserts anything about a timing: only that
the figures were measured, recorded and printed (timings are noise on a shared machine)."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import pytest

from bench import results
from bench.results import Recorder, load, load_all, validate
from tests.conftest import require_optional

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ("train_step", "torch_baseline", "profile_step", "cost_growth", "loss_formulations",
              "logits_formulation", "teacher_ema", "cpu_settings", "fit_pipeline", "device_views", "input_pipeline",
              "export_and_convert")  # fmt: skip
TINY = ["--backbone", "resnet_tiny", "--global-size", "16", "--local-size", "8", "--local-crops", "2", "--k", "64",
        "--block-size", "16", "--hidden", "32", "--bottleneck", "16", "--batch", "4", "--steps", "3",
        "--warmup", "1"]  # fmt: skip


def run_module(name: str, *args: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """``python -m bench.<name> args`` from the repository root, as the README runs it; fails on a non-zero exit."""
    done = subprocess.run([sys.executable, "-m", f"bench.{name}", *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(env or {})), timeout=timeout)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def records_of(directory: Path, benchmark: str) -> list[dict]:
    """The records a run wrote, each checked against the schema and the benchmark's file."""
    found = load(directory / f"{benchmark}.jsonl")
    assert sorted(path.name for path in directory.iterdir()) == [f"{benchmark}.jsonl"]
    for record in found:
        validate(record)
        assert record["benchmark"] == benchmark and record["source"] == "measured"
        assert record["machine"]["cores"] >= 1 and record["versions"]["python"]
    assert len({record["run"] for record in found}) == 1  # one invocation, one table
    return found


def measured(value) -> bool:
    """A figure that was measured: a finite number (no claim about its size)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


# ----------------------------------------------------------------------------- fast: package, records, page


def test_bench_is_a_package_without_path_hacks_or_imports_from_tests():
    sources = {path.name: path.read_text() for path in (ROOT / "bench").glob("*.py")}
    assert "__init__.py" in sources
    for name, text in sources.items():
        assert "sys.path" not in text, name
        assert not re.search(r"^\s*(from|import) tests\b", text, flags=re.M), name
        assert not re.search(r"^\s*from (train_step|input_pipeline|torch_reference) import", text, flags=re.M), name
    for name in BENCHMARKS:  # each is runnable as a module, records, and is listed in the package's docstring
        assert 'if __name__ == "__main__":' in sources[f"{name}.py"], name
        assert "add_record_arguments" in sources[f"{name}.py"] and f"``{name}``" in sources["__init__.py"], name
    names = [path.name for path in ROOT.rglob("*.py") if ".git" not in path.parts]
    assert names.count("torch_reference.py") == 1  # tests/ keeps its reference; bench/ has torch_baseline.py
    script = (ROOT / "bench" / "gpu_tables.sh").read_text()
    assert "python3 -m bench." in script and "bench/" + "train_step.py" not in script


def test_every_stored_record_follows_the_schema():
    stored = load_all()
    assert {"train_step", "cost_growth", "cpu_settings", "head_change"} <= set(stored)
    for stem, found in stored.items():
        assert found, stem
        for record in found:
            validate(record)
            assert record["benchmark"] == stem
            assert (
                record["source"] == "measured" or "transcribed" in record["source"] or "converted" in record["source"]
            )


def test_the_committed_page_is_what_the_records_give(tmp_path):
    """docs/benchmarks.md is generated output: `python -m bench.report` must reproduce it exactly."""
    page = tmp_path / "benchmarks.md"
    done = run_module("report", "--output", str(page), timeout=120)
    assert "records" in done.stdout
    assert page.read_text() == (ROOT / "docs" / "benchmarks.md").read_text(), "run: python -m bench.report"
    run_module("report", "--check", timeout=120)


def test_recorder_writes_one_record_per_configuration_and_the_report_tabulates_them(tmp_path):
    recorder = Recorder("demo", tmp_path)
    for batch in (4, 8):
        recorder.record({"backbone": "resnet_tiny", "batch": batch}, {"median_ms": 1.5 * batch}, backend="jax")
    Recorder("demo", None).record({"batch": 1}, {"median_ms": 1.0})  # --no-record: nothing written
    found = records_of(tmp_path, "demo")
    assert [record["config"]["batch"] for record in found] == [4, 8]
    assert found[0]["machine"] == results.machine() and found[0]["timestamp"].endswith("Z")
    from bench.report import render

    page = render(load_all(tmp_path))
    assert "## demo" in page and "- Settings: backbone resnet_tiny" in page and "- Backend: jax" in page
    assert "| batch | median ms |" in page and "| 8 | 12 |" in page
    with pytest.raises(ValueError):
        validate({**found[0], "figures": {}})


def test_record_options_parse(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    results.add_record_arguments(parser)
    args = parser.parse_args(["--results-dir", str(tmp_path)])
    assert Recorder.from_args("x", args).path == tmp_path / "x.jsonl"
    assert Recorder.from_args("x", parser.parse_args(["--no-record"])).path is None
    assert parser.parse_args([]).results_dir == ROOT / "bench" / "results"


# ----------------------------------------------------------------------------- slow: smoke runs


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHMARKS + ("report",))
def test_every_benchmark_answers_help(name):
    done = run_module(name, "--help", timeout=300)
    assert "usage:" in done.stdout
    if name != "report":
        assert "--results-dir" in done.stdout and "--no-record" in done.stdout


@pytest.mark.slow
def test_train_step_benchmark_against_the_torch_baseline(tmp_path):
    require_optional("torch")
    out, store = tmp_path / "rows.jsonl", tmp_path / "results"
    backend = keras.backend.backend()
    done = run_module("train_step", "--suite", "smoke", "--backends", backend, "--out", str(out),
                      "--results-dir", str(store))  # fmt: skip
    reference, ours = (json.loads(line) for line in out.read_text().splitlines())
    assert reference["implementation"] == "torch reference" and ours["implementation"] == f"keras-carp ({backend})"
    found = records_of(store, "train_step")
    assert [record["config"]["implementation"] for record in found] == ["torch reference", f"keras-carp ({backend})"]
    assert [record["backend"] for record in found] == ["torch", backend]
    for record in found:
        assert record["config"]["steps"] == 3 and record["config"]["suite"] == "smoke"
        figures = record["figures"]
        assert all(measured(figures[key]) for key in ("median_ms", "p10_ms", "p90_ms", "images_per_s", "mfu"))
        assert figures["images_per_s"] == pytest.approx(record["config"]["batch"] / (figures["median_ms"] / 1e3))
    assert found[1]["figures"]["vs_reference"] == pytest.approx(ours["images_per_s"] / reference["images_per_s"])
    assert "keras-carp" in done.stdout and "x ref" in done.stdout  # the side-by-side table


@pytest.mark.slow
def test_torch_baseline_alone_records_its_run(tmp_path):
    require_optional("torch")
    done = run_module("torch_baseline", *TINY, "--results-dir", str(tmp_path))
    (record,) = records_of(tmp_path, "torch_baseline")
    assert record["backend"] == "torch" and record["config"]["backbone"] == "resnet_tiny"
    assert measured(record["figures"]["median_ms"]) and measured(record["figures"]["step_tflop"])
    assert "ms/step" in done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["session", "torch"])
def test_cost_growth_benchmark_records_the_loss_share(backend, tmp_path):
    """On the session's backend (XLA on JAX / TensorFlow) and on PyTorch, Keras' fastest backend on a CPU."""
    if backend == "torch":
        require_optional("torch")
    else:
        backend = keras.backend.backend()
        if backend == "torch":
            pytest.skip("the torch case runs it")
    done = run_module("cost_growth", "--suite", "smoke", "--results-dir", str(tmp_path), env={"KERAS_BACKEND": backend})
    assert f"backend {backend}," in done.stdout
    found = records_of(tmp_path, "cost_growth")
    assert [(record["config"]["variable"], record["config"]["k"]) for record in found] == [("k", 64), ("k", 128)]
    for record in found:
        figures = record["figures"]
        assert record["backend"] == backend and all(measured(value) for value in figures.values())
        assert figures["share_percent"] == pytest.approx(100 * figures["partition_loss_ms"] / figures["step_ms"])


@pytest.mark.slow
def test_loss_formulations_agree_and_are_recorded(tmp_path):
    if keras.backend.backend() not in ("jax", "tensorflow"):
        pytest.skip("bench.loss_formulations runs on the jax or tensorflow backend")
    run_module("loss_formulations", "--batch", "4", "--crops", "4", "--k", "64", "--block-size", "16", "--steps", "3",
               "--results-dir", str(tmp_path))  # fmt: skip
    library, fused = records_of(tmp_path, "loss_formulations")
    assert (library["config"]["formulation"], fused["config"]["formulation"]) == ("per crop (library)", "fused (tried)")
    assert library["figures"]["loss"] == pytest.approx(fused["figures"]["loss"], rel=1e-5)  # the same loss
    assert fused["figures"]["max_gradient_difference"] < 1e-5
    assert measured(library["figures"]["median_ms"]) and measured(fused["figures"]["median_ms"])


@pytest.mark.slow
def test_logits_formulation_records_both_formulations(tmp_path):
    run_module("logits_formulation", "--k", "64", "--block-size", "16", "--batch", "4", "--dim", "8", "--repeats", "2",
               "--results-dir", str(tmp_path))  # fmt: skip
    gather, permute = records_of(tmp_path, "logits_formulation")
    assert (gather["config"]["formulation"], permute["config"]["formulation"]) == ("gather", "permute")
    assert gather["figures"]["loss"] == pytest.approx(permute["figures"]["loss"], rel=1e-5)  # the same logits


@pytest.mark.slow
def test_teacher_ema_benchmark_records_both_models(tmp_path):
    done = run_module("teacher_ema", "--batch", "4", "--size", "16", "--k", "64", "--block-size", "16",
                      "--hidden", "32", "--steps", "2", "--warmup", "1", "--rounds", "1",
                      "--results-dir", str(tmp_path))  # fmt: skip
    (record,) = records_of(tmp_path, "teacher_ema")
    assert record["figures"]["ema_pairs"] > 0
    assert all(measured(value) for value in record["figures"].values())
    assert "EMA overhead per step" in done.stdout


@pytest.mark.slow
def test_cpu_settings_records_each_setting(tmp_path):
    run_module("cpu_settings", *TINY, "--settings", "tensorflow:false", "--results-dir", str(tmp_path))
    (record,) = records_of(tmp_path, "cpu_settings")
    assert record["backend"] == "tensorflow" and record["config"]["jit_compile"] == "false"
    assert measured(record["figures"]["median_ms"]) and measured(record["figures"]["first_loss"])


@pytest.mark.slow
def test_fit_pipeline_benchmark_reports_fit_input_and_step_for_host_and_device_views(tmp_path):
    jpegs, store = tmp_path / "jpegs", tmp_path / "results"
    done = run_module("fit_pipeline", *TINY, "--num-images", "12", "--jpeg-dir", str(jpegs), "--json",
                      "--results-dir", str(store))  # fmt: skip
    assert len(list(jpegs.glob("*.jpg"))) == 12
    results = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    records = {record["config"]["augment"]: record for record in records_of(store, "fit_pipeline")}
    assert set(records) == set(results) == {"host", "device"}
    assert len({record["run"] for record in records.values()}) == 1  # one table
    for augment, figures in results.items():
        assert records[augment]["figures"] == pytest.approx(figures)
        fit, source, step = (figures[f"{name}_images_per_s"] for name in ("fit", "pipeline", "step"))
        assert measured(fit) and measured(source) and measured(step) and measured(figures["plain_step_images_per_s"])
        assert figures["fit_over_plain_step"] == pytest.approx(fit / figures["plain_step_images_per_s"])
        assert f"fit / plain step {figures['fit_over_plain_step']:.2f}" in done.stdout
    assert records["device"]["config"]["device_image_size"] == round(16 * 10 / 7)

    # Without TensorFlow's loader: Pillow in threads, device views only.
    done = run_module("fit_pipeline", *TINY, "--num-images", "12", "--jpeg-dir", str(jpegs), "--augment", "device",
                      "--loader", "pillow", "--workers", "2", "--no-record")  # fmt: skip
    assert "input by pillow in 2 threads" in done.stdout


@pytest.mark.slow
def test_device_views_benchmark_records_images_per_second(tmp_path):
    run_module("device_views", "--global-size", "16", "--local-size", "8", "--local-crops", "2", "--image-size", "24",
               "--batch", "4", "--steps", "2", "--warmup", "1", "--results-dir", str(tmp_path))  # fmt: skip
    (record,) = records_of(tmp_path, "device_views")
    assert record["config"]["image_size"] == 24 and measured(record["figures"]["images_per_s"])


@pytest.mark.slow
def test_input_pipeline_records_each_setting(tmp_path):
    store = tmp_path / "results"
    run_module("input_pipeline", "--num-images", "8", "--batch-size", "2", "--batches", "2", "--rounds", "1",
               "--jpeg-dir", str(tmp_path / "jpegs"), "--fashion-dir", str(tmp_path / "no-fashion"),
               "--results-dir", str(store))  # fmt: skip
    found = records_of(store, "input_pipeline")
    assert len(found) == 5 and {record["config"]["recipe"] for record in found} == {"2x224+6x96"}
    assert all(measured(record["figures"]["images_per_s"]) for record in found)


@pytest.mark.slow
def test_export_and_convert_records_the_interoperability_paths(tmp_path):
    require_optional("torch")
    run_module("export_and_convert", "--k", "512", "--hidden", "64", "--bottleneck", "32", "--batch", "2",
               "--rounds", "1", "--results-dir", str(tmp_path))  # fmt: skip
    (record,) = records_of(tmp_path, "export_and_convert")
    assert record["config"]["k"] == 512
    assert record["figures"]["max_abs_difference_vs_pytorch"] < 1e-2  # the SavedModel computes PyTorch's features
    assert all(measured(value) for value in record["figures"].values())


def test_profile_summary_groups_gpu_kernels_by_what_they_compute(capsys):
    require_optional("jax")
    from jax.profiler import ProfileData

    from bench import profile_step

    profile = ProfileData.from_text_proto(GPU_TRACE)
    rows, busy, span = profile_step.kernel_rows(profile, profile_step.op_names_from_hlo(HLO))
    assert busy == pytest.approx(8.0) and span == pytest.approx(10.0)  # every stream line, host events left out
    assert rows[0][0][:2] == ("input_reduce_fusion", "fusion.7") and rows[0][1] == [6.0, 2]
    figures = profile_step.summarize_profile(profile, HLO, steps=2, top=5)
    assert figures["categories"] == pytest.approx({"batch norm": 3.0, "convolution": 0.5, "other elementwise": 0.5})
    assert figures["busy_ms"] == pytest.approx(4.0) and figures["backward_ms"] == pytest.approx(0.5)
    assert "conv2_block1_2_conv/conv_general_dilated" in capsys.readouterr().out


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


@pytest.mark.slow
def test_profile_step_times_the_library_step_against_keras_batch_norm_statistics(tmp_path):
    require_optional("jax")
    out, store = tmp_path / "profile.jsonl", tmp_path / "results"
    done = run_module("profile_step", *TINY, "--precision", "float32", "--breakdown", "--variants",
                      "library,keras_moments", "--profile", "library", "--out", str(out), "--results-dir", str(store),
                      env={"KERAS_BACKEND": "jax"})  # fmt: skip
    library, keras_moments = (json.loads(line) for line in out.read_text().splitlines())
    assert (library["variant"], keras_moments["variant"]) == ("library", "keras_moments")
    assert library["loss"] == pytest.approx(keras_moments["loss"], rel=1e-5)  # same step, other BN statistics
    found = records_of(store, "profile_step")
    assert [record["config"]["variant"] for record in found] == ["library", "keras_moments"]
    for record in found:  # both parts were timed (and recorded), whatever their values
        figures = record["figures"]
        assert all(measured(figures[key]) for key in ("median_ms", "pipelined_ms", "forward_ms", "forward+backward_ms"))
    assert "x first" in done.stdout
    # The library step was traced with jax.profiler and the trace read back: its GPU kernels, or on a CPU a note.
    assert "profile" in library and "profile" not in keras_moments and "gpu_busy_ms" in found[0]["figures"]
    assert ("GPU kernel time per step" in done.stdout) == (library["profile"]["busy_ms"] > 0)
    assert "GPU kernel time per step" in done.stdout or "No GPU kernels in the trace" in done.stdout
