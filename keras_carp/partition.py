"""Random partitions of the prototype set, drawn statelessly from (seed, step).

CARP redraws a uniformly random permutation of the K prototype indices at every
step and cuts it into N_P = K / N_B consecutive blocks of N_B. The permutation
here is a pure function of ``(seed, step)``: the same on every replica of a
distributed step, reproducible after a resume, and identical on the TensorFlow,
JAX and PyTorch backends, because it uses only 32-bit integer ``keras.ops``.

Keys are ``hash(hash(hash(seed) + step) + i)`` for i in [0, K) with the
"lowbias32" integer mixer (a bijection on 32-bit words, so the K keys are
distinct and ``argsort`` yields a permutation with no ties).
"""

from __future__ import annotations

from keras import ops

# lowbias32 multipliers (0x7FEB352D, 0x846CA68B) as two's-complement int32.
_MULTIPLIER_1 = 0x7FEB352D
_MULTIPLIER_2 = 0x846CA68B - (1 << 32)


def _logical_right_shift(x, bits: int):
    """x >> bits on the 32-bit pattern of an int32 tensor (zero fill)."""
    return ops.bitwise_and(ops.right_shift(x, bits), (1 << (32 - bits)) - 1)


def mix32(x):
    """The lowbias32 integer hash on int32 tensors (wrapping arithmetic)."""
    x = ops.cast(x, "int32")
    x = ops.bitwise_xor(x, _logical_right_shift(x, 16))
    x = x * _MULTIPLIER_1
    x = ops.bitwise_xor(x, _logical_right_shift(x, 15))
    x = x * _MULTIPLIER_2
    return ops.bitwise_xor(x, _logical_right_shift(x, 16))


def random_permutation(num_prototypes: int, seed, step):
    """A uniformly random permutation of ``range(num_prototypes)`` keyed by (seed, step).

    ``seed`` and ``step`` may be Python ints or integer scalar tensors (the
    optimizer's iteration counter inside a compiled step). Returns int32 [K].
    """
    step_key = mix32(mix32(ops.convert_to_tensor(seed, "int32")) + ops.cast(step, "int32"))
    keys = mix32(ops.arange(num_prototypes, dtype="int32") + step_key)
    return ops.cast(ops.argsort(keys), "int32")


def sequential_permutation(num_prototypes: int):
    """The fixed partition ablation: blocks made once, sequentially, never redrawn."""
    return ops.arange(num_prototypes, dtype="int32")
