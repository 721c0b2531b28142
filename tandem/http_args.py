"""What every HTTP process of Tandem (`serve` and `route`) shares: its listen flags, and the
check of the bearer keys --api-key gives."""
from __future__ import annotations

import argparse
import hmac


def add_listen_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--host", default="127.0.0.1", help="address to listen on")
    group.add_argument("--port", type=int, default=8000, help="port to listen on")
    group.add_argument("--api-key", action="append", default=[],
                       help="accept this bearer key (repeat for several; default: none, "
                            "no key needed)")
    group.add_argument("--dashboard-public", action="store_true",
                       help="serve the status page's data (/dashboard/data) without an API key")


def api_key_ok(authorization: str, keys: list[str]) -> bool:
    """Whether an Authorization header carries one of `keys` (any header when there are none).
    Compared with every key, always, so timing says nothing about which one nearly matched."""
    if not keys:
        return True
    given = authorization[7:].encode() if authorization.lower().startswith("bearer ") else b""
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key.encode())
    return ok
