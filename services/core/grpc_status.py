"""The one place cbmir errors become gRPC status codes.

The query service answers with them; the HTTP gateway turns the same code into its HTTP status
(``services/gateway/errors.py``), so both edges classify an error the same way.
"""

from __future__ import annotations

import grpc

from services.core.errors import (
    BackendUnavailable,
    ConfigError,
    InvalidInput,
    NotFound,
    PermissionDenied,
    StorageError,
    Unauthenticated,
)


def grpc_code_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code of a failure (INTERNAL for anything that is not a known cbmir error)."""
    if isinstance(exc, InvalidInput):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, NotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, (BackendUnavailable, StorageError)):  # the index or the disk: try again later
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, ConfigError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(exc, PermissionDenied):
        return grpc.StatusCode.PERMISSION_DENIED
    return grpc.StatusCode.INTERNAL
