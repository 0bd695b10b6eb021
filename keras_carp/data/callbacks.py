"""Report images the pipeline skipped: ``SkippedImagesLogger`` now lives in ``keras_carp.callbacks``."""

from keras_carp.callbacks import SkippedImagesLogger

__all__ = ["SkippedImagesLogger"]
