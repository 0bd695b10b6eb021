"""The pixel conventions every CARP input path shares, in one place.

Images are uint8 in [0, 255] or float in [0, 1]; views and evaluation crops
are ImageNet-normalised float32 (``normalize``); evaluation crops resize the
shorter side, then take the centre (``center_crop_geometry``). Each function
takes NumPy arrays, and TensorFlow tensors (inside tf.data) with TensorFlow's
own ops, so the tf.data pipeline, the Pillow loaders and the on-device views
compute the same numbers. Importing this module imports neither TensorFlow
nor Keras.
"""

from __future__ import annotations

import sys

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN = np.asarray(IMAGENET_MEAN, np.float32)
_STD = np.asarray(IMAGENET_STD, np.float32)


def _tensorflow_for(x):
    """The ``tensorflow`` module when ``x`` is a TensorFlow tensor, else None (TensorFlow is never imported here)."""
    tf = sys.modules.get("tensorflow")
    return tf if tf is not None and hasattr(tf, "is_tensor") and tf.is_tensor(x) else None


def normalize(images):
    """[0, 1] RGB -> ImageNet-normalised float32: ``(images - mean) / std`` with float32 constants.

    NumPy in, NumPy out; a TensorFlow tensor gives a tensor (tf.data), and any
    other Keras backend tensor (JAX, PyTorch) is computed with ``keras.ops``.
    """
    tf = _tensorflow_for(images)
    if tf is not None:
        return (tf.cast(images, tf.float32) - _MEAN) / _STD
    if isinstance(images, (np.ndarray, np.generic, list, tuple, int, float)):
        return (np.asarray(images, np.float32) - _MEAN) / _STD
    from keras import ops

    return (ops.cast(images, "float32") - ops.convert_to_tensor(_MEAN)) / ops.convert_to_tensor(_STD)


def to_float_image(images):
    """uint8 [0, 255] (any integer type: scaled by its maximum) or float [0, 1] -> float32 [0, 1], 3 channels.

    A single channel is repeated to RGB; ``tf.image.convert_image_dtype``'s
    scaling for TensorFlow tensors, the same arithmetic in NumPy.
    """
    tf = _tensorflow_for(images)
    if tf is not None:
        image = tf.convert_to_tensor(images)
        if image.dtype.is_integer:
            image = tf.image.convert_image_dtype(image, tf.float32)
        else:
            image = tf.cast(image, tf.float32)
        if image.shape.rank == 3 and image.shape[-1] == 1:
            image = tf.tile(image, [1, 1, 3])
        return image
    image = np.asarray(images)
    if np.issubdtype(image.dtype, np.integer):
        image = image.astype(np.float32) * np.float32(1 / np.iinfo(image.dtype).max)
    else:
        image = image.astype(np.float32)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image


def to_uint8_image(images):
    """uint8 as it is; float in [0, 1] -> uint8 [0, 255] (clipped, rounded half to even)."""
    tf = _tensorflow_for(images)
    if tf is not None:
        image = tf.convert_to_tensor(images)
        if image.dtype == tf.uint8:
            return image
        return tf.cast(tf.round(tf.clip_by_value(tf.cast(image, tf.float32), 0.0, 1.0) * 255.0), tf.uint8)
    image = np.asarray(images)
    if image.dtype == np.uint8:
        return image
    return np.round(np.clip(image.astype(np.float32), 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)


def center_crop_geometry(shape, size: int, crop_fraction: float = 1.0):
    """The evaluation crop of an image of ``shape`` [H, W]: ``(resized [h, w], offset [y, x])``, int32.

    The shorter side is resized to ``size / crop_fraction`` (float32, rounded
    half to even; no side below ``size``); the crop is the central size x size
    from ``offset``. ``shape`` may be a tensor (``tf.shape(image)[-3:-1]``).
    """
    tf = _tensorflow_for(shape)
    if tf is not None:
        shape = tf.cast(shape, tf.float32)
        scale = (size / crop_fraction) / tf.reduce_min(shape)
        resized = tf.maximum(tf.cast(tf.math.round(shape * scale), tf.int32), size)
    else:
        shape = np.asarray(shape, np.float32)
        scale = np.float32(size / crop_fraction) / shape.min()
        resized = np.maximum(np.round(shape * scale).astype(np.int32), np.int32(size))
    return resized, (resized - size) // 2
