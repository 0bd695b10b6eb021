"""Where the JAX train step spends its GPU time, and A/B timings of step variants.

Compiles the same step ``fit`` runs (``jax.jit(model.train_step, donate_argnums=0)``)
for one configuration, times it (per-step synchronised, and back to back with one
sync at the end, as ``fit`` dispatches), traces a few steps with ``jax.profiler``
and prints the kernels by GPU time, grouped by what they compute (convolutions
forward/backward, batch norm, max pool, optimizer, loss, ...) using the
optimized HLO's op names. ``--variants`` re-runs the step with alternative
implementations in the same process (XLA's autotuning results are reused):

    KERAS_BACKEND=jax python -m bench.profile_step --variants library,keras_moments,pool_slices

Each variant is recorded in bench/results/profile_step.jsonl (bench.results); --out also appends the raw lines.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import re
import statistics
import tempfile
import time

from bench.results import Recorder, add_record_arguments
from bench.train_step import CONFIG_ARGUMENTS, add_config_arguments, build_model

VARIANTS = ("library", "keras_moments", "pool_slices")


# ----------------------------------------------------------------------------- variants (patched in this process)


def slice_max_pool_2d(original):
    """Max pool with a gradient written as strided slices (first max wins, like select_and_scatter)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    def pool(inputs, pool_size, strides=None, padding="valid", data_format=None):
        sizes = (pool_size, pool_size) if isinstance(pool_size, int) else tuple(pool_size)
        strides = sizes if strides is None else ((strides, strides) if isinstance(strides, int) else tuple(strides))
        if inputs.ndim != 4 or data_format == "channels_first":
            return original(inputs, pool_size, strides, padding, data_format)
        pads = lax.padtype_to_pads(inputs.shape[1:3], sizes, strides, padding.upper())
        return pool_impl(inputs, sizes, strides, tuple(tuple(p) for p in pads))

    def windows(padded, sizes, strides, out_hw):
        for di in range(sizes[0]):
            for dj in range(sizes[1]):
                yield di, dj, padded[:, di : di + strides[0] * (out_hw[0] - 1) + 1 : strides[0],
                                     dj : dj + strides[1] * (out_hw[1] - 1) + 1 : strides[1], :]  # fmt: skip

    def reduce_max(x, sizes, strides, pads):
        init = jnp.array(-jnp.inf, x.dtype)
        return lax.reduce_window(x, init, lax.max, (1, *sizes, 1), (1, *strides, 1), ((0, 0), *pads, (0, 0)))

    def forward(x, sizes, strides, pads):
        y = reduce_max(x, sizes, strides, pads)
        return y, (x, y)

    def backward(sizes, strides, pads, residuals, g):  # noqa: PLR0913
        x, y = residuals
        padded = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)
        grad = jnp.zeros(padded.shape, g.dtype)
        taken = jnp.zeros(y.shape, bool)
        out_hw = y.shape[1:3]
        for di, dj, window in windows(padded, sizes, strides, out_hw):
            hit = jnp.logical_and(window == y, jnp.logical_not(taken))
            taken = jnp.logical_or(taken, hit)
            contribution = jnp.where(hit, g, jnp.zeros_like(g))
            config = [(0, 0, 0),
                      (di, padded.shape[1] - di - strides[0] * (out_hw[0] - 1) - 1, strides[0] - 1),
                      (dj, padded.shape[2] - dj - strides[1] * (out_hw[1] - 1) - 1, strides[1] - 1),
                      (0, 0, 0)]  # fmt: skip
            grad = grad + lax.pad(contribution, jnp.array(0, g.dtype), config)
        (top, _), (left, _) = pads
        return (grad[:, top : top + x.shape[1], left : left + x.shape[2], :],)

    pool_impl = jax.custom_vjp(reduce_max, nondiff_argnums=(1, 2, 3))
    pool_impl.defvjp(forward, backward)
    return pool


def apply_variant(name: str):
    """Patch Keras' JAX backend for ``name``; returns a function that undoes it."""
    from keras_carp import keras_internals

    nn = keras_internals.jax_backend_nn()
    original = nn.max_pool
    if name == "pool_slices":
        nn.max_pool = slice_max_pool_2d(original)
    return lambda: setattr(nn, "max_pool", original)


# ----------------------------------------------------------------------------- profile parsing


def op_names_from_hlo(hlo_text: str) -> dict:
    """HLO instruction name -> its metadata op_name (the JAX name stack), from the optimized module."""
    names = {}
    for match in re.finditer(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = [^\n]*?metadata=\{[^}\n]*?op_name=\"([^\"]*)\"",
                             hlo_text, flags=re.M):  # fmt: skip
        names.setdefault(match.group(1), match.group(2))
    return names


CATEGORIES = (  # first match wins, on "kernel name | hlo op | op_name" in lower case (layer names say "conv" too)
    ("max pool", ("select_and_scatter", "reduce_window", "max_pool", "pool_impl")),
    (
        "convolution",
        ("conv_general_dilated", "convolution", "xmma", "cudnn", "implicit_gemm", "wgrad", "dgrad", "fprop"),
    ),
    ("optimizer (LARS)", ("lars", "stateless_apply", "optimizer")),
    ("batch norm", ("batch_normalization", "moments", "_bn/", "/bn", "_bn_")),
    ("loss + partition", ("carp", "softmax", "permutation", "one_hot", "argmax", "log")),
    ("matmul (head)", ("gemm", "cublas", "dot", "matmul", "dense")),
)


def category_of(kernel: str, hlo_op: str, op_name: str) -> str:
    text = f"{kernel} | {hlo_op} | {op_name}".lower()
    return next((name for name, words in CATEGORIES if any(word in text for word in words)), "other elementwise")


def kernel_rows(profile, op_names: dict) -> tuple[list, float, float]:
    """GPU kernels of a ``jax.profiler.ProfileData``: ([((kernel, hlo op, op_name), [ms, launches])], busy ms, span ms).

    Every event on the GPU planes' stream lines counts (a compute stream's line
    is named like "Stream #14(Compute,MemcpyD2D,Memset)").
    """
    kernels, busy, span = collections.defaultdict(lambda: [0.0, 0]), 0.0, [float("inf"), 0.0]
    for plane in profile.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if not line.name.lower().startswith("stream"):
                continue
            for event in line.events:
                hlo_op = str(dict(event.stats).get("hlo_op", ""))
                key = (event.name[:90], hlo_op, op_names.get(hlo_op, "")[-140:])
                kernels[key][0] += event.duration_ns / 1e6
                kernels[key][1] += 1
                busy += event.duration_ns / 1e6
                span = [min(span[0], event.start_ns), max(span[1], event.start_ns + event.duration_ns)]
    rows = sorted(kernels.items(), key=lambda item: -item[1][0])
    return rows, busy, (span[1] - span[0]) / 1e6 if rows else 0.0


def summarize_profile(profile, hlo_text: str, steps: int, top: int) -> dict:
    """Print the GPU time per step by category, forward vs backward, and the top kernels; return the figures."""
    rows, busy, span = kernel_rows(profile, op_names_from_hlo(hlo_text))
    if not rows:
        planes = {plane.name: [line.name for line in plane.lines][:4] for plane in profile.planes}
        print(f"\nNo GPU kernels in the trace (no GPU, or no CUPTI); planes and their first lines: {planes}")
        return {"busy_ms": 0.0, "categories": {}, "backward_ms": 0.0}
    categories, backward = collections.defaultdict(float), 0.0
    for (kernel, hlo_op, op_name), (ms, _) in rows:
        categories[category_of(kernel, hlo_op, op_name)] += ms / steps
        backward += ms / steps if "transpose(" in op_name else 0.0
    print(f"\nGPU kernel time per step: {busy / steps:.1f} ms busy over {span / steps:.1f} ms of trace "
          f"({len(rows)} distinct kernels; {backward:.1f} ms of it in the backward pass)")  # fmt: skip
    for name, ms in sorted(categories.items(), key=lambda item: -item[1]):
        print(f"  {name:<20} {ms:8.2f} ms  {100 * ms * steps / busy:5.1f} %")
    print(f"\nTop {top} kernels (ms per step, launches per step, kernel | hlo op | op_name tail):")
    for (kernel, hlo_op, op_name), (ms, count) in rows[:top]:
        print(f"  {ms / steps:7.3f} {count / steps:5.0f}  {kernel} | {hlo_op} | {op_name[-90:]}")
    return {"busy_ms": busy / steps, "categories": dict(categories), "backward_ms": backward}


# ----------------------------------------------------------------------------- main


def time_parts(model, state, data, steps: int) -> dict:
    """Step time split by compiling the loss forward alone and forward + backward alone (no CUPTI needed).

    The forward includes the teacher, the partition and the loss; the update
    (LARS, teacher EMA, metrics) is the full step minus forward + backward.
    """
    import jax
    import keras

    from keras_carp.backends.jax import state_mapping

    trainable, non_trainable, optimizer_state, _ = state

    def loss(trainable, non_trainable, optimizer_state, data):
        with keras.StatelessScope(state_mapping=state_mapping(model, trainable, non_trainable, optimizer_state)):
            return model.compute_carp_losses(data, 0, training=True)["loss"]

    def timed(function) -> float:
        compiled = jax.jit(function).lower(trainable, non_trainable, optimizer_state, data).compile()
        jax.block_until_ready(compiled(trainable, non_trainable, optimizer_state, data))
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            jax.block_until_ready(compiled(trainable, non_trainable, optimizer_state, data))
            times.append(time.perf_counter() - started)
        return 1e3 * statistics.median(times)

    return {"forward": timed(loss), "forward+backward": timed(jax.value_and_grad(loss))}


def run_variant(args, name: str, profile: bool) -> dict:
    import jax
    import numpy as np

    from keras_carp import keras_internals

    undo = apply_variant(name)
    try:
        args.batch_norm_moments = "keras" if name == "keras_moments" else "one_pass"
        model = build_model(args)
        model.optimizer.build(model.trainable_variables)
        rng = np.random.default_rng(0)
        sizes = [args.global_size] * 2 + [args.local_size] * args.local_crops
        crops = tuple(jax.device_put(rng.normal(size=(args.batch, s, s, 3)).astype("float32")) for s in sizes)
        data = (crops,)
        state = keras_internals.jax_state(model)
        started = time.perf_counter()
        lowered = jax.jit(model.train_step, donate_argnums=0).lower(state, data)
        compiled = lowered.compile()
        compile_s = time.perf_counter() - started
    finally:
        undo()
    state = [state]

    def step():
        logs, state[0] = compiled(state[0], data)
        return logs

    for _ in range(args.warmup):
        float(step()["loss"])
    synced = []
    for _ in range(args.steps):
        started = time.perf_counter()
        loss = float(step()["loss"])
        synced.append(time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(args.steps):
        logs = step()
    float(logs["loss"])
    pipelined = (time.perf_counter() - started) / args.steps
    result = {
        "variant": name, "loss": loss, "compile_s": compile_s, "median_ms": 1e3 * statistics.median(synced),
        "min_ms": 1e3 * min(synced), "pipelined_ms": 1e3 * pipelined,
        "images_per_s": args.batch / statistics.median(synced), "pipelined_images_per_s": args.batch / pipelined,
    }  # fmt: skip
    print(json.dumps(result), flush=True)
    if args.breakdown:
        result["breakdown_ms"] = time_parts(model, state[0], data, args.steps)
        print(json.dumps({"variant": name, "breakdown_ms": result["breakdown_ms"]}), flush=True)
    if profile:
        trace_dir = tempfile.mkdtemp(prefix="carp-trace-")
        jax.profiler.start_trace(trace_dir)
        for _ in range(args.profile_steps):
            logs = step()
        float(logs["loss"])
        jax.profiler.stop_trace()
        from jax.profiler import ProfileData

        profile = ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0])
        result["profile"] = summarize_profile(profile, compiled.as_text(), args.profile_steps, args.top)
    return result


def record_variant(recorder: Recorder, args: argparse.Namespace, result: dict) -> dict:
    """One variant's bench.results record: the configuration, then its timings (breakdown and profile flattened)."""
    config = {name.replace("-", "_"): getattr(args, name.replace("-", "_")) for name, _ in CONFIG_ARGUMENTS}
    config = {"variant": result["variant"], **config}
    figures = {key: value for key, value in result.items() if isinstance(value, (int, float)) and key != "variant"}
    for part, ms in result.get("breakdown_ms", {}).items():
        figures[f"{part}_ms"] = ms
    if "profile" in result:
        figures["gpu_busy_ms"] = result["profile"]["busy_ms"]
        figures["gpu_backward_ms"] = result["profile"]["backward_ms"]
        for category, ms in sorted(result["profile"]["categories"].items()):
            figures[f"gpu {category} ms"] = ms
    return recorder.record(config, figures, backend="jax")


def main(argv: list[str] | None = None) -> int:
    """Compile, time (and optionally trace) each variant in this process; print, record, and compare them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser, backbone="resnet50", global_size=224, local_size=96, local_crops=6, batch=256,
                         k=65536, block_size=512, hidden=2048, bottleneck=256, precision="bfloat16", steps=30,
                         warmup=3)  # fmt: skip
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument(
        "--variants",
        default="library",
        help=f"comma-separated, from {VARIANTS}: the library's step; with Keras' two-pass BN "
        "moments; with a max-pool gradient written as strided slices (tried, not kept)",
    )
    parser.add_argument("--profile", default="library", help="comma-separated variants to trace")
    parser.add_argument("--breakdown", action="store_true", help="also time the forward and forward+backward alone")
    parser.add_argument("--out", default=None, help="also append each variant's raw JSON line here")
    add_record_arguments(parser)
    args = parser.parse_args(argv)
    recorder = Recorder.from_args("profile_step", args)
    results = []
    for name in args.variants.split(","):
        if name not in VARIANTS:
            parser.error(f"unknown variant {name!r}; choose from {VARIANTS}")
        result = run_variant(args, name, profile=name in args.profile.split(","))
        results.append(result)
        record_variant(recorder, args, result)
        if args.out:
            with open(args.out, "a") as out:
                out.write(json.dumps(result) + "\n")
    base = results[0]
    print(f"\n{'variant':<26} {'loss':>10} {'compile s':>9} {'median ms':>9} {'pipelined ms':>12} {'x first':>7}")
    for r in results:
        print(f"{r['variant']:<26} {r['loss']:10.5f} {r['compile_s']:9.1f} {r['median_ms']:9.1f} "
              f"{r['pipelined_ms']:12.1f} {base['median_ms'] / r['median_ms']:7.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
