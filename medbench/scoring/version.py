"""The scoring version: which definitions produced a run's ``metrics.json``.

**Policy** (with :data:`medbench.train.numerics.TRAINING_NUMERICS`; documented in
:mod:`medbench.store.rundir` and the README): bump :data:`SCORING_VERSION` in
the same commit as any change to what a score means or how it is computed from
the saved predictions — a metric's definition, an axis, an interval rule, the
temperature-scaling guard, the warnings recorded. A run's ``metrics.json``
records the version in ``scoring.scoring_version`` (absent: scored before
versioning, treated as 0). A run scored by another version is re-scored from
its saved predictions (cheap: no training) when ``medbench run`` reuses it and
when ``medbench leaderboard`` (or ``medbench paired``) reads it, and the console
says so. Changes that only make scoring faster or its output prettier, with
the same numbers, keep the version. ``medbench.__version__`` is neither: a
release may leave scores unchanged, and a fix between releases may change
them.

History: 1 — one definition per metric (point = the bootstrap finalizer at
unit weights), multiclass rows without a scored class not labelled, multiclass
Brier summed over classes everywhere, strict replicates of aggregates,
probabilities from float64 logits, guarded temperature scaling, balanced
accuracy, bias-corrected ECE/MCE intervals, warnings.
"""

SCORING_VERSION = 1
