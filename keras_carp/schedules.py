"""Per-batch schedules: the learning rate (cosine, warm-up, linear scaling) and the teacher momentum."""

from __future__ import annotations

import math

import keras
from keras import ops


def cosine_ramp(step, total_steps: int, start: float, end: float):
    """``end - (end - start) * (1 + cos(pi * t)) / 2`` with t = step / total_steps clipped to [0, 1]."""
    progress = ops.clip(ops.cast(step, "float32") / float(max(total_steps, 1)), 0.0, 1.0)
    return end - (end - start) * 0.5 * (1.0 + ops.cos(math.pi * progress))


@keras.saving.register_keras_serializable(package="keras_carp")
class WarmupCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to ``base_learning_rate * global_batch_size / 256``, then cosine to ``min_learning_rate``.

    Args:
        base_learning_rate: learning rate for a batch of ``reference_batch_size``
            (0.45 in the released code, 0.6 in the paper).
        global_batch_size: batch summed over all replicas (linear scaling rule).
        total_steps: length of the whole run in optimizer steps.
        warmup_steps: linear warm-up from 0 (0 = none, as in the released code).
        min_learning_rate: final value (0.0048 released, 0.06 paper).
        reference_batch_size: 256.
    """

    def __init__(
        self,
        base_learning_rate: float,
        global_batch_size: int,
        total_steps: int,
        warmup_steps: int = 0,
        min_learning_rate: float = 0.0,
        reference_batch_size: int = 256,
    ):
        for label, value in (
            ("global_batch_size", global_batch_size),
            ("total_steps", total_steps),
            ("warmup_steps", warmup_steps),
            ("reference_batch_size", reference_batch_size),
        ):
            if isinstance(value, bool) or int(value) != value:
                raise ValueError(f"{label} must be an integer number of images or steps, got {value!r}.")
        if base_learning_rate <= 0 or global_batch_size <= 0 or total_steps <= 0 or reference_batch_size <= 0:
            raise ValueError(
                "base_learning_rate, global_batch_size, total_steps and reference_batch_size must be positive; got "
                f"{base_learning_rate}, {global_batch_size}, {total_steps}, {reference_batch_size}."
            )
        if not 0 <= warmup_steps < total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}), got {warmup_steps}.")
        if min_learning_rate < 0:
            raise ValueError(f"min_learning_rate must be >= 0, got {min_learning_rate}.")
        self.base_learning_rate = float(base_learning_rate)
        self.global_batch_size = int(global_batch_size)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.min_learning_rate = float(min_learning_rate)
        self.reference_batch_size = int(reference_batch_size)

    @property
    def peak_learning_rate(self) -> float:
        return self.base_learning_rate * self.global_batch_size / self.reference_batch_size

    def __call__(self, step):
        step = ops.cast(step, "float32")
        peak = self.peak_learning_rate
        warmup = peak * step / float(max(self.warmup_steps, 1))
        decay = cosine_ramp(
            step - self.warmup_steps, self.total_steps - self.warmup_steps, peak, self.min_learning_rate
        )
        return ops.where(step < self.warmup_steps, warmup, decay)

    def get_config(self) -> dict:
        return {
            "base_learning_rate": self.base_learning_rate,
            "global_batch_size": self.global_batch_size,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "min_learning_rate": self.min_learning_rate,
            "reference_batch_size": self.reference_batch_size,
        }


@keras.saving.register_keras_serializable(package="keras_carp")
class TeacherMomentumSchedule:
    """The teacher's EMA momentum m per batch: a cosine from ``base_momentum`` to ``final_momentum``.

    ``m(step) = final - (final - base) * (1 + cos(pi * step / total_steps)) / 2``
    (step clipped to ``total_steps``): the teacher update ``teacher <- m *
    teacher + (1 - m) * student`` runs inside ``CARP``'s compiled train step,
    which owns this schedule (``CARP(teacher_momentum_schedule=...)``).
    ``TeacherMomentumSchedule(0, 0)`` is the no-momentum (siamese) ablation.

    Args:
        base_momentum: m at step 0 (0.99 in the paper, 0.996 / 0.9995 in
            released runs).
        final_momentum: m at the last step (1.0).
        total_steps: length of the whole run in batches. None: ``CARP.fit``
            resolves it to that call's ``epochs * steps_per_epoch``; the
            resolved length is saved with the model, so a run resumed from a
            ``.keras`` file keeps it. Called directly while None, the schedule
            returns ``base_momentum``.
    """

    def __init__(self, base_momentum: float = 0.99, final_momentum: float = 1.0, total_steps: int | None = None):
        for label, value in (("base_momentum", base_momentum), ("final_momentum", final_momentum)):
            if isinstance(value, bool) or not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"teacher {label} must be in [0, 1], got {value}.")
        if total_steps is not None and (isinstance(total_steps, bool) or int(total_steps) != total_steps):
            raise ValueError(f"teacher momentum total_steps must be an integer, got {total_steps!r}.")
        if total_steps is not None and total_steps <= 0:
            raise ValueError(f"teacher momentum total_steps must be positive, got {total_steps}.")
        self.base_momentum = float(base_momentum)
        self.final_momentum = float(final_momentum)
        self.total_steps = None if total_steps is None else int(total_steps)

    @property
    def is_constant(self) -> bool:
        """True when m does not depend on the step (then no run length is needed)."""
        return self.base_momentum == self.final_momentum

    def __call__(self, step):
        """m at batch ``step`` (a float32 scalar tensor); ``step`` may be a tensor."""
        if self.total_steps is None or self.is_constant:
            return ops.convert_to_tensor(self.base_momentum, "float32")
        return cosine_ramp(step, self.total_steps, self.base_momentum, self.final_momentum)

    def with_total_steps(self, total_steps: int) -> TeacherMomentumSchedule:
        """This schedule if its length is set, else a copy lasting ``total_steps`` batches."""
        if self.total_steps is not None:
            return self
        return TeacherMomentumSchedule(self.base_momentum, self.final_momentum, total_steps)

    def get_config(self) -> dict:
        return {
            "base_momentum": self.base_momentum,
            "final_momentum": self.final_momentum,
            "total_steps": self.total_steps,
        }

    @classmethod
    def from_config(cls, config: dict) -> TeacherMomentumSchedule:
        return cls(**config)

    def __eq__(self, other) -> bool:
        return isinstance(other, TeacherMomentumSchedule) and self.get_config() == other.get_config()

    def __hash__(self) -> int:
        return hash(tuple(self.get_config().items()))

    def __repr__(self) -> str:
        return (
            f"TeacherMomentumSchedule(base_momentum={self.base_momentum}, final_momentum={self.final_momentum}, "
            f"total_steps={self.total_steps})"
        )
