"""keras-carp's benchmarks. Run each from the repository root as a module; ``--help`` lists its options:

    python -m bench.<name> --help

Benchmarks (each appends one JSON record per measured configuration to ``bench/results/<name>.jsonl``;
``--results-dir DIR`` writes elsewhere, ``--no-record`` nowhere):

- ``train_step``: the whole compiled CARP training step on every Keras backend beside the PyTorch baseline
  (``--suite smoke|cpu|gpu``), images/s, memory, MFU, x ref;
- ``torch_baseline``: that PyTorch baseline, the CARP step written directly in PyTorch (train_step's peer);
- ``profile_step``: where the JAX step's GPU time goes (jax.profiler), and A/B timings of step variants;
- ``cost_growth``: how the step and the partition + loss grow with K, N_B, local crops and the batch;
- ``loss_formulations``: the library's per-crop CARP loss against a fused formulation that was tried;
- ``logits_formulation``: gathering logit columns against permuting the prototype rows (TensorFlow, XLA);
- ``teacher_ema``: the per-step cost of the teacher EMA inside the compiled step;
- ``cpu_settings``: the step's compile settings on a CPU (XLA or not, per backend), in fresh processes;
- ``fit_pipeline``: ``fit`` with the views made on the host (tf.data) or the device, beside the input and the step;
- ``device_views``: the views alone, ``DeviceMultiCrop`` compiled on the active backend;
- ``input_pipeline``: images/s (and per core) of ``keras_carp.data.multicrop_dataset``;
- ``export_and_convert``: converting a released-layout checkpoint, saving, exporting and serving it.

Shared modules: ``results`` (the record schema, machine description, writing and reading records),
``report`` (``python -m bench.report`` writes docs/benchmarks.md from bench/results/*.jsonl),
``released_layout`` (a random checkpoint in the released PyTorch layout), ``images`` (real JPEGs at ImageNet-like
sizes). ``bash bench/gpu_tables.sh`` runs the GPU tables on a machine with an NVIDIA GPU, ``bash bench/gpu_fit.sh``
the fit, Fashion-MNIST and remaining runs there (no TensorFlow needed).
"""
