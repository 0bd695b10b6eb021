"""Input pipeline throughput: images/s (and per CPU core) of keras_carp.data.multicrop_dataset.

1. ImageNet recipe, 2 x 224 + 6 x 96, on real JPEGs at ImageNet-like sizes: a
   few hundred distinct files cut from scikit-learn's sample photos (random
   crops, flips and rescales to 500x375, 375x500, 500x333 or 400x400, quality
   90), read from a folder exactly as a user's folder would be, once with each
   JPEG strategy: decode the whole image once per image, or decode only each
   crop's window (decode_and_crop_jpeg); then once more without the
   antialiasing filter on downscales (faster, but not the reference recipe).
2. Small-image recipe, 2 x 32, on Fashion-MNIST (Debian's IDX files, resized to
   32 px at load).

Each setting runs ``--rounds`` times, interleaved with the others; the median is
printed with the range.

    python -m bench.input_pipeline [--num-images 300] [--batches 30] [--rounds 3] [--fashion-dir DIR]

Each setting is recorded in bench/results/input_pipeline.jsonl (bench.results).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.images import make_jpegs  # noqa: E402
from bench.results import Recorder, add_record_arguments, cpu_model  # noqa: E402
from keras_carp.data import FolderSource, MultiCropAugmentation, load_source, multicrop_dataset  # noqa: E402


def throughput(dataset: tf.data.Dataset, batch_size: int, batches: int, warmup: int = 5) -> float:
    """Images per second over ``batches`` batches after ``warmup`` batches."""
    iterator = iter(dataset.repeat())
    for _ in range(warmup):
        next(iterator)
    started = time.perf_counter()
    for _ in range(batches):
        tf.nest.map_structure(lambda t: t.numpy(), next(iterator))
    return batches * batch_size / (time.perf_counter() - started)


def measure(settings: dict, batch_sizes: dict, batches: int, rounds: int, cores: int) -> dict:
    """Interleaved rounds over the named datasets; prints median (min-max) images/s and per core, returns
    {name: figures}."""
    rates = {name: [] for name in settings}
    for _ in range(rounds):
        for name, dataset in settings.items():
            rates[name].append(throughput(dataset, batch_sizes[name], batches))
    figures = {}
    for name, values in rates.items():
        median = float(np.median(values))
        print(
            f"  {name:<34} {median:8.1f} images/s ({min(values):.0f}-{max(values):.0f})"
            f"  {median / cores:7.1f} images/s/core"
        )
        figures[name] = {"images_per_s": median, "min_images_per_s": min(values), "max_images_per_s": max(values),
                         "images_per_s_per_core": median / cores}  # fmt: skip
    return figures


def main(argv: list[str] | None = None) -> None:
    """Measure the ImageNet recipe on generated JPEGs, then the small-image recipe on Fashion-MNIST; record each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--jpeg-dir", default=None, help="reuse or keep the generated JPEGs here")
    parser.add_argument("--fashion-dir", default=None, help="Fashion-MNIST IDX folder (default: Debian's)")
    parser.add_argument("--rounds", type=int, default=3)
    add_record_arguments(parser)
    args = parser.parse_args(argv)
    recorder = Recorder.from_args("input_pipeline", args)
    shared = {"batches": args.batches, "rounds": args.rounds}
    cores = len(os.sched_getaffinity(0))
    print(f"machine: {cpu_model()}, {cores} CPU cores; TensorFlow {tf.__version__}")

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.jpeg_dir or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        if len(list(folder.glob("*.jpg"))) < args.num_images:
            make_jpegs(folder, args.num_images)
        source = FolderSource(folder)
        mean_kb = np.mean([f.stat().st_size for f in folder.glob("*.jpg")]) / 1024
        print(f"\n2 x 224 + 6 x 96 on {source.num_examples} JPEGs (ImageNet-like sizes, mean {mean_kb:.0f} KiB)")
        recipe = MultiCropAugmentation()  # the ImageNet recipe
        settings = {
            f"decode={decode} deterministic={deterministic}": multicrop_dataset(
                source, recipe, args.batch_size, decode=decode, deterministic=deterministic, min_image_size=0
            )
            for decode in ("once", "crop")
            for deterministic in (True, False)
        }
        aliased = dataclasses.replace(recipe, antialias=False)
        settings["decode=once, no antialiasing"] = multicrop_dataset(source, aliased, args.batch_size, min_image_size=0)
        figures = measure(settings, dict.fromkeys(settings, args.batch_size), args.batches, args.rounds, cores)
        data = f"{args.num_images} generated JPEGs at ImageNet sizes"
        for name, values in figures.items():
            config = {"recipe": "2x224+6x96", "data": data, "setting": name, "batch_size": args.batch_size, **shared}
            recorder.record(config, values, backend="tensorflow")

    try:
        fashion = load_source("fashion_mnist", "train", args.fashion_dir, image_size=32)
    except FileNotFoundError as error:
        print(f"\nFashion-MNIST skipped: {error}")
        return
    print(f"\n2 x 32 on Fashion-MNIST ({fashion.num_examples} images, 28 -> 32 px at load), batch 256")
    recipe = MultiCropAugmentation(global_size=32, local_size=16, num_local_crops=0)
    settings = {
        f"deterministic={deterministic}": multicrop_dataset(fashion, recipe, 256, deterministic=deterministic)
        for deterministic in (True, False)
    }
    figures = measure(settings, dict.fromkeys(settings, 256), args.batches, args.rounds, cores)
    for name, values in figures.items():
        config = {"recipe": "2x32", "data": "Fashion-MNIST train", "setting": name, "batch_size": 256, **shared}
        recorder.record(config, values, backend="tensorflow")


if __name__ == "__main__":
    main()
