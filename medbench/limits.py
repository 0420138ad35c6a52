"""Bounds of every number a task spec or a command line can set, in one place (``TaskSpec`` fields and the
typer options use these): far beyond any study's needs, and far from what would overflow, exhaust memory or
run for hours before failing. Kept free of imports so the command line can use them at start-up."""

#: image sizes in px: ``input.resize``, ``input.crop``, resolution variants
MAX_PIXELS = 8192
#: ``hyperrule.batch_size`` and ``--micro-batch``
MAX_BATCH = 65_536
#: ``hyperrule.base_lr`` (learning rate per 512 images; BiT uses 0.003)
MAX_LR = 10.0
#: schedule boundaries and ``--max-steps``
MAX_STEPS = 100_000_000
#: every seed (split, run, bootstrap): numpy's seed sequences take any non-negative integer; 32 bits suffice
MAX_SEED = 2**32 - 1
#: seeds per task (``default_seeds``, ``--seeds``)
MAX_SEEDS = 1000
#: bootstrap resamples
MAX_RESAMPLES = 100_000
#: calibration bins
MAX_BINS = 10_000
#: images: ``expected_train_size``, ``scoring.min_group_size``, shots per class
MAX_IMAGES = 1_000_000_000
#: attributes crossed into subgroups
MAX_INTERSECTIONS = 8
#: validation passes during training
MAX_VALIDATION_POINTS = 10_000
#: CPU threads a command line may ask for
MAX_THREADS = 4096
#: jobs a dispatcher may run at once
MAX_JOBS = 100_000
