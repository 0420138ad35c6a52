"""The seed papers' reference rows (``leaderboards/published/``) and how their names map to medbench's.

The files are leaderboards in medbench's format with ``"published": true``, a
``citation``, the paper's own row/column names under ``paper``, and ``null``
wherever the paper prints no number (CJ21 gives mean ± std over 5 seeds, no
seeds, values or intervals; RZ19 gives per-label AUC without a mean or std).
Values are the paper's percentages divided by 100, as medbench stores scores.
The mapping from the papers' names to medbench's tasks, backbones and inits is
the one table below; a test checks the files against it and against the
protocol's tables cell by cell.
"""

from __future__ import annotations

from pathlib import Path

#: paper target name -> medbench task
PAPER_TASKS: dict[str, str] = {
    "COVIDx": "covidx",
    "Tuberculosis": "tuberculosis",
    "MIMIC-CXR": "mimic-cxr",
    "CheXpert": "chexpert",
    "PadChest": "padchest",
    "PadChest-cl": "padchest-cl",
    "NIH": "nih",
}

#: paper column (model + pre-training) -> (medbench backbone, init)
PAPER_MODELS: dict[str, tuple[str, str]] = {
    "R50x1 1K": ("bit-s-r50x1", "pretrained"),     # CJ21: BiT-S, ImageNet-1k
    "R50x1 21K": ("bit-m-r50x1", "pretrained"),    # CJ21: BiT-M, ImageNet-21k
    "R152x4 1K": ("bit-s-r152x4", "pretrained"),
    "R152x4 21K": ("bit-m-r152x4", "pretrained"),
    "ResNet-50 random init": ("resnet50", "random"),            # RZ19 Table 2
    "ResNet-50 ImageNet transfer": ("resnet50", "pretrained"),
}


def published_files(folder: Path | None = None) -> list[Path]:
    from medbench.resources import published_leaderboards_dir

    return sorted((folder or published_leaderboards_dir()).glob("*.json"))


def published_entries(folder: Path | None = None) -> list[dict]:
    """Every published reference row (validated against the leaderboard schema)."""
    from medbench.board.schema import load_board

    out = []
    for path in published_files(folder):
        for e in load_board(path)["entries"]:
            out.append({**e, "source_file": path.name})
    return out


def published_for(tasks: list[str] | set[str], folder: Path | None = None) -> list[dict]:
    """The published rows of these medbench tasks (what to show beside a user's board)."""
    wanted = set(tasks)
    return [e for e in published_entries(folder) if e["task"] in wanted]
