"""Where each dataset lives on this machine.

For a dataset name (``nih``, ``chexpert``, ...), in order:

1. ``--data NAME=PATH``;
2. the environment variable ``MEDBENCH_DATA_<NAME>`` (upper case, ``-`` as ``_``);
3. ``<data-root>/<NAME>`` with ``--data-root DIR`` or ``MEDBENCH_DATA``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from medbench.errors import DataError, UsageError
from medbench.paths import name_problem


def env_name(dataset: str) -> str:
    return "MEDBENCH_DATA_" + dataset.upper().replace("-", "_")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass
class DataLocations:
    data_root: Path | None = None
    overrides: dict[str, Path] = field(default_factory=dict)
    #: may task specs and label files name paths outside the dataset folder (absolute, or with ``..``)?
    #: The user's switch (``--allow-outside-data-root`` / ``MEDBENCH_ALLOW_OUTSIDE_DATA_ROOT=1``), never
    #: the spec's: a task file from elsewhere cannot grant itself access to other files.
    allow_outside_root: bool = False
    #: how image files are stamped for the cache and run keys (medbench.data.fingerprint): ``stat`` (size and
    #: mtime, the default) or ``content`` (sha256 of every file: ``--verify-pixels`` / MEDBENCH_VERIFY_PIXELS=1)
    pixel_check: str = "stat"

    @classmethod
    def from_cli(cls, data_root: Path | None, data: list[str] | None, *,
                 allow_outside_root: bool = False, verify_pixels: bool = False) -> "DataLocations":
        overrides: dict[str, Path] = {}
        for item in data or []:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise UsageError(f"expected NAME=PATH, got {item!r}", field="--data")
            overrides[name.strip()] = Path(path).expanduser()
        root = data_root or (Path(os.environ["MEDBENCH_DATA"]).expanduser() if os.environ.get("MEDBENCH_DATA") else None)
        allow = allow_outside_root or _truthy(os.environ.get("MEDBENCH_ALLOW_OUTSIDE_DATA_ROOT"))
        from medbench.data.fingerprint import pixel_check_mode

        return cls(root, overrides, allow, pixel_check_mode(verify_pixels))

    def resolve(self, dataset: str) -> tuple[Path | None, str]:
        """(path, how it was chosen); path is None when nothing names this dataset.

        ``dataset`` comes from a task file: it must be a plain name (the path rule,
        :func:`medbench.paths.name_problem`; ``TaskSpec`` checks it when the file is read, and so does this
        lookup), so ``<data-root>/<name>`` is a folder of the data root. The switch
        ``--allow-outside-data-root`` does not change that: a dataset elsewhere is ``--data NAME=PATH``.
        """
        problem = name_problem(dataset)
        if problem:
            raise DataError(f"{problem}; a dataset name is a folder name under --data-root (use --data NAME=PATH "
                            "to point a dataset elsewhere)", field="dataset.name")
        if dataset in self.overrides:
            return self.overrides[dataset], f"--data {dataset}=..."
        env = os.environ.get(env_name(dataset))
        if env:
            return Path(env).expanduser(), env_name(dataset)
        if self.data_root is not None:
            return self.data_root / dataset, "--data-root / MEDBENCH_DATA"
        return None, "not configured"
