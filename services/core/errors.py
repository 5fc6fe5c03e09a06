"""The exception root for ``services/`` and ``workers/``: re-exported from :mod:`models.errors`.

The classes live in the bottom layer so that ``models/`` can raise them without importing
``services/``. Import them from here in service and worker code. The access errors below exist
only on the service side; they derive from the same root.
"""

from models.errors import (
    BackendUnavailable,
    CbmirError,
    ConfigError,
    DecodeError,
    InvalidInput,
    NotFound,
    StorageError,
    TooLarge,
    UnreadableInput,
    UnsupportedInput,
)


class Unauthenticated(CbmirError):
    """The caller sent no token, or one that is not valid."""

    reason = "unauthenticated"


class PermissionDenied(CbmirError):
    """The caller's token is valid but its role does not allow this call."""

    reason = "permission-denied"


__all__ = [
    "BackendUnavailable",
    "CbmirError",
    "ConfigError",
    "DecodeError",
    "InvalidInput",
    "NotFound",
    "PermissionDenied",
    "StorageError",
    "TooLarge",
    "Unauthenticated",
    "UnreadableInput",
    "UnsupportedInput",
]
