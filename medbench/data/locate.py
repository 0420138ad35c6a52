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

from medbench.errors import UsageError


def env_name(dataset: str) -> str:
    return "MEDBENCH_DATA_" + dataset.upper().replace("-", "_")


@dataclass
class DataLocations:
    data_root: Path | None = None
    overrides: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def from_cli(cls, data_root: Path | None, data: list[str] | None) -> "DataLocations":
        overrides: dict[str, Path] = {}
        for item in data or []:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise UsageError(f"expected NAME=PATH, got {item!r}", field="--data")
            overrides[name.strip()] = Path(path).expanduser()
        root = data_root or (Path(os.environ["MEDBENCH_DATA"]).expanduser() if os.environ.get("MEDBENCH_DATA") else None)
        return cls(root, overrides)

    def resolve(self, dataset: str) -> tuple[Path | None, str]:
        """(path, how it was chosen); path is None when nothing names this dataset."""
        if dataset in self.overrides:
            return self.overrides[dataset], f"--data {dataset}=..."
        env = os.environ.get(env_name(dataset))
        if env:
            return Path(env).expanduser(), env_name(dataset)
        if self.data_root is not None:
            return self.data_root / dataset, "--data-root / MEDBENCH_DATA"
        return None, "not configured"
