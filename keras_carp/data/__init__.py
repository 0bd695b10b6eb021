"""Input pipelines (TensorFlow-only: tf.data, tf.image and TFDS).

Datasets built here feed ``CARP.fit`` on every backend: Keras iterates tf.data
on TensorFlow, JAX and PyTorch alike.
"""

from keras_carp.data.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCropAugmentation, normalize
from keras_carp.data.callbacks import SkippedImagesLogger
from keras_carp.data.pipeline import (
    center_crop,
    classification_dataset,
    decode_image,
    eval_dataset,
    multicrop_dataset,
    steps_per_epoch,
)
from keras_carp.data.sources import (
    ArraySource,
    FolderSource,
    ImageSource,
    TFDSSource,
    load_digits,
    load_fashion_mnist,
    load_source,
    scan_image_folder,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ArraySource",
    "FolderSource",
    "ImageSource",
    "MultiCropAugmentation",
    "SkippedImagesLogger",
    "TFDSSource",
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
