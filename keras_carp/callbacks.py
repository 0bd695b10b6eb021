"""The training callbacks of keras_carp (the online linear probe, an evaluation, is ``keras_carp.evaluation``).

- ``TeacherEMA``: gives a ``CARP`` model its teacher momentum schedule for
  ``fit`` (as Keras' ``LearningRateScheduler`` does the learning rate) and
  logs the momentum.
- ``StepTensorBoard`` and ``RunCSVLogger``: Keras' loggers, fixed for resumed
  runs and ``gs://`` paths.
- ``RunCheckpoint``: atomic whole-state checkpoints, resume within an epoch,
  and a stop on a non-finite loss (helpers in ``keras_carp.checkpoints``).
- ``SkippedImagesLogger``: undecodable images skipped by a
  ``keras_carp.data`` source (the source is TensorFlow-based; this module
  imports no TensorFlow).
- ``KNNMonitor`` and ``CollapseMonitor``: k-NN accuracy and prototype
  collapse during ``fit`` (``keras_carp.evaluation``).

Callbacks take a model: this module sits above ``keras_carp.model``, which
imports none of it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import TYPE_CHECKING

import keras
import numpy as np

from keras_carp import checkpoints, keras_internals
from keras_carp.optimizers import batch_counter
from keras_carp.schedules import TeacherMomentumSchedule

if TYPE_CHECKING:
    from keras_carp.data.sources import ImageSource

checkpoint_logger = logging.getLogger("keras_carp.checkpoints")
data_logger = logging.getLogger("keras_carp.data")
evaluation_logger = logging.getLogger("keras_carp.evaluation")


# ------------------------------------------------------------ teacher momentum
@keras.saving.register_keras_serializable(package="keras_carp")
class TeacherEMA(keras.callbacks.Callback):
    """The teacher momentum schedule of a ``CARP`` model's ``fit``, as a callback; logs the momentum.

    ``model.fit(..., callbacks=[TeacherEMA(base, final, total_steps=n)])``
    makes ``TeacherMomentumSchedule(base, final, n)`` the model's
    ``teacher_momentum_schedule`` before training begins (``CARP.fit`` takes
    it from this callback's ``teacher_momentum_schedule`` attribute), as Keras'
    ``LearningRateScheduler`` gives the optimizer its learning rate. With
    ``total_steps=None`` the cosine lasts the whole ``fit`` (epochs * steps per
    epoch); ``total_steps`` holds that resolved length once ``fit`` has begun.
    The schedule stays the model's after ``fit`` and is saved with it. Passing
    ``CARP(teacher_momentum_schedule=...)`` or setting
    ``model.teacher_momentum_schedule`` does the same without a callback.

    The EMA update itself, ``teacher <- m * teacher + (1 - m) * student``,
    runs inside ``CARP``'s compiled train step, not in this callback: as in the
    released code the teacher moves with the pre-step student weights, after
    the forward pass and before the optimizer update, where no callback hook
    runs.

    Logs: ``teacher_momentum``, m at the epoch's last batch, in each epoch's
    logs (put ``CSVLogger``/``TensorBoard`` after it). The train step logs the
    same name with the same value for every batch, so there is one
    ``teacher_momentum`` column, not two.
    """

    def __init__(self, base_momentum: float = 0.99, final_momentum: float = 1.0, total_steps: int | None = None):
        super().__init__()
        self.teacher_momentum_schedule = TeacherMomentumSchedule(base_momentum, final_momentum, total_steps)
        self.total_steps = self.teacher_momentum_schedule.total_steps

    @property
    def base_momentum(self) -> float:
        return self.teacher_momentum_schedule.base_momentum

    @property
    def final_momentum(self) -> float:
        return self.teacher_momentum_schedule.final_momentum

    def momentum(self, step):
        """Teacher momentum m at batch ``step`` (a float32 scalar tensor), over the resolved run length."""
        schedule = self.teacher_momentum_schedule
        return (schedule if self.total_steps is None else schedule.with_total_steps(self.total_steps))(step)

    def on_train_begin(self, logs=None):
        model = self.model
        if getattr(model, "teacher_momentum_schedule", None) is not self.teacher_momentum_schedule:
            raise TypeError(
                f"TeacherEMA sets the teacher momentum of keras_carp.CARP models in CARP.fit; this fit is "
                f"{type(model).__name__}'s, which did not take the schedule."
            )
        # CARP.fit made the schedule the model's and resolved its length (first of all callbacks).
        self.total_steps = model.resolved_teacher_momentum_schedule.total_steps

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            last_batch = max(int(keras.ops.convert_to_numpy(batch_counter(self.model.optimizer))) - 1, 0)
            logs["teacher_momentum"] = float(keras.ops.convert_to_numpy(self.model.teacher_momentum(last_batch)))

    def get_config(self) -> dict:
        return self.teacher_momentum_schedule.get_config()

    @classmethod
    def from_config(cls, config: dict) -> TeacherEMA:
        return cls(**config)


# ------------------------------------------------------------------- logging
class StepTensorBoard(keras.callbacks.TensorBoard):
    """Keras' ``TensorBoard`` whose step summaries are indexed by the run's batch count, not by batches of this fit.

    Keras counts step summaries from 0 at every ``fit`` call, so a resumed
    run's curves would restart at the left edge; here they continue from the
    step the model was restored at. Epoch summaries are unchanged (Keras
    already indexes them by epoch, and ``initial_epoch`` carries on).
    """

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        step = int(keras.ops.convert_to_numpy(batch_counter(self.model.optimizer)))
        keras_internals.set_tensorboard_train_step(self, step)


class RunCSVLogger(keras.callbacks.CSVLogger):
    """Keras' ``CSVLogger`` for run directories: only the logged columns, ``gs://`` paths, appending.

    - Keras adds an empty ``val_<name>`` column for every metric when a run has
      no validation data; here the columns are the logged values only.
    - Appending to a file that has a header (a resumed run) keeps that
      header's columns, so rows stay aligned with it.
    - Keras opens remote paths with ``tf.io.gfile.GFile``, which has no
      ``closed`` attribute, and then fails at the end of ``fit``; this closes
      the file without asking.
    """

    def on_epoch_end(self, epoch, logs=None):
        if self.keys is None:
            header = _csv_header(self.filename) if self.append else []
            self.keys = [key for key in header if key != "epoch"] or sorted(logs or {})
        super().on_epoch_end(epoch, logs)

    def on_train_end(self, logs=None):
        keras_internals.close_csv_logger(self)


def _csv_header(path: str) -> list[str]:
    """The column names of an existing CSV file ([] if there is none)."""
    if "://" in path:
        import tensorflow as tf

        exists, opener = tf.io.gfile.exists, tf.io.gfile.GFile
    else:
        exists, opener = os.path.exists, open
    if not exists(path):
        return []
    with opener(path, "r") as handle:
        line = handle.readline().strip()
    return line.split(",") if line else []


# --------------------------------------------------------------- checkpoints
class RunCheckpoint(keras.callbacks.Callback):
    """Save the whole training state every ``every_steps`` training batches and at every epoch's end.

    Stops the run with ``NonFiniteLossError`` as soon as the loss is NaN or
    infinite, before that state is saved, naming the step and the last good
    checkpoint (Keras' ``TerminateOnNaN`` only sets ``stop_training``, which
    would let the run export a broken model). Keeps the newest ``keep``
    checkpoints. ``resume`` (from ``latest_checkpoint``) restores the epoch's
    running means when fit continues in the middle of that epoch.
    """

    def __init__(self, directory: str, steps_per_epoch: int, every_steps: int = 0, keep: int = 2,
                 resume: checkpoints.Checkpoint | None = None):  # fmt: skip
        super().__init__()
        if steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}.")
        if every_steps < 0 or keep < 1:
            raise ValueError(f"every_steps must be >= 0 and keep >= 1, got {every_steps} and {keep}.")
        self.directory = str(directory)
        self.steps_per_epoch, self.every_steps, self.keep = steps_per_epoch, every_steps, keep
        self.resume = resume
        self.last_saved: str | None = resume.path if resume else None
        self._step = 0
        self._last_batch = -1

    def on_train_begin(self, logs=None):
        checkpoints._gfile().makedirs(self.directory)
        self._step = int(keras.ops.convert_to_numpy(batch_counter(self.model.optimizer)))

    def on_epoch_begin(self, epoch, logs=None):
        self._last_batch = -1
        resume = self.resume
        if resume is not None and resume.step_in_epoch and epoch == resume.epoch and self._step == resume.step:
            for metric in self.model.metrics:
                for variable, value in zip(metric.variables, resume.epoch_metrics.get(metric.name, [])):
                    variable.assign(np.asarray(value, dtype=variable.dtype))

    def on_train_batch_end(self, batch, logs=None):
        self._step += batch - self._last_batch  # `batch` is the last step run (several with steps_per_execution)
        self._last_batch = batch
        loss = float(np.asarray(logs["loss"])) if logs and "loss" in logs else 0.0
        if not math.isfinite(loss):
            raise checkpoints.NonFiniteLossError(self._step, loss, self.last_saved)
        if self.every_steps and self._step % self.every_steps == 0 and self._step % self.steps_per_epoch:
            self.save()

    def on_epoch_end(self, epoch, logs=None):
        self.save()

    def save(self) -> str:
        """Write the checkpoint for the current step (model first, its record last) and prune old ones."""
        step, epoch = self._step, self._step // self.steps_per_epoch
        name = f"step-{step:09d}"
        model_path = os.path.join(self.directory, f"{name}.keras")
        epoch_metrics = {}
        if step % self.steps_per_epoch:
            to_list = lambda v: keras.ops.convert_to_numpy(v).tolist()  # noqa: E731
            epoch_metrics = {m.name: [to_list(v) for v in m.variables] for m in self.model.metrics}
        try:
            checkpoints.atomic_save_model(self.model, model_path)
            record = {"file": f"{name}.keras", "step": step, "epoch": epoch, "steps_per_epoch": self.steps_per_epoch,
                      "epoch_metrics": epoch_metrics}  # fmt: skip
            checkpoints.atomic_write_text(os.path.join(self.directory, f"{name}.json"), json.dumps(record, indent=1))
        except OSError as error:
            last = self.last_saved or "none"
            raise OSError(f"could not write the checkpoint for step {step} ({error}); last good checkpoint: {last}")
        self.last_saved = model_path
        checkpoint_logger.info("checkpoint %s", model_path)
        for old in checkpoints.list_checkpoints(self.directory)[: -self.keep]:
            for path in (old.path, old.path[: -len(".keras")] + ".json"):
                if checkpoints._gfile().exists(path):
                    checkpoints._gfile().remove(path)
        return model_path


# ---------------------------------------------------------------------- data
class SkippedImagesLogger(keras.callbacks.Callback):
    """Adds ``skipped_images`` (running total) to each epoch's logs and warns when it grows.

    Put it before ``CSVLogger``/``TensorBoard`` in the callback list so they record the column.
    """

    def __init__(self, source: ImageSource):
        super().__init__()
        self.source = source
        self._reported = 0

    def on_epoch_end(self, epoch, logs=None):
        count = self.source.skipped.count
        if logs is not None:
            logs["skipped_images"] = count
        if count > self._reported:
            data_logger.warning("%s: %d undecodable images skipped so far (%d this epoch)", self.source.name, count,
                           count - self._reported)  # fmt: skip
            self._reported = count


# ---------------------------------------------------------------- evaluation
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
        from keras_carp.evaluation.knn import knn_accuracy  # on first use: `import keras_carp` loads no protocol

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
        evaluation_logger.info("epoch %d: k-NN (k=%d) top-1 %.2f%%, top-5 %.2f%%", epoch + 1, self.k, result["top1"],
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
            evaluation_logger.warning(
                "COLLAPSE: epoch %d: %.0f%% of %d probe images go to one prototype (%d of %d prototypes used). "
                "CARP's partitions prevent this at N_B << K; check block_size, the learning rate and the teacher.",
                epoch + 1, 100 * share, len(winners), len(np.unique(winners)), num_prototypes,
            )  # fmt: skip
