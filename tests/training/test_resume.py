"""Runs users can trust: checkpoints mid-epoch, exact resumption, NaN stops, atomic writes, disk checks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_carp
from keras_carp.callbacks import RunCheckpoint
from keras_carp.checkpoints import NonFiniteLossError, atomic_save_model, latest_checkpoint
from tests.conftest import random_views, tiny_model, to_numpy
from tests.training.killed_runs import csv_rows, kill_one_run_finish_the_other

ROOT = Path(__file__).resolve().parents[2]
BATCH, STEPS = 8, 4  # 4 steps per epoch


def _compiled(seed=0):
    keras.utils.set_random_seed(seed)
    model = tiny_model()
    schedule = keras_carp.WarmupCosineDecay(0.5, BATCH, total_steps=2 * STEPS, warmup_steps=2, min_learning_rate=0.01)
    model.compile(optimizer=keras_carp.LARS(schedule))
    return model


def _fit(model, views, callbacks, **kwargs):
    return model.fit(x=views, batch_size=BATCH, shuffle=False, verbose=0,
                     callbacks=[keras_carp.TeacherEMA(total_steps=2 * STEPS), *callbacks], **kwargs)  # fmt: skip


@pytest.mark.core
def test_resuming_mid_epoch_gives_the_uninterrupted_epoch_means_and_weights(tmp_path):
    """A checkpoint 2 steps into epoch 2 restores weights, optimizer, step and the epoch's running means."""
    views = random_views(batch=BATCH * STEPS, num_local=1)
    model = _compiled()
    saver = RunCheckpoint(str(tmp_path), STEPS, every_steps=3, keep=10)
    uninterrupted = _fit(model, views, [saver], epochs=2).history
    names = sorted(p.name for p in tmp_path.glob("step-*.keras"))
    assert names == [f"step-{s:09d}.keras" for s in (3, 4, 6, 8)]  # every 3 steps, and each epoch's end

    checkpoint = next(c for c in keras_carp.checkpoints.list_checkpoints(str(tmp_path)) if c.step == 6)
    assert (checkpoint.epoch, checkpoint.step_in_epoch) == (1, 2)
    resumed = _compiled(seed=1)  # other initial weights: everything must come from the file
    resumed.optimizer.build(resumed.trainable_variables)
    resumed.load_weights(checkpoint.path)
    assert int(to_numpy(resumed.optimizer.iterations)) == 6
    rest = tuple(view[2 * BATCH :] for view in views)  # the epoch's last 2 batches
    restorer = RunCheckpoint(str(tmp_path / "resumed"), STEPS, resume=checkpoint)
    history = _fit(resumed, rest, [restorer], initial_epoch=1, epochs=2).history
    for key in ("loss", "consistency", "entropy", "prototypes_used"):
        np.testing.assert_allclose(history[key][-1], uninterrupted[key][-1], rtol=1e-5, err_msg=key)
    for mine, theirs in zip(resumed.weights, model.weights):
        np.testing.assert_allclose(to_numpy(mine), to_numpy(theirs), rtol=1e-4, atol=1e-5, err_msg=mine.path)

    # Without the saved running means, the resumed epoch's mean covers only its last 2 steps: visibly different.
    forgetful = _compiled(seed=1)
    forgetful.optimizer.build(forgetful.trainable_variables)
    forgetful.load_weights(checkpoint.path)
    partial = _fit(forgetful, rest, [], initial_epoch=1, epochs=2).history
    assert not np.isclose(partial["loss"][-1], uninterrupted["loss"][-1], rtol=1e-6, atol=0)


class _PoisonAfterStep(keras.callbacks.Callback):
    """Sets the student head's weights to NaN after step ``step`` (as a diverging update would)."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if batch + 1 == self.step:
            for weight in self.model.student_head.trainable_weights:
                weight.assign(np.full(weight.shape, np.nan, "float32"))


@pytest.mark.core
def test_a_nan_loss_stops_the_run_naming_the_step_and_the_last_good_checkpoint(tmp_path):
    views = random_views(batch=BATCH * STEPS, num_local=0)
    saver = RunCheckpoint(str(tmp_path), STEPS, every_steps=1)
    with pytest.raises(NonFiniteLossError, match="at step 3") as caught:
        _fit(_compiled(), views, [saver, _PoisonAfterStep(2)], epochs=1)
    assert caught.value.step == 3
    assert caught.value.last_checkpoint == str(tmp_path / "step-000000002.keras")
    assert latest_checkpoint(str(tmp_path)).step == 2  # the broken state was not saved


def test_checkpoints_are_atomic_and_damaged_ones_are_passed_over(tmp_path, monkeypatch):
    model = _compiled()
    saver = RunCheckpoint(str(tmp_path), STEPS)
    saver.set_model(model)
    saver._step = 4
    first = saver.save()

    def disk_full(self, path, *args, **kwargs):
        Path(path).write_bytes(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(model), "save", disk_full)
    saver._step = 8
    with pytest.raises(OSError, match=f"step 8 .*No space left.*last good checkpoint: {first}"):
        saver.save()
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["step-000000004.json", "step-000000004.keras"]  # no partial file left
    assert latest_checkpoint(str(tmp_path)).path == first

    # A file damaged after it was written (its record exists) is reported and the one before is used.
    saver._step = 12
    newest = saver.save()
    Path(newest).write_bytes(Path(newest).read_bytes()[:5000])
    assert latest_checkpoint(str(tmp_path)).path == first


def test_atomic_save_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    model = _compiled()
    path = tmp_path / "model.keras"
    atomic_save_model(model, str(path))
    before = path.read_bytes()
    monkeypatch.setattr(type(model), "save", lambda self, p, *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        atomic_save_model(model, str(path))
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["model.keras"]


# ----------------------------------------------------------------------------- the command line

TINY_RUN = ["--epochs", "3", "--batch-size", "256", "--num-prototypes", "64", "--block-size", "16",
            "--hidden-dim", "32", "--bottleneck-dim", "16", "--image-size", "16", "--global-size", "16",
            "--local-size", "8", "--warmup-epochs", "1", "--eval-split", "", "--log-every-steps", "1",
            "--checkpoint-every-steps", "3"]  # fmt: skip  # digits: 1347 images, 5 steps per epoch


def _command(out, *extra):
    return [sys.executable, "-m", "training.pretrain", *TINY_RUN, "--output-dir", str(out), *extra]


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow", PYTHONPATH=str(ROOT))


@pytest.mark.slow
def test_kill_9_mid_epoch_then_the_same_command_continues_as_if_nothing_happened(tmp_path):
    """The acceptance test: SIGKILL a run in its second epoch, rerun it, compare with an uninterrupted run."""
    out = tmp_path / "killed"
    killed_at = kill_one_run_finish_the_other(_command, tmp_path / "full", out, _env())
    assert not (out / "summary.json").exists()
    assert killed_at.step in (6, 9) and killed_at.step_in_epoch  # steps 6 and 9 are both mid-epoch

    again = subprocess.run(_command(out), env=_env(), cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {killed_at.path} (step {killed_at.step} of 15" in again.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] == killed_at.step

    # The loss curve continues as if nothing happened: every epoch's means, and the final weights.
    expected, got = csv_rows(tmp_path / "full" / "training_log.csv"), csv_rows(out / "training_log.csv")
    assert [row["epoch"] for row in got] == ["0", "1", "2"]
    for mine, theirs in zip(got, expected):
        for key in ("loss", "consistency", "entropy", "prototypes_used", "learning_rate", "teacher_momentum"):
            np.testing.assert_allclose(float(mine[key]), float(theirs[key]), rtol=1e-5, err_msg=key)
    resumed = keras.saving.load_model(out / "model.keras")
    reference = keras.saving.load_model(tmp_path / "full" / "model.keras")
    assert int(to_numpy(resumed.optimizer.iterations)) == 15
    for mine, theirs in zip(resumed.weights, reference.weights):
        np.testing.assert_allclose(to_numpy(mine), to_numpy(theirs), rtol=1e-4, atol=1e-5, err_msg=mine.path)
    # The run directory has everything in it.
    for name in ("config.json", "training_log.csv", "model.keras", "summary.json"):
        assert (out / name).is_file(), name
    assert (out / "encoder" / "saved_model.pb").is_file()
    assert list((out / "logs" / "train").glob("events.out.tfevents.*"))

    # Rerunning with a different training setting is refused rather than mixing two runs.
    changed = subprocess.run(_command(out, "--block-size", "32"), env=_env(), cwd=ROOT, capture_output=True, text=True)
    assert changed.returncode != 0 and "block_size: 16 -> 32" in changed.stderr


def test_a_full_disk_is_reported_before_training(tmp_path, monkeypatch):
    from training import pretrain

    usage = type("Usage", (), {"total": 2**30, "used": 2**30 - 2**20, "free": 2**20})
    monkeypatch.setattr(keras_carp.checkpoints.shutil, "disk_usage", lambda path: usage)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"1 MiB free, but this run writes about \d+ MiB"):
        pretrain.main(TINY_RUN + ["--output-dir", str(out)])
    assert not (out / "checkpoints").exists() and not (out / "training_log.csv").exists()


def test_a_nan_loss_from_the_command_line_names_step_and_checkpoint(tmp_path):
    from training import pretrain

    out = tmp_path / "run"
    args = TINY_RUN + ["--checkpoint-every-steps", "1", "--warmup-epochs", "0", "--base-learning-rate", "1e35"]
    with pytest.raises(SystemExit, match=r"loss became nan at step (\d+).*last good checkpoint is .*step-0+\d+\.keras"):
        pretrain.main(args + ["--export", "false", "--output-dir", str(out)])
    assert not (out / "model.keras").exists() and not (out / "summary.json").exists()
