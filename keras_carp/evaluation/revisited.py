"""Revisited Oxford and Paris (rOxford5k, rParis6k): mAP for the Easy, Medium and Hard setups.

The ground truth is revisitop's ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl``: a
dict with ``imlist`` (database image names), ``qimlist`` (query image names)
and ``gnd``, one dict per query with index lists ``easy``, ``hard``, ``junk``
and the query's crop ``bbx`` (x1, y1, x2, y2). Images are ``<root>/jpg/<name>.jpg``.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from keras_carp.evaluation.knn import l2_normalize
from keras_carp.evaluation.retrieval import average_precision_from_ranks, image_file_features

SETUPS = ("easy", "medium", "hard")
KAPPAS = (1, 5, 10)


def load_revisited_ground_truth(path: str | os.PathLike) -> dict:
    """The pickled revisitop ground truth, checked: ``imlist``, ``qimlist`` and one ``gnd`` entry per query."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No revisited ground truth at {path} (expected revisitop's gnd_<dataset>.pkl).")
    with open(path, "rb") as file:
        data = pickle.load(file)
    missing = [key for key in ("imlist", "qimlist", "gnd") if key not in data]
    if missing:
        raise ValueError(f"{path} lacks {missing}: not a revisitop ground-truth file.")
    if len(data["gnd"]) != len(data["qimlist"]):
        raise ValueError(f"{path}: {len(data['gnd'])} gnd entries for {len(data['qimlist'])} queries.")
    for i, entry in enumerate(data["gnd"]):
        for key in ("easy", "hard", "junk"):
            if key not in entry:
                raise ValueError(f"{path}: gnd[{i}] has no {key!r} list.")
    return data


def setup_ground_truth(gnd: Sequence[dict], setup: str) -> list[dict]:
    """Per query ``{"ok": positives, "junk": ignored}`` for ``setup``.

    Easy: easy positives, hard ones ignored; Medium: easy and hard positives;
    Hard: hard positives, easy ones ignored. The dataset's junk is always ignored.
    """
    if setup not in SETUPS:
        raise ValueError(f"setup must be one of {SETUPS}, got {setup!r}.")
    out = []
    for entry in gnd:
        easy, hard, junk = (np.asarray(entry[k], "int64").ravel() for k in ("easy", "hard", "junk"))
        if setup == "easy":
            out.append({"ok": easy, "junk": np.concatenate([junk, hard])})
        elif setup == "medium":
            out.append({"ok": np.concatenate([easy, hard]), "junk": junk})
        else:
            out.append({"ok": hard, "junk": np.concatenate([junk, easy])})
    return out


def compute_map(ranks: np.ndarray, gnd: Sequence[dict], kappas: Sequence[int] = KAPPAS) -> dict:
    """mAP and mean precision@k over queries, junk ignored (revisitop's ``compute_map``).

    ``ranks`` is [num_queries, num_database]: each query's database indices,
    best first. ``gnd`` holds per query ``ok`` (positives) and optionally
    ``junk`` indices. A junk image is taken out of the ranking, so positives
    after it move up one place. Queries without positives are skipped.
    Returns fractions in [0, 1]: ``map``, ``aps`` (NaN for skipped queries) and
    ``precision_at`` ({k: mP@k}); precision@k uses ``min(k, rank of the last
    positive)`` as its denominator, as revisitop does.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or len(ranks) != len(gnd):
        raise ValueError(f"ranks must be [num_queries={len(gnd)}, num_database], got shape {ranks.shape}.")
    aps = np.full(len(gnd), np.nan)
    precisions = np.full((len(gnd), len(kappas)), np.nan)
    for i, (order, entry) in enumerate(zip(ranks, gnd)):
        positives = np.asarray(entry["ok"], "int64").ravel()
        if positives.size == 0:
            continue
        junk = np.asarray(entry.get("junk", []), "int64").ravel()
        kept = order[~np.isin(order, junk)]
        positions = np.flatnonzero(np.isin(kept, positives))  # 0-based, junk removed
        aps[i] = average_precision_from_ranks(positions, len(positives))
        one_based = positions + 1
        for j, kappa in enumerate(kappas):
            cut = min(int(one_based.max()), kappa) if one_based.size else kappa
            precisions[i, j] = (one_based <= cut).sum() / cut
    valid = ~np.isnan(aps)
    if not valid.any():  # e.g. a setup whose lists are all empty: NaN, as revisitop's 0 / 0
        return {"map": float("nan"), "aps": aps, "precision_at": {int(k): float("nan") for k in kappas}}
    return {"map": float(aps[valid].mean()), "aps": aps,
            "precision_at": {int(k): float(precisions[valid, j].mean()) for j, k in enumerate(kappas)}}  # fmt: skip


def revisited_map(
    query_features: np.ndarray, database_features: np.ndarray, gnd: Sequence[dict], kappas: Sequence[int] = KAPPAS
) -> dict:
    """mAP and mP@k (%) for the Easy, Medium and Hard setups, ranking by cosine similarity.

    Returns ``{setup: {"map": %, "mp@1": %, "mp@5": %, "mp@10": %}}``.
    """
    queries, database = l2_normalize(query_features), l2_normalize(database_features)
    if len(queries) != len(gnd):
        raise ValueError(f"{len(queries)} query features for {len(gnd)} ground-truth entries.")
    ranks = np.argsort(-(queries @ database.T), axis=1, kind="stable")
    results = {}
    for setup in SETUPS:
        scores = compute_map(ranks, setup_ground_truth(gnd, setup), kappas)
        results[setup] = {"map": 100.0 * scores["map"],
                          **{f"mp@{k}": 100.0 * v for k, v in scores["precision_at"].items()}}  # fmt: skip
    return results


def find_revisited(root: str | os.PathLike, name: str | None = None) -> tuple[Path, Path]:
    """(ground-truth pickle, image folder) of a revisitop dataset folder: ``gnd_<name>.pkl`` and ``jpg/``."""
    root = Path(root)
    pickles = [root / f"gnd_{name}.pkl"] if name else sorted(root.glob("gnd_*.pkl"))
    pickles = [p for p in pickles if p.is_file()]
    if not pickles:
        raise FileNotFoundError(f"No revisitop ground truth (gnd_{name or '*'}.pkl) in {root}.")
    images = root / "jpg" if (root / "jpg").is_dir() else root
    return pickles[0], images


def evaluate_revisited(
    encoder,
    root: str | os.PathLike,
    name: str | None = None,
    image_size: int = 224,
    keep_aspect: bool = True,
    extension: str = ".jpg",
) -> dict:
    """Revisited Oxford/Paris mAP of ``encoder`` on the dataset in ``root`` (see ``find_revisited``).

    Queries are cropped to their ``bbx``; every image's longer side is resized
    to ``image_size`` (DINO's single-scale protocol).
    """
    gnd_path, images = find_revisited(root, name)
    data = load_revisited_ground_truth(gnd_path)

    def files(names):
        paths = [images / (n if n.endswith(extension) else n + extension) for n in names]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images listed in {gnd_path} are missing, e.g. {missing[:3]}.")
        return paths

    database = image_file_features(encoder, files(data["imlist"]), image_size, keep_aspect=keep_aspect)
    boxes = [entry.get("bbx") for entry in data["gnd"]]
    queries = image_file_features(encoder, files(data["qimlist"]), image_size, boxes, keep_aspect=keep_aspect)
    results = revisited_map(queries, database, data["gnd"])
    results.update(num_queries=len(queries), num_database=len(database))
    return results
