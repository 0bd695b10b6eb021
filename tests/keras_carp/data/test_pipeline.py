import numpy as np
import pytest

from keras_carp.data import MultiCropAugmentation, load_digits, multicrop_dataset


def test_multicrop_views_have_the_configured_shapes_and_labels_travel_alongside():
    (images, labels), (test_images, _) = load_digits(24)
    assert images.shape[1:] == (24, 24, 3) and len(images) + len(test_images) == 1797
    augmentation = MultiCropAugmentation(global_size=24, local_size=12, num_local_crops=3)
    crops, batch_labels = next(iter(multicrop_dataset(images, augmentation, 16, labels=labels, seed=1)))
    assert [tuple(c.shape) for c in crops] == [(16, 24, 24, 3)] * 2 + [(16, 12, 12, 3)] * 3
    assert all(c.dtype.name == "float32" for c in crops) and batch_labels.shape == (16,)


def test_the_same_seed_gives_the_same_views():
    (images, _), _ = load_digits(16)
    augmentation = MultiCropAugmentation(global_size=16, local_size=8, num_local_crops=1)
    first = next(iter(multicrop_dataset(images[:64], augmentation, 8, seed=3)))[0]
    second = next(iter(multicrop_dataset(images[:64], augmentation, 8, seed=3)))[0]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_global_crops=1), "exactly 2 global crops"),
        (dict(num_local_crops=-1), "num_local_crops"),
        (dict(global_size=0), "global_size"),
        (dict(local_scale=(0.5, 0.2)), "local_scale"),
    ],
)
def test_bad_view_settings_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiCropAugmentation(**kwargs)


def test_dataset_smaller_than_a_batch_is_reported():
    with pytest.raises(ValueError, match="fewer than one batch"):
        multicrop_dataset(np.zeros((3, 8, 8, 3), "float32"), MultiCropAugmentation(8, 4, num_local_crops=0), 4)


def test_whole_images_for_device_views_keep_their_original_sizes(tmp_path):
    """The host's share of on-device views: decoded images stretched to one square, with their original sizes."""
    import tensorflow as tf
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from keras_carp.data import FolderSource
    from keras_carp.data.pipeline import WholeImages

    photo = load_sample_images().images[0]
    sizes = [(60, 40), (33, 50), (48, 48), (20, 70)]  # (height, width)
    for index, (height, width) in enumerate(sizes):
        Image.fromarray(photo[:height, :width]).save(tmp_path / f"{index}.png")
    batch = next(iter(multicrop_dataset(FolderSource(tmp_path), WholeImages(24), 4, shuffle=False, min_image_size=0)))
    images, image_sizes = batch[0]["images"].numpy(), batch[0]["image_sizes"].numpy()
    assert images.shape == (4, 24, 24, 3) and images.dtype == np.uint8
    order = [sizes.index(tuple(size)) for size in image_sizes]  # the folder's order
    assert sorted(order) == [0, 1, 2, 3]
    for image, index in zip(images, order):
        height, width = sizes[index]
        crop = tf.constant(photo[:height, :width], tf.float32) / 255.0
        expected = tf.image.resize(crop, (24, 24), "bicubic", antialias=True).numpy()
        np.testing.assert_allclose(image / 255.0, np.clip(expected, 0, 1), atol=1 / 255 + 1e-6)

    (digits, _), _ = load_digits(16)
    arrays = next(iter(multicrop_dataset(digits[:32], WholeImages(), 8, shuffle=False)))[0]
    np.testing.assert_array_equal(arrays["images"].numpy(), np.round(digits[:8] * 255).astype(np.uint8))
    assert arrays["image_sizes"].numpy().tolist() == [[16, 16]] * 8
