"""One data layer: one normalisation, one source conversion, one source interface (labels, subset, read)."""

import numpy as np
import pytest
from PIL import Image

from keras_carp.data import ArraySource, EvalBatches, FolderSource, ImageBatches
from keras_carp.data.sources import ImageSource, as_source, check_image_size
from keras_carp.imagenet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    center_crop_geometry,
    normalize,
    to_float_image,
    to_uint8_image,
)

pytestmark = pytest.mark.tensorflow_free  # the comparisons with TensorFlow skip without it


def _folder(root, sizes, classes=("a", "b")):
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i, (height, width) in enumerate(sizes):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


# ----------------------------------------------------------------------------- normalisation, once


def test_normalize_is_mean_and_std_in_float32_on_numpy():
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(2, 4, 4, 3)).astype(np.float64)
    got = normalize(images)
    mean, std = np.float32(IMAGENET_MEAN), np.float32(IMAGENET_STD)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, (images.astype(np.float32) - mean) / std)


def test_normalize_and_conversions_give_the_same_numbers_on_tensorflow_tensors():
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(1)
    floats = rng.uniform(-0.1, 1.1, size=(5, 7, 3)).astype(np.float32)
    uint8 = rng.integers(0, 256, size=(5, 7, 1), dtype=np.uint8)
    np.testing.assert_array_equal(normalize(tf.constant(floats)).numpy(), normalize(floats))
    np.testing.assert_array_equal(to_float_image(tf.constant(uint8)).numpy(), to_float_image(uint8))
    tf_float = tf.image.convert_image_dtype(uint8, tf.float32).numpy()
    np.testing.assert_array_equal(to_float_image(tf.constant(uint8)).numpy(), np.repeat(tf_float, 3, axis=-1))
    np.testing.assert_array_equal(to_uint8_image(tf.constant(floats)).numpy(), to_uint8_image(floats))
    for shape in ((40, 52), (52, 40), (17, 17), (9, 30)):
        for fraction in (1.0, 224 / 256, 0.5):
            tf_resized, tf_offset = center_crop_geometry(tf.constant(shape), 16, fraction)
            np_resized, np_offset = center_crop_geometry(shape, 16, fraction)
            np.testing.assert_array_equal(tf_resized.numpy(), np_resized)
            np.testing.assert_array_equal(tf_offset.numpy(), np_offset)


def test_normalize_takes_the_keras_backend_tensors_of_the_train_step():
    """What ``DeviceMultiCrop`` computes with ``keras.ops`` on every backend, to the bit."""
    from keras import ops

    views = ops.convert_to_tensor(np.random.default_rng(2).uniform(size=(2, 3, 3, 3)).astype(np.float32))
    mean, std = ops.convert_to_tensor(IMAGENET_MEAN, "float32"), ops.convert_to_tensor(IMAGENET_STD, "float32")
    expected = ops.convert_to_numpy((views - mean) / std)
    np.testing.assert_array_equal(ops.convert_to_numpy(normalize(views)), expected)
    np.testing.assert_allclose(normalize(ops.convert_to_numpy(views)), expected, rtol=1e-6)  # XLA divides its way


def test_center_crop_geometry_keeps_the_crop_inside_and_the_shorter_side_at_size_over_fraction():
    (height, width), (top, left) = center_crop_geometry((40, 80), 16, 0.5)
    assert (height, width) == (32, 64) and (top, left) == (8, 24)
    (height, width), _ = center_crop_geometry((100, 3), 16)  # never below the crop
    assert height >= 16 and width == 16


# ----------------------------------------------------------------------------- one source conversion


def test_as_source_takes_a_source_as_it_is_and_arrays_with_their_labels():
    images = np.zeros((6, 4, 4, 3), np.uint8)
    source = as_source(images, np.arange(6) % 2)
    assert isinstance(source, ImageSource) and source.class_names == ("0", "1") and len(source) == 6
    assert as_source(source) is source
    with pytest.raises(ValueError, match="carries its own labels"):
        as_source(source, np.arange(6))
    assert not as_source(images).has_labels and as_source(images).labels is None


def test_the_pillow_loaders_refuse_a_source_read_through_tf_data():
    class Records(ImageSource):
        name, num_examples = "records", 4

    with pytest.raises(TypeError, match="read through tf.data"):
        ImageBatches(Records(), batch_size=2, image_size=4)
    with pytest.raises(TypeError, match="read through tf.data"):
        EvalBatches(Records(), image_size=4)


# ----------------------------------------------------------------------------- one interface


def test_array_sources_answer_labels_read_and_subsets():
    images = np.arange(20, dtype=np.uint8).reshape(20, 1, 1, 1).repeat(3, 1).repeat(3, 2)
    source = ArraySource(images, np.arange(20) % 4, name="toy")
    np.testing.assert_array_equal(source.labels, np.arange(20) % 4)
    assert source.read(7)[0, 0, 0] == 7 and source.location(7) == "toy[7]" and source.image_sizes() is None
    picked = source.subset([3, 5, 8])
    assert len(picked) == 3 and picked.class_names == source.class_names
    np.testing.assert_array_equal(picked.images[:, 0, 0, 0], [3, 5, 8])
    np.testing.assert_array_equal(picked.labels, [3, 1, 0])
    half = source.subset(0.5, seed=3)
    assert len(half) == 12 and np.bincount(half.labels).tolist() == [3, 3, 3, 3]  # class-balanced
    np.testing.assert_array_equal(half.images[:, 0, 0, 0] % 4, half.labels)
    assert source.subset(1.0) is source
    with pytest.raises(IndexError):
        source.subset([20])
    unlabelled = ArraySource(images).subset(0.25, seed=0)
    assert len(unlabelled) == 5 and not unlabelled.has_labels


def test_folder_sources_answer_labels_read_sizes_and_subsets(tmp_path):
    source = FolderSource(_folder(tmp_path / "images", [(6, 9), (12, 12), (20, 7)]), workers=1)
    np.testing.assert_array_equal(source.labels, [0, 0, 0, 1, 1, 1])
    assert source.image_sizes() == [(6, 9), (12, 12), (20, 7)] * 2
    assert source.read(2).shape == (20, 7, 3) and source.location(2).endswith("a/2.png")
    subset = source.subset([1, 4])
    assert len(subset) == 2 and subset.image_sizes() == [(12, 12), (12, 12)] and subset.image_shape == (12, 12)
    np.testing.assert_array_equal(subset.labels, [0, 1])
    assert subset.skipped is not source.skipped and len(source) == 6
    with pytest.raises(ValueError, match=r"4 of 6 images .* smaller than 8 px"):
        check_image_size(source, 8)
    check_image_size(source, 0)  # 0 accepts every size


def test_tfds_sources_answer_labels_and_subsets(tmp_path):
    pytest.importorskip("tensorflow")
    tfds = pytest.importorskip("tensorflow_datasets")
    from keras_carp.data import load_source

    with tfds.testing.mock_data(num_examples=20):
        source = load_source("mnist", "train", data_dir=tmp_path)
        assert source.tfds_name == "mnist" and len(source.labels) == 20 and not source.reads_without_tensorflow
        subset = source.subset([2, 5, 11])
        labels = [int(r["label"]) for r in subset.records().as_numpy_iterator()]
        np.testing.assert_array_equal(labels, source.labels[[2, 5, 11]])
        np.testing.assert_array_equal(subset.labels, labels)
        np.testing.assert_array_equal(subset.subset([0, 2]).labels, source.labels[[2, 11]])
