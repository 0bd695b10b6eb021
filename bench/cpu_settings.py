"""A/B of the CARP step's compile settings on this machine: XLA or not, per Keras backend.

Each setting runs bench.train_step's worker in a fresh process on the same
configuration (by default the Fashion-MNIST preset's: ResNet-18, 2 x 32 px
views, K 1024, N_B 128, batch 256, float32) and reports the median step time,
images/s and the first step's loss (the settings of one backend must agree on
it: the same step from the same weights, compiled differently). ``CARP.compile(jit_compile="auto")`` uses the
result: on a CPU, TensorFlow runs the step without XLA (oneDNN kernels).

    python -m bench.cpu_settings                                # the preset's configuration
    python -m bench.cpu_settings --backbone resnet_tiny --batch 128

Each setting is recorded in bench/results/cpu_settings.jsonl (bench.results); --out also appends the raw rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bench.results import Recorder, add_record_arguments
from bench.train_step import CONFIG_ARGUMENTS, HERE, add_config_arguments, run_process

# (Keras backend, CARP.compile jit_compile): every way the step can run on a CPU.
SETTINGS = (("tensorflow", "true"), ("tensorflow", "false"), ("jax", "true"), ("torch", "false"))


def main(argv: list[str] | None = None) -> None:
    """Run every backend:jit_compile setting in a fresh process; print, record, and check the first losses agree."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(p, backbone="resnet18", global_size=32, local_size=16, local_crops=0, k=1024, block_size=128,
                         hidden=512, bottleneck=128, batch=256, precision="float32", steps=15, warmup=3)  # fmt: skip
    p.add_argument("--settings", default=",".join(f"{b}:{j}" for b, j in SETTINGS),
                   help="backend:jit_compile pairs, comma-separated")  # fmt: skip
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--out", default=None, help="also append every raw result as a JSON line here")
    add_record_arguments(p)
    args = p.parse_args(argv)
    recorder = Recorder.from_args("cpu_settings", args)
    config_keys = [name.replace("-", "_") for name, _ in CONFIG_ARGUMENTS]
    config = [f"--{name}={getattr(args, name.replace('-', '_'))}" for name, _ in CONFIG_ARGUMENTS]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(HERE.parent))
    print(f"{'backend':<11} {'XLA':<5} {'median ms':>9} {'p10-p90 ms':>15} {'images/s':>9} {'compile s':>9} "
          f"{'first loss':>10}", flush=True)  # fmt: skip
    results = []
    for setting in args.settings.split(","):
        backend, jit = setting.split(":")
        command = [sys.executable, "-m", "bench.train_step", "--worker", "keras", f"--jit-compile={jit}", *config]
        run = run_process(command, dict(env, KERAS_BACKEND=backend), args.timeout)
        result = {"backend": backend, "jit_compile": jit, **{key: getattr(args, key) for key in config_keys}, **run}
        figures = {key: value for key, value in run.items() if key not in ("backend", "jit_compile", "versions")}
        recorder.record({"jit_compile": jit, **{key: getattr(args, key) for key in config_keys}}, figures, backend)
        results.append(result)
        if "error" in result:
            print(f"{backend:<11} {jit:<5} error: {result['error']}", flush=True)
            continue
        spread = f"{result['p10_ms']:.1f}-{result['p90_ms']:.1f}"
        print(f"{backend:<11} {jit:<5} {result['median_ms']:>9.1f} {spread:>15} {result['images_per_s']:>9.1f} "
              f"{result['compile_s']:>9.1f} {result['first_loss']:>10.5f}", flush=True)  # fmt: skip
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as handle:
                handle.write(json.dumps(result) + "\n")
    done = [r for r in results if "error" not in r]
    for backend in dict.fromkeys(r["backend"] for r in done):
        runs = [r for r in done if r["backend"] == backend]
        best = min(runs, key=lambda r: r["median_ms"])
        print(f"fastest on {backend}: jit_compile={best['jit_compile']} ({best['median_ms']:.1f} ms)")
        losses = [r["first_loss"] for r in runs]  # same backend, same initial weights: the same first step
        if max(losses) - min(losses) > 1e-4 * abs(losses[0]):
            raise SystemExit(f"the {backend} settings disagree on the first step's loss: {losses}")


if __name__ == "__main__":
    main()
