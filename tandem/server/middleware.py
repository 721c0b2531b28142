"""ASGI middleware: X-Request-Id, the request-body size limit (checked before parsing), access log."""
from __future__ import annotations

import json
import logging
import time
import uuid

logger = logging.getLogger("tandem.access")


class RequestMiddleware:
    def __init__(self, app, max_request_bytes: int):
        self.app = app
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        start, status = time.monotonic(), [0]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"],
                                      (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            body = await self._read_body(headers, receive)
            if body is None:
                await self._too_large(send_with_id)
                return
            replayed = False

            async def replay():
                nonlocal replayed
                if replayed:
                    return await receive()  # later reads wait for the disconnect
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            await self.app(scope, replay, send_with_id)
        finally:
            logger.info("request id=%s method=%s path=%s status=%s tokens=%s latency_ms=%.1f",
                        request_id, scope["method"], scope["path"], status[0],
                        scope["state"].get("tokens", 0), (time.monotonic() - start) * 1000)

    async def _read_body(self, headers: dict, receive) -> bytes | None:
        """The whole body, or None when it is over the limit (by header, or as it arrives)."""
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > self.max_request_bytes:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_request_bytes:
                return None
            if not message.get("more_body"):
                break
        return b"".join(chunks)

    async def _too_large(self, send) -> None:
        body = json.dumps({"error": {
            "message": f"request body is over the limit of {self.max_request_bytes} bytes",
            "type": "invalid_request_error", "param": None, "code": "request_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
