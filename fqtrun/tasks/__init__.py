"""Tasks: how a batch becomes a loss and metrics, and how a model is evaluated (one loop for all)."""

from fqtrun.tasks.base import Task
from fqtrun.tasks.classification import Classification

__all__ = ["Classification", "Task"]
