"""Loss-step time of the two ways to put logits in partition order (TensorFlow backend, XLA).

- gather: logits = z . C_n^T, then gather the K columns of every [N, K] logits tensor;
- permute: gather the K prototype rows of C_n once, then z . C_perm^T.

Both give the same logits (tests/keras_carp/test_losses.py checks it). Times the forward
and backward of head matmul + partition + CARP loss for 2 student and 2
teacher global crops. Usage: python -m bench.logits_formulation [--k 65536 --block-size 512 --batch 64]
Each formulation is recorded in bench/results/logits_formulation.jsonl (bench.results).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import ops  # noqa: E402

from bench.results import Recorder, add_record_arguments  # noqa: E402
from keras_carp.losses import block_softmax, carp_loss_from_probs  # noqa: E402
from keras_carp.partition import random_permutation  # noqa: E402


def make_step(formulation: str, block_size: int):
    """The compiled loss step (value and gradients) of one formulation: "gather" or "permute"."""

    @tf.function(jit_compile=True)
    def step(z_student, z_teacher, prototypes, seed_step):
        with tf.GradientTape() as tape:
            tape.watch([z_student, prototypes])
            normalized = prototypes * tf.math.rsqrt(tf.reduce_sum(prototypes**2, axis=1, keepdims=True))
            permutation = random_permutation(prototypes.shape[0], 0, seed_step)
            if formulation == "permute":
                table = ops.take(normalized, permutation, axis=0)
                student, teacher = z_student @ tf.transpose(table), z_teacher @ tf.transpose(table)
            else:
                student = ops.take(z_student @ tf.transpose(normalized), permutation, axis=1)
                teacher = ops.take(z_teacher @ tf.transpose(normalized), permutation, axis=1)
            teacher = tf.stop_gradient(teacher)
            s_probs = [block_softmax(x, block_size) for x in tf.split(student, 2)]
            t_probs = [block_softmax(x, block_size) for x in tf.split(teacher, 2)]
            loss = carp_loss_from_probs(s_probs, t_probs)["loss"]
        return loss, tape.gradient(loss, [z_student, prototypes])

    return step


def time_formulation(formulation: str, k: int, block_size: int, batch: int, dim: int, repeats: int) -> tuple:
    """(median s, p90 s, compile s, loss) of one formulation over ``repeats`` calls after the compiling one."""
    rng = np.random.default_rng(0)
    z_student = tf.constant(rng.normal(size=(2 * batch, dim)), tf.float32)
    z_teacher = tf.constant(rng.normal(size=(2 * batch, dim)), tf.float32)
    prototypes = tf.constant(rng.normal(size=(k, dim)), tf.float32)
    step = make_step(formulation, block_size)
    start = time.perf_counter()
    loss, _ = step(z_student, z_teacher, prototypes, tf.constant(0))
    float(loss)
    compile_s = time.perf_counter() - start
    times = []
    for index in range(repeats):
        start = time.perf_counter()
        loss, grads = step(z_student, z_teacher, prototypes, tf.constant(index + 1))
        _ = grads[1].numpy()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), float(np.percentile(times, 90)), compile_s, float(loss)


def main(argv: list[str] | None = None) -> None:
    """Time both formulations at one size; print and record them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=65536)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    add_record_arguments(parser)
    args = parser.parse_args(argv)
    recorder = Recorder.from_args("logits_formulation", args)
    device = tf.config.list_logical_devices()[0].name
    print(f"K={args.k} N_B={args.block_size} batch={args.batch} d={args.dim} device={device}")
    print(f"{'formulation':<12}{'median ms':>12}{'p90 ms':>10}{'compile s':>11}{'loss':>10}")
    for formulation in ("gather", "permute"):
        median, p90, compile_s, loss = time_formulation(
            formulation, args.k, args.block_size, args.batch, args.dim, args.repeats
        )
        print(f"{formulation:<12}{1e3 * median:>12.1f}{1e3 * p90:>10.1f}{compile_s:>11.1f}{loss:>10.4f}")
        config = {"formulation": formulation, "k": args.k, "block_size": args.block_size, "batch": args.batch,
                  "dim": args.dim, "repeats": args.repeats, "device": device}  # fmt: skip
        figures = {"median_ms": 1e3 * median, "p90_ms": 1e3 * p90, "compile_s": compile_s, "loss": loss}
        recorder.record(config, figures, backend="tensorflow")


if __name__ == "__main__":
    main()
