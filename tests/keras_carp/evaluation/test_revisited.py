"""Revisited Oxford/Paris mAP against revisitop's algorithm written out here, and hand-made ground truth."""

import pickle

import numpy as np
import pytest
from PIL import Image

from keras_carp.evaluation.retrieval import average_precision_from_ranks
from keras_carp.evaluation.revisited import (
    compute_map,
    evaluate_revisited,
    load_revisited_ground_truth,
    revisited_map,
    setup_ground_truth,
)


def _reference_map(ranks, gnd, kappas=(1, 5, 10)):
    """revisitop's compute_map, query by query: junk shifts the positions of the positives after it."""
    aps, prs = [], []
    for order, entry in zip(ranks, gnd):
        ok, junk = list(entry["ok"]), list(entry.get("junk", []))
        if not ok:
            continue
        pos = [p for p, item in enumerate(order) if item in ok]
        junk_pos = [p for p, item in enumerate(order) if item in junk]
        pos = [p - sum(j < p for j in junk_pos) for p in pos]
        ap = 0.0
        for found, rank in enumerate(pos):
            before = 1.0 if rank == 0 else found / rank
            ap += (before + (found + 1) / (rank + 1)) / 2 / len(ok)
        aps.append(ap)
        one_based = np.asarray(pos) + 1
        prs.append([(one_based <= min(one_based.max(), k)).sum() / min(one_based.max(), k) for k in kappas])
    return float(np.mean(aps)), np.mean(prs, axis=0)


def _random_ground_truth(rng, num_queries, num_database):
    gnd = []
    for _ in range(num_queries):
        items = rng.permutation(num_database)
        easy, hard, junk = np.split(items[: rng.integers(0, 12)], [rng.integers(0, 5), rng.integers(5, 9)])
        gnd.append({"easy": easy.tolist(), "hard": hard.tolist(), "junk": junk.tolist(), "bbx": [0, 0, 8, 8]})
    return gnd


def test_average_precision_of_known_rankings():
    assert average_precision_from_ranks([0, 1], 2) == pytest.approx(1.0)
    # positives at 0 and 2: (1 + 1)/2 * 1/2 + (1/2 + 2/3)/2 * 1/2
    assert average_precision_from_ranks([0, 2], 2) == pytest.approx(0.5 + (0.5 + 2 / 3) / 4)
    assert average_precision_from_ranks([2, 0], 2) == pytest.approx(0.5 + (0.5 + 2 / 3) / 4)  # any order
    assert average_precision_from_ranks([1], 2) == pytest.approx((0 + 0.5) / 2 / 2)  # one positive never found


def test_hand_made_ground_truth_with_known_answers():
    ranks = np.array([[0, 1, 2, 3, 4]])
    gnd = [{"easy": [0], "hard": [2], "junk": [1]}]
    easy = compute_map(ranks, setup_ground_truth(gnd, "easy"))  # ok {0}; junk {1, 2}
    assert easy["map"] == pytest.approx(1.0) and easy["precision_at"][5] == pytest.approx(1.0)
    medium = compute_map(ranks, setup_ground_truth(gnd, "medium"))  # ok {0, 2}, junk {1}: ranks 0 and 1
    assert medium["map"] == pytest.approx(1.0)
    hard = compute_map(ranks, setup_ground_truth(gnd, "hard"))  # ok {2}; junk {1, 0}: rank 0
    assert hard["map"] == pytest.approx(1.0)
    no_junk = compute_map(ranks, [{"ok": [0, 2]}])
    assert no_junk["map"] == pytest.approx(0.5 + (0.5 + 2 / 3) / 4)
    assert no_junk["precision_at"][1] == 1.0 and no_junk["precision_at"][5] == pytest.approx(2 / 3)
    # a query without positives is skipped, not scored zero
    skipped = compute_map(np.array([[0, 1, 2], [0, 1, 2]]), [{"ok": [1]}, {"ok": []}])
    assert skipped["map"] == pytest.approx(0.25) and np.isnan(skipped["aps"][1])
    assert np.isnan(compute_map(np.array([[0, 1]]), [{"ok": []}])["map"])  # no positive at all: NaN


@pytest.mark.parametrize("setup", ["easy", "medium", "hard"])
def test_compute_map_matches_revisitop_reference(setup):
    rng = np.random.default_rng(0)
    gnd = _random_ground_truth(rng, 25, 30)
    ranks = np.stack([rng.permutation(30) for _ in range(25)])
    ours = compute_map(ranks, setup_ground_truth(gnd, setup))
    expected_map, expected_pr = _reference_map(ranks, setup_ground_truth(gnd, setup))
    assert ours["map"] == pytest.approx(expected_map)
    assert [ours["precision_at"][k] for k in (1, 5, 10)] == pytest.approx(expected_pr)


def test_revisited_map_ranks_by_cosine_similarity():
    rng = np.random.default_rng(1)
    database = rng.normal(size=(30, 8))
    queries = rng.normal(size=(6, 8))
    gnd = _random_ground_truth(rng, 6, 30)
    results = revisited_map(queries, database, gnd)
    sims = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
        database / np.linalg.norm(database, axis=1, keepdims=True)
    ).T
    ranks = np.argsort(-sims, axis=1)
    for setup in ("easy", "medium", "hard"):
        assert results[setup]["map"] == pytest.approx(100 * _reference_map(ranks, setup_ground_truth(gnd, setup))[0])


def _write_dataset(root, colours, queries):
    (root / "jpg").mkdir(parents=True)
    names = []
    for i, colour in enumerate(colours):
        names.append(f"db_{i}")
        Image.new("RGB", (24, 16), colour).save(root / "jpg" / f"db_{i}.jpg")
    qnames, gnd = [], []
    for j, (colour, easy, hard, junk) in enumerate(queries):
        image = Image.new("RGB", (24, 16), (128, 128, 128))
        image.paste(Image.new("RGB", (10, 8), colour), (2, 3))  # the object, inside the query's box
        image.save(root / "jpg" / f"q_{j}.jpg")
        qnames.append(f"q_{j}")
        gnd.append({"easy": easy, "hard": hard, "junk": junk, "bbx": [2, 3, 12, 11]})
    with open(root / "gnd_roxford5k.pkl", "wb") as file:
        pickle.dump({"imlist": names, "qimlist": qnames, "gnd": gnd}, file)


def test_evaluate_revisited_on_a_tiny_folder(tmp_path):
    import keras

    inputs = keras.Input((None, None, 3))
    encoder = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))  # mean colour
    colours = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (240, 30, 20)]
    _write_dataset(tmp_path / "roxford5k", colours, [((250, 10, 10), [0], [3], [1]), ((10, 10, 250), [2], [], [])])
    results = evaluate_revisited(encoder, tmp_path / "roxford5k", "roxford5k", image_size=12)
    # the cropped red query finds db_0 then db_3; the blue one finds db_2 first
    assert results["easy"]["map"] == pytest.approx(100.0)
    assert results["medium"]["map"] == pytest.approx(100.0)
    assert results["num_queries"] == 2 and results["num_database"] == 4


def test_bad_ground_truth_is_reported(tmp_path):
    with open(tmp_path / "gnd_x.pkl", "wb") as file:
        pickle.dump({"imlist": [], "gnd": []}, file)
    with pytest.raises(ValueError, match="qimlist"):
        load_revisited_ground_truth(tmp_path / "gnd_x.pkl")
    with pytest.raises(FileNotFoundError):
        load_revisited_ground_truth(tmp_path / "missing.pkl")
