"""Input pipelines: tf.data (TensorFlow) and a TensorFlow-free ``keras.utils.PyDataset`` path.

- Sources (``ArraySource``, ``FolderSource``, ``load_digits``,
  ``load_fashion_mnist``, ``scan_image_folder``, ``as_source``...), the Pillow loaders
  (``ImageBatches``, ``EvalBatches``), ``normalize`` and ``IMAGENET_MEAN``/``IMAGENET_STD``
  import without TensorFlow, so JAX and PyTorch machines without it can feed
  ``fit`` (the augmentation then runs on the accelerator). ``TFDSSource``
  imports TensorFlow when it is built. The callback that reports skipped
  images is ``keras_carp.callbacks.SkippedImagesLogger``.
- The tf.data pipeline (``multicrop_dataset``, ``eval_dataset``,
  ``classification_dataset``, ``center_crop``, ``decode_image``) and the TensorFlow augmentation
  (``MultiCropAugmentation``) load on first use (PEP 562
  ``__getattr__``), so ``import keras_carp.data`` imports no TensorFlow.
  Datasets built there feed ``CARP.fit`` on every backend: Keras iterates
  tf.data on TensorFlow, JAX and PyTorch alike.
"""

from __future__ import annotations

import importlib

from keras_carp.data.python_loader import EvalBatches, ImageBatches
from keras_carp.data.sources import (
    ArraySource,
    FolderSource,
    ImageSource,
    TFDSSource,
    as_source,
    load_digits,
    load_fashion_mnist,
    load_source,
    scan_image_folder,
    steps_per_epoch,
)
from keras_carp.imagenet import IMAGENET_MEAN, IMAGENET_STD, normalize

# Names whose modules import TensorFlow: loaded when first asked for.
_LAZY = {
    "MultiCropAugmentation": "keras_carp.data.augment",
    "center_crop": "keras_carp.data.pipeline",
    "classification_dataset": "keras_carp.data.pipeline",
    "decode_image": "keras_carp.data.pipeline",
    "eval_dataset": "keras_carp.data.pipeline",
    "multicrop_dataset": "keras_carp.data.pipeline",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ArraySource",
    "EvalBatches",
    "FolderSource",
    "ImageBatches",
    "ImageSource",
    "MultiCropAugmentation",
    "TFDSSource",
    "as_source",
    "center_crop",
    "classification_dataset",
    "decode_image",
    "eval_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_source",
    "multicrop_dataset",
    "steps_per_epoch",
    "normalize",
    "scan_image_folder",
]
