"""CARP(keras.Model): student and teacher, views -> logits -> partition -> loss.

The method is written once here with ``keras.ops``; only "compute the gradients
and apply them" differs between backends and lives in ``keras_carp.backends``.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops

from keras_carp import backends, keras_internals
from keras_carp.batch_norm import MOMENTS, batch_norm_layers, use_one_pass_moments
from keras_carp.device_augmentation import DeviceMultiCrop
from keras_carp.heads import CARPHead
from keras_carp.losses import CARPLoss, check_partition
from keras_carp.optimizers import accumulation_steps, base_optimizer
from keras_carp.partition import random_permutation, sequential_permutation
from keras_carp.schedules import TeacherMomentumSchedule

PARTITIONS = ("random", "fixed")
TRACKED = ("loss", "consistency", "entropy", "prototypes_used")


def _freeze_keeping_batch_statistics(network: keras.layers.Layer) -> None:
    """Make every weight non-trainable while BN still normalises with batch statistics.

    Keras' BatchNormalization uses its moving averages when ``trainable`` is
    False; the CARP teacher runs in training mode (batch statistics, as in the
    released code) although it never gets gradients
    (``keras_internals.keep_batch_statistics``).
    """
    network.trainable = False
    for layer in batch_norm_layers(network):
        keras_internals.keep_batch_statistics(layer)


def views_from_data(data) -> list:
    """The list of crops from what the dataset yields: ``(crops, label)``, ``(crops,)``, crops, or a dict."""
    if isinstance(data, dict):
        data = data["views"]
    elif isinstance(data, (tuple, list)) and data and isinstance(data[0], (tuple, list)):
        data = data[0]
    views = list(data) if isinstance(data, (tuple, list)) else [data]
    if len(views) < 2:
        raise ValueError(
            f"CARP needs at least the 2 global crops of each image, got {len(views)} view(s); "
            "feed batches of (crop_0, crop_1, *local_crops), optionally followed by labels."
        )
    for index, view in enumerate(views):
        if len(view.shape) != 4:
            raise ValueError(f"Crop {index} must be a batch of images [N, H, W, C], got shape {view.shape}.")
    return views


def image_batch(data):
    """``(images, image_sizes)`` when ``data`` is a batch of whole images for on-device views, else None.

    Whole images come as ``{"images": ..., "image_sizes": ...}`` (sizes optional)
    or one 4-D tensor, alone or followed by labels: ``x``, ``(x,)``, ``(x, y)``.
    """
    first = data[0] if isinstance(data, (tuple, list)) and data else data
    if isinstance(first, dict):
        return (first["images"], first.get("image_sizes")) if "images" in first else None
    if isinstance(data, (tuple, list)) and (len(data) > 2 or (len(data) == 2 and len(data[1].shape) == 4)):
        return None  # crops
    return (first, None) if hasattr(first, "shape") and len(first.shape) == 4 else None


def _resolution_groups(views: Sequence) -> list[list[int]]:
    """Indices of crops that share a resolution, in first-seen order; the 2 global crops always together."""
    groups: dict = {"global": [0, 1]}
    for index, view in enumerate(views[2:], start=2):
        height, width = view.shape[1], view.shape[2]
        key = (height, width) if height is not None and width is not None else ("crop", index)
        if key == tuple(views[0].shape[1:3]) and None not in key:
            key = "global"
        groups.setdefault(key, []).append(index)
    return list(groups.values())


@keras.saving.register_keras_serializable(package="keras_carp")
class CARP(keras.Model):
    """Consistent Assignment of views over Random Partitions.

    A student (encoder + ``CARPHead``) trained by gradient descent and a teacher
    copy (identical at start, never trained, moved towards the student by an
    exponential moving average). Each step, as in the authors' released step:

    1. the student's encoder runs once per resolution group of crops, its head
       once on the pooled features of all crops together (one set of head
       batch-norm statistics); the teacher sees the 2 global crops;
    2. the partition is drawn from (seed, batch); the head computes the logits
       in partition order and the loss is ``CARPLoss(block_size)`` on them;
    3. the teacher moves with the pre-step student weights,
       ``teacher <- m * teacher + (1 - m) * student``, m from the model's
       ``teacher_momentum_schedule``;
    4. the optimizer steps. With Keras' ``gradient_accumulation_steps=N`` on
       the optimizer, steps 3 and 4 happen on the last batch of every N (the
       gradients are averaged, i.e. the loss is divided by N); every batch
       draws its own partition.

    Args:
        encoder: image encoder returning pooled features [N, D] for any
            resolution (see ``keras_carp.backbones``).
        head: a ``CARPHead``; default ``CARPHead()`` (K = 65536).
        block_size: N_B (512), which must divide K.
        partition: "random" (redrawn every step) or "fixed" (made once,
            sequential: the Table 7 ablation).
        seed: key of the stateless partition RNG.
        sync_batch_norm: batch norm over the global batch in every student
            and teacher BN layer (TensorFlow strategies). None: on when the
            model is built under a strategy with more than one replica, as
            in the released code; JAX's DataParallel is global anyway.
        batch_norm_moments: "one_pass" (default): every student and teacher
            BN layer takes its batch mean and variance from one read of the
            activations (``keras_carp.batch_norm``: the ResNet-50 step takes
            8 % less time on an H200, with the same values up to float32
            rounding); "keras": Keras' two-pass statistics.
        augmentation: a ``DeviceMultiCrop``: ``fit`` may then feed whole
            uint8 images (``{"images", "image_sizes"}`` or an image tensor,
            optionally with labels) and the train step makes their views on
            the accelerator, keyed by (augmentation seed, step, image).
            Batches of ready crops are still accepted.
        teacher_momentum_schedule: a ``TeacherMomentumSchedule`` (default
            ``TeacherMomentumSchedule()``: 0.99 to 1 over the run). Without
            ``total_steps``, every ``fit`` call resolves the length to its
            ``epochs * steps_per_epoch`` (``resolve_teacher_momentum``); the
            resolved schedule is what ``get_config`` saves, so a model loaded
            from a ``.keras`` file resumes on it. Settable as
            ``model.teacher_momentum_schedule``, or by a ``fit`` callback
            (``keras_carp.callbacks.TeacherEMA``); either way the EMA update
            runs in the train step (step 3 above).

    Feed ``fit`` batches of ``(crop_0, crop_1, *local_crops)``, optionally as
    ``((crops...), labels)``, or whole images with ``augmentation``; labels
    never reach the loss. ``model(images)``
    returns the teacher's features.
    """

    def __init__(
        self,
        encoder: keras.Model,
        head: CARPHead | None = None,
        block_size: int = 512,
        partition: str = "random",
        seed: int = 0,
        sync_batch_norm: bool | None = None,
        batch_norm_moments: str = "one_pass",
        teacher_momentum_schedule: TeacherMomentumSchedule | None = None,
        augmentation: DeviceMultiCrop | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        head = head if head is not None else CARPHead()
        check_partition(head.num_prototypes, block_size)
        if partition not in PARTITIONS:
            raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}.")
        if batch_norm_moments not in MOMENTS:
            raise ValueError(f"batch_norm_moments must be one of {MOMENTS}, got {batch_norm_moments!r}.")
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}.")
        if augmentation is not None and not isinstance(augmentation, DeviceMultiCrop):
            raise TypeError(f"augmentation must be a DeviceMultiCrop, got {augmentation!r}.")
        self.augmentation = augmentation
        self.block_size = int(block_size)
        self.partition = partition
        self.seed = seed
        self.num_prototypes = head.num_prototypes
        self.carp_loss = CARPLoss(self.block_size)

        feature_dim = encoder.output_shape[-1]
        self.student_encoder = encoder
        self.student_head = head
        if not head.built:
            head.build((None, feature_dim))
        self.teacher_encoder = keras.models.clone_model(encoder)
        self.teacher_head = CARPHead.from_config(head.get_config())
        self.teacher_head.build((None, feature_dim))
        student_weights = encoder.weights + head.weights
        teacher_weights = self.teacher_encoder.weights + self.teacher_head.weights
        if [w.shape for w in student_weights] != [w.shape for w in teacher_weights]:
            raise ValueError("The teacher copy of the encoder does not mirror the student's weights.")
        for teacher_weight, student_weight in zip(teacher_weights, student_weights):
            teacher_weight.assign(ops.copy(student_weight))  # own buffer (JAX donates state)
        _freeze_keeping_batch_statistics(self.teacher_encoder)
        _freeze_keeping_batch_statistics(self.teacher_head)
        if sync_batch_norm is None:
            sync_batch_norm = backends.num_replicas() > 1
        self.sync_batch_norm = bool(sync_batch_norm)
        # Only TensorFlow strategies need it (JAX DataParallel and one device are global already).
        self._set_batch_norm_synchronized(self.sync_batch_norm and keras.backend.backend() == "tensorflow")
        self.batch_norm_moments = batch_norm_moments
        use_one_pass_moments(self._batch_norm_layers(), enabled=batch_norm_moments == "one_pass")
        # (student, teacher) pairs averaged by the EMA: trainable weights only. Set past Keras' attribute
        # tracking: tracked, these variables would count as the model's own a second time (and be saved twice).
        pairs = [(s, t) for s, t in zip(student_weights, teacher_weights) if s.trainable]
        keras_internals.set_untracked_attribute(self, "ema_pairs", pairs)

        self.trackers = [keras.metrics.Mean(name=name) for name in TRACKED]
        self._resolved_teacher_momentum_schedule = None  # what the compiled train step uses (set by the setter)
        self.teacher_momentum_schedule = (
            TeacherMomentumSchedule() if teacher_momentum_schedule is None else teacher_momentum_schedule
        )
        self.built = True

    def _batch_norm_layers(self) -> list:
        networks = (self.student_encoder, self.student_head, self.teacher_encoder, self.teacher_head)
        return [layer for network in networks for layer in batch_norm_layers(network)]

    def _set_batch_norm_synchronized(self, synchronized: bool) -> list:
        """Set every BN layer's ``synchronized``; returns the previous values."""
        layers = self._batch_norm_layers()
        previous = [layer.synchronized for layer in layers]
        for layer in layers:
            keras_internals.set_synchronized(layer, synchronized)
        return previous

    # ----------------------------------------------------------------- method
    def partition_permutation(self, step):
        """The step's prototype order: random from (seed, step), or fixed and sequential."""
        if self.partition == "fixed":
            return sequential_permutation(self.num_prototypes)
        return random_permutation(self.num_prototypes, self.seed, step)

    def views_of(self, data, step) -> list:
        """The crops of a batch: made here from whole images (``augmentation``), or the batch's own."""
        images = image_batch(data) if self.augmentation is not None else None
        if images is None:
            return views_from_data(data)
        images, image_sizes = images
        first_index = backends.replica_index() * ops.shape(images)[0]
        return self.augmentation(images, step, image_sizes=image_sizes, first_index=first_index)

    def compute_carp_losses(self, data, step, training: bool = True, global_sum=None) -> dict:
        """Forward both networks on a batch of crops and return the loss terms.

        Returns float32 scalars ``loss``, ``consistency``, ``entropy`` and
        ``prototypes_used`` (distinct prototypes that are the teacher's argmax
        for some image: a collapse indicator).
        """
        views = self.views_of(data, step)
        permutation = self.partition_permutation(step)
        # The backbone runs once per resolution group; the head once on every crop's features together, so
        # its batch norm normalises all crops of the batch with one set of statistics (as released).
        crop_features: list = [None] * len(views)
        for indices in _resolution_groups(views):
            batch = ops.concatenate([views[i] for i in indices], axis=0)
            features = self.student_encoder(batch, training=training)
            for index, chunk in zip(indices, ops.split(features, len(indices), axis=0)):
                crop_features[index] = chunk
        # Logits in partition order (the head permutes its prototype rows): CARPLoss takes them as they are.
        logits = self.student_head(ops.concatenate(crop_features, axis=0), training=training, permutation=permutation)
        student_logits = ops.split(logits, len(views), axis=0)
        teacher_batch = ops.concatenate(views[:2], axis=0)
        teacher_features = self.teacher_encoder(teacher_batch, training=training)
        teacher_logits = ops.stop_gradient(
            self.teacher_head(teacher_features, training=training, permutation=permutation)
        )
        logs = self.carp_loss(student_logits, ops.split(teacher_logits, 2, axis=0), global_sum=global_sum)
        assignments = ops.one_hot(ops.argmax(teacher_logits, axis=-1), self.num_prototypes, dtype="float32")
        counts = ops.sum(assignments, axis=0)
        if global_sum is not None:
            counts = global_sum(counts)
        logs["prototypes_used"] = ops.sum(ops.cast(counts > 0, "float32"))
        return logs

    # -------------------------------------------------------- training glue
    @property
    def teacher_momentum_schedule(self) -> TeacherMomentumSchedule:
        """The teacher momentum schedule as given (``total_steps`` may be None: resolved by each ``fit``)."""
        return self._teacher_momentum_schedule

    @teacher_momentum_schedule.setter
    def teacher_momentum_schedule(self, schedule: TeacherMomentumSchedule) -> None:
        if not isinstance(schedule, TeacherMomentumSchedule):
            raise TypeError(f"teacher_momentum_schedule must be a TeacherMomentumSchedule, got {schedule!r}.")
        self._teacher_momentum_schedule = schedule
        self._use_teacher_momentum_schedule(schedule)

    @property
    def resolved_teacher_momentum_schedule(self) -> TeacherMomentumSchedule:
        """The schedule the train step applies: the given one, with the last ``fit``'s length when it had none."""
        return self._resolved_teacher_momentum_schedule

    def resolve_teacher_momentum(self, epochs: int | None, steps_per_epoch: int | None) -> TeacherMomentumSchedule:
        """Fix the schedule's length for a ``fit`` of ``epochs * steps_per_epoch`` batches, unless it has one.

        Called at the start of every ``fit``, before any other callback.
        Raises ValueError when the schedule needs a length the data cannot give.
        """
        schedule = self._teacher_momentum_schedule
        if schedule.total_steps is None:
            if epochs and steps_per_epoch:
                schedule = schedule.with_total_steps(int(epochs) * int(steps_per_epoch))
            elif not schedule.is_constant:
                raise ValueError(
                    "CARP cannot tell the run's length for the teacher momentum schedule (the dataset has no known "
                    "size); pass fit(steps_per_epoch=...) or TeacherMomentumSchedule(total_steps=...)."
                )
        self._use_teacher_momentum_schedule(schedule)
        return schedule

    def _use_teacher_momentum_schedule(self, schedule: TeacherMomentumSchedule) -> None:
        """Make the train step apply ``schedule`` (a Python constant of the compiled step: retrace on change)."""
        if schedule != self._resolved_teacher_momentum_schedule:
            self._resolved_teacher_momentum_schedule = schedule
            if getattr(self, "train_function", None) is not None:
                self.make_train_function(force=True)

    def teacher_momentum(self, step):
        """The teacher momentum m at batch ``step``, from the resolved schedule."""
        return self._resolved_teacher_momentum_schedule(step)

    def applied_teacher_momentum(self, step, momentum):
        """The m the teacher update applies at batch ``step``: ``momentum``, or 1 (no update) on the batches
        that only accumulate gradients (the teacher moves with the optimizer step, on a group's last batch)."""
        steps = accumulation_steps(self.optimizer)
        if steps == 1:
            return momentum
        return ops.where(ops.equal((ops.cast(step, "int32") + 1) % steps, 0), momentum, ops.ones_like(momentum))

    def current_learning_rate(self, step):
        """The learning rate applied at ``step`` (for the logs)."""
        rate = keras_internals.learning_rate_schedule(base_optimizer(self.optimizer))
        if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
            return ops.cast(rate(step), "float32")
        return ops.cast(ops.convert_to_tensor(rate), "float32")

    @property
    def metrics(self):
        return list(self.trackers)

    def train_step(self, *args):
        return backends.train_step(self, *args)

    def compile(self, optimizer="adam", jit_compile="auto", **kwargs):
        """``keras.Model.compile``; "auto": XLA on JAX, and on TensorFlow on one GPU or TPU (``xla_by_default``)."""
        requested_jit_compile = jit_compile
        if jit_compile == "auto":
            jit_compile = backends.xla_by_default()
        super().compile(optimizer=optimizer, jit_compile=jit_compile, **kwargs)
        self._requested_jit_compile = requested_jit_compile

    def get_compile_config(self) -> dict | None:
        """``compile``'s arguments for the ``.keras`` file; "auto" stays "auto" so another backend can load it."""
        config = super().get_compile_config()
        if config:  # {} when the model was never compiled
            config["jit_compile"] = getattr(self, "_requested_jit_compile", config.get("jit_compile", "auto"))
        return config

    def compile_from_config(self, config: dict) -> None:
        """Recompile from a ``.keras`` file and create the optimizer's variables so its saved state loads."""
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        self.optimizer.build(self.trainable_variables)

    def fit(self, *args, callbacks=None, **kwargs):
        """``keras.Model.fit`` on the model's teacher momentum schedule, its length resolved for this call.

        A callback with a ``teacher_momentum_schedule`` attribute (a
        ``TeacherMomentumSchedule``), i.e. ``keras_carp.callbacks.TeacherEMA``,
        first makes that schedule the model's. The model reads the attribute
        and imports no callback: callbacks are built on the model, not the
        other way round.
        """
        callbacks = list(callbacks or [])
        given = [
            schedule
            for schedule in (getattr(callback, "teacher_momentum_schedule", None) for callback in callbacks)
            if isinstance(schedule, TeacherMomentumSchedule)
        ]
        if len(given) > 1:
            raise ValueError(f"fit got {len(given)} callbacks that set the teacher momentum schedule: {given}.")
        if given:
            self.teacher_momentum_schedule = given[0]
        # First, so that every other callback's on_train_begin sees the resolved schedule.
        callbacks.insert(0, _TeacherMomentumRunLength())
        if keras.backend.backend() == "tensorflow":  # no sample batch reduced across workers when built
            keras_internals.skip_symbolic_build_once_built(self)
        return super().fit(*args, callbacks=callbacks, **kwargs)

    def call(self, images, training=False):
        """Pooled features of the teacher encoder (the one exported and evaluated)."""
        return self.teacher_encoder(images, training=training)

    def get_config(self) -> dict:
        # Layer configs are saved without `synchronized` (Keras refuses it off TensorFlow): the model's own
        # sync_batch_norm flag restores it, so a file written under a strategy loads on every backend.
        previous = self._set_batch_norm_synchronized(False)
        try:
            encoder = keras.saving.serialize_keras_object(self.student_encoder)
            head = keras.saving.serialize_keras_object(self.student_head)
        finally:
            for layer, value in zip(self._batch_norm_layers(), previous):
                layer.synchronized = value
        return {
            "name": self.name,
            "encoder": encoder,
            "head": head,
            "block_size": self.block_size,
            "partition": self.partition,
            "seed": self.seed,
            "sync_batch_norm": self.sync_batch_norm,
            "batch_norm_moments": self.batch_norm_moments,
            # The momentum schedule of the run in progress (total_steps resolved), so a loaded model resumes on it.
            "teacher_momentum_schedule": keras.saving.serialize_keras_object(self._resolved_teacher_momentum_schedule),
            "augmentation": keras.saving.serialize_keras_object(self.augmentation),
        }

    @classmethod
    def from_config(cls, config: dict) -> CARP:
        config = dict(config)
        config["encoder"] = keras.saving.deserialize_keras_object(config["encoder"])
        config["head"] = keras.saving.deserialize_keras_object(config["head"])
        schedule = config.pop("teacher_momentum_schedule", None)
        if schedule is not None:
            schedule = keras.saving.deserialize_keras_object(schedule)
        if config.get("augmentation") is not None:
            config["augmentation"] = keras.saving.deserialize_keras_object(config["augmentation"])
        return cls(**config, teacher_momentum_schedule=schedule)


class _TeacherMomentumRunLength(keras.callbacks.Callback):
    """Added first by ``CARP.fit``: resolves the model's momentum schedule length to this fit's epochs * steps.

    Keras knows the number of steps only once ``fit`` has looked at the data,
    so the length is filled in at ``on_train_begin`` (``CARP.resolve_teacher_momentum``).
    """

    def on_train_begin(self, logs=None):
        self.model.resolve_teacher_momentum(self.params.get("epochs"), self.params.get("steps"))
