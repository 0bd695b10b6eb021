"""Datasets: scikit-learn's digits (the embedded default) and the multi-crop tf.data wrapper."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_carp.data.augment import MultiCropAugmentation


def load_digits(image_size: int = 32, test_fraction: float = 0.25, seed: int = 0):
    """scikit-learn's bundled 8x8 digits as RGB float32 in [0, 1], upsampled to ``image_size``.

    Returns ``(train_images, train_labels), (test_images, test_labels)`` with a
    stratified split (1 347 / 450 images at the defaults).
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    images = (digits.images.astype("float32") / 16.0)[..., None]
    images = tf.image.resize(images, (image_size, image_size), method="bilinear").numpy()
    images = np.repeat(np.clip(images, 0.0, 1.0), 3, axis=-1)
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    return (x_train, y_train), (x_test, y_test)


def multicrop_dataset(
    images,
    augmentation: MultiCropAugmentation,
    batch_size: int,
    labels=None,
    seed: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
) -> tf.data.Dataset:
    """Batches of ``(crops, labels)`` (or ``(crops,)``) from in-memory [0, 1] images.

    Each epoch reshuffles and draws new crops; every image's crops come from a
    stateless seed taken from ``tf.data.Dataset.random(seed)``, so a run with
    the same seed sees the same views.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if len(images) == 0:
        raise ValueError("The dataset is empty.")
    if len(images) < batch_size and drop_remainder:
        raise ValueError(f"The dataset has {len(images)} images, fewer than one batch of {batch_size}.")
    elements = (images,) if labels is None else (images, labels)
    dataset = tf.data.Dataset.from_tensor_slices(elements)
    if shuffle:
        dataset = dataset.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    dataset = tf.data.Dataset.zip(dataset, seeds)

    def make_views(element, view_seed):
        crops = augmentation(element[0], view_seed)
        return (crops,) + tuple(element[1:])

    dataset = dataset.map(make_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
