"""The host view recipe: per-view transform rates measured on the outputs, sizes, JPEG crops, resizing.

Each operation's law against torchvision and Pillow: ``tests/keras_carp/test_view_law.py``.
"""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_sample_images

from keras_carp.data import IMAGENET_MEAN, IMAGENET_STD, MultiCropAugmentation
from keras_carp.data.augment import crop_window, resize_crop
from tests.keras_carp import recipe_rates

NUM_IMAGES = 1000  # per-view rates: binomial standard error <= 1.6 points at p = 0.5


def _denormalize(x):
    return x * np.asarray(IMAGENET_STD, "float32") + np.asarray(IMAGENET_MEAN, "float32")


@pytest.fixture(scope="module")
def view_flags():
    """Which transforms touched each of 4 views (2 global + 2 local) of NUM_IMAGES colourful images.

    A transform counts as applied when turning its probability to zero changes
    the view: with stateless seeds every other random draw stays the same, so
    the comparison isolates that transform. Grayscale is read off the pixels.
    """
    recipe = MultiCropAugmentation(global_size=16, local_size=8, num_local_crops=2, blur_sigma=(1.0, 2.0))
    without = {
        "solarize": dataclasses.replace(recipe, solarize_probability=0.0),
        "blur": dataclasses.replace(recipe, blur_probability=(0.0, 0.0, 0.0)),
        "jitter": dataclasses.replace(recipe, jitter_probability=0.0),
    }
    rng = np.random.default_rng(0)
    images = rng.uniform(0.0, 1.0, size=(NUM_IMAGES, 20, 20, 3)).astype("float32")

    def flags(image, seed):
        views = recipe(image, seed)
        out = {"grayscale": tf.stack([tf.reduce_all(tf.abs(_gray_gap(v)) < 1e-5) for v in views])}
        for name, variant in without.items():
            other = variant(image, seed)
            out[name] = tf.stack([tf.reduce_any(a != b) for a, b in zip(views, other)])
        return out

    seeds = tf.data.Dataset.random(seed=7).batch(2)
    dataset = tf.data.Dataset.zip(tf.data.Dataset.from_tensor_slices(images), seeds).map(flags)
    collected = {key: [] for key in ("grayscale", "solarize", "blur", "jitter")}
    for element in dataset.batch(250):
        for key in collected:
            collected[key].append(element[key].numpy())
    return {key: np.concatenate(value).mean(axis=0) for key, value in collected.items()}


def _gray_gap(view):
    rgb = view * IMAGENET_STD + IMAGENET_MEAN
    return tf.reduce_max(rgb, axis=-1) - tf.reduce_min(rgb, axis=-1)


def test_solarisation_only_on_the_second_global_view_at_20_percent(view_flags):
    recipe_rates.check_solarisation(view_flags["solarize"])


def test_grayscale_on_about_20_percent_of_every_view(view_flags):
    recipe_rates.check_grayscale(view_flags["grayscale"])


def test_blur_always_on_view_1_a_tenth_of_view_2_half_of_local_crops(view_flags):
    recipe_rates.check_blur(view_flags["blur"])


def test_colour_jitter_on_about_80_percent_of_every_view(view_flags):
    recipe_rates.check_colour_jitter(view_flags["jitter"])


def test_crop_windows_respect_the_scale_and_aspect_ratio_ranges():
    height, width, scale, ratio = 200, 300, (0.2, 1.0), (3 / 4, 4 / 3)
    areas, ratios = [], []
    for i in range(400):
        offset, size = crop_window(tf.constant([height, width, 3]), scale, ratio, tf.constant([i, 0]))
        (y, x), (h, w) = offset.numpy(), size.numpy()
        assert 0 <= y and y + h <= height and 0 <= x and x + w <= width
        areas.append(h * w / (height * width))
        ratios.append(w / h)
    areas, ratios = np.array(areas), np.array(ratios)
    assert areas.min() >= 0.2 - 0.01 and areas.max() <= 1.0
    assert ratios.min() >= 0.75 - 0.02 and ratios.max() <= 4 / 3 + 0.02
    assert areas.std() > 0.1  # the whole range is used, not one window


def test_views_have_the_recipe_sizes_and_imagenet_normalisation():
    photo = load_sample_images().images[0]
    recipe = MultiCropAugmentation()  # ImageNet: 2 x 224 + 6 x 96
    views = recipe(tf.constant(photo), tf.constant([3, 4]))
    assert [v.shape[0] for v in views] == [224, 224] + [96] * 6
    assert all(v.dtype == tf.float32 for v in views)
    for view in views:
        rgb = _denormalize(view.numpy())
        assert rgb.min() >= -1e-5 and rgb.max() <= 1 + 1e-5


def test_jpeg_crop_decoding_gives_the_views_of_full_decoding():
    photo = load_sample_images().images[1]
    encoded = tf.io.encode_jpeg(photo, quality=90)
    recipe = MultiCropAugmentation(global_size=64, local_size=32, num_local_crops=4)
    seed = tf.constant([5, 6])
    full = recipe(tf.io.decode_jpeg(encoded, channels=3), seed)
    cropped = recipe.from_jpeg(encoded, seed)
    for a, b in zip(full, cropped):
        # libjpeg may upsample chroma differently at a crop's edge; the interior is identical.
        assert np.mean(np.abs(a.numpy() - b.numpy())) < 2e-3


@pytest.mark.parametrize("height, width, size", [(300, 300, 224), (400, 260, 224), (150, 150, 96), (60, 60, 96)])
def test_crop_resize_matches_pil_bicubic_as_torchvision_uses_it(height, width, size):
    from PIL import Image

    crop = load_sample_images().images[0][50 : 50 + height, 80 : 80 + width]
    expected = np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.BICUBIC), "float32")
    resized = resize_crop(tf.constant(crop, tf.float32) / 255.0, size).numpy() * 255.0
    assert np.abs(np.round(resized) - expected).mean() < 0.3  # plain bicubic is 3-6 grey levels off on downscales
