"""Every failure the gateway answers, as an HTTP status: the one table.

A failure has a code name: the gRPC status a call ended with, the gRPC code of a cbmir error
raised here (:func:`services.core.grpc_status.grpc_code_for`, as the query service answers), or
one of the gateway's own (``PAYLOAD_TOO_LARGE``, ``UNSUPPORTED_MEDIA_TYPE``, ``NOT_ACCEPTABLE``,
``REQUEST_TIMEOUT``, and ``RESOURCE_EXHAUSTED`` for its own limits). :data:`HTTP_STATUS` turns
the name into the status; anything not listed is 500, with a fixed message and no traceback. The
body is always ``{"error": {"code": NAME, "message": TEXT}}``.

FAILED_PRECONDITION is 409 Conflict: the request is well-formed, but the service's state refuses it
(an index of another model, erasure by patient without the site secret). 412 is left to what HTTP
means by it, a failed ``If-Match``/``If-Unmodified-Since``.
"""

from __future__ import annotations

import logging

import grpc
from fastapi.responses import JSONResponse

from services.core.errors import (
    CbmirError,
    TooLarge,
    UnsupportedInput,
)
from services.core.grpc_status import grpc_code_for
from services.core.logs import mask_values

logger = logging.getLogger(__name__)

INTERNAL = "INTERNAL"

# code name -> HTTP status; anything else is 500
HTTP_STATUS: dict[str, int] = {
    "INVALID_ARGUMENT": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "METHOD_NOT_ALLOWED": 405,
    "NOT_ACCEPTABLE": 406,
    "REQUEST_TIMEOUT": 408,
    "FAILED_PRECONDITION": 409,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "PAYLOAD_TOO_LARGE": 413,
    "UNSUPPORTED_MEDIA_TYPE": 415,
    "RESOURCE_EXHAUSTED": 429,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 503,
    INTERNAL: 500,
}


class PayloadTooLarge(TooLarge):
    """The request body (or the file in it) is over the query byte budget."""

    reason = "payload-too-large"


class UnsupportedMediaType(UnsupportedInput):
    """The body, or the file in it, is not a kind this API takes (JSON or multipart; DICOM, PNG, JPEG)."""

    reason = "unsupported-media-type"


class NotAcceptable(CbmirError):
    """The caller's ``Accept`` allows nothing this endpoint answers with."""

    reason = "not-acceptable"


class TooManyRequests(CbmirError):
    """The gateway has as many searches in progress as it may; retry shortly."""

    reason = "too-many-requests"


class BodyTimeout(CbmirError):
    """The request's body did not arrive in time (a slow sender does not keep a search slot)."""

    reason = "request-timeout"


# the gateway's own errors -> code name (checked first: some subclass InvalidInput); every other
# cbmir error has the gRPC code the query service would answer with (grpc_code_for)
_GATEWAY_CODES: tuple[tuple[type[CbmirError], str], ...] = (
    (PayloadTooLarge, "PAYLOAD_TOO_LARGE"),
    (UnsupportedMediaType, "UNSUPPORTED_MEDIA_TYPE"),
    (NotAcceptable, "NOT_ACCEPTABLE"),
    (TooManyRequests, "RESOURCE_EXHAUSTED"),
    (BodyTimeout, "REQUEST_TIMEOUT"),
)

# what a caller is told for codes whose details are the transport's, not the service's
_FIXED_MESSAGES = {
    INTERNAL: "internal error; see the gateway and query service logs",
    "UNKNOWN": "internal error; see the gateway and query service logs",
}


def code_for(exc: BaseException) -> str:
    """The code name of a failure: a gRPC call's status, or a cbmir error's; else INTERNAL."""
    if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
        return exc.code().name
    if isinstance(exc, CbmirError):
        return next((code for kind, code in _GATEWAY_CODES if isinstance(exc, kind)), grpc_code_for(exc).name)
    return INTERNAL


def http_status(code: str) -> int:
    """The HTTP status of a code name (:data:`HTTP_STATUS`; 500 when not listed)."""
    return HTTP_STATUS.get(code, 500)


def code_of_status(status: int) -> str:
    """The code name of an HTTP status that the framework chose (404 and 405 of routing, say)."""
    return next((code for code, value in HTTP_STATUS.items() if value == status), f"HTTP_{status}")


def error_response(code: str, message: str, status: int | None = None) -> JSONResponse:
    """The error body, with ``WWW-Authenticate`` on 401 and ``Retry-After`` on 429 and 503."""
    status = http_status(code) if status is None else status
    headers = {"Cache-Control": "no-store"}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="cbmir"'
    if status in (429, 503):
        headers["Retry-After"] = "1"
    body = {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def response_for(exc: BaseException) -> JSONResponse:
    """The answer to a failure: its code's status and a PHI-free one-line message."""
    code = code_for(exc)
    if code in _FIXED_MESSAGES or http_status(code) == 500:
        if not isinstance(exc, grpc.RpcError):
            logger.error("request failed", exc_info=exc)  # the log masks values in the traceback
        else:
            logger.error("the query service answered %s", code)
        return error_response(code, _FIXED_MESSAGES.get(code, _FIXED_MESSAGES[INTERNAL]))
    text = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    message = " ".join(mask_values(text or code.lower().replace("_", " ")).split())
    return error_response(code, message[:500])
