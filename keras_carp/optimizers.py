"""LARS for Keras 3 (none ships with Keras or KerasHub, so it is written here)."""

from __future__ import annotations

import keras
from keras import ops

from keras_carp import keras_internals


@keras.saving.register_keras_serializable(package="keras_carp")
class LARS(keras.optimizers.Optimizer):
    """Layer-wise Adaptive Rate Scaling, as in the CARP/DINO/SwAV releases.

    For every variable with more than one dimension::

        g <- g + weight_decay * w
        g <- g * eta * ||w|| / ||g||      (when both norms are positive)

    1-D variables (biases, batch-norm scales and offsets) get neither weight
    decay nor the trust ratio. Then ``mu <- momentum * mu + g; w <- w - lr * mu``.

    Args:
        learning_rate: float or a ``LearningRateSchedule``.
        momentum: heavy-ball momentum (0.9).
        weight_decay: L2 coefficient added to the gradient (1e-6), not decoupled.
        eta: trust coefficient (0.001).
        gradient_accumulation_steps: Keras' option (average the gradients of
            N batches into one step); 1 or None: off.
    """

    def __init__(
        self,
        learning_rate=0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        eta: float = 0.001,
        name: str = "lars",
        **kwargs,
    ):
        kwargs.pop("weight_decay", None)
        if kwargs.get("gradient_accumulation_steps") == 1:  # Keras wants None or >= 2
            kwargs["gradient_accumulation_steps"] = None
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        for label, value in (("momentum", momentum), ("weight_decay", weight_decay), ("eta", eta)):
            if value < 0:
                raise ValueError(f"LARS {label} must be >= 0, got {value}.")
        if momentum >= 1:
            raise ValueError(f"LARS momentum must be in [0, 1), got {momentum}.")
        self.momentum = momentum
        # Not `self.weight_decay`: the base class would apply it a second time, decoupled.
        self.lars_weight_decay = weight_decay
        self.eta = eta

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = self.add_optimizer_variables(variables, "momentum")

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        gradient = ops.cast(gradient, dtype)
        if len(variable.shape) > 1:
            gradient = gradient + self.lars_weight_decay * variable
            weight_norm = ops.sqrt(ops.sum(ops.square(variable)))
            grad_norm = ops.sqrt(ops.sum(ops.square(gradient)))
            trust = ops.where(
                ops.logical_and(weight_norm > 0, grad_norm > 0),
                self.eta * weight_norm / ops.maximum(grad_norm, 1e-30),
                ops.ones_like(weight_norm),
            )
            gradient = gradient * trust
        momentum = self.momentums[keras_internals.optimizer_variable_index(self, variable)]
        self.assign(momentum, self.momentum * momentum + gradient)
        self.assign_sub(variable, lr * momentum)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(momentum=self.momentum, weight_decay=self.lars_weight_decay, eta=self.eta)
        return config


def base_optimizer(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    """The optimizer that updates the weights (the inner one of a ``LossScaleOptimizer``)."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def accumulation_steps(optimizer: keras.optimizers.Optimizer) -> int:
    """Batches whose gradients are summed into one optimizer step (Keras' ``gradient_accumulation_steps``; 1 if off)."""
    return int(base_optimizer(optimizer).gradient_accumulation_steps or 1)


def batch_counter(optimizer: keras.optimizers.Optimizer):
    """The optimizer's count of training batches, a variable.

    The learning-rate schedule, the teacher momentum, the partition and the run
    directory's checkpoints are all indexed by batch, as in the released code.
    Keras' public ``iterations`` counts optimizer steps: with gradient
    accumulation over N batches it is the batch count // N. The batch count is
    the private ``_iterations`` variable that Keras' schedules read
    (``keras_carp.keras_internals.batch_counter``).
    """
    return keras_internals.batch_counter(base_optimizer(optimizer))
