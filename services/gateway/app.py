"""The gateway's HTTP application: the JSON API, the thumbnails and the panel.

Endpoints (the OpenAPI document is served at ``/openapi.json`` and committed as
``docs/openapi.json``):

* ``GET /healthz``: 200 while the query service's health says SERVING, else 503; no token;
* ``GET /v1/stats``: the index statistics (the admin role);
* ``POST /v1/search``: similar cases, from JSON or from a multipart upload (the search role);
* ``GET /studies/{study}/series/{series}/instances/{instance}/rendered``: a PNG thumbnail, the
  DICOMweb ``rendered`` resource (``viewport=W,H`` or ``size=N``; ETag and ``If-None-Match``);
* ``GET /``: the similar-cases panel (``static/``).

Request bodies are held to the query byte budget before anything is decoded: a Content-Length over
it is refused before the body is read, a body without one is counted while it is read and cut at
the budget. Bodies are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Annotated, Any

import grpc
from fastapi import Depends, FastAPI, Request
from fastapi import Path as PathParam
from fastapi import Query as QueryParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.core import answers
from services.core.answers import MAX_THUMBNAIL, MIN_THUMBNAIL
from services.core.config import GatewaySettings
from services.core.errors import CbmirError, InvalidInput, Unauthenticated
from services.core.security import is_loopback
from services.core.vocabulary import UID_PATTERN
from services.gateway import api
from services.gateway.errors import (
    BodyTimeout,
    NotAcceptable,
    PayloadTooLarge,
    TooManyRequests,
    UnsupportedMediaType,
    code_of_status,
    error_response,
    response_for,
)
from services.gateway.upstream import QueryUpstream
from services.grpc_gen.cbmir.v1 import search_pb2

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
# the panel and the API: nothing from elsewhere, no inline script or style, thumbnails as blob: URLs
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)
SECURITY_HEADERS = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
)
RENDER_CACHE_CONTROL = "private, max-age=3600"
# searches in progress at once, each holding its upload (up to the byte budget, plus its copy in the
# gRPC message) until the query service answers; more are answered 429 at once
SEARCHES_AT_ONCE = 8
RENDERS_AT_ONCE = 16  # a grid's thumbnails load in parallel; the query service decodes one at a time
# a search's body must arrive within this; a slow sender does not keep its slot
BODY_TIMEOUT_S = 60.0


class SecurityHeaders:
    """Adds :data:`SECURITY_HEADERS` to every response (pure ASGI: streams pass through)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the call on; add the headers to its response's start."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in SECURITY_HEADERS if name not in present]
                message = dict(message, headers=headers)
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, at most ``max_bytes``: a Content-Length over it is refused before anything is
    read; without one, the body is counted as it arrives and refused once it passes the budget."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise InvalidInput("Content-Length is not a number")
        if int(declared) > max_bytes:
            raise PayloadTooLarge(f"the request body is {int(declared)} bytes; at most {max_bytes} are taken")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise PayloadTooLarge(f"the request body is over {max_bytes} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise InvalidInput("the client went away before the request body was complete") from None
    return b"".join(chunks)


def _replay(body: bytes) -> Callable[[], Awaitable[MutableMapping[str, Any]]]:
    sent = False

    async def receive() -> MutableMapping[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _parse_search(request: Request, budget: api.Budget) -> search_pb2.SearchSimilarRequest:
    """The search request of a JSON body or a multipart form (the file in ``file``)."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media not in ("application/json", "multipart/form-data"):
        raise UnsupportedMediaType(
            "send application/json, or multipart/form-data with the file in the field named file"
        )
    body = await read_body(request, budget.max_body)
    if media == "application/json":
        try:
            document = json.loads(body)
        except (UnicodeDecodeError, ValueError):
            raise InvalidInput("the body is not JSON") from None
        if not isinstance(document, dict):
            raise InvalidInput("the body must be a JSON object")
        try:
            query = api.SearchQuery.model_validate(document)
        except ValidationError as exc:
            raise InvalidInput(_validation_message(exc)) from None
        return api.search_request(query, budget)
    replayed = Request(request.scope, receive=_replay(body))
    upload: bytes | None = None
    fields: list[tuple[str, str]] = []
    async with replayed.form(max_files=1, max_fields=32) as form:
        for name, value in form.multi_items():
            if isinstance(value, str):
                fields.append((name, value))
            elif name != "file":
                raise InvalidInput("the query file goes in the form field named file")
            else:
                upload = await value.read(budget.max_bytes + 1)
    try:
        query = api.SearchQuery.model_validate(api.form_query(fields))
    except ValidationError as exc:
        raise InvalidInput(_validation_message(exc)) from None
    return api.search_request(query, budget, upload)


def _validation_message(exc: ValidationError | RequestValidationError) -> str:
    """The first problem of a validation failure, by field; never the value that was sent."""
    errors = exc.errors()
    if not errors:
        return "the request is not valid"
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path"))
    message = str(first.get("msg", "is not valid")).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {message}{more}" if where else f"{message}{more}"


def _accepts_png(accept: str | None) -> bool:
    """Whether an ``Accept`` header allows image/png (absent: anything is acceptable)."""
    if accept is None or not accept.strip():
        return True
    for item in accept.split(","):
        media, *parameters = (part.strip() for part in item.split(";"))
        quality = 1.0
        for parameter in parameters:
            key, _, value = parameter.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if quality > 0 and media.lower() in ("image/png", "image/*", "*/*"):
            return True
    return False


def _matches(if_none_match: str | None, etag: str) -> bool:
    """Whether ``If-None-Match`` names ``etag`` (weak comparison) or is ``*``."""
    if not if_none_match:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


def _quoted_etag(raw: str) -> str:
    text = raw.strip().strip('"')
    if not text or not all(c.isalnum() or c in "-._:" for c in text):
        text = hashlib.sha256(raw.encode()).hexdigest()[:32]
    return f'"{text}"'


def _render_size(viewport: str | None, size: int | None) -> int:
    """``RenderInstanceRequest.max_size`` from ``viewport=W,H`` (the smaller side) or ``size=N``."""
    if viewport is not None and size is not None:
        raise InvalidInput("give viewport or size, not both")
    if viewport is not None:
        width, _, height = viewport.partition(",")
        if not (width.isdigit() and height.isdigit()) or min(int(width), int(height)) < 1:
            raise InvalidInput("viewport must be W,H (two positive integers)")
        size = min(int(width), int(height))
    if size is not None and not MIN_THUMBNAIL <= size <= MAX_THUMBNAIL:
        raise InvalidInput(
            f"a thumbnail's size must be {MIN_THUMBNAIL} to {MAX_THUMBNAIL} pixels, got {size}"
        )
    return size or 0


Uid = Annotated[str, PathParam(pattern=UID_PATTERN, max_length=64)]
Viewport = Annotated[
    str | None, QueryParam(pattern=r"^[0-9]{1,5},[0-9]{1,5}$", description="W,H: fit the thumbnail in")
]
Size = Annotated[
    int | None, QueryParam(ge=MIN_THUMBNAIL, le=MAX_THUMBNAIL, description="the longest side in pixels")
]

# documents the token in the OpenAPI document; the query service checks it, not this
BEARER = [Depends(HTTPBearer(auto_error=False, description="an API token (search or admin role)"))]

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": api.ErrorAnswer, "description": description}
    for status, description in (
        (400, "a bad request (INVALID_ARGUMENT)"),
        (401, "no valid token (UNAUTHENTICATED)"),
        (403, "the token lacks the role (PERMISSION_DENIED)"),
        (409, "the service's state refuses it (FAILED_PRECONDITION)"),
        (429, "too many searches at once (RESOURCE_EXHAUSTED)"),
        (500, "an internal error"),
        (501, "not implemented by this query service (UNIMPLEMENTED)"),
        (503, "the query service is unavailable or busy (UNAVAILABLE, DEADLINE_EXCEEDED)"),
    )
}


def _errors(*extra: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    return ERRORS | {status: {"model": api.ErrorAnswer, "description": text} for status, text in extra}


SEARCH_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": api.SearchQuery.model_json_schema()},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "additionalProperties": False,
                "required": ["file"],
                "properties": {
                    "file": {
                        "type": "string",
                        "format": "binary",
                        "description": "a DICOM Part 10 file, or a PNG or JPEG picture (then give modality)",
                    },
                    **{
                        name: api.SearchQuery.model_json_schema()["properties"][name]
                        for name in api.FORM_FIELDS
                        if name != "sop_instance_uid"
                    },
                    "modalities": api.SearchQuery.model_json_schema()["properties"]["modalities"],
                },
            }
        },
    },
}


def create_app(settings: GatewaySettings, upstream: QueryUpstream | None = None) -> FastAPI:
    """The gateway application for ``settings``, calling ``upstream`` (default: a channel to
    ``settings.query_target``, opened lazily and closed at shutdown)."""
    query = upstream or QueryUpstream(settings)
    budget = api.Budget(settings.query_max_bytes)
    # a query service without tokens takes loopback callers (this gateway) for its operator: from
    # the network, only callers with a token are passed on, unless anonymous ones are allowed
    token_required = not is_loopback(settings.host) and not settings.allow_anonymous

    def authorization(request: Request) -> str | None:
        value = request.headers.get("authorization")
        if token_required and not (value or "").strip():
            raise Unauthenticated("this gateway needs an API token (Authorization: Bearer and the token)")
        return value

    searches = asyncio.Semaphore(SEARCHES_AT_ONCE)
    renders = asyncio.Semaphore(RENDERS_AT_ONCE)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        query.close()

    app = FastAPI(
        title="cbmir gateway",
        version="1",
        summary="Similar medical cases over HTTP: the gRPC API of cbmir for browsers and scripts.",
        description=(
            "Send `Authorization: Bearer <token>`: the query service checks it as for its gRPC callers "
            "(search role for searches and thumbnails, admin for statistics). Errors are "
            '`{"error": {"code": ..., "message": ...}}`; FAILED_PRECONDITION is 409.'
        ),
        docs_url=None,  # Swagger UI and ReDoc load scripts from a CDN; the panel's CSP allows none
        redoc_url=None,
        lifespan=lifespan,
    )
    app.add_middleware(SecurityHeaders)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "If-None-Match"],
            expose_headers=["ETag"],
            max_age=600,
        )

    @app.exception_handler(CbmirError)
    async def cbmir_error(_: Request, exc: CbmirError) -> JSONResponse:
        return response_for(exc)

    @app.exception_handler(grpc.RpcError)
    async def rpc_error(_: Request, exc: grpc.RpcError) -> JSONResponse:
        return response_for(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response("INVALID_ARGUMENT", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(code_of_status(exc.status_code), str(exc.detail), status=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        return response_for(exc)

    @app.get(
        "/healthz",
        operation_id="health",
        response_model=api.HealthAnswer,
        responses={503: {"model": api.HealthAnswer}},
    )
    async def healthz() -> JSONResponse:
        """200 while the query service answers SERVING; 503 otherwise. No token needed."""
        serving = await run_in_threadpool(query.serving)
        return JSONResponse(
            {"status": "serving" if serving else "not_serving"},
            status_code=200 if serving else 503,
            headers={"Cache-Control": "no-store"},
        )

    @app.get(
        "/v1/stats",
        operation_id="stats",
        dependencies=BEARER,
        response_model=api.StatsAnswer,
        responses=_errors(),
    )
    async def stats(request: Request) -> JSONResponse:
        """The index statistics (GetIndexStats; the admin role)."""
        answer = await run_in_threadpool(query.stats, authorization(request))
        return JSONResponse(answers.stats_json(answer), headers={"Cache-Control": "no-store"})

    @app.post(
        "/v1/search",
        operation_id="search",
        dependencies=BEARER,
        response_model=api.SearchAnswer,
        openapi_extra={"requestBody": SEARCH_BODY},
        responses=_errors(
            (404, "the UID is not indexed (NOT_FOUND)"),
            (413, "the body or the file is over the byte budget"),
            (415, "not JSON or multipart; or the file is not DICOM, PNG or JPEG"),
        ),
    )
    async def search(request: Request) -> JSONResponse:
        """Similar cases (SearchSimilar; the search role). JSON with one of `sop_instance_uid`,
        `image_base64` + `modality`, `dicom_base64`; or a multipart form with the file in `file` and the
        same fields beside it (`modalities` repeated or comma-separated)."""
        caller = authorization(request)
        # the query service says who the caller is before anything else: without a valid token
        # nobody can hold a search slot or make the gateway buffer an upload
        await run_in_threadpool(query.caller, caller)
        if searches.locked():
            raise TooManyRequests("too many searches are in progress; retry shortly")
        async with searches:
            try:
                message = await asyncio.wait_for(_parse_search(request, budget), BODY_TIMEOUT_S)
            except TimeoutError:
                raise BodyTimeout(f"the request body did not arrive within {BODY_TIMEOUT_S:.0f} s") from None
            answer = await run_in_threadpool(query.search, message, caller)
        return JSONResponse(
            answers.search_json(answer, request.scope.get("root_path", "")),
            headers={"Cache-Control": "no-store"},
        )

    @app.get(
        "/studies/{study}/series/{series}/instances/{instance}/rendered",
        operation_id="rendered",
        dependencies=BEARER,
        response_class=Response,
        responses={
            200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
            304: {"description": "not modified (If-None-Match)"},
            **_errors(
                (404, "no such indexed instance (NOT_FOUND)"),
                (406, "the Accept header does not allow image/png"),
            ),
        },
    )
    async def rendered(
        request: Request,
        study: Uid,
        series: Uid,
        instance: Uid,
        viewport: Viewport = None,
        size: Size = None,
    ) -> Response:
        """A thumbnail of an indexed instance as an 8-bit greyscale PNG (RenderInstance; the search role)."""
        caller = authorization(request)
        if not _accepts_png(request.headers.get("accept")):
            raise NotAcceptable("this resource is image/png only")
        message = search_pb2.RenderInstanceRequest(
            study_instance_uid=study,
            series_instance_uid=series,
            sop_instance_uid=instance,
            max_size=_render_size(viewport, size),
        )
        if renders.locked():
            raise TooManyRequests("too many thumbnails are being rendered; retry shortly")
        async with renders:
            image = await run_in_threadpool(query.render, message, caller)
        etag = _quoted_etag(image.etag or "")
        headers = {"ETag": etag, "Cache-Control": RENDER_CACHE_CONTROL, "Vary": "Authorization"}
        if _matches(request.headers.get("if-none-match"), etag):
            return Response(status_code=304, headers=headers)
        return Response(bytes(image.png), media_type="image/png", headers=headers)

    @app.get("/", include_in_schema=False)
    async def panel() -> FileResponse:
        return FileResponse(
            STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"}
        )

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def openapi_document() -> dict[str, Any]:
    """The API's OpenAPI document, as served at ``/openapi.json`` (settings do not change it)."""
    upstream = QueryUpstream(GatewaySettings.from_env({}))  # a channel is opened lazily: never here
    try:
        return create_app(upstream.settings, upstream).openapi()
    finally:
        upstream.close()
