"""LARS for Keras 3, and AdamW with DINO's ViT schedule (neither ships with Keras or KerasHub, so both are here)."""

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


@keras.saving.register_keras_serializable(package="keras_carp")
class ScheduledAdamW(keras.optimizers.Optimizer):
    """AdamW as DINO trains ViTs: a weight-decay schedule, no decay on 1-D weights, frozen weights at the start.

    Per variable, as PyTorch's ``AdamW``::

        w <- w * (1 - lr * wd(t))                     (variables with more than one dimension)
        m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
        w <- w - lr * sqrt(1 - b2^s) / (1 - b1^s) * m / (sqrt(v) + eps)

    ``wd(t)`` is a float or a schedule of the batch count (DINO: cosine 0.04 -> 0.4).
    The variables named in ``frozen_paths`` (DINO: the last layer, here the
    prototypes) stay unchanged for the first ``frozen_steps`` steps: no decay,
    no moments; their Adam step count ``s`` starts when they thaw, as PyTorch's
    per-parameter count does when their gradients were dropped. Keras' own
    ``clipnorm`` clips each gradient's norm, as DINO's ``clip_gradients``.

    Keras' ``AdamW`` takes a constant decay and has no freezing, so this is written here.
    """

    def __init__(
        self,
        learning_rate=0.0005,
        weight_decay=0.04,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-8,
        frozen_paths: tuple[str, ...] | list[str] = (),
        frozen_steps: int = 0,
        name: str = "scheduled_adamw",
        **kwargs,
    ):
        kwargs.pop("weight_decay", None)
        if kwargs.get("gradient_accumulation_steps") == 1:  # Keras wants None or >= 2
            kwargs["gradient_accumulation_steps"] = None
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if isinstance(weight_decay, dict):
            weight_decay = keras.optimizers.schedules.deserialize(weight_decay)
        if isinstance(weight_decay, (int, float)) and weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
        for label, value in (("beta_1", beta_1), ("beta_2", beta_2)):
            if not 0 <= value < 1:
                raise ValueError(f"{label} must be in [0, 1), got {value}.")
        if frozen_steps < 0:
            raise ValueError(f"frozen_steps must be >= 0, got {frozen_steps}.")
        # Not `self.weight_decay`: the base class would apply it a second time, without the schedule.
        self.decay_schedule = weight_decay
        self.beta_1, self.beta_2, self.epsilon = beta_1, beta_2, epsilon
        self.frozen_paths = tuple(frozen_paths)
        self.frozen_steps = int(frozen_steps)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        missing = set(self.frozen_paths) - {variable.path for variable in variables}
        # By index: under TensorFlow, update_step sees the backend variable, which has no Keras path.
        self.frozen_indices = {i for i, variable in enumerate(variables) if variable.path in self.frozen_paths}
        if missing:
            raise ValueError(f"frozen_paths name no trained variable: {sorted(missing)}.")
        self.momentums = self.add_optimizer_variables(variables, "momentum")
        self.velocities = self.add_optimizer_variables(variables, "velocity")

    def weight_decay_at(self, step):
        """wd(step): the schedule's value, or the constant."""
        if callable(self.decay_schedule):
            return self.decay_schedule(step)
        return self.decay_schedule

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        gradient = ops.cast(gradient, dtype)
        step = ops.cast(self.iterations, dtype)
        index = keras_internals.optimizer_variable_index(self, variable)
        m, v = self.momentums[index], self.velocities[index]
        frozen = index in self.frozen_indices and self.frozen_steps > 0
        if frozen:
            step = step - self.frozen_steps
        count = step + 1
        old_m, old_v, old_w = (ops.convert_to_tensor(x) for x in (m, v, variable))
        new_m = self.beta_1 * old_m + (1 - self.beta_1) * gradient
        new_v = self.beta_2 * old_v + (1 - self.beta_2) * ops.square(gradient)
        alpha = lr * ops.sqrt(1 - ops.power(self.beta_2, count)) / (1 - ops.power(self.beta_1, count))
        new_w = old_w
        if len(variable.shape) > 1:
            new_w = new_w * (1 - lr * ops.cast(self.weight_decay_at(keras_internals.batch_counter(self)), dtype))
        new_w = new_w - alpha * new_m / (ops.sqrt(new_v) + self.epsilon)
        if frozen:  # before the thaw: nothing moves
            thawed = count > 0
            new_m, new_v, new_w = (ops.where(thawed, a, b) for a, b in ((new_m, old_m), (new_v, old_v), (new_w, old_w)))
        self.assign(m, new_m)
        self.assign(v, new_v)
        self.assign(variable, new_w)

    def get_config(self) -> dict:
        config = super().get_config()
        decay = self.decay_schedule
        if isinstance(decay, keras.optimizers.schedules.LearningRateSchedule):
            decay = keras.optimizers.schedules.serialize(decay)
        config.update(
            weight_decay=decay, beta_1=self.beta_1, beta_2=self.beta_2, epsilon=self.epsilon,
            frozen_paths=list(self.frozen_paths), frozen_steps=self.frozen_steps,
        )  # fmt: skip
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
