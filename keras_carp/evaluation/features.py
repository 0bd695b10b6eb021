"""Features of a frozen encoder over in-memory images or a tf.data / TFDS split, optionally cached to disk."""

from __future__ import annotations

import os
from pathlib import Path

import keras
import numpy as np


def _to_numpy(x) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else keras.ops.convert_to_numpy(x)


def batch_encoder(encoder: keras.Model):
    """A function from an image batch to the encoder's features in inference mode, compiled.

    ``encoder.predict_on_batch``, except for an encoder built under a TensorFlow
    ``MultiWorkerMirroredStrategy`` of several workers: its ``predict`` gathers
    every worker's outputs (a collective), so there a ``tf.function`` of the
    encoder runs on this worker's own copy of the weights.
    """
    from keras_carp.distribute import across_workers

    strategy = getattr(encoder, "distribute_strategy", None) if keras.backend.backend() == "tensorflow" else None
    if strategy is None or not across_workers(strategy):
        return encoder.predict_on_batch
    import tensorflow as tf

    forward = tf.function(lambda images: encoder(images, training=False))
    return lambda images: forward(images).numpy()


def extract_labelled_features(
    encoder: keras.Model,
    batches,
    preprocess=None,
    progress: bool = False,
    cache_path: str | os.PathLike | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Features [N, D] (float32, inference mode) and labels [N] (None when the batches carry none).

    ``batches`` is any iterable of image batches or ``(images, labels)`` batches
    (``keras_carp.data.eval_dataset`` makes them with resize / centre crop). The
    encoder runs through ``batch_encoder`` (compiled: tf.function on TensorFlow, XLA on JAX).
    With ``cache_path`` the result is saved as ``.npz`` and read back next time.
    """
    if cache_path is not None and Path(cache_path).is_file():
        cached = np.load(cache_path)
        return cached["features"], (cached["labels"] if "labels" in cached else None)
    total = None
    if hasattr(batches, "cardinality"):
        cardinality = int(batches.cardinality())
        total = cardinality if cardinality > 0 else None
    bar = keras.utils.Progbar(total, unit_name="batch") if progress else None
    features, labels = [], []
    encode = batch_encoder(encoder)
    for index, batch in enumerate(batches):
        images, batch_labels = (batch[0], batch[1]) if isinstance(batch, tuple | list) else (batch, None)
        images = _to_numpy(images)
        if preprocess is not None:
            images = _to_numpy(preprocess(images))
        features.append(np.asarray(encode(images), "float32"))
        if batch_labels is not None:
            labels.append(_to_numpy(batch_labels))
        if bar is not None:
            bar.update(index + 1)
    if not features:
        raise ValueError("No images to extract features from (the dataset is empty).")
    features = np.concatenate(features)
    labels = np.concatenate(labels).astype("int64") if labels else None
    if cache_path is not None:
        Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache_path, features=features, **({"labels": labels} if labels is not None else {}))
    return features, labels


def extract_features(encoder: keras.Model, images, batch_size: int = 256, preprocess=None) -> np.ndarray:
    """Features [N, D] of in-memory images [N, H, W, 3] (or of an iterable of batches), optionally preprocessed."""
    if isinstance(images, np.ndarray):
        array = images
        images = (array[start : start + batch_size] for start in range(0, len(array), batch_size))
    return extract_labelled_features(encoder, images, preprocess)[0]
