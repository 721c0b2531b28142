"""Peak memory of each tensor-parallel rank while it loads its shard of the weights.

Each rank is a process in a real gloo group that builds the model and loads it through the
engine's loader (safetensors `get_slice`: only its rows or columns are read). A thread samples
the process's anonymous resident memory (RssAnon: what the rank allocated, not the page cache
of the mmapped files) every millisecond. The peak increase over the level before loading is
compared with the bytes of the full weights; the target is 1/N + 20% of them.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/tp_load_memory.py --model PATH --sizes 1 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

from tandem.distributed.group import free_port


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def child(model: str, rank: int, world: int, port: int, dtype: str) -> dict:
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig

    from tandem.config import DTYPES
    from tandem.loader.model_path import resolve_model
    from tandem.loader.weights import load_model
    from tandem.models.registry import model_class

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
    folder = resolve_model(model)
    hf_config = AutoConfig.from_pretrained(folder)
    base = peak = rss_anon()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_anon())
            time.sleep(0.001)

    t = threading.Thread(target=sample)
    t.start()
    net = load_model(model_class(hf_config), hf_config, folder, torch.device("cpu"),
                     DTYPES[dtype])
    done.set()
    t.join()
    peak = max(peak, rss_anon())
    params = sum(p.numel() * p.element_size() for p in net.parameters())
    if world > 1:
        dist.destroy_process_group()
    return {"rank": rank, "world": world, "peak_bytes": peak - base, "param_bytes": params}


def full_bytes(model: str, dtype: str) -> int:
    """Bytes of every weight at `dtype`, from the checkpoint's headers (nothing loaded)."""
    import glob

    import torch
    from safetensors import safe_open

    from tandem.config import DTYPES
    from tandem.loader.model_path import resolve_model

    size = DTYPES[dtype].itemsize if DTYPES[dtype] else torch.float32.itemsize
    total = 0
    for path in glob.glob(os.path.join(resolve_model(model), "*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is no dict)
                n = 1
                for d in f.get_slice(name).get_shape():
                    n *= d
                total += n * size
    return total


def measure(model: str, world: int, dtype: str = "float32") -> list[dict]:
    """Load with `world` ranks at once; one result per rank."""
    port = free_port("127.0.0.1")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child",
                               "--model", model, "--rank", str(r), "--world", str(world),
                               "--port", str(port), "--dtype", dtype],
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
             for r in range(world)]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        if p.returncode:
            raise RuntimeError(f"rank exited with {p.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.rank, args.world, args.port, args.dtype)))
        return 0
    full = full_bytes(args.model, args.dtype)
    print(f"full weights: {full / 2**20:.1f} MiB ({args.dtype})")
    print("| N | rank | peak while loading, MiB | of full | bound 1/N + 20% |")
    print("|---|---|---|---|---|")
    for n in args.sizes:
        for r in measure(args.model, n, args.dtype):
            print(f"| {n} | {r['rank']} | {r['peak_bytes'] / 2**20:.1f} | "
                  f"{r['peak_bytes'] / full:.1%} | {1 / n + 0.2:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
