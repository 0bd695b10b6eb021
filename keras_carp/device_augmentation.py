"""CARP's multi-crop views made on the accelerator, batched, in ``keras.ops`` (TensorFlow, JAX and PyTorch).

The host then only decodes images into fixed-size uint8 batches; the train step
turns a batch into the 2 global and the local crops of every image with the
recipe of ``keras_carp.view_recipe`` (the same settings as the tf.data
``MultiCropAugmentation``), in torchvision's order:

- random resized crop: torchvision's window sampler (area fraction in
  ``scale``, log-uniform aspect ratio, 10 attempts, then a centred crop), then
  bicubic resampling with PIL's antialiasing filter on downscales, written as
  two per-image resampling matrices (a batched matmul, fast on accelerators);
  a horizontal flip is the same matrix with its rows reversed;
- colour jitter (brightness, contrast, saturation, hue) in a random order per
  image, as torchvision's ``ColorJitter``; grayscale; Gaussian blur with a
  per-image sigma (again two banded matrices, reflect padding, truncated at
  3 sigma as the host recipe); solarisation; ImageNet normalisation.

Randomness is a counter-based hash (``keras_carp.partition.mix32``) of
(seed, step, image index, crop, draw): no state, no host sync, the same views
on every backend, and a resumed run makes exactly the views the interrupted
run would have made. Images may arrive stretched to a fixed square; with their
original ``image_sizes`` the windows are drawn in the original geometry, so a
crop's aspect ratio is the one it had in the original image.

None of Keras' augmentation layers draw per image from (step, image) keys or
apply the recipe's per-view probabilities, hence this module.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np
from keras import ops

from keras_carp.imagenet import IMAGENET_MEAN, IMAGENET_STD
from keras_carp.partition import _logical_right_shift, mix32
from keras_carp.view_recipe import JITTER_STRENGTH, ViewRecipe

_SALT = 0x2545F491  # keeps the view keys apart from the partition's keys of the same (seed, step)
_DRAWS_PER_CROP = 64
_ATTEMPTS = 10  # torchvision's RandomResizedCrop
_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's "L" and torchvision's rgb_to_grayscale


# ------------------------------------------------------------------------------------------------- randomness
def view_keys(seed: int, step, image_indices):
    """int32 key per image: a hash of (seed, step, index); ``step`` and indices may be tensors."""
    step_key = mix32(mix32(ops.convert_to_tensor(seed % (1 << 31) ^ _SALT, "int32")) + ops.cast(step, "int32"))
    return mix32(ops.cast(image_indices, "int32") + step_key)


def uniform_draws(keys, crop: int, count: int):
    """float32 [N, count] uniform in [0, 1): draws ``0..count-1`` of crop ``crop`` of each key."""
    offsets = ops.arange(crop * _DRAWS_PER_CROP, crop * _DRAWS_PER_CROP + count, dtype="int32")
    bits = mix32(ops.expand_dims(keys, 1) + ops.expand_dims(offsets, 0))
    return ops.cast(_logical_right_shift(bits, 8), "float32") * (1.0 / (1 << 24))


# ---------------------------------------------------------------------------------------------------- geometry
def crop_windows(heights, widths, scale, ratio, draws):
    """torchvision's RandomResizedCrop windows (top, left, height, width), float32 [N] each, in pixels.

    ``draws`` [N, 2 * 10 + 2]: area and log-ratio uniforms of the 10 attempts,
    then the two offset uniforms. The first attempt that fits wins; when none
    does, the whole image clamped to the ratio range, centred.
    """
    heights, widths = ops.convert_to_tensor(heights, "float32"), ops.convert_to_tensor(widths, "float32")
    draws = ops.convert_to_tensor(draws, "float32")
    area = heights * widths
    target_area = ops.expand_dims(area, 1) * (scale[0] + (scale[1] - scale[0]) * draws[:, :_ATTEMPTS])
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = ops.exp(log_low + (log_high - log_low) * draws[:, _ATTEMPTS : 2 * _ATTEMPTS])
    width = ops.round(ops.sqrt(target_area * aspect))
    height = ops.round(ops.sqrt(target_area / aspect))
    fits = (width > 0) & (width <= ops.expand_dims(widths, 1)) & (height > 0) & (height <= ops.expand_dims(heights, 1))
    first = ops.expand_dims(ops.argmax(ops.cast(fits, "int32"), axis=1), 1)
    found = ops.any(fits, axis=1)
    height = ops.squeeze(ops.take_along_axis(height, first, axis=1), 1)
    width = ops.squeeze(ops.take_along_axis(width, first, axis=1), 1)
    top = ops.floor(draws[:, -2] * (heights - height + 1))
    left = ops.floor(draws[:, -1] * (widths - width + 1))
    # No attempt fitted: the largest window of a ratio in range, centred.
    image_ratio = widths / heights
    fallback_width = ops.where(image_ratio > ratio[1], ops.round(heights * ratio[1]), widths)
    fallback_height = ops.where(image_ratio < ratio[0], ops.round(widths / ratio[0]), heights)
    return (
        ops.where(found, top, ops.floor((heights - fallback_height) / 2)),
        ops.where(found, left, ops.floor((widths - fallback_width) / 2)),
        ops.where(found, height, fallback_height),
        ops.where(found, width, fallback_width),
    )


def _bicubic(distance):
    """PIL's bicubic kernel (a = -0.5)."""
    t = ops.abs(distance)
    near = (1.5 * t - 2.5) * t * t + 1.0
    far = ((-0.5 * t + 2.5) * t - 4.0) * t + 2.0
    return ops.where(t < 1.0, near, ops.where(t < 2.0, far, ops.zeros_like(t)))


def resampling_matrix(start, length, output_size: int, input_size: int, antialias: bool = True):
    """float32 [N, output_size, input_size]: rows that resample the window [start, start + length) to output_size.

    As PIL resizes a crop: output pixel o samples at ``start + (o + 0.5) * scale``
    with the bicubic kernel widened by the downscale factor (antialias), taps
    limited to the pixels inside the window, weights normalised to 1.
    """
    start, length = ops.convert_to_tensor(start, "float32"), ops.convert_to_tensor(length, "float32")
    scale = length / output_size
    widen = ops.maximum(scale, 1.0) if antialias else ops.ones_like(scale)
    centers = ops.expand_dims(start, 1) + (ops.arange(output_size, dtype="float32") + 0.5) * ops.expand_dims(scale, 1)
    pixels = ops.arange(input_size, dtype="float32") + 0.5
    weights = _bicubic((pixels[None, None, :] - centers[:, :, None]) / widen[:, None, None])
    inside = (pixels[None, :] > ops.expand_dims(start, 1)) & (pixels[None, :] < ops.expand_dims(start + length, 1))
    weights = ops.where(ops.expand_dims(inside, 1), weights, ops.zeros_like(weights))
    return weights / ops.maximum(ops.sum(weights, axis=-1, keepdims=True), 1e-12)


def resample(images, rows, columns):
    """images [N, H, W, C] -> [N, P, Q, C] with row [N, P, H] and column [N, Q, W] resampling matrices."""
    images = ops.convert_to_tensor(images, "float32")
    return ops.einsum("nqw,npwc->npqc", columns, ops.einsum("nph,nhwc->npwc", rows, images))


# ------------------------------------------------------------------------------------------------------ colour
def _per_image(values):
    return ops.reshape(values, (-1, 1, 1, 1))


def grayscale(images):
    """Luma [N, H, W, 1] of RGB images."""
    return ops.sum(images * ops.convert_to_tensor(_GRAY, images.dtype), axis=-1, keepdims=True)


def _blend(images, other, factor):
    """torchvision's blend: factor * images + (1 - factor) * other, clipped to [0, 1]."""
    factor = _per_image(factor)
    return ops.clip(factor * images + (1.0 - factor) * other, 0.0, 1.0)


def adjust_hue(images, shift):
    """Rotate the hue by ``shift`` [N] turns in HSV space (torchvision's adjust_hue)."""
    hsv = ops.image.rgb_to_hsv(images, data_format="channels_last")
    hue = ops.mod(hsv[..., :1] + _per_image(shift), 1.0)
    return ops.clip(ops.image.hsv_to_rgb(ops.concatenate([hue, hsv[..., 1:]], axis=-1), data_format="channels_last"),
                    0.0, 1.0)  # fmt: skip


def color_jitter(images, draws):
    """Brightness, contrast, saturation and hue in a random order per image, as torchvision's ColorJitter.

    ``draws`` [N, 8]: the four strengths' uniforms, then four uniforms whose
    ranks are the order of the operations.
    """
    brightness, contrast, saturation, hue = JITTER_STRENGTH

    def factor(index, strength):
        return 1.0 - strength + 2.0 * strength * draws[:, index]

    images, draws = ops.convert_to_tensor(images, "float32"), ops.convert_to_tensor(draws, "float32")
    order = ops.argsort(draws[:, 4:8], axis=1)
    for position in range(4):
        operation = _per_image(order[:, position])
        adjusted = [
            _blend(images, 0.0, factor(0, brightness)),
            _blend(images, ops.mean(grayscale(images), axis=(1, 2, 3), keepdims=True), factor(1, contrast)),
            _blend(images, grayscale(images), factor(2, saturation)),
            adjust_hue(images, -hue + 2.0 * hue * draws[:, 3]),
        ]
        images = adjusted[3]
        for index in (2, 1, 0):
            images = ops.where(operation == index, adjusted[index], images)
    return images


def blur_matrix(sigma, size: int, max_radius: int):
    """float32 [N, size, size]: Gaussian blur along one axis, reflect padding, taps within ceil(3 sigma)."""
    taps = np.arange(-max_radius, max_radius + 1)
    positions = np.arange(size)[None, :] + taps[:, None]  # [T, size]
    period = np.mod(positions, 2 * size)
    sources = np.where(period < size, period, 2 * size - 1 - period)  # symmetric (half-sample) reflection
    gather = np.zeros((len(taps), size, size), "float32")
    gather[np.arange(len(taps))[:, None], np.arange(size)[None, :], sources] = 1.0
    offsets = ops.convert_to_tensor(taps.astype("float32"))[None, :]
    sigma = ops.expand_dims(ops.convert_to_tensor(sigma, "float32"), 1)
    weights = ops.exp(-0.5 * ops.square(offsets / sigma))
    weights = ops.where(ops.abs(offsets) <= ops.ceil(3.0 * sigma), weights, ops.zeros_like(weights))
    weights = weights / ops.sum(weights, axis=1, keepdims=True)
    # A tap's pixel may be reached twice near an edge: the gather sums them, as padding does.
    return ops.einsum("nt,tos->nos", weights, ops.convert_to_tensor(gather))


# ----------------------------------------------------------------------------------------------------- the views
@keras.saving.register_keras_serializable(package="keras_carp")
@dataclasses.dataclass(frozen=True)
class DeviceMultiCrop(ViewRecipe):
    """The views of a batch of images, on the accelerator: ``views = DeviceMultiCrop(...)(images, step)``.

    A ``ViewRecipe`` plus ``seed``. Call with uint8 (or float in [0, 1])
    images [N, H, W, C] (C = 1 or 3), the training step and optionally each
    image's original size (``image_sizes`` [N, 2], when the host stretched
    the images to H x W) and the global index of the first image (replicas
    of a distributed step). Returns the list of float32, ImageNet-normalised
    crops: 2 x [N, global_size, global_size, 3], then the local crops.
    """

    seed: int = 0

    def __call__(self, images, step, image_sizes=None, first_index=0) -> list:
        images = ops.convert_to_tensor(images)
        if len(images.shape) != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"DeviceMultiCrop takes images [N, H, W, 1 or 3], got shape {images.shape}.")
        if "int" in str(images.dtype):
            images = ops.cast(images, "float32") / 255.0
        images = ops.cast(images, "float32")
        if images.shape[-1] == 1:
            images = ops.concatenate([images] * 3, axis=-1)
        height, width = images.shape[1], images.shape[2]
        batch = ops.shape(images)[0]
        if image_sizes is None:
            original_heights = ops.full((batch,), float(height))
            original_widths = ops.full((batch,), float(width))
        else:
            image_sizes = ops.cast(image_sizes, "float32")
            original_heights, original_widths = image_sizes[:, 0], image_sizes[:, 1]
        keys = view_keys(self.seed, step, ops.arange(batch, dtype="int32") + ops.cast(first_index, "int32"))
        views = []
        for crop, (size, scale, blur_probability, solarize_probability) in enumerate(self.crop_specs()):
            draws = uniform_draws(keys, crop, 2 * _ATTEMPTS + 2 + 16)
            window = crop_windows(original_heights, original_widths, scale, self.ratio, draws[:, : 2 * _ATTEMPTS + 2])
            flags = draws[:, 2 * _ATTEMPTS + 2 :]
            views.append(self._view(images, window, (original_heights, original_widths), size, flags,
                                    blur_probability, solarize_probability))  # fmt: skip
        return views

    def _view(self, images, window, original, size: int, flags, blur_probability: float, solarize_probability: float):
        """One crop of every image: resample (and flip), jitter, grayscale, blur, solarise, normalise.

        ``flags`` [N, 16]: flip, jitter (1 + 8), grayscale, sigma, blur, solarise.
        """
        top, left, crop_height, crop_width = window
        height, width = images.shape[1], images.shape[2]
        y_scale, x_scale = height / original[0], width / original[1]  # original pixels -> stored pixels
        rows = resampling_matrix(top * y_scale, crop_height * y_scale, size, height, self.antialias)
        columns = resampling_matrix(left * x_scale, crop_width * x_scale, size, width, self.antialias)
        flip = ops.reshape(flags[:, 0] < 0.5, (-1, 1, 1))
        columns = ops.where(flip, ops.flip(columns, axis=1), columns)
        views = ops.clip(resample(images, rows, columns), 0.0, 1.0)

        if self.jitter_probability > 0:
            jittered = color_jitter(views, flags[:, 2:10])
            views = ops.where(_per_image(flags[:, 1] < self.jitter_probability), jittered, views)
        if self.grayscale_probability > 0:
            gray = ops.concatenate([grayscale(views)] * 3, axis=-1)
            views = ops.where(_per_image(flags[:, 10] < self.grayscale_probability), gray, views)
        if blur_probability > 0:
            low, high = self.blur_sigma
            sigma = low + (high - low) * flags[:, 11]
            blur = blur_matrix(sigma, size, math.ceil(3 * high))
            blurred = resample(views, blur, blur)
            views = ops.where(_per_image(flags[:, 12] < blur_probability), blurred, views)
        if solarize_probability > 0:
            solarized = ops.where(views < 0.5, views, 1.0 - views)
            views = ops.where(_per_image(flags[:, 13] < solarize_probability), solarized, views)
        mean = ops.convert_to_tensor(IMAGENET_MEAN, "float32")
        std = ops.convert_to_tensor(IMAGENET_STD, "float32")
        return (views - mean) / std
