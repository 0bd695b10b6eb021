"""carp-pretrain where TensorFlow is not installed: views on the device, Pillow loading, kill -9 and resume.

Where TensorFlow is installed, an import hook makes it unimportable in the
run's process; CI also runs these tests in a virtualenv without it.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.training.killed_runs import csv_rows, kill_one_run_finish_the_other

pytestmark = [pytest.mark.slow, pytest.mark.tensorflow_free]
ROOT = Path(__file__).resolve().parents[2]

WITHOUT_TENSORFLOW = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoTensorFlow(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "tensorflow_text", "tensorboard"):
                raise ImportError(f"{name} is not installed here")

    sys.meta_path.insert(0, NoTensorFlow())
    from training.pretrain import main

    code = main(sys.argv[1:])
    assert not any(name.split(".")[0] == "tensorflow" for name in sys.modules), "TensorFlow was imported"
    sys.exit(code)
    """
)
TINY_RUN = ["--epochs", "3", "--batch-size", "256", "--num-prototypes", "64", "--block-size", "16",
            "--hidden-dim", "32", "--bottleneck-dim", "16", "--image-size", "16", "--global-size", "16",
            "--local-size", "8", "--warmup-epochs", "1", "--log-every-steps", "1",
            "--checkpoint-every-steps", "3"]  # fmt: skip  # digits: 1347 images, 5 steps per epoch


def _command(out, *extra):
    return [sys.executable, "-c", WITHOUT_TENSORFLOW, *TINY_RUN, "--output-dir", str(out), *extra]


def _env():
    pytest.importorskip("jax")
    return dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))


def test_without_tensorflow_a_killed_run_resumes_as_if_nothing_happened(tmp_path):
    """kill -9 in epoch 2 of 3, rerun: the views come from (seed, step), the order from (seed, epoch)."""
    env = _env()
    out = tmp_path / "killed"
    killed_at = kill_one_run_finish_the_other(_command, tmp_path / "full", out, env)
    assert killed_at.step in (6, 9) and killed_at.step_in_epoch

    again = subprocess.run(_command(out), env=env, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "views made on the device" in again.stdout
    assert "TensorFlow is not installed: no SavedModel" in again.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] == killed_at.step and summary["augment"] == "device"
    assert summary["backend"] == "jax" and summary["skipped_images"] == 0
    assert 30 < summary["knn_top1"] <= 100  # per cent, 10 classes: far above chance

    expected, got = csv_rows(tmp_path / "full" / "training_log.csv"), csv_rows(out / "training_log.csv")
    assert [row["epoch"] for row in got] == ["0", "1", "2"]
    for mine, theirs in zip(got, expected):
        for key in ("loss", "consistency", "entropy", "prototypes_used", "learning_rate", "teacher_momentum"):
            np.testing.assert_allclose(float(mine[key]), float(theirs[key]), rtol=1e-5, err_msg=key)
    for name in ("config.json", "training_log.csv", "model.keras", "summary.json"):
        assert (out / name).is_file(), name
    assert not (out / "encoder").exists() and not (out / "logs").exists()


def test_without_tensorflow_host_views_and_remote_paths_are_refused_with_the_reason(tmp_path):
    env = _env()
    host = subprocess.run(_command(tmp_path / "host", "--augment", "host"), env=env, cwd=ROOT, capture_output=True,
                          text=True)  # fmt: skip
    assert host.returncode == 1 and "--augment host" in host.stderr and "TensorFlow is not installed" in host.stderr
    assert not (tmp_path / "host").exists()
    remote = subprocess.run(_command("gs://bucket/run"), env=env, cwd=ROOT, capture_output=True, text=True)
    assert remote.returncode == 1 and "install tensorflow" in remote.stderr


def test_without_tensorflow_min_image_size_zero_trains_on_small_images(tmp_path):
    """--min-image-size 0 upsamples small images on the Pillow path too; unset, they are refused with the reason."""
    from PIL import Image

    env = _env()
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("test", 8)):
        for label in ("red", "blue"):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (8, 8 + i % 3, 3), dtype=np.uint8)  # smaller than the 16 px crops
                Image.fromarray(pixels).save(tmp_path / "data" / split / label / f"{i}.png")
    args = ["--dataset", "folder", "--data-dir", str(tmp_path / "data"), "--epochs", "1", "--batch-size", "16",
            "--warmup-epochs", "0"]  # fmt: skip
    refused = subprocess.run(_command(tmp_path / "refused", *args), env=env, cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 1 and "smaller than 16 px" in refused.stderr, refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr and not (tmp_path / "refused").exists()
    run = subprocess.run(_command(tmp_path / "run", *args, "--min-image-size", "0"), env=env, cwd=ROOT,
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train_images"] == 48 and summary["augment"] == "device" and summary["skipped_images"] == 0
