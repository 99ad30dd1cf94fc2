"""User-facing errors: anything a user can cause (a bad file, an unknown speaker, a missing run dir)
is raised as `UserError` and ends the command with one `error: ...` line on stderr and exit code 2.
"""


class UserError(Exception):
    """An error the user can fix; its message is shown as is, without a traceback."""


def require(condition: bool, message: str) -> None:
    """Raise `UserError(message)` unless `condition` holds."""
    if not condition:
        raise UserError(message)


def brief(value, width: int = 80) -> str:
    """A short repr of a user-given value for an error message: bounded in time and length however big
    or deep the value is (a YAML "billion laughs" must not take minutes to describe)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 3, 4, 4, width, width
    text = r.repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
