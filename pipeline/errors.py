"""The one exception type for mistakes a user can make."""


class DhkdError(Exception):
    """A user-caused error (a path, an option, a store that does not match).

    The CLI prints it as one line and exits with code 2; anything else is a bug and keeps its
    traceback.
    """
