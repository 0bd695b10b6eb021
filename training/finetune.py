"""carp-finetune: fine-tune a pretrained encoder and a linear head on 1 % or 10 % of the labels.

    carp-finetune --model runs/fashion/model.keras --dataset fashion_mnist --label-fraction 0.01
    carp-finetune --model random:resnet18_small_images --dataset fashion_mnist --label-fraction 0.1   # baseline
    carp-finetune --model runs/in1k/model.keras --dataset imagenet2012 --test-split validation --label-fraction 0.1

``--model`` is a ``.keras`` file (a CARP model: its teacher encoder by default,
or any Keras encoder) or ``random:BACKBONE`` for an untrained encoder (the
baseline). The protocol's defaults (encoder lr 0.002, head lr 0.5, SGD momentum
0.9, x0.2 at epochs 12 and 16, 20 epochs) are ``keras_carp.finetune``'s.
ImageNet takes TFDS ``imagenet2012_subset``; other datasets a class-balanced
draw from ``--seed``. Results print and go to ``--output`` as JSON.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from training.cli import CommandConfig, option, parse, quiet_startup_logs
from training.evaluation import writable_file


@dataclass(kw_only=True)
class FinetuneConfig(CommandConfig):
    """carp-finetune's options: one flag per field; the protocol's defaults are ``keras_carp.finetune``'s."""

    model: str = option(help=".keras file, or random:BACKBONE for an untrained encoder")
    encoder: str = option("teacher", "the CARP model's encoder to fine-tune", ("teacher", "student"))
    dataset: str = option("digits", "as carp-pretrain --dataset")
    data_dir: str | None = option(None, "TFDS data_dir, image folder, or Fashion-MNIST IDX folder")
    train_split: str = option("train", "split the labelled fraction is drawn from")
    test_split: str = option("test", "split the fine-tuned classifier is scored on")
    label_fraction: float = option(0.01, "fraction of the training labels, in (0, 1]: 0.01 (1 %) or 0.1 (10 %)")
    image_size: int | None = option(None, "image side (default: the run's global_size, else 224)")
    crop_fraction: float | None = option(None, "test centre crop (224/256 for ImageNet)")
    crop_scale: tuple[float, float] = option(
        (0.08, 1.0), "train-time random resized crop's area range", metavar=("LOW", "HIGH")
    )
    epochs: int = option(20, "fine-tuning epochs")
    steps_per_epoch: int | None = option(None, "optimizer steps per epoch (default: ceil(labelled images / batch))")
    batch_size: int = option(256, "images per step")
    encoder_lr: float = option(0.002, "the encoder's SGD learning rate")
    head_lr: float = option(0.5, "the linear head's SGD learning rate")
    momentum: float = option(0.9, "SGD momentum")
    milestones: tuple[int, ...] = option((12, 16), "epochs at which the learning rates drop", nargs="*")
    lr_factor: float = option(0.2, "learning-rate factor at each milestone")
    output: str | None = option(None, "JSON results (default: next to the model)")
    seed: int = option(0, "the label draw, the augmentation and the head's init")
    verbose: int = option(2, "as Keras fit's verbose", (0, 1, 2))

    def validate(self) -> None:
        fraction = self.label_fraction
        self.require(
            isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0,
            f"--label-fraction: the label fraction must be in (0, 1] (0.01 for 1 %), got {fraction}",
        )
        self.positive("epochs", "batch_size", "steps_per_epoch", "image_size", "encoder_lr", "head_lr", "lr_factor")
        low, high = self.crop_scale
        self.require(0 < low <= high <= 1, f"--crop-scale must be 0 < LOW <= HIGH <= 1, got {list(self.crop_scale)}")
        self.fraction("crop_fraction")
        self.require(self.momentum >= 0, f"--momentum must be >= 0, got {self.momentum}")
        self.require(all(m >= 0 for m in self.milestones), f"--milestones must be epochs >= 0, got {self.milestones}")


def parse_config(argv: list[str] | None = None) -> FinetuneConfig:
    """carp-finetune's command line as a ``FinetuneConfig``; bad values stop here in one line (exit status 2)."""
    return parse(FinetuneConfig, argv, "carp-finetune", __doc__.splitlines()[0])


parse_args = parse_config  # earlier name


def load_encoder(path: str, which: str = "teacher"):
    """A trainable Keras encoder: ``random:BACKBONE`` (untrained) or a .keras file (CARP -> teacher/student)."""
    if path.startswith("random:"):
        from keras_carp import build_encoder

        try:
            return build_encoder(path.split(":", 1)[1])
        except ValueError as error:
            raise SystemExit(f"carp-finetune: {error}") from None
    if path == "pixels":
        raise SystemExit("carp-finetune: 'pixels' has no weights to fine-tune; pass a .keras file or random:BACKBONE.")
    location = Path(path)
    if location.is_dir():
        raise SystemExit(
            f"carp-finetune: {location} is a folder; fine-tuning needs the .keras file (SavedModels do not train)."
        )
    if not location.is_file():
        raise SystemExit(f"carp-finetune: no model at {location} (expected a .keras file or random:BACKBONE).")
    from training.evaluation import load_encoder as load_keras_encoder

    try:
        return load_keras_encoder(path, which)
    except (ValueError, OSError) as error:
        raise SystemExit(f"carp-finetune: cannot load {location}: {error}") from None


def open_sources(args: FinetuneConfig, image_size: int) -> dict:
    """``{"train": the labelled fraction, "test": the test split}``; every data problem stops here."""
    from keras_carp import finetune as protocol
    from keras_carp.data import load_source

    try:
        sources = {role: load_source(args.dataset, split, args.data_dir, image_size=image_size)
                   for role, split in (("train", args.train_split), ("test", args.test_split))}  # fmt: skip
        for source in sources.values():
            if not source.has_labels:
                raise SystemExit(f"carp-finetune: {source.name} has no labels; fine-tuning needs them.")
        sources["full_train"] = sources["train"]
        sources["train"] = protocol.label_fraction_subset(sources["train"], args.label_fraction, args.seed)
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        raise SystemExit(f"carp-finetune: {error}") from None
    return sources


def writable_output(args: FinetuneConfig) -> Path:
    """The results file, its folder proven writable (without leaving a file behind)."""
    name = f"finetune_{100 * args.label_fraction:g}pct.json"
    if args.output:
        output = Path(args.output)
    elif args.model.startswith("random:"):
        output = Path(f"finetune_{args.model.split(':', 1)[1]}_{name[len('finetune_') :]}")
    else:
        output = Path(args.model).parent / name
    return writable_file(output, "carp-finetune")


def finetune(args: FinetuneConfig) -> dict:
    """Open the data, load the encoder, fine-tune, evaluate; write and return the results."""
    import keras

    from keras_carp import finetune as protocol
    from keras_carp.data import classification_dataset, eval_dataset
    from training.evaluation import eval_preprocessing

    model_path = "pixels" if args.model.startswith("random:") else args.model  # no config.json to read
    image_size, crop_fraction = eval_preprocessing(model_path, args.image_size, args.crop_fraction)
    sources = open_sources(args, image_size)
    output = writable_output(args)
    keras.utils.set_random_seed(args.seed)
    encoder = load_encoder(args.model, args.encoder)
    labelled = sources["train"]
    batch_size = min(args.batch_size, labelled.num_examples)
    steps = args.steps_per_epoch or math.ceil(labelled.num_examples / batch_size)
    print(f"fine-tuning on {labelled.name}: {labelled.num_examples} images, {steps} steps of {batch_size} per epoch")
    train_data = classification_dataset(labelled, image_size, batch_size, scale=tuple(args.crop_scale), seed=args.seed)
    test_data = eval_dataset(sources["test"], image_size, args.batch_size, crop_fraction=crop_fraction)
    started = time.time()
    _, scores = protocol.finetune(
        encoder, train_data, test_data, len(sources["full_train"].class_names), steps,
        epochs=args.epochs, encoder_learning_rate=args.encoder_lr, head_learning_rate=args.head_lr,
        momentum=args.momentum, milestones=args.milestones, factor=args.lr_factor, verbose=args.verbose,
    )  # fmt: skip
    results = {
        "model": args.model,
        "encoder": args.encoder,
        "dataset": args.dataset,
        "train_split": args.train_split,
        "test_split": args.test_split,
        "label_fraction": args.label_fraction,
        "labelled_images": labelled.num_examples,
        "seed": args.seed,
        "image_size": image_size,
        "crop_fraction": crop_fraction,
        "crop_scale": list(args.crop_scale),
        "epochs": args.epochs,
        "steps_per_epoch": steps,
        "batch_size": batch_size,
        "encoder_lr": args.encoder_lr,
        "head_lr": args.head_lr,
        "momentum": args.momentum,
        "milestones": list(args.milestones),
        "lr_factor": args.lr_factor,
        "backend": keras.backend.backend(),
        **scores,
        "seconds": round(time.time() - started, 1),
    }
    output.write_text(json.dumps(results, indent=2))
    results["output"] = str(output)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_config(argv)
    quiet_startup_logs()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    results = finetune(args)
    print(
        f"\n{args.model} ({args.encoder} encoder) fine-tuned on {100 * args.label_fraction:g} % of {args.dataset} "
        f"{args.train_split} ({results['labelled_images']} images), {args.test_split}: "
        f"top-1 {results['top1']:.2f}  top-5 {results['top5']:.2f}"
    )
    print(f"results in {results['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
