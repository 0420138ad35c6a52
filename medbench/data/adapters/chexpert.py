"""CheXpert v1.0 (Irvin et al. 2019), as Stanford ships it.

Layout (``--data chexpert=DIR``; ``DIR`` is the release folder, e.g.
``CheXpert-v1.0-small/``, or a folder holding exactly one such release)::

    DIR/train.csv      Path,Sex,Age,Frontal/Lateral,AP/PA,<14 observations>
    DIR/valid.csv      same columns (radiologist consensus labels)
    DIR/train/patient00001/study1/view1_frontal.jpg
    DIR/valid/patient64541/study1/view1_frontal.jpg

``Path`` starts with the release folder name (``CheXpert-v1.0-small/train/...``);
it is read relative to ``DIR`` from the ``train/``/``valid/`` component on.

Label policy (stated here and tested):

* ``1.0`` positive, ``0.0`` negative;
* **blank is a negative** (the labeler found no mention);
* ``-1.0`` (uncertain) follows ``options.uncertainty``: ``U-Ignore`` (default)
  makes it missing, so it is masked from the loss and from the metric;
  ``U-Zeros`` makes it 0; ``U-Ones`` makes it 1.

Metadata: ``patient_id`` is the ``patientNNNNN`` folder of ``Path``; sex from
``Sex`` (``Unknown`` -> null); age from ``Age`` (0-120, else null); view is
``LATERAL`` for lateral images, else the ``AP/PA`` value (``AP``, ``PA``, and
the release's rare ``LL``/``RL``); site ``Stanford``. The official split is
``train`` / ``valid`` (tasks rename ``valid`` to ``test`` and carve ``val``
from ``train`` by patient). ``frontal_only`` keeps ``Frontal/Lateral == Frontal``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import polars as pl
from pydantic import BaseModel, ConfigDict

from medbench.data.adapters._chest import (
    CHEXPERT_OBSERVATIONS,
    check_labels_known,
    find_file,
    first_bad_row,
    labeler_column,
    parse_options,
    plausible_age,
    require_root,
    sex_column,
)
from medbench.data.base import DatasetIndex, label_column, read_csv_checked
from medbench.errors import DataError

META_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"]
PATH_RE = r"((?:train|valid|test)/patient\d+/.+)$"


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: what an uncertain (-1) label becomes: missing (U-Ignore), 0 (U-Zeros) or 1 (U-Ones)
    uncertainty: Literal["U-Ignore", "U-Zeros", "U-Ones"] = "U-Ignore"
    #: keep frontal images only (``Frontal/Lateral == Frontal``)
    frontal_only: bool = False


def release_folder(root: Path) -> Path:
    """``root`` itself, or the one ``CheXpert-v1.0*`` folder inside it holding ``train.csv``."""
    if (root / "train.csv").is_file() or (root / "train.csv.gz").is_file():
        return root
    inner = [p for p in sorted(root.glob("CheXpert-v1.0*")) if (p / "train.csv").is_file()]
    return inner[0] if len(inner) == 1 else root


def read_split(path: Path, split: str, labels: list[str], policy: str) -> pl.DataFrame:
    # train.csv must hold rows; valid.csv may be a header alone (no official test images: the split checks
    # before training then name the empty split)
    df = read_csv_checked(path, required=[*META_COLUMNS, *labels], dataset="chexpert",
                          min_rows=1 if split == "train" else 0)
    rel = df["Path"].str.extract(PATH_RE, 1)
    bad = rel.is_null()
    if bad.any():
        raise DataError(f"value {df['Path'].filter(bad)[0]!r} on line {first_bad_row(bad)}; expected "
                        "<release>/{train,valid}/patientNNNNN/studyN/viewN_<view>.jpg", where=path, field="Path")
    frontal_lateral = df["Frontal/Lateral"].str.strip_chars()
    odd = ~frontal_lateral.is_in(["Frontal", "Lateral"])
    if odd.any():
        raise DataError(f"value {frontal_lateral.filter(odd)[0]!r} on line {first_bad_row(odd)}; expected Frontal or "
                        "Lateral", where=path, field="Frontal/Lateral")
    ap_pa = df["AP/PA"].str.strip_chars().str.to_uppercase()
    view = pl.select(pl.when(frontal_lateral == "Lateral").then(pl.lit("LATERAL"))
                     .otherwise(pl.when(ap_pa != "").then(ap_pa)).alias("view")).to_series()
    table = pl.DataFrame({
        "sample_id": rel,
        "patient_id": rel.str.extract(r"(patient\d+)", 1),
        "path": rel,
        "sex": sex_column(df["Sex"], {"Male": "M", "Female": "F"}),
        "age": plausible_age(df["Age"]),
        "view": view,
        "site": pl.Series(["Stanford"] * df.height, dtype=pl.Utf8),
        "split": pl.Series([split] * df.height, dtype=pl.Utf8),
        "frontal": frontal_lateral == "Frontal",
    })
    return table.with_columns(
        **{label_column(lab): labeler_column(df, lab, policy, file=path) for lab in labels})


class CheXpertAdapter:
    name = "chexpert"
    description = "CheXpert v1.0 (Stanford): train.csv/valid.csv with the CheXpert labeler's 14 observations"
    how_to_get = ("register and download CheXpert-v1.0 (or -small) at https://stanfordmlgroup.github.io/competitions/"
                  "chexpert/ (Stanford AIMI); point --data chexpert=DIR at the release folder holding train.csv, "
                  "valid.csv, train/patientNNNNN/studyN/*.jpg and valid/...")

    def load(self, root: Path | None, options: dict[str, Any], labels: list[str], task_type: str) -> DatasetIndex:
        opts = parse_options(Options, options, self.name)
        check_labels_known(labels, CHEXPERT_OBSERVATIONS, dataset=self.name)
        if task_type == "multiclass":
            raise DataError("CheXpert labels are independent findings; use type multilabel or binary",
                            where=f"{self.name} adapter", field="type")
        folder = release_folder(require_root(root, self.name))
        train_csv = find_file(folder, ["train.csv"], dataset=self.name, what="label file")
        valid_csv = find_file(folder, ["valid.csv"], dataset=self.name, what="label file")
        table = pl.concat([read_split(train_csv, "train", labels, opts.uncertainty),
                           read_split(valid_csv, "valid", labels, opts.uncertainty)], how="vertical")
        dropped: dict[str, int] = {}
        if opts.frontal_only:
            n = table.height
            table = table.filter(pl.col("frontal"))
            dropped["lateral view (frontal_only)"] = n - table.height
        return DatasetIndex(name=self.name, table=table.drop("frontal"), label_names=list(labels), root=folder,
                            source_files=[train_csv, valid_csv],
                            notes={"uncertainty": opts.uncertainty, "blank": "negative", "dropped": dropped})


ADAPTER = CheXpertAdapter()
