"""JAX train step: a pure function of (trainable, non-trainable, optimizer, metric) state.

The forward runs under ``keras.StatelessScope`` so that batch-norm statistics
(student and teacher) come back as new state; the teacher EMA (from the
pre-step student weights) is applied to the teacher's entries of the
non-trainable state, so ``fit`` carries it forward; then the optimizer step.
"""

from __future__ import annotations

import jax
import keras
from keras import ops

from keras_carp.optimizers import batch_counter


def _index_of(variables) -> dict:
    return {id(v): i for i, v in enumerate(variables)}


def state_mapping(model, trainable, non_trainable, optimizer_state) -> list:
    """(variable, value) pairs for ``keras.StatelessScope``: the model's and the optimizer's state."""
    return (
        list(zip(model.trainable_variables, trainable))
        + list(zip(model.non_trainable_variables, non_trainable))
        + list(zip(model.optimizer.variables, optimizer_state))
    )


def train_step(model, state, data):
    """One CARP step as a pure function: ``(logs, new_state) = train_step(model, state, data)``.

    ``state`` is (trainable, non-trainable, optimizer, metric) values as Keras'
    JAX trainer passes them (jitted, with the state donated). The forward runs
    in a ``keras.StatelessScope`` under ``jax.value_and_grad`` with respect to
    the trainable values; the BN statistics come back as new non-trainable
    values, the teacher EMA is applied to the teacher's non-trainable values
    from the pre-step trainable ones, the optimizer step is
    ``stateless_apply``, and the trackers update statelessly.
    """
    trainable, non_trainable, optimizer_state, metric_state = state
    optimizer = model.optimizer
    step = ops.cast(optimizer_state[_index_of(optimizer.variables)[id(batch_counter(optimizer))]], "int32")

    def scaled_loss(trainable, non_trainable):
        with keras.StatelessScope(
            state_mapping=state_mapping(model, trainable, non_trainable, optimizer_state)
        ) as scope:
            logs = model.compute_carp_losses(data, step, training=True)
            loss = optimizer.scale_loss(logs["loss"])
        return loss, (logs, [scope.get_current_value(v) for v in model.non_trainable_variables])

    grad_fn = jax.value_and_grad(scaled_loss, has_aux=True)
    (_, (logs, non_trainable)), gradients = grad_fn(trainable, non_trainable)

    # The teacher moves first, with the pre-step student weights (as released).
    momentum = model.teacher_momentum(step)
    applied = model.applied_teacher_momentum(step, momentum)
    trainable_index = _index_of(model.trainable_variables)
    non_trainable_index = _index_of(model.non_trainable_variables)
    non_trainable = list(non_trainable)
    for student, teacher in model.ema_pairs:
        t, s = non_trainable_index[id(teacher)], trainable_index[id(student)]
        non_trainable[t] = applied * non_trainable[t] + (1.0 - applied) * trainable[s]
    trainable, optimizer_state = optimizer.stateless_apply(optimizer_state, gradients, trainable)

    results, new_metric_state, offset = {}, [], 0
    for tracker in model.trackers:
        tracker_state = metric_state[offset : offset + len(tracker.variables)]
        offset += len(tracker.variables)
        tracker_state = tracker.stateless_update_state(tracker_state, logs[tracker.name])
        results[tracker.name] = tracker.stateless_result(tracker_state)
        new_metric_state.extend(tracker_state)
    results["teacher_momentum"] = momentum
    with keras.StatelessScope(state_mapping=list(zip(optimizer.variables, optimizer_state))):
        results["learning_rate"] = model.current_learning_rate(step)
    return results, (trainable, non_trainable, optimizer_state, new_metric_state)
