"""carp-convert: the authors' released PyTorch checkpoints as Keras models and SavedModels.

    carp-convert carp_rn50_200ep.pth --keras carp_rn50.keras
    carp-convert carp_rn50_200ep.pth --saved-model carp_rn50_sm --embedding
    carp-convert teacher.safetensors --encoder-only --keras rn50_encoder.keras

By default the whole CARP model (student and teacher, encoders and heads) goes
to ``--keras``; ``--encoder-only`` writes just the ``--which`` encoder. The
SavedModel holds the ``--which`` encoder (teacher by default), with the same
serving options as carp-export. Reading .pth needs PyTorch.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from training.export import add_serving_arguments, describe_saved_model, serving_preprocessing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="carp-convert", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help=".pth released checkpoint, state dict, or .safetensors")
    parser.add_argument("--keras", default=None, help=".keras file to write")
    parser.add_argument("--saved-model", default=None, help="SavedModel folder to write")
    parser.add_argument("--which", choices=("teacher", "student"), default="teacher",
                        help="network for --encoder-only and --saved-model")  # fmt: skip
    parser.add_argument("--encoder-only", action="store_true", help="write the encoder alone to --keras")
    parser.add_argument("--block-size", type=int, default=512, help="N_B of the converted CARP model")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="unpickle any object in the .pth (only for files you trust)")  # fmt: skip
    add_serving_arguments(parser)
    args = parser.parse_args(argv)
    if not args.keras and not args.saved_model:
        parser.error("nothing to write: pass --keras FILE and/or --saved-model DIR")
    if args.keras and not args.keras.endswith(".keras"):
        parser.error(f"--keras must name a .keras file, got {args.keras}")
    return args


def main(argv: list[str] | None = None) -> None:
    os.environ["KERAS_BACKEND"] = "tensorflow"
    args = parse_args(argv)
    from keras_carp import convert
    from keras_carp.export import check_output_path, export_encoder

    # Every output is checked before the (large) checkpoint is read.
    try:
        preprocessing = serving_preprocessing(args, args.checkpoint)
        if args.saved_model:
            check_output_path(args.saved_model, args.overwrite)
        if args.keras:
            check_output_path(args.keras, args.overwrite)
        checkpoint = convert.read_checkpoint(args.checkpoint, trust_checkpoint=args.trust_checkpoint)
        print(f"read {args.checkpoint}: networks {sorted(checkpoint.networks)}, epoch {checkpoint.epoch}")
        if args.encoder_only or not args.keras:
            model = convert.convert_encoder(checkpoint, which=args.which)
        else:
            model = convert.convert_model(checkpoint, block_size=args.block_size)
    except (ValueError, OSError, ImportError) as error:
        raise SystemExit(f"carp-convert: {error}") from None
    if args.keras:
        if Path(args.keras).exists():
            Path(args.keras).unlink()
        model.save(args.keras)
        print(f"Keras model written to {args.keras} ({model.count_params():,} weights)")
    if args.saved_model:
        try:
            path = export_encoder(model, args.saved_model, encoder=args.which, preprocessing=preprocessing,
                                  include_embedding=args.embedding, include_assignments=args.assignments,
                                  overwrite=args.overwrite)  # fmt: skip
        except ValueError as error:
            raise SystemExit(f"carp-convert: {error}") from None
        print(f"SavedModel written to {path}: {describe_saved_model(path)}")


if __name__ == "__main__":
    sys.exit(main())
