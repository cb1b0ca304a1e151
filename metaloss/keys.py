"""Which config keys define a result, and which do not: the one table.

Run identity (:func:`metaloss.runs.identity`: may this directory hold this run? may this
checkpoint continue it?), W&B group names (:mod:`metaloss.cli.logger`) and the report's
setting columns (:mod:`metaloss.report`) all read these tuples; none keeps its own list. A key
names a config node and everything below it (``logger`` covers ``logger.project``).
"""

from __future__ import annotations

# How a run is run and shown, never what it computes.
LOCAL: tuple[str, ...] = ("progress", "logger", "hydra", "trusted_modules", "threads")

# Meta-training bookkeeping: where it resumes from and how often it writes checkpoints and
# plots. φ after every step is the same whatever these say.
BOOKKEEPING: tuple[str, ...] = ("meta.resume_from", "meta.checkpoint_every", "meta.plot_every")

# The outer step budget: offline, more steps continue the same trajectory (online, the loss
# sees progress t = step / steps, so there it defines the result: see :func:`continuation`).
BUDGET: tuple[str, ...] = ("meta.steps",)

# What is done with φ once it is learned: which kept φ held-out selection may prefer to the
# start (its margin), the meta-test and its baselines. They define the result, not the
# trajectory of φ, so a finished run resumed with other values chooses and tests again.
AFTER_TRAINING: tuple[str, ...] = (
    "meta.selection.margin",
    "meta_test",
    "compare",
    "metric",
    "loss_path",
)

# Keys that may differ between a meta-training run and its continuation from a checkpoint.
VOLATILE: tuple[str, ...] = BUDGET + BOOKKEEPING + LOCAL + AFTER_TRAINING

# Keys a W&B group name never shows: they do not change what a run computes.
NOT_SETTINGS: tuple[str, ...] = LOCAL + BOOKKEEPING

# Keys the report never splits rows by: replicates of one setting, and how a run is shown.
REPORT_IGNORED: tuple[str, ...] = ("seed",) + LOCAL


def continuation(online: bool) -> tuple[str, ...]:
    """The keys a meta-training run's identity ignores: :data:`VOLATILE`, except that online
    the step budget shapes the run itself and so is part of it."""
    return tuple(k for k in VOLATILE if not (online and k in BUDGET))
