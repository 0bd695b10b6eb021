"""Batches for ``fit`` without TensorFlow: Pillow decoding into ``keras.utils.PyDataset`` batches.

The tf.data pipeline (``keras_carp.data.pipeline``) decodes and augments on
the host. On JAX and PyTorch machines without TensorFlow the augmentation runs
on the accelerator instead, so the host only has to turn files (or arrays)
into fixed-size uint8 batches: ``ImageBatches``. ``EvalBatches`` is the
TensorFlow-free twin of ``eval_dataset`` (normalised centre crops).

``ImageBatches`` keeps tf.data's guarantees that matter for a long run:

- epoch e's order is a function of (seed, e) only, so a resumed run (a new
  process, ``start_step=``) sees the batches the interrupted run would have;
- undecodable files do not end the run: each is replaced by the next decodable
  image of the epoch's order (batches keep their shape and stay deterministic),
  logged once and counted in ``skipped``, also across worker processes.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import multiprocessing
import os
import threading

import keras
import numpy as np
from PIL import Image

from keras_carp.data.sources import ImageSource, as_source
from keras_carp.data.sources import decode_file as decode_file  # re-exported
from keras_carp.imagenet import center_crop_geometry, normalize, to_float_image, to_uint8_image

logger = logging.getLogger("keras_carp.data")
_POOL_LOCK = threading.Lock()  # Keras' worker threads may ask for the decode pool at once


def _readable_source(images, labels) -> ImageSource:
    source = as_source(images, labels)
    if not source.reads_without_tensorflow:
        raise TypeError(
            f"{type(source).__name__} is read through tf.data (multicrop_dataset); the Python loaders take "
            "in-memory arrays [N, H, W, C] or an image folder (a source that reads without TensorFlow)."
        )
    return source


def _shared_array(typecode: str, size: int):
    """Zeros in memory that forked (or spawned) worker processes share; this process's own without /dev/shm."""
    try:
        return multiprocessing.RawArray(typecode, size)
    except OSError:
        return np.zeros(size, {"b": np.int8, "i": np.int32}[typecode])


class _SkipLog:
    """Undecodable files met so far, in memory shared with the worker processes Keras forks.

    Per file: ``bad`` (failed at least once: later visits skip it without
    decoding, and it is logged only once), ``last`` (1 + the last epoch it was
    counted in) and ``times`` (epochs it was counted in). A file counts once per
    epoch in which its own batch position comes up, however often Keras asks
    for that batch (the TensorFlow backend reads the first batches twice to
    learn their shapes). No lock: a file's own position belongs to one batch of
    an epoch and Keras hands each batch to one worker, so each slot has one
    writer at a time; ``bad`` is idempotent. Without shared memory (no
    /dev/shm) the arrays are this process's own and worker processes'
    counts are lost.
    """

    def __init__(self, size: int):
        self._bad, self._last, self._times = (_shared_array(code, size) for code in ("b", "i", "i"))

    def is_bad(self, index: int) -> bool:
        return bool(self._bad[index])

    def mark_bad(self, index: int) -> bool:
        """Mark a file undecodable; True the first time (to log it once)."""
        first = not self._bad[index]
        self._bad[index] = 1
        return first

    def count(self, index: int, epoch: int) -> None:
        """Count an undecodable file due at its own position in ``epoch`` (once per epoch)."""
        if self._last[index] != epoch + 1:
            self._last[index] = epoch + 1
            self._times[index] += 1

    @property
    def total(self) -> int:
        return int(np.frombuffer(self._times, np.int32).sum())

    @property
    def bad_indices(self) -> np.ndarray:
        return np.flatnonzero(np.frombuffer(self._bad, np.int8))


class _Decoder:
    """Per-process state shared by the two loaders: the source, a lazy thread pool, the skip log."""

    def _setup(self, source: ImageSource, decode_threads: int) -> None:
        if decode_threads < 1:
            raise ValueError(f"decode_threads must be at least 1, got {decode_threads}.")
        self.source = source
        self.num_examples = source.num_examples
        self.decode_threads = decode_threads
        self._skips = _SkipLog(source.num_examples) if source.encoded else None
        self._labels = source.labels.astype(np.int32) if source.has_labels else None
        self._pool = None
        self._pool_pid = None

    @property
    def has_labels(self) -> bool:
        return self._labels is not None

    @property
    def skipped(self) -> int:
        """Undecodable files skipped so far, each counted once per epoch it was due in (all processes)."""
        return 0 if self._skips is None else self._skips.total

    @property
    def skipped_files(self) -> list[str]:
        """Paths of the files found undecodable so far."""
        return [] if self._skips is None else [self.source.location(int(i)) for i in self._skips.bad_indices]

    def _map(self, function, items: list) -> list:
        """``function`` over ``items``, in this process's decode thread pool when there is one."""
        if self.decode_threads == 1 or len(items) == 1:
            return [function(item) for item in items]
        with _POOL_LOCK:
            if self._pool is None or self._pool_pid != os.getpid():  # a forked worker has none of its parent's threads
                self._pool = concurrent.futures.ThreadPoolExecutor(self.decode_threads, "keras_carp_decode")
                self._pool_pid = os.getpid()
        return list(self._pool.map(function, items))

    def _try_read(self, index: int) -> np.ndarray | None:
        """Image ``index``, or None (logged the first time, remembered) when it cannot be decoded."""
        if self._skips is None:
            return self.source.read(index)
        if self._skips.is_bad(index):
            return None
        try:
            return self.source.read(index)
        except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError...
            if self._skips.mark_bad(index):
                logger.warning("%s: skipping undecodable image %s (%s: %s)", self.source.name,
                               self.source.location(index), type(error).__name__, error)  # fmt: skip
            return None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_pool"] = state["_pool_pid"] = None  # threads do not pickle (spawned worker processes)
        return state


class ImageBatches(_Decoder, keras.utils.PyDataset):
    """Fixed-size uint8 batches for ``fit`` from arrays or an image folder, decoded with Pillow (no TensorFlow).

    Each batch is ``(x, labels int32 [B])`` or ``(x,)`` when unlabelled, with
    ``x = {"images": uint8 [B, S, S, 3], "image_sizes": int32 [B, 2]}``:
    every image stretched to S x S (Pillow's antialiased bicubic; arrays of
    that size are used as they are) and its original (height, width), so an
    augmentation on the accelerator can sample crop windows in the original
    geometry and map them onto the stretched image. Grayscale becomes RGB.

    Epochs and resuming. ``steps_per_epoch = N // batch_size`` full batches
    (the remainder of each epoch's order is dropped). Index i of epoch e is
    global step ``e * steps_per_epoch + i``, except in the first epoch, whose
    first ``start_step % steps_per_epoch`` batches are already done: there
    index i is global step ``start_step + i`` and ``len()`` is the count left.
    So a dataset built with ``start_step=s`` yields, from index 0, the batches
    of global steps s, s + 1, ...: first the rest of the interrupted epoch
    (``len()`` = its remaining steps), then whole epochs (``len()`` =
    ``steps_per_epoch``). With ``epochs`` (the run's length) ``len()`` is 0
    once the run is done. ``batch_at(step)`` reads any global step directly.

    The current ``epoch`` starts at ``start_step // steps_per_epoch``;
    ``on_epoch_end`` advances it when the epoch was read: ``fit`` calls
    ``on_epoch_begin``, reads every batch, then ``on_epoch_end``. Keras also
    calls ``on_epoch_end`` when ``fit``/``predict`` start (``reset``), after
    the TensorFlow backend read the first two batches for their shapes, or
    after JAX/PyTorch read one to build an unbuilt model (or its compiled
    loss); those do not count, because an epoch ends only if
    ``on_epoch_begin`` came first and every batch of the epoch was asked for
    since (tracked in shared memory, so worker processes' reads count).

    How to feed ``fit``: Keras reads ``len()`` once per call, so resume the
    way ``training.run`` does: ``fit(ds, steps_per_epoch=len(ds),
    initial_epoch=e, epochs=e + 1)`` for the rest of an interrupted epoch,
    then ``fit(..., steps_per_epoch=ds.steps_per_epoch)`` for whole epochs
    (the same dataset, or one built with ``start_step`` at the epoch
    boundary). A ``fit`` epoch shorter than ``len()`` would mix two epochs'
    orders. Pass ``shuffle=False``: ``fit``'s default permutes each epoch's
    batch indices with Python's ``random``. With ``workers`` > 1, build the
    model and its compiled loss before ``fit`` (CARP is): Keras 3.15's
    enqueuer replays the batches it prefetched for a build read, which
    reorders the first epoch whatever the dataset does.

    Undecodable files (truncated or corrupted after ``FolderSource`` scanned
    them) are replaced by the next decodable image of the epoch's order
    (wrapping), logged once per file and counted in ``skipped`` (once per epoch
    they are due in), read from shared memory so worker processes'
    skips count too. A batch none of whose own files decodes (batch_size > 1)
    is an error: the data is broken, not a few files.

    Args:
        images: a source that ``reads_without_tensorflow`` (an ``ArraySource``, a ``FolderSource``) or
            images [N, H, W, C] (C = 1 or 3), uint8 or float in [0, 1].
        batch_size: images per batch.
        image_size: S; required for folders; arrays default to their own (square) size.
        labels: class labels for in-memory ``images``.
        seed: with ``shuffle``, epoch e's order is ``np.random.default_rng([seed, e]).permutation(N)``.
        shuffle: False keeps the source's order in every epoch.
        epochs: the run's length in epochs (optional): bounds ``start_step`` and ends the data after it.
        start_step: the global step to begin at (resuming a run).
        decode_threads: Pillow decodes (and resizes) a batch's files in this many threads of each
            worker (Pillow releases the GIL); 1 by default: no gain measured on a busy 2-core machine.
        workers, use_multiprocessing, max_queue_size: ``keras.utils.PyDataset``'s, for ``fit``
            (batches in parallel: threads, or forked processes with ``use_multiprocessing``).
    """

    def __init__(
        self,
        images,
        batch_size: int,
        image_size: int | None = None,
        labels=None,
        seed: int = 0,
        shuffle: bool = True,
        epochs: int | None = None,
        start_step: int = 0,
        decode_threads: int = 1,
        workers: int = 1,
        use_multiprocessing: bool = False,
        max_queue_size: int = 10,
    ):
        super().__init__(workers=workers, use_multiprocessing=use_multiprocessing, max_queue_size=max_queue_size)
        source = _readable_source(images, labels)
        self._setup(source, decode_threads)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        if source.num_examples < batch_size:
            raise ValueError(f"{source.name} has {source.num_examples} images, fewer than one batch of {batch_size}.")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
        if image_size is None:
            shape = source.image_shape
            if source.encoded or shape is None or shape[0] != shape[1]:
                raise ValueError(f"{source.name}: pass image_size (needed for folders and non-square arrays).")
            image_size = int(shape[0])
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}.")
        self.batch_size, self.image_size = int(batch_size), int(image_size)
        self.seed, self.shuffle, self.epochs = int(seed), bool(shuffle), epochs
        last_step = None if epochs is None else epochs * self.steps_per_epoch
        if start_step < 0 or (last_step is not None and start_step >= last_step):
            bound = "" if last_step is None else f" and below {last_step} ({epochs} epochs of {self.steps_per_epoch})"
            raise ValueError(f"start_step must be at least 0{bound}, got {start_step}.")
        self.start_step = int(start_step)
        self._first_epoch, self._done_in_first = divmod(self.start_step, self.steps_per_epoch)
        self.epoch = self._first_epoch
        self._order = (None, None)
        self._requested = _shared_array("b", self.steps_per_epoch)  # batches of this epoch asked for
        self._begun = False

    @property
    def steps_per_epoch(self) -> int:
        """Full batches in a whole epoch (``N // batch_size``)."""
        return self.num_examples // self.batch_size

    def _offset(self) -> int:
        return self._done_in_first if self.epoch == self._first_epoch else 0

    def __len__(self) -> int:
        """Batches left in the current epoch: the rest of the first one, then whole epochs; 0 after ``epochs``."""
        if self.epochs is not None and self.epoch >= self.epochs:
            return 0
        return self.steps_per_epoch - self._offset()

    def on_epoch_begin(self) -> None:
        self._begun = True

    def on_epoch_end(self) -> None:
        """Advance to the next epoch if this one was read (see the class docstring); Keras calls it."""
        requested = np.frombuffer(self._requested, np.int8)
        remaining = len(self)
        done = self._begun and remaining > 0 and bool(requested[:remaining].all())
        requested[:] = 0
        self._begun = False
        if done:
            self.epoch += 1

    def global_step(self, index: int) -> int:
        """The global step of batch ``index`` of the current epoch."""
        return self.epoch * self.steps_per_epoch + self._offset() + index

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} of {len(self)} (epoch {self.epoch})")
        batch = self.batch_at(self.global_step(index))
        self._requested[index] = 1
        return batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s order of the N images: a function of (seed, epoch) only."""
        cached_epoch, order = self._order
        if cached_epoch != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            else:
                order = np.arange(self.num_examples)
            self._order = (epoch, order)
        return order

    def batch_at(self, step: int):
        """The batch of global step ``step`` (independent of the current epoch)."""
        if step < 0 or (self.epochs is not None and step >= self.epochs * self.steps_per_epoch):
            raise IndexError(f"step {step} is outside the run.")
        epoch, position = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        positions = list(range(position * self.batch_size, (position + 1) * self.batch_size))
        images, indices = self._read_batch(order, positions, epoch, step)
        sizes = np.array([image.shape[:2] for image in images], np.int32)
        x = {"images": np.stack(self._map(self._stretch, images)), "image_sizes": sizes}
        return (x, self._labels[indices]) if self.has_labels else (x,)

    def _stretch(self, image: np.ndarray) -> np.ndarray:
        """One image to uint8 [S, S, 3]: Pillow bicubic (antialiased when shrinking) unless already S x S."""
        image = to_uint8_image(image)
        if image.shape[:2] != (self.image_size, self.image_size):
            pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
            image = np.asarray(pil.resize((self.image_size, self.image_size), Image.BICUBIC))
            image = image[..., None] if image.ndim == 2 else image
        return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image

    def _read_batch(self, order, positions, epoch, step) -> tuple[list, np.ndarray]:
        """A batch's images; an undecodable one is replaced by the next decodable image of the epoch's order."""
        count = len(order)
        own = self._map(lambda position: self._try_read(int(order[position])), positions)
        failed = [i for i, image in enumerate(own) if image is None]
        for i in failed:
            self._skips.count(int(order[positions[i]]), epoch)
        if failed and len(failed) == len(positions) and len(positions) > 1:
            examples = "; ".join(self.source.location(int(order[positions[i]])) for i in failed[:3])
            raise RuntimeError(
                f"{self.source.name}: none of the {len(positions)} files of step {step} (epoch {epoch}) could be "
                f"decoded (e.g. {examples}); the data is broken, not a few files."
            )
        indices = [int(order[position]) for position in positions]
        for i in failed:
            for ahead in range(1, count):
                candidate = int(order[(positions[i] + ahead) % count])
                image = self._try_read(candidate)
                if image is not None:
                    own[i], indices[i] = image, candidate
                    break
            else:
                raise RuntimeError(f"{self.source.name}: no image could be decoded.")
        return own, np.array(indices)


def center_crop_image(image: np.ndarray, size: int, crop_fraction: float = 1.0) -> np.ndarray:
    """``pipeline.center_crop`` with Pillow: float32 [size, size, 3] in [0, 1] from uint8 or float [H, W, C].

    The geometry is ``center_crop_geometry``'s; the resize is Pillow's bilinear
    filter (antialiased when shrinking, like ``tf.image.resize(...,
    antialias=True)``) on float channels.
    """
    image = to_float_image(image)
    (height, width), (top, left) = center_crop_geometry(image.shape[:2], size, crop_fraction)
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c])).resize((int(width), int(height)),
                                                                                Image.BILINEAR))
        for c in range(3)
    ]  # fmt: skip
    resized = np.stack(channels, axis=-1)[top : top + size, left : left + size]
    return np.clip(resized, 0.0, 1.0)


class EvalBatches(_Decoder, keras.utils.PyDataset):
    """Normalised centre crops in a fixed order, every image once: ``eval_dataset`` without TensorFlow.

    Batches are ``(float32 [B, S, S, 3], labels int32 [B])``, or the images
    alone when unlabelled (Keras reads a bare array as ``(x,)``); the last batch
    is partial. Undecodable files are left out of their batch (with their label)
    and counted in ``skipped``, as ``eval_dataset`` skips them.

    Args:
        images: as for ``ImageBatches``.
        image_size: S, the crop's side.
        batch_size: images per batch (the last batch holds the rest).
        labels: class labels for in-memory ``images``.
        crop_fraction: the crop's share of the resized shorter side (224/256: ImageNet's resize 256, crop 224).
        decode_threads, workers, use_multiprocessing, max_queue_size: as for ``ImageBatches``.
    """

    def __init__(
        self,
        images,
        image_size: int,
        batch_size: int = 256,
        labels=None,
        crop_fraction: float = 1.0,
        decode_threads: int = 1,
        workers: int = 1,
        use_multiprocessing: bool = False,
        max_queue_size: int = 10,
    ):
        super().__init__(workers=workers, use_multiprocessing=use_multiprocessing, max_queue_size=max_queue_size)
        if not 0 < crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}.")
        if batch_size <= 0 or image_size <= 0:
            raise ValueError(f"batch_size and image_size must be positive, got {batch_size} and {image_size}.")
        self._setup(_readable_source(images, labels), decode_threads)
        self.image_size, self.batch_size, self.crop_fraction = int(image_size), int(batch_size), crop_fraction

    def __len__(self) -> int:
        return math.ceil(self.num_examples / self.batch_size)

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} of {len(self)}")
        indices = list(range(index * self.batch_size, min((index + 1) * self.batch_size, self.num_examples)))
        crops = self._map(self._crop, indices)
        kept = [i for i, crop in zip(indices, crops) if crop is not None]
        if not kept:
            raise RuntimeError(f"{self.source.name}: none of the files of batch {index} could be decoded.")
        for i, crop in zip(indices, crops):
            if crop is None:
                self._skips.count(i, 0)
        images = normalize(np.stack([crop for crop in crops if crop is not None]))
        return (images, self._labels[kept]) if self.has_labels else images

    def _crop(self, index: int) -> np.ndarray | None:
        image = self._try_read(index)
        return None if image is None else center_crop_image(image, self.image_size, self.crop_fraction)
