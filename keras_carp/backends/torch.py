"""PyTorch train step: backward(), optimizer.apply, teacher EMA as two fused foreach ops."""

from __future__ import annotations

import torch
from keras import ops

from keras_carp.backends import stateful_logs


def train_step(model, data):
    # A copy: the optimizer increments its counter in place during apply().
    step = ops.cast(model.optimizer.iterations.value.clone(), "int32")
    model.zero_grad()
    logs = model.compute_carp_losses(data, step, training=True)
    model.optimizer.scale_loss(logs["loss"]).backward()
    trainable = model.trainable_variables
    gradients = [variable.value.grad for variable in trainable]
    with torch.no_grad():
        model.optimizer.apply(gradients, trainable)
        momentum = model.teacher_momentum(step)
        if model.ema_pairs:
            teacher = [t.value for _, t in model.ema_pairs]
            student = [s.value for s, _ in model.ema_pairs]
            torch._foreach_mul_(teacher, momentum)
            torch._foreach_add_(teacher, torch._foreach_mul(student, 1.0 - momentum))
    return stateful_logs(model, logs, step, momentum)
