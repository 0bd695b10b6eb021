"""Input pipelines (TensorFlow-only: tf.data and tf.image).

Datasets built here feed ``CARP.fit`` on every backend: Keras iterates tf.data
on TensorFlow, JAX and PyTorch alike.
"""

from keras_carp.data.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCropAugmentation, normalize
from keras_carp.data.sources import load_digits, multicrop_dataset

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MultiCropAugmentation", "load_digits", "multicrop_dataset", "normalize"]
