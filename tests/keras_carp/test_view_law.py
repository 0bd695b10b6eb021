"""One law for the views: the host (tf.data) and device (keras.ops) recipes against the released recipe.

Each operation of both implementations is checked against torchvision's
algorithm (transcribed in ``tests.view_reference``) or Pillow itself, on real
photos: the crop window one for one from the same uniforms and in
distribution from each implementation's own randomness (KS tests), each
colour-jitter operation and their random order, grayscale, PIL's Gaussian
blur and solarisation. Pillow works on 8-bit images and rounds after every
operation; ours work in float32, so a difference of a fraction of a grey
level on average is the rounding, not the law.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from scipy import stats
from sklearn.datasets import load_sample_images

from keras_carp import device_augmentation as device
from keras_carp.data import augment as host
from keras_carp.view_recipe import JITTER_STRENGTH
from tests import view_reference as reference
from tests.conftest import to_numpy

pytestmark = pytest.mark.core

IMPLEMENTATIONS = ("host", "device")
IMAGE_SIZES = [(240, 320), (500, 375), (100, 400), (32, 32)]
CROPS = {"global": (0.2, 1.0), "local": (0.05, 0.2)}
RATIO = (3 / 4, 4 / 3)
WINDOWS = 4000  # per image size and crop kind: the KS test sees mean shifts of ~0.03 standard deviations


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """16 uint8 patches of the two sample photos at 48 x 48: colourful, textured, with flat regions."""
    rng = np.random.default_rng(0)
    patches = []
    for photo in load_sample_images().images:
        for _ in range(8):
            top, left = rng.integers(0, photo.shape[0] - 192), rng.integers(0, photo.shape[1] - 192)
            patch = Image.fromarray(photo[top : top + 192, left : left + 192]).resize(
                (48, 48), Image.Resampling.BICUBIC
            )
            patches.append(np.asarray(patch))
    return np.stack(patches)


# ---------------------------------------------------------------------------------------------- the two recipes
def windows_from_draws(implementation: str, height: int, width: int, scale, draws: np.ndarray) -> np.ndarray:
    """[N, 4] (top, left, h, w) windows of one implementation from the same uniforms as the reference."""
    if implementation == "host":
        shape = tf.constant([height, width, 3])
        fn = tf.function(lambda d: tf.concat(host.sample_window(shape, scale, RATIO, d), 0))
        return np.stack([fn(tf.constant(d, tf.float32)).numpy() for d in draws]).astype("float64")
    n = len(draws)
    top, left, h, w = device.crop_windows(np.full(n, height, "float32"), np.full(n, width, "float32"), scale, RATIO,
                                          draws.astype("float32"))  # fmt: skip
    return np.stack([to_numpy(x) for x in (top, left, h, w)], axis=1).astype("float64")


def seeded_windows(implementation: str, height: int, width: int, scale, count: int) -> np.ndarray:
    """[count, 4] windows drawn with each implementation's own randomness (stateless seeds / counter hash)."""
    if implementation == "host":
        shape = tf.constant([height, width, 3])
        windows = (
            tf.data.Dataset.random(seed=11)
            .batch(2)
            .take(count)
            .map(lambda seed: tf.concat(host.crop_window(shape, scale, RATIO, seed), 0))
        )
        return np.concatenate([b.numpy() for b in windows.batch(1000)]).astype("float64")
    keys = device.view_keys(11, 3, np.arange(count, dtype="int32"))
    draws = device.uniform_draws(keys, 0, 22)
    return windows_from_draws("device", height, width, scale, to_numpy(draws))


def jitter(implementation: str, images: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Colour jitter of float [0, 1] images from [N, 8] draws (4 strengths, then 4 order keys)."""
    images = np.asarray(images, "float32")
    if implementation == "host":
        return np.stack(
            [_host_jitter(tf.constant(x), tf.constant(d, tf.float32)).numpy() for x, d in zip(images, draws)]
        )
    return to_numpy(device.color_jitter(images, draws.astype("float32")))


_host_jitter = tf.function(host.color_jitter, reduce_retracing=True)


def draw_for(index: int, value: float) -> float:
    """The uniform draw that gives jitter operation ``index`` the factor (or hue shift) ``value``."""
    strength = JITTER_STRENGTH[index]
    return (value - (1.0 - strength)) / (2.0 * strength) if index < 3 else (value + strength) / (2.0 * strength)


def single_operation(implementation: str, images: np.ndarray, index: int, value: float) -> np.ndarray:
    """One jitter operation (0 brightness, 1 contrast, 2 saturation, 3 hue) at ``value``, the others neutral."""
    draws = np.full((len(images), 8), 0.5, "float32")  # factors of 1 and a hue shift of 0
    draws[:, index] = draw_for(index, value)
    draws[:, 4:8] = np.where(np.arange(4) == index, 0.0, 0.5 + 0.1 * np.arange(4))  # that operation first
    return jitter(implementation, images, draws)


# -------------------------------------------------------------------------------------------------------- windows
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("height, width", IMAGE_SIZES)
@pytest.mark.parametrize("crop", list(CROPS))
def test_windows_are_torchvision_windows_one_for_one(implementation, height, width, crop):
    draws = np.random.default_rng(height * width).uniform(size=(300, 22))
    draws[:20, :10] = 0.999  # some draws where no attempt fits: the centred fallback
    draws[:20, 10:20] = np.where(np.arange(10) % 2, 0.0, 1.0)
    expected = np.array([reference.random_resized_crop_params(height, width, CROPS[crop], RATIO, d) for d in draws])
    ours = windows_from_draws(implementation, height, width, CROPS[crop], draws)
    mismatched = np.any(np.abs(ours - expected) > 1, axis=1).mean()
    one_off = np.any(ours != expected, axis=1).mean()
    assert mismatched == 0, (ours[:3], expected[:3])
    assert one_off < 0.01  # float32 vs float64 rounding of sqrt at a .5 boundary: a pixel, rarely


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("height, width", IMAGE_SIZES)
@pytest.mark.parametrize("crop", list(CROPS))
def test_window_distribution_matches_torchvision(implementation, height, width, crop):
    ours = reference.window_statistics(seeded_windows(implementation, height, width, CROPS[crop], WINDOWS), height,
                                       width)  # fmt: skip
    theirs = reference.window_statistics(
        reference.sample_windows(height, width, CROPS[crop], RATIO, WINDOWS, seed=height + width), height, width
    )
    for name in ("area", "log_ratio", "center_y", "center_x"):
        if np.ptp(theirs[name]) == 0:  # e.g. a 32 x 32 image's tiny windows share one ratio
            np.testing.assert_allclose(ours[name], theirs[name][0])
            continue
        p_value = stats.ks_2samp(ours[name], theirs[name]).pvalue
        assert p_value > 1e-3, (name, p_value, ours[name].mean(), theirs[name].mean())
        assert abs(ours[name].mean() - theirs[name].mean()) < 0.02, name


# ---------------------------------------------------------------------------------------------------- colour
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "index, values",
    [(0, (0.6, 0.85, 1.2, 1.4)), (1, (0.6, 0.9, 1.15, 1.4)), (2, (0.8, 0.9, 1.1, 1.2)), (3, (-0.1, -0.04, 0.03, 0.1))],
)
def test_each_jitter_operation_matches_pillow(implementation, photos, index, values):
    operation = reference.JITTER_OPERATIONS[index]
    for value in values:
        # torchvision's PIL hue shift moves whole 8-bit hue steps: int(shift * 255); ours is continuous.
        shift = int(value * 255) / 255 if index == 3 else value
        ours = single_operation(implementation, photos / 255.0, index, shift) * 255.0
        theirs = np.stack([operation(image, value) for image in photos]).astype("float32")
        difference = np.abs(ours - theirs)
        # PIL rounds to 8 bits, and its HSV has 8-bit hue, saturation and value: a step of those for the hue.
        assert difference.mean() < (1.0 if index == 3 else 0.6), (value, difference.mean())
        assert np.percentile(difference, 99) < (4.0 if index == 3 else 1.5), (value, np.percentile(difference, 99))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_jitter_applies_its_operations_in_the_drawn_order(implementation, photos):
    """The jitter is its four operations one after another in the order the keys rank, as ColorJitter's randperm."""
    rng = np.random.default_rng(5)
    draws = rng.uniform(size=(len(photos), 8)).astype("float32")
    draws[:, :4] = np.where(rng.uniform(size=(len(photos), 4)) < 0.5, 0.02, 0.98)  # strong factors: order matters
    ours = jitter(implementation, photos / 255.0, draws)
    orders = np.argsort(draws[:, 4:8], axis=1)
    assert len({tuple(order) for order in orders}) > 8
    for image, draw, order, view in zip(photos, draws, orders, ours):
        values = [1 - s + 2 * s * d for s, d in zip(JITTER_STRENGTH[:3], draw[:3])] + [-0.1 + 0.2 * draw[3]]
        expected, reverse = image[None] / 255.0, image[None] / 255.0
        for index, other in zip(order, order[::-1]):
            expected = single_operation(implementation, expected, index, values[index])
            reverse = single_operation(implementation, reverse, other, values[other])
        np.testing.assert_allclose(view, expected[0], atol=2e-5)
        assert np.abs(view - reverse[0]).max() > 1e-3  # the order changes the result


def test_jitter_orders_are_uniform_over_the_24_permutations():
    """Both recipes rank 4 independent uniforms: each order has probability 1/24 (chi-square)."""
    keys = device.view_keys(0, 0, np.arange(24_000, dtype="int32"))
    draws = to_numpy(device.uniform_draws(keys, 0, 8))[:, 4:8]
    codes = np.argsort(draws, axis=1) @ np.array([64, 16, 4, 1])
    counts = np.unique(codes, return_counts=True)[1]
    assert len(counts) == 24
    assert stats.chisquare(counts).pvalue > 1e-3


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_grayscale_and_solarize_match_pillow(implementation, photos):
    floats = photos.astype("float32") / 255.0
    if implementation == "host":
        gray = np.stack([np.tile(host.grayscale(tf.constant(x)).numpy(), 3) for x in floats])
        solarized = host.solarize(tf.constant(floats)).numpy()
    else:
        gray = np.concatenate([to_numpy(device.grayscale(floats))] * 3, axis=-1)
        solarized = to_numpy(device.solarize(floats))
    expected_gray = np.stack([reference.grayscale(x) for x in photos])
    assert np.abs(np.round(gray * 255) - expected_gray).max() <= 1
    np.testing.assert_array_equal(np.round(solarized * 255), np.stack([reference.solarize(x) for x in photos]))


# ------------------------------------------------------------------------------------------------------ blur
def blur(implementation: str, images: np.ndarray, sigma: float) -> np.ndarray:
    floats = images.astype("float32") / 255.0
    if implementation == "host":
        fn = tf.function(lambda x: host.gaussian_blur(x, tf.constant(sigma), 2.0))
        return np.stack([fn(tf.constant(x)).numpy() for x in floats]) * 255.0
    return to_numpy(device.gaussian_blur(floats, np.full(len(images), sigma, "float32"), 2.0)) * 255.0


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("size", [48, 112])  # the host blurs small crops with matrices, larger ones by convolution
@pytest.mark.parametrize("sigma", [0.1, 0.15, 0.25, 0.4, 0.7, 1.0, 1.5, 2.0])
def test_blur_is_pillows_gaussian_blur(implementation, photos, size, sigma):
    """PIL's GaussianBlur (3 extended box passes per axis), including the small sigmas a truncated Gaussian misses."""
    images = photos
    if size != photos.shape[1]:
        images = np.stack(
            [np.asarray(Image.fromarray(x).resize((size, size), Image.Resampling.BICUBIC)) for x in photos]
        )
    ours = blur(implementation, images, sigma)
    theirs = np.stack([reference.gaussian_blur(x, sigma) for x in images]).astype("float32")
    difference = np.abs(ours - theirs)
    # Pillow rounds to 8 bits after each of its 6 passes: about a third of a grey level on average.
    assert difference.mean() < 0.6 and difference.max() <= 4, (difference.mean(), difference.max())
    if sigma >= 0.25:  # how much the blur changes the image agrees too
        change_ours = np.abs(ours - images).mean()
        change_theirs = np.abs(theirs - images).mean()
        assert abs(change_ours - change_theirs) < 0.1 * change_theirs + 0.3, (change_ours, change_theirs)
