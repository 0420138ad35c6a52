"""The training-numerics version: which training code produced a run's weights and predictions.

**Policy** (with :data:`medbench.scoring.version.SCORING_VERSION`; documented in
:mod:`medbench.store.rundir` and the README): bump :data:`TRAINING_NUMERICS`
in the same commit as any change that changes the numbers a run produces for
the same request — the optimizer, schedule or HyperRule rules, augmentation,
MixUp, initialisation, data loading or preprocessing that reaches the network,
the evaluation forward pass, or what is saved in the prediction files.
Refactors that give bit-identical runs keep it. It enters the run key
(:func:`medbench.run.request.run_key`), so after a bump ``medbench run``
trains new runs instead of reusing old ones, and it is recorded in each run's
``config.json`` (``training_numerics``; absent: a run from before the version
existed). ``medbench leaderboard`` refuses to put runs of different training
numerics in one board (their differences would be partly code, not backbone),
naming two such runs. ``medbench.__version__`` is not used for this: a release
may leave training unchanged, and a fix between releases may change it.

History: 1 — the first recorded version (the prediction files also hold the
logits).
"""

TRAINING_NUMERICS = 1
