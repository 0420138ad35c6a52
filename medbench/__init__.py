"""medbench: how well does an image backbone transfer to medical imaging?

The flow is one-way: task spec -> dataset -> backbone -> fine-tune ->
per-sample predictions -> scores -> leaderboard. Each stage is one module;
see docs/architecture.md.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
