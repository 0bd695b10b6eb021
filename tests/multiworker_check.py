"""The tiny CARP of ``tests.distributed_check`` trained by worker processes, against one device.

Three processes on this machine, each a fresh interpreter (TensorFlow's collective ops and JAX's processes are
configured once, at start-up):

    python -m tests.multiworker_check --role single --dir D      # one device, the global batch: D/single.npz
    TF_CONFIG=... python -m tests.multiworker_check --role worker --dir D      # twice: worker 0 and worker 1

TensorFlow: ``MultiWorkerMirroredStrategy`` from ``TF_CONFIG``, and each worker builds only its own share of
every global batch (``distribute_datasets_from_function``: pipeline ``i`` of ``n`` makes images
``[i * B / n, (i + 1) * B / n)`` of each batch of ``B``). JAX (``KERAS_BACKEND=jax``, ``--coordinator``,
``--num-processes``, ``--process-id``): ``keras.distribution.initialize`` and ``DataParallel`` over every
process's devices, each process feeding its share of every batch. The chief (worker 0) writes
``D/workers.json``: the largest relative differences of the logged losses, of every weight and of the
optimizer state against the single-device run, and what each worker wrote where.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tests.distributed_check import (
    LOGGED,
    WEIGHT_GROUPS,
    build_tiny_carp,
    compile_for,
    max_relative,
    relative,
    step_losses_callback,
    tiny_views,
)


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", choices=("single", "worker"), required=True)
    parser.add_argument("--dir", required=True, help="where the single run's arrays and the result go")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--coordinator", default=None, help="JAX: host:port of process 0")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    return parser.parse_args()


def weights_of(model) -> dict:
    import keras
    import numpy as np

    arrays = {f"{group}/{i}": np.asarray(w) for group in WEIGHT_GROUPS
              for i, w in enumerate(getattr(model, group).get_weights())}  # fmt: skip
    arrays.update({f"optimizer/{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(model.optimizer.variables)})
    return arrays


def single(args) -> None:
    import numpy as np

    views = tiny_views(args.batch, args.steps)
    model = build_tiny_carp()
    initial = model.get_weights()
    compile_for(model, args.batch, args.steps)
    losses = step_losses_callback()
    model.fit(x=tuple(views), batch_size=args.batch, epochs=1, shuffle=False, verbose=0, callbacks=[losses])
    # How far training moved the kernels (so agreeing weights mean agreeing updates).
    moved = max_relative(*zip(*[(a, b) for a, b in zip(model.get_weights(), initial) if a.ndim > 1]))
    np.savez(os.path.join(args.dir, "single.npz"), losses=np.asarray(losses.steps), kernels_moved=moved,
             **{f"initial/{i}": w for i, w in enumerate(initial)}, **weights_of(model))  # fmt: skip


def shard_of_every_batch(views, batch: int, process: int, processes: int) -> list:
    """Images ``[p * b, (p + 1) * b)`` of every global batch of ``batch``, with ``b = batch / processes``."""
    share = batch // processes
    steps = len(views[0]) // batch
    rows = [step * batch + process * share + i for step in range(steps) for i in range(share)]
    return [view[rows] for view in views]


def worker_tensorflow(args, reference) -> tuple:
    import tensorflow as tf

    from keras_carp import distribute

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    rank, workers = distribute.worker_rank(strategy)
    views = tiny_views(args.batch, args.steps)

    def dataset_fn(context: tf.distribute.InputContext):
        local = shard_of_every_batch(views, args.batch, context.input_pipeline_id, context.num_input_pipelines)
        per_replica = context.get_per_replica_batch_size(args.batch)
        return tf.data.Dataset.from_tensor_slices(tuple(local)).batch(per_replica, drop_remainder=True)

    with strategy.scope():
        model = build_tiny_carp()
        model.set_weights([reference[f"initial/{i}"] for i in range(len(model.get_weights()))])
        compile_for(model, args.batch, args.steps)
        model.optimizer.build(model.trainable_variables)
    losses = step_losses_callback()
    data = strategy.distribute_datasets_from_function(dataset_fn)
    model.fit(data, epochs=1, steps_per_epoch=args.steps, verbose=0, callbacks=[losses])
    return model, losses.steps, rank, workers, int(strategy.num_replicas_in_sync)


def worker_jax(args, reference) -> tuple:
    import keras

    keras.distribution.initialize(args.coordinator, args.num_processes, args.process_id)
    import jax

    devices = keras.distribution.list_devices()
    # After initialize (DataParallel reads the process count); each process feeds its own share, unsharded.
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False))
    rank, processes = jax.process_index(), jax.process_count()
    views = shard_of_every_batch(tiny_views(args.batch, args.steps), args.batch, rank, processes)
    model = build_tiny_carp()
    model.set_weights([reference[f"initial/{i}"] for i in range(len(model.get_weights()))])
    compile_for(model, args.batch, args.steps)
    losses = step_losses_callback()
    # Each process gives fit its share of every batch; Keras assembles the global batch across processes.
    model.fit(x=tuple(views), batch_size=args.batch // processes, epochs=1, shuffle=False, verbose=0,
              callbacks=[losses])  # fmt: skip
    return model, losses.steps, rank, processes, len(devices)


def worker(args) -> None:
    import keras
    import numpy as np

    reference = dict(np.load(os.path.join(args.dir, "single.npz")))
    run = worker_tensorflow if keras.backend.backend() == "tensorflow" else worker_jax
    model, steps, rank, processes, replicas = run(args, reference)
    mine = weights_of(model)  # every process reads its weights (reads may be collective), the chief writes
    if rank != 0:
        return
    losses, single_losses = np.asarray(steps), reference["losses"]
    result = {
        "backend": keras.backend.backend(),
        "processes": processes,
        "replicas": replicas,
        "losses_single": single_losses.tolist(),
        "losses_workers": losses.tolist(),
        "max_rel_logs": {k: relative(losses[:, i], single_losses[:, i]) for i, k in enumerate(LOGGED)},
        "max_rel_weights": {
            group: max_relative(*zip(*[(v, reference[k]) for k, v in mine.items() if k.startswith(group + "/")]))
            for group in WEIGHT_GROUPS
        },
        "max_rel_optimizer": max_relative(
            *zip(*[(v, reference[k]) for k, v in mine.items() if k.startswith("optimizer/")])
        ),
        "kernels_moved": float(reference["kernels_moved"]),
    }
    with open(os.path.join(args.dir, "workers.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("losses_")}, indent=2))


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    single(args) if args.role == "single" else worker(args)


if __name__ == "__main__":
    sys.exit(main())
