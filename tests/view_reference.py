"""The released view recipe's operations, transcribed from torchvision and Pillow, for law tests of our views.

torchvision cannot be imported beside the CPU torch build these tests run
with, so its algorithms are written out here from its source; Pillow's own
operations are called directly (``ImageEnhance``, ``ImageFilter.GaussianBlur``,
``ImageOps.solarize``, ``Image.convert``), on uint8 images as the released
recipe runs them.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps


def random_resized_crop_params(height: int, width: int, scale, ratio, uniforms) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` -> (top, left, h, w), its draws given as uniforms in [0, 1).

    ``uniforms``: the 10 attempts' area draws, their 10 log-ratio draws, then
    the two offset draws (``randint(0, n + 1)`` is ``floor(u * (n + 1))``).
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for attempt in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * uniforms[attempt])
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * uniforms[10 + attempt])
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(uniforms[20] * (height - h + 1))
            left = int(uniforms[21] * (width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_windows(height: int, width: int, scale, ratio, count: int, seed: int) -> np.ndarray:
    """[count, 4] torchvision windows from NumPy uniforms: the reference distribution."""
    uniforms = np.random.default_rng(seed).uniform(size=(count, 22))
    return np.array([random_resized_crop_params(height, width, scale, ratio, u) for u in uniforms], "float64")


def window_statistics(windows: np.ndarray, height: int, width: int) -> dict:
    """Area fraction, log aspect ratio (w / h) and relative centre of (top, left, h, w) windows."""
    top, left, h, w = windows.T
    return {
        "area": h * w / (height * width),
        "log_ratio": np.log(w / h),
        "center_y": (top + h / 2) / height,
        "center_x": (left + w / 2) / width,
    }


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.asarray(image, np.uint8))


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    return np.asarray(ImageEnhance.Brightness(_pil(image)).enhance(factor))


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    return np.asarray(ImageEnhance.Contrast(_pil(image)).enhance(factor))


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    return np.asarray(ImageEnhance.Color(_pil(image)).enhance(factor))


def adjust_hue(image: np.ndarray, shift: float) -> np.ndarray:
    """torchvision's ``F_pil.adjust_hue``: the 8-bit HSV hue channel shifted by int(shift * 255), wrapping."""
    h, s, v = _pil(image).convert("HSV").split()
    hue = (np.asarray(h, np.int64) + int(shift * 255)) % 256
    return np.asarray(Image.merge("HSV", (Image.fromarray(hue.astype(np.uint8), "L"), s, v)).convert("RGB"))


JITTER_OPERATIONS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(image: np.ndarray, factors, order) -> np.ndarray:
    """torchvision's ``ColorJitter`` with its drawn factors (brightness, contrast, saturation, hue) and op order."""
    for index in order:
        image = JITTER_OPERATIONS[index](image, factors[index])
    return image


def grayscale(image: np.ndarray) -> np.ndarray:
    """``RandomGrayscale``'s output: PIL's "L", repeated on 3 channels."""
    return np.repeat(np.asarray(_pil(image).convert("L"))[..., None], 3, axis=-1)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """The released recipe's blur: ``ImageFilter.GaussianBlur(radius=sigma)``."""
    return np.asarray(_pil(image).filter(ImageFilter.GaussianBlur(radius=sigma)))


def solarize(image: np.ndarray) -> np.ndarray:
    return np.asarray(ImageOps.solarize(_pil(image)))


def resize_crop(image: np.ndarray, top: int, left: int, h: int, w: int, size: int) -> np.ndarray:
    """``F.resized_crop`` on a PIL image: crop, then bicubic (antialiased on downscale) to size x size."""
    return np.asarray(_pil(image).crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC))
