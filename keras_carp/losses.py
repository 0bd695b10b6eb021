"""The CARP loss: consistency of views over random partitions, plus an entropy term.

Notation follows the paper: K prototypes, block size N_B, N_P = K / N_B blocks.
For every crop the [N, K] logits are put in partition order ("partitioned
logits": block b is columns b * N_B .. (b + 1) * N_B - 1), cut into N_P blocks
of N_B and softmaxed within each block: ``probs`` has shape [N_P, N, N_B].
``CARPLoss(N_B)`` on partitioned logits is the loss the train step computes;
``carp_loss`` takes logits in prototype order and the step's permutation.

- consistency: for every (student crop i, teacher view j) with i != j,
  ``-log clip(<s_i, t_j>, eps, 1 - eps)`` averaged over blocks and batch; then
  averaged over pairs (14 pairs with 2 global + 6 local crops).
- entropy: p_bar = mean over the batch axis of the concatenated probabilities
  of every student crop and both teacher views ([N_P, N_B], over the global
  batch); the term is the mean over blocks of ``log N_B + sum p_bar log p_bar``
  (KL to the uniform distribution).

Total = consistency + entropy, no temperature and no weight. Everything here is
``keras.ops`` and runs on every backend; probabilities are float32 whatever the
compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import numpy as np
from keras import ops

EPS = float(np.finfo(np.float32).eps)
NUM_TEACHER_VIEWS = 2


def check_partition(num_prototypes: int, block_size: int) -> None:
    """Raise a ValueError unless ``block_size`` cuts K into whole blocks."""
    if not isinstance(num_prototypes, (int, np.integer)) or num_prototypes <= 0:
        raise ValueError(f"num_prototypes (K) must be a positive integer, got {num_prototypes!r}.")
    if not isinstance(block_size, (int, np.integer)) or block_size <= 0:
        raise ValueError(f"block_size (N_B) must be a positive integer, got {block_size!r}.")
    if block_size > num_prototypes:
        raise ValueError(
            f"block_size (N_B={block_size}) is larger than the number of prototypes "
            f"(K={num_prototypes}); use N_B <= K (N_B = K is the one-block ablation)."
        )
    if num_prototypes % block_size:
        raise ValueError(
            f"block_size (N_B={block_size}) must divide the number of prototypes "
            f"(K={num_prototypes}) so that the partition has whole blocks."
        )


def block_softmax(permuted_logits, block_size: int):
    """Softmax within consecutive blocks of already-permuted [N, K] logits -> [N_P, N, N_B]."""
    num_prototypes = permuted_logits.shape[-1]
    check_partition(num_prototypes, block_size)
    logits = ops.cast(permuted_logits, "float32")
    blocks = ops.reshape(logits, (-1, num_prototypes // block_size, block_size))
    return ops.softmax(ops.transpose(blocks, (1, 0, 2)), axis=-1)


def partition_probs(logits, permutation, block_size: int):
    """Block probabilities of [N, K] logits under a partition.

    Args:
        logits: [N, K] prototype scores (any float dtype).
        permutation: int tensor of length K; block b holds prototypes
            ``permutation[b * N_B:(b + 1) * N_B]``.
        block_size: N_B, which must divide K.

    Returns:
        float32 [K // N_B, N, N_B]: the softmax within each block.
    """
    return block_softmax(ops.take(logits, permutation, axis=1), block_size)


def _consistency(student_probs: Sequence, teacher_probs: Sequence):
    """Mean over pairs (i != j) of the mean over blocks and batch of -log<s_i, t_j>."""
    terms = []
    for i, student in enumerate(student_probs):
        for j, teacher in enumerate(teacher_probs):
            if i == j:
                continue
            agreement = ops.sum(student * teacher, axis=-1)
            terms.append(ops.mean(-ops.log(ops.clip(agreement, EPS, 1.0 - EPS))))
    return ops.mean(ops.stack(terms))


def _entropy(all_probs: Sequence, global_sum: Callable | None):
    """Mean over blocks of KL(p_bar || uniform), p_bar over the (global) batch."""
    probs_sum = ops.sum(ops.stack([ops.sum(p, axis=1) for p in all_probs]), axis=0)
    count = ops.cast(sum(ops.shape(p)[1] for p in all_probs), "float32")
    if global_sum is not None:
        probs_sum, count = global_sum(probs_sum), global_sum(count)
    mean_probs = probs_sum / count
    block_size = mean_probs.shape[-1]
    kl = float(np.log(block_size)) + ops.sum(mean_probs * ops.log(ops.clip(mean_probs, EPS, 1.0 - EPS)), axis=-1)
    return ops.mean(kl)


def carp_loss_from_probs(student_probs: Sequence, teacher_probs: Sequence, global_sum: Callable | None = None) -> dict:
    """The CARP loss from block probabilities (see ``carp_loss``)."""
    if len(teacher_probs) != NUM_TEACHER_VIEWS:
        raise ValueError(
            f"CARP needs exactly {NUM_TEACHER_VIEWS} teacher views (the global crops), got {len(teacher_probs)}."
        )
    if len(student_probs) < NUM_TEACHER_VIEWS:
        raise ValueError(
            f"The student must see at least the 2 global crops (listed first), got {len(student_probs)} crop(s)."
        )
    teacher_probs = [ops.stop_gradient(t) for t in teacher_probs]
    consistency = _consistency(student_probs, teacher_probs)
    entropy = _entropy(list(student_probs) + teacher_probs, global_sum)
    return {"loss": consistency + entropy, "consistency": consistency, "entropy": entropy}


def partitioned_carp_loss(
    student_logits: Sequence,
    teacher_logits: Sequence,
    block_size: int,
    global_sum: Callable | None = None,
) -> dict:
    """The CARP loss of already-partitioned logits (the prototype axis in partition order).

    Block b of the partition is columns ``b * N_B`` to ``(b + 1) * N_B - 1``;
    ``CARP``'s train step gets such logits directly from ``CARPHead(...,
    permutation=)``. Returns the float32 scalars ``loss``, ``consistency`` and
    ``entropy``; see ``carp_loss`` for the arguments.
    """
    student = [block_softmax(x, block_size) for x in student_logits]
    teacher = [block_softmax(x, block_size) for x in teacher_logits]
    return carp_loss_from_probs(student, teacher, global_sum)


def carp_loss(
    student_logits: Sequence,
    teacher_logits: Sequence,
    permutation,
    block_size: int,
    global_sum: Callable | None = None,
) -> dict:
    """The CARP loss of one step, from logits in prototype order and the step's partition.

    Gathers the columns of every [N, K] logit tensor in ``permutation`` order
    and computes ``partitioned_carp_loss`` (the code the train step runs).

    Args:
        student_logits: list of [N, K] tensors, one per student crop, the 2
            global crops first.
        teacher_logits: list of the 2 teacher [N, K] tensors (global crops).
        permutation: int tensor of length K (the step's random partition):
            block b holds prototypes ``permutation[b * N_B:(b + 1) * N_B]``.
        block_size: N_B, which must divide K.
        global_sum: optional function summing a tensor over all replicas, so
            that the entropy's mean is over the global batch; None on one device.

    Returns:
        dict of float32 scalars ``loss``, ``consistency`` and ``entropy``.
    """
    student = [ops.take(x, permutation, axis=1) for x in student_logits]
    teacher = [ops.take(x, permutation, axis=1) for x in teacher_logits]
    return partitioned_carp_loss(student, teacher, block_size, global_sum)


@keras.saving.register_keras_serializable(package="keras_carp")
class CARPLoss:
    """The CARP loss with its block size N_B bound; the loss ``CARP``'s train step computes.

    ``CARPLoss(N_B)(student_logits, teacher_logits)`` takes partitioned
    logits: lists of [N, K] tensors (every student crop, the 2 global crops
    first; the 2 teacher views) whose prototype axis is already in partition
    order, N_P = K / N_B blocks of N_B consecutive columns. With
    ``permutation`` (an int tensor of length K) the logits are in prototype
    order and are gathered first: ``CARPLoss(N_B)(s, t, permutation)`` equals
    ``carp_loss(s, t, permutation, N_B)``. ``global_sum`` sums a tensor over
    replicas (the entropy's batch mean is then global). Returns a dict of
    float32 scalars ``loss``, ``consistency`` and ``entropy``.
    """

    def __init__(self, block_size: int = 512):
        if not isinstance(block_size, (int, np.integer)) or block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}.")
        self.block_size = int(block_size)

    def __call__(self, student_logits, teacher_logits, permutation=None, global_sum=None) -> dict:
        if permutation is None:
            return partitioned_carp_loss(student_logits, teacher_logits, self.block_size, global_sum)
        return carp_loss(student_logits, teacher_logits, permutation, self.block_size, global_sum)

    def get_config(self) -> dict:
        return {"block_size": self.block_size}

    @classmethod
    def from_config(cls, config: dict) -> CARPLoss:
        return cls(**config)
