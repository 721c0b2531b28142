"""An OpenAI-compatible replica that answers at once, for measuring a router's own cost.

A bare asyncio protocol (HTTP/1.1, keep-alive), not a web framework: the stub must cost far
less per request than the routers it sits behind. Every POST gets one fixed completion, every
GET (health probes, /v1/models, SGLang's /server_info and /model_info) a small JSON object.

    python benchmarks/stub_replica.py --port 9001
"""
from __future__ import annotations

import argparse
import asyncio
import json

COMPLETION = json.dumps({
    "id": "cmpl-stub", "object": "text_completion", "created": 0, "model": "stub",
    "choices": [{"index": 0, "text": " ok", "logprobs": None, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9}}).encode()
INFO = json.dumps({"status": "ok", "object": "list",
                   "data": [{"id": "stub", "object": "model"}]}).encode()


def response(body: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body))


POST_REPLY, GET_REPLY = response(COMPLETION), response(INFO)


class StubProtocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport, self.buf = transport, b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:  # pipelined or split requests: answer each complete one in order
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            length = 0
            at = head.find(b"content-length:")
            if at >= 0:
                length = int(head[at + 15:head.find(b"\r\n", at) if head.find(b"\r\n", at) > 0
                                   else None])
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            self.transport.write(POST_REPLY if head.startswith(b"post") else GET_REPLY)


async def serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(StubProtocol, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    try:
        import uvloop  # the same event loop the routers get, when installed
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
