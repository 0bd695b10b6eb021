"""ImageNet's per-channel RGB statistics: the normalisation every CARP view and exported encoder uses."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
