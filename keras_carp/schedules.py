"""Per-step schedules: the learning rate (cosine, warm-up, linear scaling) and teacher momentum."""

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
