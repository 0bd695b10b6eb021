"""KNNMonitor and CollapseMonitor inside a short fit, on every backend."""

import logging

import keras
import numpy as np
import pytest

from keras_carp.callbacks import CollapseMonitor, KNNMonitor
from tests.conftest import random_views, tiny_model

pytestmark = pytest.mark.core


def _labelled_batches(seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(16, 16, 16, 3)).astype("float32"), rng.integers(0, 3, 16)) for _ in range(2)]


def test_knn_and_collapse_monitors_write_into_the_epoch_logs(tmp_path):
    model = tiny_model()
    model.compile(optimizer="sgd")
    knn = KNNMonitor(_labelled_batches(0), _labelled_batches(1), every=2, k=5)
    collapse = CollapseMonitor(_labelled_batches(2)[0][0])
    history = model.fit(
        random_views(batch=8),
        epochs=2,
        verbose=0,
        callbacks=[knn, collapse, keras.callbacks.CSVLogger(str(tmp_path / "log.csv"))],
    )
    first, second = history.history["knn_top1"]
    assert np.isnan(first) and 0 <= second <= 100  # evaluated at epoch 2 only
    assert list(knn.history) == [2]
    assert all(0 < usage <= 1 for usage in history.history["prototype_usage"])
    header = (tmp_path / "log.csv").read_text().splitlines()[0]
    assert "knn_top1" in header and "largest_assignment_share" in header


def test_collapse_monitor_warns_when_every_probe_lands_on_one_prototype(caplog):
    model = tiny_model()
    prototypes = model.teacher_head.prototypes
    prototypes.assign(np.repeat(keras.ops.convert_to_numpy(prototypes)[:1], prototypes.shape[0], axis=0))
    model.compile(optimizer="sgd")
    monitor = CollapseMonitor(_labelled_batches(3)[0][0], max_share=0.5)
    monitor.set_model(model)
    logs = {}
    with caplog.at_level(logging.WARNING, logger="keras_carp.evaluation"):
        monitor.on_epoch_end(0, logs)
    assert logs["largest_assignment_share"] == 1.0 and monitor.collapsed_epochs == [1]
    assert "COLLAPSE" in caplog.text


def test_run_csv_logger_writes_only_logged_columns_and_appends_under_the_existing_header(tmp_path):
    """No empty val_* columns without validation data; a resumed run's rows line up with the file's header."""
    import csv

    import keras_carp

    path = tmp_path / "log.csv"
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.ones((8, 2), "float32"), np.zeros((8, 1), "float32")
    model.fit(x, y, epochs=2, verbose=0, callbacks=[keras_carp.RunCSVLogger(str(path), append=True)])
    model.fit(x, y, initial_epoch=2, epochs=3, verbose=0, callbacks=[keras_carp.RunCSVLogger(str(path), append=True)])
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["epoch", "loss"] and [r[0] for r in rows[1:]] == ["0", "1", "2"]
    assert all(len(r) == 2 and float(r[1]) >= 0 for r in rows[1:])

    earlier = tmp_path / "earlier.csv"  # a file written by Keras' own CSVLogger, val_* columns included
    earlier.write_text("epoch,loss,val_loss\n0,0.5,NA\n")
    model.fit(x, y, initial_epoch=1, epochs=2, verbose=0,
              callbacks=[keras_carp.RunCSVLogger(str(earlier), append=True)])  # fmt: skip
    rows = list(csv.reader(earlier.open()))
    assert rows[0] == ["epoch", "loss", "val_loss"] and rows[2][0] == "1" and rows[2][2] == "NA"
