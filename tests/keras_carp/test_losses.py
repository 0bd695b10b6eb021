import numpy as np
import pytest
from keras import ops

import keras_carp
from keras_carp.losses import carp_loss, partition_probs
from tests import reference
from tests.conftest import to_numpy

pytestmark = pytest.mark.core


def _logits(rng, crops, n, k, scale=3.0):
    return [rng.normal(scale=scale, size=(n, k)).astype("float32") for _ in range(crops)]


def test_partition_probs_matches_numpy_softmax_within_permuted_blocks():
    rng = np.random.default_rng(1)
    logits = _logits(rng, 1, 5, 24)[0]
    perm = rng.permutation(24)
    probs = to_numpy(partition_probs(logits, ops.convert_to_tensor(perm, "int32"), 8))
    assert probs.shape == (3, 5, 8) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, reference.partition_probs(logits, perm, 8), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_local", [0, 2, 6])
def test_carp_loss_matches_numpy_reference(num_local):
    rng = np.random.default_rng(num_local)
    k, block = 48, 12
    student = _logits(rng, 2 + num_local, 6, k)
    teacher = _logits(rng, 2, 6, k)
    perm = rng.permutation(k)
    got = carp_loss(student, teacher, ops.convert_to_tensor(perm, "int32"), block)
    want = reference.carp_loss(student, teacher, perm, block)
    assert want["num_pairs"] == 2 * (2 + num_local) - 2
    for key in ("loss", "consistency", "entropy"):
        np.testing.assert_allclose(float(to_numpy(got[key])), want[key], rtol=1e-5, atol=1e-6)


def test_carp_loss_class_and_eps_clipping_of_disagreeing_views():
    k, block = 8, 4
    # One-hot views that put all mass on different prototypes: <s, t> = 0 -> clipped at eps.
    student = [np.eye(k, dtype="float32")[[0]] * 100.0, np.eye(k, dtype="float32")[[1]] * 100.0]
    teacher = [student[1], student[0]]
    out = keras_carp.CARPLoss(block)(student, teacher, ops.arange(k, dtype="int32"))
    want = reference.carp_loss(student, teacher, np.arange(k), block)
    np.testing.assert_allclose(float(to_numpy(out["consistency"])), want["consistency"], rtol=1e-5)
    assert np.isfinite(float(to_numpy(out["loss"])))


def test_global_sum_makes_entropy_use_the_global_batch():
    """Summing over two half batches reproduces the full-batch entropy."""
    rng = np.random.default_rng(3)
    k, block = 32, 8
    student, teacher = _logits(rng, 2, 8, k), _logits(rng, 2, 8, k)
    perm = ops.arange(k, dtype="int32")
    full = to_numpy(carp_loss(student, teacher, perm, block)["entropy"])
    other_half = [x[4:] for x in student + teacher]
    other = [partition_probs(x, perm, block) for x in other_half]
    other_sum = to_numpy(ops.sum(ops.stack([ops.sum(p, axis=1) for p in other]), axis=0))

    def global_sum(x):
        return x + (other_sum if len(x.shape) else 16.0)  # the other replica's share

    half = carp_loss([x[:4] for x in student], [x[:4] for x in teacher], perm, block, global_sum=global_sum)
    np.testing.assert_allclose(float(to_numpy(half["entropy"])), float(full), rtol=1e-5)


@pytest.mark.parametrize(
    "k, block, message",
    [(64, 24, "divide"), (64, 128, "larger"), (64, 0, "positive"), (0, 8, "positive")],
)
def test_bad_partition_sizes_raise_value_error(k, block, message):
    with pytest.raises(ValueError, match=message):
        keras_carp.losses.check_partition(k, block)


def test_loss_needs_two_teacher_views_and_two_global_student_crops():
    rng = np.random.default_rng(0)
    perm = ops.arange(8, dtype="int32")
    with pytest.raises(ValueError, match="2 teacher views"):
        carp_loss(_logits(rng, 2, 2, 8), _logits(rng, 1, 2, 8), perm, 4)
    with pytest.raises(ValueError, match="at least the 2 global"):
        carp_loss(_logits(rng, 1, 2, 8), _logits(rng, 2, 2, 8), perm, 4)


def test_permuting_prototypes_equals_gathering_logit_columns():
    head = keras_carp.CARPHead(num_prototypes=32, hidden_dim=16, bottleneck_dim=8)
    features = np.random.default_rng(0).normal(size=(4, 10)).astype("float32")
    head.build((None, 10))
    perm = ops.convert_to_tensor(np.random.default_rng(1).permutation(32), "int32")
    gathered = ops.take(head(features), perm, axis=1)
    permuted = head(features, permutation=perm)
    np.testing.assert_allclose(to_numpy(permuted), to_numpy(gathered), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_local", [0, 2])
def test_carp_loss_class_on_partitioned_logits_matches_the_reference(num_local):
    """CARPLoss(N_B)(s, t): logits already in partition order, no permutation; the reference gathers them itself."""
    rng = np.random.default_rng(7)
    k, block, n = 48, 8, 5
    student, teacher = _logits(rng, 2 + num_local, n, k), _logits(rng, 2, n, k)
    perm = rng.permutation(k)
    partitioned = [x[:, perm] for x in student], [x[:, perm] for x in teacher]
    got = keras_carp.CARPLoss(block)(*partitioned)
    want = reference.carp_loss(student, teacher, perm, block)
    with_permutation = keras_carp.CARPLoss(block)(student, teacher, ops.convert_to_tensor(perm, "int32"))
    function = keras_carp.partitioned_carp_loss(*partitioned, block)
    for key in ("loss", "consistency", "entropy"):
        np.testing.assert_allclose(float(to_numpy(got[key])), want[key], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(to_numpy(with_permutation[key])), want[key], rtol=1e-5, atol=1e-6)
        assert float(to_numpy(function[key])) == float(to_numpy(got[key]))
