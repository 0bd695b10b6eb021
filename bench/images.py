"""Benchmark inputs that need no TensorFlow: real JPEGs at ImageNet-like sizes cut from scikit-learn's photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGENET_LIKE_SIZES = ((500, 375), (375, 500), (500, 333), (400, 400))  # (width, height)


def make_jpegs(directory: Path, count: int, seed: int = 0) -> None:
    """``count`` distinct JPEGs cut from scikit-learn's two sample photos."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    for index in range(count):
        photo = photos[index % len(photos)]
        height, width = photo.shape[:2]
        crop_h = int(height * rng.uniform(0.5, 1.0))
        crop_w = int(width * rng.uniform(0.5, 1.0))
        top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
        image = Image.fromarray(photo[top : top + crop_h, left : left + crop_w])
        if rng.uniform() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        size = IMAGENET_LIKE_SIZES[rng.integers(len(IMAGENET_LIKE_SIZES))]
        image.resize(size, Image.Resampling.BICUBIC).save(directory / f"{index:04d}.jpg", quality=90)
