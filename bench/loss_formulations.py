"""Time two formulations of the CARP loss, forward and backward: the train step's, and a fused one that was tried.

- per crop (the train step's path): ``block_softmax`` of each crop ([N, K] ->
  [N_P, N, N_B]) and one agreement per (student crop, teacher view) pair, as
  ``carp_loss_from_probs`` does;
- fused (tried, not kept): all crops stacked into one [C, N, N_P, N_B] tensor
  with no transpose, two broadcast agreements, the i == j pairs masked: fewer,
  larger ops. Measured on an H200 it was 11 % slower (README), so the library
  keeps the per-crop form; this benchmark keeps the comparison repeatable.

Both get the same already-permuted logits (the head permutes its prototypes,
not the logits) and differentiate w.r.t. the student logits, compiled (XLA).
Prints the median over ``--steps`` calls and the largest gradient difference.

    KERAS_BACKEND=jax python -m bench.loss_formulations --batch 256 --crops 8 --k 65536 --dtype bfloat16

Each formulation is recorded in bench/results/loss_formulations.jsonl (bench.results).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from bench.results import Recorder, add_record_arguments  # noqa: E402
from keras_carp.losses import EPS, block_softmax, carp_loss_from_probs  # noqa: E402


def formulations(crops: int, block_size: int) -> dict:
    """{name: loss(student_logits, teacher_logits)} of the two formulations."""

    def per_crop(student, teacher):
        probs = [block_softmax(x, block_size) for x in ops.split(student, crops, axis=0)]
        targets = [block_softmax(x, block_size) for x in ops.split(teacher, 2, axis=0)]
        return carp_loss_from_probs(probs, targets)["loss"]

    def fused(student, teacher):
        batch, num_blocks = student.shape[0] // crops, student.shape[1] // block_size
        probs = ops.softmax(ops.reshape(ops.cast(student, "float32"), (crops, batch, num_blocks, block_size)), -1)
        targets = ops.softmax(ops.reshape(ops.cast(teacher, "float32"), (2, batch, num_blocks, block_size)), -1)
        targets = ops.stop_gradient(targets)
        agreement = ops.stack([ops.sum(probs * targets[j], axis=-1) for j in range(2)], axis=1)  # [C, 2, N, N_P]
        pair_mask = np.ones((crops, 2), "float32")
        pair_mask[[0, 1], [0, 1]] = 0.0  # global crop i is not compared with its own teacher view
        per_pair = ops.mean(-ops.log(ops.clip(agreement, EPS, 1.0 - EPS)), axis=(2, 3))
        consistency = ops.sum(per_pair * pair_mask) / float(pair_mask.sum())
        mean_probs = (ops.sum(probs, axis=(0, 1)) + ops.sum(targets, axis=(0, 1))) / ((crops + 2) * batch)
        kl = float(np.log(block_size)) + ops.sum(mean_probs * ops.log(ops.clip(mean_probs, EPS, 1.0 - EPS)), -1)
        return consistency + ops.mean(kl)

    return {"per crop (library)": per_crop, "fused (tried)": fused}


def compiled_value_and_grad(loss):
    """``loss``'s value and gradient w.r.t. the student logits, compiled (XLA) on the active backend."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        function = jax.jit(jax.value_and_grad(loss))
        return lambda s, t: jax.block_until_ready(function(s, t))
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def function(s, t):
            with tf.GradientTape() as tape:
                tape.watch(s)
                value = loss(s, t)
            return value, tape.gradient(value, s)

        return lambda s, t: [x.numpy() for x in function(s, t)]
    raise SystemExit("bench.loss_formulations runs on the jax or tensorflow backend.")


def main(argv: list[str] | None = None) -> None:
    """Time both formulations on the same logits; print, record, and compare their gradients."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32, help="images per crop")
    p.add_argument("--crops", type=int, default=8, help="student crops (2 global + local)")
    p.add_argument("--k", type=int, default=65536)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--dtype", default="float32", help="dtype of the logits (bfloat16 under mixed precision)")
    p.add_argument("--steps", type=int, default=20)
    add_record_arguments(p)
    args = p.parse_args(argv)
    recorder = Recorder.from_args("loss_formulations", args)
    rng = np.random.default_rng(0)
    student = ops.convert_to_tensor(rng.normal(size=(args.crops * args.batch, args.k)).astype("float32"), args.dtype)
    teacher = ops.convert_to_tensor(rng.normal(size=(2 * args.batch, args.k)).astype("float32"), args.dtype)
    print(f"backend {keras.backend.backend()}: {args.crops} crops x batch {args.batch}, K {args.k}, "
          f"N_B {args.block_size}, {args.dtype} logits")  # fmt: skip
    first_gradient = None
    for name, loss in formulations(args.crops, args.block_size).items():
        run = compiled_value_and_grad(loss)
        started = time.perf_counter()
        value, gradient = run(student, teacher)
        compile_s = time.perf_counter() - started
        times = []
        for _ in range(args.steps):
            started = time.perf_counter()
            run(student, teacher)
            times.append(time.perf_counter() - started)
        gradient = np.asarray(ops.convert_to_numpy(ops.cast(gradient, "float32")))
        first_gradient = gradient if first_gradient is None else first_gradient
        difference = float(np.max(np.abs(gradient - first_gradient)))
        print(f"{name:<18} loss {float(value):.6f}  {1e3 * statistics.median(times):9.2f} ms  "
              f"(compile {compile_s:.1f} s, max gradient difference {difference:.1e})", flush=True)  # fmt: skip
        config = {"formulation": name, "crops": args.crops, "batch": args.batch, "k": args.k,
                  "block_size": args.block_size, "dtype": args.dtype, "steps": args.steps}  # fmt: skip
        figures = {"median_ms": 1e3 * statistics.median(times), "compile_s": compile_s, "loss": float(value),
                   "max_gradient_difference": difference}  # fmt: skip
        recorder.record(config, figures, backend=keras.backend.backend())


if __name__ == "__main__":
    main()
