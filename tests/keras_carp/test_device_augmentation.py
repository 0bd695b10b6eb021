"""On-device views (keras.ops): randomness, windows, filters and colour against NumPy/PIL, rates on outputs, compiled
against eager."""

import colorsys
import dataclasses
import math

import keras
import numpy as np
import pytest
from PIL import Image, ImageFilter
from sklearn.datasets import load_sample_images

import keras_carp
from keras_carp.device_augmentation import (
    DeviceMultiCrop,
    adjust_hue,
    blur_matrix,
    color_jitter,
    crop_windows,
    gaussian_blur,
    pil_box_radius,
    resample,
    resampling_matrix,
    solarize,
    uniform_draws,
    view_keys,
)
from keras_carp.imagenet import IMAGENET_MEAN, IMAGENET_STD
from tests.conftest import tiny_model, to_numpy
from tests.keras_carp import recipe_rates
from tests.reference import lowbias32
from tests.view_reference import random_resized_crop_params

pytestmark = [pytest.mark.core, pytest.mark.tensorflow_free]
NUM_IMAGES = 1000  # per-view rates: binomial standard error <= 1.6 points at p = 0.5


def _numpy_uniforms(seed, step, index, crop, count):
    """The device draws, recomputed with NumPy's uint32 arithmetic."""
    with np.errstate(over="ignore"):
        step_key = lowbias32(lowbias32(np.uint32((seed % 2**31) ^ 0x2545F491)) + np.uint32(step))
        key = lowbias32(np.uint32(index) + step_key)
        bits = lowbias32(key + np.arange(crop * 64, crop * 64 + count, dtype=np.uint32))
    return (bits >> np.uint32(8)).astype(np.float64) / 2**24


def test_draws_are_a_hash_of_seed_step_image_crop_and_draw():
    keys = view_keys(7, 123, keras.ops.arange(5, dtype="int32") + 40)
    draws = to_numpy(uniform_draws(keys, crop=3, count=38))
    expected = np.stack([_numpy_uniforms(7, 123, 40 + i, 3, 38) for i in range(5)])
    np.testing.assert_allclose(draws, expected, atol=1e-7)


@pytest.mark.parametrize(
    "height, width, scale", [(200, 300, (0.2, 1.0)), (37, 500, (0.05, 0.2)), (20, 500, (0.5, 1.0)), (96, 96, (0.9, 1))]
)
def test_crop_windows_are_torchvision_windows(height, width, scale):
    ratio = (3 / 4, 4 / 3)
    draws = np.random.default_rng(0).uniform(size=(500, 22)).astype("float32")
    heights, widths = np.full(500, height, "float32"), np.full(500, width, "float32")
    windows = np.stack([to_numpy(w) for w in crop_windows(heights, widths, scale, ratio, draws)], axis=1)
    expected = np.array([random_resized_crop_params(height, width, scale, ratio, u.astype("float64")) for u in draws])
    # float32 versus float64 may round a width the other way at exactly .5: allow a rare one-pixel difference.
    assert np.mean(np.all(windows == expected, axis=1)) > 0.995
    np.testing.assert_allclose(windows, expected, atol=1)
    if height == 20:  # no window of half a 20 x 500 image has a ratio in range: the centred fallback
        np.testing.assert_array_equal(windows, np.tile([[0, 236, 20, 27]], (500, 1)))


def test_crop_window_statistics_match_the_host_recipe():
    """Area and aspect-ratio statistics of 3 000 windows beside the tf.data recipe's.

    Measured (240 x 320 image): global crops' area mean 0.492 (device) vs 0.466 (host), log-ratio mean 0.038 vs
    0.027; local crops' 0.125 vs 0.117 and -0.002 vs 0.027; standard deviations within 0.003. The device draws
    as torchvision (checked exactly above); TensorFlow's box sampler draws the ratio uniformly, not log-uniformly.
    """
    tf = pytest.importorskip("tensorflow")
    from keras_carp.data.augment import crop_window

    height, width, count = 240, 320, 3000
    for scale in ((0.2, 1.0), (0.05, 0.2)):
        draws = np.random.default_rng(1).uniform(size=(count, 22)).astype("float32")
        _, _, h, w = (to_numpy(x) for x in crop_windows(np.full(count, height, "float32"),
                                                        np.full(count, width, "float32"), scale, (3 / 4, 4 / 3),
                                                        draws))  # fmt: skip
        host = [crop_window(tf.constant([height, width, 3]), scale, (3 / 4, 4 / 3), tf.constant([i, 1]))[1].numpy()
                for i in range(count)]  # fmt: skip
        host_h, host_w = np.array(host, "float32").T
        for device_value, host_value in ((h * w / (height * width), host_h * host_w / (height * width)),
                                         (np.log(w / h), np.log(host_w / host_h))):  # fmt: skip
            assert abs(device_value.mean() - host_value.mean()) < 0.04
            assert abs(np.median(device_value) - np.median(host_value)) < 0.05
            assert abs(device_value.std() - host_value.std()) < 0.01


@pytest.mark.parametrize(
    "top, left, height, width, size",
    [
        (50, 80, 300, 300, 224),
        (20, 80, 400, 260, 224),
        (10, 10, 150, 150, 96),
        (0, 0, 60, 60, 96),
        (0, 0, 427, 640, 224),
    ],  # fmt: skip
)
def test_crop_resize_matches_pil_bicubic_of_the_crop(top, left, height, width, size):
    photo = load_sample_images().images[0]  # 427 x 640
    expected = np.asarray(
        Image.fromarray(photo[top : top + height, left : left + width]).resize((size, size), Image.Resampling.BICUBIC),
        "float32",
    )
    rows = resampling_matrix(np.array([top], "float32"), np.array([height], "float32"), size, photo.shape[0])
    columns = resampling_matrix(np.array([left], "float32"), np.array([width], "float32"), size, photo.shape[1])
    resized = to_numpy(resample(photo[None].astype("float32"), rows, columns))[0]
    difference = np.abs(np.round(np.clip(resized, 0, 255)) - expected)
    # PIL computes in 8-bit fixed point: a grey level here and there, far below the host's plain bicubic.
    assert difference.mean() < 0.25 and difference.max() <= 5


def _pil_box_blur_float(image, sigma):
    """Pillow's GaussianBlur (BoxBlur.c) in float64 without its 8-bit rounding: 3 extended box passes per axis."""
    sigma2 = sigma**2 / 3
    whole = math.floor((math.sqrt(12 * sigma2 + 1) - 1) / 2)
    radius = whole + (2 * whole + 1) * (whole * (whole + 1) - 3 * sigma2) / (6 * (sigma2 - (whole + 1) ** 2))

    def one_pass(x, axis):
        n = x.shape[axis]
        pad = [(whole + 1, whole + 1) if a == axis else (0, 0) for a in range(x.ndim)]
        padded = np.pad(x, pad, mode="edge")  # PIL repeats the edge pixel, at every pass
        inner = sum(np.take(padded, np.arange(n) + whole + 1 + t, axis=axis) for t in range(-whole, whole + 1))
        outer = np.take(padded, np.arange(n), axis=axis) + np.take(padded, np.arange(n) + 2 * whole + 2, axis=axis)
        return (inner + (radius - whole) * outer) / (2 * radius + 1)

    for axis in (1, 0):
        for _ in range(3):
            image = one_pass(image, axis)
    return image


def test_pil_box_radius_is_boxblur_c():
    # sigma 2: sigma2 = 4/3, l = 1, a = 3 (2 - 4) / (6 (4/3 - 4)) = 0.375. l steps up at sigma = sqrt(2).
    assert pil_box_radius(2.0) == pytest.approx(1.375)
    assert pil_box_radius(0.1) == pytest.approx(0.01 / (6 * (1 - 0.01 / 3)))
    assert pil_box_radius(math.sqrt(2) - 1e-6) == pytest.approx(1.0, abs=1e-5)
    assert pil_box_radius(math.sqrt(2) + 1e-6) == pytest.approx(1.0, abs=1e-5)
    sigmas = np.array([0.1, 0.3, 1.0, 1.414, 1.415, 2.0], "float32")
    np.testing.assert_allclose(to_numpy(pil_box_radius(sigmas)), [pil_box_radius(float(x)) for x in sigmas], rtol=1e-5)


def test_blur_matrices_are_pillows_box_passes_per_image_sigma():
    images = np.random.default_rng(2).uniform(size=(6, 23, 17, 3)).astype("float32")  # H != W: both axes
    sigmas = np.array([0.1, 0.3, 0.9, 1.41, 1.42, 2.0], "float32")
    blurred = to_numpy(gaussian_blur(images, sigmas, 2.0))
    for image, sigma, result in zip(images, sigmas, blurred):
        np.testing.assert_allclose(result, _pil_box_blur_float(image.astype("float64"), float(sigma)), atol=1e-5)
    rows = blur_matrix(sigmas, 23, 2.0)
    np.testing.assert_allclose(to_numpy(resample(images, rows, blur_matrix(sigmas, 17, 2.0))), blurred, atol=1e-6)
    np.testing.assert_allclose(to_numpy(keras.ops.sum(rows, axis=-1)), 1.0, atol=1e-6)  # brightness kept


def _photo_patches(size, count, seed):
    """``count`` uint8 patches of the two sample photos, resized to ``size`` x ``size``."""
    rng = np.random.default_rng(seed)
    patches = []
    for index in range(count):
        photo = load_sample_images().images[index % 2]
        side = int(rng.integers(size, 400))
        top, left = rng.integers(0, photo.shape[0] - side), rng.integers(0, photo.shape[1] - side)
        patch = Image.fromarray(photo[top : top + side, left : left + side])
        patches.append(np.asarray(patch.resize((size, size), Image.Resampling.BICUBIC)))
    return np.stack(patches)


@pytest.mark.parametrize("size", [64, 96])
def test_blur_is_pillows_gaussian_blur_on_photos(size):
    """Against Pillow itself, including the small sigmas a truncated Gaussian left unblurred.

    Measured (16 patches, sigma 0.1 .. 2): mean |ours - Pillow| 0.12-0.50 grey levels, max 1.7-2.9: Pillow rounds to
    8 bits after each of its 6 passes (half a level each). The truncated Gaussian with reflect padding this replaced:
    mean 0.70 and max 16 at sigma 0.3 (where it barely blurred), max 6-8 at sigma 0.15-0.2 and 2.
    """
    photos = _photo_patches(size, 16, seed=size)
    for sigma in (0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 1.5, 2.0):
        ours = to_numpy(gaussian_blur(photos / 255.0, np.full(len(photos), sigma, "float32"), 2.0)) * 255.0
        theirs = np.stack([np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(sigma))) for x in photos])
        difference = np.abs(ours - theirs.astype("float32"))
        assert difference.mean() < 0.6 and difference.max() < 3.5, (sigma, difference.mean(), difference.max())
        if sigma >= 0.3:  # and it changes the image as much as Pillow does (Pillow's rounding drops the least)
            change_ours, change_theirs = np.abs(ours - photos).mean(), np.abs(theirs - photos.astype("float32")).mean()
            assert abs(change_ours - change_theirs) < 0.1 * change_theirs + 0.4, (sigma, change_ours, change_theirs)


def _numpy_jitter(image, u):
    """torchvision's ColorJitter(0.4, 0.4, 0.2, 0.1) on one float image, with uniforms for factors and order."""
    gray = lambda x: (x * np.array([0.299, 0.587, 0.114])).sum(-1, keepdims=True)  # noqa: E731
    factors = [0.6 + 0.8 * u[0], 0.6 + 0.8 * u[1], 0.8 + 0.4 * u[2], -0.1 + 0.2 * u[3]]

    def hue(x, shift):
        hsv = np.array([colorsys.rgb_to_hsv(*p) for p in x.reshape(-1, 3)])
        hsv[:, 0] = np.mod(hsv[:, 0] + shift, 1.0)
        return np.clip(np.array([colorsys.hsv_to_rgb(*p) for p in hsv]).reshape(x.shape), 0, 1)

    operations = [
        lambda x: np.clip(factors[0] * x, 0, 1),
        lambda x: np.clip(factors[1] * x + (1 - factors[1]) * gray(x).mean(), 0, 1),
        lambda x: np.clip(factors[2] * x + (1 - factors[2]) * gray(x), 0, 1),
        lambda x: hue(x, factors[3]),
    ]
    for index in np.argsort(u[4:8], kind="stable"):
        image = operations[index](image)
    return image


def test_colour_jitter_matches_torchvision_order_and_factors():
    rng = np.random.default_rng(3)
    images = rng.uniform(size=(6, 5, 7, 3)).astype("float32")
    draws = rng.uniform(size=(6, 8)).astype("float32")
    draws[0, 4:8] = 0.5  # tied order keys: the lower operation first, as a stable argsort
    draws[1, 4:8] = [0.7, 0.2, 0.7, 0.2]
    jittered = to_numpy(color_jitter(images, draws))
    for image, u, result in zip(images, draws, jittered):
        np.testing.assert_allclose(result, _numpy_jitter(image.astype("float64"), u.astype("float64")), atol=2e-5)


def _special_pixels():
    """Black, white, greys, primaries, secondaries, ties between channels and their near misses, random colours."""
    rng = np.random.default_rng(8)
    tie = rng.uniform(size=(64, 1)).astype("float32")
    pixels = [
        np.array([[0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1],
                  [1, 0, 1], [0.76, 0, 0], [0.3, 0.3, 0.1], [0.2, 0.6, 0.6], [0.6, 0.2, 0.6]], "float32"),
        np.concatenate([tie, tie, rng.uniform(size=(64, 1))], 1),
        np.concatenate([tie, np.nextafter(tie, 2), tie * 0.5], 1),
        np.round(rng.uniform(size=(128, 3)) * 4) / 4,
        rng.uniform(size=(128, 3)),
    ]  # fmt: skip
    return np.concatenate(pixels).astype("float32")


def test_hue_rotation_matches_colorsys_on_grey_saturated_and_tied_pixels():
    pixels = _special_pixels()
    for shift in (-0.1, -0.03, -1e-4, 0.0, 0.05, 0.1):
        rotated = to_numpy(adjust_hue(pixels[None, None], np.array([shift], "float32")))[0, 0]
        expected = np.array([colorsys.hsv_to_rgb((h + shift) % 1.0, s, v) for h, s, v in
                             (colorsys.rgb_to_hsv(*p) for p in pixels.astype("float64"))])  # fmt: skip
        np.testing.assert_allclose(rotated, expected, atol=2e-6)
    grey = to_numpy(adjust_hue(pixels[None, None, :3], np.array([0.07], "float32")))[0, 0]
    np.testing.assert_array_equal(grey, pixels[:3])  # grey stays exactly grey


def test_solarize_inverts_from_128_of_255_as_pil():
    levels = np.arange(256, dtype="float32") / 255.0
    expected = np.where(np.arange(256) >= 128, 255 - np.arange(256), np.arange(256))
    np.testing.assert_array_equal(np.round(to_numpy(solarize(levels)) * 255), expected)


def _compiled(fn):
    """``fn`` compiled by the backend's compiler: jax.jit, tf.function(jit_compile=True) (XLA both).

    PyTorch runs the same eager ops again (torch.compile's C++ toolchain is not part of the tests): there the check
    is only that the views are deterministic.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(fn)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True)
    return fn


def test_compiled_views_equal_eager_views():
    """The views a compiled step makes are the views the eager ops make, to float rounding (1e-5 on [0, 1]).

    Keras' rgb_to_hsv chose the hue's formula by max(r, g, b) == r: XLA on CPU computed r with an FMA in one fused
    kernel and without it in the other, the equality failed, and a pure red pixel came out magenta. Measured with
    it: up to 0.99 on TensorFlow (34 of 2688 crops) and 0.63 on JAX (7 crops); now 1.7e-6 on both. The replica
    check's batches (below, steps 0-2) were among those that differed on JAX.
    """
    std = np.asarray(IMAGENET_STD, "float32")
    replica_check = np.random.default_rng(1).integers(0, 256, size=(3, 16, 20, 20, 3), dtype="uint8")
    photos = _photo_patches(32, 24, seed=9)
    photos[:6] = photos[:6] // 128 * 255  # saturated colours
    cases = [
        (DeviceMultiCrop(global_size=16, local_size=8, num_local_crops=2, seed=5), replica_check),
        (DeviceMultiCrop(global_size=24, local_size=12, num_local_crops=3, seed=5), np.stack([photos, photos])),
    ]
    for recipe, batches in cases:
        compiled = _compiled(lambda images, step, recipe=recipe: recipe(images, step))
        for step, images in enumerate(batches):
            eager = recipe(images, step)
            again = compiled(images, keras.ops.convert_to_tensor(step, "int32"))
            for view, (a, b) in enumerate(zip(eager, again)):
                difference = np.abs(to_numpy(a) - to_numpy(b)) * std
                assert difference.max() <= 1e-5, (step, view, difference.max())


def _gray_gap(view):
    rgb = view * np.asarray(IMAGENET_STD, "float32") + np.asarray(IMAGENET_MEAN, "float32")
    return rgb.max(-1) - rgb.min(-1)


@pytest.fixture(scope="module")
def view_flags():
    """Which transforms touched each of 4 views (2 global + 2 local) of NUM_IMAGES colourful images.

    As in the host recipe's test: with (seed, step, image) keys every other
    draw is unchanged when one probability is set to zero, so comparing the
    two isolates that transform. Grayscale is read off the pixels.
    """
    recipe = DeviceMultiCrop(global_size=16, local_size=8, num_local_crops=2, blur_sigma=(1.0, 2.0), seed=5)
    without = {
        "solarize": dataclasses.replace(recipe, solarize_probability=0.0),
        "blur": dataclasses.replace(recipe, blur_probability=(0.0, 0.0, 0.0)),
        "jitter": dataclasses.replace(recipe, jitter_probability=0.0),
    }
    images = np.random.default_rng(0).integers(0, 256, size=(NUM_IMAGES, 20, 20, 3), dtype="uint8")
    views = [to_numpy(v) for v in recipe(images, step=11)]
    flags = {"grayscale": np.stack([np.all(_gray_gap(v) < 1e-5, axis=(1, 2)) for v in views], axis=1)}
    for name, variant in without.items():
        others = [to_numpy(v) for v in variant(images, step=11)]
        flags[name] = np.stack([np.any(a != b, axis=(1, 2, 3)) for a, b in zip(views, others)], axis=1)
    return {name: value.mean(axis=0) for name, value in flags.items()}


def test_solarisation_only_on_the_second_global_view_at_20_percent(view_flags):
    recipe_rates.check_solarisation(view_flags["solarize"])


def test_grayscale_on_about_20_percent_of_every_view(view_flags):
    recipe_rates.check_grayscale(view_flags["grayscale"])


def test_blur_always_on_view_1_a_tenth_of_view_2_half_of_local_crops(view_flags):
    recipe_rates.check_blur(view_flags["blur"])


def test_colour_jitter_on_about_80_percent_of_every_view(view_flags):
    recipe_rates.check_colour_jitter(view_flags["jitter"])


def test_flip_on_half_of_the_crops():
    recipe = DeviceMultiCrop(global_size=8, local_size=8, num_local_crops=0, jitter_probability=0.0,
                             grayscale_probability=0.0, blur_probability=(0.0, 0.0, 0.0), solarize_probability=0.0,
                             global_scale=(1.0, 1.0), ratio=(1.0, 1.0))  # fmt: skip
    ramp = np.tile(np.arange(8, dtype="uint8")[None, :, None] * 30, (8, 1, 3))  # brightness grows to the right
    views = to_numpy(recipe(np.stack([ramp] * 4 * NUM_IMAGES), step=0)[0])  # standard error 0.8 points
    flipped = views[:, :, 0, 0].mean(1) > views[:, :, -1, 0].mean(1)
    assert 0.46 < flipped.mean() < 0.54, flipped.mean()


def test_same_seed_step_and_image_same_views_and_replica_slices_agree():
    images = np.random.default_rng(4).integers(0, 256, size=(6, 24, 24, 3), dtype="uint8")
    recipe = DeviceMultiCrop(global_size=16, local_size=8, num_local_crops=2, seed=9)
    first = [to_numpy(v) for v in recipe(images, step=3)]
    again = [to_numpy(v) for v in recipe(images, step=3)]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    other_step = [to_numpy(v) for v in recipe(images, step=4)]
    assert all(np.any(a != b) for a, b in zip(first, other_step))
    other_seed = [to_numpy(v) for v in dataclasses.replace(recipe, seed=10)(images, step=3)]
    assert all(np.any(a != b) for a, b in zip(first, other_seed))
    # A replica holding images 2..3 of the global batch makes exactly their views.
    replica = [to_numpy(v) for v in recipe(images[2:4], step=3, first_index=2)]
    for a, b in zip(first, replica):
        np.testing.assert_allclose(a[2:4], b, atol=1e-5)


def test_stretched_images_with_their_sizes_give_the_crops_of_the_originals():
    photo = load_sample_images().images[1]  # 427 x 640
    stretched = np.asarray(Image.fromarray(photo).resize((320, 320), Image.Resampling.BICUBIC))
    recipe = DeviceMultiCrop(global_size=64, local_size=32, num_local_crops=2, jitter_probability=0.0,
                             grayscale_probability=0.0, blur_probability=(0.0, 0.0, 0.0),
                             solarize_probability=0.0)  # fmt: skip
    from_original = recipe(photo[None], step=1)
    from_stretched = recipe(stretched[None], step=1, image_sizes=np.array([photo.shape[:2]], "int32"))
    std = np.asarray(IMAGENET_STD, "float32")
    for a, b in zip(from_original, from_stretched):
        # Same windows in the original geometry; only the detail lost to the stretch differs.
        assert np.mean(np.abs(to_numpy(a) - to_numpy(b)) * std) < 0.03


def test_views_have_the_recipe_sizes_and_imagenet_normalisation():
    recipe = DeviceMultiCrop(global_size=32, local_size=16, num_local_crops=3)
    images = np.random.default_rng(5).integers(0, 256, size=(4, 40, 40, 1), dtype="uint8")  # grayscale input
    views = [to_numpy(v) for v in recipe(images, step=0)]
    assert [v.shape for v in views] == [(4, 32, 32, 3)] * 2 + [(4, 16, 16, 3)] * 3
    for view in views:
        rgb = view * np.asarray(IMAGENET_STD, "float32") + np.asarray(IMAGENET_MEAN, "float32")
        assert rgb.min() >= -1e-5 and rgb.max() <= 1 + 1e-5
    with pytest.raises(ValueError, match="images"):
        recipe(np.zeros((4, 40, 40), "uint8"), step=0)


def test_carp_on_whole_images_equals_carp_on_the_views_it_makes():
    recipe = DeviceMultiCrop(global_size=16, local_size=8, num_local_crops=2, seed=3)
    images = np.random.default_rng(6).integers(0, 256, size=(8, 20, 20, 3), dtype="uint8")
    model = tiny_model(augmentation=recipe)
    views = tuple(recipe(images, step=5))
    from_images = model.compute_carp_losses(({"images": images}, np.zeros(8, "int32")), 5, training=False)
    from_views = model.compute_carp_losses(views, 5, training=False)
    for name in ("loss", "consistency", "entropy"):
        np.testing.assert_allclose(to_numpy(from_images[name]), to_numpy(from_views[name]), rtol=1e-5)


def test_fit_on_uint8_images_trains_and_the_model_config_keeps_the_augmentation():
    recipe = DeviceMultiCrop(global_size=16, local_size=8, num_local_crops=2, seed=1)
    model = tiny_model(augmentation=recipe)
    model.compile(optimizer=keras_carp.LARS(0.1))
    images = np.random.default_rng(7).integers(0, 256, size=(32, 20, 20, 3), dtype="uint8")
    teacher_before = to_numpy(model.teacher_encoder.weights[0])
    history = model.fit(images, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    assert np.any(to_numpy(model.teacher_encoder.weights[0]) != teacher_before)
    restored = keras_carp.CARP.from_config(model.get_config())
    assert restored.augmentation == recipe
    with pytest.raises(TypeError, match="DeviceMultiCrop"):
        tiny_model(augmentation="device")
