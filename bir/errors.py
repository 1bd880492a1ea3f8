"""The exception for mistakes a user can fix (a setting, a path, an input), apart from bugs.

The entry points (:mod:`bir.cli`) print a :class:`UsageError`'s message alone on stderr, with no
traceback, and exit with status 2; every other exception keeps its traceback. So raise it only
where the message says what to change, e.g. ``input= is required: the folder of images to
restore``, and never for a failure that a change of settings cannot fix.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A bad setting or input; the message names it and says what to change."""


__all__ = ["UsageError"]
