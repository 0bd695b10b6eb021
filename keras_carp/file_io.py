"""The file layer of runs and checkpoints: ``tf.io.gfile`` when TensorFlow is installed, else local files.

``tf.io.gfile`` serves local paths and object stores (``gs://``) alike. Without
TensorFlow (a JAX or PyTorch machine) the same calls run on the local file
system, and a remote path is refused with the reason.
"""

from __future__ import annotations

import glob as _glob
import importlib.util
import os
import shutil


class LocalFiles:
    """The part of ``tf.io.gfile``'s interface keras-carp uses, on local paths only."""

    @staticmethod
    def _local(path) -> str:
        path = os.fspath(path)
        if "://" in path:
            raise OSError(f"{path} is not a local path: object stores (gs://...) are reached through TensorFlow's "
                          "file system; install tensorflow to use them.")  # fmt: skip
        return path

    @classmethod
    def GFile(cls, path, mode: str = "r"):  # noqa: N802 (tf.io.gfile's name)
        return open(cls._local(path), mode)

    @classmethod
    def exists(cls, path) -> bool:
        return os.path.exists(cls._local(path))

    @classmethod
    def isdir(cls, path) -> bool:
        return os.path.isdir(cls._local(path))

    @classmethod
    def listdir(cls, path) -> list[str]:
        return os.listdir(cls._local(path))

    @classmethod
    def makedirs(cls, path) -> None:
        os.makedirs(cls._local(path), exist_ok=True)

    @classmethod
    def remove(cls, path) -> None:
        os.remove(cls._local(path))

    @classmethod
    def rmtree(cls, path) -> None:
        shutil.rmtree(cls._local(path))

    @classmethod
    def rename(cls, source, destination, overwrite: bool = False) -> None:
        if not overwrite and os.path.exists(cls._local(destination)):
            raise FileExistsError(f"{destination} exists.")
        os.replace(cls._local(source), cls._local(destination))

    @classmethod
    def copy(cls, source, destination, overwrite: bool = False) -> None:
        if not overwrite and os.path.exists(cls._local(destination)):
            raise FileExistsError(f"{destination} exists.")
        shutil.copyfile(cls._local(source), cls._local(destination))

    @classmethod
    def glob(cls, pattern) -> list[str]:
        return _glob.glob(cls._local(pattern))


def tensorflow_installed() -> bool:
    """Whether TensorFlow can be imported here (checked without importing it)."""
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):  # an import hook that refuses it
        return False


def gfile():
    """``tf.io.gfile``, or ``LocalFiles`` where TensorFlow is not installed."""
    if not tensorflow_installed():
        return LocalFiles
    import tensorflow as tf

    return tf.io.gfile
