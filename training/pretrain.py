"""carp-pretrain: pretrain a CARP encoder from a preset, then score it with weighted k-NN.

With no arguments it runs the ``digits`` preset: a small ResNet on
scikit-learn's bundled digits, a few minutes on 2 CPU cores. Every preset field
can be overridden on the command line (``--epochs 5``, ``--block-size 64``...);
the resolved configuration is saved in the run directory.

The run directory (``--output-dir``, default ``runs/<preset>``) holds
``config.json``, ``checkpoints/``, TensorBoard logs in ``logs/``,
``training_log.csv``, the final ``model.keras``, the exported SavedModel
encoder in ``encoder/`` and ``summary.json``. Rerunning the same command after
a crash or ``kill -9`` resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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
    parser.add_argument("--output-dir", default=None, help="run directory (default: runs/<preset>); reruns resume")
    run_flags = parser.add_argument_group("run directory")
    run_flags.add_argument("--checkpoint-every-steps", type=int, default=0,
                           help="also checkpoint every N optimizer steps (always at each epoch's end)")  # fmt: skip
    run_flags.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept")
    run_flags.add_argument("--log-every-steps", type=int, default=50, help="TensorBoard step summaries (0: epochs)")
    run_flags.add_argument("--export", type=_boolean, default=True, help="export the teacher encoder as a SavedModel")
    data = parser.add_argument_group("data (see keras_carp.data.load_source)")
    data.add_argument("--data-dir", default=None, help="TFDS data_dir, image folder, or Fashion-MNIST IDX folder")
    data.add_argument("--split", default="train", help="split to pretrain on (TFDS split string or subfolder)")
    data.add_argument("--eval-split", default="test", help="labelled split for k-NN queries ('' to skip k-NN)")
    data.add_argument("--download", type=_boolean, default=True, help="let TFDS download and prepare the dataset")
    data.add_argument("--min-image-size", type=int, default=None, help="smaller images are an error (0: upsample)")
    data.add_argument("--decode", choices=("once", "crop"), default="once", help="JPEG decoding per image or crop")
    data.add_argument("--cache", type=_boolean, default=False, help="cache encoded images in memory")
    data.add_argument("--antialias", type=_boolean, default=True, help="PIL-like filter on downscaled crops")
    training = parser.add_argument_group("training")
    training.add_argument("--gradient-accumulation-steps", type=int, default=1,
                          help="sum the gradients of N batches into one optimizer step (the learning rate scales "
                               "with batch x N; every batch draws its own partition)")  # fmt: skip
    training.add_argument("--encoder-init", choices=("torchvision", "keras"), default="torchvision",
                          help="torchvision: as the released code (Kaiming fan_out, zero last BN gamma per block); "
                               "keras: KerasHub's initialisers")  # fmt: skip
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


# Flags that may change between an interrupted run and its resumption (where and how, not what is trained).
RUN_CONTROL = ("output_dir", "data_dir", "download", "strategy", "tpu", "checkpoint_every_steps", "keep_checkpoints",
               "log_every_steps", "export", "cache", "decode")  # fmt: skip


def check_same_run(saved: dict, config: dict, out) -> None:
    """Refuse to resume a run directory with a different training configuration."""
    changed = sorted(k for k in set(saved) | set(config) if k not in RUN_CONTROL and saved.get(k) != config.get(k))
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in changed)
        raise SystemExit(
            f"carp-pretrain: {out} holds checkpoints of a run with a different configuration ({details}). "
            "Rerun with the same settings to resume it, or choose a new --output-dir."
        )


def _gfile():
    import tensorflow as tf  # run directories may be local or in a bucket (gs://): tf.io.gfile serves both

    return tf.io.gfile


def _join(directory: str, *names: str) -> str:
    return "/".join([directory.rstrip("/"), *names]) if "://" in directory else os.path.join(directory, *names)


def _read_text(path: str) -> str:
    with _gfile().GFile(path) as handle:
        return handle.read()


def truncate_csv_log(path: str, epochs_done: int) -> None:
    """Keep the CSV log's header and its first ``epochs_done`` epochs (rows past the checkpoint are redone)."""
    if not _gfile().exists(path):
        return
    lines = _read_text(path).splitlines(keepends=True)
    kept = [line for line in lines[1:] if line.split(",", 1)[0].strip().isdigit()][:epochs_done]
    from keras_carp.checkpoints import atomic_write_text

    atomic_write_text(path, "".join(lines[:1] + kept))


def prepare_output_dir(path: str | None, preset: str) -> str:
    """Create the run directory (local or gs://) and prove it is writable before any training."""
    out = str(path) if path else os.path.join("runs", preset)
    gfile = _gfile()
    if gfile.exists(out) and not gfile.isdir(out):
        raise SystemExit(f"carp-pretrain: the output directory {out} exists and is not a directory.")
    try:
        gfile.makedirs(out)
        probe = _join(out, ".write-test")
        with gfile.GFile(probe, "w") as handle:
            handle.write("ok")
        gfile.remove(probe)
    except Exception as error:  # OSError locally; tf.errors.OpError (not an OSError) from object stores
        raise SystemExit(f"carp-pretrain: cannot write to the output directory {out}: {error}") from None
    return out


def export_run_encoder(model, out: str) -> str:
    """The teacher encoder as a SavedModel in ``out/encoder`` (written locally, then copied to a bucket)."""
    target = _join(out, "encoder")
    if "://" not in out:
        model.export_encoder(target, overwrite=True)
        return target
    import tempfile

    gfile = _gfile()
    with tempfile.TemporaryDirectory() as staging:
        model.export_encoder(os.path.join(staging, "encoder"), overwrite=True)
        if gfile.exists(target):
            gfile.rmtree(target)
        for folder, _, files in os.walk(os.path.join(staging, "encoder")):
            relative = os.path.relpath(folder, os.path.join(staging, "encoder"))
            destination = target if relative == "." else _join(target, *relative.split(os.sep))
            gfile.makedirs(destination)
            for name in files:
                gfile.copy(os.path.join(folder, name), _join(destination, name), overwrite=True)
    return target


def run(config: dict) -> dict:
    """Pretrain (resuming from the run directory's newest checkpoint), evaluate, save, export; returns the summary."""
    import keras
    import numpy as np

    import keras_carp
    from keras_carp.checkpoints import (
        NonFiniteLossError,
        RunCheckpoint,
        atomic_save_model,
        atomic_write_text,
        check_free_space,
        checkpoint_bytes,
        latest_checkpoint,
    )
    from keras_carp.data import (
        MultiCropAugmentation,
        SkippedImagesLogger,
        eval_dataset,
        load_source,
        multicrop_dataset,
        steps_per_epoch,
    )
    from keras_carp.distribute import check_global_batch, setup_distribution
    from keras_carp.evaluation import CollapseMonitor, KNNMonitor, knn_accuracy
    from keras_carp.optimizers import batch_counter

    out = prepare_output_dir(config["output_dir"], config["preset"])
    checkpoint_dir = _join(out, "checkpoints")
    resume = latest_checkpoint(checkpoint_dir)
    if resume is not None and _gfile().exists(_join(out, "config.json")):
        check_same_run(json.loads(_read_text(_join(out, "config.json"))), config, out)
    for key in ("checkpoint_every_steps", "log_every_steps"):
        if config[key] < 0:
            raise SystemExit(f"carp-pretrain: --{key.replace('_', '-')} must be >= 0, got {config[key]}.")
    if config["keep_checkpoints"] < 1:
        raise SystemExit(f"carp-pretrain: --keep-checkpoints must be >= 1, got {config['keep_checkpoints']}.")
    accumulation = config["gradient_accumulation_steps"]
    if accumulation < 1:
        raise SystemExit(f"carp-pretrain: --gradient-accumulation-steps must be >= 1, got {accumulation}.")
    keras.utils.set_random_seed(config["seed"])
    augmentation = MultiCropAugmentation(
        global_size=config["global_size"],
        local_size=config["local_size"],
        num_local_crops=config["num_local_crops"],
        global_scale=tuple(config["global_scale"]),
        local_scale=tuple(config["local_scale"]),
        blur_sigma=tuple(config["blur_sigma"]),
        antialias=config["antialias"],
        # Presets may set these too (the recipe's values otherwise); a preset's keys become flags.
        **{key: tuple(config[key]) if isinstance(config[key], list) else config[key]
           for key in ("blur_probability", "solarize_probability", "jitter_probability", "grayscale_probability")
           if key in config},
    )  # fmt: skip

    # Every data problem (unknown name, missing files, small images, empty folder) surfaces here, before training.
    def source(split: str):
        return load_source(config["dataset"], split, config["data_dir"], config.get("image_size"),
                           download=config["download"], seed=config["seed"])  # fmt: skip

    try:
        distribution = setup_distribution(config["strategy"], config["tpu"])
        check_global_batch(config["batch_size"], distribution.replicas)
    except ValueError as error:
        raise SystemExit(f"carp-pretrain: {error}") from None
    accumulated = f" x {accumulation} accumulated per optimizer step" if accumulation > 1 else ""
    print(f"carp-pretrain: {distribution.description}, global batch {config['batch_size']}{accumulated}")
    if distribution.dtype_policy:
        keras.config.set_dtype_policy(distribution.dtype_policy)

    def pipeline(start_step: int, input_context=None):
        return multicrop_dataset(
            train_source,
            augmentation,
            config["batch_size"],  # global; with an input context each host makes its replicas' share
            seed=config["seed"],
            cache=config["cache"],
            decode=config["decode"],
            min_image_size=config["min_image_size"],
            input_context=input_context,
            epochs=config["epochs"],
            start_step=start_step,
        )

    built = {}

    def distributed(start_step: int):
        if distribution.per_host_input:  # TPU and multi-worker: every host reads its own shard
            return distribution.strategy.distribute_datasets_from_function(lambda ctx: pipeline(start_step, ctx))
        return built.pop(start_step, None) or pipeline(start_step)

    try:
        train_source = source(config["split"])
        # Checks the data against the recipe before anything is built (and is the first leg's dataset).
        run_steps = steps_per_epoch(train_source.num_examples, config["batch_size"]) * config["epochs"]
        first_start = resume.step if resume is not None and resume.step < run_steps else 0
        built[first_start] = pipeline(first_start)
        eval_source = source(config["eval_split"]) if config["eval_split"] and train_source.has_labels else None
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        raise SystemExit(f"carp-pretrain: {error}") from None
    logging.getLogger("keras_carp").info("pretraining on %r", train_source)
    epoch_steps = steps_per_epoch(train_source.num_examples, config["batch_size"])
    total_steps = epoch_steps * config["epochs"]
    if total_steps % accumulation:  # groups run across epoch boundaries; a last incomplete one is never applied
        logging.getLogger("keras_carp").warning(
            "%d batches is not a multiple of --gradient-accumulation-steps %d: the last %d batches' gradients "
            "are not applied.", total_steps, accumulation, total_steps % accumulation)  # fmt: skip
    if resume is not None and resume.steps_per_epoch != epoch_steps:
        raise SystemExit(f"carp-pretrain: {resume.path} was written with {resume.steps_per_epoch} steps per epoch, "
                         f"this dataset gives {epoch_steps}; the data changed. Choose a new --output-dir.")  # fmt: skip
    with distribution.scope():  # the model, its optimizer and their variables live on every replica
        try:  # invalid hyperparameters stop here, before any feature extraction or training
            head = keras_carp.CARPHead(
                num_prototypes=config["num_prototypes"],
                hidden_dim=config["hidden_dim"],
                bottleneck_dim=config["bottleneck_dim"],
            )
            model = keras_carp.CARP(
                keras_carp.build_encoder(config["backbone"], init=config["encoder_init"]),
                head,
                block_size=config["block_size"],
                partition=config["partition"],
                seed=config["seed"],
            )
            # Schedules run per batch, as released; the rate scales with the batch of one optimizer step.
            schedule = keras_carp.WarmupCosineDecay(
                base_learning_rate=config["base_learning_rate"],
                global_batch_size=config["batch_size"] * accumulation,
                total_steps=total_steps,
                warmup_steps=config["warmup_epochs"] * epoch_steps,
                min_learning_rate=config["min_learning_rate"],
            )
            optimizer = keras_carp.LARS(
                schedule, weight_decay=config["weight_decay"], gradient_accumulation_steps=accumulation
            )
            teacher_ema = keras_carp.TeacherEMA(
                config["base_teacher_momentum"], config["final_teacher_momentum"], total_steps=total_steps
            )
            model.compile(optimizer=optimizer)
        except ValueError as error:
            raise SystemExit(f"carp-pretrain: {error}") from None
    # Checkpoints, the final model and the SavedModel (about one encoder) must fit before the first step.
    try:
        encoder_bytes = checkpoint_bytes(model.teacher_encoder) // 2
        required = (config["keep_checkpoints"] + 2) * checkpoint_bytes(model) + encoder_bytes
        check_free_space(out, required)
    except OSError as error:
        raise SystemExit(f"carp-pretrain: {error}") from None
    atomic_write_text(_join(out, "config.json"), json.dumps(config, indent=2))

    size, crop_fraction = config["global_size"], config.get("eval_crop_fraction", 1.0)
    bank = eval_dataset(train_source, size, crop_fraction=crop_fraction) if eval_source else None
    queries = eval_dataset(eval_source, size, crop_fraction=crop_fraction) if eval_source else None
    num_classes = len(train_source.class_names) if eval_source else None
    knn_settings = dict(k=config["knn_k"], temperature=config["knn_temperature"], num_classes=num_classes)

    def knn(encoder) -> dict | None:
        return knn_accuracy(encoder, bank, queries, **knn_settings) if eval_source is not None else None

    random_init_path = _join(out, "knn_random_init.json")  # measured once, before the first step
    if _gfile().exists(random_init_path):
        random_init = json.loads(_read_text(random_init_path))
    else:
        random_init = knn(model.teacher_encoder)
        atomic_write_text(random_init_path, json.dumps(random_init))

    start_step = 0
    if resume is not None:
        with distribution.scope():
            model.optimizer.build(model.trainable_variables)
            model.load_weights(resume.path)
        start_step = int(keras.ops.convert_to_numpy(batch_counter(model.optimizer)))
        if start_step != resume.step:
            raise SystemExit(f"carp-pretrain: {resume.path} holds step {start_step}, its record says {resume.step}.")
        print(f"carp-pretrain: resuming from {resume.path} (step {start_step} of {total_steps}, "
              f"epoch {resume.epoch + 1}, step {resume.step_in_epoch} of {epoch_steps} in it)")  # fmt: skip
        truncate_csv_log(_join(out, "training_log.csv"), resume.epoch)

    monitors = []
    if eval_source is not None and config.get("knn_every", 0) > 0:
        monitors.append(KNNMonitor(bank, queries, config["knn_every"], **knn_settings))
    probe = eval_dataset(train_source, size, batch_size=256, crop_fraction=crop_fraction).take(2)
    probe_images = np.concatenate([batch[0] if isinstance(batch, tuple) else batch for batch in probe])
    monitors.append(CollapseMonitor(probe_images))
    checkpointer = RunCheckpoint(checkpoint_dir, epoch_steps, config["checkpoint_every_steps"],
                                 config["keep_checkpoints"], resume=resume)  # fmt: skip
    callbacks = [
        teacher_ema,
        SkippedImagesLogger(train_source),
        *monitors,  # before the loggers, which record what monitors add to the epoch logs
        keras_carp.RunCSVLogger(_join(out, "training_log.csv"), append=True),
        keras_carp.StepTensorBoard(_join(out, "logs"), update_freq=config["log_every_steps"] or "epoch"),
        checkpointer,  # last: an epoch is saved once it is logged; a NaN stops before it is saved
    ]
    # An interrupted epoch is finished on its own, then the remaining epochs run as usual.
    first_epoch, done_in_epoch = divmod(start_step, epoch_steps)
    legs = []
    if done_in_epoch:
        legs.append((first_epoch, first_epoch + 1, epoch_steps - done_in_epoch))
        first_epoch += 1
    if first_epoch < config["epochs"]:
        legs.append((first_epoch, config["epochs"], epoch_steps))
    started, losses = time.time(), []
    try:
        for initial_epoch, end_epoch, steps in legs:
            leg_start = initial_epoch * epoch_steps + (epoch_steps - steps)
            history = model.fit(distributed(leg_start), initial_epoch=initial_epoch, epochs=end_epoch,
                                steps_per_epoch=steps, callbacks=callbacks)  # fmt: skip
            losses += history.history["loss"]
    except NonFiniteLossError as error:
        raise SystemExit(f"\ncarp-pretrain: {error} Lower --base-learning-rate or check the data, then rerun the "
                         "same command to continue from that checkpoint.") from None  # fmt: skip
    except OSError as error:  # e.g. the disk filled up while writing a checkpoint
        raise SystemExit(f"carp-pretrain: {error}") from None
    train_seconds = time.time() - started
    knn_monitor = monitors[0] if isinstance(monitors[0], KNNMonitor) else None
    learned = knn_monitor.history.get(config["epochs"]) if knn_monitor else None
    learned = learned or knn(model.teacher_encoder)
    atomic_save_model(model, _join(out, "model.keras"))
    encoder_path = export_run_encoder(model, out) if config["export"] else None
    summary = {
        "preset": config["preset"],
        "dataset": train_source.name,
        "backend": keras.backend.backend(),
        "distribution": distribution.description,
        "train_images": train_source.num_examples,
        "skipped_images": train_source.skipped.count,
        "steps": total_steps,
        "gradient_accumulation_steps": accumulation,
        "resumed_from_step": start_step if resume is not None else None,
        "train_seconds": round(train_seconds, 1),
        "final_loss": float(losses[-1]) if losses else None,
        "output_dir": out,
        "encoder": encoder_path,
    }
    if learned is not None:
        summary.update(
            knn_top1=learned["top1"],
            knn_top5=learned["top5"],
            knn_top1_random_init=random_init["top1"],
            knn_top5_random_init=random_init["top5"],
            knn_k=config["knn_k"],
            eval_split=config["eval_split"],
            num_classes=num_classes,
        )
    atomic_write_text(_join(out, "summary.json"), json.dumps(summary, indent=2))
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
