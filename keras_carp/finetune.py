"""Semi-supervised evaluation: fine-tune the pretrained encoder and a linear head on 1 % / 10 % of the labels.

The protocol (SwAV / BYOL / CARP): SGD with momentum 0.9 and no weight decay,
learning rate 0.002 for the encoder and 0.5 for the linear head, both x0.2 at
epochs 12 and 16, 20 epochs; random resized crop + flip for training, a
centre crop for testing. ImageNet uses TFDS ``imagenet2012_subset`` (the
SimCLR ``1pct`` / ``10pct`` image lists); any other dataset gets a
class-balanced draw from a seed (``label_fraction_indices``).

Two learning rates with one Keras optimizer: Keras 3 has no per-variable
learning rate, so the classifier scales the gradient that reaches the encoder
by ``encoder_lr / head_lr`` (``GradientScale``) and one SGD runs at the head's
rate. SGD with momentum is linear in the gradient, so this is exactly SGD at
``encoder_lr`` on the encoder (and works unchanged in ``fit`` on every
backend); it would not be exact with weight decay or an adaptive optimizer,
which ``finetune`` therefore does not offer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

from keras_carp.data.sources import ImageSource, check_label_fraction, load_source
from keras_carp.data.sources import label_fraction_indices as label_fraction_indices  # re-exported

ENCODER_LEARNING_RATE = 0.002
HEAD_LEARNING_RATE = 0.5
MOMENTUM = 0.9
EPOCHS = 20
MILESTONES = (12, 16)
DECAY_FACTOR = 0.2
CROP_SCALE = (0.08, 1.0)
"""Train-time random resized crop's area range (the torchvision / Inception default the protocol uses)."""
IMAGENET_SUBSETS = {0.01: "1pct", 0.1: "10pct"}
"""Label fraction -> TFDS ``imagenet2012_subset`` config."""


# ----------------------------------------------------------------------------- label fractions


def label_fraction_subset(source: ImageSource, fraction: float, seed: int = 0) -> ImageSource:
    """The labelled images fine-tuning sees: ``fraction`` of ``source``'s, class-balanced from ``seed``.

    ImageNet (a TFDS ``imagenet2012`` source) takes TFDS ``imagenet2012_subset``
    (``1pct`` / ``10pct``, prepared from the same archives) and accepts only
    those two fractions; any other source takes ``source.subset(fraction, seed)``
    (``label_fraction_indices``). A fraction of 1 returns ``source``.
    """
    fraction = check_label_fraction(fraction)
    if not source.has_labels:
        raise ValueError(f"{source.name} has no labels to fine-tune on.")
    if source.tfds_name == "imagenet2012":
        config = next((name for value, name in IMAGENET_SUBSETS.items() if math.isclose(value, fraction)), None)
        if config is None:
            if fraction == 1.0:
                return source
            raise ValueError(
                f"ImageNet label fractions are TFDS imagenet2012_subset's 0.01 (1pct) and 0.1 (10pct), got {fraction}."
            )
        return load_source(f"imagenet2012_subset/{config}", "train", source.data_root)
    return source.subset(fraction, seed, name=f"{source.name}[{100 * fraction:g}% labels, seed {seed}]")


# ----------------------------------------------------------------------------- the classifier


@keras.saving.register_keras_serializable(package="keras_carp")
class GradientScale(keras.layers.Layer):
    """Identity forward; multiplies the gradient flowing back through it by ``scale``.

    Placed between the encoder and the head, it scales every encoder gradient,
    which for SGD is a per-network learning rate (see the module docstring).
    The forward value is exactly the input: ``sg(x) + scale * (x - sg(x))``.
    """

    def __init__(self, scale: float, **kwargs):
        super().__init__(**kwargs)
        self.scale = float(scale)

    def call(self, inputs):
        frozen = ops.stop_gradient(inputs)
        return frozen + self.scale * (inputs - frozen)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "scale": self.scale}


def build_classifier(
    encoder: keras.Model,
    num_classes: int,
    encoder_learning_rate: float = ENCODER_LEARNING_RATE,
    head_learning_rate: float = HEAD_LEARNING_RATE,
) -> keras.Model:
    """images -> encoder (trainable) -> ``GradientScale(encoder_lr / head_lr)`` -> linear head (``"head"``)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
    if encoder_learning_rate < 0 or head_learning_rate <= 0:
        raise ValueError(
            f"learning rates must be positive (encoder may be 0), got encoder {encoder_learning_rate}, "
            f"head {head_learning_rate}."
        )
    encoder.trainable = True
    inputs = keras.Input(encoder.input_shape[1:], name="images")
    features = encoder(inputs)
    features = GradientScale(encoder_learning_rate / head_learning_rate, name="encoder_learning_rate")(features)
    logits = keras.layers.Dense(
        num_classes, kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.01), name="head"
    )(features)
    return keras.Model(inputs, logits, name="finetuned_classifier")


@keras.saving.register_keras_serializable(package="keras_carp")
class EpochStepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """``base_learning_rate * factor ** (number of milestones <= epoch)``, epoch = step // steps_per_epoch.

    Piecewise constant like ``keras.optimizers.schedules.PiecewiseConstantDecay``,
    with boundaries given in epochs: the fine-tuning protocol's x0.2 at epochs 12 and 16.
    """

    def __init__(
        self,
        base_learning_rate: float,
        steps_per_epoch: int,
        milestones: Sequence[int] = MILESTONES,
        factor: float = DECAY_FACTOR,
    ):
        if steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}.")
        if list(milestones) != sorted(milestones) or any(m <= 0 for m in milestones):
            raise ValueError(f"milestones must be increasing positive epochs, got {list(milestones)}.")
        self.base_learning_rate = float(base_learning_rate)
        self.steps_per_epoch = int(steps_per_epoch)
        self.milestones = tuple(int(m) for m in milestones)
        self.factor = float(factor)

    def __call__(self, step):
        epoch = ops.floor_divide(ops.cast(step, "int32"), self.steps_per_epoch)
        passed = ops.zeros((), "float32")
        for milestone in self.milestones:
            passed = passed + ops.cast(ops.greater_equal(epoch, milestone), "float32")
        return self.base_learning_rate * ops.power(self.factor, passed)

    def get_config(self) -> dict:
        return {
            "base_learning_rate": self.base_learning_rate,
            "steps_per_epoch": self.steps_per_epoch,
            "milestones": list(self.milestones),
            "factor": self.factor,
        }


# ----------------------------------------------------------------------------- the protocol


def top_k_accuracy(classifier: keras.Model, test_data) -> dict:
    """Top-1 / top-5 (%) of ``classifier`` (inference mode) over ``(images, labels)`` batches."""
    from keras_carp.evaluation.linear import _top_k

    scores, labels = [], []
    for images, batch_labels in test_data:
        scores.append(np.asarray(classifier.predict_on_batch(ops.convert_to_numpy(images)), "float32"))
        labels.append(np.asarray(ops.convert_to_numpy(batch_labels)))
    if not scores:
        raise ValueError("No test images (the test data is empty).")
    return _top_k(np.concatenate(scores), np.concatenate(labels))


def finetune(
    encoder: keras.Model,
    train_data,
    test_data,
    num_classes: int,
    steps_per_epoch: int,
    epochs: int = EPOCHS,
    encoder_learning_rate: float = ENCODER_LEARNING_RATE,
    head_learning_rate: float = HEAD_LEARNING_RATE,
    momentum: float = MOMENTUM,
    milestones: Sequence[int] = MILESTONES,
    factor: float = DECAY_FACTOR,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    verbose: int = 0,
) -> tuple[keras.Model, dict]:
    """Fine-tune ``encoder`` with a linear head; returns the classifier and ``{"top1", "top5", "loss"}``.

    ``train_data`` repeats ``(images, labels)`` batches with train-time random
    resized crop + flip (``keras_carp.data.classification_dataset`` of a
    ``label_fraction_subset``); ``test_data`` yields centre-cropped test
    batches (``keras_carp.data.eval_dataset``). ``loss`` is the training loss per epoch.
    The encoder's weights are updated in place.
    """
    if epochs <= 0 or steps_per_epoch <= 0:
        raise ValueError(f"epochs and steps_per_epoch must be positive, got {epochs} and {steps_per_epoch}.")
    classifier = build_classifier(encoder, num_classes, encoder_learning_rate, head_learning_rate)
    schedule = EpochStepDecay(head_learning_rate, steps_per_epoch, milestones, factor)
    classifier.compile(
        optimizer=keras.optimizers.SGD(schedule, momentum=momentum),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = classifier.fit(
        train_data, epochs=epochs, steps_per_epoch=steps_per_epoch, callbacks=list(callbacks), verbose=verbose
    )
    scores = top_k_accuracy(classifier, test_data)
    scores["loss"] = [float(value) for value in history.history.get("loss", [])]
    return classifier, scores
