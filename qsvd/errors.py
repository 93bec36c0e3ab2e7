"""The one exception type a user sees as a one-line message instead of a traceback."""


class QSVDError(Exception):
    """A problem with the user's input, with a message that names it and the fix."""
