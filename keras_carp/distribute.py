"""Multi-device training: tf.distribute strategies on TensorFlow, keras.distribution on JAX.

``resolve_strategy(name)`` returns the TensorFlow strategy for
``setup_distribution(name)`` (``auto``: a TPU when the resolver finds one, else
all local GPUs, else the default strategy); ``data_parallel()`` sets Keras'
``DataParallel`` distribution over the local JAX devices. The CARP-specific
parts (global partition, entropy, synchronised batch norm, teacher update,
loss scaling) live in the model and ``keras_carp.backends.tensorflow``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import keras

STRATEGIES = ("auto", "mirrored", "multiworker", "tpu", "none")
logger = logging.getLogger(__name__)


def _tpu_strategy(tpu: str | None = None):
    """TPUStrategy after connecting to and initialising the TPU system; raises ValueError when there is none."""
    import tensorflow as tf

    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.NotFoundError, tf.errors.UnavailableError) as error:
        raise ValueError(f"No TPU found ({type(error).__name__}: {error}).") from None
    return tf.distribute.TPUStrategy(resolver)


def resolve_strategy(name: str = "auto", tpu: str | None = None, devices: list[str] | None = None):
    """The ``tf.distribute`` strategy called ``name`` (one of ``STRATEGIES``).

    - ``auto``: TPUStrategy if a TPU answers, else MirroredStrategy over the
      GPUs when there are several, else the default (one device) strategy;
    - ``mirrored``: MirroredStrategy over ``devices`` (default: every GPU,
      else every logical CPU);
    - ``multiworker``: MultiWorkerMirroredStrategy (hosts from ``TF_CONFIG``);
    - ``tpu``: TPUStrategy, an error when no TPU is reachable;
    - ``none``: the default strategy.
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}.")
    if keras.backend.backend() != "tensorflow":
        raise ValueError(f"tf.distribute strategies need the TensorFlow backend, not {keras.backend.backend()!r}.")
    import tensorflow as tf

    if name == "none":
        return tf.distribute.get_strategy()
    if name == "tpu":
        return _tpu_strategy(tpu)
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "mirrored":
        devices = devices or [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    try:  # auto
        return _tpu_strategy(tpu)
    except ValueError as error:
        logger.debug("strategy auto: %s", error)
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy(devices=[d.name for d in gpus])
    return tf.distribute.get_strategy()


def across_workers(strategy) -> bool:
    """Whether ``strategy`` is a ``MultiWorkerMirroredStrategy`` spanning more than one worker process."""
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and worker_rank(strategy)[1] > 1


def worker_rank(strategy) -> tuple[int, int]:
    """(this worker's rank, number of workers) of a ``MultiWorkerMirroredStrategy`` from its ``TF_CONFIG`` cluster.

    Rank 0 is the chief: the task ``chief`` when the cluster has one, else ``worker`` 0 (TensorFlow's rule).
    """
    resolver = strategy.cluster_resolver
    spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
    chiefs, workers = len(spec.get("chief", [])), len(spec.get("worker", []))
    if chiefs + workers <= 1 or resolver.task_type is None:
        return 0, 1
    if resolver.task_type == "chief":
        return 0, chiefs + workers
    if resolver.task_type != "worker":
        raise ValueError(f"carp-pretrain runs as a chief or worker task, not {resolver.task_type!r} (TF_CONFIG).")
    return chiefs + int(resolver.task_id), chiefs + workers


def data_parallel(devices: list | None = None):
    """Set (and return) ``keras.distribution.DataParallel`` over the local JAX devices (all by default)."""
    if keras.backend.backend() != "jax":
        raise ValueError("keras.distribution.DataParallel is used on the JAX backend here.")
    devices = devices or keras.distribution.list_devices()
    distribution = keras.distribution.DataParallel(devices=devices)
    keras.distribution.set_distribution(distribution)
    return distribution


def lost_a_peer(error: BaseException) -> bool:
    """Whether ``error`` is how a multi-process step fails when another process of the job is gone.

    TensorFlow: the collective ops abort with ``UnavailableError`` (the peer's socket closed), or
    ``DeadlineExceededError`` / ``AbortedError`` / ``CancelledError`` once the health check gives up on
    it. JAX: the runtime reports the coordination service's lost task as a ``JaxRuntimeError``.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        errors = tf.errors
        return isinstance(error, (errors.UnavailableError, errors.DeadlineExceededError, errors.AbortedError,
                                  errors.CancelledError))  # fmt: skip
    if backend == "jax":
        return type(error).__name__ in ("JaxRuntimeError", "XlaRuntimeError")
    return False


def check_global_batch(global_batch_size: int, replicas: int) -> int:
    """The per-replica batch; the global batch must split evenly across replicas."""
    if replicas < 1 or global_batch_size % replicas:
        raise ValueError(
            f"The global batch ({global_batch_size}) must be divisible by the number of replicas ({replicas})."
        )
    return global_batch_size // replicas


@dataclasses.dataclass
class Distribution:
    """How a run spreads over devices: what a strategy name resolved to."""

    description: str
    replicas: int = 1
    strategy: object | None = None  # the tf.distribute strategy (TensorFlow backend)
    per_host_input: bool = False  # feed with strategy.distribute_datasets_from_function (TPU, multi-worker)
    dtype_policy: str | None = None  # mixed_bfloat16 on TPUs
    process_index: int = 0  # this process among the job's processes (0: the chief, which writes the run's files)
    num_processes: int = 1

    @property
    def is_chief(self) -> bool:
        """Whether this process writes the run directory (the others train alongside and write nothing there)."""
        return self.process_index == 0

    def scope(self):
        """Build and compile the model inside this (the strategy's scope on TensorFlow)."""
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()


def accelerator_kind() -> str:
    """ "gpu", "tpu" or "cpu": the kind of the first device the active backend computes on."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.devices()[0].platform
    if backend == "torch":
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    import tensorflow as tf

    for kind in ("tpu", "gpu"):
        if tf.config.list_logical_devices(kind.upper()):
            return kind
    return "cpu"


JOB_VARIABLES = (
    "KERAS_DISTRIBUTION_JOB_ADDRESSES",
    "KERAS_DISTRIBUTION_NUM_PROCESSES",
    "KERAS_DISTRIBUTION_PROCESS_ID",
)


def initialize_processes(coordinator_address: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None) -> bool:  # fmt: skip
    """Join a JAX multi-process job (``keras.distribution.initialize``) when the flags or Keras' variables
    ``KERAS_DISTRIBUTION_JOB_ADDRESSES`` / ``_NUM_PROCESSES`` / ``_PROCESS_ID`` describe one; returns whether
    it did. Must run before any other JAX work."""
    import os

    given = (coordinator_address, num_processes, process_id)
    if all(value is None for value in given) and not any(os.environ.get(name) for name in JOB_VARIABLES):
        return False
    try:
        keras.distribution.initialize(coordinator_address, num_processes, process_id)
    except (ValueError, TypeError, RuntimeError) as error:
        raise ValueError(
            f"could not join the JAX multi-process job ({error}); give --coordinator-address host:port, "
            "--num-processes and --process-id (or KERAS_DISTRIBUTION_JOB_ADDRESSES, _NUM_PROCESSES, _PROCESS_ID)."
        ) from None
    return True


def setup_distribution(name: str = "auto", tpu: str | None = None, coordinator_address: str | None = None,
                       num_processes: int | None = None, process_id: int | None = None) -> Distribution:  # fmt: skip
    """Resolve a strategy name for the active backend.

    TensorFlow: ``resolve_strategy``; TPUs train in ``mixed_bfloat16`` and,
    like multi-worker runs, read their input per host. JAX: ``auto``,
    ``mirrored`` and ``tpu`` mean ``DataParallel`` over the local devices (the
    TPU cores on a TPU VM); with a job described (``initialize_processes``),
    ``DataParallel`` over every process's devices, each process feeding its
    own share of the batch. PyTorch: one device (``auto`` / ``none``).
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}.")
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        strategy = resolve_strategy(name, tpu)
        is_tpu = isinstance(strategy, tf.distribute.TPUStrategy)
        multiworker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        label = "MultiWorkerMirroredStrategy" if multiworker else type(strategy).__name__.lstrip("_")
        process_index, num_processes = worker_rank(strategy) if multiworker else (0, 1)
        workers = f" on {num_processes} workers" if num_processes > 1 else ""
        return Distribution(
            description=f"{label} with {strategy.num_replicas_in_sync} replica(s){workers}",
            replicas=int(strategy.num_replicas_in_sync),
            strategy=strategy,
            per_host_input=is_tpu or multiworker,
            dtype_policy="mixed_bfloat16" if is_tpu else None,
            process_index=process_index,
            num_processes=num_processes,
        )
    if backend == "jax":
        if name == "none":
            return Distribution("one JAX device")
        if initialize_processes(coordinator_address, num_processes, process_id):
            import jax

            devices = keras.distribution.list_devices()  # every process's devices: one global mesh
            # Each process feeds its own share of every global batch (per-host input), so no auto-sharding.
            keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices,
                                                                                auto_shard_dataset=False))  # fmt: skip
            return Distribution(
                f"keras.distribution.DataParallel over {len(devices)} devices of {jax.process_count()} processes",
                len(devices),
                per_host_input=True,
                dtype_policy="mixed_bfloat16" if name == "tpu" else None,
                process_index=jax.process_index(),
                num_processes=jax.process_count(),
            )
        if name == "multiworker":
            raise ValueError("--strategy multiworker on JAX needs the job: --coordinator-address host:port, "
                             "--num-processes and --process-id (or KERAS_DISTRIBUTION_JOB_ADDRESSES, "
                             "_NUM_PROCESSES and _PROCESS_ID) on every process.")  # fmt: skip
        devices = keras.distribution.list_devices()
        if name == "tpu" and not any("tpu" in str(d).lower() for d in devices):
            raise ValueError(f"No TPU among the JAX devices {devices}.")
        if len(devices) == 1:
            return Distribution("one JAX device")
        data_parallel(devices)
        policy = "mixed_bfloat16" if name == "tpu" else None
        return Distribution(f"keras.distribution.DataParallel over {len(devices)} devices", len(devices),
                            dtype_policy=policy)  # fmt: skip
    if name not in ("auto", "none"):
        raise ValueError(f"strategy {name!r} needs the TensorFlow or JAX backend; PyTorch runs on one device here.")
    return Distribution("one PyTorch device")
