import numpy as np
import pytest
from scipy import stats

from keras_carp.partition import random_permutation, sequential_permutation
from tests import reference
from tests.conftest import to_numpy

pytestmark = pytest.mark.core


def test_permutation_is_a_pure_function_of_seed_and_step_and_matches_numpy():
    for seed, step in [(0, 0), (0, 1), (7, 123456), (2**31 - 1, 2**20)]:
        got = to_numpy(random_permutation(1000, seed, step))
        np.testing.assert_array_equal(got, reference.permutation(1000, seed, step))
        np.testing.assert_array_equal(got, to_numpy(random_permutation(1000, seed, step)))
        assert sorted(got.tolist()) == list(range(1000))


def test_steps_and_seeds_give_different_partitions():
    a, b, c = (to_numpy(random_permutation(512, s, t)) for s, t in [(0, 5), (0, 6), (1, 5)])
    assert (a != b).mean() > 0.9 and (a != c).mean() > 0.9


def test_permutation_is_uniform():
    """Where prototype 0 lands is uniform over 8 blocks (chi-square over 4000 steps)."""
    k, blocks, steps = 256, 8, 4000
    landing = [int(np.argmax(to_numpy(random_permutation(k, 3, s)) == 0)) // (k // blocks) for s in range(steps)]
    counts = np.bincount(landing, minlength=blocks)
    assert stats.chisquare(counts).pvalue > 1e-3


def test_fixed_partition_is_sequential():
    np.testing.assert_array_equal(to_numpy(sequential_permutation(16)), np.arange(16))
