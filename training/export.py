"""carp-export: ship a trained encoder as a TensorFlow SavedModel and/or a KerasHub preset.

    carp-export runs/fashion/model.keras exported/fashion_encoder
    carp-export model.keras encoder_sm --encoder student --embedding --assignments
    carp-export model.keras encoder_sm --image-size 224 --crop-fraction 0.875
    carp-export model.keras --keras-hub-preset carp_resnet50_preset

``MODEL`` is a ``.keras`` file written on any backend (a CARP model, or a bare
encoder). The SavedModel's ``serving_default`` takes uint8 images and does the
resize / centre crop / normalisation inside; ``serve_normalized`` takes
float32 images already preprocessed. It loads with ``tf.saved_model.load``
without Keras or keras_carp. ``--keras-hub-preset DIR`` writes the encoder's
KerasHub backbone and an ImageConverter (resize to ``--image-size``, the same
normalisation) with ``save_to_preset``, for ``keras_hub.models.Backbone.from_preset``
and ``keras_hub.models.ImageClassifier.from_preset``. Release checkpoints (.pth)
go through carp-convert.
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
    parser.add_argument(
        "output", nargs="?", help="SavedModel folder to write (may be left out with --keras-hub-preset)"
    )
    parser.add_argument("--encoder", choices=("teacher", "student"), default="teacher")
    parser.add_argument("--keras-hub-preset", metavar="DIR", default=None,
                        help="also (or only) write the backbone + ImageConverter as a KerasHub preset")  # fmt: skip
    add_serving_arguments(parser)
    args = parser.parse_args(argv)
    if args.output is None and args.keras_hub_preset is None:
        parser.error("give an OUTPUT SavedModel folder, --keras-hub-preset DIR, or both.")
    return args


def main(argv: list[str] | None = None) -> None:
    os.environ["KERAS_BACKEND"] = "tensorflow"  # .keras files are backend-agnostic; SavedModels are TensorFlow's
    args = parse_args(argv)
    import keras

    import keras_carp  # noqa: F401  (registers the classes the .keras file names)
    from keras_carp.export import check_output_path, export_encoder

    try:
        preprocessing = serving_preprocessing(args, args.model)
        for output in (args.output, args.keras_hub_preset):
            if output is not None:
                check_output_path(output, args.overwrite)
    except (ValueError, OSError) as error:
        raise SystemExit(f"carp-export: {error}") from None
    if not Path(args.model).is_file():
        raise SystemExit(f"carp-export: no model at {args.model} (expected a .keras file).")
    model = keras.saving.load_model(args.model, compile=False)
    try:
        if args.keras_hub_preset is not None:  # first: it fails early on a backbone KerasHub cannot rebuild
            from keras_carp.hub_preset import export_keras_hub_preset

            preset = export_keras_hub_preset(model, args.keras_hub_preset, image_size=preprocessing.image_size,
                                             crop_fraction=preprocessing.crop_fraction, mean=preprocessing.mean,
                                             std=preprocessing.std, encoder=args.encoder,
                                             overwrite=args.overwrite)  # fmt: skip
            print(f"KerasHub preset written to {preset}: {describe_preset(preset)}")
        if args.output is not None:
            path = export_encoder(model, args.output, encoder=args.encoder, preprocessing=preprocessing,
                                  include_embedding=args.embedding, include_assignments=args.assignments,
                                  overwrite=args.overwrite)  # fmt: skip
            print(f"SavedModel written to {path}: {describe_saved_model(path)}")
    except (ValueError, TypeError) as error:
        raise SystemExit(f"carp-export: {error}") from None


def describe_saved_model(path) -> str:
    import json

    from keras_carp.export import METADATA_FILE

    meta = json.loads((Path(path) / METADATA_FILE).read_text())
    size = meta["preprocessing"]["image_size"]
    resize = f"centre crop {size} px" if size else "images at their own size"
    return f"{meta['encoder']} encoder, {meta['feature_dim']}-d features, outputs {meta['outputs']}, {resize}"


def describe_preset(path) -> str:
    import json

    from keras_carp.hub_preset import PRESET_METADATA_FILE

    meta = json.loads((Path(path) / PRESET_METADATA_FILE).read_text())
    settings = meta["preprocessing"]
    resize = f"resizes to {settings['image_size']} px" if settings["image_size"] else "keeps the images' size"
    if not meta["centre_crop_in_converter"]:
        resize += f" (centre-crop {settings['crop_fraction']:.4g} of the shorter side first: the converter does not)"
    return f"{meta['encoder']} {meta['backbone_class']}, {meta['image_converter_class']} {resize}"


if __name__ == "__main__":
    sys.exit(main())
