"""Linear probe on a frozen encoder: on cached features or on augmented images (the standard protocol)."""

from __future__ import annotations

import keras
import numpy as np


def _top_k(scores: np.ndarray, labels: np.ndarray) -> dict:
    ranked = np.argsort(-scores, axis=1, kind="stable")
    labels = np.asarray(labels).astype(int)[:, None]
    return {"top1": 100.0 * float((ranked[:, :1] == labels).any(1).mean()),
            "top5": 100.0 * float((ranked[:, :5] == labels).any(1).mean())}  # fmt: skip


def _sgd(learning_rate: float, momentum: float, steps: int, weight_decay: float) -> keras.optimizers.SGD:
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(steps, 1))
    return keras.optimizers.SGD(schedule, momentum=momentum, weight_decay=weight_decay or None)


def linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int | None = None,
    epochs: int = 100,
    batch_size: int = 256,
    learning_rate: float = 0.3,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> dict:
    """Top-1/top-5 (%) of a linear classifier trained on frozen features with the standard SGD settings.

    Features pass through a parameter-free batch norm first (as MoCo v3 / MAE
    probes do), which makes lr 0.3 safe whatever the feature scale. Cosine
    learning-rate decay over all steps.
    """
    train_labels = np.asarray(train_labels).astype("int64")
    num_classes = num_classes or int(max(train_labels.max(), np.max(test_labels)) + 1)
    keras.utils.set_random_seed(seed)
    probe = keras.Sequential(
        [
            keras.Input((train_features.shape[1],)),
            keras.layers.BatchNormalization(center=False, scale=False),
            keras.layers.Dense(num_classes, kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.01)),
        ],
        name="linear_probe",
    )
    steps = epochs * int(np.ceil(len(train_features) / batch_size))
    probe.compile(
        optimizer=_sgd(learning_rate, momentum, steps, weight_decay),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    probe.fit(np.asarray(train_features, "float32"), train_labels, batch_size=batch_size, epochs=epochs, verbose=0)
    scores = probe.predict(np.asarray(test_features, "float32"), batch_size=1024, verbose=0)
    return _top_k(scores, test_labels)


def linear_probe_on_images(
    encoder: keras.Model,
    train_data,
    test_data,
    num_classes: int,
    epochs: int = 100,
    steps_per_epoch: int | None = None,
    learning_rate: float = 0.3,
    momentum: float = 0.9,
) -> dict:
    """The linear evaluation protocol: a Dense layer on the frozen encoder, trained on augmented images.

    ``train_data`` yields ``(images, labels)`` with train-time random crop + flip
    (``keras_carp.data.classification_dataset``); ``test_data`` the resized,
    centre-cropped test images (``keras_carp.data.eval_dataset`` with
    ``crop_fraction=224/256``). The encoder stays in inference mode.
    """
    encoder.trainable = False
    inputs = keras.Input(encoder.input_shape[1:])
    features = encoder(inputs, training=False)
    outputs = keras.layers.Dense(num_classes, kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.01))(
        keras.layers.BatchNormalization(center=False, scale=False)(features)
    )
    probe = keras.Model(inputs, outputs, name="linear_probe_on_images")
    if steps_per_epoch is None:
        cardinality = int(train_data.cardinality()) if hasattr(train_data, "cardinality") else -1
        if cardinality <= 0:
            raise ValueError("Pass steps_per_epoch: the training data has no known length.")
        steps_per_epoch = cardinality
    probe.compile(
        optimizer=_sgd(learning_rate, momentum, epochs * steps_per_epoch, 0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    probe.fit(train_data, epochs=epochs, steps_per_epoch=steps_per_epoch, verbose=0)
    scores, labels = [], []
    for images, batch_labels in test_data:
        scores.append(np.asarray(probe.predict_on_batch(keras.ops.convert_to_numpy(images))))
        labels.append(keras.ops.convert_to_numpy(batch_labels))
    return _top_k(np.concatenate(scores), np.concatenate(labels))
