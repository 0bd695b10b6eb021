"""Weighted k-NN on L2-normalised frozen features (the DINO / CARP protocol)."""

from __future__ import annotations

import keras
import numpy as np


def extract_features(encoder: keras.Model, images, batch_size: int = 256, preprocess=None) -> np.ndarray:
    """Encoder features [N, D] (inference mode) of in-memory images, optionally preprocessed first.

    ``images`` may also be an iterable of batches (a tf.data dataset of images
    or of ``(images, labels)``, e.g. ``keras_carp.data.eval_dataset``); use
    ``extract_labelled_features`` to keep the labels.
    """
    if not isinstance(images, np.ndarray):
        return extract_labelled_features(encoder, images, preprocess)[0]
    features = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        if preprocess is not None:
            batch = preprocess(batch)
        features.append(keras.ops.convert_to_numpy(encoder(batch, training=False)))
    return np.concatenate(features).astype("float32")


def extract_labelled_features(encoder: keras.Model, batches, preprocess=None) -> tuple[np.ndarray, np.ndarray | None]:
    """Features [N, D] and labels [N] (None when batches carry none) from an iterable of batches."""
    features, labels = [], []
    for batch in batches:
        images, batch_labels = (batch[0], batch[1]) if isinstance(batch, tuple | list) else (batch, None)
        images = keras.ops.convert_to_numpy(images) if not isinstance(images, np.ndarray) else images
        if preprocess is not None:
            images = preprocess(images)
        features.append(keras.ops.convert_to_numpy(encoder(images, training=False)))
        if batch_labels is not None:
            labels.append(np.asarray(batch_labels))
    if not features:
        raise ValueError("No images to extract features from (the dataset is empty).")
    return np.concatenate(features).astype("float32"), (np.concatenate(labels) if labels else None)


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def weighted_knn(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> dict:
    """Top-1 and top-5 accuracy (%) of the weighted k-NN classifier.

    Features are L2-normalised; each test point's k most cosine-similar training
    points vote for their class with weight ``exp(sim / temperature)``. Test
    points go in chunks so that no N_test x N_train matrix is ever held whole.
    """
    if k <= 0 or temperature <= 0:
        raise ValueError(f"k and temperature must be positive, got k={k}, temperature={temperature}.")
    train_labels = np.asarray(train_labels).astype(int)
    test_labels = np.asarray(test_labels).astype(int)
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max()) + 1)
    k = min(k, len(train_features))
    train = _l2_normalize(np.asarray(train_features, "float32"))
    test = _l2_normalize(np.asarray(test_features, "float32"))
    top1 = top5 = 0
    for start in range(0, len(test), chunk_size):
        similarity = test[start : start + chunk_size] @ train.T
        neighbours = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        weights = np.exp(np.take_along_axis(similarity, neighbours, axis=1) / temperature)
        votes = np.zeros((len(similarity), num_classes), "float64")
        np.add.at(votes, (np.arange(len(similarity))[:, None], train_labels[neighbours]), weights)
        ranked = np.argsort(-votes, axis=1, kind="stable")
        truth = test_labels[start : start + chunk_size, None]
        top1 += int((ranked[:, :1] == truth).any(axis=1).sum())
        top5 += int((ranked[:, :5] == truth).any(axis=1).sum())
    return {"top1": 100.0 * top1 / len(test), "top5": 100.0 * top5 / len(test)}
