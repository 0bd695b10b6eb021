"""Copy detection on Copydays (DINO's ``eval_copy_detection``): mAP of the originals found for each copy.

Copydays' layout: ``original/`` holds ``NNNN00.jpg`` (the first four digits
are the block id of one scene), ``strong/`` the strong attacks, and
``jpegqual/<quality>/`` and ``crops/<percent>/`` one variant of each original
under the original's name. A query's positives are the originals with its
block id; only originals (plus optional distractors, never positive) form the
database.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from keras_carp.evaluation.knn import l2_normalize
from keras_carp.evaluation.retrieval import average_precision_from_ranks, image_file_features

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def copydays_blocks(root: str | os.PathLike) -> dict[str, list[Path]]:
    """``{"original": [...], "strong": [...], "jpegqual/50": [...], "crops/30": [...]}`` of a Copydays folder.

    Quality and crop levels are whatever subfolders exist, in numeric order.
    """
    root = Path(root)
    if not (root / "original").is_dir():
        raise FileNotFoundError(f"No Copydays 'original' folder in {root}.")
    blocks = {"original": _images(root / "original")}
    if not blocks["original"]:
        raise ValueError(f"{root / 'original'} holds no images.")
    if (root / "strong").is_dir():
        blocks["strong"] = _images(root / "strong")
    for family in ("jpegqual", "crops"):
        if (root / family).is_dir():
            levels = [d for d in (root / family).iterdir() if d.is_dir()]
            for level in sorted(levels, key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0)):
                blocks[f"{family}/{level.name}"] = _images(level)
    return {name: files for name, files in blocks.items() if files}


def block_id(path: str | os.PathLike) -> str:
    """The scene of a Copydays file: the first four characters of its name (``200301.jpg`` -> ``2003``)."""
    return Path(path).name[:4]


def copy_detection_map(
    query_features: np.ndarray,
    query_ids,
    database_features: np.ndarray,
    database_ids,
    distractor_features: np.ndarray | None = None,
) -> float:
    """mAP (%) of each query's positives (database items with its id) ranked by cosine similarity.

    Distractors join the database and are never positive. Queries without a
    positive in the database raise an error: the ground truth would be wrong.
    """
    query_ids, database_ids = np.asarray(query_ids), np.asarray(database_ids)
    database = l2_normalize(database_features)
    if distractor_features is not None and len(distractor_features):
        database = np.concatenate([database, l2_normalize(distractor_features)])
        database_ids = np.concatenate([database_ids, np.full(len(distractor_features), None, object)])
    ranks = np.argsort(-(l2_normalize(query_features) @ database.T), axis=1, kind="stable")
    aps = []
    for order, query in zip(ranks, query_ids):
        relevant = database_ids[order] == query
        if not relevant.any():
            raise ValueError(f"Query id {query!r} has no original in the database.")
        aps.append(average_precision_from_ranks(np.flatnonzero(relevant), int(relevant.sum())))
    return 100.0 * float(np.mean(aps))


def evaluate_copydays(
    encoder,
    root: str | os.PathLike,
    image_size: int = 320,
    distractors: str | os.PathLike | None = None,
    batch_size: int = 32,
) -> dict:
    """Copydays mAP (%) per block (``strong``, ``jpegqual/Q``, ``crops/C``, and ``original`` against itself),
    with the means over the jpeg and crop levels and over every variant query ("overall"; the originals
    querying themselves are reported as a check but left out of it).

    Images are resized to ``image_size`` x ``image_size`` (DINO uses 320).
    ``distractors`` is an optional folder of extra database images (DINO adds 10 000 from YFCC100M).
    """
    blocks = copydays_blocks(root)
    features = {name: image_file_features(encoder, files, image_size, batch_size=batch_size)
                for name, files in blocks.items()}  # fmt: skip
    extra = None
    if distractors is not None:
        files = _images(Path(distractors))
        if not files:
            raise ValueError(f"No distractor images in {distractors}.")
        extra = image_file_features(encoder, files, image_size, batch_size=batch_size)
    database_ids = [block_id(p) for p in blocks["original"]]
    results, weighted = {}, []
    for name, files in blocks.items():
        ids = [block_id(p) for p in files]
        results[name] = copy_detection_map(features[name], ids, features["original"], database_ids, extra)
        if name != "original":  # the originals find themselves: a sanity check, not a score
            weighted.append((results[name], len(files)))
    for family in ("jpegqual", "crops"):
        levels = [results[n] for n in results if n.startswith(family + "/")]
        if levels:
            results[family] = float(np.mean(levels))
    if weighted:
        scores, counts = np.asarray(weighted).T
        results["overall"] = float((scores * counts).sum() / counts.sum())
    results["num_database"] = len(blocks["original"]) + (0 if extra is None else len(extra))
    return results
