"""images/s of the views alone: ``DeviceMultiCrop`` compiled on the active backend, beside the tf.data recipe.

The device side takes a batch of uint8 images stretched to ``--image-size``
(what the host sends with ``--augment device``) and makes the 2 global and the
local crops of every image in one compiled call (``jax.jit``; ``tf.function``
with XLA where ``CARP`` would use it; PyTorch eagerly), timed over
``--steps`` calls after ``--warmup``, synchronised on the result. With
TensorFlow installed, the host side is the tf.data recipe on real JPEGs per CPU
core (``bench.input_pipeline``'s figure), for the same views.

    python -m bench.device_views                                   # ImageNet views, 2x224 + 6x96 from 320 px
    KERAS_BACKEND=jax python -m bench.device_views --batch 256     # on a GPU

Recorded in bench/results/device_views.jsonl (bench.results).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from bench.results import Recorder, add_record_arguments, cpu_model  # noqa: E402
from keras_carp import DeviceMultiCrop, backends  # noqa: E402


def compiled(augmentation: DeviceMultiCrop):
    """``(images, step) -> views`` compiled as the train step would compile it on this backend."""
    call = lambda images, step: augmentation(images, step)  # noqa: E731
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(call)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(call, jit_compile=backends.xla_by_default())
    return call


def views_per_second(augmentation: DeviceMultiCrop, images, steps: int, warmup: int) -> tuple[float, float]:
    """(images/s, compile seconds) of the compiled views of one device-resident batch."""
    function = compiled(augmentation)
    images = keras.ops.convert_to_tensor(images)
    wait = lambda views: [keras.ops.convert_to_numpy(view[0, 0, 0]) for view in views]  # noqa: E731
    started = time.perf_counter()
    wait(function(images, keras.ops.convert_to_tensor(0)))
    first = time.perf_counter() - started
    times = []
    for step in range(1, warmup + steps + 1):
        started = time.perf_counter()
        wait(function(images, keras.ops.convert_to_tensor(step)))
        times.append(time.perf_counter() - started)
    median = statistics.median(times[warmup:])
    return len(images) / median, max(first - median, 0.0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--local-crops", type=int, default=6)
    p.add_argument("--image-size", type=int, default=320, help="the square the host stretches images to")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    add_record_arguments(p)
    args = p.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    print(f"machine: {cpu_model()}, {cores} CPU cores; Keras {keras.__version__} on {keras.backend.backend()}")
    recipe = DeviceMultiCrop(global_size=args.global_size, local_size=args.local_size,
                             num_local_crops=args.local_crops)  # fmt: skip
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.batch, args.image_size, args.image_size, 3), dtype="uint8")
    rate, compile_s = views_per_second(recipe, images, args.steps, args.warmup)
    views = f"2x{args.global_size}" + (f"+{args.local_crops}x{args.local_size}" if args.local_crops else "")
    print(f"{views} from {args.image_size} px, batch {args.batch}: {rate:.1f} images/s "
          f"({1e3 / rate:.2f} ms per image, {rate / cores:.1f} per core), compiled in {compile_s:.1f} s")  # fmt: skip
    config = {"global_size": args.global_size, "local_size": args.local_size, "local_crops": args.local_crops,
              "image_size": args.image_size, "batch": args.batch}  # fmt: skip
    figures = {"images_per_s": rate, "ms_per_image": 1e3 / rate, "compile_s": compile_s, "cores": cores}
    Recorder.from_args("device_views", args).record(config, figures, backend=keras.backend.backend())


if __name__ == "__main__":
    main()
