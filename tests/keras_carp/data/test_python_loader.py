"""The TensorFlow-free loaders: Pillow batches for fit, resumable orders, skipped files, centre crops, no-TF imports."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from keras_carp.data import ArraySource, EvalBatches, FolderSource, ImageBatches, load_digits, load_fashion_mnist
from keras_carp.data.sources import FASHION_MNIST_DIR

pytestmark = pytest.mark.tensorflow_free  # tests that compare with the tf.data path skip without TensorFlow
SIZE = 16


def _photo(rng, height, width):
    """A smooth colourful image (JPEG-friendly), uint8 [H, W, 3]."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    return (127.5 + 120 * np.sin(6 * x[..., None] + 4 * y[..., None] + phase)).astype(np.uint8)


def _numbered(count, height=6, width=6, channels=3):
    """Image i is filled with the value i, so a batch says which images it holds."""
    return np.broadcast_to(np.arange(count, dtype=np.uint8)[:, None, None, None], (count, height, width, channels))


def _ids(batch):
    return batch[0]["images"][:, 0, 0, 0].astype(int)


def _epoch(loader):
    """The batches of the loader's current epoch, then on to the next epoch (as fit reads them)."""
    loader.on_epoch_begin()
    batches = [loader[i] for i in range(len(loader))]
    loader.on_epoch_end()
    return batches


def _reference(path, size=SIZE):
    """What the loader should make of a file: Pillow's own RGB decode and bicubic resize."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    return np.asarray(rgb.resize((size, size), Image.BICUBIC)), (rgb.height, rgb.width)


def _assert_batches_equal(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a[0]["images"], b[0]["images"])
        np.testing.assert_array_equal(a[0]["image_sizes"], b[0]["image_sizes"])
        assert len(a) == len(b)
        if len(a) == 2:
            np.testing.assert_array_equal(a[1], b[1])


@pytest.fixture
def photo_folder(tmp_path):
    """Two class folders of JPEGs and PNGs of different sizes (one grayscale, one GIF): 12 images."""
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    sizes = [(30, 40), (45, 25), (24, 24), (50, 61), (20, 33), (36, 36)]
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i, (height, width) in enumerate(sizes):
            image = Image.fromarray(_photo(rng, height, width))
            if i == 2:
                image = image.convert("L")
            suffix = {0: "jpg", 2: "jpg", 4: "gif"}.get(i, "png")
            image.save(root / name / f"{i}.{suffix}", **({"quality": 90} if suffix == "jpg" else {}))
    return root


# ----------------------------------------------------------------------------- arrays


def test_array_batches_hold_every_image_once_per_epoch_in_the_seeded_order():
    images, labels = _numbered(24), np.arange(24) % 5
    loader = ImageBatches(images, 8, labels=labels, seed=3)
    assert (len(loader), loader.steps_per_epoch, loader.image_size) == (3, 3, 6)
    for epoch in range(2):
        batches = _epoch(loader)
        for x, y in batches:
            assert x["images"].shape == (8, 6, 6, 3) and x["images"].dtype == np.uint8
            assert x["image_sizes"].dtype == np.int32 and x["image_sizes"].tolist() == [[6, 6]] * 8
            assert y.dtype == np.int32
        ids = np.concatenate([_ids(b) for b in batches])
        np.testing.assert_array_equal(ids, np.random.default_rng([3, epoch]).permutation(24))
        np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), ids % 5)


def test_array_batches_unshuffled_grayscale_float_and_resized():
    gray = ImageBatches(_numbered(10, channels=1), 5, shuffle=False)
    x, *rest = gray[1]
    assert rest == [] and x["images"].shape == (5, 6, 6, 3)  # unlabelled: (x,)
    np.testing.assert_array_equal(_ids(gray[0]), np.arange(5))
    assert np.all(x["images"] == x["images"][..., :1])

    floats = np.random.default_rng(0).random((4, 7, 9, 3)).astype("float32")
    loader = ImageBatches(ArraySource(floats), 4, image_size=SIZE, shuffle=False)
    (x,) = loader[0]
    as_uint8 = np.round(floats * 255).astype(np.uint8)
    expected = np.stack([np.asarray(Image.fromarray(a).resize((SIZE, SIZE), Image.BICUBIC)) for a in as_uint8])
    np.testing.assert_array_equal(x["images"], expected)
    assert x["image_sizes"].tolist() == [[7, 9]] * 4
    with pytest.raises(ValueError, match="image_size"):
        ImageBatches(floats, 2)  # not square: the size must be given
    with pytest.raises(ValueError, match="fewer than one batch"):
        ImageBatches(floats, 5, image_size=8)


def test_the_order_is_a_function_of_seed_and_epoch_only():
    images = _numbered(40)
    first, second = ImageBatches(images, 8, seed=7), ImageBatches(images, 8, seed=7)
    epochs = [_epoch(first) for _ in range(2)]
    _assert_batches_equal(epochs[0], _epoch(second))
    _assert_batches_equal(epochs[1], _epoch(second))
    assert not np.array_equal(_ids(epochs[0][0]), _ids(epochs[1][0]))
    other_seed = _epoch(ImageBatches(images, 8, seed=8))
    assert not np.array_equal(_ids(epochs[0][0]), _ids(other_seed[0]))


def test_start_step_resumes_exactly_across_an_epoch_boundary():
    images, labels = _numbered(22), np.arange(22) % 3  # 5 steps of 4 per epoch; 2 images left out each epoch
    uninterrupted = ImageBatches(images, 4, labels=labels, seed=1, epochs=3)
    whole_run = [b for _ in range(3) for b in _epoch(uninterrupted)]
    assert len(whole_run) == 15 and len(uninterrupted) == 0  # the run is over

    resumed = ImageBatches(images, 4, labels=labels, seed=1, epochs=3, start_step=7)
    assert (resumed.epoch, len(resumed), resumed.steps_per_epoch) == (1, 3, 5)  # the rest of epoch 1
    rest_of_epoch = _epoch(resumed)
    assert len(resumed) == 5
    _assert_batches_equal(rest_of_epoch + _epoch(resumed), whole_run[7:15])
    _assert_batches_equal([resumed.batch_at(step) for step in (0, 14)], [whole_run[0], whole_run[14]])
    with pytest.raises(ValueError, match="start_step"):
        ImageBatches(images, 4, epochs=3, start_step=15)
    with pytest.raises(IndexError):
        resumed[0]  # after the last epoch


def test_only_an_epoch_read_through_ends_it():
    loader = ImageBatches(_numbered(12), 4, start_step=1)
    loader[0], loader[1]
    loader.on_epoch_end()  # the TensorFlow backend's shape probe, then fit's reset
    loader.on_epoch_begin()
    loader[0]
    loader.on_epoch_end()  # JAX/PyTorch read a batch to build the model, then reset
    assert (loader.epoch, len(loader)) == (0, 2)
    _epoch(loader)
    assert (loader.epoch, len(loader)) == (1, 3)


# ----------------------------------------------------------------------------- folders


def test_folder_batches_are_pillow_bicubic_resizes_with_original_sizes_and_folder_labels(photo_folder):
    source = FolderSource(photo_folder)
    loader = ImageBatches(source, 4, image_size=SIZE, seed=2)
    order = np.random.default_rng([2, 0]).permutation(12)
    for step, (x, labels) in enumerate(_epoch(loader)):
        assert x["images"].shape == (4, SIZE, SIZE, 3) and x["images"].dtype == np.uint8
        for j in range(4):
            path = source.scan.files[order[step * 4 + j]]
            pixels, (height, width) = _reference(path)
            np.testing.assert_array_equal(x["images"][j], pixels)
            assert tuple(x["image_sizes"][j]) == (height, width)
            assert source.class_names[labels[j]] == Path(path).parent.name
    assert loader.skipped == 0
    with pytest.raises(ValueError, match="image_size"):
        ImageBatches(source, 4)


@pytest.mark.parametrize("damage", ["truncated_before_scan", "garbage_after_scan"])
def test_an_undecodable_file_is_replaced_by_the_next_in_order_and_counted(photo_folder, damage, caplog):
    broken = photo_folder / "cat" / "0.jpg"
    if damage == "truncated_before_scan":  # the header reads, so the scan keeps it; decoding fails
        whole = broken.read_bytes()
        broken.write_bytes(whole[: len(whole) * 4 // 5])
    source = FolderSource(photo_folder)
    if damage == "garbage_after_scan":
        broken.write_bytes(b"\xff\xd8 not a JPEG after all" * 10)
    assert str(broken) in source.scan.files and source.num_examples == 12
    loader = ImageBatches(source, 4, image_size=SIZE, seed=5)
    with caplog.at_level("WARNING", logger="keras_carp.data"):
        batches = _epoch(loader)
    assert loader.skipped == 1 and loader.skipped_files == [str(broken)]
    assert sum("0.jpg" in record.getMessage() for record in caplog.records) == 1

    order = np.random.default_rng([5, 0]).permutation(12)
    position = int(np.flatnonzero(np.array(source.scan.files)[order] == str(broken))[0])
    replacement = source.scan.files[order[(position + 1) % 12]]
    x, labels = batches[position // 4]
    pixels, size = _reference(replacement)
    np.testing.assert_array_equal(x["images"][position % 4], pixels)
    assert tuple(x["image_sizes"][position % 4]) == size
    assert source.class_names[labels[position % 4]] == Path(replacement).parent.name
    assert all(b[0]["images"].shape == (4, SIZE, SIZE, 3) for b in batches)

    again = ImageBatches(source, 4, image_size=SIZE, seed=5)
    _assert_batches_equal(batches, _epoch(again))
    _epoch(loader)
    assert loader.skipped == 2  # once per epoch it was due in, as the tf.data pipeline counts


def test_a_batch_with_no_decodable_file_is_an_error(tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(4):
        Image.fromarray(_photo(np.random.default_rng(i), 20, 20)).save(tmp_path / "images" / f"{i}.png")
    source = FolderSource(tmp_path / "images")
    for path in source.scan.files[:2]:
        Path(path).write_bytes(b"broken")
    loader = ImageBatches(source, 2, image_size=8, shuffle=False)
    with pytest.raises(RuntimeError, match="none of the 2 files"):
        loader[0]
    assert loader[1][0]["images"].shape == (2, 8, 8, 3)


def _identity_model(size=SIZE):
    """Returns the batch it is fed (as float32), to see what fit/predict received."""
    inputs = {
        "images": keras.Input((size, size, 3), dtype="uint8", name="images"),
        "image_sizes": keras.Input((2,), dtype="int32", name="image_sizes"),
    }
    return keras.Model(inputs, [keras.layers.Rescaling(1.0)(inputs["images"]),
                                keras.layers.Rescaling(1.0)(inputs["image_sizes"])])  # fmt: skip


@pytest.mark.core
def test_worker_processes_give_the_same_batches_and_skip_count(photo_folder):
    whole = (photo_folder / "dog" / "1.png").read_bytes()
    (photo_folder / "dog" / "1.png").write_bytes(whole[: len(whole) // 2])
    source = FolderSource(photo_folder)
    expected = _epoch(ImageBatches(source, 4, image_size=SIZE, seed=9))
    loader = ImageBatches(source, 4, image_size=SIZE, seed=9, workers=2, use_multiprocessing=True)
    images, sizes = _identity_model().predict(loader, verbose=0)
    np.testing.assert_array_equal(images, np.concatenate([x["images"] for x, _ in expected]).astype("float32"))
    np.testing.assert_array_equal(sizes, np.concatenate([x["image_sizes"] for x, _ in expected]))
    assert loader.skipped == 1  # counted in a worker process, read here


# ----------------------------------------------------------------------------- fit


class _RecordingBatches(ImageBatches):
    """Records (epoch, index) of each batch asked for."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def __getitem__(self, index):
        self.calls.append((self.epoch, index))
        return super().__getitem__(index)


@pytest.mark.core
def test_fit_trains_a_two_input_model_epoch_after_epoch():
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (24, 12, 10, 3), dtype=np.uint8), np.arange(24) % 3
    loader = _RecordingBatches(images, 8, image_size=SIZE, labels=labels, seed=0)
    pixels = keras.Input((SIZE, SIZE, 3), dtype="uint8", name="images")
    sizes = keras.Input((2,), dtype="int32", name="image_sizes")
    features = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(pixels))
    features = keras.layers.Concatenate()([features, keras.layers.Rescaling(1 / 32)(sizes)])
    model = keras.Model({"images": pixels, "image_sizes": sizes}, keras.layers.Dense(3)(features))
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(loader, epochs=2, shuffle=False, verbose=0)
    assert len(history.history["loss"]) == 2 and np.all(np.isfinite(history.history["loss"]))
    assert loader.epoch == 2
    # Every batch was read in its own epoch (none of epoch 1 prefetched before epoch 0 ended), and the
    # backends' extra reads (shape probe, build) and their on_epoch_end did not move the epoch on.
    assert set(loader.calls) == {(epoch, i) for epoch in range(2) for i in range(3)}
    assert loader.calls[-3:] == [(1, 0), (1, 1), (1, 2)]
    threaded = _RecordingBatches(images, 8, image_size=SIZE, labels=labels, start_step=4, workers=2)
    model.fit(threaded, initial_epoch=1, epochs=2, steps_per_epoch=len(threaded), shuffle=False, verbose=0)
    model.fit(threaded, initial_epoch=2, epochs=3, steps_per_epoch=threaded.steps_per_epoch, shuffle=False, verbose=0)
    assert threaded.epoch == 3 and set(threaded.calls) == {(1, 0), (1, 1)} | {(2, i) for i in range(3)}

    (x,) = ImageBatches(images, 8, image_size=SIZE)[0]
    predicted = _identity_model().predict(ImageBatches(images, 8, image_size=SIZE), verbose=0)[0]  # (x,) batches
    np.testing.assert_array_equal(predicted[:8], x["images"].astype("float32"))


# ----------------------------------------------------------------------------- evaluation


def test_eval_batches_match_the_tf_center_crop_on_real_photos():
    pytest.importorskip("tensorflow")
    from sklearn.datasets import load_sample_images

    from keras_carp.data import IMAGENET_MEAN, IMAGENET_STD, center_crop

    photos = load_sample_images().images  # two 427 x 640 photos
    small = np.random.default_rng(0).integers(0, 256, (2, 30, 22, 3), dtype=np.uint8)
    for images, size, fraction in ((photos, 224, 224 / 256), (photos, 64, 1.0), (small, 48, 0.875)):
        (crops, labels) = EvalBatches(images, size, batch_size=2, labels=[0, 1], crop_fraction=fraction)[0]
        expected = (np.asarray(center_crop(np.stack(images), size, fraction)) - IMAGENET_MEAN) / IMAGENET_STD
        assert crops.shape == (2, size, size, 3) and crops.dtype == np.float32 and labels.tolist() == [0, 1]
        np.testing.assert_allclose(crops, expected, atol=2e-4)  # measured: 8e-5 (float32 vs Pillow's doubles)


def test_eval_batches_cover_every_image_in_order_and_drop_undecodable_files(photo_folder):
    whole = (photo_folder / "dog" / "3.png").read_bytes()
    (photo_folder / "dog" / "3.png").write_bytes(whole[: len(whole) // 2])
    source = FolderSource(photo_folder)
    batches = EvalBatches(source, SIZE, batch_size=5)
    assert len(batches) == 3
    labels = [batches[i][1] for i in range(3)]
    assert [len(y) for y in labels] == [5, 4, 2]  # dog/3.png (the 10th) is left out; the last batch is partial
    np.testing.assert_array_equal(np.concatenate(labels), np.delete(source.scan.labels, 9))
    assert batches.skipped == 1
    unlabelled = EvalBatches(np.zeros((3, 8, 8, 1), np.uint8), 4, batch_size=2)
    assert unlabelled[1].shape == (1, 4, 4, 3)  # images alone, as eval_dataset gives them


# ----------------------------------------------------------------------------- built-in datasets, no TensorFlow


def test_builtin_datasets_resize_as_tf_image_resize_did():
    tf = pytest.importorskip("tensorflow")
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    (train, train_labels), (test, _) = load_digits(32, seed=0)
    digits = sklearn_digits()
    reference = tf.image.resize((digits.images.astype("float32") / 16.0)[..., None], (32, 32), method="bilinear")
    reference = np.repeat(np.clip(reference.numpy(), 0.0, 1.0), 3, axis=-1)
    expected, expected_test, expected_labels, _ = train_test_split(
        reference, digits.target, test_size=0.25, random_state=0, stratify=digits.target
    )
    np.testing.assert_allclose(train, expected, atol=1e-4)
    np.testing.assert_allclose(test, expected_test, atol=1e-4)
    np.testing.assert_array_equal(train_labels, expected_labels)
    try:
        native, _ = load_fashion_mnist("test")
    except FileNotFoundError:
        pytest.skip(f"Fashion-MNIST IDX files are not in {FASHION_MNIST_DIR}")
    for size in (20, 32):
        resized, _ = load_fashion_mnist("test", image_size=size)
        expected = tf.image.resize(native[:1000].astype("float32"), (size, size), method="bilinear").numpy()
        np.testing.assert_array_equal(resized[:1000], np.clip(np.round(expected), 0, 255).astype(np.uint8))


NO_TENSORFLOW = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoTensorFlow(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
                raise ImportError(f"{name} is blocked")

    sys.meta_path.insert(0, NoTensorFlow())
    import numpy as np
    from PIL import Image

    import keras_carp.data
    import keras_carp.data.python_loader
    from keras_carp.data.sources import ArraySource, FolderSource, load_digits, load_fashion_mnist, scan_image_folder
    from keras_carp.data import EvalBatches, ImageBatches

    (x, y), _ = load_digits(16)
    batch, labels = ImageBatches(ArraySource(x, y), 8)[0]
    assert batch["images"].shape == (8, 16, 16, 3) and labels.shape == (8,)
    assert EvalBatches(x[:3], 8, labels=y[:3])[0][0].shape == (3, 8, 8, 3)
    folder = sys.argv[1]
    for i in range(4):
        Image.fromarray(np.full((9, 7, 3), 40 * i, np.uint8)).save(f"{folder}/{i}.png")
    assert len(scan_image_folder(folder).files) == 4
    assert ImageBatches(FolderSource(folder), 2, image_size=8)[0][0]["image_sizes"].tolist() == [[9, 7]] * 2
    try:
        images, _ = load_fashion_mnist("test", image_size=32)
        assert images.shape == (10000, 32, 32, 1)
    except FileNotFoundError:
        pass
    try:
        keras_carp.data.multicrop_dataset
    except ImportError:
        pass
    else:
        raise AssertionError("the tf.data pipeline imported without TensorFlow")
    assert not any(name.startswith("tensorflow") for name in sys.modules)
    print("ok")
    """
)


def test_sources_and_loaders_work_without_tensorflow(tmp_path):
    pytest.importorskip("jax")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", NO_TENSORFLOW, str(tmp_path)], capture_output=True, text=True,
                            env=env, cwd=Path(__file__).parents[3], timeout=300)  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
