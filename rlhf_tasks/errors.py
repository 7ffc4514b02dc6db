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


class BusyError(UserError):
    """Another run holds the project (exit code 3): ``rlhf run`` and ``rlhf ingest`` take turns."""

    exit_code = 3
