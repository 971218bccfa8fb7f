"""The one exception type for mistakes a user can make, and the environment's faults as one line."""

from __future__ import annotations

import errno


class DhkdError(Exception):
    """A user-caused error (a path, an option, a store that does not match) or a fault of the
    environment (a full disk, a read-only folder).

    The CLI prints it as one line and exits with code 2; anything else is a bug and keeps its
    traceback.
    """


# errno values that are the environment's doing, not a bug: the CLI turns them into one line
# wherever they escape (file writes in the stages also catch them where they happen).
ENVIRONMENT_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EACCES", "EPERM", "EROFS", "EIO", "ENAMETOOLONG", "EMFILE", "ENFILE")
    if hasattr(errno, name)
)


def os_reason(exc: OSError) -> str:
    """``No space left on device (ENOSPC)``: the error's text and errno name, on one line."""
    text = exc.strerror or str(exc) or type(exc).__name__
    code = errno.errorcode.get(exc.errno or -1)
    if code and code not in text:
        text = f"{text} ({code})"
    return " ".join(str(text).split())


def io_error(path, exc: OSError, doing: str = "write") -> DhkdError:
    """A DhkdError naming the path and the errno: ``cannot write PATH: No space left on device (ENOSPC)``."""
    return DhkdError(f"cannot {doing} {path}: {os_reason(exc)}")
