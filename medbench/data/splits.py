"""Train / val / test splits that never put one patient (or lesion) on two sides.

``grouped`` (``stratify: true``, the default): label-stratified and grouped.
Each group (patient, lesion) is one unit carrying its image count and its
counts per *stratum*: for binary and multilabel tasks the positive and the
negative images of each label (missing labels count in neither), for
multiclass tasks the images of each class. Units are assigned by iterative
stratification (Sechidis, Tsoumakas & Vlahavas 2011, "On the stratification
of multi-label data", with patients as the examples):

1. each split ``s`` wants ``fraction_s x total`` of every stratum and of the images;
2. take the stratum with the fewest images among the units not yet assigned
   (ties: the task's label order); its units go, one by one, to the split that
   wants the most of that stratum among those the unit brings closer to their
   targets in every stratum it holds and in images (it holds at most twice
   what the split still wants; ties: the split that wants the most images,
   then train, val, test); when there is none, to the one it overshoots least
   relative to that split's targets. Every want is then reduced by the unit's
   counts. The units go in the seeded order, except that a unit holding more of the stratum than the smallest
   split wants of it goes first (largest first): a patient with 20 of a rare
   label's 31 images is placed while the largest split can take it, and the
   few others then reach validation and test;
3. repeat until every stratum is placed; units without a label go, in the
   seeded order, by the same rule with the images as their stratum.

Before a stratum is apportioned by want, it reaches every split once, in the
order train (to be learnt), test (to be scored), validation: its first units go
to the first split that has none of it yet. A class of 2 or 3 patients is then
in train and test (and validation) rather than all in train, which rounding by
want would do; for common strata this moves nothing measurable.

No patient holds more than a tenth of a smaller split's images (or twice the
median patient's, for tiny splits): heavier patients are trained on, so a
validation or test split is never a study of a few patients (the NIH sample
has patients with 66, 61 and 47 of its 1000 images). Otherwise a patient's
image count does not decide its side (the mean images per patient of train
and of validation/test agree within a few percent on heavy-tailed synthetic
data).

The seeded order is a keyed hash of (split seed, group id), so the result is
a pure function of the groups, their labels and the split seed: independent
of row order (a rerun, another backbone or a reshuffled CSV sees the same
split). Each split's count of a stratum ends within about one patient's
images of its target (a unit holds all of a patient's images; on synthetic
sets of 300 patients with 1-3 images each, within 4 images, where the
unstratified cut missed by up to 18; tests/test_splits.py counts it row by
row). Rare labels therefore reach
validation and test whenever there are at least as many patients carrying them
as splits; on small datasets this keeps validation and test prevalences equal
(an unstratified cut gave 44 % vs 31 % positives on a 322-image set).

``grouped`` with ``stratify: false``: groups in the seeded order are cut at the
cumulative image fractions (the only method before label stratification; a
dataset that grows keeps most patients on their side, which the stratified
assignment does not promise: a run store keeps its split in ``splits/`` either
way).

``official``: the publisher's ``split`` column, renamed per the spec; when the
publisher ships no validation split, ``val_fraction`` of the official training
groups is held out, stratified the same way. Rows without an official split (an
NIH image in neither list file, a blank cell of a csv task's split column) are
left out (``drop``) and counted by :func:`medbench.data.task_data.load_task_data`.
With ``fallback: grouped``, a copy without the official split (every ``split``
null) is split ``grouped`` instead.

A task whose fractions give ``train: 0`` (``fractions: {test: 1}``) is
evaluation-only: every row is a test row (an OOD target's external set).
"""

from __future__ import annotations

import hashlib

import numpy as np
import polars as pl

from medbench.data.base import DatasetIndex
from medbench.errors import DataError
from medbench.spec import SplitSpec

SPLITS = ("train", "val", "test")
#: the largest share of a validation or test split's images one patient may hold (see stratified_assignment)
MAX_SHARE_OF_A_SPLIT = 0.1


def _group_order(groups: list[str], seed: int) -> list[str]:
    key = f"medbench-split:{seed}:".encode()
    return sorted(groups, key=lambda g: hashlib.blake2b(g.encode(), key=key[:64], digest_size=8).digest())


def _names(fractions: dict[str, float]) -> list[str]:
    return [s for s in SPLITS if fractions.get(s, 0) > 0]


def _cut(groups: list[str], sizes: dict[str, int], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Unstratified: ordered groups cut so each split's image share approaches its fraction."""
    order = _group_order(groups, seed)
    total = sum(sizes[g] for g in order)
    names = _names(fractions)
    bounds = np.cumsum([fractions[s] for s in names]) * total
    out: dict[str, str] = {}
    acc = 0
    k = 0
    for g in order:
        # a group goes to split k while the running count stays within its bound
        while k < len(names) - 1 and acc + sizes[g] / 2 > bounds[k]:
            k += 1
        out[g] = names[k]
        acc += sizes[g]
    return out


def strata_counts(labels: np.ndarray, task_type: str) -> np.ndarray:
    """Per row, its count in each stratum ``[N, K]``: multiclass, one column per class (the one-hot row);
    binary and multilabel, a positive and a negative column per label. Missing labels count in neither."""
    y = np.asarray(labels, dtype=np.float64)
    if task_type == "multiclass":
        return np.nan_to_num(y, nan=0.0).astype(np.int64)
    pos = (y == 1).astype(np.int64)
    neg = (y == 0).astype(np.int64)
    return np.stack([pos, neg], axis=2).reshape(len(y), -1)


def stratified_assignment(groups: list[str], sizes: np.ndarray, counts: np.ndarray, fractions: dict[str, float],
                          seed: int) -> dict[str, str]:
    """Iterative stratification of whole groups (see the module docstring): group -> split name.

    ``sizes[g]`` is the image count of ``groups[g]``, ``counts[g, k]`` its images in stratum ``k``.
    """
    names = _names(fractions)
    if len(names) == 1:
        return {g: names[0] for g in groups}
    rank = {g: i for i, g in enumerate(_group_order(list(groups), seed))}
    order = np.array(sorted(range(len(groups)), key=lambda i: rank[groups[i]]), dtype=np.int64)
    counts = np.asarray(counts, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.float64)
    frac = np.array([fractions[s] for s in names], dtype=np.float64)
    target = frac[:, None] * counts.sum(0)[None, :]         # [S, K]
    target_images = frac * sizes.sum()                       # [S]
    want, want_images = target.copy(), target_images.copy()
    split_of = np.full(len(groups), -1, dtype=np.int64)
    left = counts.sum(0)                                     # stratum images not yet placed
    position = np.empty(len(groups), dtype=np.int64)
    position[order] = np.arange(len(groups))

    def stratum_order(k: int) -> np.ndarray:
        """Units of stratum ``k``: those holding more of it than the smallest split wants first (largest first),
        then the others in the seeded order (a patient's image count does not decide its side)."""
        units = order[counts[order, k] > 0]
        heavy = counts[units, k] > target[:, k].min()
        return units[np.lexsort((position[units], np.where(heavy, -counts[units, k], 0.0)))]

    largest = int(np.argmax(frac))
    # no patient makes up more than a tenth of a smaller split (twice the median patient for tiny splits): a
    # validation or test split of a few heavy patients measures those patients (the NIH sample has one with
    # 66 of its 1000 images)
    cap = np.maximum(MAX_SHARE_OF_A_SPLIT * target_images, 2 * np.median(sizes))
    cap[largest] = np.inf

    def best_split(g: int, k: int | None) -> int:
        """Among the splits that unit ``g`` brings closer to their targets in every stratum it holds and in images
        (it holds at most twice what the split still wants), the one that wants most of stratum ``k``; if there
        is none, the one it overshoots least relative to the split's targets. Never a split it would dominate."""
        held = np.nonzero(counts[g] > 0)[0]
        allowed = [s for s in range(len(names)) if sizes[g] <= cap[s]]

        def key(s: int) -> tuple:
            over = [(counts[g, j] - 2 * want[s, j]) / target[s, j] for j in held]
            over.append((sizes[g] - 2 * want_images[s]) / target_images[s])
            return (max(0.0, max(over)), -(want[s, k] if k is not None else want_images[s]), -want_images[s], s)

        return min(allowed, key=key)

    def place(g: int, s: int) -> None:
        split_of[g] = s
        want[s] -= counts[g]
        want_images[s] -= sizes[g]
        left[:] -= counts[g]

    # a stratum reaches train first (to be learnt), then test (to be scored), then validation, before its
    # units are apportioned by want: with 2-3 patients of a class, rounding would otherwise give it all to train
    presence = [names.index(s) for s in ("train", "test", "val") if s in names]

    def first_lacking(g: int, k: int) -> int | None:
        for s in presence:
            if want[s, k] >= target[s, k] and sizes[g] <= cap[s]:  # nothing of stratum k there yet
                return s
        return None

    by_stratum = [stratum_order(k) for k in range(counts.shape[1])]
    while True:
        open_ = np.nonzero(left > 0)[0]
        if not len(open_):
            break
        k = int(open_[np.argmin(left[open_])])                # the rarest stratum still to place (lowest index on ties)
        for g in by_stratum[k]:
            if split_of[g] < 0:
                lacking = first_lacking(int(g), k)
                place(int(g), lacking if lacking is not None else best_split(int(g), k))
    for g in order:
        if split_of[g] < 0:
            place(int(g), best_split(int(g), None))
    return {groups[i]: names[s] for i, s in enumerate(split_of.tolist())}


def _assign(group: pl.Series, index: DatasetIndex, task_type: str, rows: np.ndarray, fractions: dict[str, float],
            spec: SplitSpec) -> dict[str, str]:
    """Split name per group for the rows ``rows`` of ``index`` (stratified unless ``spec.stratify`` is off)."""
    g = group.gather(rows) if len(rows) != len(group) else group
    df = pl.DataFrame({"g": g})
    if not spec.stratify:
        counts = df["g"].value_counts()
        sizes = dict(zip(counts["g"].to_list(), counts["count"].to_list()))
        return _cut(list(sizes), sizes, fractions, spec.seed)
    per_row = strata_counts(index.labels()[rows], task_type)
    cols = [f"k{i}" for i in range(per_row.shape[1])]
    df = df.with_columns(pl.DataFrame(per_row, schema=cols, orient="row")) if cols else df
    agg = df.group_by("g").agg(pl.len().alias("n"), *[pl.col(c).sum() for c in cols]).sort("g")
    counts = agg.select(cols).to_numpy() if cols else np.zeros((agg.height, 0))
    return stratified_assignment(agg["g"].to_list(), agg["n"].to_numpy(), counts, fractions, spec.seed)


def assign_splits(index: DatasetIndex, spec: SplitSpec, *, where: str, task_type: str = "binary") -> pl.Series:
    """The split name per row (``train``/``val``/``test``; ``drop`` rows are excluded later).

    ``task_type`` says how labels form strata (see :func:`strata_counts`)."""
    table = index.table
    if spec.group_by not in table.columns:
        raise DataError(f"column {spec.group_by!r} not in the dataset table", where=where, field="splits.group_by")
    group = table[spec.group_by].cast(pl.Utf8)
    if group.null_count():
        raise DataError(f"{group.null_count()} rows have no {spec.group_by!r}", where=where, field="splits.group_by")

    no_official = table["split"].null_count() == table.height
    if spec.method == "grouped" or (no_official and spec.fallback == "grouped"):
        mapping = _assign(group, index, task_type, np.arange(table.height), dict(spec.fractions), spec)
        return group.replace_strict(mapping, return_dtype=pl.Utf8).alias("split")

    # official
    official = table["split"]
    if no_official:
        raise DataError("the dataset has no official split; use splits.method: grouped (or splits.fallback: grouped)",
                        where=where, field="splits.method")
    renamed = official.replace(spec.rename) if spec.rename else official
    unknown = set(renamed.drop_nulls().unique().to_list()) - {*SPLITS, "drop"}
    if unknown:
        raise DataError(f"official split names {sorted(unknown)} are not train/val/test; map them with splits.rename",
                        where=where, field="splits.rename")
    if "val" not in set(renamed.drop_nulls().to_list()) and spec.val_fraction > 0:
        # rows without an official split (null) are neither train nor carved: they are left out below
        is_train = (renamed == "train").fill_null(False).to_numpy()
        rows = np.nonzero(is_train)[0]
        held = _assign(group, index, task_type, rows,
                       {"train": 1 - spec.val_fraction, "val": spec.val_fraction}, spec) if len(rows) else {}
        values = renamed.to_list()
        groups = group.to_list()
        renamed = pl.Series("split", [held[g] if v == "train" else v for v, g in zip(values, groups)], dtype=pl.Utf8)
    leak = leaking_groups(group, renamed)
    if leak:
        raise DataError(f"{len(leak)} {spec.group_by} values (e.g. {leak[0]!r}) occur in more than one official split",
                        where=where, field="splits")
    return renamed.fill_null("drop").alias("split")


def leaking_groups(group: pl.Series, split: pl.Series) -> list[str]:
    df = pl.DataFrame({"g": group, "s": split}).drop_nulls().filter(pl.col("s") != "drop")
    multi = df.group_by("g").agg(pl.col("s").n_unique().alias("n")).filter(pl.col("n") > 1)
    return sorted(multi["g"].to_list())
