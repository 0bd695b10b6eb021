"""The Colab notebooks run end to end on CPU with a tiny configuration, through their parameters cell (papermill)."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--epochs", "1", "--batch-size", "16", "--num-prototypes", "64", "--block-size", "16", "--hidden-dim", "32",
        "--bottleneck-dim", "16", "--num-local-crops", "1", "--local-size", "16", "--warmup-epochs", "0"]  # fmt: skip


@pytest.mark.parametrize("name", ["carp_quickstart.ipynb", "carp_tpu_imagenet.ipynb"])
def test_notebooks_are_stored_without_outputs(name):
    notebook = json.loads((ROOT / "colab" / name).read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code and all(not cell["outputs"] and cell["execution_count"] is None for cell in code)
    assert sum("parameters" in cell["metadata"].get("tags", []) for cell in code) == 1


def _execute(name, tmp_path, parameters):
    papermill = pytest.importorskip("papermill")
    executed = tmp_path / name
    papermill.execute_notebook(str(ROOT / "colab" / name), str(executed), parameters=parameters, cwd=str(ROOT),
                               kernel_name="python3", progress_bar=False)  # fmt: skip
    return json.loads(executed.read_text())


def _text(notebook) -> str:
    out = []
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            out.append("".join(output.get("text", [])) + "".join(output.get("data", {}).get("text/plain", [])))
    return "\n".join(out)


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path):
    out = tmp_path / "run"
    overrides = TINY + ["--global-size", "32", "--image-size", "32"]
    notebook = _execute("carp_quickstart.ipynb", tmp_path, {"PRESET": "digits", "OUTPUT_DIR": str(out),
                                                            "OVERRIDES": overrides})  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["knn_top1"] <= 100 and "k-NN top-1" in _text(notebook)
    assert (out / "pictures" / "prototypes.png").stat().st_size > 0
    assert "largest difference from Keras" in _text(notebook)
    images = [o for c in notebook["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the contact sheet and the training curves


@pytest.mark.slow
def test_tpu_imagenet_notebook_runs_on_mock_imagenet_with_a_bucket_like_output(tmp_path):
    """CPU stands in for the TPU (strategy auto), TFDS mock data for ImageNet, TF's ram:// filesystem for gs://."""
    overrides = TINY + ["--global-size", "32", "--backbone", "resnet_tiny", "--min-image-size", "0",
                        "--eval-split", "", "--export", "true"]  # fmt: skip
    parameters = {"DATA_DIR": str(tmp_path / "tfds"), "OUTPUT_DIR": "ram://bucket/carp-smoke", "STRATEGY": "auto",
                  "OVERRIDES": overrides, "SMOKE_TEST": True}  # fmt: skip
    notebook = _execute("carp_tpu_imagenet.ipynb", tmp_path, parameters)
    text = _text(notebook)
    assert "ram://bucket/carp-smoke/encoder" in text and "imagenet2012" in text
