"""The one exception root of cbmir.

It lives in the bottom layer (``models/``, which imports nothing of ours) so that every layer can
raise it while dependencies still point one way: services -> models, workers -> services/models.

Everything raised on purpose inside cbmir derives from :class:`CbmirError`. The edges map these
classes to their protocol's vocabulary in exactly one place each: DICOM statuses in
``services/ingest/listener.py`` (``dicom_status_for``) and gRPC codes in ``services/query/service.py``
(``grpc_code_for``). Nothing else inspects exception types to choose a status.
"""

from __future__ import annotations


class CbmirError(Exception):
    """Root of every deliberate cbmir failure. ``reason`` is a short, PHI-free slug."""

    reason = "error"

    def __init__(self, message: str, *, reason: str | None = None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class InvalidInput(CbmirError):
    """The caller sent something malformed (bad request, bad parameter)."""

    reason = "invalid-input"


class UnreadableInput(InvalidInput):
    """The bytes cannot be parsed as the format they claim to be (truncated, not DICOM, ...)."""

    reason = "unreadable"


class UnsupportedInput(InvalidInput):
    """Well-formed, but nothing here can turn it into an image (SR document, unknown SOP class, ...)."""

    reason = "unsupported"


class DecodeError(InvalidInput):
    """Parsed, but the pixel data or waveform cannot be decoded (no codec, corrupt stream, ...)."""

    reason = "undecodable"


class TooLarge(InvalidInput):
    """Dimensions or size over a configured limit."""

    reason = "too-large"


class NotFound(CbmirError):
    """A referenced object (SOP Instance UID, collection, model) does not exist."""

    reason = "not-found"


class StorageError(CbmirError):
    """Writing to the spool, quarantine or archive failed (disk full, permissions, ...)."""

    reason = "storage"


class BackendUnavailable(CbmirError):
    """A backend (index, broker, index owner) cannot be reached right now; retrying may help."""

    reason = "unavailable"


class ConfigError(CbmirError):
    """A setting is missing or invalid."""

    reason = "config"
