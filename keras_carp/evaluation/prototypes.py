"""What the prototypes group together: the teacher's assignment of images to its K prototypes."""

from __future__ import annotations

import keras
import numpy as np


def prototype_assignments(model, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(index of the closest prototype [N], its logit [N]) under the teacher, in inference mode.

    ``images`` are preprocessed as the encoder expects (``eval_dataset``'s
    normalisation); logits are ``z . c / ||c||`` over all K prototypes.
    """
    indices, scores = [], []
    for start in range(0, len(images), batch_size):
        features = model.teacher_encoder(images[start : start + batch_size], training=False)
        logits = keras.ops.convert_to_numpy(model.teacher_head(features, training=False))
        indices.append(np.argmax(logits, axis=1))
        scores.append(np.max(logits, axis=1))
    return np.concatenate(indices), np.concatenate(scores)


def prototype_groups(assignments: np.ndarray, scores: np.ndarray, top: int = 8, per_group: int = 8) -> list[dict]:
    """The ``top`` most used prototypes, each with its ``per_group`` highest-scoring images.

    Returns dicts ``{"prototype", "count", "indices"}`` sorted by count (ties by
    prototype index); ``indices`` point into the inputs, best score first.
    """
    prototypes, counts = np.unique(assignments, return_counts=True)
    order = np.lexsort((prototypes, -counts))[:top]
    groups = []
    for prototype, count in zip(prototypes[order], counts[order]):
        members = np.flatnonzero(assignments == prototype)
        best = members[np.argsort(-scores[members], kind="stable")][:per_group]
        groups.append({"prototype": int(prototype), "count": int(count), "indices": best.tolist()})
    return groups
