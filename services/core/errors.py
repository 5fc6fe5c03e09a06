"""The exception root for ``services/`` and ``workers/``: re-exported from :mod:`models.errors`.

The classes live in the bottom layer so that ``models/`` can raise them without importing
``services/``. Import them from here in service and worker code.
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

__all__ = [
    "BackendUnavailable",
    "CbmirError",
    "ConfigError",
    "DecodeError",
    "InvalidInput",
    "NotFound",
    "StorageError",
    "TooLarge",
    "UnreadableInput",
    "UnsupportedInput",
]
