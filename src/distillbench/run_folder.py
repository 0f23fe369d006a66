"""The names of what a command writes into its run folder, defined here once (docs/commands.md lists them).

A training run's folder holds the resolved config, its tables, samples and figures, its checkpoints and, last,
its summary; ``sample`` and ``evaluate`` write the subset that applies to them.
"""

#: marks the folder as a run's: created exclusively before anything else is written there
MARKER = ".run.json"
#: the resolved config of the run
CONFIG = "config.yaml"
#: every logged training scalar, one row per logging step (Lightning's CSV logger)
METRICS = "metrics.csv"
#: one row per periodic evaluation: kimg, generator step, compute spent, the metrics and their protocol
EVALUATIONS = "eval.csv"
#: the final samples (``x``, and ``labels`` for a conditional model)
SAMPLES = "samples.npz"
#: the final figures, written last: its presence marks a finished run
SUMMARY = "summary.json"
#: the sample grid of every periodic evaluation (``step_<generator step>.png``)
GRIDS = "grids"
#: ``step_<generator step>.ckpt`` with ``last.ckpt`` and their ``.sha256`` digests
CHECKPOINTS = "checkpoints"
#: the newest checkpoint, inside :data:`CHECKPOINTS`
LAST_CHECKPOINT = "last.ckpt"
#: the weights with the best tracked metric so far (``checkpoint.best``), inside :data:`CHECKPOINTS`
BEST_CHECKPOINT = "best.ckpt"
#: the W&B run id, kept with the checkpoints so a resumed run continues the same W&B run
WANDB_ID = f"{CHECKPOINTS}/wandb_id.txt"
#: files that only a run writes; any of them in a folder means the folder holds a run
RUN_FILES = (MARKER, CONFIG, METRICS, EVALUATIONS, SUMMARY, SAMPLES, CHECKPOINTS)
