"""The multi-crop tf.data pipeline that feeds ``CARP.fit`` (TensorFlow-only; Keras iterates it on every backend).

records -> [shard per host] -> [cache] -> shuffle -> zip per-image seeds ->
parallel map (read, decode, augment) -> skip undecodable -> batch -> prefetch.

Each image's crops come from a stateless seed, so a run with the same seed
sees the same views; ``deterministic=False`` lets the parallel map return
images out of order for more throughput (the views of each image are
unchanged).

With ``epochs=`` the dataset holds the whole run, epoch after epoch, and
epoch e's order and crops are functions of (seed, e) alone. That is what makes
a resumed run (``start_step=``) see exactly the batches the interrupted run
would have seen, in a new process: the epochs before are skipped without
reading them, and the images of the current epoch before ``start_step``
without decoding them.
"""

from __future__ import annotations

import logging

import numpy as np
import tensorflow as tf

from keras_carp.data.augment import MultiCropAugmentation, crop_window, resize_crop
from keras_carp.data.sources import as_source, check_image_size, steps_per_epoch
from keras_carp.imagenet import center_crop_geometry, normalize, to_float_image, to_uint8_image

logger = logging.getLogger("keras_carp.data")

DECODE_MODES = ("once", "crop")
# python -m bench.input_pipeline: decoding each JPEG once and cropping 2x224 + 6x96 from it beats eight
# decode_and_crop_jpeg calls (see the README's figures).
DEFAULT_DECODE = "once"


def decode_image(encoded):
    """JPEG, PNG, BMP or GIF (first frame) bytes -> uint8 [H, W, 3]."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, 3])
    return image


class WholeImages:
    """The host's part of on-device augmentation: each image whole, as uint8, and its original size.

    Called like a ``MultiCropAugmentation`` (image, seed) inside
    ``multicrop_dataset``; returns ``{"images": uint8 [S, S, 3], "image_sizes":
    int32 [2]}``. With ``size`` the image is stretched to S x S (antialiased
    bicubic) so batches have one shape; ``DeviceMultiCrop`` draws its windows
    in the original geometry from ``image_sizes``. Without, images pass at
    their own (fixed) size, as in-memory arrays are.
    """

    def __init__(self, size: int | None = None):
        if size is not None and size <= 0:
            raise ValueError(f"size must be positive, got {size}.")
        self.size = size

    def __call__(self, image, seed=None) -> dict:
        image = to_float_image(tf.convert_to_tensor(image)) if self.size is not None else tf.convert_to_tensor(image)
        if image.shape.rank == 3 and image.shape[-1] == 1:
            image = tf.tile(image, [1, 1, 3])
        image_size = tf.shape(image)[:2]
        if self.size is not None:
            image = tf.image.resize(image, (self.size, self.size), "bicubic", antialias=True)
        return {"images": to_uint8_image(image), "image_sizes": tf.cast(image_size, tf.int32)}


def _views_of_record(source, augmentation: MultiCropAugmentation, decode: str, loaded: bool):
    """The map function from (record, view seed) to ``(crops, label)`` or ``(crops,)``.

    Encoded images are counted as they enter and once decoded, so that the
    ones ``ignore_errors`` drops (corrupt files) show up as skipped.
    """
    counter = source.skipped

    def make_views(record, view_seed):
        example = record if loaded else source.load(record)
        if "encoded" in example:
            entered = counter.entered.assign_add(1)
            with tf.control_dependencies([entered]):
                encoded = tf.identity(example["encoded"])
            if decode == "crop":
                crops = tf.cond(
                    tf.io.is_jpeg(encoded),
                    lambda: augmentation.from_jpeg(encoded, view_seed),
                    lambda: augmentation(decode_image(encoded), view_seed),
                )
            else:
                crops = augmentation(decode_image(encoded), view_seed)
            with tf.control_dependencies([tf.group(tf.nest.flatten(crops))]):
                decoded = counter.decoded.assign_add(1)
            with tf.control_dependencies([decoded]):
                crops = tf.nest.map_structure(tf.identity, crops)
        else:
            crops = augmentation(example["image"], view_seed)
        return (crops, example["label"]) if "label" in example else (crops,)

    return make_views


def multicrop_dataset(
    images,
    augmentation: MultiCropAugmentation | WholeImages,
    batch_size: int,
    labels=None,
    seed: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
    deterministic: bool = True,
    cache: bool | str = False,
    input_context: tf.distribute.InputContext | None = None,
    decode: str = DEFAULT_DECODE,
    min_image_size: int | None = None,
    shuffle_buffer: int | None = None,
    epochs: int | None = None,
    start_step: int = 0,
) -> tf.data.Dataset:
    """Batches of ``(crops, labels)`` (or ``(crops,)`` when unlabelled) for ``CARP.fit``.

    Args:
        images: an ``ImageSource`` (folder, TFDS, arrays) or in-memory images [N, H, W, C].
        augmentation: the view recipe; crops come out float32, ImageNet-normalised. ``WholeImages``
            instead yields each image whole (uint8) for ``CARP(augmentation=DeviceMultiCrop(...))``.
        batch_size: the global batch; with ``input_context`` each pipeline makes its per-replica share.
        labels: class labels for in-memory ``images``.
        seed: seeds the shuffle and every image's views.
        deterministic: keep the element order (and so the batches) reproducible.
        cache: cache loaded records in memory (True) or in this file path prefix (str).
        input_context: from ``strategy.distribute_datasets_from_function``; shards records per host.
        decode: JPEG decoding, ``"once"`` per image or ``"crop"`` (``decode_and_crop_jpeg`` per crop).
        min_image_size: smaller images are an error before training (default: the global crop size; 0 allows).
        shuffle_buffer: default: the whole set of small records, or 10 000 when records hold encoded images.
        epochs: hold the run's ``epochs`` back to back, each ``steps_per_epoch(...)`` batches, with
            epoch e's order and views depending on (seed, e) only; feed ``fit(steps_per_epoch=...)``.
            None: one epoch, reshuffled (with fresh views) each time Keras iterates it.
        start_step: with ``epochs``, begin at this global step (resuming a run).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}.")
    source = as_source(images, labels)
    if isinstance(augmentation, WholeImages):
        decode = "once"  # the whole image is wanted
        if augmentation.size is None and source.image_shape is None:
            raise ValueError(f"{source.name} has images of different sizes: give WholeImages a size to batch them.")
    elif min_image_size is None:
        min_image_size = augmentation.global_size
    check_image_size(source, min_image_size or 0)
    local_batch = batch_size
    num_pipelines = 1
    if input_context is not None:
        local_batch = input_context.get_per_replica_batch_size(batch_size)
        num_pipelines = input_context.num_input_pipelines
        seed = int(np.random.SeedSequence([seed, input_context.input_pipeline_id]).generate_state(1)[0])
    shard_size = source.num_examples // num_pipelines
    if drop_remainder and shard_size < local_batch:
        raise ValueError(f"{source.name} has {source.num_examples} images, fewer than one batch of {batch_size}.")

    dataset = source.records(input_context, seed)
    loaded = False
    if cache is not False:
        dataset = dataset.map(source.load, num_parallel_calls=tf.data.AUTOTUNE).cache("" if cache is True else cache)
        loaded = True
    if shuffle_buffer is None:
        holds_images = (loaded and source.encoded) or source.records_hold_images
        shuffle_buffer = 10_000 if holds_images else shard_size
    shuffle_buffer = max(1, min(shuffle_buffer, shard_size))
    if epochs is None:
        if shuffle:
            dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        dataset = tf.data.Dataset.zip(dataset, seeds)
    else:
        dataset = _epochs_with_seeds(dataset, seed, shuffle, shuffle_buffer, epochs, start_step,
                                     steps_per_epoch(source.num_examples, batch_size, num_pipelines),
                                     local_batch, drop_remainder)  # fmt: skip
    make_views = _views_of_record(source, augmentation, decode, loaded)
    dataset = dataset.map(make_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    if source.encoded:
        dataset = dataset.ignore_errors(log_warning=True)
    dataset = dataset.batch(local_batch, drop_remainder=drop_remainder, num_parallel_calls=tf.data.AUTOTUNE,
                            deterministic=deterministic)  # fmt: skip
    options = tf.data.Options()
    options.deterministic = deterministic
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def _epochs_with_seeds(records, seed, shuffle, buffer, epochs, start_step, steps, local_batch, drop_remainder):
    """(record, view seed) for epochs ``start_step // steps`` .. ``epochs - 1``, each a function of (seed, epoch).

    The records dataset is re-read once per epoch; its own order must not change between reads (TFDS sources
    fix their file order by the seed), so an epoch's order comes only from the shuffle seeded here.
    """
    if not drop_remainder:
        raise ValueError("multicrop_dataset(epochs=...) needs drop_remainder=True: every epoch is whole batches.")
    if start_step < 0 or start_step >= epochs * steps:
        raise ValueError(f"start_step must be in [0, {epochs * steps}) for {epochs} epochs of {steps} steps.")
    first_epoch, skipped_steps = divmod(start_step, steps)
    run_key = tf.constant([seed % 2**63, 0x5EED], tf.int64)

    def one_epoch(epoch):
        epoch_key = tf.random.experimental.stateless_fold_in(run_key, epoch)
        epoch_records = records
        if shuffle:
            # The order depends on (seed, epoch) only, not on tf.random.set_seed: this function's graph-level
            # seed is fixed (with graph seed 0, TF cannot take a tensor op seed).
            tf.compat.v1.get_default_graph().seed = 0x5EED
            order_seed = tf.random.stateless_uniform([], epoch_key, minval=None, maxval=None, dtype=tf.int64)
            epoch_records = records.shuffle(buffer, seed=order_seed, reshuffle_each_iteration=False)
        epoch_records = epoch_records.take(steps * local_batch).enumerate()
        already_seen = tf.constant(skipped_steps * local_batch, tf.int64)
        epoch_records = epoch_records.skip(tf.where(epoch == first_epoch, already_seen, 0))
        return epoch_records.map(
            lambda position, record: (record, tf.random.experimental.stateless_fold_in(epoch_key, position))
        )

    return tf.data.Dataset.range(first_epoch, epochs).flat_map(one_epoch)


def center_crop(image, size: int, crop_fraction: float = 1.0):
    """Resize the shorter side to ``size / crop_fraction`` (bilinear), then take the central size x size.

    ``image`` is one image [H, W, C] or a batch [N, H, W, C] of one size, uint8
    or float in [0, 1]; the result is float32 in [0, 1].
    """
    image = to_float_image(tf.convert_to_tensor(image))
    resized_shape, offset = center_crop_geometry(tf.shape(image)[-3:-1], size, crop_fraction)
    image = tf.image.resize(image, resized_shape, method="bilinear", antialias=True)
    image = image[..., offset[0] : offset[0] + size, offset[1] : offset[1] + size, :]
    return tf.clip_by_value(image, 0.0, 1.0)


def eval_dataset(
    images,
    image_size: int,
    batch_size: int = 256,
    labels=None,
    crop_fraction: float = 1.0,
) -> tf.data.Dataset:
    """Batches of ``(normalised images, labels)`` (images alone when unlabelled) in a fixed order.

    Every image is resized so its shorter side is ``image_size / crop_fraction``
    and centre-cropped (``crop_fraction=224/256`` is ImageNet's resize 256 /
    crop 224). Undecodable files are skipped, as in training.
    """
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}.")
    source = as_source(images, labels)

    def prepare(record):
        example = source.load(record)
        image = decode_image(example["encoded"]) if "encoded" in example else example["image"]
        image = normalize(center_crop(image, image_size, crop_fraction))
        return (image, example["label"]) if "label" in example else image

    dataset = source.records().map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if source.encoded:
        dataset = dataset.ignore_errors(log_warning=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def classification_dataset(
    images,
    image_size: int,
    batch_size: int = 256,
    labels=None,
    scale: tuple = (0.08, 1.0),
    seed: int = 0,
) -> tf.data.Dataset:
    """Shuffled, repeating ``(images, labels)`` batches with random resized crop + flip: linear-probe training."""
    source = as_source(images, labels)
    if not source.has_labels:
        raise ValueError(f"{source.name} has no labels to train a classifier on.")
    ratio = (3 / 4, 4 / 3)

    def prepare(record, seed_pair):
        example = source.load(record)
        image = to_float_image(decode_image(example["encoded"]) if "encoded" in example else example["image"])
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed_pair, 2))
        offset, window = crop_window(tf.shape(image), scale, ratio, crop_seed)
        crop = tf.slice(image, tf.concat([offset, [0]], 0), tf.concat([window, [3]], 0))
        crop = tf.image.stateless_random_flip_left_right(resize_crop(crop, image_size), flip_seed)
        return normalize(crop), example["label"]

    records = source.records(seed=seed).shuffle(min(source.num_examples, 10_000), seed=seed).repeat()
    seeds = tf.data.Dataset.random(seed=seed).batch(2)
    dataset = tf.data.Dataset.zip(records, seeds).map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    if source.encoded:
        dataset = dataset.ignore_errors(log_warning=True)
    return dataset.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
