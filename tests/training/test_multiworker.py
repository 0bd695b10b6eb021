"""carp-pretrain as a job of two TensorFlow worker processes on this machine, sharing one run directory.

The acceptance test of several hosts: only the chief writes the run directory; one worker killed with
SIGKILL mid-epoch stops the other with a clear message; the rerun of both resumes from the last complete
checkpoint and ends with the training log and weights of an uninterrupted two-worker run.
"""

import json
import os
import signal
import sys
import time

import keras
import numpy as np
import pytest

from tests.multiworker import Job
from tests.training.killed_runs import csv_rows
from tests.training.test_resume import TINY_RUN

pytestmark = pytest.mark.slow  # three two-process jobs: `pytest -m slow`


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def _start(out, logs, tmp_path, backend="tensorflow", *extra):
    command = [sys.executable, "-m", "training.pretrain", *TINY_RUN, "--strategy", "multiworker",
               "--output-dir", str(out), *extra]  # fmt: skip
    scratch = tmp_path / f"{logs.name}-scratch"
    scratch.mkdir()
    return Job(command, logs, backend=backend, extra_env={1: {"TMPDIR": str(scratch)}}), scratch


def _files(directory) -> set:
    return {str(path.relative_to(directory)) for path in directory.rglob("*") if path.is_file()}


def test_two_workers_write_one_run_directory_and_a_killed_worker_resumes(tmp_path):
    # An uninterrupted job: the chief writes everything, worker 1 nothing (its scratch copy is removed).
    full = tmp_path / "full"
    job, scratch = _start(full, tmp_path / "full-logs", tmp_path)
    assert job.wait() == [0, 0], job.output(0)[1][-3000:] + job.output(1)[1][-3000:]
    assert "MultiWorkerMirroredStrategy with 2 replica(s) on 2 workers" in job.output(0)[0]
    assert "process 1 of 2: the chief (process 0) wrote" in job.output(1)[0]
    assert list(scratch.iterdir()) == []
    files = _files(full)
    for name in ("config.json", "training_log.csv", "model.keras", "summary.json", "encoder/saved_model.pb",
                 "checkpoints/step-000000015.keras", "checkpoints/step-000000015.json"):  # fmt: skip
        assert name in files, name
    assert not [name for name in files if ".partial" in name]
    assert len(list((full / "logs" / "train").glob("events.out.tfevents.*"))) == 1  # one writer
    rows = csv_rows(full / "training_log.csv")
    assert [row["epoch"] for row in rows] == ["0", "1", "2"]  # one writer: no row twice
    summary = json.loads((full / "summary.json").read_text())
    assert summary["distribution"] == "MultiWorkerMirroredStrategy with 2 replica(s) on 2 workers"

    # Worker 1 is killed once the step-6 checkpoint (mid-epoch 2) exists; the chief stops and says why.
    killed = tmp_path / "killed"
    job, _ = _start(killed, tmp_path / "killed-logs", tmp_path)
    deadline = time.time() + 600
    while not (killed / "checkpoints" / "step-000000006.json").exists():
        assert job.processes[0].poll() is None and time.time() < deadline, job.output(0)[1][-3000:]
        time.sleep(0.01)
    os.kill(job.processes[1].pid, signal.SIGKILL)
    killed_at = time.time()
    statuses = job.wait(timeout=300)
    noticed = time.time() - killed_at
    chief_errors = job.output(0)[1]
    assert statuses[0] == 1 and statuses[1] == -signal.SIGKILL, chief_errors[-3000:]
    assert "another process of this job stopped, so the job cannot go on" in chief_errors
    assert f"resume from the last complete checkpoint ({killed}/checkpoints/step-000000006.keras)" in chief_errors
    assert not (killed / "summary.json").exists()
    print(f"the chief stopped {noticed:.1f} s after worker 1 was killed")

    # Both rerun with the same command: they resume from step 6 and end where the uninterrupted job ended.
    job, scratch = _start(killed, tmp_path / "again-logs", tmp_path)
    assert job.wait() == [0, 0], job.output(0)[1][-3000:] + job.output(1)[1][-3000:]
    for index in (0, 1):
        assert f"resuming from {killed}/checkpoints/step-000000006.keras (step 6 of 15" in job.output(index)[0]
    assert list(scratch.iterdir()) == []
    expected, got = csv_rows(full / "training_log.csv"), csv_rows(killed / "training_log.csv")
    assert [row["epoch"] for row in got] == ["0", "1", "2"]
    for mine, theirs in zip(got, expected):
        for key in ("loss", "consistency", "entropy", "prototypes_used", "learning_rate", "teacher_momentum"):
            np.testing.assert_allclose(float(mine[key]), float(theirs[key]), rtol=1e-5, err_msg=key)
    resumed = keras.saving.load_model(killed / "model.keras")
    reference = keras.saving.load_model(full / "model.keras")
    assert int(to_numpy(resumed.optimizer.iterations)) == 15
    for mine, theirs in zip(resumed.weights, reference.weights):
        np.testing.assert_allclose(to_numpy(mine), to_numpy(theirs), rtol=1e-4, atol=1e-5, err_msg=mine.path)
    assert json.loads((killed / "summary.json").read_text())["resumed_from_step"] == 6


def test_two_jax_processes_train_one_run_directory(tmp_path):
    """JAX: the job comes from Keras' KERAS_DISTRIBUTION_* variables; one global mesh, the chief writes."""
    pytest.importorskip("jax")
    out = tmp_path / "jax"
    job, scratch = _start(out, tmp_path / "jax-logs", tmp_path, "jax", "--epochs", "1", "--warmup-epochs", "0",
                          "--export", "false")  # fmt: skip
    assert job.wait() == [0, 0], job.output(0)[1][-3000:] + job.output(1)[1][-3000:]
    assert "DataParallel over 2 devices of 2 processes" in job.output(0)[0]
    assert "process 1 of 2: the chief (process 0) wrote" in job.output(1)[0]
    assert list(scratch.iterdir()) == []
    files = _files(out)
    for name in ("config.json", "training_log.csv", "model.keras", "summary.json", "checkpoints/step-000000005.keras"):
        assert name in files, name
    assert [row["epoch"] for row in csv_rows(out / "training_log.csv")] == ["0"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["process_index"] == 0 and np.isfinite(summary["final_loss"])
