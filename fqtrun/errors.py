"""Errors a user can fix: the CLI prints their one-line message and exits with status 2."""


class FqtrunError(Exception):
    """Base of every error whose message is meant for the person running fqtrun."""


class ConfigError(FqtrunError, ValueError):
    """A bad setting."""


class CheckpointError(FqtrunError):
    """A missing, corrupt or mismatched checkpoint."""


class TrainingError(FqtrunError):
    """Training cannot go on (e.g. a NaN loss with nan_policy=stop)."""


class NumericsError(FqtrunError):
    """NaN or inf met where a command cannot skip it (a variance study, a benchmark)."""
