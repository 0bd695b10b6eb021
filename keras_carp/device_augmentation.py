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
  image, as torchvision's ``ColorJitter``; the hue rotation is torchvision's
  HSV round trip written so that compiled and eager programs agree (see
  ``adjust_hue``); grayscale; PIL's ``GaussianBlur(radius=sigma)`` with a
  per-image sigma: not a truncated Gaussian but three passes of Pillow's
  extended box blur per axis with edge-replicate padding (again two
  per-image matrices); PIL's solarisation (pixels >= 128 of 255 inverted);
  ImageNet normalisation.

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

from keras_carp.imagenet import normalize
from keras_carp.partition import _logical_right_shift, mix32
from keras_carp.view_recipe import JITTER_STRENGTH, LUMA, SOLARIZE_THRESHOLD, ViewRecipe

_SALT = 0x2545F491  # keeps the view keys apart from the partition's keys of the same (seed, step)
_DRAWS_PER_CROP = 64
_ATTEMPTS = 10  # torchvision's RandomResizedCrop
_BLUR_PASSES = 3  # PIL's GaussianBlur: three box blurs per axis


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
    images = ops.convert_to_tensor(images, "float32")
    return ops.sum(images * ops.convert_to_tensor(LUMA, images.dtype), axis=-1, keepdims=True)


def _blend(images, other, factor):
    """torchvision's blend: factor * images + (1 - factor) * other, clipped to [0, 1]."""
    factor = _per_image(factor)
    return ops.clip(factor * images + (1.0 - factor) * other, 0.0, 1.0)


def adjust_hue(images, shift):
    """Rotate the hue by ``shift`` [N] turns, as torchvision's adjust_hue (RGB -> HSV, shift, HSV -> RGB).

    Written out instead of ``keras.ops.image.rgb_to_hsv``/``hsv_to_rgb``,
    which choose the hue's formula by ``max(r, g, b) == r`` (then ``== g``):
    a compiler that fuses the max and the comparison into different kernels
    may recompute ``r`` there with another rounding (XLA on CPU contracts a
    multiply-add into an FMA in one kernel and not in the other), the
    equality fails and a pure red pixel takes the blue formula, a hue 2/3 of
    a turn away. Here the sextant comes from comparisons between the
    channels, the three formulas agree where the sextants meet, and the
    result is written as ``min + chroma * curve(hue)`` (HSV's
    ``v * (1 - s + s * curve)``): a rounding difference anywhere moves the
    output by a rounding difference, and grey pixels stay exactly as they are.
    """
    red, green, blue = images[..., 0], images[..., 1], images[..., 2]
    maximum = ops.maximum(ops.maximum(red, green), blue)
    minimum = ops.minimum(ops.minimum(red, green), blue)
    chroma = maximum - minimum
    safe_chroma = ops.where(chroma > 0, chroma, ops.ones_like(chroma))
    sextant = ops.where(
        (red >= green) & (red >= blue),
        (green - blue) / safe_chroma,
        ops.where(green >= blue, (blue - red) / safe_chroma + 2.0, (red - green) / safe_chroma + 4.0),
    )  # hue in sixths of a turn, in [-1, 5]
    shift = ops.reshape(ops.convert_to_tensor(shift, images.dtype), (-1, 1, 1))
    sixths = ops.mod(sextant / 6.0 + shift, 1.0) * 6.0
    curves = (
        ops.clip(ops.abs(sixths - 3.0) - 1.0, 0.0, 1.0),
        ops.clip(2.0 - ops.abs(sixths - 2.0), 0.0, 1.0),
        ops.clip(2.0 - ops.abs(sixths - 4.0), 0.0, 1.0),
    )
    rotated = ops.stack([minimum + chroma * curve for curve in curves], axis=-1)
    return ops.clip(rotated, 0.0, 1.0)


def _ranks(keys):
    """int32 [N, K]: each key's place in its row's ascending order, ties to the lower index (a stable argsort)."""
    count = keys.shape[1]
    lower_index = ops.convert_to_tensor(np.tril(np.ones((count, count), bool), -1))  # [k, j]: j < k
    before = (keys[:, None, :] < keys[:, :, None]) | ((keys[:, None, :] == keys[:, :, None]) & lower_index[None])
    return ops.sum(ops.cast(before, "int32"), axis=2)


def color_jitter(images, draws):
    """Brightness, contrast, saturation and hue in a random order per image, as torchvision's ColorJitter.

    ``draws`` [N, 8]: the four strengths' uniforms, then four uniforms whose
    ranks are the order of the operations (ties: the lower operation first).
    """
    brightness, contrast, saturation, hue = JITTER_STRENGTH

    def factor(index, strength):
        return 1.0 - strength + 2.0 * strength * draws[:, index]

    images, draws = ops.convert_to_tensor(images, "float32"), ops.convert_to_tensor(draws, "float32")
    ranks = _ranks(draws[:, 4:8])  # operation k runs at position ranks[:, k]
    for position in range(4):
        adjusted = [
            _blend(images, 0.0, factor(0, brightness)),
            _blend(images, ops.mean(grayscale(images), axis=(1, 2, 3), keepdims=True), factor(1, contrast)),
            _blend(images, grayscale(images), factor(2, saturation)),
            adjust_hue(images, -hue + 2.0 * hue * draws[:, 3]),
        ]
        images = adjusted[3]
        for index in (2, 1, 0):
            images = ops.where(_per_image(ranks[:, index] == position), adjusted[index], images)
    return images


def pil_box_radius(sigma):
    """The extended box radius of PIL's ``GaussianBlur(radius=sigma)`` (BoxBlur.c ``_gaussian_blur_radius``).

    Three box passes of radius ``l + a`` (``l`` whole taps either side at full
    weight, the next tap at weight ``a``) have the variance ``sigma ** 2``.
    Works on floats and tensors; ``a`` is in [0, 1] and ``l + a`` is
    continuous in sigma (where ``l`` steps up, ``a`` goes from 1 to 0).
    """
    sqrt, floor = math.sqrt, math.floor
    if not isinstance(sigma, (int, float)):
        sqrt, floor, sigma = ops.sqrt, ops.floor, ops.convert_to_tensor(sigma, "float32")
    sigma2 = sigma * sigma / _BLUR_PASSES
    whole = floor((sqrt(12.0 * sigma2 + 1.0) - 1.0) / 2.0)
    fraction = (2.0 * whole + 1.0) * (whole * (whole + 1.0) - 3.0 * sigma2) / (6.0 * (sigma2 - (whole + 1.0) ** 2))
    return whole + fraction


def box_blur_matrix(radius, size: int, max_radius: float):
    """float32 [N, size, size]: one pass of PIL's extended box blur of ``radius`` [N] along an axis.

    Weight ``1 / (2 r + 1)`` on the ``2 floor(r) + 1`` nearest pixels and
    ``(r - floor(r)) / (2 r + 1)``, i.e. ``clip(r + 1 - |t|, 0, 1) / (2 r + 1)``
    at offset ``t``, on the two next ones; pixels beyond the edges repeat the
    edge pixel (PIL's clamp). Taps up to ``floor(max_radius) + 1``, so the
    shape is static; a smaller radius weighs the outer taps zero.
    """
    reach = math.floor(max_radius) + 1
    taps = np.arange(-reach, reach + 1)
    sources = np.clip(np.arange(size)[None, :] + taps[:, None], 0, size - 1)  # [T, size], edge-replicate
    gather = np.zeros((len(taps), size, size), "float32")
    gather[np.arange(len(taps))[:, None], np.arange(size)[None, :], sources] = 1.0
    radius = ops.expand_dims(ops.convert_to_tensor(radius, "float32"), 1)
    offsets = ops.convert_to_tensor(np.abs(taps).astype("float32"))[None, :]
    weights = ops.clip(radius + 1.0 - offsets, 0.0, 1.0) / (2.0 * radius + 1.0)
    return ops.einsum("nt,tos->nos", weights, ops.convert_to_tensor(gather))


def blur_matrix(sigma, size: int, max_sigma: float):
    """float32 [N, size, size]: PIL's ``GaussianBlur(radius=sigma)`` along one axis, per-image ``sigma`` [N].

    Three passes of the extended box blur, each with its own edge clamp: the
    pass matrix cubed (two batched matmuls). ``max_sigma`` (the recipe's
    largest sigma) fixes the taps.
    """
    box = box_blur_matrix(pil_box_radius(ops.convert_to_tensor(sigma, "float32")), size, pil_box_radius(max_sigma))
    return ops.matmul(box, ops.matmul(box, box))


def gaussian_blur(images, sigma, max_sigma: float):
    """PIL's ``GaussianBlur(radius=sigma)`` of float images [N, H, W, C] with a sigma [N] per image."""
    images = ops.convert_to_tensor(images, "float32")
    rows = blur_matrix(sigma, images.shape[1], max_sigma)
    columns = rows if images.shape[1] == images.shape[2] else blur_matrix(sigma, images.shape[2], max_sigma)
    return resample(images, rows, columns)


def solarize(images):
    """PIL's ``ImageOps.solarize``: pixels at or above 128 of 255 inverted."""
    return ops.where(images < SOLARIZE_THRESHOLD, images, 1.0 - images)


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
            blurred = gaussian_blur(views, sigma, high)
            views = ops.where(_per_image(flags[:, 12] < blur_probability), blurred, views)
        if solarize_probability > 0:
            views = ops.where(_per_image(flags[:, 13] < solarize_probability), solarize(views), views)
        return normalize(views)
