"""One exception type for every problem a user can fix.

The CLI turns a `UserError` into one line on stderr and exit code 2, no
traceback. Its message names the problem and the fix.
"""


class UserError(Exception):
    """Bad input: a missing file, a wrong size, an unknown token, ..."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def gist(e: BaseException, limit: int = 160) -> str:
    """An exception's message on one line: its first line, and the next when the first only introduces it
    (torch's "Error(s) in loading state_dict for X:" says which tensor on the line after)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    text = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return text[:limit]


def is_file(path) -> bool:
    """pathlib's is_file, except that a name the OS refuses (longer than its limit, or holding NUL)
    is simply not there: pathlib raises OSError for ENAMETOOLONG, which would escape as a traceback."""
    from pathlib import Path

    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def is_dir(path) -> bool:
    """pathlib's is_dir, with is_file's tolerance of names the OS refuses."""
    from pathlib import Path

    try:
        return Path(path).is_dir()
    except (OSError, ValueError):
        return False
