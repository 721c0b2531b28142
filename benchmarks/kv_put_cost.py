"""What writing one KV block to Redis costs: encoding (header, CRC-32), the client's CPU per
block as one SET each or in one pipeline, and redis-server's CPU, on a fresh loopback
redis-server (the distribution's package).

    PYTHONPATH=. .venv/bin/python benchmarks/kv_put_cost.py
"""
from __future__ import annotations

import argparse
import time

import redis as redis_client
import torch

from tandem.kv_store.format import BlockLayout, encode

# The script's own folder is on sys.path when it runs as a file.
from kv_store import cpu_seconds, redis  # isort: skip
from offline_throughput import machine  # isort: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=400)
    p.add_argument("--batch", type=int, default=16, help="blocks per pipelined call")
    args = p.parse_args()
    # A bfloat16 SmolLM2 block: 2 x 30 layers x 3 KV heads x 16 tokens x 64.
    layout = BlockLayout("m", 30, 3, 64, 16, "bfloat16", None)
    kv = torch.randn(layout.kv_shape).to(torch.bfloat16)
    start = time.process_time()
    for _ in range(args.blocks):
        value = encode(layout, b"h" * 32, kv, None)
    encode_ms = (time.process_time() - start) / args.blocks * 1e3
    info = machine()
    print(f"Machine: {info['cpu']}; flags: {info['flags']}; {info['cores']} cores. "
          f"{len(value) / 1e6:.2f} MB values, {args.blocks} blocks.\n")
    print("| write | client CPU (ms/block) | redis-server CPU (ms/block) | wall (ms/block) |")
    print("|---|---:|---:|---:|")
    print(f"| encode only | {encode_ms:.3f} | - | - |")
    with redis(True) as (url, pid):
        client = redis_client.Redis.from_url(url)
        for mode in ("SET", "pipeline"):
            c0, s0, t0 = cpu_seconds(pid), time.process_time(), time.perf_counter()
            if mode == "SET":
                for i in range(args.blocks):
                    client.set(f"s{i}", value)
            else:
                for j in range(0, args.blocks, args.batch):
                    pipe = client.pipeline(transaction=False)
                    for i in range(j, min(j + args.batch, args.blocks)):
                        pipe.set(f"p{i}", value)
                    pipe.execute()
            n = args.blocks
            print(f"| {mode} | {(time.process_time() - s0) / n * 1e3:.3f} | "
                  f"{(cpu_seconds(pid) - c0) / n * 1e3:.3f} | "
                  f"{(time.perf_counter() - t0) / n * 1e3:.3f} |")
        client.close()


if __name__ == "__main__":
    main()
