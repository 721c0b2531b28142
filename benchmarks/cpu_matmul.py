"""The matmul routes for dense, 8-bit and 4-bit weights on this CPU, over SmolLM2-135M's projections.

One step is every projection of the 30 layers (q 576x576, k and v 192x576, o 576x576, gate and
up 1536x576, down 576x1536) plus the LM head (49152x576), each multiplied by R rows. Each layer
has its own randomly filled weights (30 distinct copies, 425 MB in float32, 66 MB as int4 with
its scales; the L3 is 32 MB here), so a step streams them from memory as the real model does.
Routes (the weight's dtype, then the activations'):

  f32        F.linear, float32                   f32-wxt    torch.mm(W, x.T).T, float32
  f16        F.linear, float16                   bf16       F.linear, bfloat16
  int4-bf16  _weight_int4pack_mm_for_cpu, group size 32, bfloat16 activations
  int4-f32   the same with float32 activations: a scalar loop, run at rows 1 and 4 only
  int8-bf16  _weight_int8pack_mm, per-channel scales, bfloat16 activations
  int8-f32   the same with float32 activations: ~65 ms a step per row here, run up to 16 rows
  int4-avx2  Tandem's AVX2 kernel (tandem/quantization/avx2_kernels.py), float32 activations
  w8a8       int8 weights and int8 activations, one scale a row each (torch._int_mm, oneDNN's s8
             GEMM; the activations quantized in the call, eagerly). Not served: its accuracy
             misses issue 14's bound (benchmarks/int8_activations.py)
  w8a8-c     the same, its quantization and rescale fused by torch.compile

Set ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 (and
TORCHINDUCTOR_CACHE_DIR to a cache of its own) for every kernel's AVX2 path.

ms a step: the median of --repeats passes (after one warm-up pass), routes taken in turn within
each repeat so that a noisy neighbour hits them alike. Set ATEN_CPU_CAPABILITY=avx2 to see ATen's
own kernels (int4pack, int8pack) on their AVX2 path only.

    .venv/bin/python benchmarks/cpu_matmul.py [--rows 1 4 16] [--routes f32 bf16 int4-bf16]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tandem.quantization import avx2_kernels

LAYER_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576),  # q, k, v, o
                (1536, 576), (1536, 576), (576, 1536)]           # gate, up, down
HEAD = (49152, 576)
LAYERS = 30
GROUP = 32
ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
DENSE = ("f32", "f32-wxt", "f16", "bf16")
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8")


def int4_weight(n: int, k: int, act: torch.dtype) -> tuple[torch.Tensor, ...]:
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    return packed, (torch.rand(k // GROUP, n, 2) * 0.01).to(act)  # scales_and_zeros


def int8_weight(n: int, k: int, act: torch.dtype) -> tuple[torch.Tensor, ...]:
    return torch.randint(-128, 128, (n, k), dtype=torch.int8), (torch.rand(n) * 0.01).to(act)


def dense_weight(dtype: torch.dtype) -> Callable[[int, int, torch.dtype], tuple[torch.Tensor]]:
    return lambda n, k, act: (torch.randn(n, k).to(dtype),)


@dataclass
class Route:
    act: torch.dtype
    make: Callable[[int, int, torch.dtype], tuple[torch.Tensor, ...]]  # (N, K, act) -> weight
    mm: Callable[..., torch.Tensor]  # (x, *weight) -> x @ W.T
    rows: tuple[int, ...] | None = None  # None: every row count


def int4_avx2_weight(n: int, k: int, act: torch.dtype) -> tuple[torch.Tensor, ...]:
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scale = torch.rand(n, k // GROUP) * 0.01
    return avx2_kernels.pack_int4(codes, scale, -8 * scale)


def w8a8_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    xs = x.abs().amax(dim=1, keepdim=True) / 127
    xq = (x / xs.clamp(min=1e-30)).round().clamp(-127, 127).to(torch.int8)
    return torch._int_mm(xq, codes.t()).float() * xs * scale  # [K, N] view: no copy of W


_w8a8_compiled = torch.compile(w8a8_matmul, dynamic=True)

ROUTES = {
    "f32": Route(torch.float32, dense_weight(torch.float32), F.linear),
    "f32-wxt": Route(torch.float32, dense_weight(torch.float32),
                     lambda x, w: torch.mm(w, x.t()).t().contiguous()),
    "f16": Route(torch.float16, dense_weight(torch.float16), F.linear),
    "bf16": Route(torch.bfloat16, dense_weight(torch.bfloat16), F.linear),
    "int4-bf16": Route(torch.bfloat16, int4_weight,
                       lambda x, w, sz: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, GROUP, sz)),
    "int4-f32": Route(torch.float32, int4_weight,
                      lambda x, w, sz: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, GROUP, sz),
                      rows=(1, 4)),
    "int8-bf16": Route(torch.bfloat16, int8_weight, torch.ops.aten._weight_int8pack_mm),
    "int8-f32": Route(torch.float32, int8_weight, torch.ops.aten._weight_int8pack_mm,
                      rows=(1, 2, 4, 8, 16)),
    "int4-avx2": Route(torch.float32, int4_avx2_weight, avx2_kernels.int4_mm),
    "w8a8": Route(torch.float32, int8_weight, w8a8_matmul),
    "w8a8-c": Route(torch.float32, int8_weight, _w8a8_compiled),
}


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    info = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")),
                 platform.processor())
    flags = set(next((ln.split(":", 1)[1].split() for ln in info if ln.startswith("flags")), []))
    caches = []
    for d in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        level, kind, size = ((d / f).read_text().strip() for f in ("level", "type", "size"))
        if kind != "Instruction":
            caches.append(f"L{level} {size}")
    return (f"{model}; {', '.join(f + (' yes' if f in flags else ' no') for f in FLAGS)}; "
            f"{' '.join(caches)}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=ROWS)
    p.add_argument("--routes", nargs="+", choices=list(ROUTES), default=list(ROUTES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if "int4-avx2" in args.routes and not avx2_kernels.load():
        p.error("int4-avx2: the kernel did not build here (see the warning)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(machine())
    shapes = LAYER_SHAPES * LAYERS + [HEAD]  # every layer its own weights; one LM head
    weights = {name: [ROUTES[name].make(n, k, ROUTES[name].act) for n, k in shapes]
               for name in args.routes}
    print(f"{LAYERS} layers x {len(LAYER_SHAPES)} projections + LM head, distinct weights; "
          "MB read a step: " + ", ".join(
              f"{name} {sum(t.nbytes for w in ws for t in w) / 1e6:.0f}"
              for name, ws in weights.items()) + "\n")

    def one_pass(name: str, x: dict[int, torch.Tensor]) -> float:
        mm = ROUTES[name].mm
        t0 = time.perf_counter()
        for (_, k), w in zip(shapes, weights[name]):
            mm(x[k], *w)
        return time.perf_counter() - t0

    ms: dict[int, dict[str, float]] = {}
    print("| rows | " + " | ".join(args.routes) + " |")
    print("|---:|" + "---:|" * len(args.routes))
    for r in args.rows:
        names = [n for n in args.routes if ROUTES[n].rows is None or r in ROUTES[n].rows]
        xs = {n: {k: torch.randn(r, k).to(ROUTES[n].act) for k in (576, 1536)} for n in names}
        times: dict[str, list[float]] = {n: [] for n in names}
        for n in names:
            one_pass(n, xs[n])  # warm-up
        for _ in range(args.repeats):
            for n in names:
                times[n].append(one_pass(n, xs[n]))
        ms[r] = {n: statistics.median(t) * 1e3 for n, t in times.items()}
        print(f"| {r} | " + " | ".join(f"{ms[r][n]:.1f}" if n in ms[r] else "-"
                                       for n in args.routes) + " |", flush=True)

    print("\n| rows | fastest | ms | runner-up | ms |\n|---:|---|---:|---|---:|")
    for r, by in ms.items():
        ranked = sorted(by, key=by.get) + ["-"]
        print(f"| {r} | {ranked[0]} | {by[ranked[0]]:.1f} | {ranked[1]} | "
              f"{by.get(ranked[1], float('nan')):.1f} |")
    dense_wins = [r for r, by in ms.items()
                  if "int4-bf16" in by and any(n in by for n in DENSE)
                  and min(by[n] for n in DENSE if n in by) < by["int4-bf16"]]
    if dense_wins:
        print(f"\nthe fastest dense route ({', '.join(n for n in DENSE if n in args.routes)}) beats "
              f"int4-bf16 at rows {', '.join(map(str, dense_wins))}")


if __name__ == "__main__":
    main()
