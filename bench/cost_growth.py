"""How the CARP step's cost grows with K, N_B, the number of local crops and the batch, and the loss's share of it.

For each configuration: the median time of the whole compiled train step
(as bench.train_step measures it, on device-resident synthetic batches) and
of the partition + loss alone: the step's permutation, the float32 block
softmax and the consistency + entropy loss, forward
and backward (w.r.t. the student logits), compiled the same way (XLA on JAX and
TensorFlow; eager autograd on PyTorch, as Keras' PyTorch backend runs the step).
The share is their ratio. Runs on the active Keras backend.

    KERAS_BACKEND=jax python -m bench.cost_growth --suite gpu
    KERAS_BACKEND=torch python -m bench.cost_growth --suite cpu   # the fastest Keras backend on a CPU

Each point is recorded in bench/results/cost_growth.jsonl (bench.results).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from bench.results import Recorder, add_record_arguments  # noqa: E402
from bench.train_step import run_keras  # noqa: E402

BASES = {
    "cpu": dict(backbone="resnet18", global_size=64, local_size=32, local_crops=4, k=4096, block_size=512, batch=32,
                hidden=2048, bottleneck=256, precision="float32", steps=20, warmup=3),
    "gpu": dict(backbone="resnet50", global_size=224, local_size=96, local_crops=6, k=65536, block_size=512, batch=128,
                hidden=2048, bottleneck=256, precision="bfloat16", steps=50, warmup=10),
    "smoke": dict(backbone="resnet_tiny", global_size=16, local_size=8, local_crops=2, k=64, block_size=16, batch=4,
                  hidden=32, bottleneck=16, precision="float32", steps=3, warmup=1),
}  # fmt: skip
SWEEPS = {
    "cpu": dict(k=[4096, 16384, 65536, 262144], block_size=[128, 512, 2048, 4096], local_crops=[0, 2, 6, 10],
                batch=[16, 32, 64]),
    "gpu": dict(k=[4096, 16384, 65536, 262144], block_size=[128, 512, 2048, 8192], local_crops=[0, 2, 6, 10],
                batch=[64, 128, 256]),
    "smoke": dict(k=[64, 128]),
}  # fmt: skip


def loss_only_seconds(config: dict) -> float:
    """Median time of the step's partition + loss: the permutation, the float32 block softmax and the
    consistency + entropy loss, forward and backward w.r.t. the student logits, compiled. The head permutes
    its K prototype rows, not the logits, so no [N, K] gather is timed here (it was before: see README)."""
    from keras_carp.losses import block_softmax, carp_loss_from_probs
    from keras_carp.partition import random_permutation

    crops, batch, k, block = 2 + config["local_crops"], config["batch"], config["k"], config["block_size"]
    dtype = "bfloat16" if config["precision"] != "float32" else "float32"
    rng = np.random.default_rng(0)
    student = keras.ops.convert_to_tensor(rng.normal(size=(crops * batch, k)).astype("float32"), dtype=dtype)
    teacher = keras.ops.convert_to_tensor(rng.normal(size=(2 * batch, k)).astype("float32"), dtype=dtype)

    def loss(student_logits, teacher_logits, step):  # what CARP.compute_carp_losses does after the head
        permutation = random_permutation(k, 0, step)  # an output, so that it is computed
        probs = [block_softmax(x, block) for x in keras.ops.split(student_logits, crops, axis=0)]
        targets = [block_softmax(x, block) for x in keras.ops.split(teacher_logits, 2, axis=0)]
        return carp_loss_from_probs(probs, targets)["loss"], permutation

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        compiled = jax.jit(jax.value_and_grad(loss, has_aux=True))

        def run(step):
            return jax.block_until_ready(compiled(student, teacher, step))
    elif backend == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def compiled(step):
            with tf.GradientTape() as tape:
                tape.watch(student)
                value, permutation = loss(student, teacher, step)
            return value, permutation, tape.gradient(value, student)

        def run(step):
            return [x.numpy() for x in compiled(step)]
    elif backend == "torch":
        import torch

        leaf = student.detach().requires_grad_(True)

        def run(step):
            value, permutation = loss(leaf, teacher, step)
            (gradient,) = torch.autograd.grad(value, leaf)
            if gradient.is_cuda:
                torch.cuda.synchronize()
            return value, permutation, gradient
    else:
        raise SystemExit(f"bench.cost_growth does not run on the {backend} backend.")
    run(np.int32(0))
    times = []
    for step in range(1, config["steps"] + 1):
        started = time.perf_counter()
        run(np.int32(step))
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def point(config: dict, variable: str, args: argparse.Namespace) -> dict:
    """A sweep point's record configuration: the swept variable's name, then the whole configuration."""
    return {"suite": args.suite, "loss_only": args.loss_only, "variable": variable, **config}


def main(argv: list[str] | None = None) -> None:
    """Sweep each variable of the suite alone around its base configuration; print and record every point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(BASES), default="cpu")
    parser.add_argument("--only", default=None, help="sweep just this variable (k, block_size, local_crops, batch)")
    parser.add_argument("--loss-only", action="store_true",
                        help="time the partition + loss alone (seconds per point instead of a full compile of the "
                             "step); compare with bench.train_step's step time for the share")  # fmt: skip
    add_record_arguments(parser)
    args = parser.parse_args(argv)
    recorder = Recorder.from_args("cost_growth", args)
    backend = keras.backend.backend()
    base = BASES[args.suite]
    print(f"backend {keras.backend.backend()}, base configuration: {base}")
    print(f"{'variable':<12} {'value':>7} {'step ms':>9} {'images/s':>9} {'partition+loss ms':>18} {'share %':>8}")
    for variable, values in SWEEPS[args.suite].items():
        if args.only and variable != args.only:
            continue
        for value in values:
            config = dict(base, **{variable: value})
            if config["k"] % config["block_size"]:
                continue
            loss_ms = 1e3 * loss_only_seconds(config)
            if args.loss_only:
                print(f"{variable:<12} {value:>7} {'-':>9} {'-':>9} {loss_ms:>18.2f} {'-':>8}", flush=True)
                recorder.record(point(config, variable, args), {"partition_loss_ms": loss_ms}, backend=backend)
                continue
            step = run_keras(argparse.Namespace(**config))
            print(f"{variable:<12} {value:>7} {step['median_ms']:>9.1f} {step['images_per_s']:>9.1f} {loss_ms:>18.2f} "
                  f"{100 * loss_ms / step['median_ms']:>8.1f}", flush=True)  # fmt: skip
            figures = {"step_ms": step["median_ms"], "images_per_s": step["images_per_s"],
                       "partition_loss_ms": loss_ms, "share_percent": 100 * loss_ms / step["median_ms"]}  # fmt: skip
            recorder.record(point(config, variable, args), figures, backend=backend)
            keras.backend.clear_session()


if __name__ == "__main__":
    main()
