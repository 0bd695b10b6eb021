"""The CARP view recipe (``keras_carp.view_recipe``) in TensorFlow ops for tf.data, with stateless per-image seeds.

Images enter as float32 in [0, 1], [H, W, 3]; each crop is resized, flipped,
jittered, grayed, blurred and solarised with the recipe's probabilities, then
ImageNet-normalised.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from keras_carp.imagenet import IMAGENET_MEAN, IMAGENET_STD
from keras_carp.view_recipe import ViewRecipe


def normalize(images):
    """[0, 1] RGB -> ImageNet-normalised float32."""
    return (tf.cast(images, tf.float32) - IMAGENET_MEAN) / IMAGENET_STD


def _uniform(seed, low=0.0, high=1.0):
    return tf.random.stateless_uniform([], seed=seed, minval=low, maxval=high)


def crop_window(image_shape, scale, ratio, seed):
    """A random-resized-crop window ``(offset [y, x], size [h, w])`` for an image of ``image_shape`` [H, W, C].

    Area fraction in ``scale``, aspect ratio in ``ratio`` (10 attempts, then the
    whole image), as torchvision's RandomResizedCrop samples it. Only the shape is
    needed, so JPEGs can decode just this window.
    """
    offset, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_shape,
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=ratio,
        area_range=scale,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return offset[:2], size[:2]


def resize_crop(crop, size: int, antialias: bool = True):
    """Bicubic resize of a crop to size x size, clipped back to [0, 1].

    With ``antialias`` a downscale filters like PIL's bicubic (what torchvision's
    RandomResizedCrop, and so the reference recipe, does); an upscale needs no
    filter and takes TensorFlow's faster plain bicubic, equally close to PIL.
    """
    shrinks = tf.reduce_any(tf.shape(crop)[:2] > size)
    if antialias:
        resized = tf.cond(
            shrinks,
            lambda: tf.image.resize(crop, (size, size), method="bicubic", antialias=True),
            lambda: tf.image.resize(crop, (size, size), method="bicubic"),
        )
    else:
        resized = tf.image.resize(crop, (size, size), method="bicubic")
    return tf.clip_by_value(resized, 0.0, 1.0)


def to_float_image(image):
    """uint8 [0, 255] or float [0, 1] image -> float32 [0, 1] with 3 channels."""
    image = tf.convert_to_tensor(image)
    image = tf.image.convert_image_dtype(image, tf.float32) if image.dtype.is_integer else tf.cast(image, tf.float32)
    if image.shape.rank == 3 and image.shape[-1] == 1:
        image = tf.tile(image, [1, 1, 3])
    return image


def color_jitter(image, seeds, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
    """torchvision-style jitter: factors drawn around 1 (brightness/contrast/saturation), hue shift."""
    image = image * _uniform(seeds[0], 1 - brightness, 1 + brightness)
    mean = tf.reduce_mean(tf.image.rgb_to_grayscale(image))
    image = tf.clip_by_value((image - mean) * _uniform(seeds[1], 1 - contrast, 1 + contrast) + mean, 0.0, 1.0)
    image = tf.image.adjust_saturation(image, _uniform(seeds[2], 1 - saturation, 1 + saturation))
    image = tf.image.adjust_hue(image, _uniform(seeds[3], -hue, hue))
    return tf.clip_by_value(image, 0.0, 1.0)


def gaussian_blur(image, sigma):
    """Separable Gaussian blur with a kernel of 2 * ceil(3 * sigma) + 1 taps (reflect padding)."""
    radius = tf.cast(tf.math.ceil(3.0 * sigma), tf.int32)
    taps = tf.cast(tf.range(-radius, radius + 1), tf.float32)
    kernel = tf.exp(-0.5 * tf.square(taps / sigma))
    kernel /= tf.reduce_sum(kernel)
    padded = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="SYMMETRIC")
    channels = tf.shape(image)[-1]
    horizontal = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, channels, 1])
    vertical = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, channels, 1])
    blurred = tf.nn.depthwise_conv2d(padded, horizontal, [1, 1, 1, 1], "VALID")
    blurred = tf.nn.depthwise_conv2d(blurred, vertical, [1, 1, 1, 1], "VALID")
    return blurred[0]


def _maybe(probability: float, seed, fn, image):
    if probability <= 0.0:
        return image
    if probability >= 1.0:
        return fn(image)
    return tf.cond(_uniform(seed) < probability, lambda: fn(image), lambda: image)


@keras.saving.register_keras_serializable(package="keras_carp")
@dataclasses.dataclass(frozen=True)
class MultiCropAugmentation(ViewRecipe):
    """CARP's views of one image on the host, in TensorFlow ops (tf.data): a ``ViewRecipe`` you can call.

    Sizes, counts and scale ranges are configurable (2x224 + 6x96 for ImageNet,
    2x32 for small images). Call with a float32 image in [0, 1] and a stateless
    seed [2]; returns a tuple of normalised crops. ``keras_carp.DeviceMultiCrop``
    makes the same views on the accelerator, batched.
    """

    def _crop_seeds(self, seed):
        """One stateless seed per crop, then 10 per crop (window, flip, jitter x5, grayscale, sigma, blur)."""
        return [
            tf.random.experimental.stateless_split(s, 10)
            for s in tf.unstack(tf.random.experimental.stateless_split(seed, self.num_crops))
        ]

    def finish_view(self, crop, seeds, size: int, blur_probability: float, solarize_probability: float):
        """Resize a cropped window, then flip, jitter, grayscale, blur, solarise and normalise it."""
        x = resize_crop(crop, size, self.antialias)
        x = tf.image.stateless_random_flip_left_right(x, seeds[1])
        x = _maybe(self.jitter_probability, seeds[2], lambda y: color_jitter(y, seeds[3:7]), x)
        x = _maybe(self.grayscale_probability, seeds[7], lambda y: tf.tile(tf.image.rgb_to_grayscale(y), [1, 1, 3]), x)
        sigma = _uniform(seeds[8], *self.blur_sigma)
        x = _maybe(blur_probability, seeds[9], lambda y: gaussian_blur(y, sigma), x)
        solarize_seed = tf.random.experimental.stateless_fold_in(seeds[0], 1)
        x = _maybe(solarize_probability, solarize_seed, lambda y: tf.where(y < 0.5, y, 1.0 - y), x)
        x = tf.ensure_shape(x, (size, size, 3))
        return normalize(x)

    def __call__(self, image, seed):
        """Views of a decoded image (uint8 or float [0, 1], [H, W, 1 or 3]) from a stateless seed [2]."""
        image = to_float_image(image)
        shape = tf.shape(image)
        crops = []
        for seeds, (size, scale, blur, solarize) in zip(self._crop_seeds(seed), self.crop_specs()):
            offset, window = crop_window(shape, scale, self.ratio, seeds[0])
            crop = tf.slice(image, tf.concat([offset, [0]], 0), tf.concat([window, [3]], 0))
            crops.append(self.finish_view(crop, seeds, size, blur, solarize))
        return tuple(crops)

    def from_jpeg(self, encoded, seed):
        """The same views as ``self(decode_jpeg(encoded), seed)``, decoding only each crop's window."""
        shape = tf.io.extract_jpeg_shape(encoded)
        crops = []
        for seeds, (size, scale, blur, solarize) in zip(self._crop_seeds(seed), self.crop_specs()):
            offset, window = crop_window(tf.concat([shape[:2], [3]], 0), scale, self.ratio, seeds[0])
            crop = tf.io.decode_and_crop_jpeg(encoded, tf.concat([offset, window], 0), channels=3)
            crops.append(self.finish_view(to_float_image(crop), seeds, size, blur, solarize))
        return tuple(crops)
