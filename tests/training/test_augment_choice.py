"""Where carp-pretrain makes the views: --augment auto/host/device, the host's image size, a device-views run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training import run
from training.config import PretrainConfig

ROOT = Path(__file__).resolve().parents[2]


def test_auto_makes_the_views_on_the_host_of_a_cpu_and_on_the_device_without_tensorflow(monkeypatch):
    config = PretrainConfig()
    assert run.resolve_augment(config) == "host"  # this machine: a CPU, TensorFlow installed
    assert run.resolve_augment(config.replace(augment="device")) == "device"
    monkeypatch.setattr(run, "tensorflow_available", lambda: False)
    assert run.resolve_augment(config) == "device"
    with pytest.raises(run.RunRefused, match="--augment host makes the views with tf.data"):
        run.resolve_augment(config.replace(augment="host"))


def test_device_views_of_a_folder_stretch_images_to_ten_sevenths_of_the_global_crop():
    class Folder:
        image_shape = None

    class Arrays:
        image_shape = (28, 28)

    config = PretrainConfig()  # 224 px global crops
    assert run.device_image_size(config, Folder()) == 320
    assert run.device_image_size(config, Arrays()) is None
    assert run.device_image_size(config.replace(device_image_size=384), Arrays()) == 384
    with pytest.raises(ValueError, match="device_image_size must be positive"):
        config.replace(device_image_size=0)


@pytest.mark.slow
def test_carp_pretrain_with_device_views_on_tensorflow(tmp_path):
    command = [sys.executable, "-m", "training.pretrain", "--epochs", "2", "--batch-size", "256", "--num-prototypes",
               "64", "--block-size", "16", "--hidden-dim", "32", "--bottleneck-dim", "16", "--image-size", "16",
               "--global-size", "16", "--local-size", "8", "--warmup-epochs", "1", "--augment", "device",
               "--output-dir", str(tmp_path / "run")]  # fmt: skip
    env = dict(os.environ, KERAS_BACKEND="tensorflow", PYTHONPATH=str(ROOT))
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "views made on the device" in result.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["augment"] == "device" and 30 < summary["knn_top1"] <= 100
    assert (tmp_path / "run" / "encoder" / "saved_model.pb").is_file()
