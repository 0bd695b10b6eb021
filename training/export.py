"""carp-export: ship a trained encoder as a TensorFlow SavedModel.

    carp-export runs/fashion/model.keras exported/fashion_encoder
    carp-export model.keras encoder_sm --encoder student --embedding --assignments
    carp-export model.keras encoder_sm --image-size 224 --crop-fraction 0.875

``MODEL`` is a ``.keras`` file written on any backend (a CARP model, or a bare
encoder). The SavedModel's ``serving_default`` takes uint8 images and does the
resize / centre crop / normalisation inside; ``serve_normalized`` takes
float32 images already preprocessed. It loads with ``tf.saved_model.load``
without Keras or keras_carp. Release checkpoints (.pth) go through carp-convert.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_serving_arguments(parser: argparse.ArgumentParser) -> None:
    """The SavedModel options shared by carp-export and carp-convert."""
    group = parser.add_argument_group("SavedModel serving signature")
    group.add_argument("--image-size", type=int, default=None,
                       help="centre crop fed to the encoder (default: the run's global_size, else 224)")  # fmt: skip
    group.add_argument("--crop-fraction", type=float, default=None,
                       help="first resize the shorter side to image_size / crop_fraction (224/256)")  # fmt: skip
    group.add_argument("--no-resize", action="store_true", help="feed images at their own size (scale + normalise)")
    group.add_argument("--mean", type=float, nargs=3, default=None, help="per-channel mean of [0, 1] RGB (ImageNet)")
    group.add_argument("--std", type=float, nargs=3, default=None, help="per-channel std (ImageNet)")
    group.add_argument("--embedding", action="store_true", help="also return the head's bottleneck embedding")
    group.add_argument("--assignments", action="store_true", help="also return the closest prototype's index")
    group.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def serving_preprocessing(args: argparse.Namespace, model_path: str):
    """A ``ServingPreprocessing`` from the command line (run defaults as carp-eval's)."""
    from keras_carp.export import ServingPreprocessing
    from keras_carp.imagenet import IMAGENET_MEAN, IMAGENET_STD
    from training.evaluation import eval_preprocessing

    image_size, crop_fraction = eval_preprocessing(model_path, args.image_size, args.crop_fraction)
    return ServingPreprocessing(
        image_size=None if args.no_resize else image_size,
        crop_fraction=crop_fraction,
        mean=tuple(args.mean or IMAGENET_MEAN),
        std=tuple(args.std or IMAGENET_STD),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="carp-export", description=__doc__.splitlines()[0])
    parser.add_argument("model", help=".keras file (CARP model or encoder)")
    parser.add_argument("output", help="SavedModel folder to write")
    parser.add_argument("--encoder", choices=("teacher", "student"), default="teacher")
    add_serving_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    os.environ["KERAS_BACKEND"] = "tensorflow"  # .keras files are backend-agnostic; SavedModels are TensorFlow's
    args = parse_args(argv)
    import keras

    import keras_carp  # noqa: F401  (registers the classes the .keras file names)
    from keras_carp.export import check_output_path, export_encoder

    try:
        preprocessing = serving_preprocessing(args, args.model)
        check_output_path(args.output, args.overwrite)
    except (ValueError, OSError) as error:
        raise SystemExit(f"carp-export: {error}") from None
    if not Path(args.model).is_file():
        raise SystemExit(f"carp-export: no model at {args.model} (expected a .keras file).")
    model = keras.saving.load_model(args.model, compile=False)
    try:
        path = export_encoder(model, args.output, encoder=args.encoder, preprocessing=preprocessing,
                              include_embedding=args.embedding, include_assignments=args.assignments,
                              overwrite=args.overwrite)  # fmt: skip
    except (ValueError, TypeError) as error:
        raise SystemExit(f"carp-export: {error}") from None
    print(f"SavedModel written to {path}: {describe_saved_model(path)}")


def describe_saved_model(path) -> str:
    import json

    from keras_carp.export import METADATA_FILE

    meta = json.loads((Path(path) / METADATA_FILE).read_text())
    size = meta["preprocessing"]["image_size"]
    resize = f"centre crop {size} px" if size else "images at their own size"
    return f"{meta['encoder']} encoder, {meta['feature_dim']}-d features, outputs {meta['outputs']}, {resize}"


if __name__ == "__main__":
    sys.exit(main())
