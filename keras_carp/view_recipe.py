"""The multi-crop view recipe's settings, shared by the host (tf.data) and device (keras.ops) augmentations.

Global crops: random resized crop (scale 0.2-1.0, bicubic), flip p=0.5, colour
jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2, Gaussian blur
sigma in [0.1, 2.0] with p=1.0 on view 1 and p=0.1 on view 2, solarisation p=0.2
on view 2 only. Local crops: scale 0.05-0.2, same flip/jitter/grayscale, blur
p=0.5. Then ImageNet normalisation. TensorFlow-free.
"""

from __future__ import annotations

import dataclasses

# The colour jitter strengths of the recipe: brightness, contrast, saturation (factors around 1) and hue (shift).
JITTER_STRENGTH = (0.4, 0.4, 0.2, 0.1)
# ITU-R 601-2 luma: PIL's "L" conversion, torchvision's rgb_to_grayscale (grayscale views, contrast, saturation).
LUMA = (0.299, 0.587, 0.114)
# PIL's ImageOps.solarize inverts pixels at or above 128 of 255.
SOLARIZE_THRESHOLD = 128 / 255


@dataclasses.dataclass(frozen=True)
class ViewRecipe:
    """CARP's views of one image: 2 global crops then ``num_local_crops`` local crops, and their transforms."""

    global_size: int = 224
    local_size: int = 96
    num_global_crops: int = 2
    num_local_crops: int = 6
    global_scale: tuple = (0.2, 1.0)
    local_scale: tuple = (0.05, 0.2)
    ratio: tuple = (3 / 4, 4 / 3)
    blur_sigma: tuple = (0.1, 2.0)
    blur_probability: tuple = (1.0, 0.1, 0.5)  # view 1, view 2, local crops
    solarize_probability: float = 0.2  # view 2 only
    jitter_probability: float = 0.8
    grayscale_probability: float = 0.2
    antialias: bool = True  # False: plain bicubic on downscale too (faster, aliased; not the reference recipe)

    def __post_init__(self):
        if self.num_global_crops != 2:
            raise ValueError(
                f"CARP uses exactly 2 global crops (the teacher's views), got num_global_crops={self.num_global_crops}."
            )
        if self.num_local_crops < 0:
            raise ValueError(f"num_local_crops must be >= 0, got {self.num_local_crops}.")
        for name in ("global_size", "local_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        for name in ("global_scale", "local_scale", "blur_sigma", "ratio"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name} must satisfy 0 < low <= high, got {(low, high)}.")
        probabilities = (*self.blur_probability, self.solarize_probability, self.jitter_probability,
                         self.grayscale_probability)  # fmt: skip
        if not all(0 <= p <= 1 for p in probabilities):
            raise ValueError(f"probabilities must be in [0, 1], got {probabilities}.")

    def get_config(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config: dict):
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in config.items()})

    @property
    def num_crops(self) -> int:
        return self.num_global_crops + self.num_local_crops

    def crop_specs(self) -> list[tuple[int, tuple, float, float]]:
        """(size, scale range, blur probability, solarisation probability) of each crop in order."""
        view_1, view_2, local_blur = self.blur_probability
        specs = [
            (self.global_size, self.global_scale, view_1, 0.0),
            (self.global_size, self.global_scale, view_2, self.solarize_probability),
        ]
        return specs + [(self.local_size, self.local_scale, local_blur, 0.0)] * self.num_local_crops

    def recipe(self) -> ViewRecipe:
        """The settings alone (to build the other augmentation from)."""
        return ViewRecipe(**{field.name: getattr(self, field.name) for field in dataclasses.fields(ViewRecipe)})
