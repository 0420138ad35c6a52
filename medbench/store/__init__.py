"""The run store: one folder per run (:mod:`.rundir`), and its scores computed from the saved predictions
(:mod:`.scores`)."""

from medbench.store.rundir import (
    CHECKPOINT,
    CONFIG,
    FILES,
    HISTORY,
    LOCK,
    METRICS,
    PREDICTIONS,
    RESULT,
    STORE_FORMAT,
    RunDir,
    RunStore,
    find_run_dirs,
)

__all__ = ["CHECKPOINT", "CONFIG", "FILES", "HISTORY", "LOCK", "METRICS", "PREDICTIONS", "RESULT", "STORE_FORMAT",
           "RunDir", "RunStore", "find_run_dirs"]
