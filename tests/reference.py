"""Independent NumPy references for the CARP math (written from CARP_SPEC.md, not from the library)."""

import numpy as np

EPS = np.finfo(np.float32).eps


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def partition_probs(logits, permutation, block_size):
    permuted = np.asarray(logits, np.float64)[:, permutation]
    n, k = permuted.shape
    return softmax(permuted.reshape(n, k // block_size, block_size).transpose(1, 0, 2))


def carp_loss(student_logits, teacher_logits, permutation, block_size):
    student = [partition_probs(x, permutation, block_size) for x in student_logits]
    teacher = [partition_probs(x, permutation, block_size) for x in teacher_logits]
    pairs = []
    for i, s in enumerate(student):
        for j, t in enumerate(teacher):
            if i != j:
                pairs.append(np.mean(-np.log(np.clip((s * t).sum(-1), EPS, 1 - EPS))))
    consistency = np.mean(pairs)
    mean_probs = np.concatenate(student + teacher, axis=1).mean(axis=1)
    entropy = np.mean(np.log(block_size) + (mean_probs * np.log(np.clip(mean_probs, EPS, 1 - EPS))).sum(-1))
    return {"loss": consistency + entropy, "consistency": consistency, "entropy": entropy, "num_pairs": len(pairs)}


def lowbias32(x):
    x = np.asarray(x, np.uint32)
    x ^= x >> np.uint32(16)
    x = (x * np.uint32(0x7FEB352D)).astype(np.uint32)
    x ^= x >> np.uint32(15)
    x = (x * np.uint32(0x846CA68B)).astype(np.uint32)
    x ^= x >> np.uint32(16)
    return x


def permutation(num_prototypes, seed, step):
    with np.errstate(over="ignore"):
        step_key = lowbias32(lowbias32(np.uint32(seed)) + np.uint32(step))
        keys = lowbias32(np.arange(num_prototypes, dtype=np.uint32) + step_key)
    return np.argsort(keys.view(np.int32), kind="stable")


def lars_step(w, g, momentum_buffer, lr, momentum=0.9, weight_decay=1e-6, eta=0.001):
    g = g.astype(np.float64).copy()
    if w.ndim > 1:
        g = g + weight_decay * w
        w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
        if w_norm > 0 and g_norm > 0:
            g = g * eta * w_norm / g_norm
    momentum_buffer = momentum * momentum_buffer + g
    return w - lr * momentum_buffer, momentum_buffer
