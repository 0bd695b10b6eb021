"""CARP's view recipe (``keras_carp.view_recipe``) on the host, in TensorFlow ops for tf.data.

Each view of an image is drawn as the released recipe draws it with
torchvision and PIL, one image at a time:

- ``RandomResizedCrop``: area fraction uniform in ``scale``, log-uniform
  aspect ratio, 10 attempts, then the centred fallback; bicubic resize with
  PIL's antialiasing filter on downscales;
- horizontal flip, p = 0.5;
- ``ColorJitter(0.4, 0.4, 0.2, 0.1)`` with p = 0.8: brightness, contrast,
  saturation and hue in a random order per image, each clamped to [0, 1] as
  PIL's 8-bit images clamp them;
- ``RandomGrayscale`` (ITU-R 601-2 luma, as PIL's "L");
- PIL's ``GaussianBlur(radius=sigma)``: three passes of an extended box blur
  per axis with edge pixels repeated, as Pillow computes it;
- PIL's ``solarize`` (threshold 128 of 255) on view 2;
- ImageNet normalisation.

All randomness of a crop comes from one stateless draw of ``_DRAWS`` uniforms,
so the same (image, seed) gives the same views, and turning one probability to
zero leaves every other draw unchanged. ``keras_carp.DeviceMultiCrop`` makes
views of the same law on the accelerator; both are checked against the same
references in the tests.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np
import tensorflow as tf

from keras_carp.imagenet import normalize, to_float_image
from keras_carp.view_recipe import JITTER_STRENGTH, LUMA, SOLARIZE_THRESHOLD, ViewRecipe

_ATTEMPTS = 10  # torchvision's RandomResizedCrop
# Per crop: window (2 x 10 attempts + 2 offsets), flip, jitter (apply, 4 factors, 4 order keys), grayscale,
# blur (sigma, apply), solarise.
_WINDOW, _FLIP, _JITTER, _GRAY, _SIGMA, _BLUR, _SOLARIZE = 0, 22, 23, 32, 33, 34, 35
_DRAWS = 36


# ---------------------------------------------------------------------------------------------------- geometry
def sample_window(image_shape, scale, ratio, draws):
    """torchvision's ``RandomResizedCrop.get_params``: ``(offset [..., 2] (y, x), size [..., 2] (h, w))``, int32.

    ``draws`` [..., 22] uniforms in [0, 1): the area and log-ratio draws of the
    10 attempts, then the two offsets; ``scale`` a (low, high) pair or [..., 2].
    The first attempt that fits wins; when none does, the largest centred
    window whose ratio is in range. Leading dimensions (e.g. one row per crop
    of an image) are sampled at once, in a few dozen ops whatever their count.
    """
    height = tf.cast(image_shape[0], tf.float32)
    width = tf.cast(image_shape[1], tf.float32)
    scale = tf.convert_to_tensor(scale, tf.float32)
    low, high = scale[..., 0:1], scale[..., 1:2]
    target_area = height * width * (low + (high - low) * draws[..., :_ATTEMPTS])
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = tf.exp(log_low + (log_high - log_low) * draws[..., _ATTEMPTS : 2 * _ATTEMPTS])
    widths = tf.round(tf.sqrt(target_area * aspect))
    heights = tf.round(tf.sqrt(target_area / aspect))
    fits = (widths > 0) & (widths <= width) & (heights > 0) & (heights <= height)
    first = tf.argmax(tf.cast(fits, tf.int32), axis=-1, output_type=tf.int32)[..., None]
    crop_height = tf.gather(heights, first, batch_dims=len(draws.shape) - 1)[..., 0]
    crop_width = tf.gather(widths, first, batch_dims=len(draws.shape) - 1)[..., 0]
    top = tf.minimum(tf.floor(draws[..., 2 * _ATTEMPTS] * (height - crop_height + 1)), height - crop_height)
    left = tf.minimum(tf.floor(draws[..., 2 * _ATTEMPTS + 1] * (width - crop_width + 1)), width - crop_width)
    image_ratio = width / height
    fallback_width = tf.where(image_ratio > ratio[1], tf.round(height * ratio[1]), width)
    fallback_height = tf.where(image_ratio < ratio[0], tf.round(width / ratio[0]), height)
    fallback_offset = tf.stack([tf.floor((height - fallback_height) / 2), tf.floor((width - fallback_width) / 2)])
    found = tf.reduce_any(fits, axis=-1, keepdims=True)
    offset = tf.where(found, tf.stack([top, left], axis=-1), fallback_offset)
    size = tf.where(found, tf.stack([crop_height, crop_width], axis=-1), tf.stack([fallback_height, fallback_width]))
    return tf.cast(offset, tf.int32), tf.cast(size, tf.int32)


def crop_window(image_shape, scale, ratio, seed):
    """A ``RandomResizedCrop`` window ``(offset [y, x], size [h, w])`` for ``image_shape`` [H, W, ...] from a seed [2].

    Only the shape is needed, so JPEGs can decode just this window.
    """
    draws = tf.random.stateless_uniform([2 * _ATTEMPTS + 2], seed=seed)
    return sample_window(image_shape, scale, ratio, draws)


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


# ------------------------------------------------------------------------------------------------------ colour
def grayscale(image):
    """Luma [H, W, 1] of an RGB image (PIL's "L" weights)."""
    return tf.tensordot(image, tf.constant(LUMA, tf.float32)[:, None], 1)


def _blend(image, other, factor):
    """PIL's ``Image.blend(other, image, factor)`` on [0, 1] floats, clamped as 8-bit images are."""
    return tf.clip_by_value(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def adjust_brightness(image, factor):
    return tf.clip_by_value(factor * image, 0.0, 1.0)  # a blend with black


def adjust_contrast(image, factor):
    return _blend(image, tf.reduce_mean(grayscale(image)), factor)


def adjust_saturation(image, factor):
    return _blend(image, grayscale(image), factor)


def adjust_hue(image, shift):
    """Rotate the hue by ``shift`` turns (HSV), as torchvision's ``adjust_hue``."""
    return tf.clip_by_value(tf.image.adjust_hue(image, shift), 0.0, 1.0)


def color_jitter(image, draws, strength: tuple = JITTER_STRENGTH):
    """torchvision's ``ColorJitter(*strength)``: the four ops in a random order, each clamped.

    ``draws`` [8] uniforms: the brightness, contrast, saturation and hue
    draws, then four keys whose ranks are the order of the operations.
    """
    brightness, contrast, saturation, hue = strength
    factors = [
        1.0 - brightness + 2.0 * brightness * draws[0],
        1.0 - contrast + 2.0 * contrast * draws[1],
        1.0 - saturation + 2.0 * saturation * draws[2],
        -hue + 2.0 * hue * draws[3],
    ]
    operations = [adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue]
    order = tf.argsort(draws[4:8], stable=True)
    for position in range(4):
        image = tf.switch_case(
            order[position],
            [lambda op=op, f=f, x=image: op(x, f) for op, f in zip(operations, factors)],
        )
    return image


# -------------------------------------------------------------------------------------------------------- blur
def pil_box_radius(sigma):
    """The extended box radius of PIL's ``GaussianBlur(radius=sigma)`` (3 passes; Pillow's BoxBlur.c)."""
    variance = sigma * sigma / 3.0
    length = tf.sqrt(12.0 * variance + 1.0)
    whole = tf.floor((length - 1.0) / 2.0)
    fraction = (2.0 * whole + 1.0) * (whole * (whole + 1.0) - 3.0 * variance)
    fraction /= 6.0 * (variance - (whole + 1.0) * (whole + 1.0))
    return whole + fraction


def max_box_reach(max_sigma: float) -> int:
    """The widest reach (taps each side) of one box pass for sigmas up to ``max_sigma``."""
    variance = max_sigma * max_sigma / 3.0
    return int(math.floor((math.sqrt(12.0 * variance + 1.0) - 1.0) / 2.0)) + 1


def _box_weights(sigma, reach: int):
    """float32 [2 * reach + 1]: one pass of the extended box blur; offset ``t`` weighs ``clip(r + 1 - |t|, 0, 1)``."""
    radius = pil_box_radius(tf.cast(sigma, tf.float32))
    offsets = np.abs(np.arange(-reach, reach + 1)).astype("float32")
    return tf.clip_by_value(radius + 1.0 - offsets, 0.0, 1.0) / (2.0 * radius + 1.0)


def _box_pass_matrix(weights, size: int):
    """float32 [size, size]: one box pass with ``weights`` [2 * reach + 1], pixels past the edges repeating the edge."""
    reach = (weights.shape[0] - 1) // 2
    taps = np.arange(-reach, reach + 1)
    sources = np.clip(np.arange(size)[None, :] + taps[:, None], 0, size - 1)
    gather = np.zeros((len(taps), size, size), "float32")
    gather[np.arange(len(taps))[:, None], np.arange(size)[None, :], sources] = 1.0
    return tf.tensordot(weights, tf.constant(gather), 1)


def blur_matrix(sigma, size: int, max_sigma: float = 2.0):
    """float32 [size, size]: PIL's ``GaussianBlur(radius=sigma)`` along one axis.

    One pass of the extended box blur of radius ``r`` (``_box_weights``),
    pixels beyond the edges repeating the edge pixel (Pillow's clamp); three
    passes are that matrix cubed.
    """
    reach = max_box_reach(max(max_sigma, 1e-3))
    box = _box_pass_matrix(_box_weights(sigma, reach), size)
    return box @ box @ box


# Up to this size a blur is two dense matrix products per axis; above, a convolution plus exact edges (measured
# in tf.data: the faster of the two on each side of it).
_DENSE_BLUR_SIZE = 128


def _three_box_passes(weights, reach: int):
    """The combined kernel [6 * reach + 1] of three box passes, and their exact first ``3 * reach`` output rows.

    The rows come from the clamped pass matrix cubed on the first
    ``6 * reach`` pixels (``[3 * reach, 6 * reach]``): the only pixels they see.
    """
    span, taps = 3 * reach, 2 * reach + 1
    triples = np.stack(np.meshgrid(*[np.arange(taps)] * 3, indexing="ij"), -1).reshape(-1, 3).sum(-1)
    combine = np.zeros((taps**3, 2 * span + 1), "float32")
    combine[np.arange(taps**3), triples] = 1.0
    outer = tf.reshape(weights[:, None, None] * weights[None, :, None] * weights[None, None, :], [-1])
    kernel = tf.tensordot(outer, tf.constant(combine), 1)  # the box convolved with itself three times
    box = _box_pass_matrix(weights, 2 * span)
    return kernel, (box @ box @ box)[:span]


def _blur_axis(image, kernel, edge_rows, axis: int):
    """Three clamped box passes along ``axis`` (0: rows, 1: columns) of [H, W, C], from ``_three_box_passes``.

    Pixels at least ``3 * reach`` from both edges never meet the clamp: one
    depthwise convolution with the combined kernel; the pixels nearer an edge
    take the exact edge rows (the far edge mirrored).
    """
    strip = edge_rows.shape[1]
    shape = [-1, 1, 1, 1] if axis == 0 else [1, -1, 1, 1]
    filters = tf.tile(tf.reshape(kernel, shape), [1, 1, image.shape[-1], 1])
    inner = tf.nn.depthwise_conv2d(image[None], filters, [1, 1, 1, 1], "VALID")[0]
    if axis == 0:
        strips = tf.stack([image[:strip], tf.reverse(image[-strip:], [0])])
        edges = tf.einsum("ij,bjwc->biwc", edge_rows, strips)
        return tf.concat([edges[0], inner, tf.reverse(edges[1], [0])], 0)
    strips = tf.stack([image[:, :strip], tf.reverse(image[:, -strip:], [1])])
    edges = tf.einsum("ij,bhjc->bhic", edge_rows, strips)
    return tf.concat([edges[0], inner, tf.reverse(edges[1], [1])], 1)


def gaussian_blur(image, sigma, max_sigma: float = 2.0):
    """PIL's ``GaussianBlur(radius=sigma)`` of an [H, W, C] float image with a static size.

    Small crops: the per-axis blur matrices (``blur_matrix``). Larger ones: the
    combined kernel's convolution with exact edge rows (``_blur_axis``), the
    same numbers at the cost of one convolution per axis.
    """
    height, width = image.shape[0], image.shape[1]
    reach = max_box_reach(max(max_sigma, 1e-3))
    if max(height, width) <= _DENSE_BLUR_SIZE or min(height, width) <= 6 * reach:
        rows = blur_matrix(sigma, height, max_sigma)
        columns = rows if width == height else blur_matrix(sigma, width, max_sigma)
        return tf.einsum("kw,iwc->ikc", columns, tf.einsum("ij,jwc->iwc", rows, image))
    kernel, edge_rows = _three_box_passes(_box_weights(sigma, reach), reach)
    return _blur_axis(_blur_axis(image, kernel, edge_rows, 0), kernel, edge_rows, 1)


def solarize(image):
    """PIL's ``ImageOps.solarize``: pixels at or above 128 of 255 inverted."""
    return tf.where(image < SOLARIZE_THRESHOLD, image, 1.0 - image)


# ----------------------------------------------------------------------------------------------------- the views
def _maybe(probability: float, draw, fn, image):
    if probability <= 0.0:
        return image
    if probability >= 1.0:
        return fn(image)
    return tf.cond(draw < probability, lambda: fn(image), lambda: image)


@keras.saving.register_keras_serializable(package="keras_carp")
@dataclasses.dataclass(frozen=True)
class MultiCropAugmentation(ViewRecipe):
    """CARP's views of one image on the host, in TensorFlow ops (tf.data): a ``ViewRecipe`` you can call.

    Sizes, counts and scale ranges are configurable (2x224 + 6x96 for ImageNet,
    2x32 for small images). Call with a float32 image in [0, 1] and a stateless
    seed [2]; returns a tuple of normalised crops. ``keras_carp.DeviceMultiCrop``
    makes views of the same law on the accelerator, batched.
    """

    def _draws_and_windows(self, image_shape, seed):
        """[crops, ``_DRAWS``] uniforms from one stateless draw, and every crop's window at once."""
        draws = tf.random.stateless_uniform([self.num_crops, _DRAWS], seed=seed)
        scales = [scale for _, scale, _, _ in self.crop_specs()]
        offsets, sizes = sample_window(image_shape, scales, self.ratio, draws[:, _WINDOW:_FLIP])
        return tf.unstack(draws), tf.unstack(offsets), tf.unstack(sizes)

    def finish_view(self, crop, draws, size: int, blur_probability: float, solarize_probability: float):
        """Resize a cropped window, then flip, jitter, grayscale, blur, solarise and normalise it."""
        x = resize_crop(crop, size, self.antialias)
        x = _maybe(0.5, draws[_FLIP], lambda y: tf.reverse(y, axis=[1]), x)
        x = _maybe(self.jitter_probability, draws[_JITTER], lambda y: color_jitter(y, draws[_JITTER + 1 : _GRAY]), x)
        x = _maybe(self.grayscale_probability, draws[_GRAY], lambda y: tf.tile(grayscale(y), [1, 1, 3]), x)
        low, high = self.blur_sigma
        sigma = low + (high - low) * draws[_SIGMA]
        x = _maybe(blur_probability, draws[_BLUR], lambda y: gaussian_blur(y, sigma, high), x)
        x = _maybe(solarize_probability, draws[_SOLARIZE], solarize, x)
        x = tf.ensure_shape(x, (size, size, 3))
        return normalize(x)

    def __call__(self, image, seed):
        """Views of a decoded image (uint8 or float [0, 1], [H, W, 1 or 3]) from a stateless seed [2]."""
        image = to_float_image(image)
        crops = []
        for draws, offset, window, (size, _, blur, solarize_p) in zip(
            *self._draws_and_windows(tf.shape(image), seed), self.crop_specs()
        ):
            crop = tf.slice(image, tf.concat([offset, [0]], 0), tf.concat([window, [3]], 0))
            crops.append(self.finish_view(crop, draws, size, blur, solarize_p))
        return tuple(crops)

    def from_jpeg(self, encoded, seed):
        """The same views as ``self(decode_jpeg(encoded), seed)``, decoding only each crop's window."""
        crops = []
        for draws, offset, window, (size, _, blur, solarize_p) in zip(
            *self._draws_and_windows(tf.io.extract_jpeg_shape(encoded), seed), self.crop_specs()
        ):
            crop = tf.io.decode_and_crop_jpeg(encoded, tf.concat([offset, window], 0), channels=3)
            crops.append(self.finish_view(to_float_image(crop), draws, size, blur, solarize_p))
        return tuple(crops)
