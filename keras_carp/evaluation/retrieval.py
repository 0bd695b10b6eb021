"""Image retrieval: mean average precision of a gallery ranked by cosine similarity to each query."""

from __future__ import annotations

import numpy as np

from keras_carp.evaluation.knn import l2_normalize


def retrieval_map(
    query_features: np.ndarray,
    query_labels: np.ndarray,
    gallery_features: np.ndarray,
    gallery_labels: np.ndarray,
    chunk_size: int = 1024,
    exclude_self: bool = False,
) -> dict:
    """mAP (%) and precision@1 (%): gallery items with the query's label are the relevant ones.

    ``exclude_self`` drops the identical index when queries and gallery are
    the same set. Queries without any relevant item are skipped.
    """
    query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
    queries, gallery = l2_normalize(query_features), l2_normalize(gallery_features)
    average_precisions, first_hits = [], []
    for start in range(0, len(queries), chunk_size):
        similarity = queries[start : start + chunk_size] @ gallery.T
        if exclude_self:
            index = np.arange(start, start + len(similarity))
            similarity[np.arange(len(similarity)), index] = -np.inf
        order = np.argsort(-similarity, axis=1, kind="stable")
        relevant = gallery_labels[order] == query_labels[start : start + chunk_size, None]
        if exclude_self:
            relevant = relevant[:, :-1]  # the query itself, ranked last
        hits = np.cumsum(relevant, axis=1)
        ranks = np.arange(1, relevant.shape[1] + 1)
        totals = relevant.sum(axis=1)
        valid = totals > 0
        precision_at_hits = np.where(relevant, hits / ranks, 0.0).sum(axis=1)
        average_precisions.append(precision_at_hits[valid] / totals[valid])
        first_hits.append(relevant[valid, 0])
    return {"map": 100.0 * float(np.concatenate(average_precisions).mean()),
            "precision_at_1": 100.0 * float(np.concatenate(first_hits).mean())}  # fmt: skip


def average_precision_from_ranks(ranks, num_positives: int) -> float:
    """Average precision of one search from the 0-based ranks of its retrieved positives, in ranked order.

    The area under the precision-recall curve by trapezoids, as revisitop's
    ``compute_ap`` and DINO's ``score_ap_from_ranks_1`` define it: each positive
    adds ``(precision before it + precision at it) / 2`` times ``1 / num_positives``.
    Positives missing from ``ranks`` count as never retrieved.
    """
    if num_positives <= 0:
        raise ValueError(f"num_positives must be positive, got {num_positives}.")
    ranks = np.sort(np.asarray(ranks, "float64"))
    found = np.arange(len(ranks), dtype="float64")
    before = np.where(ranks == 0, 1.0, found / np.maximum(ranks, 1.0))
    at = (found + 1) / (ranks + 1)
    return float(((before + at) / 2).sum() / num_positives)


def image_file_features(
    encoder,
    paths,
    image_size: int,
    boxes=None,
    keep_aspect: bool = False,
    batch_size: int = 32,
) -> np.ndarray:
    """Features [N, D] (float32) of image files, read with Pillow and normalised with ImageNet's statistics.

    ``boxes`` (one ``(x1, y1, x2, y2)`` or None per file) crops before resizing,
    as the revisited Oxford/Paris queries are cropped to their ``bbx``. With
    ``keep_aspect`` the longer side becomes ``image_size`` and images go through
    the encoder one at a time (DINO's image retrieval); otherwise every image is
    resized to ``image_size`` x ``image_size`` and batched (DINO's copy detection).
    """
    import keras
    from PIL import Image

    from keras_carp.imagenet import IMAGENET_MEAN, IMAGENET_STD

    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("No image files to extract features from.")
    boxes = [None] * len(paths) if boxes is None else list(boxes)
    if len(boxes) != len(paths):
        raise ValueError(f"{len(boxes)} boxes for {len(paths)} images.")
    mean, std = np.asarray(IMAGENET_MEAN, "float32"), np.asarray(IMAGENET_STD, "float32")

    def load(path, box):
        with Image.open(path) as image:
            image = image.convert("RGB")
            if box is not None:
                x1, y1, x2, y2 = (int(round(float(v))) for v in box)
                image = image.crop((x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)))
            if keep_aspect:
                scale = image_size / max(image.size)
                size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            else:
                size = (image_size, image_size)
            image = image.resize(size, Image.BICUBIC)
            return (np.asarray(image, "float32") / 255.0 - mean) / std

    step = 1 if keep_aspect else batch_size
    features = []
    for start in range(0, len(paths), step):
        batch = np.stack([load(p, b) for p, b in zip(paths[start : start + step], boxes[start : start + step])])
        features.append(np.asarray(keras.ops.convert_to_numpy(encoder.predict_on_batch(batch)), "float32"))
    return np.concatenate(features).reshape(len(paths), -1)
