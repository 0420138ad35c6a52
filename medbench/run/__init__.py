"""Running: run requests and their keys, data preparation, the runner (preflight, skip / resume / train,
failures recorded per run), dispatch to local or SLURM jobs, status of a store, the ``--dry-run`` plan."""
