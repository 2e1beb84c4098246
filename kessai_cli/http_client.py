"""The load generator's HTTP/1.1 client on asyncio streams: keep-alive connections, one
request at a time each, driven closed loop or on a schedule (open loop).

Written here rather than taken from a library: httpx.AsyncClient is the bottleneck at this
concurrency (see ``kessai_cli.loadgen``'s note: 160-210 requests/s using a whole core, against
3,200-5,500 requests/s and 0.3-0.4 s of CPU for this client), and the requests are all alike
(small JSON, ``Content-Length`` answers), so a few lines of stream handling are enough.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit


class HttpError(Exception):
    """The connection broke or the answer was not HTTP/1.1 as expected."""


@dataclass(slots=True)
class Answer:
    status: int
    replayed: bool
    body: bytes
    retry_after: str | None = None
    """The ``Retry-After`` header, when the answer has one."""


class Connection:
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self, host: str, port: int, tls: bool, timeout: float) -> None:
        self.host, self.port, self.tls, self.timeout = host, port, tls, timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        context = ssl.create_default_context() if self.tls else None
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, ssl=context)
        return self.reader, self.writer

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, head: bytes, body: bytes) -> Answer:
        try:
            async with asyncio.timeout(self.timeout):
                return await self._exchange(head, body)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            self.close()
            raise HttpError(repr(exc)) from exc

    async def _exchange(self, head: bytes, body: bytes) -> Answer:
        if self.reader is None or self.writer is None:
            reader, writer = await self._open()
        else:
            reader, writer = self.reader, self.writer
        writer.write(head + body)
        await writer.drain()
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = 0
        chunked = close = replayed = False
        retry_after = None
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            value = value.strip()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                chunked = "chunked" in value.lower()
            elif name == "connection":
                close = value.lower() == "close"
            elif name == "idempotent-replayed":
                replayed = value.lower() == "true"
            elif name == "retry-after":
                retry_after = value
        if chunked:
            parts = []
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                parts.append(await reader.readexactly(size + 2))
            await reader.readuntil(b"\r\n")  # no trailers are expected
            content = b"".join(p[:-2] for p in parts)
        else:
            content = await reader.readexactly(length)
        if close:
            self.close()
        return Answer(status, replayed, content, retry_after)


class Schedule:
    """When each request of a run is sent, shared by all its connections (one event loop):
    closed loop (``rate`` None: a connection sends when its previous request is answered) or
    open loop (request ``n`` is due at ``start + n / rate``, whichever connection is free
    takes it, and its latency counts from when it was due, so a slow server is not hidden by
    the client waiting for it). No request is issued after ``requests`` or, in open loop,
    due at or after ``duration`` seconds; in closed loop none is sent after ``duration``."""

    def __init__(
        self, rate: float | None, duration: float | None, requests: int | None = None
    ) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("the rate must be positive")
        self.rate, self.requests = rate, requests
        self.start = time.perf_counter()
        self.deadline = self.start + duration if duration is not None else float("inf")
        self.issued = 0

    async def next(self) -> float | None:
        """Wait until the next request is due; when it was due (``time.perf_counter()``,
        where its latency starts), or None: the run is over."""
        if self.requests is not None and self.issued >= self.requests:
            return None
        now = time.perf_counter()
        if self.rate is None:
            if now >= self.deadline:
                return None
            self.issued += 1
            return now
        due = self.start + self.issued / self.rate
        if due >= self.deadline:
            return None
        self.issued += 1
        if due > now:
            await asyncio.sleep(due - now)
        return due


def common_headers(url: str, api_key: str) -> str:
    """The headers every POST of the load generator carries, ``api_key`` as its bearer token
    (``url``'s host as ``Host``; the request line, Idempotency-Key and Content-Length are the
    caller's)."""
    return (
        f"Host: {urlsplit(url).netloc}\r\nAuthorization: Bearer {api_key}\r\n"
        "Content-Type: application/json\r\nUser-Agent: kessai-loadgen\r\n"
    )


@dataclass(slots=True)
class Request:
    """One request to send, and what to do with its answer (and the seconds since it was due)."""

    head: bytes
    body: bytes
    answered: Callable[[Answer, float], None]


async def drive(
    url: str,
    schedule: Schedule,
    sources: list[Callable[[], Request]],
    failed: Callable[[], None],
    request_timeout: float = 30.0,
) -> None:
    """One keep-alive connection to ``url`` per source, each asking its source for the next
    request whenever ``schedule`` says one is due and the connection is free. ``failed`` is
    called for every request that got no answer (the connection is opened again after
    50 ms)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url}")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)

    async def connection(source: Callable[[], Request]) -> None:
        conn = Connection(parts.hostname or "", port, tls, request_timeout)
        try:
            while (began := await schedule.next()) is not None:
                request = source()
                try:
                    answer = await conn.request(request.head, request.body)
                except HttpError:
                    failed()
                    await asyncio.sleep(0.05)  # a server that is down is not hammered
                    continue
                request.answered(answer, time.perf_counter() - began)
        finally:
            conn.close()

    await asyncio.gather(*(connection(source) for source in sources))
