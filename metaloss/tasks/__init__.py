"""Tasks: seeded data splits with a declared kind. Chosen by Hydra (`conf/task/*.yaml`)."""

from metaloss.tasks.base import Task

__all__ = ["Task"]
