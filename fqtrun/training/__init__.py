"""The training loop and what it needs: lr schedule, checkpoints, loggers, progress."""
