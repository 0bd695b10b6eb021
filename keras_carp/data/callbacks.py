"""Report images the pipeline skipped because they could not be decoded."""

from __future__ import annotations

import logging

import keras

from keras_carp.data.sources import ImageSource

logger = logging.getLogger("keras_carp.data")


class SkippedImagesLogger(keras.callbacks.Callback):
    """Adds ``skipped_images`` (running total) to each epoch's logs and warns when it grows.

    Put it before ``CSVLogger``/``TensorBoard`` in the callback list so they record the column.
    """

    def __init__(self, source: ImageSource):
        super().__init__()
        self.source = source
        self._reported = 0

    def on_epoch_end(self, epoch, logs=None):
        count = self.source.skipped.count
        if logs is not None:
            logs["skipped_images"] = count
        if count > self._reported:
            logger.warning("%s: %d undecodable images skipped so far (%d this epoch)", self.source.name, count,
                           count - self._reported)  # fmt: skip
            self._reported = count
