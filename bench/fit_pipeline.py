"""images/s of ``CARP.fit`` with the views made on the host (tf.data) or on the device (in the step), on real JPEGs.

The images are real JPEGs at ImageNet-like sizes (cut from scikit-learn's
sample photos, bench.images) read from a folder. For each way of making the
views, three figures for one configuration:

- ``host``: tf.data decodes each JPEG once and cuts 2 global + N local crops
  with the whole recipe; the step trains on the crops (needs TensorFlow).
- ``device``: the host only decodes each image and stretches it to
  ``--device-image-size`` (uint8), with tf.data (``--loader tfdata``) or with
  Pillow in ``--workers`` threads (``--processes``: processes; ``--loader
  pillow``, ``ImageBatches``: no TensorFlow); ``DeviceMultiCrop`` makes the
  views inside the compiled step.

For each: fit images/s over ``--steps`` batches after ``--warmup`` (timed by
a callback); the input alone (images/s, and per worker core); the step alone
on one device-resident batch (for ``device``, with the augmentation in it).
The plain step on device-resident crops is the goal's reference: ``fit /
plain step`` is the share of the accelerator ``fit`` keeps.

    python -m bench.fit_pipeline                                       # ResNet-18, 2x64 + 4x32, K 4096, batch 32
    KERAS_BACKEND=jax python -m bench.fit_pipeline --augment device --loader pillow --backbone resnet50 \\
        --global-size 224 --local-size 96 --local-crops 6 --k 65536 --batch 256 --precision bfloat16 \\
        --num-images 6144                                                # the ImageNet recipe on a GPU

The figures are recorded in bench/results/fit_pipeline.jsonl (bench.results).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import multiprocessing
import multiprocessing.pool
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from bench.images import make_jpegs  # noqa: E402
from bench.results import Recorder, add_record_arguments, cpu_model  # noqa: E402
from bench.train_step import CONFIG_ARGUMENTS, add_config_arguments, build_model, keras_step_runner, time_steps  # noqa: E402
from keras_carp import DeviceMultiCrop  # noqa: E402
from keras_carp.data import FolderSource, ImageBatches  # noqa: E402


class BatchClock(keras.callbacks.Callback):
    """Wall-clock time at the end of every training batch."""

    def __init__(self):
        super().__init__()
        self.times: list[float] = []

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter())


def fit_images_per_second(args: argparse.Namespace, dataset, augmentation=None) -> float:
    """images/s of ``fit`` over ``args.steps`` batches after ``args.warmup``, by a batch clock.

    A tf.data dataset repeats within one epoch; a Pillow loader runs whole epochs (its order is per epoch).
    """
    model = build_model(args, augmentation)  # the same model and optimizer as the step-alone figure
    clock = BatchClock()
    total = args.warmup + args.steps
    if isinstance(dataset, ImageBatches):
        epochs = math.ceil(total / len(dataset))
        model.fit(dataset, epochs=epochs, callbacks=[clock], verbose=0, shuffle=False)
    else:
        model.fit(dataset.repeat(), epochs=1, steps_per_epoch=total, callbacks=[clock], verbose=0, shuffle=False)
    if len(clock.times) < total:
        raise RuntimeError(f"fit ran {len(clock.times)} batches, expected {total}")
    return args.steps * args.batch / (clock.times[total - 1] - clock.times[args.warmup - 1])


def step_images_per_second(args: argparse.Namespace, batch, augmentation=None) -> float:
    """images/s of the compiled step on one device-resident batch (median step time)."""
    model = build_model(args, augmentation)
    model.train_on_batch(*batch)  # builds, traces, compiles
    times, _ = time_steps(keras_step_runner(model, batch), args.warmup, args.steps)
    return args.batch / float(np.median(times))


def device_resident(batch):
    """A batch as backend tensors (what the step-alone figure trains on)."""
    return tuple(keras.tree.map_structure(lambda t: keras.ops.convert_to_tensor(np.asarray(t)), batch))


def _read_batch(loader_and_index):
    loader, index = loader_and_index
    return loader[index]


def loader_images_per_second(loader: ImageBatches, batches: int, workers: int, processes: bool) -> float:
    """images/s of a Pillow loader's batches made by ``workers`` threads or processes (as Keras' enqueuer does)."""
    indices = [index % len(loader) for index in range(batches)]
    pool_class = multiprocessing.get_context("fork").Pool if processes else multiprocessing.pool.ThreadPool
    with pool_class(workers) as pool:
        pool.map(_read_batch, [(loader, 0)] * workers)  # start the workers
        started = time.perf_counter()
        for _ in pool.imap(_read_batch, [(loader, index) for index in indices]):
            pass
        return batches * loader.batch_size / (time.perf_counter() - started)


def measure(args: argparse.Namespace, folder: Path, augment: str, cores: int) -> dict:
    """fit, the input alone and the step alone, for views made on the host or the device."""
    sizes = dict(global_size=args.global_size, local_size=args.local_size, num_local_crops=args.local_crops)
    augmentation = DeviceMultiCrop(**sizes) if augment == "device" else None
    image_size = args.device_image_size or round(args.global_size * 10 / 7)
    if args.loader == "pillow":
        dataset = ImageBatches(FolderSource(folder), args.batch, image_size=image_size, workers=args.workers,
                               use_multiprocessing=args.processes)  # fmt: skip
        source = loader_images_per_second(dataset, args.steps, args.workers, args.processes)
        input_cores = args.workers
    else:
        from bench.input_pipeline import throughput
        from keras_carp.data import MultiCropAugmentation, multicrop_dataset
        from keras_carp.data.pipeline import WholeImages

        host_work = WholeImages(image_size) if augment == "device" else MultiCropAugmentation(**sizes)
        dataset = multicrop_dataset(FolderSource(folder), host_work, args.batch, min_image_size=0)
        source = throughput(dataset, args.batch, args.steps)
        input_cores = cores
    fit = fit_images_per_second(args, dataset, augmentation)
    keras.backend.clear_session()
    first = dataset[0] if isinstance(dataset, ImageBatches) else next(iter(dataset))
    step = step_images_per_second(args, device_resident(first), augmentation)
    keras.backend.clear_session()
    return {"fit_images_per_s": fit, "pipeline_images_per_s": source, "pipeline_images_per_s_per_core":
            source / input_cores, "step_images_per_s": step, "input_cores": input_cores}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Measure fit, the input alone and the step alone for host and device views; print and record them."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(p, backbone="resnet18", global_size=64, local_size=32, local_crops=4, k=4096, block_size=512,
                         hidden=2048, bottleneck=256, batch=32, precision="float32", steps=20, warmup=3)  # fmt: skip
    has_tensorflow = importlib.util.find_spec("tensorflow") is not None
    cores = len(os.sched_getaffinity(0))
    p.add_argument("--augment", choices=("host", "device", "both"), default="both" if has_tensorflow else "device")
    p.add_argument("--loader", choices=("tfdata", "pillow"), default="tfdata" if has_tensorflow else "pillow")
    p.add_argument("--workers", type=int, default=cores, help="--loader pillow: decoding threads (or processes)")
    p.add_argument("--processes", action="store_true", help="--loader pillow: worker processes, not threads")
    p.add_argument("--device-image-size", type=int, default=None, help="default: 10/7 of --global-size")
    p.add_argument("--num-images", type=int, default=300)
    p.add_argument("--jpeg-dir", default=None, help="reuse or keep the generated JPEGs here")
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    add_record_arguments(p)
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (the first batch compiles the step)")
    if args.augment != "device" and (args.loader == "pillow" or not has_tensorflow):
        p.error("host views are made by tf.data: --augment host needs TensorFlow and --loader tfdata")
    print(f"machine: {cpu_model()}, {cores} CPU cores; Keras {keras.__version__} on {keras.backend.backend()}")
    views = f"2x{args.global_size}" + (f"+{args.local_crops}x{args.local_size}" if args.local_crops else "")
    print(f"{args.backbone}, {views}, K {args.k}, N_B {args.block_size}, batch {args.batch}, {args.precision}, "
          f"input by {args.loader}" + (f" in {args.workers} {'processes' if args.processes else 'threads'}"
                                      if args.loader == "pillow" else ""))  # fmt: skip

    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.jpeg_dir or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        if len(list(folder.glob("*.jpg"))) < args.num_images:
            make_jpegs(folder, args.num_images)
        for augment in ("host", "device") if args.augment == "both" else (args.augment,):
            results[augment] = measure(args, folder, augment, cores)
    rng = np.random.default_rng(0)
    sizes = [args.global_size] * 2 + [args.local_size] * args.local_crops
    crops = tuple(rng.normal(size=(args.batch, s, s, 3)).astype("float32") for s in sizes)
    plain_step = step_images_per_second(args, device_resident((crops,)))

    print(f"  {'images/s':36s} {'host views':>12s} {'device views':>13s}")
    rows = (("fit", "fit_images_per_s"), ("input alone", "pipeline_images_per_s"),
            ("  per input core", "pipeline_images_per_s_per_core"), ("step alone (device: views in it)",
            "step_images_per_s"))  # fmt: skip
    for label, key in rows:
        cells = [f"{results[a][key]:12.1f}" if a in results else f"{'-':>12s}" for a in ("host", "device")]
        print(f"  {label:36s} {cells[0]} {cells[1]:>13s}")
    print(f"  {'plain step on device-resident crops':36s} {plain_step:12.1f}")
    recorder = Recorder.from_args("fit_pipeline", args)  # one run: the host and device rows in one table
    for augment, figures in results.items():
        figures.update(cores=cores, plain_step_images_per_s=plain_step,
                       fit_over_plain_step=figures["fit_images_per_s"] / plain_step,
                       cores_to_keep_step_busy=plain_step / figures["pipeline_images_per_s_per_core"])  # fmt: skip
        print(
            f"  {augment} views: fit / plain step {figures['fit_over_plain_step']:.2f}; input cores to keep the "
            f"plain step busy {figures['cores_to_keep_step_busy']:.1f}"
        )
        config = {name.replace("-", "_"): getattr(args, name.replace("-", "_")) for name, _ in CONFIG_ARGUMENTS}
        config.update(num_images=args.num_images, augment=augment, loader=args.loader)
        if args.loader == "pillow":
            config.update(workers=args.workers, worker_kind="processes" if args.processes else "threads")
        if augment == "device":
            config["device_image_size"] = args.device_image_size or round(args.global_size * 10 / 7)
        recorder.record(config, figures, backend=keras.backend.backend())
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
