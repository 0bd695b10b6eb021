"""images/s of ``CARP.fit`` fed by the tf.data multi-crop pipeline, beside the pipeline alone and the step alone.

The pipeline reads synthetic JPEGs at ImageNet-like sizes (as bench.input_pipeline
makes them) from a folder, decodes each once, cuts 2 global + N local crops
with the full augmentation recipe, and feeds ``fit`` on the active Keras
backend. Three figures for one configuration:

- fit: images/s over ``--steps`` batches after ``--warmup`` (timed by a callback);
- pipeline alone: images/s of iterating the same dataset, and per CPU core;
- step alone: bench.train_step's compiled step on device-resident batches.

``fit`` runs at the lower of the last two at best. The cores needed to keep the
step busy are the step's images/s over the pipeline's images/s per core.

    KERAS_BACKEND=jax python -m bench.fit_pipeline                     # ResNet-18, 2x64 + 4x32, K 4096, batch 32
    KERAS_BACKEND=jax python -m bench.fit_pipeline --backbone resnet50 --global-size 224 --local-size 96 \\
        --local-crops 6 --k 65536 --batch 256 --precision bfloat16       # the ImageNet recipe on a GPU

The figures are recorded in bench/results/fit_pipeline.jsonl (bench.results).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

from bench.input_pipeline import make_jpegs, throughput  # noqa: E402
from bench.results import Recorder, add_record_arguments, cpu_model  # noqa: E402
from bench.train_step import CONFIG_ARGUMENTS, add_config_arguments, build_model, run_keras  # noqa: E402
from keras_carp.data import FolderSource, MultiCropAugmentation, multicrop_dataset  # noqa: E402


class BatchClock(keras.callbacks.Callback):
    """Wall-clock time at the end of every training batch."""

    def __init__(self):
        super().__init__()
        self.times: list[float] = []

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter())


def fit_images_per_second(args: argparse.Namespace, dataset) -> float:
    """images/s of ``fit`` on ``dataset`` over ``args.steps`` batches after ``args.warmup``, by a batch clock."""
    model = build_model(args)  # the same model and optimizer as the step-alone figure
    clock = BatchClock()
    # One epoch of the generated images is a few batches: repeat them for the whole measurement.
    model.fit(dataset.repeat(), epochs=1, steps_per_epoch=args.warmup + args.steps, callbacks=[clock], verbose=0)
    if len(clock.times) != args.warmup + args.steps:
        raise RuntimeError(f"fit ran {len(clock.times)} batches, expected {args.warmup + args.steps}")
    return args.steps * args.batch / (clock.times[-1] - clock.times[args.warmup - 1])


def main(argv: list[str] | None = None) -> None:
    """Measure fit, the pipeline alone and the step alone for one configuration; print and record them."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(p, backbone="resnet18", global_size=64, local_size=32, local_crops=4, k=4096, block_size=512,
                         hidden=2048, bottleneck=256, batch=32, precision="float32", steps=20, warmup=3)  # fmt: skip
    p.add_argument("--num-images", type=int, default=300)
    p.add_argument("--jpeg-dir", default=None, help="reuse or keep the generated JPEGs here")
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    add_record_arguments(p)
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (the first batch compiles the step)")
    cores = len(os.sched_getaffinity(0))
    print(f"machine: {cpu_model()}, {cores} CPU cores; Keras {keras.__version__} on {keras.backend.backend()}")
    views = f"2x{args.global_size}" + (f"+{args.local_crops}x{args.local_size}" if args.local_crops else "")
    print(f"{args.backbone}, {views}, K {args.k}, N_B {args.block_size}, batch {args.batch}, {args.precision}")

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.jpeg_dir or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        if len(list(folder.glob("*.jpg"))) < args.num_images:
            make_jpegs(folder, args.num_images)
        recipe = MultiCropAugmentation(global_size=args.global_size, local_size=args.local_size,
                                       num_local_crops=args.local_crops)  # fmt: skip
        dataset = multicrop_dataset(FolderSource(folder), recipe, args.batch, min_image_size=0)
        pipeline = throughput(dataset, args.batch, args.steps)
        fit = fit_images_per_second(args, dataset)
    keras.backend.clear_session()
    step = run_keras(argparse.Namespace(**{**vars(args), "steps": args.steps}))["images_per_s"]
    print(f"  fit, pipeline feeding the step   {fit:9.1f} images/s")
    print(f"  pipeline alone                   {pipeline:9.1f} images/s ({pipeline / cores:.1f} per core)")
    print(f"  step alone (device-resident)     {step:9.1f} images/s")
    print(f"  fit / min(pipeline, step)        {fit / min(pipeline, step):9.2f}")
    print(f"  cores to keep the step busy      {step / (pipeline / cores):9.1f}")
    figures = {"fit_images_per_s": fit, "pipeline_images_per_s": pipeline, "step_images_per_s": step,
               "cores": cores, "cores_to_keep_step_busy": step / (pipeline / cores)}  # fmt: skip
    config = {name.replace("-", "_"): getattr(args, name.replace("-", "_")) for name, _ in CONFIG_ARGUMENTS}
    config["num_images"] = args.num_images
    Recorder.from_args("fit_pipeline", args).record(config, figures, backend=keras.backend.backend())
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
