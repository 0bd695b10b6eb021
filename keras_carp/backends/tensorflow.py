"""TensorFlow train step: GradientTape, teacher EMA by assign, then optimizer.apply (inside tf.function/XLA).

Under a ``tf.distribute`` strategy with N replicas (each on B/N images) the
step computes what one device computes on the global batch B:

- the partition comes from (seed, optimizer step), the same on every replica;
- the entropy's mean probability and the prototype count are cross-replica
  sums (``global_sum``); batch norm is synchronised (``CARP(sync_batch_norm=)``);
- each replica's loss is divided by N, and the optimizer sums the gradients
  across replicas (Keras' convention), so the update is the global-batch one;
- the teacher EMA runs once per variable in cross-replica context, from the
  (mirrored, identical) pre-step student weights, before the optimizer step.
"""

from __future__ import annotations

import tensorflow as tf
from keras import ops

from keras_carp.backends import stateful_logs
from keras_carp.distribute import across_workers
from keras_carp.optimizers import batch_counter


def _replica_context():
    """The replica context when the step runs on more than one replica, else None."""
    context = tf.distribute.get_replica_context()
    return context if context is not None and context.num_replicas_in_sync > 1 else None


def _ema_update(strategy, pairs, momentum):
    """Cross-replica context: teacher <- m * teacher + (1 - m) * student on every device's copy."""

    def update(teacher, student, m):
        return teacher.assign(m * teacher + (1.0 - m) * student)

    for student, teacher in pairs:
        strategy.extended.update(teacher.value, update, args=(student.value, momentum), group=False)


def train_step(model, data):
    """One CARP step inside Keras' ``tf.function`` (XLA when ``jit_compile``): variables change by assignment.

    ``tf.GradientTape`` records the forward; the gradients of the student's
    trainable variables are taken from the (replica-scaled, loss-scaled)
    loss; the teacher EMA assigns to the teacher's variables (in cross-replica
    context under a strategy) before ``optimizer.apply`` reads and writes the
    student's; BN statistics were assigned during the forward. Returns the
    logs of ``stateful_logs``.
    """
    step = ops.cast(batch_counter(model.optimizer), "int32")
    replica = _replica_context()
    global_sum = None
    if replica is not None:
        global_sum = lambda x: replica.all_reduce(tf.distribute.ReduceOp.SUM, x)  # noqa: E731
    with tf.GradientTape() as tape:
        logs = model.compute_carp_losses(data, step, training=True, global_sum=global_sum)
        loss = logs["loss"] if replica is None else logs["loss"] / replica.num_replicas_in_sync
        scaled_loss = model.optimizer.scale_loss(loss)
    trainable = model.trainable_variables
    gradients = tape.gradient(scaled_loss, trainable)
    # The teacher moves first, with the pre-step student weights (as released); automatic control
    # dependencies keep these reads of the student before the optimizer's writes.
    momentum = model.teacher_momentum(step)
    applied = model.applied_teacher_momentum(step, momentum)
    if replica is None:
        for student, teacher in model.ema_pairs:
            teacher.assign(applied * teacher + (1.0 - applied) * student)
    else:
        replica.merge_call(_ema_update, args=(model.ema_pairs, applied))
    model.optimizer.apply(gradients, trainable)
    logs = stateful_logs(model, logs, step, momentum)
    if across_workers(tf.distribute.get_strategy()):
        # Keras averages the logs of several workers with strategy.reduce(MEAN, axis=0), which needs an axis.
        logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
    return logs
