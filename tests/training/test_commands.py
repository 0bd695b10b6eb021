"""carp-eval, carp-finetune, carp-export, carp-convert, carp-visualize and carp-ablations: flags from one
dataclass per command (``training.cli``), booleans spelled as carp-pretrain's, one-line refusals, quiet start-up."""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from training import ablations, cli, convert, evaluate, export, finetune, pretrain, visualize
from training.config import load_preset

ROOT = Path(__file__).resolve().parents[2]

# module, its dataclass, its program name, the smallest valid command line, that command line's dataclass
COMMANDS = {
    "carp-eval": (evaluate, evaluate.EvalConfig, ["--model", "pixels"], {"model": "pixels"}),
    "carp-finetune": (finetune, finetune.FinetuneConfig, ["--model", "random:resnet_tiny"],
                      {"model": "random:resnet_tiny"}),
    "carp-export": (export, export.ExportConfig, ["m.keras", "out"], {"model": "m.keras", "output": "out"}),
    "carp-convert": (convert, convert.ConvertConfig, ["c.pth", "--keras", "c.keras"],
                     {"checkpoint": "c.pth", "keras": "c.keras"}),
    "carp-visualize": (visualize, visualize.VisualizeConfig, ["runs/x"], {"run": "runs/x"}),
    "carp-ablations": (ablations, ablations.AblationsConfig, [], {}),
}  # fmt: skip
# The function each main() hands the parsed dataclass to.
COMMAND_FUNCTIONS = {"carp-eval": "_evaluate", "carp-finetune": "finetune", "carp-export": "export",
                     "carp-convert": "convert", "carp-visualize": "visualize"}  # fmt: skip


RESULTS = {"output": "r.json", "labelled_images": 10, "top1": 50.0, "top5": 90.0}  # a stub command's


def _help(prog: str, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping: each help text on one line
    module = COMMANDS[prog][0]
    with pytest.raises(SystemExit) as stopped:
        module.main(["--help"])
    assert stopped.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("prog", COMMANDS)
def test_every_field_is_an_argument_with_its_help(prog, capsys, monkeypatch):
    module, config_class, _, _ = COMMANDS[prog]
    text = _help(prog, capsys, monkeypatch)
    assert text.startswith(f"usage: {prog} ")
    parser = cli.build_parser(config_class, prog)
    arguments = {action.dest for action in parser._actions if action.dest != "help"}
    fields = dataclasses.fields(config_class)
    assert arguments == {f.name for f in fields if not f.metadata["cli"]["remainder"]}
    for spec in fields:
        cli_spec = spec.metadata["cli"]
        if cli_spec["remainder"]:
            shown = f"-- {spec.name.upper()}..."
        else:
            shown = spec.name.upper() if cli_spec["positional"] else cli.flag_name(spec.name)
        assert shown in text, spec.name
        assert spec.metadata["help"], f"{prog}: {spec.name} has no help"
        assert spec.metadata["help"] in text, spec.name


@pytest.mark.parametrize("prog", COMMANDS)
def test_the_parsed_command_line_is_the_commands_dataclass(prog):
    module, config_class, argv, values = COMMANDS[prog]
    config = module.parse_config(argv)
    assert type(config) is config_class and config == config_class(**values)
    assert isinstance(config, cli.CommandConfig)
    flags = {"carp-eval": (["--knn-k", "5", "20", "--datasets", "cifar10,stl10"], {"knn_k": (5, 20),
                                                                                   "datasets": ("cifar10", "stl10")}),
             "carp-finetune": (["--crop-scale", "0.2", "1", "--milestones"], {"crop_scale": (0.2, 1.0),
                                                                               "milestones": ()}),
             "carp-export": (["--mean", "0.5", "0.5", "0.5", "--resize", "false"], {"mean": (0.5,) * 3,
                                                                                    "resize": False}),
             "carp-convert": (["--block-size", "64", "--which", "student"], {"block_size": 64, "which": "student"}),
             "carp-visualize": (["--max-images", "10", "--output", "pics"], {"max_images": 10, "output": "pics"}),
             "carp-ablations": (["--rows", "fixed,one-block", "--", "--epochs", "2"],
                                {"rows": ("fixed", "one-block"), "pretrain_args": ("--epochs", "2")})}  # fmt: skip
    extra, expected = flags[prog]
    config = module.parse_config(argv + extra)
    assert {key: getattr(config, key) for key in expected} == expected


def _pretrain_boolean_action():
    parser = pretrain.build_parser(load_preset("digits"))
    return next(action for action in parser._actions if "--export" in action.option_strings)


@pytest.mark.parametrize("prog", COMMANDS)
def test_booleans_are_spelled_as_carp_pretrains(prog, capsys):
    module, config_class, argv, _ = COMMANDS[prog]
    reference = _pretrain_boolean_action()  # --export true/false
    parser = cli.build_parser(config_class, prog)
    hints = typing.get_type_hints(config_class)
    booleans = [f.name for f in dataclasses.fields(config_class) if hints[f.name] is bool]
    assert cli.boolean_flags(config_class) == [cli.flag_name(name) for name in booleans]
    for name in booleans:
        flag = cli.flag_name(name)
        action = next(a for a in parser._actions if flag in a.option_strings)
        assert (action.type, action.metavar, action.nargs) == (reference.type, reference.metavar, reference.nargs)
        for word, value in (("true", True), ("false", False), ("yes", True), ("0", False)):
            assert getattr(module.parse_config(argv + [flag, word]), name) is value
        with pytest.raises(SystemExit) as stopped:
            module.parse_config(argv + [flag])
        assert stopped.value.code == 2
        assert capsys.readouterr().err == f"{prog}: {flag} takes true or false ({flag} true), as every boolean flag\n"
    for argument in parser._actions:  # no store_true / --no-x spellings
        assert not isinstance(argument, (argparse._StoreConstAction, argparse.BooleanOptionalAction))


def test_the_boolean_flags_of_every_command():
    """The booleans whose spelling changed (``--flag`` -> ``--flag true``, ``--no-resize`` -> ``--resize false``)."""
    assert cli.boolean_flags(evaluate.EvalConfig) == ["--transfer", "--download"]
    assert cli.boolean_flags(export.ExportConfig) == ["--resize", "--embedding", "--assignments", "--overwrite"]
    assert cli.boolean_flags(convert.ConvertConfig) == ["--resize", "--embedding", "--assignments", "--overwrite",
                                                        "--encoder-only", "--trust-checkpoint"]  # fmt: skip
    assert cli.boolean_flags(finetune.FinetuneConfig) == cli.boolean_flags(visualize.VisualizeConfig) == []
    assert cli.boolean_flags(ablations.AblationsConfig) == []


@pytest.mark.parametrize(
    "prog, argv, message",
    [
        ("carp-eval", ["--model", "pixels", "--knn-k", "20", "0"], "--knn-k must be positive, got 0"),
        ("carp-eval", ["--model", "pixels", "--crop-fraction", "1.5"], "--crop-fraction must be in (0, 1], got 1.5"),
        ("carp-eval", ["--model", "pixels", "--protocols", "knn,magic"], "unknown protocols ['magic']"),
        ("carp-eval", ["--model", "pixels", "--dataset", "digits", "--datasets", "cifar10"], "give either --dataset"),
        ("carp-eval", ["--model", "pixels", "--knn-k", "five"], "argument --knn-k: invalid int value: 'five'"),
        ("carp-eval", ["--model", "pixels", "--download", "maybe"], "expected true or false, got 'maybe'"),
        ("carp-eval", [], "the following arguments are required: --model"),
        ("carp-finetune", ["--model", "random:resnet_tiny", "--batch-size", "0"], "--batch-size must be positive"),
        ("carp-finetune", ["--model", "random:resnet_tiny", "--verbose", "3"], "invalid choice: 3"),
        ("carp-export", ["m.keras", "out", "--image-size", "0"], "--image-size must be positive, got 0"),
        ("carp-export", ["m.keras", "out", "--no-resize"], "--no-resize is now --resize false"),
        ("carp-export", ["m.keras"], "give an OUTPUT SavedModel folder, --keras-hub-preset DIR, or both"),
        ("carp-convert", ["c.pth", "--keras", "c.h5"], "--keras must name a .keras file, got c.h5"),
        ("carp-convert", ["c.pth"], "nothing to write"),
        ("carp-visualize", ["runs/x", "--prototypes", "0"], "--prototypes must be positive, got 0"),
        ("carp-ablations", ["--second-block-size", "0"], "--second-block-size must be positive, got 0"),
        ("carp-ablations", ["--rows", "fixed,bogus"], "unknown rows ['bogus']"),
        ("carp-ablations", ["--preset", "nope"], "unknown --preset 'nope'; available: cifar10_resnet18"),
    ],
)
def test_a_bad_value_is_refused_in_one_line_before_any_work(prog, argv, message, capsys, monkeypatch):
    module = COMMANDS[prog][0]
    started = []
    monkeypatch.setattr(module, "quiet_startup_logs", lambda: started.append(True), raising=False)
    with pytest.raises(SystemExit) as stopped:
        module.main(argv)
    assert stopped.value.code == 2 and message in str(stopped.value)
    captured = capsys.readouterr()
    assert captured.out == "" and not started  # before TensorFlow is imported
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: ") and message in lines[0], captured.err
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("prog", [prog for prog in COMMANDS if prog != "carp-ablations"])
def test_main_quiets_the_start_up_then_hands_the_dataclass_to_the_command(prog, monkeypatch):
    """carp-pretrain's quiet start-up (TensorFlow's banner and CUDA probe held back) before the command imports TF.

    carp-ablations imports no TensorFlow itself: each row is a carp-pretrain process, quiet on its own.
    """
    module, config_class, argv, values = COMMANDS[prog]
    assert module.quiet_startup_logs is pretrain.quiet_startup_logs
    calls = []
    monkeypatch.setattr(module, "quiet_startup_logs", lambda: calls.append("quiet"))
    monkeypatch.setattr(module, COMMAND_FUNCTIONS[prog], lambda config: calls.append(config) or RESULTS)
    monkeypatch.setenv("KERAS_BACKEND", os.environ.get("KERAS_BACKEND", "tensorflow"))  # export/convert set it
    if prog == "carp-eval":  # the dataclass, resolved as training.evaluation reads it
        monkeypatch.setattr(evaluate, "format_table", lambda results: "")
        expected = config_class(**values).resolved()
    else:
        expected = config_class(**values)
    assert module.main(argv) == 0
    assert calls == ["quiet", expected]


def test_ablations_hands_its_dataclass_to_the_runs(monkeypatch):
    seen = []
    monkeypatch.setattr(ablations, "ablations", seen.append)
    assert ablations.main(["--rows", "fixed", "--", "--epochs", "3"]) == 0
    assert seen == [ablations.AblationsConfig(rows=("fixed",), pretrain_args=("--epochs", "3"))]


def test_python_callers_get_the_same_validation_and_types():
    with pytest.raises(ValueError, match="--knn-k must be positive, got 0"):
        evaluate.EvalConfig(model="pixels", knn_k=(20, 0))
    with pytest.raises(ValueError, match="--encoder must be one of teacher, student, got 'both'"):
        evaluate.EvalConfig(model="pixels", encoder="both")
    config = evaluate.EvalConfig(model="pixels", datasets="cifar10, stl10", knn_k=[5, 20])
    assert config.datasets == ("cifar10", "stl10") and config.knn_k == (5, 20) and config.many
    assert evaluate.EvalConfig(model="pixels", knn_k=20).knn_k == (20,)
    with pytest.raises(TypeError):
        evaluate.EvalConfig()  # --model is required
    with pytest.raises(ValueError, match="label fraction must be in"):
        finetune.FinetuneConfig(model="random:resnet_tiny", label_fraction=float("nan"))
    with pytest.raises(ValueError, match="--std must be positive"):
        export.ExportConfig(model="m.keras", output="out", std=(0.2, 0.0, 0.2))
    resolved = evaluate.EvalConfig(model="pixels", protocols="knn").resolved()
    assert resolved.protocols == ["knn"] and resolved.dataset == "digits" and resolved.knn_k == [10, 20, 100, 200]
    assert evaluate.EvalConfig(model="pixels").resolved().protocols == list(evaluate.PROTOCOLS)


def test_finetune_defaults_are_the_protocols():
    """One default per hyperparameter: FinetuneConfig repeats keras_carp.finetune's (it does not import Keras)."""
    from keras_carp import finetune as protocol

    config = finetune.FinetuneConfig(model="random:resnet_tiny")
    assert (config.epochs, config.encoder_lr, config.head_lr, config.momentum) == (
        protocol.EPOCHS, protocol.ENCODER_LEARNING_RATE, protocol.HEAD_LEARNING_RATE, protocol.MOMENTUM)  # fmt: skip
    assert (config.milestones, config.lr_factor, config.crop_scale) == (
        protocol.MILESTONES, protocol.DECAY_FACTOR, protocol.CROP_SCALE)  # fmt: skip


def test_importing_the_commands_imports_no_tensorflow():
    """--help and refusals answer before TensorFlow loads (and so before its start-up lines)."""
    code = ("import sys; import training.evaluate, training.finetune, training.export, training.convert, "
            "training.visualize, training.ablations; print(sorted({'tensorflow', 'keras', 'jax', 'torch'} & "
            "set(sys.modules)))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


# TensorFlow's start-up lines: the absl banner, oneDNN, CUDA stubs and the CUDA probe of a host without a GPU.
PROBE_LINES = ("absl::InitializeLog", "oneDNN", "cudart_stub", "cuInit", "cuda_", "cpu_feature_guard",
               "Could not find cuda drivers", "TF-TRT")  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run directory as carp-pretrain leaves it (config.json, model.keras), without training."""
    import keras

    from tests.conftest import random_views, tiny_model

    run = tmp_path_factory.mktemp("commands") / "run"
    run.mkdir()
    config = load_preset("digits").replace(global_size=16, image_size=16, num_prototypes=64, block_size=16)
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    model.fit(x=random_views(batch=8), batch_size=8, epochs=1, verbose=0)
    model.save(run / "model.keras")
    return run


@pytest.mark.slow
@pytest.mark.parametrize(
    "prog, argv",
    [
        ("carp-visualize", ["{run}", "--max-images", "50", "--prototypes", "2", "--images-per-prototype", "2"]),
        (
            "carp-eval",
            [
                "--model",
                "pixels",
                "--image-size",
                "8",
                "--protocols",
                "knn",
                "--knn-k",
                "5",
                "--output",
                "{run}/pixels.json",
            ],
        ),  # fmt: skip
        ("carp-export", ["{run}/model.keras", "{run}/encoder", "--embedding", "true", "--overwrite", "true"]),
    ],
)
def test_start_up_prints_no_tensorflow_probe_lines(prog, argv, tiny_run):
    """As carp-pretrain: TensorFlow's import and CUDA probe lines are held back (no TF_CPP_MIN_LOG_LEVEL set)."""
    module = COMMANDS[prog][0].__name__
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    env.update(
        KERAS_BACKEND="tensorflow", PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    )
    command = [sys.executable, "-m", module, *(word.format(run=tiny_run) for word in argv)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    probes = [line for line in done.stderr.splitlines() if any(word in line for word in PROBE_LINES)]
    assert probes == [], done.stderr[-3000:]
