"""Image sources for pretraining: in-memory arrays, image folders and TFDS datasets.

Every source answers one interface (``ImageSource``): what it holds
(``num_examples``, ``labels``, ``class_names``, ``image_shape``), ``subset``,
``read`` (one image without TensorFlow, where it can) and, for tf.data, small
records that are cheap to shuffle and shard: an index, a file path, or an
encoded image. ``load`` turns a record into a decoded image or the encoded
bytes inside the parallel tf.data map (see ``keras_carp.data.pipeline``).
Labels travel with the images for evaluation; the CARP loss never sees them.
``as_source`` turns what a loader is given into a source; ``load_source``
opens one by dataset name.

This module imports without TensorFlow: ``ArraySource``, ``FolderSource``,
``load_digits``, ``load_fashion_mnist`` and ``scan_image_folder`` work on a
JAX or PyTorch machine without it (``keras_carp.data.python_loader`` feeds
them to ``fit``). Only the tf.data side (``records``, ``load``, the skip
counters' variables) and ``TFDSSource`` import TensorFlow, when called.

Bad input is found before training where it can be: unknown dataset names,
missing files or folders, empty folders, images smaller than the crop.
Files that only fail when decoded (a truncated JPEG whose header reads fine) are
skipped by the pipeline and counted in ``source.skipped`` instead of ending a
long run.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import gzip
import io
import logging
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import tensorflow as tf

logger = logging.getLogger("keras_carp.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


class SkippedImages:
    """Counts records that entered decoding and records that came out, so the difference is what was skipped.

    Both counters are int64 variables updated inside the tf.data graph; the
    difference is exact once a pass over the data has finished. The variables
    are made when TensorFlow is already loaded, else on first use by a tf.data
    pipeline, so that a source can be built (and ``count`` read: 0) without it.
    """

    def __init__(self):
        self._variables = None
        if sys.modules.get("tensorflow") is not None:
            self._make_variables()  # now, as before: outside any tf.function or strategy scope

    def _make_variables(self) -> tuple:
        if self._variables is None:
            import tensorflow as tf

            with tf.init_scope():
                self._variables = (
                    tf.Variable(0, dtype=tf.int64, trainable=False, name="records_entered"),
                    tf.Variable(0, dtype=tf.int64, trainable=False, name="records_decoded"),
                )
        return self._variables

    @property
    def entered(self) -> tf.Variable:
        return self._make_variables()[0]

    @property
    def decoded(self) -> tf.Variable:
        return self._make_variables()[1]

    @property
    def count(self) -> int:
        if self._variables is None:
            return 0
        entered, decoded = self._variables
        return int(entered.numpy() - decoded.numpy())


def steps_per_epoch(num_examples: int, batch_size: int, num_input_pipelines: int = 1) -> int:
    """Full global batches per epoch; the same on every host when each reads its own shard."""
    return (num_examples // num_input_pipelines) // (batch_size // num_input_pipelines)


class ImageSource:
    """What every source of images answers, whatever holds the images (files, arrays, TFDS).

    Subclasses set the attributes and implement ``records`` and ``load`` (the
    tf.data side), ``labels`` and ``subset``, and ``read`` where Pillow can
    read the images without TensorFlow.

    Bad files: what can be found before training (missing or unreadable
    files) is found when the source is opened; images that only fail when
    decoded (``encoded`` sources) are skipped, not fatal: tf.data counts them
    in ``skipped``, the Pillow loaders in their own ``skipped``.

    Attributes:
        name: a short description for logs.
        num_examples: how many images ``records`` yields (before sharding); also ``len(source)``.
        class_names: label names, or None when the source is unlabelled.
        image_shape: (H, W) when every image has that size, else None.
        encoded: True when ``load`` returns encoded bytes that can fail to decode.
        records_hold_images: True when records carry the encoded images (large to shuffle).
        reads_without_tensorflow: True when ``read`` decodes an image with NumPy or Pillow.
        tfds_name: the TFDS dataset when the source is a whole TFDS split, else None.
    """

    name: str = "images"
    num_examples: int = 0
    class_names: tuple | None = None
    image_shape: tuple | None = None
    encoded: bool = False
    records_hold_images: bool = False
    reads_without_tensorflow: bool = False
    tfds_name: str | None = None

    def __init__(self):
        self.skipped = SkippedImages()

    def __len__(self) -> int:
        return self.num_examples

    @property
    def has_labels(self) -> bool:
        return self.class_names is not None

    @property
    def labels(self) -> np.ndarray | None:
        """int64 [N] in the source's own order (the one ``subset`` and ``read`` index), or None when unlabelled."""
        return None

    def image_sizes(self) -> list[tuple[int, int]] | None:
        """(height, width) of every image when known without decoding (files: from their headers), else None."""
        return None

    def records(self, input_context: tf.distribute.InputContext | None = None, seed: int = 0) -> tf.data.Dataset:
        """Small records, one per image, sharded for ``input_context``'s pipeline when given."""
        raise NotImplementedError

    def load(self, record) -> dict:
        """``{"image": uint8 [H, W, 3]}`` or ``{"encoded": string}``, plus ``"label"`` when labelled."""
        raise NotImplementedError

    def read(self, index: int) -> np.ndarray:
        """Image ``index`` without TensorFlow: [H, W, C], uint8 or float in [0, 1]; raises when it cannot be decoded."""
        raise TypeError(
            f"{type(self).__name__} is read through tf.data (multicrop_dataset, eval_dataset); the Python loaders "
            "take in-memory arrays and image folders."
        )

    def location(self, index: int) -> str:
        """Where image ``index`` is, for messages: its file, else its position."""
        return f"{self.name}[{index}]"

    def subset(self, selection, seed: int = 0, name: str | None = None) -> ImageSource:
        """The images at ``selection`` (indices into this source's order), or a float fraction of them.

        A fraction draws ``label_fraction_indices(labels, fraction, seed)``:
        class-balanced when labelled, uniform otherwise; 1.0 is the source itself.
        """
        if isinstance(selection, (float, np.floating)):
            fraction = check_label_fraction(selection)
            if fraction == 1.0:
                return self
            labels = self.labels if self.has_labels else np.zeros(self.num_examples, "int64")
            indices = label_fraction_indices(labels, fraction, seed)
            name = name or f"{self.name}[{100 * fraction:g}%, seed {seed}]"
        else:
            indices = np.asarray(selection, "int64").reshape(-1)
            if indices.size and (indices.min() < 0 or indices.max() >= self.num_examples):
                raise IndexError(f"{self.name} has {self.num_examples} images; subset indices must be in range.")
            name = name or f"{self.name}[{len(indices)} of {self.num_examples}]"
        if indices.size == 0:
            raise ValueError(f"{name}: the subset is empty.")
        return self._subset(indices, name)

    def _subset(self, indices: np.ndarray, name: str) -> ImageSource:
        raise TypeError(f"{type(self).__name__} cannot take a subset.")

    def __repr__(self) -> str:
        labels = f"{len(self.class_names)} classes" if self.has_labels else "unlabelled"
        return f"<{type(self).__name__} {self.name}: {self.num_examples} images, {labels}>"


def as_source(images, labels=None) -> ImageSource:
    """``images`` as an ``ImageSource``: a source as it is, else in-memory images [N, H, W, C] (and their labels).

    A source carries its own labels: passing ``labels`` with one is an error.
    """
    if isinstance(images, ImageSource):
        if labels is not None:
            raise ValueError("Pass labels with in-memory arrays only; a source carries its own labels.")
        return images
    return ArraySource(images, labels)


# ----------------------------------------------------------------------------- label fractions


def check_label_fraction(fraction: float) -> float:
    """``fraction`` as a float in (0, 1]; a clear error otherwise."""
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        raise ValueError(f"label fraction must be a number in (0, 1], got {fraction!r}.") from None
    if not 0.0 < value <= 1.0 or math.isnan(value):
        raise ValueError(f"label fraction must be in (0, 1] (0.01 for 1 %), got {fraction!r}.")
    return value


def label_fraction_indices(labels, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of a class-balanced ``fraction`` of ``labels``, the same for the same seed.

    Each class keeps ``round(fraction * its count)`` images, at least one, drawn
    uniformly from a ``numpy`` generator seeded with ``seed``. Each class's
    images are ranked by one permutation whatever the fraction, so with one
    seed the 1 % subset is contained in the 10 % subset.
    """
    fraction = check_label_fraction(fraction)
    labels = np.asarray(labels).astype("int64").reshape(-1)
    if labels.size == 0:
        raise ValueError("No labels to draw a fraction from (the dataset is empty).")
    if labels.min() < 0:
        raise ValueError(f"Labels must be non-negative class indices, got {int(labels.min())}.")
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        keep = max(1, int(math.floor(fraction * len(members) + 0.5)))
        chosen.append(rng.permutation(members)[:keep])
    return np.sort(np.concatenate(chosen))


def _shard(dataset: tf.data.Dataset, input_context) -> tf.data.Dataset:
    if input_context is None or input_context.num_input_pipelines == 1:
        return dataset
    return dataset.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)


class ArraySource(ImageSource):
    """Images held in memory: uint8 [N, H, W, C] (C = 1 or 3) or float [N, H, W, C] in [0, 1]."""

    reads_without_tensorflow = True

    def __init__(self, images, labels=None, class_names=None, name: str = "arrays"):
        super().__init__()
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"{name}: expected images [N, H, W, 1 or 3], got shape {images.shape}.")
        if len(images) == 0:
            raise ValueError(f"{name}: the dataset is empty.")
        if labels is not None:
            labels = np.asarray(labels).astype("int64")
            if labels.shape != (len(images),):
                raise ValueError(f"{name}: {len(images)} images but labels of shape {labels.shape}.")
            if class_names is None:
                class_names = tuple(str(c) for c in range(int(labels.max()) + 1))
        self.images, self._labels = images, labels
        self.class_names = tuple(class_names) if labels is not None else None
        self.num_examples = len(images)
        self.image_shape = tuple(images.shape[1:3])
        self.name = name

    @property
    def labels(self) -> np.ndarray | None:
        return self._labels

    def read(self, index: int) -> np.ndarray:
        return self.images[index]

    def _subset(self, indices: np.ndarray, name: str) -> ArraySource:
        labels = None if self._labels is None else self._labels[indices]
        return ArraySource(self.images[indices], labels, self.class_names, name=name)

    def records(self, input_context=None, seed: int = 0) -> tf.data.Dataset:
        import tensorflow as tf

        return _shard(tf.data.Dataset.range(self.num_examples), input_context)

    def load(self, record) -> dict:
        import tensorflow as tf

        # Gathering from a captured constant keeps the records small, so shuffling moves indices, not pixels.
        if not hasattr(self, "_images_tensor"):
            with tf.init_scope():
                self._images_tensor = tf.constant(self.images)
                self._labels_tensor = None if self._labels is None else tf.constant(self._labels)
        out = {"image": tf.gather(self._images_tensor, record)}
        if self._labels_tensor is not None:
            out["label"] = tf.gather(self._labels_tensor, record)
        return out


def resize_bilinear(images, size: tuple[int, int]) -> np.ndarray:
    """``tf.image.resize(images, size, "bilinear")`` in NumPy: float32 [..., H, W, C] -> [..., h, w, C].

    Half-pixel centres, no antialiasing, float32 arithmetic in TensorFlow's
    order (``ResizeBilinear``), so the built-in datasets load to the same
    numbers with or without TensorFlow.
    """
    images = np.asarray(images, np.float32)

    def taps(in_size: int, out_size: int):
        scale = np.float32(in_size) / np.float32(out_size)
        position = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
        floor = np.floor(position)
        lower = np.maximum(floor.astype(np.int64), 0)
        upper = np.minimum(np.ceil(position).astype(np.int64), in_size - 1)
        return lower, upper, (position - floor).astype(np.float32)

    rows_low, rows_high, row_lerp = taps(images.shape[-3], size[0])
    cols_low, cols_high, col_lerp = taps(images.shape[-2], size[1])

    def across(rows: np.ndarray) -> np.ndarray:
        left, right = rows[..., cols_low, :], rows[..., cols_high, :]
        return left + (right - left) * col_lerp[:, None]

    top, bottom = across(images[..., rows_low, :, :]), across(images[..., rows_high, :, :])
    return top + (bottom - top) * row_lerp[:, None, None]


def load_digits(image_size: int = 32, test_fraction: float = 0.25, seed: int = 0):
    """scikit-learn's bundled 8x8 digits as RGB float32 in [0, 1], upsampled to ``image_size``.

    Returns ``(train_images, train_labels), (test_images, test_labels)`` with a
    stratified split (1 347 / 450 images at the defaults).
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    images = (digits.images.astype("float32") / 16.0)[..., None]
    images = resize_bilinear(images, (image_size, image_size))
    images = np.repeat(np.clip(images, 0.0, 1.0), 3, axis=-1)
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    return (x_train, y_train), (x_test, y_test)


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or raw."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file.")
    rank = raw[3]
    dims = np.frombuffer(raw, ">u4", count=rank, offset=4).astype(int)
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * rank)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {data.size}.")
    return data.reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for suffix in ("", ".gz"):
        for candidate in (directory / f"{stem}{suffix}", directory / f"{stem.replace('-idx', '.idx')}{suffix}"):
            if candidate.is_file():
                return candidate
    return None


def load_fashion_mnist(split: str = "train", data_dir: str | os.PathLike | None = None, image_size: int = 28):
    """Fashion-MNIST from IDX files (Debian's ``dataset-fashion-mnist`` by default) as uint8 [N, S, S, 1], labels.

    ``split`` is ``"train"`` (60 000) or ``"test"`` (10 000); ``image_size``
    other than 28 resizes (bilinear) once at load time.
    """
    directory = Path(data_dir) if data_dir else FASHION_MNIST_DIR
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"Fashion-MNIST splits are 'train' and 'test', got {split!r}.")
    images_path = _find_idx(directory, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx(directory, f"{prefix}-labels-idx1-ubyte")
    if images_path is None or labels_path is None:
        raise FileNotFoundError(
            f"Fashion-MNIST IDX files for split {split!r} not found in {directory} (expected "
            f"{prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz]). "
            "Install them with `apt-get install dataset-fashion-mnist`, or pass data_dir."
        )
    images, labels = _read_idx(images_path), _read_idx(labels_path)
    if images.ndim != 3 or labels.shape != (len(images),):
        raise ValueError(f"Fashion-MNIST files disagree: images {images.shape}, labels {labels.shape}.")
    images = images[..., None]
    if image_size != images.shape[1]:
        size = (image_size, image_size)
        images = np.concatenate([  # in chunks: float32 copies of 60 000 images would take gigabytes
            np.clip(np.round(resize_bilinear(chunk, size)), 0, 255).astype(np.uint8)
            for chunk in np.array_split(images, max(1, len(images) // 4096))
        ])  # fmt: skip
    return images, labels.astype("int64")


# ----------------------------------------------------------------------------- folders of images


@dataclasses.dataclass
class FolderScan:
    """What a scan of an image folder found."""

    files: list  # usable image paths
    labels: list  # class index per file (empty when unlabelled)
    class_names: tuple | None
    sizes: list  # (width, height) per file
    converted: dict  # path -> PNG bytes for images TensorFlow cannot decode as stored (CMYK JPEG, palette BMP...)
    unreadable: list  # (path, reason) skipped: zero-byte, corrupt or unsupported files
    ignored: list  # files without an image extension


def _inspect(path: str):
    """(width, height, converted PNG bytes or None) from the header; raises ValueError when unreadable."""
    from PIL import Image, UnidentifiedImageError

    if os.path.getsize(path) == 0:
        raise ValueError("zero-byte file")
    try:
        with Image.open(path) as image:
            if image.format not in ("JPEG", "PNG", "BMP", "GIF"):
                raise ValueError(f"unsupported format {image.format}")
            width, height = image.size
            converted = None
            # TensorFlow decodes RGB/L JPEGs, PNGs and GIFs itself; anything else is converted once, here.
            if (image.format == "JPEG" and image.mode not in ("RGB", "L")) or (
                image.format == "BMP" and image.mode not in ("RGB", "RGBA")
            ):
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, format="PNG")
                converted = buffer.getvalue()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"not a readable image ({error})") from None
    return width, height, converted


def scan_image_folder(directory: str | os.PathLike, workers: int = 16) -> FolderScan:
    """List a folder's images (class subfolders optional) and read every header, in parallel threads.

    Class subfolders: when the folder has subfolders holding images, each
    first-level subfolder is a class (sorted names); files beside them are
    ignored. Otherwise all images, at any depth, form one unlabelled set.
    """
    root = Path(directory)
    if not root.exists():
        raise FileNotFoundError(f"Image folder {root} does not exist.")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder.")
    all_files = sorted(str(p) for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    images = [f for f in all_files if f.lower().endswith(IMAGE_EXTENSIONS)]
    ignored = [f for f in all_files if not f.lower().endswith(IMAGE_EXTENSIONS)]
    parts = {f: Path(f).relative_to(root).parts for f in images}
    class_names = tuple(sorted({parts[f][0] for f in images if len(parts[f]) > 1})) or None
    if class_names:
        ignored += [f for f in images if len(parts[f]) == 1]
        images = [f for f in images if len(parts[f]) > 1]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(_safe_inspect, images))
    scan = FolderScan([], [], class_names, [], {}, [], sorted(ignored))
    class_index = {name: i for i, name in enumerate(class_names or ())}
    for path, result in zip(images, results):
        if isinstance(result, str):
            scan.unreadable.append((path, result))
            continue
        width, height, converted = result
        scan.files.append(path)
        scan.sizes.append((width, height))
        if converted is not None:
            scan.converted[path] = converted
        if class_names:
            scan.labels.append(class_index[parts[path][0]])
    return scan


def decode_file(path: str):
    """An image file (first frame of a GIF) as a loaded RGB Pillow image; raises when it cannot be decoded."""
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def _safe_inspect(path: str):
    try:
        return _inspect(path)
    except ValueError as error:
        return str(error)


class FolderSource(ImageSource):
    """JPEG, PNG, BMP and GIF files under a folder; class subfolders give labels when present.

    The constructor scans every header: zero-byte, corrupt and unsupported files
    are skipped and reported in the log, non-image files are ignored, and
    grayscale, RGBA, palette and CMYK images come out as RGB.
    """

    encoded = True
    reads_without_tensorflow = True

    def __init__(self, directory: str | os.PathLike, workers: int = 16):
        super().__init__()
        scan = scan_image_folder(directory, workers)
        if not scan.files:
            found = f"{len(scan.unreadable)} unreadable and {len(scan.ignored)} non-image files"
            raise ValueError(
                f"Image folder {directory} has no readable images ({found}; looked for {IMAGE_EXTENSIONS})."
            )
        if scan.unreadable:
            examples = "; ".join(f"{Path(p).name}: {why}" for p, why in scan.unreadable[:5])
            logger.warning("%s: skipping %d unreadable files (%s%s)", directory, len(scan.unreadable), examples,
                           ", ..." if len(scan.unreadable) > 5 else "")  # fmt: skip
        if scan.ignored:
            logger.info("%s: ignoring %d files that are not images in class folders", directory, len(scan.ignored))
        self.name = str(directory)
        self._use(scan)

    def _use(self, scan: FolderScan) -> None:
        self.scan = scan
        self.num_examples = len(scan.files)
        self.class_names = scan.class_names
        self.min_side = min(min(size) for size in scan.sizes)
        shapes = {(h, w) for w, h in scan.sizes}
        self.image_shape = shapes.pop() if len(shapes) == 1 else None

    @property
    def labels(self) -> np.ndarray | None:
        return np.asarray(self.scan.labels, "int64") if self.has_labels else None

    def image_sizes(self) -> list[tuple[int, int]]:
        return [(height, width) for width, height in self.scan.sizes]

    def read(self, index: int) -> np.ndarray:
        return np.asarray(decode_file(self.scan.files[index]))

    def location(self, index: int) -> str:
        return self.scan.files[index]

    def _subset(self, indices: np.ndarray, name: str) -> FolderSource:
        subset = copy.copy(self)
        subset.__dict__.pop("_converted_tensor", None)
        pick = [int(i) for i in indices]
        scan = self.scan
        files, sizes = [scan.files[i] for i in pick], [scan.sizes[i] for i in pick]
        labels = [scan.labels[i] for i in pick] if scan.labels else []
        subset._use(dataclasses.replace(scan, files=files, labels=labels, sizes=sizes))
        subset.name, subset.skipped = name, SkippedImages()
        return subset

    def records(self, input_context=None, seed: int = 0) -> tf.data.Dataset:
        import tensorflow as tf

        converted_index = {path: i for i, path in enumerate(self.scan.converted)}
        columns = {
            "path": np.array(self.scan.files),
            "converted": np.array([converted_index.get(p, -1) for p in self.scan.files], "int64"),
        }
        if self.has_labels:
            columns["label"] = np.array(self.scan.labels, "int64")
        return _shard(tf.data.Dataset.from_tensor_slices(columns), input_context)

    def load(self, record) -> dict:
        import tensorflow as tf

        if not hasattr(self, "_converted_tensor"):
            with tf.init_scope():
                self._converted_tensor = tf.constant(list(self.scan.converted.values()) or [b""], tf.string)
        encoded = tf.cond(
            record["converted"] >= 0,
            lambda: tf.gather(self._converted_tensor, tf.maximum(record["converted"], 0)),
            lambda: tf.io.read_file(record["path"]),
        )
        out = {"encoded": encoded}
        if "label" in record:
            out["label"] = record["label"]
        return out


# ----------------------------------------------------------------------------- TFDS


def _tfds_image_and_label_keys(info) -> tuple[str, str | None]:
    import tensorflow_datasets as tfds

    features = info.features
    image_keys = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    if not image_keys:
        raise ValueError(f"TFDS dataset {info.name!r} has no image feature (features: {list(features.keys())}).")
    labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
    label_key = "label" if "label" in labels else (labels[0] if labels else None)
    return ("image" if "image" in image_keys else image_keys[0]), label_key


MANUAL_FILES = {
    "imagenet2012": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"),
    "imagenet2012_subset": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"),
    "imagenet2012_real": ("ILSVRC2012_img_val.tar",),
}


def _manual_download_error(builder, manual_dir: Path, cause: Exception | None = None) -> FileNotFoundError:
    """A message that says which archives to put where, for datasets TFDS cannot download itself."""
    files = MANUAL_FILES.get(builder.name.split("/")[0])
    if files:
        missing = [f for f in files if not (manual_dir / f).is_file()]
        what = f"Put {' and '.join(missing or files)} (from image-net.org) in {manual_dir}"
    else:
        what = f"Put the archives its instructions name in {manual_dir}"
    instructions = " ".join((getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", "") or "").split())
    detail = f" ({type(cause).__name__}: {str(cause).splitlines()[0]})" if cause is not None and str(cause) else ""
    return FileNotFoundError(
        f"TFDS dataset {builder.name!r} needs a manual download and its archives are missing. {what} "
        f"(or pass data_dir=DIR with the archives in DIR/downloads/manual), then run again: TFDS prepares "
        f"it once into {builder.data_dir}. TFDS instructions: {instructions}{detail}"
    )


class TFDSSource(ImageSource):
    """A split of any TFDS image dataset (``imagenet2012``, ``imagenette``, ``cifar10``, ``stl10``...).

    Images stay encoded until the parallel map (``SkipDecoding``) so JPEGs can
    be decoded crop by crop. The dataset is prepared on first use when
    ``download`` is true; manual-download datasets (imagenet2012) get an error
    naming the archives and the folder to put them in.
    """

    encoded = True
    records_hold_images = True

    def __init__(self, name: str, split: str = "train", data_dir: str | os.PathLike | None = None,
                 download: bool = True, manual_dir: str | os.PathLike | None = None):  # fmt: skip
        super().__init__()
        import tensorflow as tf
        import tensorflow_datasets as tfds

        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError as error:
            raise ValueError(f"Unknown TFDS dataset {name!r}: {str(error).splitlines()[0]}") from None
        if not builder.is_prepared():
            if not download:
                raise FileNotFoundError(f"TFDS dataset {name!r} is not prepared in {builder.data_dir} (download off).")
            # TFDS's default manual folder: <data_dir root>/downloads/manual.
            manual = Path(manual_dir) if manual_dir else _data_root(builder) / "downloads" / "manual"
            try:
                builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
            except (AssertionError, tf.errors.NotFoundError) as error:  # TFDS's own missing-archive errors
                if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
                    raise _manual_download_error(builder, manual, error) from None
                raise
        self.image_key, self.label_key = _tfds_image_and_label_keys(builder.info)
        self.builder, self.split, self.name = builder, split, f"{name}:{split}"
        self.tfds_name = builder.name
        self._labels = None
        self.num_examples = self._count_examples(builder, split)
        label_feature = builder.info.features[self.label_key] if self.label_key else None
        self.class_names = tuple(label_feature.names) if label_feature is not None else None
        if split.startswith("unlabelled"):
            self.class_names = None  # stl10's unlabelled split carries label -1
        height, width = builder.info.features[self.image_key].shape[:2]
        self.image_shape = (height, width) if height and width else None

    @staticmethod
    def _count_examples(builder, split: str) -> int:
        """Examples in ``split`` from TFDS's metadata (any split string: 'train[:10%]', 'train+validation')."""
        if builder.info.splits:
            try:
                return int(builder.info.splits[split].num_examples)
            except (KeyError, ValueError) as error:
                available = ", ".join(builder.info.splits.keys())
                message = f"TFDS dataset {builder.name!r} has no split {split!r} ({available}): {error}"
                raise ValueError(message) from None
        # No split metadata: mocked data (tfds.testing.mock_data). Count what it yields.
        import tensorflow_datasets as tfds

        image_key, _ = _tfds_image_and_label_keys(builder.info)
        dataset = builder.as_dataset(split=split, decoders={image_key: tfds.decode.SkipDecoding()})
        return int(dataset.reduce(np.int64(0), lambda count, _: count + 1))

    @property
    def data_root(self) -> Path:
        """The folder TFDS prepares datasets in (``data_dir``), where sibling datasets are found."""
        return _data_root(self.builder)

    @property
    def labels(self) -> np.ndarray | None:
        """Every label of the split in its unshuffled order (read once, then kept)."""
        if not self.has_labels:
            return None
        if self._labels is None:
            labels = self.ordered().map(lambda example: example[self.label_key])
            self._labels = np.fromiter(labels.as_numpy_iterator(), "int64")
        return self._labels

    def ordered(self) -> tf.data.Dataset:
        """The split's examples (images encoded) in TFDS's unshuffled order: the order ``subset`` indexes."""
        import tensorflow_datasets as tfds

        decoders = {self.image_key: tfds.decode.SkipDecoding()}
        return self.builder.as_dataset(split=self.split, decoders=decoders, shuffle_files=False)

    def _subset(self, indices: np.ndarray, name: str) -> ImageSource:
        return _TFDSSubset(self, indices, name)

    def records(self, input_context=None, seed: int = 0) -> tf.data.Dataset:
        import tensorflow_datasets as tfds

        # The file order is shuffled by the seed but not re-drawn on each read: multicrop_dataset(epochs=) reads
        # the records once per epoch and shuffles them with a seed of (seed, epoch), so that a resumed run reads
        # every epoch in the order the uninterrupted run would have.
        read_config = tfds.ReadConfig(input_context=input_context, shuffle_seed=seed, try_autocache=False,
                                      shuffle_reshuffle_each_iteration=False)  # fmt: skip
        dataset = self.builder.as_dataset(
            split=self.split,
            decoders={self.image_key: tfds.decode.SkipDecoding()},
            shuffle_files=True,
            read_config=read_config,
        )
        keys = [self.image_key] + ([self.label_key] if self.has_labels else [])
        return dataset.map(lambda example: {k: example[k] for k in keys})

    def load(self, record) -> dict:
        import tensorflow as tf

        out = {"encoded": record[self.image_key]}
        if self.has_labels:
            out["label"] = tf.cast(record[self.label_key], tf.int64)
        return out


def _data_root(builder) -> Path:
    """TFDS's ``data_dir`` of a builder (its ``data_dir`` is root/name[/config]/version)."""
    return Path(builder.data_dir).parents[len(builder.info.full_name.split("/")) - 1]


class _TFDSSubset(ImageSource):
    """Some examples of a TFDS split, by their position in the split's unshuffled order."""

    encoded = True
    records_hold_images = True

    def __init__(self, base: TFDSSource, indices: np.ndarray, name: str):
        super().__init__()
        self.base, self.indices = base, np.unique(np.asarray(indices, "int64"))  # records come in the split's order
        self.name, self.num_examples = name, len(self.indices)
        self.class_names, self.image_shape = base.class_names, base.image_shape

    @property
    def labels(self) -> np.ndarray | None:
        return None if self.base.labels is None else self.base.labels[self.indices]

    def _subset(self, indices: np.ndarray, name: str) -> ImageSource:
        return _TFDSSubset(self.base, self.indices[indices], name)

    def records(self, input_context=None, seed: int = 0) -> tf.data.Dataset:
        import tensorflow as tf

        keep = np.zeros(int(self.indices.max()) + 1, bool)
        keep[self.indices] = True
        size, keep = len(keep), tf.constant(keep)
        keys = [self.base.image_key] + ([self.base.label_key] if self.has_labels else [])
        dataset = (
            self.base.ordered()
            .enumerate()
            .filter(lambda index, _: tf.logical_and(index < size, tf.gather(keep, tf.minimum(index, size - 1))))
        )
        return _shard(dataset.map(lambda _, example: {k: example[k] for k in keys}), input_context)

    def load(self, record) -> dict:
        return self.base.load(record)


# ----------------------------------------------------------------------------- by name

BUILTIN_DATASETS = ("digits", "fashion_mnist", "folder")


def check_image_size(source: ImageSource, min_image_size: int) -> None:
    """Raise before training when the source's images are smaller than ``min_image_size`` pixels on a side."""
    if min_image_size <= 0:
        return
    hint = (
        f"Random resized crops of such images are upsampled; to accept that, pass min_image_size=0, "
        f"or resize the images to at least {min_image_size} px."
    )
    sizes = source.image_sizes()
    if sizes is not None:
        small = [(i, size) for i, size in enumerate(sizes) if min(size) < min_image_size]
        if small:
            examples = ", ".join(f"{source.location(i)} ({w}x{h})" for i, (h, w) in small[:3])
            raise ValueError(
                f"{len(small)} of {source.num_examples} images in {source.name} are smaller than "
                f"{min_image_size} px on a side, e.g. {examples}. {hint}"
            )
    elif source.image_shape is not None and min(source.image_shape) < min_image_size:
        height, width = source.image_shape
        raise ValueError(f"{source.name} images are {height}x{width}, smaller than {min_image_size} px. {hint}")


def load_source(
    dataset: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    image_size: int | None = None,
    download: bool = True,
    seed: int = 0,
) -> ImageSource:
    """The images of ``dataset`` / ``split``, from ``data_dir`` when given.

    - ``digits``: scikit-learn's bundled digits (splits ``train``/``test``), at ``image_size`` (default 32);
    - ``fashion_mnist``: IDX files in ``data_dir`` or Debian's ``/usr/share/datasets/fashion-mnist``,
      else the TFDS dataset when it is prepared in ``data_dir``;
    - ``folder``: the images under ``data_dir`` (or ``data_dir/split`` when that subfolder exists);
    - anything else: a TFDS dataset name and split string (``imagenet2012``, ``cifar10``, ``stl10`` with
      split ``unlabelled``...), prepared in ``data_dir`` (TFDS's default when None).
    """
    if dataset == "digits":
        if split not in ("train", "test"):
            raise ValueError(f"digits splits are 'train' and 'test', got {split!r}.")
        train, test = load_digits(image_size or 32, seed=seed)
        images, labels = train if split == "train" else test
        return ArraySource(images, labels, name=f"digits:{split}")
    if dataset == "fashion_mnist":
        directory = Path(data_dir) if data_dir else FASHION_MNIST_DIR
        if _find_idx(directory, "train-images-idx3-ubyte") or _find_idx(directory, "t10k-images-idx3-ubyte"):
            images, labels = load_fashion_mnist(split, directory, image_size or 28)
            return ArraySource(images, labels, FASHION_MNIST_CLASSES, name=f"fashion_mnist:{split}")
        try:
            return TFDSSource("fashion_mnist", split, data_dir, download=False)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"Fashion-MNIST not found: no IDX files in {directory} and no prepared TFDS fashion_mnist. "
                "Install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist), point data_dir "
                "at the IDX files, or prepare it with TFDS."
            ) from None
    if dataset == "folder":
        if data_dir is None:
            raise ValueError("dataset 'folder' needs data_dir pointing at the images.")
        directory = Path(data_dir)
        if split and (directory / split).is_dir():
            directory = directory / split
        return FolderSource(directory)
    return TFDSSource(dataset, split, data_dir, download=download)
