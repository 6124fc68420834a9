"""The one error type users see for bad input.

Every check on user-supplied files, names and values raises :class:`OVDError` with the file (or
config key) and the reason, so that command-line tools can print a single clear line instead of a
traceback.
"""

from __future__ import annotations

from os import PathLike


class OVDError(ValueError):
    """Bad input: a missing or corrupt file, a malformed field, an unknown name.

    Args:
        reason: what is wrong, in one sentence.
        path: the file involved, if any.
        field: the JSON field / config key involved, if any (e.g. ``annotations[3].bbox``).
    """

    def __init__(self, reason: str, *, path: str | PathLike[str] | None = None, field: str | None = None):
        self.reason = reason
        self.path = None if path is None else str(path)
        self.field = field
        where = []
        if self.path is not None:
            where.append(self.path)
        if field is not None:
            where.append(field)
        prefix = ": ".join(where)
        super().__init__(f"{prefix}: {reason}" if prefix else reason)
