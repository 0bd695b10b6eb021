"""carp-convert: the authors' released PyTorch checkpoints as Keras models and SavedModels.

    carp-convert carp_rn50_200ep.pth --keras carp_rn50.keras
    carp-convert carp_rn50_200ep.pth --saved-model carp_rn50_sm --embedding true
    carp-convert teacher.safetensors --encoder-only true --keras rn50_encoder.keras

By default the whole CARP model (student and teacher, encoders and heads) goes
to ``--keras``; ``--encoder-only true`` writes just the ``--which`` encoder. The
SavedModel holds the ``--which`` encoder (teacher by default), with the same
serving options as carp-export. Reading .pth needs PyTorch.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from training.cli import option, parse, quiet_startup_logs
from training.export import RENAMED, ServingOptions, describe_saved_model, serving_preprocessing


@dataclass(kw_only=True)
class ConvertConfig(ServingOptions):
    """carp-convert's options: one flag (or positional argument) per field; the serving ones are carp-export's."""

    checkpoint: str = option(help=".pth released checkpoint, state dict, or .safetensors", positional=True)
    keras: str | None = option(None, ".keras file to write")
    saved_model: str | None = option(None, "SavedModel folder to write")
    which: str = option("teacher", "network for --encoder-only and --saved-model", ("teacher", "student"))
    encoder_only: bool = option(False, "write the encoder alone to --keras")
    block_size: int = option(512, "N_B of the converted CARP model")
    trust_checkpoint: bool = option(False, "unpickle any object in the .pth (only for files you trust)")

    def validate(self) -> None:
        super().validate()
        self.require(
            bool(self.keras or self.saved_model), "nothing to write: pass --keras FILE and/or --saved-model DIR"
        )
        self.require(
            not self.keras or self.keras.endswith(".keras"), f"--keras must name a .keras file, got {self.keras}"
        )
        self.positive("block_size")


def parse_config(argv: list[str] | None = None) -> ConvertConfig:
    """carp-convert's command line as a ``ConvertConfig``; bad values stop here in one line (exit status 2)."""
    return parse(ConvertConfig, argv, "carp-convert", __doc__.splitlines()[0], renamed=RENAMED)


parse_args = parse_config  # earlier name


def convert(args: ConvertConfig) -> dict:
    """Convert ``args.checkpoint``: ``{"keras": path, "saved_model": path}`` for those written. Run it in a
    TensorFlow-backend process (carp-convert sets KERAS_BACKEND)."""
    from keras_carp import convert as converter
    from keras_carp.export import check_output_path, export_encoder

    # Every output is checked before the (large) checkpoint is read.
    try:
        preprocessing = serving_preprocessing(args, args.checkpoint)
        if args.saved_model:
            check_output_path(args.saved_model, args.overwrite)
        if args.keras:
            check_output_path(args.keras, args.overwrite)
        checkpoint = converter.read_checkpoint(args.checkpoint, trust_checkpoint=args.trust_checkpoint)
        print(f"read {args.checkpoint}: networks {sorted(checkpoint.networks)}, epoch {checkpoint.epoch}")
        if args.encoder_only or not args.keras:
            model = converter.convert_encoder(checkpoint, which=args.which)
        else:
            model = converter.convert_model(checkpoint, block_size=args.block_size)
    except (ValueError, OSError, ImportError) as error:
        raise SystemExit(f"carp-convert: {error}") from None
    written = {}
    if args.keras:
        if Path(args.keras).exists():
            Path(args.keras).unlink()
        model.save(args.keras)
        print(f"Keras model written to {args.keras} ({model.count_params():,} weights)")
        written["keras"] = args.keras
    if args.saved_model:
        try:
            path = export_encoder(model, args.saved_model, encoder=args.which, preprocessing=preprocessing,
                                  include_embedding=args.embedding, include_assignments=args.assignments,
                                  overwrite=args.overwrite)  # fmt: skip
        except ValueError as error:
            raise SystemExit(f"carp-convert: {error}") from None
        print(f"SavedModel written to {path}: {describe_saved_model(path)}")
        written["saved_model"] = path
    return written


def main(argv: list[str] | None = None) -> int:
    args = parse_config(argv)
    os.environ["KERAS_BACKEND"] = "tensorflow"
    quiet_startup_logs()
    convert(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
