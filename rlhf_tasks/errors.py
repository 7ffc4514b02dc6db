"""Errors meant for people: the CLI prints the message (no traceback) and exits with the code."""


class UserError(Exception):
    """A mistake the user can fix; the message says what and where."""

    exit_code = 2


class ConfigError(UserError):
    """A bad params.yaml, override or command-line argument (exit code 2)."""

    exit_code = 2


class DataError(UserError):
    """Input data that cannot be used (exit code 1, as for data that fails validation)."""

    exit_code = 1


class TrainingFailed(UserError):
    """A stage trained, but what it made is unusable (exit code 1): nothing of it is recorded
    or registered, and the message says what to change."""

    exit_code = 1


class BusyError(UserError):
    """Another run holds the project (exit code 3): ``rlhf run`` and ``rlhf ingest`` take turns."""

    exit_code = 3


class ResourceError(UserError):
    """Something the run relies on failed, not its inputs (exit code 4): the message names it,
    the cause, and what was left as it was."""

    exit_code = 4


class CheckpointError(ResourceError):
    """A checkpoint could not be written (a full disk, an I/O error); earlier ones are intact."""


class TrackingServerError(ResourceError):
    """The MLflow tracking server did not answer, even after retrying."""
