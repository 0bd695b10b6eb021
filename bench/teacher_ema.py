"""Per-step cost of the teacher EMA inside the compiled CARP train step, on the active Keras backend.

Times fit() steps of two identical models, one with the EMA update and one
without (an empty list of pairs), alternating rounds, and prints the difference.
Usage: KERAS_BACKEND=jax python -m bench.teacher_ema [--backbone resnet_tiny --batch 64 --size 32]
The figures are recorded in bench/results/teacher_ema.jsonl (bench.results).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_carp  # noqa: E402
from bench.results import Recorder, add_record_arguments  # noqa: E402


class StepTimer(keras.callbacks.Callback):
    """Wall time of every training batch, waiting for its loss."""

    def __init__(self):
        super().__init__()
        self.times: list[float] = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        float(keras.ops.convert_to_numpy(logs["loss"]))  # wait for the step
        self.times.append(time.perf_counter() - self._start)


def build(with_ema: bool, args: argparse.Namespace) -> keras_carp.CARP:
    """The compiled model, with its teacher EMA pairs or with none."""
    keras.utils.set_random_seed(0)
    model = keras_carp.CARP(
        keras_carp.build_encoder(args.backbone),
        keras_carp.CARPHead(num_prototypes=args.k, hidden_dim=args.hidden, bottleneck_dim=128),
        block_size=args.block_size,
        teacher_momentum_schedule=keras_carp.TeacherMomentumSchedule(total_steps=10**6),
    )
    if not with_ema:
        model.ema_pairs = []
    model.compile(optimizer=keras_carp.LARS(0.1))
    return model


def time_steps(model: keras_carp.CARP, views: tuple, args: argparse.Namespace) -> list[float]:
    """Step times of one fit epoch after the warm-up steps."""
    timer = StepTimer()
    model.fit(x=views, batch_size=args.batch, epochs=1, verbose=0, shuffle=False, callbacks=[timer])
    return timer.times[args.warmup :]


def main(argv: list[str] | None = None) -> None:
    """Time both models in alternating rounds; print and record the EMA's per-step cost."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet_tiny")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    add_record_arguments(parser)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    n = args.batch * (args.steps + args.warmup)
    views = tuple(rng.normal(size=(n, args.size, args.size, 3)).astype("float32") for _ in range(2))
    models = {True: build(True, args), False: build(False, args)}
    pairs = len(models[True].ema_pairs)
    times = {True: [], False: []}
    for _ in range(args.rounds):  # alternate so that drift in machine state hits both alike
        for with_ema, model in models.items():
            times[with_ema] += time_steps(model, views, args)
    on_median, on_p90 = np.median(times[True]), np.percentile(times[True], 90)
    off_median, off_p90 = np.median(times[False]), np.percentile(times[False], 90)
    print(f"backend={keras.backend.backend()} backbone={args.backbone} batch={args.batch} size={args.size} K={args.k}")
    print(f"EMA pairs (trainable variables averaged): {pairs}")
    print(f"step with EMA    median {1e3 * on_median:8.1f} ms  p90 {1e3 * on_p90:8.1f} ms")
    print(f"step without EMA median {1e3 * off_median:8.1f} ms  p90 {1e3 * off_p90:8.1f} ms")
    print(
        f"EMA overhead per step: {1e3 * (on_median - off_median):+.2f} ms ({100 * (on_median / off_median - 1):+.1f}%)"
    )
    config = {key: getattr(args, key) for key in ("backbone", "batch", "size", "k", "block_size", "hidden", "steps",
                                                  "warmup", "rounds")}  # fmt: skip
    figures = {
        "ema_pairs": pairs,
        "with_ema_median_ms": 1e3 * on_median,
        "with_ema_p90_ms": 1e3 * on_p90,
        "without_ema_median_ms": 1e3 * off_median,
        "without_ema_p90_ms": 1e3 * off_p90,
        "overhead_ms": 1e3 * (on_median - off_median),
        "overhead_percent": 100 * (on_median / off_median - 1),
    }
    Recorder.from_args("teacher_ema", args).record(config, {k: float(v) for k, v in figures.items()},
                                                   backend=keras.backend.backend())  # fmt: skip


if __name__ == "__main__":
    main()
