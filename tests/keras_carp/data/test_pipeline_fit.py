"""The tf.data pipeline feeds CARP.fit on every backend (labels travel with the crops, never reach the loss)."""

import numpy as np
import pytest
from PIL import Image

from keras_carp.callbacks import SkippedImagesLogger, TeacherEMA
from keras_carp.data import FolderSource, MultiCropAugmentation, multicrop_dataset
from tests.conftest import tiny_model

pytestmark = pytest.mark.core


def test_folder_pipeline_with_a_truncated_file_trains_and_reports_the_skip(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (30, 36, 3), dtype=np.uint8)).save(tmp_path / label / f"{i}.jpg")
    whole = (tmp_path / "a" / "0.jpg").read_bytes()
    (tmp_path / "b" / "broken.jpg").write_bytes(whole[: len(whole) * 4 // 5])
    source = FolderSource(tmp_path)
    recipe = MultiCropAugmentation(global_size=16, local_size=8, num_local_crops=2)
    dataset = multicrop_dataset(source, recipe, 4, seed=0)
    model = tiny_model()
    model.compile(optimizer="sgd")
    callbacks = [TeacherEMA(total_steps=4), SkippedImagesLogger(source)]
    history = model.fit(dataset, epochs=2, verbose=0, callbacks=callbacks)
    assert np.all(np.isfinite(history.history["loss"]))
    assert history.history["skipped_images"] == [1, 2]  # the broken file, once per pass


def test_in_memory_pipeline_with_labels_trains():
    images = np.random.default_rng(1).integers(0, 256, (16, 20, 20, 3), dtype=np.uint8)
    recipe = MultiCropAugmentation(global_size=16, local_size=8, num_local_crops=1)
    dataset = multicrop_dataset(images, recipe, 8, labels=np.arange(16) % 3)
    model = tiny_model()
    model.compile(optimizer="sgd")
    history = model.fit(dataset, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0]) and len(history.history["loss"]) == 1
