"""PyTorch train step: backward(), the teacher EMA as two fused foreach ops, then optimizer.apply."""

from __future__ import annotations

import torch
from keras import ops

from keras_carp.backends import stateful_logs
from keras_carp.optimizers import batch_counter


def train_step(model, data):
    """One eager CARP step: ``backward()`` fills ``.grad`` of the student's variables, then in-place updates.

    The batch counter is copied first (``optimizer.apply`` increments it in
    place); the teacher EMA runs under ``torch.no_grad`` as two fused
    ``torch._foreach`` ops over all teacher tensors, from the pre-step student
    weights, before ``optimizer.apply``. Returns the logs of ``stateful_logs``.
    """
    # A copy: the optimizer increments its counter in place during apply().
    step = ops.cast(batch_counter(model.optimizer).value.clone(), "int32")
    model.zero_grad()
    logs = model.compute_carp_losses(data, step, training=True)
    model.optimizer.scale_loss(logs["loss"]).backward()
    trainable = model.trainable_variables
    gradients = [variable.value.grad for variable in trainable]
    with torch.no_grad():
        # The teacher moves first, with the pre-step student weights (as released).
        momentum = model.teacher_momentum(step)
        applied = model.applied_teacher_momentum(step, momentum)
        if model.ema_pairs:
            teacher = [t.value for _, t in model.ema_pairs]
            student = [s.value for s, _ in model.ema_pairs]
            torch._foreach_mul_(teacher, applied)
            torch._foreach_add_(teacher, torch._foreach_mul(student, 1.0 - applied))
        model.optimizer.apply(gradients, trainable)
    return stateful_logs(model, logs, step, momentum)
