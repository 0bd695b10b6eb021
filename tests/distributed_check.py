"""Train a tiny CARP for a few steps on N host devices and on one device with the same global batch.

Run as a script (the device split must happen before the backend starts):

    KERAS_BACKEND=tensorflow python -m tests.distributed_check --devices 2 --output result.json
    KERAS_BACKEND=jax        python -m tests.distributed_check --devices 4 --output result.json

TensorFlow: ``tf.distribute.MirroredStrategy`` over N logical CPUs. JAX:
``keras.distribution.DataParallel`` over N host devices (XLA_FLAGS is set here).
Writes the largest relative differences of the logged losses and of every
weight (student, teacher, optimizer state), and the partitions each replica used.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

LOGGED = ("loss", "consistency", "entropy", "prototypes_used")
WEIGHT_GROUPS = ("student_encoder", "student_head", "teacher_encoder", "teacher_head")


def build_tiny_carp(sync_batch_norm=None, augmentation=None):
    """The tiny CARP every distributed check trains, its weights drawn from seed 0."""
    import keras

    import keras_carp

    keras.utils.set_random_seed(0)
    encoder = keras_carp.build_encoder("resnet_tiny")
    head = keras_carp.CARPHead(num_prototypes=64, hidden_dim=32, bottleneck_dim=16)
    return keras_carp.CARP(encoder, head, block_size=16, seed=3, sync_batch_norm=sync_batch_norm,
                           augmentation=augmentation)  # fmt: skip


def tiny_views(batch: int, steps: int) -> list:
    """Two 16 px and two 8 px views of ``batch * steps`` images (seeded normal noise)."""
    import numpy as np

    rng = np.random.default_rng(0)
    images = batch * steps
    views = [rng.normal(size=(images, 16, 16, 3)).astype("float32") for _ in range(2)]
    return views + [rng.normal(size=(images, 8, 8, 3)).astype("float32") for _ in range(2)]


def compile_for(model, batch: int, steps: int) -> None:
    """LARS on the run's warm-up cosine, as every distributed check trains."""
    import keras_carp

    schedule = keras_carp.WarmupCosineDecay(1.0, batch, total_steps=steps, min_learning_rate=0.5)
    model.compile(optimizer=keras_carp.LARS(schedule))


def step_losses_callback():
    """A callback collecting the running means Keras logs after every step (loss terms, prototypes used)."""
    import keras

    class StepLosses(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.steps = []

        def on_train_batch_end(self, batch, logs=None):
            self.steps.append([float(logs[k]) for k in LOGGED])

    return StepLosses()


def relative(a, b) -> float:
    """max |a - b| over the tensor's scale max |b|, floored at 1e-3: tensors that stay near 0 (biases before
    BN, which get ~1e-11 gradients; the entropy, 2.77 - 2.77 in float32) are compared absolutely at 1e-8."""
    import numpy as np

    a, b = np.asarray(a, "float64"), np.asarray(b, "float64")
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-3)) if a.size else 0.0


def max_relative(mine, theirs) -> float:
    return max(relative(a, b) for a, b in zip(mine, theirs))


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--output", required=True)
    parser.add_argument("--sync-batch-norm", choices=("auto", "off"), default="auto",
                        help="off: per-replica batch norm on TensorFlow (to show that it matters)")  # fmt: skip
    parser.add_argument("--save", default=None, help="save the distributed model to this .keras file")
    parser.add_argument("--device-views", action="store_true",
                        help="feed uint8 images; the model makes the views (DeviceMultiCrop) in the step")  # fmt: skip
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if backend == "jax":
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if backend == "tensorflow":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.devices)

    import keras
    import numpy as np

    import keras_carp
    from keras_carp import distribute

    views = tiny_views(args.batch, args.steps)
    whole_images = np.random.default_rng(1).integers(0, 256, size=(args.batch * args.steps, 20, 20, 3), dtype="uint8")

    def build():
        augmentation = None
        if args.device_views:  # each replica keys its images by their place in the global batch
            augmentation = keras_carp.DeviceMultiCrop(global_size=16, local_size=8, num_local_crops=2, seed=5)
        return build_tiny_carp(False if args.sync_batch_norm == "off" else None, augmentation)

    def train(model) -> np.ndarray:
        compile_for(model, args.batch, args.steps)
        losses = step_losses_callback()
        data = whole_images if args.device_views else tuple(views)
        model.fit(x=data, batch_size=args.batch, epochs=1, shuffle=False, verbose=0,
                  callbacks=[keras_carp.TeacherEMA(0.9, 1.0), losses])  # fmt: skip
        return np.asarray(losses.steps)

    single = build()
    initial = single.get_weights()
    single_losses = train(single)

    partitions = []
    if backend == "tensorflow":
        strategy = distribute.resolve_strategy("mirrored")
        replicas = strategy.num_replicas_in_sync
        with strategy.scope():
            model = build()
            model.set_weights(initial)
            for step in range(args.steps):  # the partition each replica draws at a step, inside a replica function
                per_replica = strategy.run(lambda step=step: model.partition_permutation(step))
                partitions.append([np.asarray(x).tolist() for x in strategy.experimental_local_results(per_replica)])
            distributed_losses = train(model)
        sync = model.sync_batch_norm
    else:
        devices = keras.distribution.list_devices("cpu")
        replicas = len(devices)
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        model = build()
        model.set_weights(initial)
        distributed_losses = train(model)
        keras.distribution.set_distribution(None)
        sync = True  # one program over the sharded global batch

    if args.save:
        model.save(args.save)

    result = {
        "backend": backend,
        "replicas": replicas,
        "sync_batch_norm": sync,
        "steps": args.steps,
        "global_batch": args.batch,
        "losses_single": single_losses.tolist(),
        "losses_distributed": distributed_losses.tolist(),
        "max_rel_logs": {k: relative(distributed_losses[:, i], single_losses[:, i]) for i, k in enumerate(LOGGED)},
        "max_rel_weights": {
            group: max_relative(getattr(model, group).get_weights(), getattr(single, group).get_weights())
            for group in WEIGHT_GROUPS
        },
        "max_rel_optimizer": max_relative(
            [keras.ops.convert_to_numpy(v) for v in model.optimizer.variables],
            [keras.ops.convert_to_numpy(v) for v in single.optimizer.variables],
        ),
        # How far training moved the kernels (so agreeing weights mean agreeing updates).
        "kernels_moved": max_relative(*zip(*[(a, b) for a, b in zip(single.get_weights(), initial) if a.ndim > 1])),
        "partitions_identical_across_replicas": (
            all(all(p == ps[0] for p in ps) for ps in partitions) if partitions else None
        ),
        "partition_equals_single_device": (
            all(ps[0] == np.asarray(single.partition_permutation(s)).tolist() for s, ps in enumerate(partitions))
            if partitions
            else None
        ),
    }
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=2)
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("losses_")}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
