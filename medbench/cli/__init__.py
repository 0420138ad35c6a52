"""The ``medbench`` command line (typer + rich): one module per command group, :mod:`.console` for output.

``medbench = "medbench.cli:main"``; ``python -m medbench.cli`` (what ``torchrun -m`` launches) is the same.
"""

# command groups register on import, in the order 'medbench --help' lists them
from medbench.cli import listing, run, scores, board, status, data, task, transfusion  # noqa: F401,I001
from medbench.cli.app import app, main

__all__ = ["app", "main"]
