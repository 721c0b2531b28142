"""Two alternatives to PyTorch's 4-bit CPU kernel for one-row decode, against it: Inductor's
kernel for a plain dequantize-then-matmul of one 4-bit projection, and the per-channel int8
kernel over all 30 SmolLM2 layers' projections (random weights of their shapes, cycled so they
do not stay in cache). Run it as is and under ATEN_CPU_CAPABILITY=avx2 to see both ISAs.

    .venv/bin/python benchmarks/int4_routes.py
    ATEN_CPU_CAPABILITY=avx2 TORCHINDUCTOR_CACHE_DIR=.bench/inductor-avx2 \\
        .venv/bin/python benchmarks/int4_routes.py
"""
from __future__ import annotations

import time

import torch

# The script's own folder is on sys.path when it runs as a file.
from offline_throughput import machine  # isort: skip

G = 32  # group size of the shipped Q4_1 file
SHAPES = [(576 + 2 * 192, 576), (576, 576), (2 * 1536, 576), (576, 1536)]  # qkv, o, gate+up, down
LAYERS = 30


def us(f, n: int = 300) -> float:
    for _ in range(20):
        f()
    start = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - start) / n * 1e6


def pack4(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    return (torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1),
            torch.rand(k // G, n, 2).to(torch.bfloat16))


def one_projection() -> tuple[float, float]:
    """int4pack against a compiled dequantize-then-matmul, one row, the gate+up shape."""
    n, k = SHAPES[2]
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    scale, zero = torch.rand(n, k // G) * 0.01, torch.rand(n, k // G) * 0.01
    x = torch.randn(1, k)

    def dequant_mm(x, packed, scale, zero):
        q = torch.stack([(packed & 15).float(), (packed >> 4).float()], -1).view(n, k // G, G)
        w = (q - 8) * scale.unsqueeze(-1) + zero.unsqueeze(-1)
        return x @ w.view(n, k).t()

    wp, sz = pack4(n, k)
    xb = x.to(torch.bfloat16)
    compiled = torch.compile(dequant_mm, dynamic=False)
    with torch.no_grad():
        compiled(x, packed, scale, zero)
        return (us(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, wp, G, sz)),
                us(lambda: compiled(x, packed, scale, zero)))


def all_layers() -> tuple[float, float]:
    """ms per step: every layer's projections, one bfloat16 row, int4pack against int8pack."""
    i4 = [[pack4(n, k) for n, k in SHAPES] for _ in range(LAYERS)]
    i8 = [[(torch.randint(-128, 127, (n, k), dtype=torch.int8), torch.rand(n).bfloat16())
           for n, k in SHAPES] for _ in range(LAYERS)]
    x = {k: torch.randn(1, k).bfloat16() for _, k in SHAPES}

    def run4():
        for layer in i4:
            for (_, k), (w, sz) in zip(SHAPES, layer):
                torch.ops.aten._weight_int4pack_mm_for_cpu(x[k], w, G, sz)

    def run8():
        for layer in i8:
            for (_, k), (w, s) in zip(SHAPES, layer):
                torch.ops.aten._weight_int8pack_mm(x[k], w, s)

    return us(run4, 20) / 1e3, us(run8, 20) / 1e3


def main() -> None:
    torch.set_num_threads(2)
    info = machine()
    print(f"Machine: {info['cpu']}; flags: {info['flags']}; ATen capability "
          f"{torch.backends.cpu.get_cpu_capability()}; 2 threads.")
    int4, compiled = one_projection()
    print(f"the 3,072 x 576 gate+up projection, one row: int4pack {int4:.1f} us, compiled "
          f"dequantize-then-matmul {compiled:.1f} us")
    int4, int8 = all_layers()
    print(f"30 layers' projections, one bfloat16 row: int4pack {int4:.2f} ms, int8pack "
          f"{int8:.2f} ms")


if __name__ == "__main__":
    main()
