"""Tasks: how a batch becomes a loss and metrics, and how a model is evaluated (one loop for all).

TASKS maps the task a dataset declares (DataBundle.task) to its class; every task takes
label_smoothing.
"""

from fqtrun.tasks.base import Task
from fqtrun.tasks.classification import Classification
from fqtrun.tasks.language_model import LanguageModel

TASKS: dict[str, type[Task]] = {"classification": Classification, "language_model": LanguageModel}

__all__ = ["TASKS", "Classification", "LanguageModel", "Task"]
