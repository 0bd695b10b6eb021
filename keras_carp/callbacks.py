"""Callbacks: the teacher's exponential moving average, and TensorBoard curves indexed by optimizer step."""

from __future__ import annotations

import keras

from keras_carp.optimizers import batch_counter
from keras_carp.schedules import cosine_ramp


@keras.saving.register_keras_serializable(package="keras_carp")
class TeacherEMA(keras.callbacks.Callback):
    """Teacher <- m * teacher + (1 - m) * student at every optimizer step, from the pre-step student weights.

    m follows a per-step cosine from ``base_momentum`` to ``final_momentum`` over
    the whole run (``epochs * steps_per_epoch`` of the ``fit`` call, or
    ``total_steps``); ``TeacherEMA(0, 0)`` is the no-momentum (siamese)
    ablation. Only trainable weights are averaged; the teacher's batch-norm
    statistics come from its own forward passes.

    The callback owns the schedule; the update itself runs inside the compiled
    train step (``CARP`` asks this callback for m at the current step), as one
    fused pass over all variables. Doing it in ``on_train_batch_end`` instead
    would cost a host round trip and one eager op per variable each step, and
    under JAX the trainer keeps the variables outside the model during ``fit``,
    so an update made from a callback would be overwritten by the next step.
    The momentum in use is logged as ``teacher_momentum``.
    """

    def __init__(self, base_momentum: float = 0.99, final_momentum: float = 1.0, total_steps: int | None = None):
        super().__init__()
        for label, value in (("base_momentum", base_momentum), ("final_momentum", final_momentum)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"TeacherEMA {label} must be in [0, 1], got {value}.")
        if total_steps is not None and total_steps <= 0:
            raise ValueError(f"TeacherEMA total_steps must be positive, got {total_steps}.")
        self.base_momentum = float(base_momentum)
        self.final_momentum = float(final_momentum)
        self.requested_total_steps = total_steps
        self.total_steps = total_steps

    def momentum(self, step):
        """Teacher momentum m at optimizer step ``step`` (a scalar tensor)."""
        if self.total_steps is None or self.base_momentum == self.final_momentum:
            return keras.ops.convert_to_tensor(self.base_momentum, "float32")
        return cosine_ramp(step, self.total_steps, self.base_momentum, self.final_momentum)

    def on_train_begin(self, logs=None):
        model = self.model
        if not hasattr(model, "attach_teacher_ema"):
            raise TypeError(f"TeacherEMA works with keras_carp.CARP models, got {type(model).__name__}.")
        self.total_steps = self.requested_total_steps
        if self.total_steps is None:
            epochs, steps = self.params.get("epochs"), self.params.get("steps")
            if not epochs or not steps:
                raise ValueError(
                    "TeacherEMA cannot tell the run's length (the dataset has no known size); "
                    "pass fit(steps_per_epoch=...) or TeacherEMA(total_steps=...)."
                )
            self.total_steps = int(epochs) * int(steps)
        model.attach_teacher_ema(self)

    def get_config(self) -> dict:
        return {
            "base_momentum": self.base_momentum,
            "final_momentum": self.final_momentum,
            "total_steps": self.requested_total_steps,
        }

    def resolved_config(self) -> dict:
        """The config with the run's length filled in (saved with a model so a resumed run keeps the schedule)."""
        return {**self.get_config(), "total_steps": self.total_steps}

    @classmethod
    def from_config(cls, config: dict) -> TeacherEMA:
        return cls(**config)


class StepTensorBoard(keras.callbacks.TensorBoard):
    """Keras' ``TensorBoard`` whose step summaries are indexed by the optimizer step, not by batches of this fit.

    Keras counts step summaries from 0 at every ``fit`` call, so a resumed
    run's curves would restart at the left edge; here they continue from the
    step the model was restored at. Epoch summaries are unchanged (Keras
    already indexes them by epoch, and ``initial_epoch`` carries on).
    """

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        # Keras increments this counter before each step's summaries; start it at the restored step.
        self._global_train_batch = int(keras.ops.convert_to_numpy(batch_counter(self.model.optimizer)))


class RunCSVLogger(keras.callbacks.CSVLogger):
    """Keras' ``CSVLogger`` that also works on ``gs://`` paths.

    Keras opens remote paths with ``tf.io.gfile.GFile``, which has no
    ``closed`` attribute, and then fails at the end of ``fit``; this closes
    the file without asking.
    """

    def on_train_end(self, logs=None):
        if self.csv_file is not None:
            self.csv_file.close()
            self.csv_file = None
        self.writer = None
