"""HTTP plumbing shared by the APIs: JSON responses, request size limits, security headers."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse as StarletteJSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kessai.errors import error_body


class JSONResponse(StarletteJSONResponse):
    """orjson-encoded JSON (several times faster than the standard library on our bodies). A
    subclass of Starlette's, so that FastAPI documents the routes' response models."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class BodySizeLimit:
    """Refuse request bodies over ``max_bytes`` with 413 before any of it is parsed.

    Checks ``Content-Length`` up front and counts streamed bytes for chunked bodies. A plain
    ASGI middleware rather than Starlette's ``BaseHTTPMiddleware``, which would copy the body.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > self.max_bytes:
                    await self._too_large(send)
                    return
        seen = 0
        exceeded = False
        response_started = False

        async def limited_receive() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if exceeded:
                # The app may catch the cut-short read and answer it itself (FastAPI turns any
                # body-read failure into 400 "error parsing the body"): answer 413 instead.
                if message["type"] == "http.response.start" and not response_started:
                    response_started = True
                    await self._too_large(send)
                return
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not response_started:
                await self._too_large(send)

    async def _too_large(self, send: Send) -> None:
        body = error_body(
            "payload_too_large",
            f"The request body is larger than {self.max_bytes} bytes.",
            {"max_bytes": self.max_bytes},
        )
        await send_and_close(send, 413, body)


async def send_and_close(send: Send, status: int, body: bytes) -> None:
    """Answer with a JSON error ``body`` and close the connection (the rest of the request is
    not read)."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass


SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (b"strict-transport-security", b"max-age=63072000; includeSubDomains"),
]
API_CSP = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")
DOCS_PATHS = frozenset({"/docs", "/redoc", "/docs/oauth2-redirect"})
"""The interactive docs load their scripts and styles from a CDN: no API CSP there."""


class SecurityHeaders:
    """Adds the security headers to every response, and refuses requests whose headers add up
    to more than ``max_header_bytes`` with 431 (the server's own limit may be far higher).
    Responses are API data or errors: never sniffed, framed, cached or sent as a referrer."""

    def __init__(self, app: ASGIApp, *, max_header_bytes: int) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = SECURITY_HEADERS if scope["path"] in DOCS_PATHS else [*SECURITY_HEADERS, API_CSP]

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [
                    *message.get("headers", []),
                    *((n, v) for n, v in extra if n not in present),
                ]
            await send(message)

        size = sum(len(name) + len(value) for name, value in scope["headers"])
        if size > self.max_header_bytes:
            body = error_body(
                "headers_too_large",
                f"The request headers are larger than {self.max_header_bytes} bytes.",
                {"max_header_bytes": self.max_header_bytes},
            )
            await send_and_close(with_headers, 431, body)
            return
        await self.app(scope, receive, with_headers)
