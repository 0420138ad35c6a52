"""The NLM tuberculosis chest X-ray sets: Montgomery County (USA) and Shenzhen No.3 Hospital (China).

Layout as NLM ships them (Jaeger et al. 2014, QIMS 4(6); lhncbc.nlm.nih.gov), both sets
under one ``tuberculosis/`` folder, at any depth::

    MontgomerySet/CXR_png/MCUCXR_0001_0.png        # last digit: 0 normal, 1 tuberculosis
    MontgomerySet/ClinicalReadings/MCUCXR_0001_0.txt
    MontgomerySet/ManualMask/{left,right}Mask/...  # lung masks: same file names, ignored
    ChinaSet_AllFiles/CXR_png/CHNCXR_0001_0.png    # (or Shenzhen-Hospital-CXR-Set/CXR_png/)
    ChinaSet_AllFiles/ClinicalReadings/CHNCXR_0001_0.txt

The label is the file name's last digit. Sex and age come from the clinical
readings, whose two sets are written differently:

* Montgomery: ``Patient's Sex: M`` / ``Patient's Age: 035Y`` lines (DICOM-style
  ``nnnY``/``nnnM``/``nnnD`` ages; ``O`` or blank sex is unknown; trailing spaces
  occur: ``Patient's Sex: F ``), then the reading (``normal``, a finding, or ``NO
  REPORT (same pt as MCUCXR_0162_1)``);
* Shenzhen: a first line ``<sex> <age><unit>``, then the reading. The spellings of
  the release (as published parsers of it record them): ``male 45yrs``, ``Female,
  28yrs``, ``male , 29yrs`` (comma, stray tabs), ``female24yrs`` (no space),
  ``femal 32yrs`` (typo), infants as ``male 16month`` and ``female 64days``; also
  ``yr``/``years``/``Y`` units and case variants. A bare number (``male 42``) is
  read as years.

Files may start with a byte-order mark and use CRLF line ends. A reading without a
recognisable sex or age leaves that attribute missing (never guessed); the
Shenzhen first-line form is only tried in files without Montgomery's
``Patient's ...`` lines. Samples are the union of images and readings, so label
files alone list the dataset.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from medbench.data.adapters._common import (
    normalize_sex,
    parse_age,
    parse_options,
    require_root,
)
from medbench.data.base import DatasetIndex, label_column
from medbench.errors import DataError
from medbench.paths import walk

NAME_RE = re.compile(r"^(MCUCXR|CHNCXR)_(\d+)_([01])\.(png|txt)$", re.IGNORECASE)
SETS = {"MCUCXR": "montgomery", "CHNCXR": "shenzhen"}
_FIELD_RE = re.compile(r"^\s*patient\W{0,2}s\s+(sex|age)\s*:?\s*(.*)$", re.IGNORECASE)
#: a sex word not inside another word; digits may follow at once (``female24yrs``); ``femal`` is a typo of the release
_SEX_WORD_RE = re.compile(r"(?<![a-z])(female|femal|male|woman|man)(?![a-z])", re.IGNORECASE)
_SEX_WORDS = {"female": "F", "femal": "F", "woman": "F", "male": "M", "man": "M"}
_LEADING_AGE_RE = re.compile(r"^\s*\d{1,3}\s*(y|yr|yrs|year|years|m|mo|month|months|d|days?)?\b", re.IGNORECASE)


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: which sets to read
    sets: list[Literal["montgomery", "shenzhen"]] = Field(default_factory=lambda: ["montgomery", "shenzhen"],
                                                         min_length=1)
    #: read sex and age from ClinicalReadings/
    readings: bool = True


def parse_reading(text: str) -> tuple[str | None, float | None]:
    """(sex, age in years) from one ClinicalReadings file of either set."""
    sex: str | None = None
    age: float | None = None
    lines = [ln.strip() for ln in text.replace("\ufeff", "").splitlines() if ln.strip()]
    fields = [m for m in map(_FIELD_RE.match, lines) if m]
    for m in fields:  # Montgomery
        if m.group(1).lower() == "sex":
            sex = normalize_sex(m.group(2))
        else:
            age = parse_age(m.group(2))
    if not fields and lines:
        # Shenzhen: "<sex> <age><unit>" (either order) on the first line, only when it looks demographic
        demographic = lines[0]
        word = _SEX_WORD_RE.search(demographic)
        if word or _LEADING_AGE_RE.match(demographic):
            if word:
                sex = _SEX_WORDS[word.group(1).lower()]
            age = parse_age(_SEX_WORD_RE.sub(" ", demographic))
    return sex, age


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig", errors="replace")
    except OSError as err:
        raise DataError(f"cannot read clinical reading: {err.strerror}", where=path) from err


def discover(root: Path) -> dict[str, dict[str, Path]]:
    """``{stem: {"png": path, "txt": path}}`` for every image and reading below ``root``."""
    found: dict[str, dict[str, Path]] = {}
    for dirpath, dirnames, filenames in walk(root):
        # lung masks share the images' names; archive debris is not data
        dirnames[:] = sorted(d for d in dirnames if "mask" not in d.lower() and not d.startswith((".", "__MACOSX"))
                             and d.lower() not in {"annotations", "annotations-2"})
        for f in sorted(filenames):
            m = NAME_RE.match(f)
            if not m:
                continue
            kind = m.group(4).lower()
            if kind == "txt" and Path(dirpath).name.lower() != "clinicalreadings":
                continue
            stem = f"{m.group(1).upper()}_{m.group(2)}_{m.group(3)}"
            found.setdefault(stem, {}).setdefault(kind, Path(dirpath) / f)
    return found


class TuberculosisAdapter:
    name = "tuberculosis"
    description = "NLM tuberculosis chest X-rays: Montgomery County (138) + Shenzhen (662), label from the file name"
    how_to_get = ("open download (medbench data download tuberculosis) or "
                  "https://data.lhncbc.nlm.nih.gov/public/Tuberculosis-Chest-X-ray-Datasets/ ; expected layout: "
                  "tuberculosis/MontgomerySet/{CXR_png/MCUCXR_####_{0,1}.png, ClinicalReadings/*.txt} and "
                  "tuberculosis/ChinaSet_AllFiles/{CXR_png/CHNCXR_####_{0,1}.png, ClinicalReadings/*.txt}")

    def load(self, root: Path | None, options: dict[str, Any], labels: list[str], task_type: str) -> DatasetIndex:
        opts = parse_options(Options, options, self.name)
        root = require_root(root, self.name)
        if task_type != "binary":
            raise DataError(f"tuberculosis vs normal is binary, the task says {task_type}",
                            where="tuberculosis adapter", field="type")
        found = discover(root)
        rows = []
        for stem, files in sorted(found.items()):
            prefix, number, digit = stem.split("_")
            site = SETS[prefix]
            if site not in opts.sets:
                continue
            png = files.get("png")
            txt = files.get("txt")
            if png is None:  # reading without its image: the image is expected beside the readings
                png = txt.parent.parent / "CXR_png" / f"{stem}.png"
            sex, age = parse_reading(_read_text(txt)) if (txt is not None and opts.readings) else (None, None)
            rows.append({"sample_id": stem, "patient_id": f"{prefix}_{number}",
                         "path": png.relative_to(root).as_posix(), "sex": sex, "age": age, "view": "PA",
                         "site": site, label_column(labels[0]): int(digit),
                         "reading": txt.relative_to(root).as_posix() if txt is not None else None})
        for s in opts.sets:
            if not any(r["site"] == s for r in rows):
                prefix = "MCUCXR" if s == "montgomery" else "CHNCXR"
                raise DataError(f"no {s.capitalize()} files ({prefix}_####_{{0,1}}.png or ClinicalReadings/"
                                f"{prefix}_*.txt) found; {self.how_to_get}", where=root, field="dataset.options.sets")
        table = pl.DataFrame(rows, schema_overrides={"age": pl.Float64, label_column(labels[0]): pl.Int8})
        return DatasetIndex(name="tuberculosis", table=table, label_names=list(labels), root=root,
                            notes={"readings_without_image": sum("png" not in f for f in found.values()),
                                   "images_without_reading": sum("txt" not in f for f in found.values())})


ADAPTER = TuberculosisAdapter()
