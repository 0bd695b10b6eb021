"""An online linear probe while CARP pretrains, as a callback (solo-learn / lightly log one the same way).

solo-learn and lightly train a linear classifier inside the training step, on
``stop_gradient`` features of the batch being pretrained on. ``OnlineLinearProbe``
gets the same signal without touching ``CARP.train_step`` or the backends:
every ``every_steps`` batches (and at each epoch's end) it takes the next
labelled batch of its own stream, computes the frozen encoder's features in
inference mode (no gradient reaches the encoder: they are separate calls),
scores the head on that unseen batch, then takes one step of the head's own
SGD on it. The running accuracy of those scores is an online (prequential)
top-1; with ``test_data`` the head is also scored on held-out images at each
epoch's end.
"""

from __future__ import annotations

import logging

import keras
import numpy as np

from keras_carp.evaluation.features import batch_encoder

logger = logging.getLogger("keras_carp.evaluation")


def _to_numpy(x) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else keras.ops.convert_to_numpy(x)


class OnlineLinearProbe(keras.callbacks.Callback):
    """A linear head fit on the encoder's features of a labelled stream during ``fit``; logs its accuracy.

    Args:
        labelled_data: an iterable of ``(images, labels)`` batches, re-iterated
            when exhausted (e.g. ``keras_carp.data.classification_dataset``, which repeats).
        num_classes: the head's outputs.
        encoder: ``"teacher"`` / ``"student"`` (the CARP model's encoder) or a
            Keras model used as it is.
        every_steps: probe steps happen after every ``every_steps`` training batches;
            0 means only at each epoch's end.
        steps_per_update: labelled batches per probe update.
        test_data: optional ``(images, labels)`` batches scored at each epoch's end.
        learning_rate, momentum: the head's SGD (features pass a parameter-free
            batch norm first, as in ``linear_probe``, so the rate suits any feature scale).

    Logs (epoch end): ``online_probe_top1`` (% correct on the labelled batches
    of the epoch, each scored before the head learnt from it), ``online_probe_loss``
    and, with ``test_data``, ``online_probe_test_top1``.
    """

    def __init__(
        self,
        labelled_data,
        num_classes: int,
        encoder: str | keras.Model = "teacher",
        every_steps: int = 1,
        steps_per_update: int = 1,
        test_data=None,
        learning_rate: float = 0.1,
        momentum: float = 0.9,
        seed: int = 0,
    ):
        super().__init__()
        if isinstance(encoder, str) and encoder not in ("teacher", "student"):
            raise ValueError(f"encoder must be 'teacher', 'student' or a Keras model, got {encoder!r}.")
        if every_steps < 0 or steps_per_update <= 0:
            raise ValueError(
                f"every_steps must be >= 0 and steps_per_update > 0, got {every_steps} and {steps_per_update}."
            )
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
        self.labelled_data, self.test_data = labelled_data, test_data
        self.num_classes, self.which = int(num_classes), encoder
        self.every_steps, self.steps_per_update = int(every_steps), int(steps_per_update)
        self.learning_rate, self.momentum, self.seed = float(learning_rate), float(momentum), int(seed)
        self.head: keras.Model | None = None
        self.history: dict[int, dict] = {}
        self._batches = None
        self._correct = self._seen = 0
        self._losses: list[float] = []

    # ---------------------------------------------------------------- pieces
    def encoder(self) -> keras.Model:
        if not isinstance(self.which, str):
            return self.which
        return self.model.teacher_encoder if self.which == "teacher" else self.model.student_encoder

    def _next_batch(self):
        if self._batches is None:
            self._batches = iter(self.labelled_data)
        try:
            return next(self._batches)
        except StopIteration:
            self._batches = iter(self.labelled_data)
            return next(self._batches)

    def features(self, images) -> np.ndarray:
        """Frozen-encoder features in inference mode (no gradient reaches the encoder)."""
        return np.asarray(batch_encoder(self.encoder())(_to_numpy(images)), "float32")

    def _build_head(self, dim: int) -> keras.Model:
        head = keras.Sequential(
            [
                keras.Input((dim,)),
                keras.layers.BatchNormalization(center=False, scale=False),
                keras.layers.Dense(
                    self.num_classes, kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.01, seed=self.seed)
                ),
            ],
            name="online_linear_probe",
        )
        head.compile(
            optimizer=keras.optimizers.SGD(self.learning_rate, momentum=self.momentum),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return head

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Class scores of the head on features [N, D]."""
        return np.asarray(self.head.predict_on_batch(np.asarray(features, "float32")))

    def update(self) -> None:
        """Score the head on the next labelled batch(es), then one SGD step on each."""
        _sync_jax_state(self.model)
        for _ in range(self.steps_per_update):
            images, labels = self._next_batch()
            features, labels = self.features(images), _to_numpy(labels).astype("int64").reshape(-1)
            if self.head is None:
                self.head = self._build_head(features.shape[-1])
            else:
                self._correct += int((self.predict(features).argmax(-1) == labels).sum())
                self._seen += len(labels)
            loss = self.head.train_on_batch(features, labels)
            self._losses.append(float(np.asarray(loss[0] if isinstance(loss, list | tuple) else loss)))

    def test_top1(self) -> float:
        """Top-1 (%) of the head on ``test_data``."""
        _sync_jax_state(self.model)
        correct = seen = 0
        for images, labels in self.test_data:
            labels = _to_numpy(labels).astype("int64").reshape(-1)
            correct += int((self.predict(self.features(images)).argmax(-1) == labels).sum())
            seen += len(labels)
        return 100.0 * correct / max(seen, 1)

    # ---------------------------------------------------------------- hooks
    def on_epoch_begin(self, epoch, logs=None):
        self._correct = self._seen = 0
        self._losses = []

    def on_train_batch_end(self, batch, logs=None):
        if self.every_steps and (batch + 1) % self.every_steps == 0:
            self.update()

    def on_epoch_end(self, epoch, logs=None):
        if not self.every_steps or self.head is None:
            self.update()
        result = {
            "online_probe_top1": 100.0 * self._correct / self._seen if self._seen else float("nan"),
            "online_probe_loss": float(np.mean(self._losses)) if self._losses else float("nan"),
        }
        if self.test_data is not None:
            result["online_probe_test_top1"] = self.test_top1()
        self.history[epoch + 1] = result
        if logs is not None:
            logs.update(result)
        logger.info("epoch %d: online linear probe %s", epoch + 1,
                    ", ".join(f"{k} {v:.3f}" for k, v in result.items()))  # fmt: skip


def _sync_jax_state(model) -> None:
    """On JAX, ``fit`` keeps the weights outside the variables between batches; put them back before reading."""
    if model is not None and keras.backend.backend() == "jax" and hasattr(model, "jax_state_sync"):
        model.jax_state_sync()
