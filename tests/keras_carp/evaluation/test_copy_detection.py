"""Copydays copy detection against a query-by-query reference, on random features and a tiny fake folder."""

import numpy as np
import pytest
from PIL import Image

from keras_carp.evaluation.copy_detection import block_id, copy_detection_map, copydays_blocks, evaluate_copydays


def _trapezoid_ap(ranks, positives):
    """DINO's score_ap_from_ranks_1, written out."""
    ap = 0.0
    for found, rank in enumerate(sorted(ranks)):
        before = 1.0 if rank == 0 else found / rank
        ap += (before + (found + 1) / (rank + 1)) / 2 / positives
    return ap


def _reference(queries, query_ids, database, database_ids):
    norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    aps = []
    for q, qid in zip(norm(queries), query_ids):
        order = np.argsort(-(norm(database) @ q))
        ranks = [r for r, i in enumerate(order) if database_ids[i] == qid]
        aps.append(_trapezoid_ap(ranks, sum(d == qid for d in database_ids)))
    return 100 * np.mean(aps)


def test_copy_detection_map_matches_the_reference_with_distractors():
    rng = np.random.default_rng(0)
    database = rng.normal(size=(12, 6))
    database_ids = [f"{i // 2:04d}" for i in range(12)]  # two originals per block
    queries = database[::3] + 0.8 * rng.normal(size=(4, 6))
    query_ids = database_ids[::3]
    distractors = rng.normal(size=(20, 6))
    ours = copy_detection_map(queries, query_ids, database, database_ids, distractors)
    expected = _reference(queries, query_ids, np.concatenate([database, distractors]), database_ids + [None] * 20)
    assert ours == pytest.approx(expected)
    assert 0 < ours < 100
    assert copy_detection_map(database, database_ids, database, database_ids) < 100  # pairs share a block
    with pytest.raises(ValueError, match="no original"):
        copy_detection_map(queries, ["9999"] * 4, database, database_ids)


def _save(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 14), colour).save(path, quality=95)


def test_evaluate_copydays_on_a_tiny_folder(tmp_path):
    import keras

    inputs = keras.Input((None, None, 3))
    encoder = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))  # mean colour
    originals = {"200000": (250, 10, 10), "200100": (10, 250, 10), "200200": (10, 10, 250)}
    for name, colour in originals.items():
        _save(tmp_path / "original" / f"{name}.jpg", colour)
        _save(tmp_path / "jpegqual" / "50" / f"{name}.jpg", colour)
        _save(tmp_path / "crops" / "10" / f"{name}.jpg", colour)
    _save(tmp_path / "strong" / "200001.jpg", (240, 20, 10))  # near its original
    _save(tmp_path / "strong" / "200101.jpg", (10, 10, 240))  # looks like block 2002: found second
    (tmp_path / "strong" / "notes.txt").write_text("ignored")
    blocks = copydays_blocks(tmp_path)
    assert list(blocks) == ["original", "strong", "jpegqual/50", "crops/10"]
    assert block_id(blocks["strong"][1]) == "2001"
    results = evaluate_copydays(encoder, tmp_path, image_size=8)
    assert results["jpegqual/50"] == pytest.approx(100) and results["crops"] == pytest.approx(100)
    # the second strong query finds its original at rank 1: trapezoid AP (0 + 1/2) / 2
    assert results["strong"] == pytest.approx(100 * (1 + 0.25) / 2)
    assert results["overall"] == pytest.approx((2 * 62.5 + 3 * 100 + 3 * 100) / 8)
    assert results["num_database"] == 3
    with pytest.raises(FileNotFoundError, match="original"):
        copydays_blocks(tmp_path / "strong")
