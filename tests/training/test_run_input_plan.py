"""training.run.InputPlan: where the views are made, decided once; the minimum image size on every path."""

import types

import numpy as np
import pytest
from PIL import Image

from training import run
from training.config import PretrainConfig

pytestmark = pytest.mark.tensorflow_free  # plans for a machine without TensorFlow need none
ONE_PROCESS = types.SimpleNamespace(num_processes=1, per_host_input=False, strategy=None)


def _small_folder(root, count=8, sizes=((6, 7),)):
    """Two classes of ``count`` RGB images of ``sizes`` (H, W) in turn: smaller than any crop."""
    rng = np.random.default_rng(0)
    for label in ("red", "blue"):
        (root / label).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


def _config(**fields) -> PretrainConfig:
    return PretrainConfig().replace(global_size=16, local_size=8, num_local_crops=2, batch_size=4, epochs=1,
                                    eval_split="", **fields)  # fmt: skip


class _Source:
    def __init__(self, encoded: bool):
        self.encoded = encoded


def test_the_plan_is_decided_once_from_the_config_and_the_machine():
    without = run.InputPlan.decide(_config(), tensorflow=False)
    assert (without.views, without.loader, without.on_device) == ("device", "pillow", True)
    assert without.device_augmentation is without.augmentation and without.augmentation.global_size == 16
    host = run.InputPlan.decide(_config(augment="host"), tensorflow=True)
    assert (host.views, host.loader, host.device_augmentation) == ("host", "tf.data", None)
    with pytest.raises(run.RunRefused, match="TensorFlow is not installed"):
        run.InputPlan.decide(_config(augment="host"), tensorflow=False)


@pytest.mark.parametrize("tensorflow, augment", [(False, "device"), (True, "device"), (True, "host")])
def test_min_image_size_unset_is_the_default_and_zero_stays_zero(tensorflow, augment):
    plan = run.InputPlan.decide(_config(augment=augment), tensorflow=tensorflow)
    files, arrays = _Source(encoded=True), _Source(encoded=False)
    assert plan.min_image_size(files) == 16  # unset: the global crop
    assert plan.min_image_size(arrays) == (0 if augment == "device" else 16)  # arrays cropped on the device
    for value in (0, 12):
        explicit = run.InputPlan.decide(_config(augment=augment, min_image_size=value), tensorflow=tensorflow)
        assert explicit.min_image_size(files) == value and explicit.min_image_size(arrays) == value


@pytest.mark.parametrize("sizes, stretched", [(((6, 7),), 7), (((6, 7), (9, 5)), 23)])
def test_pillow_path_with_min_image_size_zero_upsamples_small_images(tmp_path, sizes, stretched):
    """One size: squares of its longer side; several: 10/7 of the 16 px global crop. Either way no error."""
    folder = _small_folder(tmp_path / "images", sizes=sizes)
    config = _config(dataset="folder", data_dir=str(folder), min_image_size=0)
    plan = run.InputPlan.decide(config, tensorflow=False)
    data = run.load_data(config)
    pipeline, dataset_for, skipped = plan.training_datasets(data, ONE_PROCESS)
    loader = pipeline(0)
    assert pipeline is dataset_for and skipped.count == 0 and len(loader) == 4
    for index in range(len(loader)):
        x, labels = loader[index]
        assert x["images"].shape == (4, stretched, stretched, 3) and x["images"].dtype == np.uint8
        assert {tuple(size) for size in x["image_sizes"].tolist()} <= set(sizes) and labels.shape == (4,)
    batches = plan.eval_batches(data.train, batch_size=16)
    images, labels = batches[0]
    assert images.shape == (16, 16, 16, 3) and images.dtype == np.float32 and sorted(set(labels)) == [0, 1]


def test_pillow_path_refuses_small_images_unless_zero_with_the_reason(tmp_path):
    folder = _small_folder(tmp_path / "images")
    config = _config(dataset="folder", data_dir=str(folder))
    plan = run.InputPlan.decide(config, tensorflow=False)
    pipeline, _, _ = plan.training_datasets(run.load_data(config), ONE_PROCESS)
    with pytest.raises(ValueError, match="smaller than 16 px.*min_image_size=0"):
        pipeline(0)


def test_tf_data_path_with_min_image_size_zero_accepts_small_images(tmp_path):
    pytest.importorskip("tensorflow")
    folder = _small_folder(tmp_path / "images")
    for augment in ("host", "device"):
        config = _config(dataset="folder", data_dir=str(folder), min_image_size=0, augment=augment)
        plan = run.InputPlan.decide(config, tensorflow=True)
        pipeline, _, skipped = plan.training_datasets(run.load_data(config), ONE_PROCESS)
        batch = next(iter(pipeline(0)))
        assert len(batch) == 2 and skipped.skipped.count == 0
