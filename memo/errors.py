"""The error users see when memo is given something it cannot work with.

Messages start with the component (``memo.swap: ``), give the numbers, and end with the fix.
Internal invariants use ``assert`` (a failure there is a bug in memo, not the user's input).
"""


class MemoError(Exception):
    """Bad input or an impossible configuration, raised before any work is lost."""
