"""User-facing errors: anything a user can cause (a bad file, an unknown speaker, a missing run dir)
is raised as `UserError` and ends the command with one `error: ...` line on stderr and exit code 2.
"""


class UserError(Exception):
    """An error the user can fix; its message is shown as is, without a traceback."""


def require(condition: bool, message: str) -> None:
    """Raise `UserError(message)` unless `condition` holds."""
    if not condition:
        raise UserError(message)
