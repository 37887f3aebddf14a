"""What the conversation store raises; the HTTP layer maps them in one place (``api/errors.py``)."""

from __future__ import annotations


class StoreError(Exception):
    """Base class so callers (HTTP routes) can map every store failure in one place."""


class _LookupStoreError(StoreError, LookupError):
    """A missing thing; ``str()`` is the plain message (``KeyError`` would quote it)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class ConversationNotFound(_LookupStoreError, KeyError):
    """No conversation with that id (routes should answer 404)."""


class MessageNotFound(_LookupStoreError, KeyError, IndexError):
    """Message index out of range; also an ``IndexError`` because indexes are list positions."""


class SwipeNotFound(_LookupStoreError, IndexError):
    """``swipe_id`` outside the message's list of swipes."""


class SchemaVersionError(StoreError):
    """The database was written by a newer server; we refuse to touch it."""


class TurnLost(StoreError):
    """A chat turn's lease ran out and another replica took the conversation over (or its turns
    were removed with it); the reply was not stored."""


class IdempotencyKeyReused(StoreError):
    """An ``Idempotency-Key`` already names a different request on this conversation."""


class DatabaseUnavailable(StoreError):
    """The database does not answer (it is down, restarting, or the connection to it was lost);
    nothing of the operation was stored, or (a connection lost while committing) it is unknown
    whether it was. Routes answer 503 with ``Retry-After``."""

    #: Seconds a client is told to wait before trying again.
    retry_after = 2
