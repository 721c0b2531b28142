"""The flags every HTTP process of Tandem shares (`serve` and `route`)."""
from __future__ import annotations

import argparse


def add_listen_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--host", default="127.0.0.1", help="address to listen on")
    group.add_argument("--port", type=int, default=8000, help="port to listen on")
    group.add_argument("--api-key", action="append", default=[],
                       help="accept this bearer key (repeat for several; default: none, "
                            "no key needed)")
    group.add_argument("--dashboard-public", action="store_true",
                       help="serve the status page's data (/dashboard/data) without an API key")
