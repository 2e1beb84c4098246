"""The error format every kessai API speaks.

``{"error": {"code": "...", "message": "...", "details": {...}}}``: ``code`` is stable and
meant for programs, ``message`` for people, ``details`` for whatever a client needs to act.
No handler lets a stack trace or SQL reach a response body.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable, for programs: e.g. `refund_exceeds_captured`.")
    message: str = Field(description="For people.")
    details: dict[str, object] = Field(description="What a client needs to act on the error.")


class ErrorOut(BaseModel):
    """The body of every error response, for the OpenAPI documentation."""

    error: ErrorDetail


class ApiError(Exception):
    """A failure the client can act on, answered with ``status`` and a stable ``code``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}
        self.headers = headers or {}


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message, "details": details or {}}})


def error_response(
    status: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    return Response(
        error_body(code, message, details),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    431: "headers_too_large",
}


def _field_path(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in {"body", "query", "path", "header"}:
        where, rest = parts[0], parts[1:]
        return ".".join(rest) if where == "body" and rest else ".".join([where, *rest])
    return ".".join(parts)


_HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> str:
    """Every method some route of the app serves on the request's path. Asked of the routes
    themselves (``matches``), since an included router is a single node of the app's routes."""
    routes = request.app.router.routes
    allowed = [
        method
        for method in _HTTP_METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes
        )
    ]
    return ", ".join(allowed)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> Response:
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "malformed_json", "The request body is not valid JSON.")
        fields = [
            {
                "field": _field_path(tuple(e.get("loc", ()))),
                "message": str(e.get("msg", "")),
                "type": str(e.get("type", "")),
            }
            for e in errors
        ]
        return error_response(
            422,
            "validation_error",
            "The request is not valid: "
            + "; ".join(f"{f['field']}: {f['message']}" for f in fields),
            {"errors": fields},
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            # FastAPI's answer to a body it could not even decode (invalid UTF-8, nesting
            # deeper than the parser recurses): the same code as any other malformed JSON.
            return error_response(400, "malformed_json", "The request body is not valid JSON.")
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        headers = exc.headers
        if exc.status_code == 405:
            # Starlette names the methods of the first route on the path only; a path served
            # by several routes (GET and PUT of one resource) allows all of theirs.
            headers = {**(headers or {}), "Allow": _allowed_methods(request)}
        return error_response(exc.status_code, code, str(exc.detail), headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "An internal error occurred.")
