"""TensorFlow train step: GradientTape, optimizer.apply, teacher EMA by assign (inside tf.function/XLA)."""

from __future__ import annotations

import tensorflow as tf
from keras import ops

from keras_carp.backends import stateful_logs


def train_step(model, data):
    step = ops.cast(model.optimizer.iterations, "int32")
    with tf.GradientTape() as tape:
        logs = model.compute_carp_losses(data, step, training=True)
        scaled_loss = model.optimizer.scale_loss(logs["loss"])
    trainable = model.trainable_variables
    gradients = tape.gradient(scaled_loss, trainable)
    model.optimizer.apply(gradients, trainable)
    momentum = model.teacher_momentum(step)
    for student, teacher in model.ema_pairs:
        teacher.assign(momentum * teacher + (1.0 - momentum) * student)
    return stateful_logs(model, logs, step, momentum)
