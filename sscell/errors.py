"""The one exception type that sscell raises for bad input or bad configuration."""


class SscellError(Exception):
    """A problem the user can fix; its message is one line naming the problem and the fix."""
