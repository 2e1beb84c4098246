"""API keys: creating, storing, checking, and what each scope allows.

A key reads ``kessai_<key_id>_<secret>``: ``key_id`` (16 hex characters) is public and is the
primary key in the key store; ``secret`` is 32 random bytes (URL-safe base64). Only the SHA-256
of the secret is stored, and it is compared with ``hmac.compare_digest`` (constant time). The
whole key is shown once, when it is created.

Scopes:

- ``payments:write``: create payments and refunds (a payments backend). Idempotency keys are
  scoped to the API key: two backends can use the same Idempotency-Key without colliding.
- ``wallets:write``: top up users' wallets (a top-up backend).
- ``users:write``: register users (a sign-up backend).
- ``merchant:<merchant_id>:read``: one merchant's dashboard data; a key may hold several.
- ``users:read``: users' payment histories (the app backend).
- ``admin``: reconciliation runs, dead letters, admission settings.

Both APIs check every request except health, readiness, metrics and the API docs. Lookups are
cached for ``KESSAI_AUTH_CACHE_SECONDS`` (the answer "no such key" too), so a hot path costs
no query, and a revoked key stops working within that time.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import anyio
import anyio.to_thread
import orjson
import sqlalchemy as sa
from cachetools import TTLCache
from sqlalchemy.engine import Engine
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from kessai.clock import utcnow
from kessai.errors import ApiError, error_response
from kessai.schema.keys import api_keys

PAYMENTS_WRITE = "payments:write"
WALLETS_WRITE = "wallets:write"
USERS_WRITE = "users:write"
USERS_READ = "users:read"
ADMIN = "admin"
_MERCHANT_SCOPE = re.compile(r"merchant:([A-Za-z0-9_-]{1,64}):read")
_KEY = re.compile(r"kessai_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/docs", "/redoc", "/openapi.json"})
"""Paths that need no key: probes, metrics scraped on the internal network, the API's docs."""


def merchant_scope(merchant_id: str) -> str:
    return f"merchant:{merchant_id}:read"


def check_scope(scope: str) -> str:
    """``scope`` if it is one kessai knows, else ValueError naming the valid forms."""
    known = (PAYMENTS_WRITE, WALLETS_WRITE, USERS_WRITE, USERS_READ, ADMIN)
    if scope in known or _MERCHANT_SCOPE.fullmatch(scope):
        return scope
    raise ValueError(
        f"unknown scope {scope!r}: use payments:write, wallets:write, users:write, "
        "merchant:<merchant_id>:read (merchant id: 1-64 of A-Z a-z 0-9 _ -), users:read or admin"
    )


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: one API key and what it may do."""

    key_id: str
    name: str
    scopes: frozenset[str]

    def has(self, scope: str) -> bool:
        return scope in self.scopes

    def reads_merchant(self, merchant_id: str) -> bool:
        return merchant_scope(merchant_id) in self.scopes


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: str
    name: str
    scopes: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None
    secret_sha256: str


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _record(row: Any) -> KeyRecord:
    return KeyRecord(
        key_id=row.key_id,
        name=row.name,
        scopes=tuple(orjson.loads(row.scopes)),
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        secret_sha256=row.secret_sha256,
    )


# -- the key store (sync; the CLI writes, the services read) -----------------------------------


def create_key(engine: Engine, scopes: Sequence[str], name: str = "") -> tuple[KeyRecord, str]:
    """Store a new key with ``scopes``; return its record and the whole key (shown once)."""
    checked = sorted({check_scope(s) for s in scopes})
    if not checked:
        raise ValueError("a key needs at least one scope")
    if len(name) > 100:
        raise ValueError("a key's name is at most 100 characters")
    key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    key = f"kessai_{key_id}_{secret}"
    record = KeyRecord(
        key_id=key_id,
        name=name,
        scopes=tuple(checked),
        created_at=utcnow(),
        revoked_at=None,
        secret_sha256=_digest(secret),
    )
    with engine.begin() as conn:
        conn.execute(
            api_keys.insert().values(
                key_id=record.key_id,
                name=record.name,
                secret_sha256=record.secret_sha256,
                scopes=orjson.dumps(list(record.scopes)).decode(),
                created_at=record.created_at,
                revoked_at=None,
            )
        )
    return record, key


def list_keys(engine: Engine) -> list[KeyRecord]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(api_keys).order_by(api_keys.c.created_at, api_keys.c.key_id))
        return [_record(row) for row in rows]


def revoke_key(engine: Engine, key_id: str) -> bool:
    """Revoke ``key_id`` (a key id, or a whole key); False if there is no such active key."""
    found = _KEY.fullmatch(key_id)
    if found:
        key_id = found.group(1)
    with engine.begin() as conn:
        result = conn.execute(
            api_keys.update()
            .where(api_keys.c.key_id == key_id, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )
        return result.rowcount == 1


def lookup(engine: Engine, key_id: str) -> KeyRecord | None:
    with engine.connect() as conn:
        row = conn.execute(sa.select(api_keys).where(api_keys.c.key_id == key_id)).first()
        return _record(row) if row is not None else None


def verify(record: KeyRecord | None, secret: str) -> bool:
    """The secret matches an active key. Constant time in the secret."""
    expected = record.secret_sha256 if record is not None else "0" * 64
    matches = hmac.compare_digest(expected, _digest(secret))
    return record is not None and record.revoked_at is None and matches


# -- checking requests ----------------------------------------------------------------------------


class _Cache(enum.Enum):
    MISS = enum.auto()
    """Not in the key cache (None in it is a cached answer: no such key)."""


class Authenticator:
    """Turns an ``Authorization`` header into a Principal, or a 401.

    ``timer`` is the key cache's clock (tests step it to put an expiry where they want)."""

    def __init__(
        self,
        engine: Engine,
        *,
        cache_seconds: float,
        limiter: anyio.CapacityLimiter | None = None,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        # As many lookups at once as the key store's pool keeps connections (2, in both APIs).
        self.limiter = limiter or anyio.CapacityLimiter(2)
        self._cache: TTLCache[str, KeyRecord | None] | None = (
            TTLCache(maxsize=100_000, ttl=cache_seconds, timer=timer) if cache_seconds > 0 else None
        )
        self._pending: dict[str, asyncio.Future[KeyRecord | None]] = {}

    async def _record(self, key_id: str) -> KeyRecord | None:
        if self._cache is not None:
            # One lookup, not "in" then "[]": the entry can expire between the two (a KeyError,
            # a 500 for a valid key). TTLCache.get reads its clock once for both steps.
            cached = self._cache.get(key_id, _Cache.MISS)
            if cached is not _Cache.MISS:
                return cached
        # One lookup per key at a time: when a busy key's cache entry expires, the requests
        # that arrive meanwhile wait for that lookup instead of each asking the key store.
        pending = self._pending.get(key_id)
        if pending is not None:
            return await asyncio.shield(pending)
        task = asyncio.ensure_future(self._fetch(key_id))
        self._pending[key_id] = task
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                self._pending.pop(key_id, None)
            else:  # this request was cancelled; the lookup finishes for the others
                task.add_done_callback(lambda _: self._pending.pop(key_id, None))

    async def _fetch(self, key_id: str) -> KeyRecord | None:
        try:
            record = await anyio.to_thread.run_sync(
                lookup, self.engine, key_id, limiter=self.limiter
            )
        except sa.exc.SQLAlchemyError as exc:
            raise ApiError(
                503,
                "key_store_unavailable",
                "API keys cannot be checked right now; retry later.",
                headers={"Retry-After": "1"},
            ) from exc
        if self._cache is not None:
            self._cache[key_id] = record
        return record

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise unauthorized("An API key is required: send `Authorization: Bearer <key>`.")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized("Send the API key as `Authorization: Bearer <key>`.")
        found = _KEY.fullmatch(token.strip())
        if found is None:
            raise unauthorized("Unknown or revoked API key.")
        key_id, secret = found.groups()
        record = await self._record(key_id)
        if record is None or not verify(record, secret):
            raise unauthorized("Unknown or revoked API key.")
        return Principal(key_id=record.key_id, name=record.name, scopes=frozenset(record.scopes))


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


def forbidden(scope: str) -> ApiError:
    return ApiError(403, "forbidden", f"This API key lacks the {scope!r} scope.", {"scope": scope})


class RequireApiKey:
    """ASGI middleware: every request but ``OPEN_PATHS`` carries a valid key, checked before
    the body is read or validated. The Principal is left in ``scope["state"]["principal"]``
    for the routes, which check the scope they need."""

    def __init__(self, app: ASGIApp, *, authenticator: Callable[[], Authenticator | None]) -> None:
        self.app = app
        self.authenticator = authenticator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        authenticator = self.authenticator()
        try:
            if authenticator is None:  # the app is not started: nothing can be checked
                raise ApiError(503, "not_ready", "The service is starting; retry later.")
            header = _header(scope["headers"], b"authorization")
            principal = await authenticator.authenticate(header)
        except ApiError as exc:
            response = error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            try:
                return value.decode("latin-1")
            except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes any byte
                return None
    return None


def principal_of(state: Any) -> Principal:
    principal = getattr(state, "principal", None)
    if not isinstance(principal, Principal):  # only if a route escaped the middleware
        raise unauthorized("An API key is required: send `Authorization: Bearer <key>`.")
    return principal


def needs(scope: str) -> Callable[[Request], Awaitable[Principal]]:
    """A route dependency: the caller's key holds ``scope``, else 403 ``forbidden``. (Runs
    before the body's validation errors are reported.) A coroutine although it never awaits:
    FastAPI runs a plain function dependency in a worker thread, a thread hop per request."""

    async def dependency(request: Request) -> Principal:
        principal = principal_of(request.state)
        if not principal.has(scope):
            raise forbidden(scope)
        return principal

    return dependency
