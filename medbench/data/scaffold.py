"""``medbench task new NAME --csv FILE``: a commented task YAML proposed from what the CSV holds.

It reads the CSV as text and proposes, each with the reason in a comment:

* the **image path** column: the one whose values name image files (an image suffix, or files
  that exist under the dataset folder), with ``path_root`` when the files sit in a sub-folder
  and ``path_suffix`` when the column holds ids;
* the **patient** column: a column named like ``patient``/``subject``/``case`` with repeats;
  without one, every image is its own patient (a comment says how to derive the patient from
  an id with ``patient_pattern``);
* the **labels**: 0/1 columns (one: binary, several: multilabel, read with ``label_columns``;
  blanks are missing, any other value is listed in ``missing_values`` for the user to check), or
  a class column named like ``label``/``class``/``diagnosis``/``finding`` (multiclass; two
  values: binary with the positive and negative values spelled out). ``--label``/``--type``
  choose explicitly;
* the **split** column (``split``/``fold``/``set``... with train/val/test-like values: the
  publisher's split), else a label-stratified, patient-grouped split;
* **attributes**: sex, age (binned), view and site columns by name, and other columns with 2-10
  values; an attribute the test split would see with one group is left out (commented).

Values are never guessed into labels: what the proposal maps is written out, so the user reads
and can change every choice. The task is then loaded exactly as ``medbench run`` would load it
and checked (:mod:`medbench.data.checks`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from medbench.errors import DataError, UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp", ".gif", ".webp")
ZERO_ONE = {"0", "1", "0.0", "1.0"}
SPLIT_NAMES = {"train": "train", "training": "train", "tr": "train", "val": "val", "valid": "val",
               "validation": "val", "dev": "val", "tune": "val", "test": "test", "testing": "test", "ts": "test",
               "holdout": "test"}
NEGATIVE_WORDS = {"0", "no", "false", "negative", "neg", "normal", "benign", "healthy", "control", "absent", "none",
                  "n"}
_PATIENT = re.compile(r"patient|subject|case|person|participant|individual", re.I)
_SPLIT = re.compile(r"^(split|fold|set|subset|partition|data_?split)$", re.I)
_LABEL = re.compile(r"label|class|diagnos|^dx$|finding|target|outcome|category|grade|birads|pathology", re.I)
_SEX = re.compile(r"^(sex|gender|patient_?sex|patient_?gender)$", re.I)
_AGE = re.compile(r"^(age|patient_?age|age_?years|age_?at_?\w+)$", re.I)
_VIEW = re.compile(r"^(view|view_?position|projection|position)$", re.I)
_SITE = re.compile(r"^(site|hospital|center|centre|institution|source|clinic)$", re.I)
_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-/]*$")
_YAML_WORDS = {"yes", "no", "on", "off", "true", "false", "null", "y", "n", "~"}


def y(value) -> str:
    """A YAML flow value: plain when that reads back as the same string, JSON otherwise (JSON is YAML)."""
    if isinstance(value, str):
        return value if _PLAIN.match(value) and value.lower() not in _YAML_WORDS else json.dumps(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{y(str(k))}: {y(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(y(v) for v in value) + "]"
    return json.dumps(value)


def _c(value) -> str:
    """Text from the CSV or the command line inside a ``#`` comment: on one line (a line break in a column
    name would otherwise end the comment and write YAML)."""
    return " ".join(str(value).split())


@dataclass
class Column:
    name: str
    values: list[str]  # non-blank values, stripped
    blank: int

    @property
    def distinct(self) -> list[str]:
        return sorted(set(self.values))

    @property
    def zero_one_share(self) -> float:
        return sum(v in ZERO_ONE for v in self.values) / len(self.values) if self.values else 0.0

    @property
    def numeric_share(self) -> float:
        def num(v: str) -> bool:
            try:
                float(v)
                return True
            except ValueError:
                return False

        return sum(num(v) for v in self.values) / len(self.values) if self.values else 0.0


@dataclass
class Proposal:
    name: str
    #: the dataset's location key (--data DATASET=FOLDER); several tasks can share one
    dataset: str
    csv: Path
    root: Path
    type: str
    labels: list[str]
    options: dict
    splits: dict
    attributes: list
    #: per option / section: why it was chosen (written as comments)
    why: dict[str, str] = field(default_factory=dict)
    #: attributes left out, with the reason (written commented out)
    dropped_attributes: list[tuple[object, str]] = field(default_factory=list)


def read_columns(csv: Path, separator: str = ",") -> tuple[list[Column], int]:
    from medbench.data.base import read_csv_checked

    df = read_csv_checked(csv, required=[], dataset="(task new)", separator=separator)
    if df.height == 0:
        raise DataError("the CSV has a header and no rows", where=csv)
    cols = []
    for c in df.columns:
        raw = [("" if v is None else str(v).strip()) for v in df[c].to_list()]
        cols.append(Column(c, [v for v in raw if v != ""], sum(v == "" for v in raw)))
    return cols, df.height


def _find_file(root: Path, name: str, max_depth: int = 3) -> Path | None:
    """``name`` (a relative path or a file name) under ``root``: directly, else below it up to ``max_depth``."""
    direct = root / name
    if direct.is_file():
        return direct
    base = Path(name).name
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):  # the usual layout: one images folder
        if (sub / name).is_file():
            return sub / name
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        if depth >= max_depth:
            dirnames[:] = []
        dirnames.sort()
        if base in filenames:
            return Path(dirpath) / base
    return None


def _path_column(cols: list[Column], root: Path, explicit: str | None) -> tuple[Column, dict, str]:
    """(column, path options, reason)."""
    by_name = {c.name: c for c in cols}
    if explicit is not None:
        if explicit not in by_name:
            raise UsageError(f"no column {explicit!r} in the CSV; it has {', '.join(by_name)}", field="--path")
        candidates = [by_name[explicit]]
    else:
        scored = []
        for c in cols:
            share = sum(v.lower().endswith(IMAGE_SUFFIXES) for v in c.values) / max(len(c.values), 1)
            if share > 0.5 and len(set(c.values)) == len(c.values):
                scored.append((share, c))
        candidates = [c for _, c in sorted(scored, key=lambda t: -t[0])]
        if not candidates:  # ids: a unique column whose values name files once a suffix is added
            candidates = [c for c in cols if c.values and len(set(c.values)) == len(c.values) and not c.blank]
    for c in candidates:
        first = c.values[0]
        for suffix in ("", *IMAGE_SUFFIXES):
            hit = _find_file(root, first + suffix)
            if hit is None:
                continue
            rel_dir = hit.parent.relative_to(root).as_posix()
            head = Path(first).parent.as_posix()
            path_root = rel_dir[: -len(head)].rstrip("/") if head != "." and rel_dir.endswith(head) else (
                "" if head != "." else rel_dir)
            opts = {"path_column": c.name}
            if path_root and path_root != ".":
                opts["path_root"] = path_root
            if suffix:
                opts["path_suffix"] = suffix
            where = f"{path_root}/" if opts.get("path_root") else ""
            return c, opts, f"its values name image files (e.g. {where}{first}{suffix} exists)"
    if explicit is not None:
        c = candidates[0]
        return c, {"path_column": c.name}, "given with --path (no file found yet for its first value)"
    raise DataError("found no column naming image files: give the column with --path (and check the dataset "
                    "folder with --root)", where=None)


def _patient_column(cols: list[Column], n_rows: int, used: set[str], explicit: str | None) -> tuple[str | None, str]:
    if explicit is not None:
        if explicit not in {c.name for c in cols}:
            raise UsageError(f"no column {explicit!r} in the CSV", field="--patient")
        return explicit, "given with --patient"
    for c in cols:
        if c.name not in used and _PATIENT.search(c.name) and not c.blank and len(set(c.values)) <= n_rows:
            repeats = n_rows - len(set(c.values))
            return c.name, (f"named like a patient id; {len(set(c.values))} patients for {n_rows} images"
                            + ("" if repeats else " (one image each)"))
    return None, ("no patient column found: every image is its own patient. If several images can come from one "
                  "person, name the column (patient_column) or derive it from an id with patient_pattern, e.g. "
                  "'^(?P<patient>COVID-\\d+)[a-z]$'")


def _split_column(cols: list[Column], used: set[str]) -> tuple[str | None, dict]:
    for c in cols:
        if c.name in used or not _SPLIT.match(c.name):
            continue
        values = {v.lower(): v for v in c.distinct}
        if values and all(v in SPLIT_NAMES for v in values):
            mapping = {raw: SPLIT_NAMES[low] for low, raw in values.items() if SPLIT_NAMES[low] != raw}
            return c.name, mapping
    return None, {}


def _labels(cols: list[Column], used: set[str], explicit: list[str], task_type: str | None
            ) -> tuple[str, list[str], dict, str]:
    """(type, labels, label options, reason)."""
    by_name = {c.name: c for c in cols}
    for name in explicit:
        if name not in by_name:
            raise UsageError(f"no column {name!r} in the CSV; it has {', '.join(by_name)}", field="--label")
    zero_one = [c for c in cols if c.name not in used and c.values and c.zero_one_share >= 0.9
                and len(set(c.values) - ZERO_ONE) <= 3]
    chosen = [by_name[n] for n in explicit] if explicit else None
    if chosen is None:
        named_01 = [c for c in zero_one if not (_SEX.match(c.name) or _AGE.match(c.name))]
        classes = [c for c in cols if c.name not in used and _LABEL.search(c.name) and c not in zero_one
                   and 2 <= len(set(c.values)) <= 50]
        if task_type == "multiclass" and classes:
            chosen = classes[:1]
        elif named_01 and task_type != "multiclass":
            chosen = named_01 if task_type != "binary" else named_01[:1]
        elif classes:
            chosen = classes[:1]
        else:
            raise DataError("found no label column (0/1 columns, or a class column named like label, class, "
                            "diagnosis, finding): name it with --label", where=None)
    if all(c.zero_one_share >= 0.9 for c in chosen) and task_type != "multiclass":
        ttype = task_type or ("binary" if len(chosen) == 1 else "multilabel")
        if ttype == "binary" and len(chosen) > 1:
            raise UsageError("a binary task has one label column; give one --label", field="--type")
        opts: dict = {"label_columns": {c.name: c.name for c in chosen}}
        odd = sorted({v for c in chosen for v in c.values if v not in ZERO_ONE})
        if odd:
            opts["missing_values"] = odd
        why = (f"{'a 0/1 column' if len(chosen) == 1 else f'{len(chosen)} 0/1 columns'} (1 positive, 0 negative, "
               "blank missing" + (f"; {odd} read as missing: check" if odd else "") + ")")
        return ttype, [c.name for c in chosen], opts, why
    if len(chosen) != 1:
        raise UsageError("a class column is one column; give one --label (or several 0/1 columns)", field="--label")
    col = chosen[0]
    values = col.distinct
    if task_type == "binary" or (task_type is None and len(values) == 2):
        if len(values) != 2 and task_type == "binary":
            raise UsageError(f"column {col.name!r} has {len(values)} values {values[:6]}; a binary task from a class "
                             "column needs two (or use --type multiclass)", field="--type")
        negative = [v for v in values if v.lower() in NEGATIVE_WORDS]
        if len(negative) != 1:  # no telling word: the rarer value is the positive (the finding)
            counts = {v: col.values.count(v) for v in values}
            negative = [max(values, key=lambda v: (counts[v], v))]
        positive = [v for v in values if v not in negative][0]
        return "binary", [positive], {"label_column": col.name, "classes": {positive: [positive]},
                                      "negative_values": negative}, \
            (f"column {col.name!r} has two values: {positive!r} is the positive class, {negative[0]!r} the "
             "negative (swap them if it is the other way round)")
    labels = values
    return "multiclass", labels, {"label_column": col.name}, \
        f"column {col.name!r} has {len(labels)} classes (one label per value; map spellings with classes:)"


def _attributes(cols: list[Column], used: set[str], options: dict) -> tuple[list, dict[str, str]]:
    attrs: list = []
    why: dict[str, str] = {}
    for c in cols:
        if c.name in used or not c.values:
            continue
        if _SEX.match(c.name) and "sex_column" not in options:
            options["sex_column"] = c.name
            attrs.append("sex")
            why["sex"] = f"column {c.name!r}"
        elif _AGE.match(c.name) and c.numeric_share > 0.5 and "age_column" not in options:
            options["age_column"] = c.name
            attrs.append({"name": "age_group", "column": "age", "bins": [0, 40, 60, 80, 200]})
            why["age_group"] = f"column {c.name!r}, in years, binned"
        elif _VIEW.match(c.name) and "view_column" not in options:
            options["view_column"] = c.name
            attrs.append("view")
            why["view"] = f"column {c.name!r}"
        elif _SITE.match(c.name) and "site_column" not in options:
            options["site_column"] = c.name
            attrs.append("site")
            why["site"] = f"column {c.name!r}"
        elif 2 <= len(set(c.values)) <= 10 and c.zero_one_share < 0.9 and not _PATIENT.search(c.name):
            attrs.append(c.name)
            why[c.name] = f"column {c.name!r} ({len(set(c.values))} values)"
    return attrs, why


def propose(name: str, csv: Path, *, root: Path | None = None, labels: list[str] | None = None,
            task_type: str | None = None, patient: str | None = None, path: str | None = None,
            separator: str = ",", dataset: str | None = None) -> Proposal:
    """A proposal for task ``name`` over ``csv`` (dataset folder ``root``, default the CSV's folder; dataset name
    ``dataset``, default the task's)."""
    csv = Path(csv)
    root = Path(root) if root is not None else csv.parent
    if not csv.is_file():
        raise UsageError("file not found", where=csv, field="--csv")
    try:
        rel = csv.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        raise UsageError(f"the CSV must be inside the dataset folder {root}", where=csv, field="--root") from None
    cols, n_rows = read_columns(csv, separator)
    path_col, options, path_why = _path_column(cols, root, path)
    used = {path_col.name}
    why = {"path_column": path_why}
    patient_col, why["patient_column"] = _patient_column(cols, n_rows, used, patient)
    if patient_col:
        options["patient_column"] = patient_col
        used.add(patient_col)
    split_col, split_values = _split_column(cols, used)
    if split_col:
        options["split_column"] = split_col
        if split_values:
            options["split_values"] = split_values
        used.add(split_col)
        splits = {"method": "official", "val_fraction": 0.1}
        why["splits"] = (f"the publisher's split from column {split_col!r}"
                         + ("" if any(v == "val" for v in split_values.values()) or "val" in
                            {v.lower() for v in next(c for c in cols if c.name == split_col).values} else
                            "; validation carved from its training patients (val_fraction)"))
    else:
        splits = {"method": "grouped", "fractions": {"train": 0.7, "val": 0.1, "test": 0.2}}
        why["splits"] = "no split column: patients grouped and labels stratified over train/val/test"
    ttype, task_labels, label_opts, why["labels"] = _labels(cols, used, list(labels or []), task_type)
    options.update(label_opts)
    used |= {label_opts.get("label_column")} | set((label_opts.get("label_columns") or {}).values())
    attrs, attr_why = _attributes(cols, used, options)
    why.update({f"attribute {k}": v for k, v in attr_why.items()})
    options = {"csv": rel, **({"separator": separator} if separator != "," else {}), **options}
    return Proposal(name=name, dataset=dataset or name, csv=csv, root=root, type=ttype, labels=task_labels,
                    options=options, splits=splits, attributes=attrs, why=why)


def _attr_name(a) -> str:
    return a if isinstance(a, str) else a["name"]


def task_yaml(p: Proposal) -> str:
    """The task file, every choice commented."""
    o = p.options
    lines = [
        f"# Task proposed by 'medbench task new {_c(p.name)} --csv {_c(p.csv)}'. Read every line: each choice",
        "# comes from the CSV's columns and values; change what is wrong. Every field: medbench/spec/model.py;",
        "# the csv adapter's options: medbench/data/adapters/csv.py; a walkthrough: docs/own-dataset.md.",
        f"task: {y(p.name)}",
        "version: 1  # bump when you change what the task means",
        "family: own",
        f"description: {y(f'{p.name} from {p.csv.name}')}",
        "dataset:",
        f"  name: {y(p.dataset)}  # where it is: --data {_c(p.dataset)}=FOLDER (here {_c(p.root)}), or MEDBENCH_DATA_"
        f"{_c(p.dataset.upper().replace('-', '_'))}",
        "  adapter: csv",
        "  options:",
        f"    csv: {y(o['csv'])}",
    ]
    if "separator" in o:
        lines.append(f"    separator: {y(o['separator'])}")
    lines.append(f"    path_column: {y(o['path_column'])}  # {_c(p.why['path_column'])}")
    for key in ("path_root", "path_suffix"):
        if key in o:
            lines.append(f"    {key}: {y(o[key])}")
    if "patient_column" in o:
        lines.append(f"    patient_column: {y(o['patient_column'])}  # {_c(p.why['patient_column'])}")
    else:
        lines.append(f"    # {_c(p.why['patient_column'])}")
    if "split_column" in o:
        lines.append(f"    split_column: {y(o['split_column'])}")
        if "split_values" in o:
            lines.append(f"    split_values: {y(o['split_values'])}")
    lines.append(f"    # labels: {_c(p.why['labels'])}")
    for key in ("label_column", "label_columns", "classes", "negative_values", "missing_values"):
        if key in o:
            lines.append(f"    {key}: {y(o[key])}")
    for key in ("sex_column", "age_column", "view_column", "site_column"):
        if key in o:
            lines.append(f"    {key}: {y(o[key])}")
    lines += [
        f"type: {p.type}",
        f"labels: {y(p.labels)}",
        "metrics: [auc, accuracy]",
        "headline: auc",
        f"# {_c(p.why['splits'])}",
        f"splits: {y(p.splits)}",
    ]
    if p.attributes:
        lines.append("attributes:  # subgroups for the fairness axis (every other CSV column can be one too)")
        for a in p.attributes:
            lines.append(f"  - {y(a)}  # {_c(p.why.get(f'attribute {_attr_name(a)}', ''))}".rstrip(" #"))
    for a, reason in p.dropped_attributes:
        lines.append(f"# left out: {y(a)}: {_c(reason)}")
    lines += [
        "# input: BiT-HyperRule by image size (smaller than 96x96 px: resize 160, crop 128; else 512 and 480).",
        "# On a CPU, train small first, e.g.: input: {resize: 64, crop: 56, channels: 3}",
        "# hyperrule: BiT-HyperRule (SGD, schedule by training-set size). base_lr is the rate at a batch of 512",
        "# images: a run trains at base_lr x batch_size / 512 ('medbench run --dry-run' prints it). A CPU-scale",
        "# variant: hyperrule: {batch_size: 32, base_lr: 0.05, schedule: [10, 50, 80, 95, 100]}",
        "default_seeds: 5  # the protocol's 5 seeds; --seeds N overrides",
    ]
    return "\n".join(lines) + "\n"


def checked_proposal(p: Proposal, folder: Path) -> tuple[Proposal, list[str]]:
    """``p`` with attributes the data refuses left out (and why), and the problems that remain, from loading
    the task as ``medbench run`` would (the file is written to ``folder`` for that)."""
    from medbench.data.checks import task_data_problems
    from medbench.data.locate import DataLocations
    from medbench.data.task_data import load_task_data
    from medbench.spec import parse_task_file

    locations = DataLocations(overrides={p.dataset: p.root})
    for _ in range(len(p.attributes) + 1):
        path = folder / f"{p.name}.yaml"
        path.write_text(task_yaml(p), encoding="utf-8")
        task = parse_task_file(path)
        problems = task_data_problems(load_task_data(task, locations))
        bad = {int(m.group(1)): e for e in problems if (m := re.match(r"attributes\[(\d+)\]", e.field or ""))}
        if not bad:
            return p, [str(e) for e in problems]
        keep = []
        for i, a in enumerate(p.attributes):
            if i in bad:
                p.dropped_attributes.append((a, bad[i].message))
            else:
                keep.append(a)
        p.attributes = keep
    return p, [str(e) for e in problems]
