"""The base of the project's own errors.

Every error a stage or a pipeline helper raises on purpose (bad config, bad input, a damaged or
mismatched file) derives from :class:`DistillError` and says what is wrong and where; the CLI prints
its message as one line and exits 1, never a traceback. The logit store's errors
(``store.StoreError``) are the other family: the store package knows nothing of this one.
"""

from __future__ import annotations


class DistillError(Exception):
    """An error reported to the user as one message naming the file, field or value."""
