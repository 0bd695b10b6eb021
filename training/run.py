"""A pretraining run in named stages: source, views, distribution, model, resume, monitors, fit, evaluate, save.

``run(config)`` reads top to bottom as the run happens. Everything that can be
refused (bad configuration, missing or corrupt data, an unwritable or full
disk, a run directory holding another run) is refused before the first step,
and a refused run leaves no directory behind. Rerunning the same command after
a crash or ``kill -9`` resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from training.config import PretrainConfig, run_config
from training.run_directory import RunDirectory

LOG = logging.getLogger("keras_carp")


class RunRefused(SystemExit):
    """The run cannot start (or go on) as configured; the message says why and what to do.

    A ``SystemExit``: the command line prints the message and exits with status 1. ``after_progress_bar``
    starts it on a new line (a stop during ``fit``).
    """

    def __init__(self, message: str, after_progress_bar: bool = False):
        super().__init__(("\n" if after_progress_bar else "") + f"carp-pretrain: {message}")


@dataclasses.dataclass
class Data:
    """The training source, the labelled evaluation source (or None) and the step arithmetic of the run."""

    train: Any
    evaluation: Any
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


@dataclasses.dataclass
class Legs:
    """The ``fit`` calls of a run: an interrupted epoch is finished on its own, then the remaining epochs."""

    start_step: int
    calls: list[tuple[int, int, int]]  # (initial_epoch, end_epoch, steps_per_epoch)


# ----------------------------------------------------------------------------------------------------- stages
def check_same_run(run_dir: RunDirectory, config: PretrainConfig) -> None:
    """Refuse to resume a run directory whose checkpoints were trained with other settings."""
    try:
        saved = run_config(run_dir.read_json("config.json")).training_fields()
    except ValueError as error:
        raise RunRefused(f"{run_dir}: {error}") from None
    current = config.training_fields()
    changed = sorted(key for key in saved if key in current and _same(saved[key]) != _same(current[key]))
    if changed:
        details = ", ".join(f"{key}: {saved[key]!r} -> {current[key]!r}" for key in changed)
        raise RunRefused(
            f"{run_dir} holds checkpoints of a run with a different configuration ({details}). "
            "Rerun with the same settings to resume it, or choose a new --output-dir."
        )


def _same(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def resolve_augment(config: PretrainConfig, tensorflow: bool | None = None) -> str:
    """``--augment``, with ``auto`` resolved: on the device on GPUs and where TensorFlow is absent, else on the host.

    On a CPU the host's tf.data recipe is faster than the same work inside the
    step (``python -m bench.fit_pipeline``); a GPU computes the views far faster
    than the CPU cores beside it can (about 48 images/s per core on the host).
    """
    from keras_carp.distribute import accelerator_kind

    tensorflow = tensorflow_available() if tensorflow is None else tensorflow
    augment = config.data.augment
    if augment == "host" and not tensorflow:
        raise RunRefused("--augment host makes the views with tf.data, and TensorFlow is not installed: "
                         "use --augment device (or install tensorflow).")  # fmt: skip
    if augment != "auto":
        return augment
    return "device" if not tensorflow or accelerator_kind() == "gpu" else "host"


def tensorflow_available() -> bool:
    from keras_carp.file_io import tensorflow_installed

    return tensorflow_installed()


def build_views(config: PretrainConfig, augment: str):
    """The multi-crop recipe, made on the host (tf.data ``MultiCropAugmentation``) or in the train step."""
    settings = dataclasses.asdict(config.views)
    if augment == "device":
        from keras_carp import DeviceMultiCrop

        return DeviceMultiCrop(**settings, seed=config.run.seed)
    from keras_carp.data import MultiCropAugmentation

    return MultiCropAugmentation(**settings)


def device_image_size(config: PretrainConfig, source) -> int | None:
    """The square images are stretched to for on-device views: ``--device-image-size``, else none for sources of
    one image size (arrays, CIFAR-10), else 10/7 of the global crop."""
    if config.data.device_image_size:
        return config.data.device_image_size
    return None if source.image_shape is not None else round(config.views.global_size * 10 / 7)


def load_data(config: PretrainConfig) -> Data:
    """Open the sources and check them against the recipe; every data problem surfaces here."""
    from keras_carp.data.sources import load_source, steps_per_epoch

    def source(split: str):
        data = config.data
        return load_source(
            data.dataset, split, data.data_dir, data.image_size, download=data.download, seed=config.run.seed
        )

    try:
        train = source(config.data.split)
        evaluation = source(config.data.eval_split) if config.data.eval_split and train.has_labels else None
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        raise RunRefused(str(error)) from None
    except ImportError as error:  # a TFDS dataset on a machine without TensorFlow
        raise RunRefused(
            f"--dataset {config.data.dataset} needs {error.name or 'TensorFlow'}, which is not "
            "installed; use digits, fashion_mnist or folder, or install tensorflow."
        ) from None
    epoch_steps = steps_per_epoch(train.num_examples, config.optimizer.batch_size)
    total_steps = epoch_steps * config.optimizer.epochs
    return Data(train, evaluation, epoch_steps, total_steps, warmup_steps(config, epoch_steps, total_steps))


def warmup_steps(config: PretrainConfig, epoch_steps: int, total_steps: int) -> int:
    """The warm-up in steps (shorter than the run, which the schedule requires)."""
    return min(round(config.optimizer.warmup_epochs * epoch_steps), total_steps - 1)


def setup_devices(config: PretrainConfig):
    """The devices the run uses (``keras_carp.distribute``) and the compute dtype policy they call for."""
    import keras

    from keras_carp import distribute

    try:
        run = config.run
        distribution = distribute.setup_distribution(run.strategy, run.tpu, run.coordinator_address,
                                                     run.num_processes, run.process_id)  # fmt: skip
        distribute.check_global_batch(config.optimizer.batch_size, distribution.replicas)
    except ValueError as error:
        raise RunRefused(str(error)) from None
    keras.config.set_dtype_policy(compute_dtype_policy(config, distribution))
    return distribution


def compute_dtype_policy(config: PretrainConfig, distribution) -> str:
    """``--precision``, or for ``auto`` the devices' choice (bfloat16 on TPUs) else float32.

    Under ``mixed_float16`` Keras' ``compile`` wraps the optimizer in a
    ``LossScaleOptimizer`` (dynamic loss scaling); the train step scales the
    loss through ``optimizer.scale_loss`` on every backend.
    """
    if config.run.precision != "auto":
        return config.run.precision
    return distribution.dtype_policy or "float32"


def build_model(config: PretrainConfig, data: Data, distribution, augmentation=None):
    """The compiled CARP model with its optimizer and schedules, built on every replica.

    ``augmentation``: the ``DeviceMultiCrop`` when the train step makes the views (``InputPlan.device_augmentation``),
    else None.
    """
    import keras_carp

    model_config, optimizer_config, teacher = config.model, config.optimizer, config.teacher
    accumulation = optimizer_config.gradient_accumulation_steps
    with distribution.scope():
        try:  # invalid hyperparameters stop here, before any feature extraction or training
            head = keras_carp.CARPHead(
                num_prototypes=model_config.num_prototypes,
                hidden_dim=model_config.hidden_dim,
                bottleneck_dim=model_config.bottleneck_dim,
                num_layers=model_config.head_layers,
            )
            model = keras_carp.CARP(
                keras_carp.build_encoder(
                    model_config.backbone, init=model_config.encoder_init, token_pooling=model_config.token_pooling
                ),
                head,
                block_size=model_config.block_size,
                partition=model_config.partition,
                seed=config.run.seed,
                batch_norm_moments=model_config.batch_norm_moments,
                teacher_momentum_schedule=keras_carp.TeacherMomentumSchedule(
                    teacher.base_teacher_momentum, teacher.final_teacher_momentum, total_steps=data.total_steps
                ),
                augmentation=augmentation,
            )
            # Schedules run per batch, as released; the rate scales with the batch of one optimizer step.
            schedule = keras_carp.WarmupCosineDecay(
                base_learning_rate=optimizer_config.base_learning_rate,
                global_batch_size=optimizer_config.batch_size * accumulation,
                total_steps=data.total_steps,
                warmup_steps=data.warmup_steps,
                min_learning_rate=optimizer_config.min_learning_rate,
            )
            model.compile(optimizer=build_optimizer(optimizer_config, schedule, model, data))
            model.optimizer.build(model.trainable_variables)  # built: fit needs no sample batch to build it
        except ValueError as error:
            raise RunRefused(str(error)) from None
    return model


def build_optimizer(optimizer_config, schedule, model, data: Data):
    """LARS (the paper's ResNets) or ``ScheduledAdamW`` (DINO's ViT recipe), with gradient clipping if asked."""
    import keras

    import keras_carp

    accumulation = optimizer_config.gradient_accumulation_steps
    clipping = {"clipnorm": optimizer_config.clip_norm} if optimizer_config.clip_norm > 0 else {}
    if optimizer_config.optimizer == "lars":
        if optimizer_config.freeze_prototypes_epochs > 0:
            raise ValueError("freeze_prototypes_epochs needs --optimizer adamw (LARS has no frozen start).")
        return keras_carp.LARS(
            schedule,
            momentum=optimizer_config.lars_momentum,
            weight_decay=optimizer_config.weight_decay,
            eta=optimizer_config.lars_eta,
            gradient_accumulation_steps=accumulation,
            **clipping,
        )
    decay = optimizer_config.weight_decay
    if optimizer_config.weight_decay_end is not None and decay > 0:  # a cosine from start to end, per batch
        decay = keras.optimizers.schedules.CosineDecay(
            decay, decay_steps=data.total_steps, alpha=optimizer_config.weight_decay_end / decay
        )
    frozen_steps = round(optimizer_config.freeze_prototypes_epochs * data.steps_per_epoch) // accumulation
    return keras_carp.optimizers.ScheduledAdamW(
        schedule,
        weight_decay=decay,
        frozen_paths=[model.student_head.prototypes.path] if frozen_steps else [],
        frozen_steps=frozen_steps,
        gradient_accumulation_steps=accumulation,
        **clipping,
    )


def check_disk_space(model, run_dir: RunDirectory, config: PretrainConfig) -> None:
    """Checkpoints, the final model and the SavedModel (about one encoder) must fit before the first step."""
    from keras_carp.checkpoints import check_free_space, checkpoint_bytes

    try:
        encoder_bytes = checkpoint_bytes(model.teacher_encoder) // 2
        check_free_space(run_dir.output(), (config.run.keep_checkpoints + 2) * checkpoint_bytes(model) + encoder_bytes)
    except OSError as error:
        raise RunRefused(str(error)) from None


def restore(model, checkpoint, run_dir: RunDirectory, data: Data, distribution) -> int:
    """Load the newest checkpoint (if any) into the model; returns the step training goes on from."""
    if checkpoint is None:
        return 0
    import keras

    from keras_carp.optimizers import batch_counter

    with distribution.scope():
        model.optimizer.build(model.trainable_variables)
        model.load_weights(checkpoint.path)
    start_step = int(keras.ops.convert_to_numpy(batch_counter(model.optimizer)))
    if start_step != checkpoint.step:
        raise RunRefused(f"{checkpoint.path} holds step {start_step}, its record says {checkpoint.step}.")
    print(
        f"carp-pretrain: resuming from {checkpoint.path} (step {start_step} of {data.total_steps}, "
        f"epoch {checkpoint.epoch + 1}, step {checkpoint.step_in_epoch} of {data.steps_per_epoch} in it)"
    )
    run_dir.truncate_csv_log(checkpoint.epoch)
    return start_step


def plan_legs(start_step: int, data: Data, epochs: int) -> Legs:
    """The ``fit`` calls from ``start_step`` to the end."""
    first_epoch, done_in_epoch = divmod(start_step, data.steps_per_epoch)
    calls = []
    if done_in_epoch:
        calls.append((first_epoch, first_epoch + 1, data.steps_per_epoch - done_in_epoch))
        first_epoch += 1
    if first_epoch < epochs:
        calls.append((first_epoch, epochs, data.steps_per_epoch))
    return Legs(start_step, calls)


class Evaluation:
    """Weighted k-NN of an encoder: the training split as the bank, the evaluation split as queries."""

    def __init__(self, config: PretrainConfig, data: Data, plan: InputPlan):
        self.config = config.evaluation
        self.enabled = data.evaluation is not None
        self.bank = plan.eval_batches(data.train) if self.enabled else None
        self.queries = plan.eval_batches(data.evaluation) if self.enabled else None
        self.num_classes = len(data.train.class_names) if self.enabled else None
        self.probe_batches = plan.eval_batches(data.train)

    @property
    def knn_settings(self) -> dict:
        return dict(k=self.config.knn_k, temperature=self.config.knn_temperature, num_classes=self.num_classes)

    def knn(self, encoder) -> dict | None:
        from keras_carp.evaluation import knn_accuracy

        return knn_accuracy(encoder, self.bank, self.queries, **self.knn_settings) if self.enabled else None

    def random_init(self, model, run_dir: RunDirectory) -> dict | None:
        """k-NN of the encoder before the first step (measured once per run directory)."""
        name = "knn_random_init.json"
        if run_dir.exists(name):
            return run_dir.read_json(name)
        result = self.knn(model.teacher_encoder)
        run_dir.write_json(name, result)
        return result

    def monitors(self) -> list:
        """k-NN every ``knn_every`` epochs, the online linear probe (if asked), and the collapse indicators."""
        import numpy as np

        from keras_carp.callbacks import CollapseMonitor, KNNMonitor
        from keras_carp.evaluation import OnlineLinearProbe

        monitors = []
        if self.enabled and self.config.knn_every > 0:
            monitors.append(KNNMonitor(self.bank, self.queries, self.config.knn_every, **self.knn_settings))
        if self.config.online_probe_every > 0:
            if not self.enabled:
                raise RunRefused("--online-probe-every needs labels: set --eval-split to a labelled split.")
            monitors.append(OnlineLinearProbe(self.bank, self.num_classes, every_steps=self.config.online_probe_every,
                                              test_data=self.queries))  # fmt: skip
        probe = [batch for batch, _ in zip(self.probe_batches, range(2))]  # the first 2 batches
        images = np.concatenate([np.asarray(b[0] if isinstance(b, tuple) else b) for b in probe])
        return monitors + [CollapseMonitor(images)]


def build_callbacks(config: PretrainConfig, run_dir: RunDirectory, data: Data, monitors: list, checkpoint,
                    skipped=None, tensorboard: bool = True) -> list:  # fmt: skip
    """Skipped-image counts, monitors, CSV and TensorBoard logs, then checkpoints (last: a logged epoch is saved).

    ``skipped``: what counts the undecodable images (default: the source's tf.data counters). TensorBoard's
    event files are written with TensorFlow (``tensorboard``): without it, ``training_log.csv`` holds the same
    figures.
    """
    from keras_carp import callbacks

    loggers = [callbacks.RunCSVLogger(run_dir.output("training_log.csv"), append=True)]
    if tensorboard:
        frequency = config.run.log_every_steps or "epoch"
        loggers.append(callbacks.StepTensorBoard(run_dir.output("logs"), update_freq=frequency))
    return [
        callbacks.SkippedImagesLogger(skipped or data.train),
        *monitors,  # before the loggers, which record what monitors add to the epoch logs
        *loggers,
        callbacks.RunCheckpoint(
            run_dir.output("checkpoints"),
            data.steps_per_epoch,
            config.run.checkpoint_every_steps,
            config.run.keep_checkpoints,
            resume=checkpoint,
        ),
    ]


def fit(model, dataset_for, legs: Legs, data: Data, callbacks: list, distribution=None,
        run_dir: RunDirectory | None = None) -> list[float]:  # fmt: skip
    """Train every leg; returns the epoch losses.

    A non-finite loss stops with the step it happened at; in a job of several processes, a process that is
    gone stops the others with the checkpoint that every process resumes from.
    """
    from keras_carp.checkpoints import NonFiniteLossError
    from keras_carp.distribute import lost_a_peer

    losses = []
    try:
        for initial_epoch, end_epoch, steps in legs.calls:
            leg_start = initial_epoch * data.steps_per_epoch + (data.steps_per_epoch - steps)
            history = model.fit(
                dataset_for(leg_start),
                initial_epoch=initial_epoch,
                epochs=end_epoch,
                steps_per_epoch=steps,
                callbacks=callbacks,
                shuffle=False,
            )
            losses += history.history["loss"]
    except NonFiniteLossError as error:
        raise RunRefused(
            f"{error} Lower --base-learning-rate or check the data, then rerun the same command to continue from "
            "that checkpoint.",
            after_progress_bar=True,
        ) from None
    except OSError as error:  # e.g. the disk filled up while writing a checkpoint
        raise RunRefused(str(error)) from None
    except Exception as error:
        if distribution is None or distribution.num_processes == 1 or not lost_a_peer(error):
            raise
        last = callbacks[-1].last_saved if callbacks and hasattr(callbacks[-1], "last_saved") else None
        if last and run_dir is not None:  # the shared copy (a worker's own checkpoints were scratch)
            last = run_dir.join("checkpoints", last.replace("\\", "/").rsplit("/", 1)[-1])
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        cause = next((line for line in lines if "aborted" in line.lower() or "peer" in line.lower()),
                     lines[0] if lines else "")  # fmt: skip
        raise RunRefused(
            f"process {distribution.process_index} of {distribution.num_processes}: another process of this job "
            f"stopped, so the job cannot go on ({type(error).__name__}: {cause[:200]}). Rerun the same command on "
            f"every host: all resume from the last complete checkpoint ({last or 'none yet: from the start'}).",
            after_progress_bar=True,
        ) from None
    return losses


class LoaderSkips:
    """The undecodable images the Pillow loaders of a run's ``fit`` calls skipped, for ``SkippedImagesLogger``."""

    def __init__(self, source):
        self.name = source.name
        self.loaders: list = []

    @property
    def skipped(self) -> LoaderSkips:
        return self

    @property
    def count(self) -> int:
        return sum(loader.skipped for loader in self.loaders)


@dataclasses.dataclass
class InputPlan:
    """Where a run's views are made and how its images get there: decided once, from the config and this machine.

    ``views`` is ``"host"`` (tf.data makes the crops) or ``"device"`` (the train step crops whole images);
    ``tensorflow`` says whether TensorFlow is installed. Without it the Pillow loaders read the images
    (``ImageBatches``, ``EvalBatches``) and there are no TensorBoard logs or SavedModel.
    """

    config: PretrainConfig
    views: str
    tensorflow: bool
    augmentation: Any  # the recipe: MultiCropAugmentation (host) or DeviceMultiCrop (device)

    @classmethod
    def decide(cls, config: PretrainConfig, tensorflow: bool | None = None) -> InputPlan:
        """The plan for ``config`` here (``tensorflow``: whether it is installed; default: look)."""
        tensorflow = tensorflow_available() if tensorflow is None else tensorflow
        views = resolve_augment(config, tensorflow)
        return cls(config, views, tensorflow, build_views(config, views))

    @property
    def on_device(self) -> bool:
        return self.views == "device"

    @property
    def loader(self) -> str:
        """What reads the images: ``"tf.data"``, or ``"pillow"`` where TensorFlow is not installed."""
        return "tf.data" if self.tensorflow else "pillow"

    @property
    def device_augmentation(self):
        """The ``DeviceMultiCrop`` the train step applies, or None when the host makes the views."""
        return self.augmentation if self.on_device else None

    def min_image_size(self, source) -> int:
        """``--min-image-size`` (0: accept and upsample small images); unset, the global crop size, except 0 for
        in-memory images cropped on the device."""
        if self.config.data.min_image_size is not None:
            return self.config.data.min_image_size
        return 0 if self.on_device and not source.encoded else self.config.views.global_size

    def training_datasets(self, data: Data, distribution):
        """The training input: ``(pipeline, dataset_for, skipped)``.

        ``pipeline(start_step, input_context=None)`` checks the image sizes and builds one pipeline from
        ``start_step`` to the end of the run; ``dataset_for(start_step)`` the (distributed) dataset ``fit`` reads;
        ``skipped`` counts the undecodable images. Host views: tf.data batches of crops. Device views: batches
        of whole uint8 images (and their original sizes), from tf.data, or from ``ImageBatches`` where
        TensorFlow is not installed.
        """
        source, config = data.train, self.config
        min_image_size = self.min_image_size(source)
        image_size = device_image_size(config, source) if self.on_device else None
        if self.loader == "pillow":
            if distribution.num_processes > 1:
                raise RunRefused("several JAX processes read their shares of the data with tf.data: install "
                                 "tensorflow.")  # fmt: skip
            return self._pillow_datasets(source, image_size, min_image_size)
        from keras_carp.data import multicrop_dataset
        from keras_carp.data.pipeline import WholeImages

        host_work = WholeImages(image_size) if self.on_device else self.augmentation

        def pipeline(start_step: int, input_context=None):  # multicrop_dataset checks the image sizes
            return multicrop_dataset(
                source,
                host_work,
                config.optimizer.batch_size,  # global; with an input context each host makes its replicas' share
                seed=config.run.seed,
                cache=config.data.cache,
                decode=config.data.decode,
                min_image_size=min_image_size,
                input_context=input_context,
                epochs=config.optimizer.epochs,
                start_step=start_step,
            )

        def dataset_for(start_step: int):
            if distribution.per_host_input and distribution.strategy is None:  # JAX processes: each its own shard
                import tensorflow as tf

                processes = distribution.num_processes
                return pipeline(start_step, tf.distribute.InputContext(processes, distribution.process_index,
                                                                       processes))  # fmt: skip
            if distribution.per_host_input:  # TPU and multi-worker: every host reads its own shard
                return distribution.strategy.distribute_datasets_from_function(lambda ctx: pipeline(start_step, ctx))
            return pipeline(start_step)

        return pipeline, dataset_for, source

    def _pillow_datasets(self, source, image_size: int | None, min_image_size: int):
        """``ImageBatches``: folders decoded by one thread per core (Pillow releases the GIL; processes would be
        forks of a multithreaded JAX or PyTorch runtime), arrays as they are."""
        import os

        from keras_carp.data import ImageBatches
        from keras_carp.data.sources import check_image_size

        config = self.config
        if image_size is None:  # images of one size: ImageBatches stretches them to squares of their longer side
            image_size = max(source.image_shape)
        skips = LoaderSkips(source)
        workers = min(os.cpu_count() or 1, 16) if source.encoded else 1

        def pipeline(start_step: int, input_context=None):
            check_image_size(source, min_image_size)
            loader = ImageBatches(source, config.optimizer.batch_size, image_size=image_size,
                                  seed=config.run.seed, epochs=config.optimizer.epochs, start_step=start_step,
                                  workers=workers)  # fmt: skip
            skips.loaders.append(loader)
            return loader

        return pipeline, pipeline, skips

    def eval_batches(self, source, batch_size: int = 256):
        """Normalised centre crops of ``source`` in a fixed order (``eval_dataset``, or ``EvalBatches``)."""
        size, crop = self.config.views.global_size, self.config.evaluation.eval_crop_fraction
        if self.loader == "tf.data":
            from keras_carp.data import eval_dataset

            return eval_dataset(source, size, batch_size=batch_size, crop_fraction=crop)
        from keras_carp.data import EvalBatches

        return EvalBatches(source, size, batch_size=batch_size, crop_fraction=crop)


@dataclasses.dataclass
class Prepared:
    """Everything a run has checked and built before its first step."""

    config: PretrainConfig
    run_dir: RunDirectory
    checkpoint: Any  # the newest complete checkpoint, or None
    data: Data
    distribution: Any
    model: Any
    datasets: Any  # start step -> the (distributed) dataset of the rest of the run
    skipped: Any  # counts the undecodable images skipped (``.skipped.count``, ``.name``)
    plan: InputPlan


def report_devices(config: PretrainConfig, data: Data, distribution, augment: str = "host") -> None:
    """One line on the devices, the batch and where the views are made; a warning if accumulation groups do not
    divide the run."""
    accumulation = config.optimizer.gradient_accumulation_steps
    accumulated = f" x {accumulation} accumulated per optimizer step" if accumulation > 1 else ""
    print(
        f"carp-pretrain: {distribution.description}, global batch {config.optimizer.batch_size}{accumulated}, "
        f"views made on the {augment}"
    )
    if data.total_steps % accumulation:  # groups run across epoch boundaries; a last incomplete one is dropped
        LOG.warning(
            "%d batches is not a multiple of --gradient-accumulation-steps %d: the last %d batches' "
            "gradients are not applied.",
            data.total_steps,
            accumulation,
            data.total_steps % accumulation,
        )


def prepare(config: PretrainConfig, run_dir: RunDirectory, distribution) -> Prepared:
    """Check and build everything before the first step: a refusal here costs no training."""
    import keras

    from keras_carp.checkpoints import latest_checkpoint

    checkpoint = latest_checkpoint(run_dir.join("checkpoints"))
    if checkpoint is not None and run_dir.exists("config.json"):
        check_same_run(run_dir, config)
    keras.utils.set_random_seed(config.run.seed)
    data = load_data(config)
    if checkpoint is not None and checkpoint.steps_per_epoch != data.steps_per_epoch:
        raise RunRefused(
            f"{checkpoint.path} was written with {checkpoint.steps_per_epoch} steps per epoch, this "
            f"dataset gives {data.steps_per_epoch}; the data changed. Choose a new --output-dir."
        )
    plan = InputPlan.decide(config)
    report_devices(config, data, distribution, plan.views)
    first_start = checkpoint.step if checkpoint is not None and checkpoint.step < data.total_steps else 0
    try:  # builds the input pipeline: checks the images against the recipe before any training
        pipeline, dataset_for, skipped = plan.training_datasets(data, distribution)
        first_dataset = pipeline(first_start)
    except (ValueError, FileNotFoundError) as error:
        raise RunRefused(str(error)) from None
    model = build_model(config, data, distribution, plan.device_augmentation)
    check_disk_space(model, run_dir, config)
    run_dir.write_json("config.json", config.to_dict())

    def datasets(start: int):
        return first_dataset if start == first_start and not distribution.per_host_input else dataset_for(start)

    return Prepared(config, run_dir, checkpoint, data, distribution, model, datasets, skipped, plan)


def train_evaluate_save(prepared: Prepared) -> dict:
    """Train from the newest checkpoint to the end, score the teacher, save the model and the encoder."""
    from keras_carp.callbacks import KNNMonitor
    from keras_carp.checkpoints import atomic_save_model

    config, run_dir, data, model = prepared.config, prepared.run_dir, prepared.data, prepared.model
    evaluation = Evaluation(config, data, prepared.plan)
    random_init = evaluation.random_init(model, run_dir)
    start_step = restore(model, prepared.checkpoint, run_dir, data, prepared.distribution)
    legs = plan_legs(start_step, data, config.optimizer.epochs)
    monitors = evaluation.monitors()
    callbacks = build_callbacks(config, run_dir, data, monitors, prepared.checkpoint, prepared.skipped,
                                tensorboard=prepared.plan.tensorflow)  # fmt: skip
    started = time.time()
    losses = fit(model, prepared.datasets, legs, data, callbacks, prepared.distribution, run_dir)
    seconds = time.time() - started
    knn_monitors = [m for m in monitors if isinstance(m, KNNMonitor)]
    learned = knn_monitors[0].history.get(config.optimizer.epochs) if knn_monitors else None
    learned = learned or evaluation.knn(model.teacher_encoder)
    atomic_save_model(model, run_dir.output("model.keras"))
    encoder_path = None
    if config.run.export and prepared.plan.tensorflow:
        encoder_path = run_dir.export_encoder(model)
    elif config.run.export:
        LOG.warning("TensorFlow is not installed: no SavedModel encoder/ (model.keras holds the model; run "
                    "carp-export on a machine with TensorFlow to write one).")  # fmt: skip
    summary = summarize(prepared, legs, seconds, losses, learned, random_init, evaluation, encoder_path)
    run_dir.write_json("summary.json", summary)
    return summary


def summarize(
    prepared: Prepared,
    legs: Legs,
    seconds: float,
    losses: list,
    learned: dict | None,
    random_init: dict | None,
    evaluation: Evaluation,
    encoder_path: str | None,
) -> dict:
    """The figures of the run (``summary.json``)."""
    import keras

    config, data = prepared.config, prepared.data
    summary = {
        "preset": config.preset,
        "dataset": data.train.name,
        "backend": keras.backend.backend(),
        "distribution": prepared.distribution.description,
        "processes": prepared.distribution.num_processes,
        "process_index": prepared.distribution.process_index,  # of the process that wrote this file
        "precision": prepared.model.dtype_policy.name,
        "augment": prepared.plan.views,
        "train_images": data.train.num_examples,
        "skipped_images": prepared.skipped.skipped.count,
        "steps": data.total_steps,
        "gradient_accumulation_steps": config.optimizer.gradient_accumulation_steps,
        "resumed_from_step": legs.start_step if prepared.checkpoint is not None else None,
        "train_seconds": round(seconds, 1),
        "final_loss": float(losses[-1]) if losses else None,
        "output_dir": config.run.output_dir,
        "encoder": encoder_path,
    }
    if learned is not None:
        summary.update(
            knn_top1=learned["top1"],
            knn_top5=learned["top5"],
            knn_top1_random_init=random_init["top1"],
            knn_top5_random_init=random_init["top5"],
            knn_k=config.evaluation.knn_k,
            eval_split=config.data.eval_split,
            num_classes=evaluation.num_classes,
        )
    return summary


# -------------------------------------------------------------------------------------------------------- run
def run(config: PretrainConfig | dict) -> dict:
    """Pretrain (resuming from the run directory's newest checkpoint), evaluate, save, export; returns the summary.

    Raises ``RunRefused`` (a ``SystemExit``) with the reason when the run cannot start or go on; a run refused
    before it wrote anything leaves no directory behind. Keras' global dtype policy, which ``--precision``
    sets for the run's model, is restored afterwards (models built later in the process are not affected).
    """
    import keras

    config = as_config(config)
    config = config.replace(output_dir=config.run.output_dir or f"runs/{config.preset}")
    policy = keras.config.dtype_policy()
    # First: TensorFlow's collective ops (multi-worker) and JAX's processes are set up before any other work.
    distribution = setup_devices(config)
    try:
        run_dir = RunDirectory(config.run.output_dir, chief=distribution.is_chief).create()
    except OSError as error:
        keras.config.set_dtype_policy(policy)
        raise RunRefused(str(error)) from None
    try:
        with run_dir.removed_if_refused():
            prepared = prepare(config, run_dir, distribution)
        return train_evaluate_save(prepared)
    finally:
        run_dir.close()
        keras.config.set_dtype_policy(policy)


def as_config(config: PretrainConfig | dict) -> PretrainConfig:
    """A ``PretrainConfig`` from itself or its nested dict (``PretrainConfig.to_dict``'s sections)."""
    if isinstance(config, PretrainConfig):
        return config
    if not any(key in config for key in ("data", "model", "optimizer")):
        raise ValueError(
            "run() takes a PretrainConfig or its nested dict (sections data, views, model, optimizer, ...), "
            f"got a dict with keys {sorted(config)}: build one with training.config.PretrainConfig(...).replace(...)."
        )
    return PretrainConfig.from_dict(config)
