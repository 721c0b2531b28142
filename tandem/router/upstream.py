"""The router's HTTP/1.1 client to its replicas: keep-alive pools over asyncio protocols, with
httptools (the C parser uvicorn uses) reading the responses.

Not httpx or aiohttp, because the router's own cost per request is the product: on a stub
replica at 500 requests/s, httpx's pool alone cost more than the 2 ms p99 budget and aiohttp's
request machinery was still the largest part of the router's time. This client does only what a
proxy needs: send bytes, hand back status, headers and the body as it arrives.

Errors, by what a retry may do about them:
  ConnectFailed    never reached the replica (refused, reset before any answer, connect timeout)
  UpstreamTimeout  the request's deadline passed while the replica had it
  UpstreamBroken   the connection broke after the answer began
"""
from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from urllib.parse import urlencode, urlsplit

import httptools

_HIGH_WATER, _LOW_WATER = 1 << 20, 1 << 18  # bytes buffered before reading pauses / resumes


class UpstreamError(Exception):
    pass


class ConnectFailed(UpstreamError):
    pass


class UpstreamTimeout(UpstreamError):
    pass


class UpstreamBroken(UpstreamError):
    pass


class Response:
    """Status and headers are read; the body arrives through `read()` or `chunks()`."""

    def __init__(self, conn: _Conn, status: int, headers: list[tuple[str, str]]):
        self._conn, self.status, self.headers = conn, status, headers
        self._body: list[bytes] = []
        self._buffered = 0
        self.complete = False
        self._error: Exception | None = None
        self._wake: asyncio.Future | None = None

    def header(self, name: str, default: str = "") -> str:
        return next((v for k, v in self.headers if k == name), default)

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            if self._body:
                data, self._body, self._buffered = b"".join(self._body), [], 0
                self._conn.resume()
                yield data
                continue
            if self._error is not None:
                raise self._error
            if self.complete:
                return
            self._wake = asyncio.get_running_loop().create_future()
            await self._wake

    async def read(self) -> bytes:
        return b"".join([c async for c in self.chunks()])

    def release(self) -> None:
        """Back to the pool when the body was read to its end and the connection may be
        reused; closed otherwise (a half-read body would garble the next response)."""
        self._conn.finish(reusable=self.complete and self._error is None)

    # Called by the connection.
    def _push(self, data: bytes) -> None:
        self._body.append(data)
        self._buffered += len(data)
        if self._buffered > _HIGH_WATER:
            self._conn.pause()
        self._notify()

    def _end(self, error: Exception | None = None) -> None:
        if error is None:
            self.complete = True
        elif not self.complete:
            self._error = error
        self._notify()

    def _notify(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)


class _Conn(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self, pool: Pool, key: tuple):
        self.pool, self.key = pool, key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed, self.used, self.paused = False, False, False
        self.head: asyncio.Future | None = None  # resolves to the Response
        self.response: Response | None = None
        self._headers: list[tuple[str, str]] = []
        self._keep_alive = False
        self._timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(UpstreamBroken(f"bad HTTP from the replica: {e}"))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        r = self.response
        if r is not None and not r.complete and not self._has_length():
            r._end()  # a body delimited by the connection's end (HTTP/1.0 style)
        self._fail(ConnectFailed("connection closed before an answer") if self.head else
                   UpstreamBroken("connection closed mid-answer"))

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._keep_alive = self.parser.should_keep_alive()
        self.response = Response(self, self.parser.get_status_code(), self._headers)
        head, self.head = self.head, None
        if head is not None and not head.done():
            head.set_result(self.response)

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._push(body)

    def on_message_complete(self) -> None:
        if self.response is not None:
            self.response._end()
        self._cancel_timer()

    # used by Pool and Response
    def send(self, data: bytes, deadline: float) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        self.used, self.response = True, None
        self.head = loop.create_future()
        self._timer = loop.call_at(deadline, self._timed_out)
        self.transport.write(data)
        return self.head

    def finish(self, reusable: bool) -> None:
        self._cancel_timer()
        self.response = None
        if reusable and self._keep_alive and not self.closed:
            self.resume()
            self.pool.put_back(self)
        elif not self.closed:
            self.closed = True
            self.transport.close()

    def pause(self) -> None:
        if not self.paused and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def _has_length(self) -> bool:
        return any(k in ("content-length", "transfer-encoding") for k, _ in self._headers)

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(UpstreamTimeout("the replica did not finish in time"))
        if not self.closed:
            self.closed = True
            self.transport.close()

    def _fail(self, error: Exception) -> None:
        head, self.head = self.head, None
        if head is not None and not head.done():
            head.set_exception(error)
        if self.response is not None:
            self.response._end(error)
        self._cancel_timer()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Pool:
    """Idle keep-alive connections per (scheme, host, port); new ones opened as needed."""

    def __init__(self, connect_timeout: float = 5.0):
        self.connect_timeout = connect_timeout
        self._idle: dict[tuple, list[_Conn]] = {}
        self._all: set[_Conn] = set()
        self._ssl: ssl.SSLContext | None = None
        self._urls: dict[str, tuple[tuple, str, str]] = {}

    async def request(self, method: str, url: str, body: bytes = b"",
                      headers: dict[str, str] | None = None, timeout: float = 600.0,
                      params: dict[str, str] | None = None) -> Response:
        """Send and wait for the status and headers; the body is the caller's to read, then
        `release()` the response."""
        key, netloc, path = self._split(url)
        if params:
            path += f"?{urlencode(params)}"
        head = [f"{method} {path} HTTP/1.1", f"host: {netloc}",
                f"content-length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            conn = await self._get(key, min(timeout, self.connect_timeout))
            reused = conn.used
            try:
                return await conn.send(data, deadline)
            except ConnectFailed:
                if not reused:
                    raise
                # The replica closed an idle keep-alive connection as we sent on it: the
                # request never started, so a fresh connection may carry it.
            except BaseException:  # cancelled (the client left) or timed out: not reusable
                conn.finish(reusable=False)
                raise

    def _split(self, url: str) -> tuple[tuple, str, str]:
        """(scheme, host, port), netloc and path; a replica's few URLs are parsed once."""
        got = self._urls.get(url)
        if got is None:
            u = urlsplit(url)
            key = (u.scheme, u.hostname, u.port or (443 if u.scheme == "https" else 80))
            got = self._urls[url] = (key, u.netloc, u.path or "/")
            if len(self._urls) > 4096:  # bounded: URLs come from membership, not clients
                self._urls.pop(next(iter(self._urls)))
        return got

    async def _get(self, key: tuple, timeout: float) -> _Conn:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        loop = asyncio.get_running_loop()
        tls = None
        if key[0] == "https":
            tls = self._ssl = self._ssl or ssl.create_default_context()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Conn(self, key), key[1], key[2], ssl=tls),
                timeout)
        except TimeoutError as e:
            raise ConnectFailed(f"connect timed out after {timeout:g}s") from e
        except OSError as e:
            raise ConnectFailed(f"{type(e).__name__}: {e}") from e
        self._all.add(conn)
        return conn

    def put_back(self, conn: _Conn) -> None:
        self._idle.setdefault(conn.key, []).append(conn)

    def forget(self, conn: _Conn) -> None:
        self._all.discard(conn)

    async def get_text(self, url: str, timeout: float,
                       params: dict[str, str] | None = None) -> tuple[int, str] | None:
        """(status, body) of a GET, or None when the replica could not be reached in time."""
        try:
            resp = await self.request("GET", url, timeout=timeout, params=params)
            try:
                return resp.status, (await resp.read()).decode("utf-8", "replace")
            finally:
                resp.release()
        except UpstreamError:
            return None

    async def close(self) -> None:
        for conn in list(self._all):
            if not conn.closed:
                conn.closed = True
                conn.transport.close()
        self._all.clear()
        self._idle.clear()
