"""Run checkpoints that survive ``kill -9``: atomic ``.keras`` files, resume, and a stop on a non-finite loss.

A checkpoint is the whole ``.keras`` file (student, teacher, heads, optimizer
state and step counter, teacher-momentum schedule) plus a small JSON sidecar
with the step, the epoch and the state of the epoch's running means, so that
a run resumed in the middle of an epoch logs the same epoch averages as the
uninterrupted run. Data order and crops are functions of (seed, epoch) and the
partition of (seed, step) (``multicrop_dataset(epochs=, start_step=)``), so
the step counter is all the random state there is.

Both files are written under a temporary name and renamed into place, the
sidecar last: a checkpoint is complete when its sidecar exists, and a
half-written file never has a name that ``latest_checkpoint`` looks at.
Keras' ``BackupAndRestore`` is not enough here: it restarts an interrupted
epoch from its first batch, overwrites its one file in place, and keeps no
epoch means. Paths may be local or ``gs://`` (``tf.io.gfile``).

The callback that writes them during ``fit`` is
``keras_carp.callbacks.RunCheckpoint``; this module holds the file helpers and
finds them again (``latest_checkpoint``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import zipfile
from dataclasses import dataclass, field

import keras
import numpy as np

from keras_carp import file_io

logger = logging.getLogger("keras_carp.checkpoints")

_NAME = re.compile(r"^step-(\d{9})\.json$")


def _gfile():
    return file_io.gfile()  # tf.io.gfile (local and gs:// paths), or local files without TensorFlow


def _is_local(path: str) -> bool:
    return "://" not in str(path)


def _fsync(path: str) -> None:
    if _is_local(path):
        with open(path, "rb+") as handle:
            os.fsync(handle.fileno())


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never a part."""
    path = str(path)
    temporary = os.path.join(os.path.dirname(path), f".partial-{os.path.basename(path)}")
    with _gfile().GFile(temporary, "w") as handle:
        handle.write(text)
    _fsync(temporary)
    _gfile().rename(temporary, path, overwrite=True)


def atomic_save_model(model: keras.Model, path: str) -> None:
    """``model.save(path)`` through a temporary file renamed into place."""
    path = str(path)
    temporary = os.path.join(os.path.dirname(path), f".partial-{os.path.basename(path)}")
    try:
        model.save(temporary)
        _fsync(temporary)
        _gfile().rename(temporary, path, overwrite=True)
    except BaseException:
        if _gfile().exists(temporary):
            _gfile().remove(temporary)
        raise


@dataclass
class Checkpoint:
    """A complete checkpoint: the model file and where the run was."""

    path: str
    step: int
    epoch: int
    steps_per_epoch: int
    epoch_metrics: dict[str, list] = field(default_factory=dict)

    @property
    def step_in_epoch(self) -> int:
        return self.step - self.epoch * self.steps_per_epoch


def _readable(path: str) -> bool:
    """A local .keras file must be a zip whose members pass their CRC check; remote files are trusted."""
    if not _is_local(path):
        return _gfile().exists(path)
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile):
        return False


def list_checkpoints(directory: str) -> list[Checkpoint]:
    """Complete checkpoints in ``directory``, oldest first."""
    if not _gfile().isdir(str(directory)):
        return []
    found = []
    for name in _gfile().listdir(str(directory)):
        match = _NAME.match(name.rstrip("/"))
        if not match:
            continue
        sidecar = os.path.join(str(directory), name)
        try:
            with _gfile().GFile(sidecar) as handle:
                state = json.loads(handle.read())
            found.append(Checkpoint(path=os.path.join(str(directory), state["file"]), step=int(state["step"]),
                                    epoch=int(state["epoch"]), steps_per_epoch=int(state["steps_per_epoch"]),
                                    epoch_metrics=state.get("epoch_metrics", {})))  # fmt: skip
        except (OSError, ValueError, KeyError) as error:
            logger.warning("ignoring the unreadable checkpoint record %s: %s", sidecar, error)
    return sorted(found, key=lambda checkpoint: checkpoint.step)


def latest_checkpoint(directory: str) -> Checkpoint | None:
    """The newest checkpoint whose file is intact; damaged ones are reported and passed over."""
    for checkpoint in reversed(list_checkpoints(directory)):
        if _readable(checkpoint.path):
            return checkpoint
        logger.warning("checkpoint %s is damaged; falling back to the one before", checkpoint.path)
    return None


def checkpoint_bytes(model: keras.Model) -> int:
    """About the size of one ``.keras`` checkpoint: every weight plus one optimizer slot per trainable weight."""

    def size(variables) -> int:
        return sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in variables)

    return size(model.weights) + size(model.trainable_weights)


def check_free_space(directory: str, required_bytes: int) -> None:
    """Raise OSError before training when the disk holding ``directory`` cannot take ``required_bytes``."""
    if not _is_local(str(directory)):
        return  # object stores report no free space; a failed write names its checkpoint instead
    free = shutil.disk_usage(directory).free
    if free < required_bytes:
        raise OSError(
            f"{directory} has {free / 2**20:.0f} MiB free, but this run writes about {required_bytes / 2**20:.0f} "
            "MiB (checkpoints, the final model and the exported encoder). Free some space or write the run "
            "elsewhere."
        )


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; carries the step and the last good checkpoint."""

    def __init__(self, step: int, value: float, last_checkpoint: str | None):
        self.step, self.value, self.last_checkpoint = step, value, last_checkpoint
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
        super().__init__(f"the loss became {value} at step {step}; training stopped, {where}.")
