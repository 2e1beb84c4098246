"""What both APIs' OpenAPI documents say beyond each route's own answers.

The edge (``kessai/edge.py``) may answer any request before its route runs: 431 for oversized
headers and 413 for an oversized body on every path; 401 without a valid key and 429 over a
rate limit on every path that needs a key; and any route may answer 503 when something it
depends on does not (the database, the key store, the service's own load). A route declares
only its own answers; ``complete_document`` adds these shared ones to every operation of both
documents, so a new edge answer is documented here once, not route by route.

The documents also declare the API key as a Bearer security scheme, and every error answer as
the one error body of ``kessai.errors``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from kessai.auth import OPEN_PATHS
from kessai.errors import ErrorOut

SECURITY_SCHEME = "ApiKey"
ERROR_SCHEMA = {"$ref": "#/components/schemas/ErrorOut"}
_HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")


def _header(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "schema": schema or {"type": "string"}}


RETRY_AFTER = _header("Seconds to wait before retrying.", {"type": "integer", "minimum": 0})


def error_answer(description: str, **headers: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI response object with the shared error body."""
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": ERROR_SCHEMA}},
    }
    if headers:
        answer["headers"] = {name.replace("_", "-"): value for name, value in headers.items()}
    return answer


EVERY_ROUTE: dict[str, dict[str, Any]] = {
    "413": error_answer("`payload_too_large`: the body is over `KESSAI_MAX_BODY_BYTES`."),
    "431": error_answer("`headers_too_large`: the headers are over `KESSAI_MAX_HEADER_BYTES`."),
    "503": error_answer(
        "Unavailable for now, nothing was done: the service or something it depends on cannot "
        "answer (`error.code` says what). Retry, after `Retry-After` when it is sent.",
        Retry_After=RETRY_AFTER,
    ),
}
"""What any request to either API may be answered, whatever its route."""

KEYED_ROUTE: dict[str, dict[str, Any]] = {
    "401": error_answer(
        "`unauthorized`: no API key, or an unknown or revoked one.",
        WWW_Authenticate=_header("`Bearer`."),
    ),
    "429": error_answer(
        "`rate_limited` (`details.limit`): over a rate limit; retry after `Retry-After`.",
        Retry_After=RETRY_AFTER,
        RateLimit_Limit=_header("The limit that was reached.", {"type": "integer"}),
        RateLimit_Remaining=_header("Requests left in the window.", {"type": "integer"}),
        RateLimit_Reset=_header("Seconds until the window resets.", {"type": "integer"}),
    ),
}
"""What any request to a route that needs an API key may be answered."""

WITH_BODY: dict[str, dict[str, Any]] = {
    "400": error_answer("`malformed_json`: the body is not JSON (or a header is malformed)."),
    "422": error_answer("`validation_error`: `details.errors[]` names each invalid field."),
}
"""What any request with a body may be answered."""


def complete_document(document: dict[str, Any]) -> dict[str, Any]:
    """Add the shared answers, the security scheme and the error body to ``document`` (in
    place) and return it. A route's own description of a status is kept; a validation 422 that
    FastAPI documented with its own body gets the kessai error body."""
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    error_schema = ErrorOut.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(error_schema.pop("$defs", {}))
    schemas["ErrorOut"] = error_schema
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    components.setdefault("securitySchemes", {})[SECURITY_SCHEME] = {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key: `Authorization: Bearer kessai_...` (see `kessai keys`).",
    }
    for path, item in document.get("paths", {}).items():
        for method in _HTTP_METHODS:
            operation = item.get(method)
            if operation is not None:
                _complete_operation(operation, keyed=path not in OPEN_PATHS)
    return document


def _complete_operation(operation: dict[str, Any], *, keyed: bool) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    shared = dict(EVERY_ROUTE)
    if keyed:
        shared.update(KEYED_ROUTE)
        operation["security"] = [{SECURITY_SCHEME: []}]
    if "requestBody" in operation:
        shared.update(WITH_BODY)
    elif operation.get("parameters"):
        shared["422"] = WITH_BODY["422"]
    for status, answer in shared.items():
        own = responses.get(status)
        if own is None:
            responses[status] = copy.deepcopy(answer)  # documents never share their parts
            continue
        # A route's own description stays; the body is always the error body, and the
        # shared headers are there too.
        own["content"] = answer["content"]
        if "headers" in answer:
            own["headers"] = {**copy.deepcopy(answer["headers"]), **own.get("headers", {})}
    for status, answer in responses.items():
        if status.startswith(("4", "5")) and "content" in answer:
            answer["content"] = {"application/json": {"schema": ERROR_SCHEMA}}


def install_openapi(app: FastAPI) -> None:
    """Serve ``app``'s document completed by ``complete_document`` (built once, on first use)."""
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = complete_document(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
