"""User-facing errors: the CLI prints their message on one line and exits with their code, no traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad input, missing file, unavailable feature). Exit code 1 by default."""

    exit_code: int = 1


class ConfigError(UserError):
    """An invalid job config, override or command-line value, found before any work starts. Exit code 2."""

    exit_code = 2


class NotAvailableError(UserError):
    """A feature the studio does not have yet. The message says what is missing; exit code 1."""

    def __init__(self, what: str, detail: str = "") -> None:
        message = f"{what} is not yet available"
        super().__init__(f"{message}: {detail}" if detail else message)
