"""Time the whole CARP training step of keras-carp, side by side with the PyTorch baseline (bench.torch_baseline).

The step is what ``fit`` runs: student on all crops, teacher on the 2 global
crops, partition, loss, LARS update and teacher EMA, compiled (XLA on
TensorFlow and JAX). Batches are synthetic and already on the device, so the
input pipeline is out of the picture (bench.input_pipeline measures it).
Each run reports the median and 10th/90th percentiles of the step time over
``--steps`` steps after compilation and warm-up, images/s, compile time, peak
memory (device, or host RSS on a CPU) and MFU: the step's FLOPs (counted by
PyTorch's FlopCounterMode on the reference step, the same network) over the
step time and the device's peak for the precision in use.

One command runs every backend and the reference in fresh processes and prints
the table with the ratio keras-carp / reference:

    python -m bench.train_step --suite cpu      # ResNet-18 at 2x64 + 4x32, K = 4096 (no GPU needed)
    python -m bench.train_step --suite gpu      # ResNet-50, 2x224 (+ 6x96), K = 65536, batch 64/128/256
    python -m bench.train_step --suite smoke    # seconds: the test suite runs this
    python -m bench.train_step --worker keras --backbone resnet18 ...   # one configuration, one JSON line

Narrow and order the grid with --local-crops-list, --batches, --precisions and
--implementations (e.g. reference,jax,reference+compile); --deadline stops
starting runs after a time budget (bench/gpu_tables.sh uses both). Every row
is recorded in bench/results/train_step.jsonl (bench.results) and appended to
--out as it comes; the side-by-side table is printed at the end. A --worker
prints its JSON line and records nothing: the suite that started it records.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.results import Recorder, add_record_arguments

HERE = Path(__file__).resolve().parent
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as keras_carp sets it, before the workers import TensorFlow
SUITES = {
    # name: (shared settings, grid of (global_size, local_size, local_crops) x batches x precisions)
    "smoke": (dict(backbone="resnet_tiny", k=64, block_size=16, hidden=32, bottleneck=16, steps=3, warmup=1),
              [(16, 8, 2)], [4], ["float32"]),
    "cpu": (dict(backbone="resnet18", k=4096, block_size=512, hidden=2048, bottleneck=256, steps=50, warmup=5),
            [(64, 32, 0), (64, 32, 4)], [32], ["float32"]),
    "gpu": (dict(backbone="resnet50", k=65536, block_size=512, hidden=2048, bottleneck=256, steps=50, warmup=10),
            [(224, 96, 0), (224, 96, 6)], [64, 128, 256], ["float32", "bfloat16", "float16"]),
}  # fmt: skip
KERAS_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


# ----------------------------------------------------------------------------- one configuration, in this process

CONFIG_ARGUMENTS = (("backbone", str), ("global-size", int), ("local-size", int), ("local-crops", int), ("k", int),
                    ("block-size", int), ("hidden", int), ("bottleneck", int), ("batch", int), ("precision", str),
                    ("steps", int), ("warmup", int))  # fmt: skip


def add_config_arguments(parser: argparse.ArgumentParser, **defaults) -> None:
    """The flags of one configuration (what ``build_model`` and the timed crops read), with a benchmark's defaults."""
    for name, kind in CONFIG_ARGUMENTS:
        choices = sorted(KERAS_POLICIES) if name == "precision" else None
        parser.add_argument(f"--{name}", type=kind, default=defaults.get(name.replace("-", "_")), choices=choices)


def time_steps(step, warmup: int, steps: int) -> tuple[list[float], float]:
    """Seconds of each of ``steps`` calls of ``step()`` after ``warmup`` untimed ones, and the last loss.

    Each call waits for its loss on the host, so a time covers the whole step.
    """
    import keras

    wait = lambda logs: float(keras.ops.convert_to_numpy(logs["loss"]))  # noqa: E731
    for _ in range(warmup):
        wait(step())
    times, loss = [], float("nan")
    for _ in range(steps):
        started = time.perf_counter()
        loss = wait(step())
        times.append(time.perf_counter() - started)
    return times, loss


def keras_step_runner(model, data):
    """The compiled train function ``fit`` uses, called on one device-resident batch; returns step() -> logs."""
    import keras

    from keras_carp import keras_internals

    model.make_train_function()
    backend = keras.backend.backend()
    if backend == "jax":
        state = [keras_internals.jax_state(model)]

        def step():  # as JAX fit does: the state is threaded through, donated, never synced back per step
            logs, state[0] = model.train_function(state[0], iter([data]))
            return logs

        return step
    if backend == "tensorflow":
        return lambda: model.train_function(iter([data]))
    return lambda: model.train_function([data])


def build_model(args, augmentation=None):
    """The compiled CARP model of one configuration (dtype policy, seed, LARS with the linear-scaled rate).

    ``augmentation``: a ``DeviceMultiCrop`` to make the views in the step.
    """
    import keras

    import keras_carp

    keras.config.set_dtype_policy(KERAS_POLICIES[args.precision])
    keras.utils.set_random_seed(0)
    model = keras_carp.CARP(
        keras_carp.build_encoder(args.backbone),
        keras_carp.CARPHead(num_prototypes=args.k, hidden_dim=args.hidden, bottleneck_dim=args.bottleneck),
        block_size=args.block_size,
        batch_norm_moments=getattr(args, "batch_norm_moments", None) or "one_pass",
        teacher_momentum_schedule=keras_carp.TeacherMomentumSchedule(0.99, 1.0, total_steps=10**6),
        augmentation=augmentation,
    )
    optimizer = keras_carp.LARS(0.45 * args.batch / 256)
    if args.precision == "float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    jit_compile = {"auto": "auto", "true": True, "false": False}[getattr(args, "jit_compile", None) or "auto"]
    model.compile(optimizer=optimizer, jit_compile=jit_compile)
    return model


def run_keras(args) -> dict:
    import keras

    model = build_model(args)
    rng = __import__("numpy").random.default_rng(0)
    sizes = [args.global_size] * 2 + [args.local_size] * args.local_crops
    crops = tuple(keras.ops.convert_to_tensor(rng.normal(size=(args.batch, s, s, 3)).astype("float32")) for s in sizes)

    started = time.perf_counter()
    first_loss = float(model.train_on_batch(crops, return_dict=True)["loss"])  # builds, traces, compiles the step
    first = time.perf_counter() - started
    times, loss = time_steps(keras_step_runner(model, (crops,)), args.warmup, args.steps)
    if loss != loss:
        raise RuntimeError("the keras-carp step produced a NaN loss")
    median = statistics.median(times)
    deciles = statistics.quantiles(times, n=10, method="inclusive")  # p10 ... p90, within the samples
    memory, kind = keras_peak_memory()
    return {
        "implementation": f"keras-carp ({keras.backend.backend()})", "backend": keras.backend.backend(),
        "median_ms": 1e3 * median, "p10_ms": 1e3 * deciles[0], "p90_ms": 1e3 * deciles[-1],
        "images_per_s": args.batch / median, "compile_s": max(first - median, 0.0), "first_loss": first_loss,
        "jit_compile": str(model.jit_compile),
        "peak_memory_gib": memory, "memory_kind": kind, "versions": versions(),
    }  # fmt: skip


def keras_peak_memory() -> tuple[float, str]:
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax

            stats = jax.devices()[0].memory_stats()
            if stats and "peak_bytes_in_use" in stats:
                return stats["peak_bytes_in_use"] / 2**30, "device"
        elif backend == "tensorflow":
            import tensorflow as tf

            if tf.config.list_physical_devices("GPU"):
                return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**30, "device"
        elif backend == "torch":
            import torch

            if torch.cuda.is_available():
                return torch.cuda.max_memory_allocated() / 2**30, "device"
    except (RuntimeError, ValueError):
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "host RSS"


def versions() -> dict:
    import keras

    out = {"keras": keras.__version__}
    backend = keras.backend.backend()
    module = {"jax": "jax", "tensorflow": "tensorflow", "torch": "torch"}[backend]
    out[module] = __import__(module).__version__
    return out


# ----------------------------------------------------------------------------- the suite, in fresh processes


CONFIG_KEYS = ("backbone", "global_size", "local_size", "local_crops", "k", "block_size", "batch", "precision")


def configurations(args):
    """The suite's grid, optionally narrowed (and ordered) by --local-crops-list, --batches and --precisions."""
    shared, views, batches, precisions = SUITES[args.suite]
    if args.local_crops_list:
        wanted = [int(n) for n in args.local_crops_list.split(",")]
        views = [v for n in wanted for v in views if v[2] == n]
    batches = [int(b) for b in args.batches.split(",")] if args.batches else batches
    precisions = args.precisions.split(",") if args.precisions else precisions
    for (global_size, local_size, local_crops), batch, precision in itertools.product(views, batches, precisions):
        yield dict(shared, global_size=global_size, local_size=local_size, local_crops=local_crops, batch=batch,
                   precision=precision)  # fmt: skip


def config_label(config: dict) -> str:
    views = f"2x{config['global_size']}" + (f"+{config['local_crops']}x{config['local_size']}"
                                            if config["local_crops"] else "")  # fmt: skip
    return f"{views} batch {config['batch']} {config['precision']}"


def flags(config: dict) -> list[str]:
    return [f"--{key.replace('_', '-')}={value}" for key, value in config.items()]


def run_process(command: list[str], env: dict, timeout: float) -> dict | None:
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(lines[-1])


def implementations(args) -> list[str]:
    """The runs of one configuration, in order: "reference", "reference+compile" and Keras backend names."""
    backends = [b for b in args.backends.split(",") if b]
    if args.implementations == "auto":
        names = ["reference", "reference+compile", *backends]
    else:
        names = [n for n in args.implementations.split(",") if n.startswith("reference") or n in backends]
    if args.no_compile_reference or args.suite == "smoke":
        names = [name for name in names if name != "reference+compile"]
    return names


def with_ratios(results: list[dict]) -> list[dict]:
    """Add MFU (for keras-carp, with the reference's FLOP count) and x ref (vs the fastest reference) to each row."""
    out = []
    for result in results:
        result = dict(result)
        same = [r for r in results if r["implementation"].startswith("torch reference") and "error" not in r
                and all(r[key] == result[key] for key in CONFIG_KEYS)]  # fmt: skip
        if same and "error" not in result:
            reference = min(same, key=lambda r: r["median_ms"])
            if not result["implementation"].startswith("torch reference"):
                result["step_tflop"] = reference["step_tflop"]
                result["peak_tflops"], result["peak_source"] = reference["peak_tflops"], reference["peak_source"]
                flop_per_s = result["step_tflop"] * 1e12 / (result["median_ms"] / 1e3)
                result["mfu"] = flop_per_s / (result["peak_tflops"] * 1e12)
            result["vs_reference"] = result["images_per_s"] / reference["images_per_s"]
            result["reference"] = reference["implementation"]
        out.append(result)
    return out


FIGURES = ("median_ms", "p10_ms", "p90_ms", "images_per_s", "compile_s", "peak_memory_gib", "memory_kind", "mfu",
           "step_tflop", "peak_tflops", "peak_source", "vs_reference", "reference", "first_loss", "jit_compile",
           "device", "error")  # fmt: skip


def record_row(recorder: Recorder, row: dict, args) -> dict:
    """One suite row as a bench.results record: the configuration and implementation, then its figures."""
    config = {key: row[key] for key in (*CONFIG_KEYS, "hidden", "bottleneck", "steps", "warmup") if key in row}
    config.update(implementation=row["implementation"], suite=args.suite)
    if not row["implementation"].startswith("torch reference"):
        config["batch_norm_moments"] = args.batch_norm_moments
    figures = {key: row[key] for key in FIGURES if key in row}
    backend = row.get("backend") or ("torch" if row["implementation"].startswith("torch") else None)
    return recorder.record(config, figures, backend=backend)


def run_suite(args) -> list[dict]:
    started, results = time.monotonic(), []
    recorder = Recorder.from_args("train_step", args)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=os.pathsep.join(
        [str(HERE.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))  # fmt: skip
    for config in configurations(args):
        for name in implementations(args):
            left = args.deadline - (time.monotonic() - started) if args.deadline else args.timeout
            if left < 30:
                print(f"skipped {name} {config_label(config)}: the --deadline has passed", flush=True)
                continue
            if name.startswith("reference"):
                command = [sys.executable, "-m", "bench.torch_baseline", *flags(config), "--json"]
                command += ["--compile"] if name == "reference+compile" else []
                label, run_env = "torch reference" + (" + compile" if name == "reference+compile" else ""), env
            else:
                command = [sys.executable, "-m", "bench.train_step", "--worker", "keras", *flags(config),
                           f"--batch-norm-moments={args.batch_norm_moments}"]  # fmt: skip
                label, run_env = f"keras-carp ({name})", dict(env, KERAS_BACKEND=name)
                label += "" if args.batch_norm_moments == "one_pass" else f" {args.batch_norm_moments} BN"
            result = run_process(command, run_env, min(args.timeout, left))
            result = {**config, **result, "implementation": label}
            results.append(result)
            print_row(with_ratios(results)[-1])
            record_row(recorder, with_ratios(results)[-1], args)
            if args.out:
                with open(args.out, "a") as handle:
                    handle.write(json.dumps(with_ratios(results)[-1]) + "\n")
    return with_ratios(results)


HEADER = (f"{'implementation':<28} {'views':<11} {'batch':>5} {'precision':<9} {'median ms':>9} {'p10-p90 ms':>15} "
          f"{'images/s':>9} {'compile s':>9} {'memory GiB':>14} {'MFU %':>6} {'x ref':>6}")  # fmt: skip


def print_row(result: dict) -> None:
    views = f"2x{result['global_size']}" + (f"+{result['local_crops']}x{result['local_size']}"
                                            if result["local_crops"] else "")  # fmt: skip
    if "error" in result:
        print(f"{result['implementation']:<28} {views:<11} {result['batch']:>5} {result['precision']:<9} "
              f"error: {result['error']}", flush=True)  # fmt: skip
        return
    spread = f"{result['p10_ms']:.1f}-{result['p90_ms']:.1f}"
    memory = f"{result['peak_memory_gib']:.2f} {'dev' if result['memory_kind'] == 'device' else 'RSS'}"
    mfu = f"{100 * result['mfu']:.1f}" if "mfu" in result else "-"
    ratio = f"{result['vs_reference']:.2f}" if "vs_reference" in result else "-"
    print(f"{result['implementation']:<28} {views:<11} {result['batch']:>5} {result['precision']:<9} "
          f"{result['median_ms']:>9.1f} {spread:>15} {result['images_per_s']:>9.1f} {result['compile_s']:>9.1f} "
          f"{memory:>14} {mfu:>6} {ratio:>6}", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=sorted(SUITES), default="cpu")
    p.add_argument("--backends", default="jax,tensorflow,torch", help="Keras backends, comma-separated")
    p.add_argument("--implementations", default="auto",
                   help="runs per configuration, in order, e.g. reference,jax,reference+compile (auto: the "
                        "reference, the compiled reference, then --backends)")  # fmt: skip
    p.add_argument("--no-compile-reference", action="store_true", help="skip the torch.compile reference")
    p.add_argument("--local-crops-list", default=None, help="only these numbers of local crops, in this order")
    p.add_argument("--batches", default=None, help="per-device batches, comma-separated (default: the suite's)")
    p.add_argument("--precisions", default=None, help="float32,bfloat16,float16 (default: the suite's)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per configuration and implementation")
    p.add_argument("--deadline", type=float, default=None, help="start no run after this many seconds")
    p.add_argument("--out", default=None, help="append every result as a JSON line here, as it comes")
    p.add_argument(
        "--batch-norm-moments",
        choices=("one_pass", "keras"),
        default="one_pass",
        help="CARP(batch_norm_moments=): keras-carp's one-pass BN statistics or Keras' two-pass ones",
    )
    p.add_argument("--worker", choices=("keras",), default=None, help="time one configuration in this process")
    p.add_argument("--jit-compile", choices=("auto", "true", "false"), default="auto",
                   help="--worker: CARP.compile(jit_compile=...), XLA or not")  # fmt: skip
    add_config_arguments(p)  # one configuration, for --worker (the suites set them otherwise)
    add_record_arguments(p)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(run_keras(args)))
        return
    if args.steps:
        SUITES[args.suite][0]["steps"] = args.steps
    if args.warmup is not None:
        SUITES[args.suite][0]["warmup"] = args.warmup
    print(f"suite {args.suite}: {SUITES[args.suite][0]}")
    print(HEADER, flush=True)
    results = run_suite(args)
    print("\nside by side (x ref: images/s over the fastest reference of the same configuration):")
    print(HEADER)
    for result in results:
        print_row(result)
    failed = [r for r in results if "error" in r]
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed")


if __name__ == "__main__":
    main()
