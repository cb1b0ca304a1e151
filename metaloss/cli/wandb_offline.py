"""Moved to :mod:`metaloss.wandb_offline`; kept so old imports still work."""

from metaloss.wandb_offline import artifact_file, read_run  # noqa: F401
