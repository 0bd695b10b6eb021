"""carp-export: ship a trained encoder as a TensorFlow SavedModel and/or a KerasHub preset.

    carp-export runs/fashion/model.keras exported/fashion_encoder
    carp-export model.keras encoder_sm --encoder student --embedding true --assignments true
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

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from training.cli import CommandConfig, option, parse, quiet_startup_logs

SERVING = "SavedModel serving signature"
RENAMED = {"--no-resize": "--resize false"}  # earlier spelling -> the one of every boolean flag


@dataclass(kw_only=True)
class ServingOptions(CommandConfig):
    """The SavedModel options shared by carp-export and carp-convert."""

    image_size: int | None = option(
        None, "centre crop fed to the encoder (default: the run's global_size, else 224)", group=SERVING
    )
    crop_fraction: float | None = option(
        None, "first resize the shorter side to image_size / crop_fraction (224/256)", group=SERVING
    )
    resize: bool = option(True, "resize and centre-crop (false: images at their own size, scaled + normalised)",
                          group=SERVING)  # fmt: skip
    mean: tuple[float, float, float] | None = option(
        None, "per-channel mean of [0, 1] RGB (default: ImageNet's)", group=SERVING
    )
    std: tuple[float, float, float] | None = option(None, "per-channel std (default: ImageNet's)", group=SERVING)
    embedding: bool = option(False, "also return the head's bottleneck embedding", group=SERVING)
    assignments: bool = option(False, "also return the closest prototype's index", group=SERVING)
    overwrite: bool = option(False, "replace existing outputs")

    def validate(self) -> None:
        self.positive("image_size", "std")
        self.fraction("crop_fraction")


@dataclass(kw_only=True)
class ExportConfig(ServingOptions):
    """carp-export's options: one flag (or positional argument) per field."""

    model: str = option(help=".keras file (CARP model or encoder)", positional=True)
    output: str | None = option(
        None, "SavedModel folder to write (may be left out with --keras-hub-preset)", positional=True
    )
    encoder: str = option("teacher", "the CARP model's encoder to export", ("teacher", "student"))
    keras_hub_preset: str | None = option(
        None, "also (or only) write the backbone + ImageConverter as a KerasHub preset", metavar="DIR"
    )

    def validate(self) -> None:
        super().validate()
        self.require(
            self.output is not None or self.keras_hub_preset is not None,
            "give an OUTPUT SavedModel folder, --keras-hub-preset DIR, or both",
        )


def serving_preprocessing(args: ServingOptions, model_path: str):
    """A ``ServingPreprocessing`` from the options (run defaults as carp-eval's)."""
    from keras_carp.export import ServingPreprocessing
    from keras_carp.imagenet import IMAGENET_MEAN, IMAGENET_STD
    from training.evaluation import eval_preprocessing

    image_size, crop_fraction = eval_preprocessing(model_path, args.image_size, args.crop_fraction)
    return ServingPreprocessing(
        image_size=image_size if args.resize else None,
        crop_fraction=crop_fraction,
        mean=tuple(args.mean or IMAGENET_MEAN),
        std=tuple(args.std or IMAGENET_STD),
    )


def parse_config(argv: list[str] | None = None) -> ExportConfig:
    """carp-export's command line as an ``ExportConfig``; bad values stop here in one line (exit status 2)."""
    return parse(ExportConfig, argv, "carp-export", __doc__.splitlines()[0], renamed=RENAMED)


parse_args = parse_config  # earlier name


def export(args: ExportConfig) -> dict:
    """Write the SavedModel and/or KerasHub preset of ``args.model``; ``{"saved_model": path, "keras_hub_preset":
    path}`` for those written. Run it in a TensorFlow-backend process (carp-export sets KERAS_BACKEND)."""
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
    written = {}
    try:
        if args.keras_hub_preset is not None:  # first: it fails early on a backbone KerasHub cannot rebuild
            from keras_carp.hub_preset import export_keras_hub_preset

            preset = export_keras_hub_preset(model, args.keras_hub_preset, image_size=preprocessing.image_size,
                                             crop_fraction=preprocessing.crop_fraction, mean=preprocessing.mean,
                                             std=preprocessing.std, encoder=args.encoder,
                                             overwrite=args.overwrite)  # fmt: skip
            print(f"KerasHub preset written to {preset}: {describe_preset(preset)}")
            written["keras_hub_preset"] = preset
        if args.output is not None:
            path = export_encoder(model, args.output, encoder=args.encoder, preprocessing=preprocessing,
                                  include_embedding=args.embedding, include_assignments=args.assignments,
                                  overwrite=args.overwrite)  # fmt: skip
            print(f"SavedModel written to {path}: {describe_saved_model(path)}")
            written["saved_model"] = path
    except (ValueError, TypeError) as error:
        raise SystemExit(f"carp-export: {error}") from None
    return written


def main(argv: list[str] | None = None) -> int:
    args = parse_config(argv)
    os.environ["KERAS_BACKEND"] = "tensorflow"  # .keras files are backend-agnostic; SavedModels are TensorFlow's
    quiet_startup_logs()
    export(args)
    return 0


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
