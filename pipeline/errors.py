"""The one exception type for mistakes a user can make, and the environment's faults as one line."""

from __future__ import annotations

import errno


class DhkdError(Exception):
    """A user-caused error (a path, an option, a store that does not match) or a fault of the
    environment (a full disk, a read-only folder).

    The CLI prints it as one line and exits with code 2; anything else is a bug and keeps its
    traceback.
    """


class BadArgument(DhkdError, ValueError):
    """A value an argument does not take (a NaN temperature, a batch size of 0): a ``ValueError``
    for the Python API, one line and exit code 2 on the command line."""


class WrongType(DhkdError, TypeError):
    """An argument of the wrong type (float labels, one head where two are needed): a ``TypeError``
    for the Python API, one line and exit code 2 on the command line."""


# errno values that are the environment's doing, not a bug: the CLI turns them into one line
# wherever they escape (file writes in the stages also catch them where they happen).
ENVIRONMENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ENOSPC", "EDQUOT", "EACCES", "EPERM", "EROFS", "EIO", "ENAMETOOLONG", "EMFILE", "ENFILE")
    if hasattr(errno, name)
)


def one_line(what, limit: int | None = None) -> str:
    """The project's one formatter of a message line: ``what`` (a text or an exception) with its
    whitespace collapsed and any control character escaped (a message may quote a file or a store:
    ``\x1b`` is shown, never acted on); an exception with no text is named by its type, an OSError
    by its text and errno name (``No space left on device (ENOSPC)``); cut at ``limit`` characters
    with "..."."""
    from dhkd_pipe.terminal_text import escaped

    if isinstance(what, BaseException):
        text = getattr(what, "strerror", None) or str(what) or type(what).__name__
        code = errno.errorcode.get(getattr(what, "errno", None) or -1)
        if code and code not in str(text):
            text = f"{text} ({code})"
    else:
        text = what
    text = escaped(" ".join(str(text).split()))
    return text[:limit] + "..." if limit is not None and len(text) > limit else text


def io_error(path, exc: OSError, doing: str = "write") -> DhkdError:
    """A DhkdError naming the path and the errno: ``cannot write PATH: No space left on device (ENOSPC)``."""
    return DhkdError(f"cannot {doing} {path}: {one_line(exc)}")
