"""Ship a trained backbone as a KerasHub preset, with an ``ImageConverter`` doing the evaluation normalisation.

A preset is a folder KerasHub reads back without keras_carp:
``keras_hub.models.Backbone.from_preset(DIR)`` rebuilds the backbone with the
trained weights and ``keras_hub.models.ImageClassifier.from_preset(DIR,
num_classes=...)`` puts a fresh classification head and the image converter
around it. ``keras_hub.upload_preset`` publishes the folder on Kaggle or
Hugging Face.

The converter resizes the images to ``image_size`` x ``image_size`` (bilinear,
antialiased, after cutting the largest centred square: KerasHub's
``crop_to_aspect_ratio``) and maps [0, 255] pixels to ``(x / 255 - mean) / std``
(``scale = 1 / (255 * std)``, ``offset = -mean / std``). That is
``keras_carp.data.eval_dataset``'s preprocessing for square images and
``crop_fraction=1``. A converter has no setting that drops a border, so the
ImageNet-style centre crop (``crop_fraction < 1``) is not in it: the fraction is
recorded in ``keras_carp_preset.json`` beside the preset's files.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import shutil
import warnings
from pathlib import Path

import keras
import keras_hub
import numpy as np

from keras_carp.export import ServingPreprocessing, check_output_path, select_networks
from keras_carp.imagenet import IMAGENET_MEAN, IMAGENET_STD
from keras_carp.keras_internals import flatten_layers

PRESET_METADATA_FILE = "keras_carp_preset.json"


def find_keras_hub_backbone(encoder: keras.Model) -> keras_hub.models.Backbone:
    """The ``keras_hub.models.Backbone`` inside ``encoder`` (or ``encoder`` itself when it is one).

    Raises a ``TypeError`` naming what the encoder holds instead when no layer
    is a KerasHub ``Backbone``, and a ``ValueError`` when several (not nested in
    one another) are.
    """
    found = [layer for layer in flatten_layers(encoder) if isinstance(layer, keras_hub.models.Backbone)]
    nested = {id(inner) for outer in found for inner in flatten_layers(outer, include_self=False)}
    outermost = [layer for layer in found if id(layer) not in nested]
    if len(outermost) == 1:
        return outermost[0]
    if outermost:
        names = ", ".join(f"{layer.name} ({type(layer).__name__})" for layer in outermost)
        raise ValueError(f"{encoder.name} holds several KerasHub backbones ({names}); a preset holds one.")
    models = [layer for layer in getattr(encoder, "layers", []) if isinstance(layer, keras.Model)]
    held = ", ".join(f"{layer.name} ({type(layer).__module__}.{type(layer).__name__})" for layer in models)
    raise TypeError(
        f"{encoder.name} has no keras_hub.models.Backbone layer"
        + (f" (its backbone is {held})" if held else "")
        + ". A KerasHub preset stores a Backbone subclass's config and weights, which Backbone.from_preset "
        "rebuilds; a plain keras.Model (such as the '*_small_images' ResNets) has no Backbone class to rebuild. "
        "Build the encoder on a KerasHub backbone ('resnet_tiny', 'resnet18', 'resnet50', or a keras_hub "
        "Backbone passed to build_encoder), or ship this one with export_encoder (SavedModel) or model.save (.keras)."
    )


def image_converter_class(backbone: keras.Model) -> type:
    """KerasHub's ``ImageConverter`` subclass for ``backbone``'s class, else ``keras_hub.layers.ImageConverter``.

    KerasHub pairs a converter with a backbone through the converter's
    ``backbone_cls`` attribute among the classes registered with Keras (the
    lookup ``ImageConverter.from_preset`` itself does); the first registered
    (KerasHub's own) wins.
    """
    base = keras_hub.layers.ImageConverter
    for candidate in keras.saving.get_custom_objects().values():
        if inspect.isclass(candidate) and issubclass(candidate, base) and candidate.backbone_cls is type(backbone):
            return candidate
    return base


def build_image_converter(
    backbone: keras.Model, image_size: int | None, mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD
) -> keras_hub.layers.ImageConverter:
    """An image converter for ``backbone``: [0, 255] RGB -> resized to ``image_size``, ``(x / 255 - mean) / std``.

    The class comes from ``image_converter_class``; a subclass that does more
    than resize, scale and offset (checked on a probe image) is replaced by the
    base ``keras_hub.layers.ImageConverter``, with a warning.
    """
    settings = ServingPreprocessing(image_size=image_size, crop_fraction=1.0, mean=mean, std=std)
    options = dict(
        image_size=None if settings.image_size is None else (int(settings.image_size), int(settings.image_size)),
        scale=[1.0 / (255.0 * s) for s in settings.std],
        offset=[-m / s for m, s in zip(settings.mean, settings.std)],
        crop_to_aspect_ratio=True,
        interpolation="bilinear",
        antialias=True,
    )
    converter_class = image_converter_class(backbone)
    converter = converter_class(**options)
    if converter_class is not keras_hub.layers.ImageConverter and not _normalises_as_expected(converter, settings):
        warnings.warn(
            f"{converter_class.__name__} does more than resize and normalise; using keras_hub.layers.ImageConverter.",
            stacklevel=2,
        )
        converter = keras_hub.layers.ImageConverter(**options)
    return converter


def _normalises_as_expected(converter: keras.layers.Layer, settings: ServingPreprocessing) -> bool:
    """Whether ``converter`` maps a probe image already at the target size to ``(x / 255 - mean) / std``."""
    side = settings.image_size or 8
    probe = (np.arange(side * side * 3, dtype=np.float32).reshape(1, side, side, 3) * 7.0) % 256.0
    expected = (probe / 255.0 - np.asarray(settings.mean, np.float32)) / np.asarray(settings.std, np.float32)
    try:
        converted = keras.ops.convert_to_numpy(converter(probe))
    except Exception:  # noqa: BLE001  (any failure means the converter is not a plain resize + normalise)
        return False
    return converted.shape == expected.shape and float(np.max(np.abs(converted - expected))) <= 1e-4


def export_keras_hub_preset(
    model_or_encoder: keras.Model,
    directory: str | Path,
    *,
    image_size: int | None,
    crop_fraction: float,
    mean: tuple = IMAGENET_MEAN,
    std: tuple = IMAGENET_STD,
    encoder: str = "teacher",
    overwrite: bool = False,
) -> Path:
    """Write the encoder's KerasHub backbone and a matching image converter as a KerasHub preset folder.

    Args:
        model_or_encoder: a ``keras_carp.CARP`` (its teacher or student
            encoder is used), an encoder from ``build_encoder``, or a KerasHub backbone.
        directory: the preset folder to write.
        image_size: the side the converter resizes to (the evaluation crop
            size); None leaves the images at their own size.
        crop_fraction: the evaluation centre crop's share of the shorter side;
            recorded only (see the module docstring: a converter cannot drop a border).
        mean, std: the per-channel normalisation of [0, 1] RGB.
        encoder: "teacher" or "student", for a CARP model.
        overwrite: replace an existing, non-empty folder.

    Returns the preset folder. Works on every backend (``save_to_preset`` writes
    a backend-agnostic config and ``.weights.h5`` file).
    """
    settings = ServingPreprocessing(image_size=image_size, crop_fraction=crop_fraction, mean=mean, std=std)
    path = check_output_path(directory, overwrite)
    network, head = select_networks(model_or_encoder, encoder)
    backbone = find_keras_hub_backbone(network)
    fixed = tuple(backbone.input_shape[1:3]) if len(backbone.input_shape) == 4 else (None, None)
    if None not in fixed and fixed != (settings.image_size,) * 2:
        raise ValueError(
            f"{type(backbone).__name__} takes {fixed[0]} x {fixed[1]} images (its image_shape), but the converter "
            f"would resize to image_size={settings.image_size}; export with image_size={fixed[0]}."
        )
    converter = build_image_converter(backbone, settings.image_size, settings.mean, settings.std)
    staging = path.with_name(f".{path.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    backbone.save_to_preset(str(staging))
    converter.save_to_preset(str(staging))
    metadata = {
        "encoder": encoder if head is not None else "encoder",
        "backbone_class": type(backbone).__name__,
        "image_converter_class": type(converter).__name__,
        "feature_dim": int(network.output_shape[-1]) if network is not backbone else None,
        "encoder_layers": _describe_layers(network) if network is not backbone else [],
        "preprocessing": dataclasses.asdict(settings),
        "centre_crop_in_converter": settings.image_size is None or settings.crop_fraction == 1.0,
        "keras_version": keras.__version__,
        "keras_hub_version": keras_hub.__version__,
    }
    (staging / PRESET_METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    staging.rename(path)
    return path


def _describe_layers(network: keras.Model) -> list[dict]:
    """The encoder's top-level layers after its input: class names, with the config of weightless ones (pooling)."""
    described = []
    for layer in getattr(network, "layers", []):
        if isinstance(layer, keras.layers.InputLayer):
            continue
        entry = {"class_name": type(layer).__name__}
        if not layer.weights:
            config = layer.get_config()
            entry["config"] = {k: v for k, v in config.items() if k not in ("name", "trainable", "dtype")}
        described.append(entry)
    return described
