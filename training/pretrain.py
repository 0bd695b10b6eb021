"""carp-pretrain: pretrain a CARP encoder from a preset, then score it with weighted k-NN.

With no arguments it runs the ``digits`` preset: a small ResNet on
scikit-learn's bundled digits, a few minutes on 2 CPU cores. Every preset field
can be overridden on the command line (``--epochs 5``, ``--block-size 64``...);
the resolved configuration is saved in the run directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

PRESETS_DIR = Path(__file__).parent / "presets"


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def load_preset(name: str) -> dict:
    path = PRESETS_DIR / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"carp-pretrain: unknown preset {name!r}; available: {', '.join(available_presets())}.")
    return json.loads(path.read_text())


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_config(argv: list[str] | None = None) -> dict:
    """The preset named by --preset, with every field overridable by its own flag."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="digits")
    known, _ = pre.parse_known_args(argv)
    preset = load_preset(known.preset)

    parser = argparse.ArgumentParser(prog="carp-pretrain", description=__doc__.splitlines()[0], parents=[pre])
    parser.add_argument("--output-dir", default=None, help="run directory (default: runs/<preset>-<time>)")
    data = parser.add_argument_group("data (see keras_carp.data.load_source)")
    data.add_argument("--data-dir", default=None, help="TFDS data_dir, image folder, or Fashion-MNIST IDX folder")
    data.add_argument("--split", default="train", help="split to pretrain on (TFDS split string or subfolder)")
    data.add_argument("--eval-split", default="test", help="labelled split for k-NN queries ('' to skip k-NN)")
    data.add_argument("--download", type=_boolean, default=True, help="let TFDS download and prepare the dataset")
    data.add_argument("--min-image-size", type=int, default=None, help="smaller images are an error (0: upsample)")
    data.add_argument("--decode", choices=("once", "crop"), default="once", help="JPEG decoding per image or crop")
    data.add_argument("--cache", type=_boolean, default=False, help="cache encoded images in memory")
    data.add_argument("--antialias", type=_boolean, default=True, help="PIL-like filter on downscaled crops")
    devices = parser.add_argument_group("devices (see keras_carp.distribute)")
    devices.add_argument("--strategy", choices=("auto", "mirrored", "multiworker", "tpu", "none"), default="auto",
                         help="auto: a TPU if one answers, else all GPUs (TF) or devices (JAX), else one")  # fmt: skip
    devices.add_argument("--tpu", default=None, help="TPU name or grpc:// address (Cloud TPU VMs find their own)")
    defined = {action.dest for action in parser._actions}
    for key, value in preset.items():
        if key == "description":
            continue
        if key in defined:  # a preset may set the default of a data flag (e.g. eval_split: validation)
            parser.set_defaults(**{key: value})
        elif isinstance(value, bool):
            parser.add_argument(_flag(key), type=_boolean, default=value)
        elif isinstance(value, list):
            parser.add_argument(_flag(key), type=type(value[0]), nargs=len(value), default=value)
        else:
            parser.add_argument(_flag(key), type=type(value), default=value, help=f"(preset: {value})")
    args = vars(parser.parse_args(argv))
    args["description"] = preset.get("description", "")
    return args


def prepare_output_dir(path: str | None, preset: str) -> Path:
    """Create the run directory and prove it is writable before any training."""
    out = Path(path) if path else Path("runs") / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise SystemExit(f"carp-pretrain: cannot write to the output directory {out}: {error}") from None
    return out


def run(config: dict) -> dict:
    """Pretrain, evaluate, save; returns the summary written to summary.json."""
    import keras
    import numpy as np

    import keras_carp
    from keras_carp.data import (
        MultiCropAugmentation,
        SkippedImagesLogger,
        eval_dataset,
        load_source,
        multicrop_dataset,
    )
    from keras_carp.distribute import check_global_batch, setup_distribution
    from keras_carp.evaluation import CollapseMonitor, KNNMonitor, knn_accuracy

    out = prepare_output_dir(config["output_dir"], config["preset"])
    keras.utils.set_random_seed(config["seed"])
    augmentation = MultiCropAugmentation(
        global_size=config["global_size"],
        local_size=config["local_size"],
        num_local_crops=config["num_local_crops"],
        global_scale=tuple(config["global_scale"]),
        local_scale=tuple(config["local_scale"]),
        blur_sigma=tuple(config["blur_sigma"]),
        antialias=config["antialias"],
    )

    # Every data problem (unknown name, missing files, small images, empty folder) surfaces here, before training.
    def source(split: str):
        return load_source(config["dataset"], split, config["data_dir"], config.get("image_size"),
                           download=config["download"], seed=config["seed"])  # fmt: skip

    try:
        distribution = setup_distribution(config["strategy"], config["tpu"])
        check_global_batch(config["batch_size"], distribution.replicas)
    except ValueError as error:
        raise SystemExit(f"carp-pretrain: {error}") from None
    print(f"carp-pretrain: {distribution.description}, global batch {config['batch_size']}")
    if distribution.dtype_policy:
        keras.config.set_dtype_policy(distribution.dtype_policy)

    def pipeline(input_context=None):
        return multicrop_dataset(
            train_source,
            augmentation,
            config["batch_size"],  # global; with an input context each host makes its replicas' share
            seed=config["seed"],
            cache=config["cache"],
            decode=config["decode"],
            min_image_size=config["min_image_size"],
            input_context=input_context,
        )

    try:
        train_source = source(config["split"])
        dataset = pipeline()
        eval_source = source(config["eval_split"]) if config["eval_split"] and train_source.has_labels else None
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        raise SystemExit(f"carp-pretrain: {error}") from None
    logging.getLogger("keras_carp").info("pretraining on %r", train_source)
    steps_per_epoch = train_source.num_examples // config["batch_size"]
    total_steps = steps_per_epoch * config["epochs"]
    if distribution.per_host_input:  # TPU and multi-worker: every host reads its own shard
        dataset = distribution.strategy.distribute_datasets_from_function(pipeline)
    with distribution.scope():  # the model, its optimizer and their variables live on every replica
        try:  # invalid hyperparameters stop here, before any feature extraction or training
            head = keras_carp.CARPHead(
                num_prototypes=config["num_prototypes"],
                hidden_dim=config["hidden_dim"],
                bottleneck_dim=config["bottleneck_dim"],
            )
            model = keras_carp.CARP(
                keras_carp.build_encoder(config["backbone"]),
                head,
                block_size=config["block_size"],
                partition=config["partition"],
                seed=config["seed"],
            )
            schedule = keras_carp.WarmupCosineDecay(
                base_learning_rate=config["base_learning_rate"],
                global_batch_size=config["batch_size"],
                total_steps=total_steps,
                warmup_steps=config["warmup_epochs"] * steps_per_epoch,
                min_learning_rate=config["min_learning_rate"],
            )
            optimizer = keras_carp.LARS(schedule, weight_decay=config["weight_decay"])
            teacher_ema = keras_carp.TeacherEMA(
                config["base_teacher_momentum"], config["final_teacher_momentum"], total_steps=total_steps
            )
            model.compile(optimizer=optimizer)
        except ValueError as error:
            raise SystemExit(f"carp-pretrain: {error}") from None
    (out / "config.json").write_text(json.dumps(config, indent=2))

    size, crop_fraction = config["global_size"], config.get("eval_crop_fraction", 1.0)
    bank = eval_dataset(train_source, size, crop_fraction=crop_fraction) if eval_source else None
    queries = eval_dataset(eval_source, size, crop_fraction=crop_fraction) if eval_source else None

    num_classes = len(train_source.class_names) if eval_source else None
    knn_settings = dict(k=config["knn_k"], temperature=config["knn_temperature"], num_classes=num_classes)

    def knn(encoder) -> dict | None:
        return knn_accuracy(encoder, bank, queries, **knn_settings) if eval_source is not None else None

    random_init = knn(model.teacher_encoder)
    monitors = []
    if eval_source is not None and config.get("knn_every", 0) > 0:
        monitors.append(KNNMonitor(bank, queries, config["knn_every"], **knn_settings))
    probe = eval_dataset(train_source, size, batch_size=256, crop_fraction=crop_fraction).take(2)
    probe_images = np.concatenate([batch[0] if isinstance(batch, tuple) else batch for batch in probe])
    monitors.append(CollapseMonitor(probe_images))
    started = time.time()
    history = model.fit(
        dataset,
        epochs=config["epochs"],
        steps_per_epoch=steps_per_epoch if distribution.per_host_input else None,
        callbacks=[
            teacher_ema,
            SkippedImagesLogger(train_source),
            *monitors,
            keras.callbacks.CSVLogger(str(out / "training_log.csv")),
        ],
    )
    train_seconds = time.time() - started
    last_epoch = config["epochs"]
    learned = monitors[0].history[last_epoch] if isinstance(monitors[0], KNNMonitor) else knn(model.teacher_encoder)
    model.save(out / "model.keras")
    summary = {
        "preset": config["preset"],
        "dataset": train_source.name,
        "backend": keras.backend.backend(),
        "distribution": distribution.description,
        "train_images": train_source.num_examples,
        "skipped_images": train_source.skipped.count,
        "train_seconds": round(train_seconds, 1),
        "final_loss": float(history.history["loss"][-1]),
        "output_dir": str(out),
    }
    if learned is not None:
        summary.update(
            knn_top1=learned["top1"],
            knn_top5=learned["top5"],
            knn_top1_random_init=random_init["top1"],
            knn_top5_random_init=random_init["top5"],
            knn_k=config["knn_k"],
            eval_split=config["eval_split"],
        )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = parse_config(argv)
    summary = run(config)
    if "knn_top1" in summary:
        k, split = summary["knn_k"], summary["eval_split"]
        print(f"\nweighted k-NN (k={k}, T={config['knn_temperature']}) top-1 on the {config['dataset']} {split} split:")
        print(f"  CARP encoder (teacher):     {summary['knn_top1']:.2f}%")
        print(f"  same encoder, random init:  {summary['knn_top1_random_init']:.2f}%")
    else:
        print("\nno labelled evaluation split: k-NN skipped")
    print(f"summary and model.keras in {summary['output_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
