"""VOC07 low-shot linear SVMs (the VISSL / released-code protocol): per-class one-vs-rest LinearSVC on
L2-normalised frozen features, k positives (and 19 k negatives) per class, the cost picked by
cross-validation, test mAP.

Targets are [N, 20] in {1, -1, 0}: the class is present (as a non-difficult
object), absent, or present only as "difficult" objects, which is ignored in
training and at test time, as in the VOC devkit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from keras_carp.evaluation.knn import l2_normalize

logger = logging.getLogger("keras_carp.evaluation")

SHOTS = (1, 2, 4, 8, 16)
COSTS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)  # VISSL's sweep
VOC_CLASSES = 20


def multilabel_targets(labels: Sequence, labels_no_difficult: Sequence, num_classes: int = VOC_CLASSES) -> np.ndarray:
    """[N, num_classes] int targets from per-image class lists: 1 when a non-difficult object has the class,
    0 when only difficult ones do (ignored), -1 when none does."""
    targets = -np.ones((len(labels), num_classes), "int64")
    for row, (every, clear) in enumerate(zip(labels, labels_no_difficult)):
        targets[row, np.asarray(every, "int64")] = 0
        targets[row, np.asarray(clear, "int64")] = 1
    return targets


def sample_low_shot(targets: np.ndarray, shots: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per class, (``shots`` positives, ``(num_classes - 1) * shots`` negatives) drawn without replacement.

    As VISSL's ``create_voc_low_shot_samples``: k positives and (C - 1) k images
    without the class per class (all of those when there are fewer), every other
    image ignored for that class; the draw is fixed by ``seed``.
    """
    rng = np.random.default_rng(seed)
    num_classes = targets.shape[1]
    sampled = []
    for c in range(num_classes):
        positives = np.flatnonzero(targets[:, c] == 1)
        negatives = np.flatnonzero(targets[:, c] == -1)
        if len(positives) < shots:
            raise ValueError(f"Class {c} has {len(positives)} positives, fewer than {shots} shots.")
        wanted = min((num_classes - 1) * shots, len(negatives))
        sampled.append((np.sort(rng.choice(positives, shots, replace=False)),
                        np.sort(rng.choice(negatives, wanted, replace=False))))  # fmt: skip
    return sampled


def _svm(cost: float, seed: int):
    from sklearn.svm import LinearSVC

    # VISSL's settings: squared hinge, L2 penalty, positives weighted 2:1.
    return LinearSVC(C=cost, class_weight={1: 2, -1: 1}, loss="squared_hinge", penalty="l2", dual=True,
                     max_iter=2000, tol=1e-4, random_state=seed)  # fmt: skip


def choose_cost(
    features: np.ndarray, labels: np.ndarray, costs: Sequence[float] = COSTS, folds: int = 3, seed: int = 0
) -> float:
    """The cost with the best mean average precision over stratified folds (the smallest on ties).

    With fewer positives than 2 no fold split is possible; the middle of the sweep (the
    median cost) is used then.
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    costs = sorted(costs)
    splits = min(folds, int((labels == 1).sum()), int((labels == -1).sum()))
    if splits < 2 or len(costs) == 1:
        return float(costs[len(costs) // 2])
    cv = StratifiedKFold(n_splits=splits, shuffle=True, random_state=seed)
    scores = [cross_val_score(_svm(c, seed), features, labels, cv=cv, scoring="average_precision").mean()
              for c in costs]  # fmt: skip
    return float(costs[int(np.argmax(scores))])


def svm_map(
    train_features: np.ndarray,
    train_targets: np.ndarray,
    test_features: np.ndarray,
    test_targets: np.ndarray,
    samples: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    costs: Sequence[float] = COSTS,
    folds: int = 3,
    seed: int = 0,
) -> dict:
    """Test mAP (%) of one-vs-rest linear SVMs, one per class, and the per-class APs and chosen costs.

    Each class trains on its (positives, negatives) of ``samples`` (``sample_low_shot``);
    when None, on every positive against every training image without the class;
    ignored (0) images are left out. At test
    time images marked 0 for the class are left out of its AP
    (``sklearn.metrics.average_precision_score``).
    """
    from sklearn.metrics import average_precision_score

    train_targets, test_targets = np.asarray(train_targets), np.asarray(test_targets)
    if train_targets.shape != (len(train_features), test_targets.shape[1]) or len(test_targets) != len(test_features):
        raise ValueError(f"targets {train_targets.shape}/{test_targets.shape} do not match the features.")
    train, test = l2_normalize(train_features), l2_normalize(test_features)
    aps, chosen = [], []
    for c in range(train_targets.shape[1]):
        if samples is None:
            chosen_pos, negatives = np.flatnonzero(train_targets[:, c] == 1), np.flatnonzero(train_targets[:, c] == -1)
        else:
            chosen_pos, negatives = (np.asarray(i) for i in samples[c])
        keep = test_targets[:, c] != 0
        truth = test_targets[keep, c] == 1
        if len(chosen_pos) == 0 or len(negatives) == 0 or not truth.any():
            raise ValueError(f"Class {c} lacks positives or negatives in the training or test set.")
        rows = np.concatenate([chosen_pos, negatives])
        labels = np.concatenate([np.ones(len(chosen_pos), "int64"), -np.ones(len(negatives), "int64")])
        cost = choose_cost(train[rows], labels, costs, folds, seed)
        svm = _svm(cost, seed).fit(train[rows], labels)
        aps.append(average_precision_score(truth, svm.decision_function(test[keep])))
        chosen.append(cost)
    return {"map": 100.0 * float(np.mean(aps)), "aps": [100.0 * float(a) for a in aps], "costs": chosen}


def low_shot_svm(
    train_features: np.ndarray,
    train_targets: np.ndarray,
    test_features: np.ndarray,
    test_targets: np.ndarray,
    shots: Sequence[int] = SHOTS,
    samples: int = 5,
    costs: Sequence[float] = COSTS,
    folds: int = 3,
    seed: int = 0,
) -> dict:
    """``{k: {"map": mean %, "std": %, "maps": [per sample]}}``: ``svm_map`` on ``sample_low_shot``'s k
    positives and 19 k negatives per class, drawn ``samples`` times (draw s uses seed ``seed + s``, the same
    draws for every encoder)."""
    if samples < 1 or not shots or min(shots) < 1:
        raise ValueError(f"shots and samples must be positive, got shots={shots}, samples={samples}.")
    results = {}
    for k in shots:
        maps = []
        for s in range(samples):
            drawn = sample_low_shot(np.asarray(train_targets), k, seed + s)
            maps.append(svm_map(train_features, train_targets, test_features, test_targets, drawn,
                                costs, folds, seed + s)["map"])  # fmt: skip
        results[int(k)] = {"map": float(np.mean(maps)), "std": float(np.std(maps)), "maps": maps}
        logger.info("low-shot SVM, %d positives per class: mAP %.2f ± %.2f", k, np.mean(maps), np.std(maps))
    return results


def voc_dataset(split: str, data_dir=None, image_size: int = 224, crop_fraction: float = 1.0,
                batch_size: int = 64, name: str = "voc/2007"):  # fmt: skip
    """(images, targets) batches of a TFDS VOC split, resized and centre-cropped as ``eval_dataset`` does.

    Targets come from the ``labels`` and ``labels_no_difficult`` features (see ``multilabel_targets``).
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from keras_carp.data import center_crop, decode_image, normalize

    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        builder.download_and_prepare()
    num_classes = builder.info.features["labels"].feature.num_classes
    data = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()}, shuffle_files=False)

    def prepare(example):
        def hot(labels):  # [C] 0/1, zeros when the list is empty
            return tf.minimum(tf.reduce_sum(tf.one_hot(labels, num_classes, dtype=tf.int64), axis=0), 1)

        every, clear = hot(example["labels"]), hot(example["labels_no_difficult"])
        targets = tf.where(clear > 0, 1, tf.where(every > 0, 0, -1))
        targets = tf.cast(targets, tf.int64)
        image = normalize(center_crop(decode_image(example["image"]), image_size, crop_fraction))
        return image, targets

    return data.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(batch_size)
