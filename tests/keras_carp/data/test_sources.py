"""Sources and the pipeline around them: folders with planted bad files, IDX files, TFDS (mocked), sharding."""

import gzip
import logging

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from keras_carp.callbacks import SkippedImagesLogger
from keras_carp.data import (
    ArraySource,
    FolderSource,
    MultiCropAugmentation,
    decode_image,
    eval_dataset,
    load_fashion_mnist,
    load_source,
    multicrop_dataset,
)

SMALL = MultiCropAugmentation(global_size=24, local_size=12, num_local_crops=2)


def _photo(rng, height=40, width=52):
    """A smooth colourful image (JPEG-friendly), uint8 [H, W, 3]."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    return (127.5 + 120 * np.sin(6 * x[..., None] + 4 * y[..., None] + phase)).astype(np.uint8)


@pytest.fixture
def planted_folder(tmp_path):
    """Two class folders with good images in every supported format and mode, plus bad files."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(_photo(rng)).save(root / name / f"{i}.jpg", quality=92)
    Image.fromarray(_photo(rng)).convert("CMYK").save(root / "cat" / "cmyk.jpg", quality=95)
    Image.fromarray(_photo(rng)).convert("L").save(root / "cat" / "gray.jpg", quality=95)
    Image.fromarray(np.dstack([_photo(rng), np.full((40, 52), 200, np.uint8)]), "RGBA").save(root / "dog" / "a.png")
    Image.fromarray(_photo(rng)).convert("P").save(root / "dog" / "palette.bmp")
    Image.fromarray(_photo(rng)).save(root / "dog" / "rgb.bmp")
    Image.fromarray(_photo(rng)).save(root / "dog" / "frame.gif")
    (root / "cat" / "empty.jpg").write_bytes(b"")
    (root / "cat" / "fake.png").write_text("not an image")
    (root / "cat" / "notes.txt").write_text("a note")
    full = (root / "cat" / "0.jpg").read_bytes()
    (root / "dog" / "cut_in_header.jpg").write_bytes(full[:120])  # found by the scan
    (root / "dog" / "truncated.jpg").write_bytes(full[: len(full) * 4 // 5])  # header reads; decoding fails
    return root


def test_folder_scan_skips_unreadable_ignores_non_images_and_labels_by_subfolder(planted_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="keras_carp.data"):
        source = FolderSource(planted_folder)
    unreadable = sorted(p.split("/")[-1] for p, _ in source.scan.unreadable)
    assert unreadable == ["cut_in_header.jpg", "empty.jpg", "fake.png"]
    assert [p.split("/")[-1] for p in source.scan.ignored] == ["notes.txt"]
    assert "skipping 3 unreadable files" in caplog.text
    assert source.class_names == ("cat", "dog") and source.num_examples == 19  # truncated.jpg's header reads
    labels = dict(zip((p.split("/")[-1] for p in source.scan.files), source.scan.labels))
    assert labels["cmyk.jpg"] == 0 and labels["frame.gif"] == 1


@pytest.mark.parametrize("name", ["cmyk.jpg", "gray.jpg", "a.png", "palette.bmp", "rgb.bmp", "frame.gif", "0.jpg"])
def test_every_mode_and_format_decodes_to_the_rgb_pil_sees(planted_folder, name):
    source = FolderSource(planted_folder)
    index = [p.split("/")[-1] for p in source.scan.files].index(name)
    record = next(iter(source.records().skip(index)))
    decoded = decode_image(source.load(record)["encoded"]).numpy().astype(int)
    with Image.open(source.scan.files[index]) as image:
        expected = np.asarray(image.convert("RGB")).astype(int)
    assert decoded.shape == expected.shape
    assert np.abs(decoded - expected).mean() < 2.0  # libjpeg and PIL differ by rounding only


def test_truncated_files_are_skipped_and_counted_without_stopping_the_pass(planted_folder):
    source = FolderSource(planted_folder)
    dataset = multicrop_dataset(source, SMALL, 4, seed=0, drop_remainder=False)
    labels = np.concatenate([batch_labels.numpy() for _, batch_labels in dataset])
    assert len(labels) == source.num_examples - 1 and source.skipped.count == 1
    logs = {}
    SkippedImagesLogger(source).on_epoch_end(0, logs)
    assert logs["skipped_images"] == 1


def test_crop_decoding_skips_the_same_files(planted_folder):
    source = FolderSource(planted_folder)
    dataset = multicrop_dataset(source, SMALL, 4, seed=0, drop_remainder=False, decode="crop")
    assert sum(len(labels) for _, labels in dataset) == source.num_examples - 1 and source.skipped.count == 1


def test_unlabelled_folder_yields_crops_only(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(_photo(rng)).save(tmp_path / f"{i}.png")
    source = FolderSource(tmp_path)
    assert not source.has_labels
    element = next(iter(multicrop_dataset(source, SMALL, 2)))
    assert len(element) == 1 and [c.shape[1] for c in element[0]] == [24, 24, 12, 12]


def test_folder_errors_come_before_training(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FolderSource(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no readable images"):
        FolderSource(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"")
    (tmp_path / "bad" / "y.txt").write_text("?")
    with pytest.raises(ValueError, match="1 unreadable and 1 non-image"):
        FolderSource(tmp_path / "bad")


def test_images_smaller_than_the_crop_are_an_error_unless_allowed(tmp_path):
    rng = np.random.default_rng(2)
    for i, size in enumerate([(40, 52), (10, 12), (40, 40)]):
        Image.fromarray(_photo(rng, *size)).save(tmp_path / f"{i}.png")
    source = FolderSource(tmp_path)
    with pytest.raises(ValueError, match=r"1 of 3 images .* smaller than 24 px.*1.png \(12x10\)"):
        multicrop_dataset(source, SMALL, 2)
    assert len(next(iter(multicrop_dataset(source, SMALL, 2, min_image_size=0)))[0]) == 4
    with pytest.raises(ValueError, match="images are 8x8, smaller than 24 px"):
        multicrop_dataset(np.zeros((4, 8, 8, 3), "float32"), SMALL, 2)


def test_same_seed_same_batches_and_cache_does_not_change_them(planted_folder):
    source = FolderSource(planted_folder)
    first = [c.numpy() for c in next(iter(multicrop_dataset(source, SMALL, 8, seed=4)))[0]]
    again = [c.numpy() for c in next(iter(multicrop_dataset(source, SMALL, 8, seed=4)))[0]]
    cached = [c.numpy() for c in next(iter(multicrop_dataset(source, SMALL, 8, seed=4, cache=True)))[0]]
    other = [c.numpy() for c in next(iter(multicrop_dataset(source, SMALL, 8, seed=5)))[0]]
    for a, b, c in zip(first, again, cached):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert not np.array_equal(first[0], other[0])


def test_input_context_shards_disjointly_with_per_replica_batches():
    images = np.zeros((40, 24, 24, 3), "uint8")
    seen = []
    for pipeline in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline, num_replicas_in_sync=2)
        dataset = multicrop_dataset(images, SMALL, 8, labels=np.arange(40), shuffle=False, input_context=context)
        batches = [labels.numpy() for _, labels in dataset]
        assert all(len(b) == 4 for b in batches)
        seen.append(np.concatenate(batches))
    assert not set(seen[0]) & set(seen[1]) and sorted(np.concatenate(seen)) == list(range(40))


def _write_idx(path, array, compress):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


@pytest.mark.parametrize("compress", [False, True])
def test_fashion_mnist_reads_idx_files(tmp_path, compress):
    rng = np.random.default_rng(3)
    images, labels = rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 10, 12)
    suffix = ".gz" if compress else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, compress)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, compress)
    loaded, loaded_labels = load_fashion_mnist("test", tmp_path)
    np.testing.assert_array_equal(loaded[..., 0], images)
    np.testing.assert_array_equal(loaded_labels, labels)
    source = load_source("fashion_mnist", "test", tmp_path, image_size=32)
    assert source.image_shape == (32, 32) and source.class_names[9] == "Ankle boot"


def test_truncated_idx_file_is_reported(tmp_path):
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 28, 28)), False)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4), False)
    data = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated"):
        load_fashion_mnist("train", tmp_path)


def test_eval_dataset_centre_crops_in_order():
    images = np.random.default_rng(4).uniform(size=(5, 20, 30, 3)).astype("float32")
    batches = list(eval_dataset(images, 16, batch_size=2, labels=np.arange(5)))
    assert [tuple(b[0].shape) for b in batches] == [(2, 16, 16, 3), (2, 16, 16, 3), (1, 16, 16, 3)]
    assert np.concatenate([b[1].numpy() for b in batches]).tolist() == [0, 1, 2, 3, 4]


def test_labels_come_from_the_source_not_from_arguments():
    with pytest.raises(ValueError, match="carries its own labels"):
        multicrop_dataset(ArraySource(np.zeros((4, 24, 24, 3), "uint8")), SMALL, 2, labels=np.arange(4))


def test_unknown_tfds_name_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="Unknown TFDS dataset 'imagenet2013'"):
        load_source("imagenet2013", data_dir=tmp_path)


def test_imagenet2012_without_its_archives_says_which_files_go_where(tmp_path):
    with pytest.raises(FileNotFoundError) as raised:
        load_source("imagenet2012", "train", data_dir=tmp_path)
    message = str(raised.value)
    assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
    assert str(tmp_path / "downloads" / "manual") in message


def test_imagenet2012_pipeline_on_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        source = load_source("imagenet2012", "train", data_dir=tmp_path)
        assert source.num_examples == 12 and len(source.class_names) == 1000
        recipe = MultiCropAugmentation(global_size=32, local_size=16, num_local_crops=2)
        crops, labels = next(iter(multicrop_dataset(source, recipe, 4, min_image_size=0, decode="crop")))
    assert [tuple(c.shape) for c in crops] == [(4, 32, 32, 3)] * 2 + [(4, 16, 16, 3)] * 2
    assert labels.dtype == tf.int64 and np.all((labels.numpy() >= 0) & (labels.numpy() < 1000))
    assert source.skipped.count == 0
