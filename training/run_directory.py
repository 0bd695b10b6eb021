"""A pretraining run's directory, local or in a bucket (``gs://``): one object for every file a run reads or writes.

Layout::

    config.json          the resolved configuration (nested sections)
    checkpoints/         ckpt-<step>.weights.h5 + their records (keras_carp.checkpoints)
    logs/                TensorBoard
    training_log.csv     one row per epoch
    knn_random_init.json k-NN of the encoder before the first step
    model.keras          the final model
    encoder/             the teacher encoder as a TensorFlow SavedModel
    summary.json         figures of the run

TensorFlow's ``tf.io.gfile`` serves local paths and object stores alike; it is
imported only when a run directory is used. Without TensorFlow, local paths
work through ``keras_carp.file_io.LocalFiles`` and ``encoder/`` is not written.

A job of several processes (hosts) shares one run directory: every process
reads it (to resume from the same checkpoint), only the chief writes it. The
others do the same work (saving touches every process's copy of distributed
variables) into a local scratch directory that is removed when the run ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator


def _gfile():
    from keras_carp import file_io

    return file_io.gfile()


class RunDirectory:
    """The run directory at ``path``: created and proven writable by ``create``, removed again if a run is
    refused before it writes anything (``removed_if_refused``).

    ``chief=False`` (the other processes of a multi-process job): reads go to ``path``, writes
    (``output``) to a local scratch directory, removed by ``close``.
    """

    def __init__(self, path: str, chief: bool = True):
        self.path = str(path)
        self.chief = chief
        self.scratch: str | None = None
        self.created = False

    def __repr__(self) -> str:
        return f"RunDirectory({self.path!r})" if self.chief else f"RunDirectory({self.path!r}, chief=False)"

    def __str__(self) -> str:
        return self.path

    @property
    def remote(self) -> bool:
        return "://" in self.path

    def join(self, *names: str) -> str:
        """A path inside the run directory."""
        if self.remote:
            return "/".join([self.path.rstrip("/"), *names])
        return os.path.join(self.path, *names)

    def output(self, *names: str) -> str:
        """Where this process writes ``names``: in the run directory (chief) or in its scratch directory."""
        if self.chief:
            return self.join(*names)
        return os.path.join(self.scratch, *names)

    def exists(self, name: str) -> bool:
        return _gfile().exists(self.join(name))

    def read_text(self, name: str) -> str:
        with _gfile().GFile(self.join(name)) as handle:
            return handle.read()

    def read_json(self, name: str):
        return json.loads(self.read_text(name))

    def write_json(self, name: str, value) -> None:
        """Write ``name`` atomically (a reader never sees half a file)."""
        from keras_carp.checkpoints import atomic_write_text

        atomic_write_text(self.output(name), json.dumps(value, indent=2))

    def create(self) -> RunDirectory:
        """Create the directory and prove it is writable, before any training; OSError says why not.

        Not the chief: only its scratch directory is made (the chief creates the run directory).
        """
        if not self.chief:
            self.scratch = tempfile.mkdtemp(prefix="carp-worker-")
            return self
        gfile = _gfile()
        if gfile.exists(self.path) and not gfile.isdir(self.path):
            raise OSError(f"the output directory {self.path} exists and is not a directory.")
        try:
            self.created = not gfile.exists(self.path)
            gfile.makedirs(self.path)
            probe = self.join(".write-test")
            with gfile.GFile(probe, "w") as handle:
                handle.write("ok")
            gfile.remove(probe)
        except Exception as error:  # OSError locally; tf.errors.OpError (not an OSError) from object stores
            raise OSError(f"cannot write to the output directory {self.path}: {error}") from None
        return self

    @contextlib.contextmanager
    def removed_if_refused(self) -> Iterator[None]:
        """Remove the directory again if the block fails and the directory is one this run created and left
        empty (a refused run leaves nothing behind; a run that wrote anything keeps it for resuming)."""
        try:
            yield
        except BaseException:
            gfile = _gfile()
            if self.chief and self.created and gfile.isdir(self.path) and not gfile.listdir(self.path):
                gfile.rmtree(self.path)
            raise

    def close(self) -> None:
        """Remove the scratch directory of a process that is not the chief."""
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None

    def truncate_csv_log(self, epochs_done: int, name: str = "training_log.csv") -> None:
        """Keep the CSV log's header and its first ``epochs_done`` epochs (rows past the checkpoint are redone)."""
        if not self.chief or not self.exists(name):
            return
        from keras_carp.checkpoints import atomic_write_text

        lines = self.read_text(name).splitlines(keepends=True)
        kept = [line for line in lines[1:] if line.split(",", 1)[0].strip().isdigit()][:epochs_done]
        atomic_write_text(self.join(name), "".join(lines[:1] + kept))

    def export_encoder(self, model, name: str = "encoder") -> str:
        """The model's teacher encoder as a SavedModel in ``name`` (staged locally, then copied to a bucket)."""
        from keras_carp.export import export_encoder

        target = self.output(name)
        if not self.chief or not self.remote:
            export_encoder(model, target, overwrite=True)
            return target
        gfile = _gfile()
        with tempfile.TemporaryDirectory() as staging:
            local = os.path.join(staging, name)
            export_encoder(model, local, overwrite=True)
            if gfile.exists(target):
                gfile.rmtree(target)
            for folder, _, files in os.walk(local):
                relative = os.path.relpath(folder, local)
                destination = target if relative == "." else "/".join([target, *relative.split(os.sep)])
                gfile.makedirs(destination)
                for file_name in files:
                    gfile.copy(os.path.join(folder, file_name), "/".join([destination, file_name]), overwrite=True)
        return target
