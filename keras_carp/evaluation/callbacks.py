"""Monitoring during ``fit``: k-NN accuracy and prototype collapse, written into the epoch logs."""

from __future__ import annotations

import logging

import keras
import numpy as np

from keras_carp.evaluation.knn import knn_accuracy

logger = logging.getLogger("keras_carp.evaluation")


def _encoder(model, which: str) -> keras.Model:
    if which not in ("teacher", "student"):
        raise ValueError(f"encoder must be 'teacher' or 'student', got {which!r}.")
    return model.teacher_encoder if which == "teacher" else model.student_encoder


class KNNMonitor(keras.callbacks.Callback):
    """Weighted k-NN top-1/top-5 of the frozen encoder every ``every`` epochs, as ``knn_top1``/``knn_top5`` logs.

    ``train_data`` (the memory bank) and ``test_data`` are iterables of
    ``(images, labels)`` batches, e.g. ``keras_carp.data.eval_dataset``. Put it
    before ``CSVLogger``/``TensorBoard`` in the callback list so they record it.
    Epochs it skips log NaN, so that CSVLogger (which fixes its columns at the
    first epoch) keeps the columns.
    """

    def __init__(self, train_data, test_data, every: int = 1, k: int = 20, temperature: float = 0.07,
                 encoder: str = "teacher", num_classes: int | None = None):  # fmt: skip
        super().__init__()
        if every <= 0:
            raise ValueError(f"every must be a positive number of epochs, got {every}.")
        self.train_data, self.test_data = train_data, test_data
        self.every, self.k, self.temperature, self.which = every, k, temperature, encoder
        self.num_classes = num_classes
        self.history: dict[int, dict] = {}

    def evaluate(self) -> dict:
        encoder = _encoder(self.model, self.which)
        return knn_accuracy(encoder, self.train_data, self.test_data, self.k, self.temperature, self.num_classes)

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every and epoch + 1 != self.params.get("epochs"):
            if logs is not None:
                logs["knn_top1"] = logs["knn_top5"] = float("nan")
            return
        result = self.evaluate()
        self.history[epoch + 1] = result
        if logs is not None:
            logs["knn_top1"], logs["knn_top5"] = result["top1"], result["top5"]
        logger.info("epoch %d: k-NN (k=%d) top-1 %.2f%%, top-5 %.2f%%", epoch + 1, self.k, result["top1"],
                    result["top5"])  # fmt: skip


class CollapseMonitor(keras.callbacks.Callback):
    """Prototype usage on a fixed probe set at each epoch's end; a loud warning when assignments concentrate.

    Each probe image is assigned to the prototype with the largest teacher
    logit, with batch norm on batch statistics as in training (inside a
    ``StatelessScope``, so the moving averages are left alone). Logged:
    ``prototype_usage`` (distinct prototypes assigned / min(K, probes)) and
    ``largest_assignment_share`` (fraction of probes on the most popular
    prototype). The paper's one-block (N_B = K) runs collapse onto a handful
    of prototypes; this flags it at the end of the epoch where it happens.
    """

    def __init__(self, probe_images, max_share: float = 0.5, batch_size: int = 256):
        super().__init__()
        if not 0 < max_share <= 1:
            raise ValueError(f"max_share must be in (0, 1], got {max_share}.")
        self.probe_images = np.asarray(probe_images, "float32")
        self.max_share, self.batch_size = max_share, batch_size
        self.collapsed_epochs: list[int] = []

    def assignments(self) -> np.ndarray:
        model = self.model
        winners = []
        for start in range(0, len(self.probe_images), self.batch_size):
            batch = self.probe_images[start : start + self.batch_size]
            with keras.StatelessScope():
                features = model.teacher_encoder(batch, training=True)
                logits = model.teacher_head(features, training=True)
            winners.append(keras.ops.convert_to_numpy(keras.ops.argmax(logits, axis=-1)))
        return np.concatenate(winners)

    def on_epoch_end(self, epoch, logs=None):
        winners = self.assignments()
        counts = np.bincount(winners)
        num_prototypes = self.model.num_prototypes
        usage = len(np.unique(winners)) / min(num_prototypes, len(winners))
        share = counts.max() / len(winners)
        if logs is not None:
            logs["prototype_usage"], logs["largest_assignment_share"] = float(usage), float(share)
        if share > self.max_share:
            self.collapsed_epochs.append(epoch + 1)
            logger.warning(
                "COLLAPSE: epoch %d: %.0f%% of %d probe images go to one prototype (%d of %d prototypes used). "
                "CARP's partitions prevent this at N_B << K; check block_size, the learning rate and the teacher.",
                epoch + 1, 100 * share, len(winners), len(np.unique(winners)), num_prototypes,
            )  # fmt: skip
